//! C-STORE end to end with DCMTK's storescu: what is acknowledged is on disk, byte for byte
//! as it was sent, and indexed with the right identifiers.
//!
//! Guards against: a dataset altered on the way (re-encoded, truncated, padded) for any
//! transfer syntax, including deflated, big endian and encapsulated ones; index rows with the
//! wrong UIDs, transfer syntax, size or checksum; a spool file that is not valid Part 10;
//! duplicates stored twice; interference between concurrent associations; a whole instance
//! held in memory (a 200 MB multi-frame must pass with a small resident set).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::data::{self, FileInfo, Syntax};
use common::{assert_stored, store_reports, Gateway, GatewayConfig, ToolOutput};

/// Runs storescu `-v` with `flag` on `files`; panics unless every file got a Success response.
fn store_all(gw: &Gateway, flag: &str, files: &[PathBuf]) -> ToolOutput {
    let out = gw.storescu().arg("-v").arg(flag).files(files).run();
    out.assert_success();
    let reports = store_reports(&out.text());
    assert_eq!(
        reports.len(),
        files.len(),
        "one store response per file: {}",
        out.describe()
    );
    for r in &reports {
        assert!(
            r.is_success(),
            "{} was answered {:?}: {}",
            r.file.display(),
            r.status,
            out.describe()
        );
    }
    out
}

#[test]
fn ct_series_is_stored_byte_exact_and_indexed() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let files = data::ct_series(&gw.scratch("ct"), "ct", 20, 512, 512);
    let expected: Vec<FileInfo> = files.iter().map(|f| data::as_sent_by_storescu(f)).collect();

    store_all(&gw, "-xe", &files);
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    let busy = gw.instances_output();
    assert!(
        !busy.success(),
        "`instances` must fail while the daemon holds the index: {}",
        busy.describe()
    );

    let status = gw.stop();
    assert!(
        status.success(),
        "SIGTERM should end the gateway cleanly, got {status}"
    );
    let rows = gw.instances();
    assert_eq!(rows.len(), 20, "{rows:#?}");
    assert_stored(&gw, &rows, &expected, "STORESCU");
    assert_eq!(
        gw.stored_records().len(),
        20,
        "one intact record per instance"
    );
    assert!(
        gw.unfinished_records().is_empty(),
        "unfinished records after stop: {:?}",
        gw.unfinished_records()
    );

    // DCMTK reads an exported instance as a whole DICOM file.
    let spool = gw.export(&rows[0].sop_instance_uid);
    let mut cmd = std::process::Command::new(common::dcmtk("dcmdump"));
    cmd.arg("-q")
        .arg("+P")
        .arg("0010,0010")
        .arg("+P")
        .arg("0008,0018")
        .arg(&spool);
    let dump = common::run_tool(cmd, Duration::from_secs(30));
    dump.assert_success()
        .assert_contains("Test^Synthetic")
        .assert_contains(&rows[0].sop_instance_uid);

    // The index survives a clean restart.
    gw.restart();
    gw.stop();
    assert_eq!(gw.instances().len(), 20);
}

#[test]
fn every_transfer_syntax_is_stored_as_sent() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let dir = gw.scratch("syntaxes");
    let series = data::SeriesSpec::new(128, 128);
    let mut expected = Vec::new();
    for (i, syntax) in (1u32..).zip(Syntax::ALL) {
        let source = if syntax.needs_8bit() {
            data::sc_8bit(&dir.join(format!("src-{i}.dcm")), 128, 128)
        } else {
            series.write_ct(&dir.join(format!("src-{i}.dcm")), i)
        };
        let file = data::convert(&source, &dir.join(format!("{syntax:?}.dcm")), syntax);
        let info = data::as_sent_by_storescu(&file);
        assert_eq!(info.transfer_syntax, syntax.uid());
        store_all(&gw, syntax.storescu_flag(), std::slice::from_ref(&file));
        expected.push(info);
    }
    let pdf = data::encapsulated_pdf(&dir.join("report.dcm"));
    store_all(&gw, "-xe", std::slice::from_ref(&pdf));
    expected.push(data::as_sent_by_storescu(&pdf));
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), expected.len(), "{rows:#?}");
    assert_stored(&gw, &rows, &expected, "STORESCU");
    // An independent reader (dicom-object) parses every exported instance, whatever its syntax.
    for r in &rows {
        let info = data::inspect(&gw.export(&r.sop_instance_uid));
        assert_eq!(info.sop_instance_uid, r.sop_instance_uid);
        assert_eq!(info.study_instance_uid, r.study_instance_uid);
    }
}

