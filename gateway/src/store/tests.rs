//! Store crash windows: index commits lost with the stop (records past the durable index), an
//! unfinished record at a segment's end, a torn record, a lost segment, replaced versions and
//! duplicates across recovery, and the acknowledged path itself.

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
    Store::open(dir, 0, 0, CancellationToken::new(), router, wake).unwrap()
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

/// The dataset of an indexed instance, read from its record and checked against its hash.
pub(crate) fn read_dataset(data_dir: &Path, rec: &InstanceRecord) -> io::Result<Vec<u8>> {
    let loc = rec.location;
    let f = std::fs::File::open(segment::segment_path(data_dir, loc.segment))?;
    let mut body = segment::Range::new(&f, loc.body_start(), loc.body_len);
    spool::read_header(&mut body)?;
    let mut out = Vec::new();
    body.read_to_end(&mut out)?;
    if *blake3::hash(&out).as_bytes() != rec.checksum {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hash mismatch"));
    }
    Ok(out)
}

fn store_one(store: &Store, sop: &str, data: &[u8]) -> CommitOutcome {
    let mut i = store.begin(incoming(sop)).unwrap();
    i.write(data).unwrap();
    i.finish().unwrap().outcome
}

fn segment_files(dir: &Path) -> Vec<(u64, u64)> {
    segment::list(dir)
        .unwrap()
        .into_iter()
        .map(|id| {
            let len = std::fs::metadata(segment::segment_path(dir, id))
                .unwrap()
                .len();
            (id, len)
        })
        .collect()
}

/// What a crash leaves when the index commits of a run were never flushed: the index as it was
/// at `snapshot`, the segments as they are.
fn lose_index_commits_since(dir: &Path, snapshot: &[u8]) {
    std::fs::write(dir.join(index::INDEX_FILE), snapshot).unwrap();
}

