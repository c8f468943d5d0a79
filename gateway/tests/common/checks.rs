//! Checks shared by the store tests: what the index says about an instance, and what its
//! spool file holds, against what was sent.

use std::fs::File;

use super::{data, InstanceJson};

/// Checks that every `expected` file is in `rows` exactly once with its UIDs, transfer syntax,
/// size, checksum and calling AE, and that its spool file holds the same dataset bytes behind
/// a valid Part 10 header.
pub fn assert_stored(
    gw: &super::Gateway,
    rows: &[InstanceJson],
    expected: &[data::FileInfo],
    calling_ae: &str,
) {
    let exported = gw.export_all();
    for e in expected {
        let matching: Vec<&InstanceJson> = rows
            .iter()
            .filter(|r| r.sop_instance_uid == e.sop_instance_uid)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{} ({}) should be indexed exactly once; rows: {matching:#?}",
            e.sop_instance_uid,
            e.path.display()
        );
        let r = matching[0];
        let what = format!("{} ({})", e.sop_instance_uid, e.path.display());
        assert_eq!(r.sop_class_uid, e.sop_class_uid, "SOP class of {what}");
        assert_eq!(
            r.study_instance_uid, e.study_instance_uid,
            "study of {what}"
        );
        assert_eq!(
            r.series_instance_uid, e.series_instance_uid,
            "series of {what}"
        );
        assert_eq!(
            r.transfer_syntax, e.transfer_syntax,
            "transfer syntax of {what}"
        );
        assert_eq!(r.size, e.size, "dataset size of {what}");
        assert_eq!(
            r.checksum, e.checksum,
            "checksum of {what} (BLAKE3 of the dataset as sent)"
        );
        assert_eq!(r.calling_ae, calling_ae, "calling AE of {what}");
        assert_exported_file(&exported.join(format!("{}.dcm", r.sop_instance_uid)), r);
    }
}

/// Checks one spool file against its index row: inside `spool/`, Part 10 header naming the
/// same instance and transfer syntax, dataset bytes hashing to the row's checksum.
/// Exports the instance (`dicom-gateway export`, gateway stopped) and checks the Part 10 file
/// against its index row: meta group, dataset size and checksum.
pub fn assert_spool_file(gw: &super::Gateway, r: &InstanceJson) {
    assert_exported_file(&gw.export(&r.sop_instance_uid), r);
}

/// Checks a file written by `dicom-gateway export` against the index row of its instance.
pub fn assert_exported_file(file: &std::path::Path, r: &InstanceJson) {
    let file = file.to_path_buf();
    let meta = data::read_meta(&file)
        .unwrap_or_else(|e| panic!("spool file of {}: {e}", r.sop_instance_uid));
    assert_eq!(
        meta.sop_instance_uid,
        r.sop_instance_uid,
        "{}: (0002,0003)",
        file.display()
    );
    assert_eq!(
        meta.sop_class_uid,
        r.sop_class_uid,
        "{}: (0002,0002)",
        file.display()
    );
    assert_eq!(
        meta.transfer_syntax,
        r.transfer_syntax,
        "{}: (0002,0010)",
        file.display()
    );
    let len = File::open(&file)
        .and_then(|f| f.metadata())
        .expect("stat exported file")
        .len();
    assert_eq!(
        len - meta.dataset_offset,
        r.size,
        "{}: dataset size on disk",
        file.display()
    );
    assert_eq!(
        data::dataset_checksum(&file),
        r.checksum,
        "{}: dataset checksum on disk",
        file.display()
    );
}
