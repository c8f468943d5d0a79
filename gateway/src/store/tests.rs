//! Store crash windows: a crash between rename and commit (file without row), a crash while
//! receiving (temp file), a damaged spool file, and the acknowledged path itself.

use super::*;
use tokio_util::sync::CancellationToken;

/// A minimal explicit VR little endian dataset with the indexed attributes.
pub(super) fn dataset(sop: &str) -> Vec<u8> {
    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &str) {
        let mut v = v.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(if vr == b"UI" { 0 } else { b' ' });
        }
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(&v);
    }
    let mut d = Vec::new();
    el(&mut d, 0x0008, 0x0016, b"UI", "1.2.840.10008.5.1.4.1.1.7");
    el(&mut d, 0x0008, 0x0018, b"UI", sop);
    el(&mut d, 0x0008, 0x0060, b"CS", "OT");
    el(&mut d, 0x0010, 0x0020, b"LO", "PID");
    el(&mut d, 0x0020, 0x000D, b"UI", "1.2.3.4");
    el(&mut d, 0x0020, 0x000E, b"UI", "1.2.3.4.5");
    d
}

pub(super) fn open(dir: &Path, dests: &[&str]) -> (Store, StoreRuntime, Recovery) {
    let dests: Vec<String> = dests.iter().map(|d| (*d).to_owned()).collect();
    let router: Router = Arc::new(move |_: &str, _: &str, _: &str| dests.clone());
    let wake: Wake = Arc::new(|_: &str| {});
    Store::open(dir, 0, CancellationToken::new(), router, wake).unwrap()
}

pub(super) fn incoming(sop: &str) -> IncomingInstance {
    IncomingInstance {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
        sop_instance_uid: sop.into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        calling_ae: "CT01".into(),
        high_priority: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_instance_is_on_disk_indexed_and_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    let mut i = store.begin(incoming("1.9.1")).unwrap();
    i.write(&dataset("1.9.1")).unwrap();
    let stored = i.finish().await.unwrap();
    assert_eq!(stored.outcome, CommitOutcome::Stored);
    // Same bytes again: a duplicate, not a second copy.
    let mut i = store.begin(incoming("1.9.1")).unwrap();
    i.write(&dataset("1.9.1")).unwrap();
    assert_eq!(i.finish().await.unwrap().outcome, CommitOutcome::Duplicate);
    let (counts, _) = queue::stats(store.db(), "pacs").unwrap();
    assert_eq!(counts.pending, 1);
    let db = store.db().clone();
    drop(store);
    drop(db);
    rt.close().unwrap();
    let rows = read_instances(dir.path()).unwrap();
    assert_eq!(rows.len(), 1);
    let file = dir.path().join(spool::relative_path(&rows[0].checksum));
    let (meta, _, hash, size) = spool::hash_dataset(&file).unwrap();
    assert_eq!(hash, rows[0].checksum);
    assert_eq!(size, dataset("1.9.1").len() as u64);
    assert_eq!(meta.source_ae, "CT01");
    assert_eq!(
        std::fs::read_dir(dir.path().join(spool::TMP_DIR))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatched_and_unparseable_datasets_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _rt, _) = open(dir.path(), &[]);
    let mut i = store.begin(incoming("1.9.2")).unwrap();
    i.write(&dataset("1.9.3")).unwrap();
    assert!(matches!(i.finish().await, Err(StoreError::Mismatch { .. })));
    let mut i = store.begin(incoming("1.9.4")).unwrap();
    i.write(b"\x08\x00\x18\x00UI\xff\xff").unwrap();
    assert!(matches!(
        i.finish().await,
        Err(StoreError::CannotUnderstand { .. })
    ));
    // Dropped mid-transfer.
    let mut i = store.begin(incoming("1.9.5")).unwrap();
    i.write(&dataset("1.9.5")[..10]).unwrap();
    drop(i);
    assert_eq!(
        std::fs::read_dir(dir.path().join(spool::TMP_DIR))
            .unwrap()
            .count(),
        0
    );
    assert!(index::all_instances(store.db().as_ref())
        .unwrap()
        .is_empty());
}

#[test]
fn crash_between_rename_and_commit_is_reindexed_and_queued() {
    let dir = tempfile::tempdir().unwrap();
    {
        // First run: creates the layout and leaves the index marked unclean (no close).
        let (s, rt, rec) = open(dir.path(), &["pacs"]);
        assert!(rec.clean);
        drop(s);
        rt.close_unclean();
    }
    // A renamed spool file whose commit never happened, a leftover temp file, a damaged file.
    let ds = dataset("1.9.9");
    let hash: spool::Hash = blake3::hash(&ds).into();
    let mut bytes = spool::encode_header(&spool::FileMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
        sop_instance_uid: "1.9.9".into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        source_ae: "CT01".into(),
    });
    bytes.extend_from_slice(&ds);
    std::fs::write(dir.path().join(spool::relative_path(&hash)), &bytes).unwrap();
    std::fs::write(dir.path().join("tmp/123-0.part"), b"partial").unwrap();
    let bogus: spool::Hash = [7; 32];
    std::fs::write(dir.path().join(spool::relative_path(&bogus)), &bytes).unwrap();

    let (store, _rt, rec) = open(dir.path(), &["pacs"]);
    assert!(!rec.clean);
    assert_eq!(rec.temp_files_removed, 1);
    assert_eq!(rec.reindexed, 1);
    assert_eq!(rec.quarantined, 1);
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].sop_instance_uid, "1.9.9");
    assert_eq!(rows[0].calling_ae, "CT01");
    assert_eq!(
        queue::stats(store.db(), "pacs").unwrap().0.pending,
        1,
        "re-indexed instance is queued"
    );
}

#[test]
fn missing_spool_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
    let checksum = {
        let (store, srt, _) = open(dir.path(), &[]);
        rt.block_on(async {
            let mut i = store.begin(incoming("1.9.7")).unwrap();
            i.write(&dataset("1.9.7")).unwrap();
            i.finish().await.unwrap();
        });
        let c = index::all_instances(store.db().as_ref()).unwrap()[0].checksum;
        drop(store);
        srt.close_unclean();
        c
    };
    std::fs::remove_file(dir.path().join(spool::relative_path(&checksum))).unwrap();
    let (_s, _rt, rec) = open(dir.path(), &[]);
    assert_eq!(rec.missing_files, 1);
}