fn snapshot(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(index::INDEX_FILE)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_instance_is_in_its_segment_indexed_and_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    assert_eq!(
        store_one(&store, "1.9.1", &dataset("1.9.1")),
        CommitOutcome::Stored
    );
    // Same bytes again: a duplicate, not a second copy.
    assert_eq!(
        store_one(&store, "1.9.1", &dataset("1.9.1")),
        CommitOutcome::Duplicate
    );
    let (counts, _) = queue::stats(store.db(), "pacs").unwrap();
    assert_eq!(counts.pending, 1);
    drop(store);
    rt.close().unwrap();
    let rows = read_instances(dir.path()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        read_dataset(dir.path(), &rows[0]).unwrap(),
        dataset("1.9.1")
    );
    // Exported, it is a Part 10 file naming its source.
    let mut out = Vec::new();
    let n = export(dir.path(), "1.9.1", &mut out).unwrap();
    assert_eq!(n, out.len() as u64);
    let (meta, offset) = spool::read_header(&mut out.as_slice()).unwrap();
    assert_eq!(meta.source_ae, "CT01");
    assert_eq!(&out[offset as usize..], dataset("1.9.1").as_slice());
    // The duplicate's body was freed: a scan skips it.
    let f =
        std::fs::File::open(segment::segment_path(dir.path(), rows[0].location.segment)).unwrap();
    let salt = segment::read_salt(&f, rows[0].location.segment)
        .unwrap()
        .unwrap();
    let scan = segment::scan(&f, &salt, rows[0].location.segment, 0).unwrap();
    assert_eq!(scan.records.len(), 2);
    assert!(scan.records[1].meta.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatched_unparseable_and_dropped_instances_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _rt, _) = open(dir.path(), &[]);
    let mut i = store.begin(incoming("1.9.2")).unwrap();
    i.write(&dataset("1.9.3")).unwrap();
    assert!(matches!(i.finish(), Err(StoreError::Mismatch { .. })));
    let mut i = store.begin(incoming("1.9.4")).unwrap();
    i.write(b"\x08\x00\x18\x00UI\xff\xff").unwrap();
    assert!(matches!(
        i.finish(),
        Err(StoreError::CannotUnderstand { .. })
    ));
    // Dropped mid-transfer.
    let mut i = store.begin(incoming("1.9.5")).unwrap();
    i.write(&vec![7u8; 300_000]).unwrap();
    drop(i);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1, "one segment reused: {files:?}");
    assert_eq!(
        files[0].1,
        segment::SEGMENT_HEADER,
        "nothing left after the header"
    );
    assert!(index::all_instances(store.db().as_ref())
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_lost_with_the_stop_are_rebuilt_from_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    assert_eq!(
        store_one(&store, "1.9.1", &dataset("1.9.1")),
        CommitOutcome::Stored
    );
    drop(store);
    rt.close().unwrap();
    let before = snapshot(dir.path());

    let (store, rt, _) = open(dir.path(), &["pacs"]);
    for sop in ["1.9.2", "1.9.3", "1.9.4"] {
        assert_eq!(store_one(&store, sop, &dataset(sop)), CommitOutcome::Stored);
    }
    // A new version of 1.9.1 and a duplicate of 1.9.2, in record order.
    let mut v2 = dataset("1.9.1");
    v2.extend_from_slice(b"\x20\x00\x11\x00IS\x02\x007 ");
    assert_eq!(store_one(&store, "1.9.1", &v2), CommitOutcome::Replaced);
    assert_eq!(
        store_one(&store, "1.9.2", &dataset("1.9.2")),
        CommitOutcome::Duplicate
    );
    drop(store);
    rt.close_unclean();
    lose_index_commits_since(dir.path(), &before);

    let (store, rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!(rec.reindexed, 4, "{rec:?}");
    assert_eq!(rec.skipped, 1, "the freed duplicate: {rec:?}");
    assert_eq!(rec.tail_bytes_removed, 0);
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    assert_eq!(rows.len(), 4);
    let v = rows.iter().find(|r| r.sop_instance_uid == "1.9.1").unwrap();
    assert_eq!(
        read_dataset(dir.path(), v).unwrap(),
        v2,
        "the newer version wins"
    );
    for r in &rows {
        read_dataset(dir.path(), r).unwrap();
    }
    // Queued once each (1.9.1 was queued in the first run and again for its new version).
    let (counts, _) = queue::stats(store.db(), "pacs").unwrap();
    assert_eq!(counts.pending, 4);
    drop(store);
    rt.close().unwrap();
    // Recovery is durable: nothing to do the next time.
    let (_s, _rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!((rec.reindexed, rec.skipped), (0, 0), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unfinished_or_torn_record_is_never_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    drop(store);
    rt.close().unwrap();
    let before = snapshot(dir.path());
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    for sop in ["1.9.2", "1.9.3"] {
        store_one(&store, sop, &dataset(sop));
    }
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    drop(store);
    rt.close_unclean();
    lose_index_commits_since(dir.path(), &before);
    let last = rows
        .iter()
        .map(|r| r.location)
        .max_by_key(|l| l.offset)
        .unwrap();
    let path = segment::segment_path(dir.path(), last.segment);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // The last record's body did not reach the disk before the stop (its header did), and a
    // body without header follows it.
    f.write_all_at(&[0u8; 16], last.body_start() + 140).unwrap();
    f.write_all_at(&[1u8; 5000], last.end() + segment::RECORD_HEADER)
        .unwrap();
    drop(f);

    let (store, _rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!((rec.reindexed, rec.skipped), (1, 1), "{rec:?}");
    assert_eq!(rec.tail_bytes_removed, segment::RECORD_HEADER + 5000);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last.end());
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0].location, last);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_segment_is_reported_and_empty_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    store_one(&store, "1.9.1", &dataset("1.9.1"));
    let seg = index::get(store.db().as_ref(), "1.9.1")
        .unwrap()
        .unwrap()
        .location
        .segment;
    drop(store);
    rt.close().unwrap();
    std::fs::remove_file(segment::segment_path(dir.path(), seg)).unwrap();
    // A segment created just before a crash, without a whole header.
    let torn = segment::segment_path(dir.path(), seg + 1);
    std::fs::write(&torn, b"DGWSEG").unwrap();
    let (store, rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!(rec.missing_records, 1, "{rec:?}");
    assert_eq!(rec.segments_removed, 1, "{rec:?}");
    assert!(!torn.exists());
    // The row stays (its forwarding fails visibly), and new segments get new ids.
    assert!(index::get(store.db().as_ref(), "1.9.1").unwrap().is_some());
    store_one(&store, "1.9.2", &dataset("1.9.2"));
    let new = index::get(store.db().as_ref(), "1.9.2")
        .unwrap()
        .unwrap()
        .location
        .segment;
    assert!(new > seg + 1);
    // Replaced: the segment of the only live row moves; the old one is deleted when closed.
    let mut v2 = dataset("1.9.2");
    v2.extend_from_slice(b"\x20\x00\x11\x00IS\x02\x007 ");
    assert_eq!(store_one(&store, "1.9.2", &v2), CommitOutcome::Replaced);
    drop(store);
    rt.close().unwrap();
    let (store, _rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!(
        rec.segments_removed, 0,
        "the segment still holds the new version"
    );
    let r = index::get(store.db().as_ref(), "1.9.2").unwrap().unwrap();
    assert_eq!(read_dataset(dir.path(), &r).unwrap(), v2);
}

/// Associations commit on their own threads, combined into shared transactions: each gets its
/// own outcome, and every acknowledged instance is indexed, queued and survives a restart.
#[test]
fn concurrent_commits_each_get_their_own_outcome() {
    const THREADS: usize = 8;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    let outcomes: Vec<Vec<CommitOutcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    for n in 0..EACH {
                        let sop = format!("1.9.{t}.{n}");
                        let mut i = store.begin(incoming(&sop)).unwrap();
                        i.write(&dataset(&sop)).unwrap();
                        out.push(i.finish().unwrap().outcome);
                    }
                    // Every thread also sends the same instance: one copy is kept.
                    let mut i = store.begin(incoming("1.9.999")).unwrap();
                    i.write(&dataset("1.9.999")).unwrap();
                    out.push(i.finish().unwrap().outcome);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, out) in outcomes.iter().enumerate() {
        assert!(
            out[..EACH].iter().all(|o| *o == CommitOutcome::Stored),
            "thread {t}: {out:?}"
        );
    }
    let shared: Vec<_> = outcomes.iter().map(|o| o[EACH]).collect();
    assert_eq!(
        shared
            .iter()
            .filter(|o| **o == CommitOutcome::Stored)
            .count(),
        1,
        "{shared:?}"
    );
    assert_eq!(
        shared
            .iter()
            .filter(|o| **o == CommitOutcome::Duplicate)
            .count(),
        THREADS - 1
    );
    let (counts, _) = queue::stats(store.db(), "pacs").unwrap();
    assert_eq!(counts.pending, (THREADS * EACH + 1) as u64);
    drop(store);
    rt.close().unwrap();
    let rows = read_instances(dir.path()).unwrap();
    assert_eq!(rows.len(), THREADS * EACH + 1);
    for r in &rows {
        assert_eq!(
            read_dataset(dir.path(), r).unwrap(),
            dataset(&r.sop_instance_uid)
        );
    }
    let (_, _, rec) = open(dir.path(), &["pacs"]);
    assert!(rec.clean);
    assert_eq!(rec.reindexed, 0);
}

/// `dataset(sop)` followed by Pixel Data of `n` bytes (OB, PS3.5 section 7.1.2).
fn big_dataset(sop: &str, n: u32) -> Vec<u8> {
    let mut d = dataset(sop);
    d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    d.extend_from_slice(&n.to_le_bytes());
    d.extend((0..n).map(|i| (i % 251) as u8));
    d
}

/// Small instances share segments (group commit), large ones stream into their own; shared
/// segments are closed when full only after everything in them is flushed and indexed, and
/// recovery rebuilds both kinds when the index commits are lost.
#[test]
fn shared_and_streamed_segments_close_when_full_and_are_recovered() {
    const THREADS: usize = 4;
    const EACH: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    drop(store);
    rt.close().unwrap();
    let before = snapshot(dir.path());
    let (store, rt, _) = open(dir.path(), &["pacs"]);
    store.pool().set_target(48 * 1024);
    let mut sent = std::collections::BTreeMap::new();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = store.clone();
            s.spawn(move || {
                for n in 0..EACH {
                    let sop = format!("1.9.{t}.{n}");
                    let data = if n % 10 == 9 {
                        big_dataset(&sop, 300_000)
                    } else {
                        dataset(&sop)
                    };
                    let mut i = store.begin(incoming(&sop)).unwrap();
                    // In PDV-sized pieces, as an association writes them.
                    for chunk in data.chunks(16 * 1024) {
                        i.write(chunk).unwrap();
                    }
                    assert_eq!(i.finish().unwrap().outcome, CommitOutcome::Stored);
                }
            });
        }
    });
    for t in 0..THREADS {
        for n in 0..EACH {
            let sop = format!("1.9.{t}.{n}");
            let data = if n % 10 == 9 {
                big_dataset(&sop, 300_000)
            } else {
                dataset(&sop)
            };
            sent.insert(sop, data);
        }
    }
    let check = |rows: &[InstanceRecord]| {
        assert_eq!(rows.len(), sent.len());
        for r in rows {
            assert_eq!(
                read_dataset(dir.path(), r).unwrap(),
                sent[&r.sop_instance_uid]
            );
        }
    };
    check(&index::all_instances(store.db().as_ref()).unwrap());
    let segments: std::collections::BTreeSet<u64> = index::all_instances(store.db().as_ref())
        .unwrap()
        .iter()
        .map(|r| r.location.segment)
        .collect();
    assert!(
        segments.len() > 4,
        "full segments were not closed: {segments:?}"
    );
    drop(store);
    rt.close_unclean();
    lose_index_commits_since(dir.path(), &before);

    let (store, rt, rec) = open(dir.path(), &["pacs"]);
    assert_eq!(rec.reindexed, sent.len(), "{rec:?}");
    assert_eq!((rec.skipped, rec.tail_bytes_removed), (0, 0), "{rec:?}");
    check(&index::all_instances(store.db().as_ref()).unwrap());
    let (counts, _) = queue::stats(store.db(), "pacs").unwrap();
    assert_eq!(counts.pending, sent.len() as u64);
    drop(store);
    rt.close().unwrap();
}

