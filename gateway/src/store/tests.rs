//! Store crash windows: a crash between rename and commit (file without row), a crash while
//! receiving (temp file), an incomplete spool file without a row, unsettled rows, and the
//! acknowledged path itself.

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
    // Content not matching its name, no row: being flushed at the crash, never acknowledged.
    assert_eq!(rec.incomplete_removed, 1);
    assert_eq!(rec.quarantined, 0);
    assert!(!dir.path().join(spool::relative_path(&bogus)).exists());
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

/// Indexed attributes beyond the in-memory head (a large private element before the patient and
/// study modules) are read back from the file; the stored bytes are exactly those received, in
/// PDVs of every size (buffered and written directly).
#[tokio::test(flavor = "multi_thread")]
async fn attributes_past_the_head_are_read_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    let base = dataset("1.9.7");
    // Split after (0008,0060) Modality: the rest starts with (0010,0020).
    let split = base
        .windows(4)
        .position(|w| w == [0x10, 0x00, 0x20, 0x00])
        .unwrap();
    let mut data = base[..split].to_vec();
    // (0009,1000) OB, explicit VR with a 4-byte length (PS3.5 section 7.1.2).
    let private = vec![0x5au8; 3 * super::HEAD_BYTES];
    data.extend_from_slice(&[0x09, 0x00, 0x00, 0x10, b'O', b'B', 0, 0]);
    data.extend_from_slice(&(private.len() as u32).to_le_bytes());
    data.extend_from_slice(&private);
    data.extend_from_slice(&base[split..]);
    let mut i = store.begin(incoming("1.9.7")).unwrap();
    for chunk in [&data[..100], &data[100..70_000], &data[70_000..]] {
        i.write(chunk).unwrap();
    }
    let stored = i.finish().await.unwrap();
    assert_eq!(stored.outcome, CommitOutcome::Stored);
    assert_eq!(stored.study_instance_uid, "1.2.3.4");
    assert_eq!(stored.series_instance_uid, "1.2.3.4.5");
    assert_eq!(stored.size, data.len() as u64);
    let row = index::get(store.db().as_ref(), "1.9.7").unwrap().unwrap();
    assert_eq!(row.patient_id, "PID");
    let file = dir.path().join(spool::relative_path(&row.checksum));
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        bytes.ends_with(&data),
        "stored bytes differ from the received dataset"
    );
    drop(store);
    rt.close().unwrap();
}

fn spool_bytes(sop: &str, ds: &[u8]) -> Vec<u8> {
    let mut bytes = spool::encode_header(&spool::FileMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
        sop_instance_uid: sop.into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        source_ae: "CT01".into(),
    });
    bytes.extend_from_slice(ds);
    bytes
}

/// Stores `(sop, dataset)` pairs through the normal path, then stops without a clean shutdown.
fn store_then_crash(dir: &Path, items: &[(&str, Vec<u8>)]) -> Vec<InstanceRecord> {
    let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
    let (store, srt, _) = open(dir, &["pacs"]);
    rt.block_on(async {
        for (sop, ds) in items {
            let mut i = store.begin(incoming(sop)).unwrap();
            i.write(ds).unwrap();
            i.finish().await.unwrap();
        }
    });
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    // Markers of settled rows go with the next commit; only the last one may still be there.
    assert!(
        index::unsettled_count(store.db()) <= 1,
        "settled rows keep markers"
    );
    drop(store);
    srt.close_unclean();
    let (db, _) = index::open(dir, 1 << 20).unwrap();
    assert_eq!(
        index::unsettled_count(&db),
        0,
        "the index thread's last markers stay"
    );
    rows
}

