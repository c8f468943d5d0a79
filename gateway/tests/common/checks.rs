//! Checks shared by the store tests: what the index says about an instance, and what its
//! spool file holds, against what was sent.

use std::fs::File;
use std::path::Path;

use super::{data, InstanceJson};

/// Checks that every `expected` file is in `rows` exactly once with its UIDs, transfer syntax,
/// size, checksum and calling AE, and that its spool file holds the same dataset bytes behind
/// a valid Part 10 header.
pub fn assert_stored(
    data_dir: &Path,
    rows: &[InstanceJson],
    expected: &[data::FileInfo],
    calling_ae: &str,
) {
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
        assert_spool_file(data_dir, r);
    }
}

/// Checks one spool file against its index row: inside `spool/`, Part 10 header naming the
/// same instance and transfer syntax, dataset bytes hashing to the row's checksum.
pub fn assert_spool_file(data_dir: &Path, r: &InstanceJson) {
    let rel = Path::new(&r.path);
    assert!(
        rel.is_relative() && rel.starts_with("spool"),
        "path {:?} of {} should be relative to data_dir and under spool/",
        r.path,
        r.sop_instance_uid
    );
    let file = data_dir.join(rel);
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
        .expect("stat spool file")
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