fn open_spares(dir: &Path, spares: usize, min_free: u64) -> (Store, StoreRuntime, Recovery) {
    let router: Router = Arc::new(|_: &str, _: &str, _: &str| vec!["pacs".to_owned()]);
    let wake: Wake = Arc::new(|_: &str| {});
    // Spares of 256 KiB + SLACK rather than 65 MiB.
    segment::TEST_TARGET.with(|t| t.set(Some(256 * 1024)));
    let r = Store::open(
        dir,
        min_free,
        spares,
        CancellationToken::new(),
        router,
        wake,
    )
    .unwrap();
    segment::TEST_TARGET.with(|t| t.set(None));
    r
}

fn spare_files(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join(segment::SEGMENT_DIR).join(spare::SPARE_DIR))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    v.sort_unstable();
    v
}

/// A new store makes its spares before it serves; segments are made of them (full length,
/// never grown by a record), an abandoned record's leftovers are overwritten in place, and
/// after a crash that lost the index commits every record is rebuilt and the unused tails cut.
#[test]
fn segments_made_of_spares_hold_records_across_a_crash() {
    let spare_len = 256 * 1024 + spare::SLACK;
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, rec) = open_spares(dir.path(), 3, 0);
    assert_eq!(rec.spares_made, 3);
    assert_eq!(spare_files(dir.path()), vec![spare_len; 3]);
    drop(store);
    rt.close().unwrap();
    let before = snapshot(dir.path());

    let (store, rt, rec) = open_spares(dir.path(), 3, 0);
    assert_eq!(rec.spares_made, 0, "a store with spares already has them");
    let mut sent = std::collections::BTreeMap::new();
    for n in 0..10 {
        let sop = format!("1.8.{n}");
        let data = dataset(&sop);
        assert_eq!(store_one(&store, &sop, &data), CommitOutcome::Stored);
        sent.insert(sop, data);
    }
    // A large instance abandoned half-way (its association aborted), then another one that
    // takes the same segment and starts where the abandoned one did.
    let mut i = store.begin(incoming("1.8.100")).unwrap();
    i.write(&big_dataset("1.8.100", 200_000)[..150_000])
        .unwrap();
    drop(i);
    let big = big_dataset("1.8.101", 100_000);
    let mut i = store.begin(incoming("1.8.101")).unwrap();
    for chunk in big.chunks(16 * 1024) {
        i.write(chunk).unwrap();
    }
    assert_eq!(i.finish().unwrap().outcome, CommitOutcome::Stored);
    sent.insert("1.8.101".to_owned(), big);
    // The shared segment and the streamed one: both spares, neither grown.
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().all(|&(_, len)| len == spare_len), "{files:?}");
    assert_eq!(spare_files(dir.path()), vec![spare_len]);
    drop(store);
    rt.close_unclean();
    lose_index_commits_since(dir.path(), &before);

    let (store, rt, rec) = open_spares(dir.path(), 3, 0);
    assert_eq!(rec.reindexed, sent.len(), "{rec:?}");
    assert_eq!(rec.skipped, 0, "{rec:?}");
    assert!(rec.tail_bytes_removed > 0, "{rec:?}");
    let rows = index::all_instances(store.db().as_ref()).unwrap();
    assert_eq!(rows.len(), sent.len());
    for r in &rows {
        assert_eq!(
            read_dataset(dir.path(), r).unwrap(),
            sent[&r.sop_instance_uid]
        );
    }
    // Recovery cut the unused tails: the segments end at their last record.
    for (id, len) in segment_files(dir.path()) {
        let end = rows
            .iter()
            .filter(|r| r.location.segment == id)
            .map(|r| r.location.end())
            .max()
            .unwrap();
        assert_eq!(len, end);
    }
    drop(store);
    rt.close().unwrap();
}

