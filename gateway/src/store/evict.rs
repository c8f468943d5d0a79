//! Cache eviction: delivered instances stay on disk until space is needed (or past the
//! retention age), then whole studies are deleted, oldest received first.
//!
//! Invariant: an instance with a queue entry that is pending, in flight or failed for any
//! destination (configured now or in the past) is never evicted; a study with such an instance
//! is skipped whole. The check and the deletion happen in one write transaction.
//!
//! Files are deleted after the commit, under the [`SpoolLock`], and only if no committed row
//! names them by then: an identical instance received again meanwhile has the same file name
//! (content hash) and keeps its file. A crash between commit and deletion leaves files without
//! rows, which the next start re-indexes (and queues again): a duplicate delivery at worst,
//! never a loss.

use std::collections::HashSet;
use std::path::Path;

use redb::Database;

use super::index::{self, IndexResult, SpoolLock};
#[cfg(test)]
use super::CommitOutcome;
use super::{now_ms, queue, spool};
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
    spool_lock: &SpoolLock,
    data_dir: &Path,
    cache: &Cache,
    min_free: u64,
) -> IndexResult<Evicted> {
    let mut done = Evicted::default();
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
            match evict_study(db, spool_lock, data_dir, &study, &dests)? {
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
    spool_lock: &SpoolLock,
    data_dir: &Path,
    study: &str,
    dests: &[String],
) -> IndexResult<Option<(u64, u64)>> {
    let Some(records) = remove_rows(db, study, dests)? else {
        return Ok(None);
    };
    let bytes = delete_files(db, spool_lock, data_dir, &records)?;
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

/// Deletes the files of removed rows that no committed row names (again); returns the bytes
/// freed.
fn delete_files(
    db: &Database,
    spool_lock: &SpoolLock,
    data_dir: &Path,
    records: &[index::InstanceRecord],
) -> IndexResult<u64> {
    let mut bytes = 0;
    let _placing = spool_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for r in records {
        if index::has_file(db, &r.checksum)? {
            // Received again (same bytes) since the rows were removed: the file is live.
            continue;
        }
        let path = data_dir.join(spool::relative_path(&r.checksum));
        bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&path);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{dataset, incoming, open};

    /// The race the spool lock closes: eviction removes the rows of a study, the same bytes
    /// arrive again and are acknowledged (same content-hash file name), then eviction reaches
    /// its deletions. The re-sent instance must keep its file.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_file_received_again_during_eviction_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rt, _) = open(dir.path(), &[]);
        for sop in ["1.9.1", "1.9.2"] {
            let mut i = store.begin(incoming(sop)).unwrap();
            i.write(&dataset(sop)).unwrap();
            assert_eq!(i.finish().await.unwrap().outcome, CommitOutcome::Stored);
        }
        let records = remove_rows(store.db(), "1.2.3.4", &[]).unwrap().unwrap();
        assert_eq!(records.len(), 2);
        let mut i = store.begin(incoming("1.9.1")).unwrap();
        i.write(&dataset("1.9.1")).unwrap();
        assert_eq!(i.finish().await.unwrap().outcome, CommitOutcome::Stored);

        let freed = delete_files(store.db(), store.spool_lock(), dir.path(), &records).unwrap();
        let path = |sop: &str| {
            let r = records.iter().find(|r| r.sop_instance_uid == sop).unwrap();
            dir.path().join(spool::relative_path(&r.checksum))
        };
        assert!(
            path("1.9.1").exists(),
            "acknowledged instance lost its file"
        );
        assert!(!path("1.9.2").exists(), "evicted file left behind");
        assert_eq!(freed, std::fs::metadata(path("1.9.1")).unwrap().len());
        let (_, _, hash, _) = spool::hash_dataset(&path("1.9.1")).unwrap();
        assert_eq!(
            Some(hash),
            index::get(store.db().as_ref(), "1.9.1")
                .unwrap()
                .map(|r| r.checksum)
        );
        drop(store);
        rt.close().unwrap();
    }
}
