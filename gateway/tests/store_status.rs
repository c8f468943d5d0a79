//! C-STORE failure statuses (PS3.4 Annex B.2.3, PS3.7 Annex C; DESIGN.md section 4).
//!
//! Guards against: acknowledging (0000) an instance that was not stored durably; storing an
//! instance whose command and dataset disagree, or one that cannot be indexed; the wrong status
//! family (a modality retries A7xx later but must not retry A9xx/Cxxx); a failed C-STORE that
//! leaves a temporary file or an index row behind, or kills the association or the daemon.
//!
//! The exact statuses are checked with the raw client; storescu's report is checked too, as
//! a modality operator would see it.

mod common;

use std::time::Duration;

use common::data::{self, CT_IMAGE_STORAGE, SECONDARY_CAPTURE_IMAGE_STORAGE};
use common::raw::{self, assert_status, status, AssociateRq, Pdu, RawClient};
use common::{assert_stored, store_reports, Gateway, GatewayConfig, GATEWAY_AE};

/// Dataset fragment size for raw C-STOREs: well under any max PDU length the gateway may
/// announce (at least 16384 per its config validation) minus PDU and PDV headers.
const FRAGMENT: usize = 16000;

/// An association with Verification (id 1), CT Image Storage (id 3) and Secondary Capture
/// Image Storage (id 5), explicit VR little endian.
fn store_association(gw: &Gateway) -> RawClient {
    let mut c = RawClient::connect(gw.port());
    c.associate(&AssociateRq::new(
        GATEWAY_AE,
        "RAW",
        &[
            (raw::VERIFICATION, &[raw::IMPLICIT_VR_LE]),
            (CT_IMAGE_STORAGE, &[raw::EXPLICIT_VR_LE]),
            (SECONDARY_CAPTURE_IMAGE_STORAGE, &[raw::EXPLICIT_VR_LE]),
        ],
    ));
    c
}

#[test]
fn command_and_dataset_mismatch_is_refused_with_a900() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let files = data::ct_series(&gw.scratch("mismatch"), "ct", 1, 64, 64);
    let info = data::inspect(&files[0]);
    let dataset = data::dataset_bytes(&files[0]);

    let mut c = store_association(&gw);
    let other_uid = data::new_uid();
    assert_status(
        c.c_store(3, 1, CT_IMAGE_STORAGE, &other_uid, &dataset, FRAGMENT),
        status::DATASET_MISMATCH,
        "SOP Instance UID in the command differs from the dataset's",
    );
    assert_status(
        c.c_store(
            5,
            2,
            SECONDARY_CAPTURE_IMAGE_STORAGE,
            &info.sop_instance_uid,
            &dataset,
            FRAGMENT,
        ),
        status::DATASET_MISMATCH,
        "SOP Class UID in the command (Secondary Capture) differs from the dataset's (CT)",
    );
    // The association survives both refusals and stores the consistent instance.
    assert_status(
        c.c_store(
            3,
            3,
            CT_IMAGE_STORAGE,
            &info.sop_instance_uid,
            &dataset,
            FRAGMENT,
        ),
        status::SUCCESS,
        "consistent C-STORE after two refusals",
    );
    assert_eq!(c.release(), Pdu::ReleaseRp);
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    gw.stop();
    let rows = gw.instances();
    assert_eq!(
        rows.len(),
        1,
        "only the consistent instance may be indexed: {rows:#?}"
    );
    assert!(rows.iter().all(|r| r.sop_instance_uid != other_uid));
    assert_stored(&gw, &rows, &[info], "RAW");
    assert_eq!(gw.stored_records().len(), 1, "{:?}", gw.stored_records());
}

#[test]
fn unparseable_dataset_is_refused_with_c000() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let mut c = store_association(&gw);

    let garbage = b"this is not a DICOM data set; ".repeat(200);
    assert_status(
        c.c_store(3, 1, CT_IMAGE_STORAGE, &data::new_uid(), &garbage, FRAGMENT),
        status::CANNOT_UNDERSTAND,
        "text instead of a dataset",
    );
    // An element whose length runs past the end of the data.
    let mut truncated = Vec::new();
    truncated.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, b'U', b'I', 0xF0, 0x00]);
    truncated.extend_from_slice(b"1.2.840.10008.5.1.4.1.1.2\0");
    assert_status(
        c.c_store(
            3,
            2,
            CT_IMAGE_STORAGE,
            &data::new_uid(),
            &truncated,
            FRAGMENT,
        ),
        status::CANNOT_UNDERSTAND,
        "element length running past the end of the data",
    );
    assert_status(
        c.c_echo(1, 3),
        status::SUCCESS,
        "the association must survive a C000",
    );
    assert_eq!(c.release(), Pdu::ReleaseRp);
    gw.assert_no_unfinished_within(Duration::from_secs(5));
    gw.assert_echo_ok();

    gw.stop();
    assert!(gw.instances().is_empty(), "nothing may be indexed");
    assert!(
        gw.stored_records().is_empty(),
        "nothing may be spooled: {:?}",
        gw.stored_records()
    );
}

#[test]
fn disk_reserve_refuses_with_a700_until_space_returns() {
    let cfg = GatewayConfig {
        // A reserve no test machine has free: 1 EiB.
        min_free_disk_mb: 1 << 40,
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(cfg);
    let files = data::ct_series(&gw.scratch("full"), "ct", 2, 64, 64);
    let expected: Vec<_> = files.iter().map(|f| data::as_sent_by_storescu(f)).collect();

    let out = gw.storescu().arg("-v").arg("-xe").file(&files[0]).run();
    let reports = store_reports(&out.text());
    assert_eq!(reports.len(), 1, "{}", out.describe());
    assert!(
        reports[0].status.contains("OutOfResources"),
        "storescu should report Refused: OutOfResources: {}",
        out.describe()
    );

    let mut c = store_association(&gw);
    let dataset = data::dataset_bytes(&files[1]);
    assert_status(
        c.c_store(
            3,
            1,
            CT_IMAGE_STORAGE,
            &expected[1].sop_instance_uid,
            &dataset,
            FRAGMENT,
        ),
        status::OUT_OF_RESOURCES,
        "C-STORE below the disk reserve",
    );
    assert_status(
        c.c_echo(1, 2),
        status::SUCCESS,
        "the association must survive an A700",
    );
    assert_eq!(c.release(), Pdu::ReleaseRp);
    gw.assert_no_unfinished_within(Duration::from_secs(5));
    assert!(
        gw.stored_records().is_empty(),
        "refused instances were spooled: {:?}",
        gw.stored_records()
    );

    gw.stop();
    assert!(gw.instances().is_empty(), "refused instances were indexed");

    // With the reserve back to normal the same instances are accepted.
    gw.set_config(GatewayConfig {
        min_free_disk_mb: 16,
        ..gw.config().clone()
    });
    gw.restart();
    gw.storescu()
        .arg("-xe")
        .files(&files)
        .run()
        .assert_success();
    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), 2);
    assert_stored(&gw, &rows, &expected, "STORESCU");
}