/// The three flushes of an acknowledgement run concurrently (module doc), so a power cut can
/// leave committed rows whose file is missing (rename not durable) or torn (data not durable).
/// Those were never acknowledged: start-up drops them with their queue entries and keeps the
/// intact one, and the markers are gone afterwards.
#[test]
fn unsettled_rows_without_a_durable_file_are_dropped_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let rows = store_then_crash(
        dir.path(),
        &[
            ("1.9.20", dataset("1.9.20")),
            ("1.9.21", dataset("1.9.21")),
            ("1.9.22", dataset("1.9.22")),
        ],
    );
    let path = |sop: &str| {
        let r = rows.iter().find(|r| r.sop_instance_uid == sop).unwrap();
        (
            dir.path().join(spool::relative_path(&r.checksum)),
            r.checksum,
        )
    };
    {
        let (db, _) = index::open(dir.path(), 1 << 20).unwrap();
        for sop in ["1.9.20", "1.9.21", "1.9.22"] {
            index::mark_unsettled(&db, sop, &path(sop).1);
        }
    }
    std::fs::remove_file(path("1.9.20").0).unwrap();
    let torn = std::fs::read(path("1.9.21").0).unwrap();
    std::fs::write(path("1.9.21").0, &torn[..torn.len() - 20]).unwrap();

    let (store, rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!(rec.unacknowledged_dropped, 2);
    assert_eq!(rec.missing_files, 0);
    assert_eq!(rec.quarantined, 0);
    let left: Vec<String> = index::all_instances(store.db().as_ref())
        .unwrap()
        .into_iter()
        .map(|r| r.sop_instance_uid)
        .collect();
    assert_eq!(left, ["1.9.22"]);
    assert_eq!(queue::stats(store.db(), "pacs").unwrap().0.pending, 1);
    assert!(!path("1.9.21").0.exists(), "torn file left behind");
    assert!(path("1.9.22").0.exists());
    assert_eq!(index::unsettled_count(store.db()), 0);
    drop(store);
    rt.close().unwrap();
}

/// A new version of an instance committed just before a crash: the old version's file is
/// deleted only once the new one is settled. If the new file survived, it stays the row and the
/// old file goes; if it did not, the old version (acknowledged earlier) comes back, queued.
#[test]
fn a_replaced_version_survives_until_its_replacement_is_durable() {
    let v2 = |sop: &str| {
        let mut d = dataset(sop);
        // (0020,0013) Instance Number IS "2 ": different bytes, same instance.
        d.extend_from_slice(&[0x20, 0x00, 0x13, 0x00, b'I', b'S', 2, 0, b'2', b' ']);
        d
    };
    for new_file_survived in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let rows = store_then_crash(
            dir.path(),
            &[("1.9.30", dataset("1.9.30")), ("1.9.30", v2("1.9.30"))],
        );
        assert_eq!(rows.len(), 1);
        let new = rows[0].checksum;
        let old: spool::Hash = blake3::hash(&dataset("1.9.30")).into();
        assert!(!dir.path().join(spool::relative_path(&old)).exists());
        // As the crash before the settle left it: old file still there, marker on the new row.
        std::fs::write(
            dir.path().join(spool::relative_path(&old)),
            spool_bytes("1.9.30", &dataset("1.9.30")),
        )
        .unwrap();
        {
            let (db, _) = index::open(dir.path(), 1 << 20).unwrap();
            index::mark_unsettled(&db, "1.9.30", &new);
        }
        if !new_file_survived {
            std::fs::remove_file(dir.path().join(spool::relative_path(&new))).unwrap();
        }
        let (store, rt, rec) = open(dir.path(), &["pacs"]);
        let row = index::get(store.db().as_ref(), "1.9.30").unwrap().unwrap();
        if new_file_survived {
            assert_eq!(row.checksum, new);
            assert_eq!(rec.reindexed, 0);
            assert!(!dir.path().join(spool::relative_path(&old)).exists());
        } else {
            assert_eq!(row.checksum, old, "the acknowledged old version is lost");
            assert_eq!(rec.unacknowledged_dropped, 1);
            assert_eq!(rec.reindexed, 1);
            assert_eq!(queue::stats(store.db(), "pacs").unwrap().0.pending, 1);
        }
        drop(store);
        rt.close().unwrap();
    }
}
