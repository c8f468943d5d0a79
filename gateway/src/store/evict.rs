//! Cache eviction: delivered instances stay on disk until space is needed (or past the
//! retention age), then whole studies are deleted, oldest received first.
//!
//! Invariant: an instance with a queue entry that is pending, in flight or failed for any
//! destination (configured now or in the past) is never evicted; a study with such an instance
//! is skipped whole. The check and the deletion happen in one write transaction.
//!
//! Files are deleted after the commit. A crash in between leaves files without rows, which the
//! next start re-indexes (and queues again): a duplicate delivery at worst, never a loss.

use std::collections::HashSet;
use std::path::Path;

use redb::Database;

use super::index::{self, IndexResult};
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
            match evict_study(db, data_dir, &study, &dests)? {
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
    data_dir: &Path,
    study: &str,
    dests: &[String],
) -> IndexResult<Option<(u64, u64)>> {
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
    let mut bytes = 0;
    for r in &records {
        let path = data_dir.join(spool::relative_path(&r.checksum));
        bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&path);
    }
    Ok(Some((records.len() as u64, bytes)))
}