/// Crash windows of spares: an interrupted spare, a file of the wrong length and a spare
/// renamed into place before its header was written hold nothing and are deleted at start-up.
#[test]
fn unfinished_spares_are_deleted_at_start_up() {
    let spare_len = 256 * 1024 + spare::SLACK;
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open_spares(dir.path(), 1, 0);
    assert_eq!(
        store_one(&store, "1.7.1", &dataset("1.7.1")),
        CommitOutcome::Stored
    );
    drop(store);
    rt.close().unwrap();
    let spares = dir.path().join(segment::SEGMENT_DIR).join(spare::SPARE_DIR);
    std::fs::write(spares.join("making.tmp"), vec![0u8; 4096]).unwrap();
    std::fs::write(spares.join("9.spare"), vec![0u8; 4096]).unwrap();
    let renamed = segment::segment_path(dir.path(), 7);
    std::fs::write(&renamed, vec![0u8; spare_len as usize]).unwrap();

    let (store, rt, rec) = open_spares(dir.path(), 1, 0);
    assert!(!renamed.exists());
    assert_eq!(rec.segments_removed, 1, "{rec:?}");
    assert!(
        spare_files(dir.path()).is_empty(),
        "{:?}",
        spare_files(dir.path())
    );
    assert_eq!(index::all_instances(store.db().as_ref()).unwrap().len(), 1);
    drop(store);
    rt.close().unwrap();
}

