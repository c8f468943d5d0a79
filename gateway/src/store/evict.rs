//! Cache eviction: delivered instances stay on disk until space is needed (or past the
//! retention age), then whole studies are deleted, oldest received first.
//!
//! Invariant: an instance with a queue entry that is pending, in flight or failed for any
//! destination (configured now or in the past) is never evicted; a study with such an instance
//! is skipped whole. The check and the deletion happen in one write transaction.
//!
//! The rows go in one durable commit; then the space of their segment records is freed (hole
//! punching: the segment keeps its length) and segments without rows are deleted. An
//! instance received again meanwhile gets a record of its own, so freeing the old one cannot
//! touch it. The freed records lie before their segment's durable `indexed_end`, so recovery
//! never reads them.

use std::collections::HashSet;
use std::path::Path;

use redb::Database;

use super::index::{self, IndexResult};
#[cfg(test)]
use super::CommitOutcome;
use super::{now_ms, queue, segment};
use crate::config::Cache;

/// Instances looked at per scan step.
const SCAN: usize = 512;

/// Filesystem use of the data directory, in percent, and free bytes.
pub fn disk_use(data_dir: &Path) -> std::io::Result<(f64, u64)> {
    let s = nix::sys::statvfs::statvfs(data_dir).map_err(std::io::Error::from)?;
    let total = s.blocks().max(1) as f64;
    let used = s.blocks().saturating_sub(s.blocks_free()) as f64;
    Ok((
        100.0 * used / total,
        s.blocks_available().saturating_mul(s.fragment_size()),
    ))
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Evicted {
    pub studies: u64,
    pub instances: u64,
    pub bytes: u64,
    /// Studies skipped because they still have undelivered instances.
    pub held: u64,
}

/// One eviction pass. `min_free` is the ingest reserve: eviction also runs while free space is
/// below twice that, so that ingest can resume.
pub fn run_once(
    db: &Database,
    pool: &segment::Pool,
    data_dir: &Path,
    cache: &Cache,
    min_free: u64,
) -> IndexResult<Evicted> {
    let mut done = Evicted::default();
    // Segments emptied by replaced versions and duplicates, or by the last pass.
    super::reap(db, data_dir, &|id| pool.is_open(id))?;
    let needs_space = |data_dir: &Path, low: bool| -> bool {
        match disk_use(data_dir) {
            Ok((pct, free)) => {
                let mark = if low {
                    f64::from(cache.low_watermark_percent)
                } else {
                    f64::from(cache.high_watermark_percent)
                };
                pct > mark || free < min_free.saturating_mul(2)
            }
            Err(_) => false,
        }
    };
    let cutoff = cache
        .retention
        .map(|r| now_ms().saturating_sub(u64::try_from(r.as_millis()).unwrap_or(u64::MAX)));
    let mut space = needs_space(data_dir, false);
    if !space && cutoff.is_none() {
        return Ok(done);
    }
    let dests = queue::known_destinations(db)?;
    let mut seen_studies = HashSet::new();
    let mut after = None;
    loop {
        let batch = index::oldest(db, after.clone(), SCAN)?;
        let Some(last) = batch.last().cloned() else {
            break;
        };
        after = Some(last);
        for (received, sop) in batch {
            let old_enough = cutoff.is_some_and(|c| received < c);
            if !space && !old_enough {
                // Past the retention cutoff and no space needed: done.
                return Ok(done);
            }
            let Some(study) = index::get(db, &sop)?.map(|r| r.study_instance_uid) else {
                continue;
            };
            if !seen_studies.insert(study.clone()) {
                continue;
            }
            match evict_study(db, pool, data_dir, &study, &dests)? {
                Some((n, bytes)) => {
                    done.studies += 1;
                    done.instances += n;
                    done.bytes += bytes;
                    log::info!(study_instance_uid:% = study, instances = n, bytes = bytes; "evicted delivered study from the cache");
                }
                None => done.held += 1,
            }
            if space {
                space = needs_space(data_dir, true);
            }
        }
    }
    Ok(done)
}

/// Deletes a study if none of its instances has an open queue entry. Returns (instances, bytes)
/// or `None` if the study is held.
fn evict_study(
    db: &Database,
    pool: &segment::Pool,
    data_dir: &Path,
    study: &str,
    dests: &[String],
) -> IndexResult<Option<(u64, u64)>> {
    let Some(records) = remove_rows(db, study, dests)? else {
        return Ok(None);
    };
    let bytes = free_records(data_dir, &records);
    super::reap(db, data_dir, &|id| pool.is_open(id))?;
    Ok(Some((records.len() as u64, bytes)))
}

/// Removes the rows of a study in one committed transaction, unless an instance of it has an
/// open queue entry (then `None`, nothing changed).
fn remove_rows(
    db: &Database,
    study: &str,
    dests: &[String],
) -> IndexResult<Option<Vec<index::InstanceRecord>>> {
    let sops = index::study_instances(db, study)?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for sop in &sops {
        if queue::has_open_entries(&txn, sop, dests)? {
            txn.abort().map_err(|e| e.to_string())?;
            return Ok(None);
        }
        if let Some(r) = index::existing(&txn, sop)? {
            records.push(r);
        }
    }
    for r in &records {
        index::remove(&txn, r)?;
        queue::remove_delivered(&txn, &r.sop_instance_uid, dests)?;
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(Some(records))
}

/// Frees the space of the records of removed rows; returns their bytes. A failure only costs
/// space until the segment is deleted, so it is logged, not returned.
fn free_records(data_dir: &Path, records: &[index::InstanceRecord]) -> u64 {
    let mut bytes = 0;
    let mut open: Option<(u64, std::fs::File)> = None;
    for r in records {
        let loc = r.location;
        if open.as_ref().is_none_or(|(id, _)| *id != loc.segment) {
            match std::fs::OpenOptions::new()
                .write(true)
                .open(segment::segment_path(data_dir, loc.segment))
            {
                Ok(f) => open = Some((loc.segment, f)),
                Err(e) => {
                    log::warn!(segment = loc.segment, error:% = e; "cannot open a segment to free evicted records");
                    open = None;
                    continue;
                }
            }
        }
        let Some((_, f)) = &open else { continue };
        match segment::punch(f, loc.offset, loc.end() - loc.offset) {
            Ok(()) => bytes += loc.end() - loc.offset,
            Err(e) => {
                log::warn!(segment = loc.segment, error:% = e; "cannot free the space of an evicted record");
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{dataset, incoming, open};

    /// An identical instance re-sent while its study is being evicted is acknowledged again
    /// (eviction removed its rows first); freeing the evicted records must not touch its new
    /// record, and the emptied segment must survive while it holds that record.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_instance_received_again_during_eviction_keeps_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, _) = open(dir.path(), &[]);
        for sop in ["1.9.1", "1.9.2"] {
            let mut i = store.begin(incoming(sop)).unwrap();
            i.write(&dataset(sop)).unwrap();
            assert_eq!(i.finish().unwrap().outcome, CommitOutcome::Stored);
        }
        let records = remove_rows(store.db(), "1.2.3.4", &[]).unwrap().unwrap();
        assert_eq!(records.len(), 2);
        let mut i = store.begin(incoming("1.9.1")).unwrap();
        i.write(&dataset("1.9.1")).unwrap();
        assert_eq!(i.finish().unwrap().outcome, CommitOutcome::Stored);

        let freed = free_records(dir.path(), &records);
        let expected: u64 = records
            .iter()
            .map(|r| r.location.end() - r.location.offset)
            .sum();
        assert_eq!(freed, expected);
        for r in &records {
            assert!(
                crate::store::tests::read_dataset(dir.path(), r).is_err(),
                "evicted record still readable"
            );
        }
        let now = index::get(store.db().as_ref(), "1.9.1").unwrap().unwrap();
        assert_eq!(
            crate::store::tests::read_dataset(dir.path(), &now).unwrap(),
            dataset("1.9.1"),
            "acknowledged instance lost its bytes"
        );
        // Only the re-sent instance is live: the segment stays even when closed.
        super::super::reap(store.db(), dir.path(), &|_| false).unwrap();
        assert!(segment::segment_path(dir.path(), now.location.segment).exists());
        drop(store);
        rt.close().unwrap();
    }
}