#[test]
fn storescu_conversion_is_stored_in_the_negotiated_syntax() {
    // storescu re-encodes an explicit VR LE file when only another syntax is negotiated; the
    // gateway must record the syntax of the bytes it received, not of the SCU's file.
    let mut gw = Gateway::start(GatewayConfig::default());
    let dir = gw.scratch("negotiated");
    let files = data::ct_series(&dir, "src", 2, 128, 128);
    let mut expected = Vec::new();
    for (file, syntax) in files.iter().zip([Syntax::ImplicitLe, Syntax::Deflated]) {
        store_all(&gw, syntax.storescu_flag(), std::slice::from_ref(file));
        // DCMTK's file encoder writes what its network encoder sends (checked against
        // storescp +B), so the converted copy is the expectation.
        let copy = data::convert(file, &dir.join(format!("{syntax:?}.dcm")), syntax);
        expected.push(data::as_sent_by_storescu(&copy));
    }
    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_stored(&gw, &rows, &expected, "STORESCU");
}

#[test]
fn duplicate_instance_is_acknowledged_and_stored_once() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let files = data::ct_series(&gw.scratch("dup"), "dup", 2, 64, 64);
    let (a, b) = (&files[0], &files[1]);
    let expected = vec![data::as_sent_by_storescu(a), data::as_sent_by_storescu(b)];

    // Twice in one association, then again in another.
    store_all(&gw, "-xe", &[a.clone(), a.clone(), b.clone()]);
    store_all(&gw, "-xe", std::slice::from_ref(a));
    // And after a restart, against the persisted index.
    gw.restart();
    store_all(&gw, "-xe", std::slice::from_ref(a));

    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), 2, "a duplicate must not add a row: {rows:#?}");
    assert_stored(&gw, &rows, &expected, "STORESCU");
    assert_eq!(
        gw.stored_records().len(),
        2,
        "a duplicate must not add an intact record: {:?}",
        gw.stored_records()
    );
}

#[test]
fn concurrent_associations_are_all_stored() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: u32 = 5;
    let mut gw = Gateway::start(GatewayConfig::default());
    let batches: Vec<Vec<PathBuf>> = (0..CLIENTS)
        .map(|i| data::ct_series(&gw.scratch(&format!("c{i}")), "img", PER_CLIENT, 128, 128))
        .collect();
    let expected: Vec<FileInfo> = batches
        .iter()
        .flatten()
        .map(|f| data::as_sent_by_storescu(f))
        .collect();

    let running: Vec<_> = batches
        .iter()
        .map(|files| gw.storescu().arg("-v").arg("-xe").files(files).spawn())
        .collect();
    for (i, r) in running.into_iter().enumerate() {
        let out = r.wait();
        out.assert_success();
        let reports = store_reports(&out.text());
        assert_eq!(
            reports.len(),
            PER_CLIENT as usize,
            "client {i}: {}",
            out.describe()
        );
        assert!(
            reports.iter().all(|r| r.is_success()),
            "client {i}: {}",
            out.describe()
        );
    }
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), CLIENTS * PER_CLIENT as usize);
    assert_stored(&gw, &rows, &expected, "STORESCU");
}

#[test]
fn multiframe_200mb_is_streamed_with_bounded_memory() {
    const RSS_LIMIT_KIB: u64 = 64 * 1024;
    let mut gw = Gateway::start(GatewayConfig::default());
    // 400 frames of 512 x 512 x 16 bits = 209,715,200 bytes of pixel data.
    let file = data::multiframe(&gw.scratch("mf").join("mf.dcm"), 400, 512, 512);
    let expected = data::as_sent_by_storescu(&file);
    assert!(
        expected.size >= 200_000_000,
        "test data too small: {}",
        expected.size
    );

    let out = store_all(&gw, "-xe", std::slice::from_ref(&file));
    let peak = gw.peak_rss_kib();
    eprintln!(
        "multi-frame: {} bytes stored in {:.1?}; gateway peak RSS (VmHWM) {peak} KiB",
        expected.size, out.elapsed
    );
    assert!(
        peak < RSS_LIMIT_KIB,
        "gateway peak RSS (VmHWM) was {peak} KiB after receiving a {} byte instance; the limit is {RSS_LIMIT_KIB} KiB: \
         the dataset must be streamed to disk, not held in memory",
        expected.size
    );
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    gw.stop();
    let rows = gw.instances();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_stored(&gw, &rows, std::slice::from_ref(&expected), "STORESCU");
}