/// At the disk reserve the spares are deleted before an instance is refused; while the disk
/// has no room none is made.
#[test]
fn spares_give_their_space_back_at_the_disk_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, rec) = open_spares(dir.path(), 2, 0);
    assert_eq!(rec.spares_made, 2);
    drop(store);
    rt.close().unwrap();
    let free = {
        let s = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    let (store, rt, rec) = open_spares(dir.path(), 2, free + (1 << 40));
    assert_eq!(rec.spares_made, 0);
    assert_eq!(spare_files(dir.path()).len(), 2);
    let refused = store.begin(incoming("1.6.1"));
    assert!(matches!(refused, Err(StoreError::DiskReserve { .. })));
    assert!(spare_files(dir.path()).is_empty());
    drop(store);
    rt.close().unwrap();
}

/// Spares used up are made again once no instance has arrived for a while.
#[test]
fn used_spares_are_made_again_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rt, _) = open_spares(dir.path(), 2, 0);
    let big = big_dataset("1.5.1", 100_000);
    let mut i = store.begin(incoming("1.5.1")).unwrap();
    i.write(&big).unwrap();
    i.finish().unwrap();
    assert_eq!(spare_files(dir.path()).len(), 1);
    let deadline = std::time::Instant::now() + spare::IDLE_FOR + std::time::Duration::from_secs(10);
    while spare_files(dir.path()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no spare was made");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(store);
    rt.close().unwrap();
}
