//! The redb index: what is stored, looked up by instance, study, series and content hash.
//!
//! One thread owns the write side ([`IndexThread`]). Concurrent associations hand it finished
//! spool files; it renames a whole batch into place and then, at the same time, fsyncs the
//! touched directories once and commits all their rows in one durable transaction (group
//! commit). Each waiting C-STORE is answered when that commit and those fsyncs have returned
//! *and* its own file's data flush (done by the association meanwhile) has returned.
//!
//! Because the three flushes run concurrently, a crash can leave a committed row whose file was
//! not yet durable. Every row is therefore committed together with an `unsettled` marker, which
//! is removed (in a later transaction) only after the association reported its file durable.
//! Start-up checks each remaining marker with [`verify_unsettled`]: a row whose file is missing
//! or does not hash to its name was never acknowledged and is dropped; the others are kept.
//!
//! Schema version 1 (key → value):
//! - `meta`: "schema_version" → u32 LE; "clean_shutdown" → [0 | 1]
//! - `instances`: SOP Instance UID → [`InstanceRecord`] (postcard)
//! - `study_instances`, `series_instances`: (Study or Series UID, SOP Instance UID) → ()
//! - `files`: dataset BLAKE3 hash → SOP Instance UID
//! - `instances_by_time`: (receive time ms, SOP Instance UID) → (): oldest first, for eviction
//! - `unsettled`: SOP Instance UID → dataset hash: committed rows whose file's durability was
//!   not yet confirmed

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::spool::{self, Hash};

pub const SCHEMA_VERSION: u32 = 1;
pub const INDEX_FILE: &str = "index.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const STUDIES: TableDefinition<(&str, &str), ()> = TableDefinition::new("study_instances");
const SERIES: TableDefinition<(&str, &str), ()> = TableDefinition::new("series_instances");
const FILES: TableDefinition<&[u8], &str> = TableDefinition::new("files");
const BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("instances_by_time");
const UNSETTLED: TableDefinition<&str, &[u8]> = TableDefinition::new("unsettled");

/// Largest batch one group commit takes; bounds the latency of the last one in it.
const MAX_BATCH: usize = 256;

/// One indexed instance. The spool file is `spool::relative_path(&checksum)`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub modality: String,
    pub accession_number: String,
    pub study_date: String,
    pub transfer_syntax: String,
    /// Dataset bytes (without preamble and file meta group).
    pub size: u64,
    /// BLAKE3 of the dataset bytes.
    pub checksum: Hash,
    pub calling_ae: String,
    /// Unix time in milliseconds.
    pub received_at_ms: u64,
    /// Reserved for the forwarding queue; 0 = stored.
    pub state: u8,
}

/// What a commit did with an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new instance.
    Stored,
    /// Same SOP Instance UID and identical dataset bytes: nothing new was kept.
    Duplicate,
    /// Same SOP Instance UID, different bytes: the new version replaced the old one.
    Replaced,
}

pub type IndexResult<T> = Result<T, String>;

/// A finished, fsynced temporary file waiting to be indexed.
pub struct Pending {
    pub tmp: PathBuf,
    pub record: InstanceRecord,
    /// Destinations the instance is routed to; their queue entries join the same commit.
    pub destinations: Vec<String>,
    /// C-STORE priority HIGH (PS3.7 section 9.1.1.1): jumps ahead in the queue.
    pub high_priority: bool,
}

/// Orders the placing of spool files against their deletion by eviction.
///
/// Spool files are named after their content, so a re-sent identical instance gets the name of
/// an older file that eviction may be deleting at that moment. The index thread holds this lock
/// from the first rename of a batch until the batch's commit is durable; eviction holds it while
/// it checks that no committed row names a file and deletes it. Without it, eviction could
/// delete the file of an instance just acknowledged (its rename landing between eviction's
/// commit and its unlink).
pub type SpoolLock = Arc<std::sync::Mutex<()>>;

/// Called after a commit with each destination that got new work.
pub type Wake = Arc<dyn Fn(&str) + Send + Sync>;

type Reply = tokio::sync::oneshot::Sender<IndexResult<CommitOutcome>>;

enum Request {
    Commit(Box<Pending>, Reply),
    /// The file of a committed row is durable: its marker may go, and the files of the versions
    /// it replaced may be deleted.
    Settle(String, Hash),
}

/// Opens (or creates) the index and checks the schema version. Returns whether the previous run
/// ended cleanly, and marks this run as not (yet) clean.
pub fn open(data_dir: &Path, cache_bytes: usize) -> IndexResult<(Database, bool)> {
    let path = data_dir.join(INDEX_FILE);
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .set_repair_callback(|s| {
            log::warn!(progress:% = format!("{:.0}%", s.progress() * 100.0); "repairing the index after an unclean shutdown");
        })
        .create(&path)
        .map_err(|e| format!("cannot open index {}: {e}", path.display()))?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let clean = {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let version = meta
            .get("schema_version")
            .map_err(|e| e.to_string())?
            .map(|v| v.value().try_into().map(u32::from_le_bytes).unwrap_or(0));
        // A new index has no previous run to distrust.
        let fresh = version.is_none();
        match version {
            Some(SCHEMA_VERSION) => {}
            None => {
                meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
                    .map_err(|e| e.to_string())?;
            }
            Some(v) => {
                return Err(format!(
                    "index {} has schema version {v}; this gateway understands version {SCHEMA_VERSION}",
                    path.display()
                ))
            }
        }
        let clean = fresh
            || meta
                .get("clean_shutdown")
                .map_err(|e| e.to_string())?
                .is_some_and(|v| v.value() == [1]);
        meta.insert("clean_shutdown", [0u8].as_slice())
            .map_err(|e| e.to_string())?;
        // Create the other tables so read transactions never see them missing.
        txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
        txn.open_table(STUDIES).map_err(|e| e.to_string())?;
        txn.open_table(SERIES).map_err(|e| e.to_string())?;
        txn.open_table(FILES).map_err(|e| e.to_string())?;
        txn.open_table(BY_TIME).map_err(|e| e.to_string())?;
        txn.open_table(UNSETTLED).map_err(|e| e.to_string())?;
        super::queue::create_tables(&txn)?;
        clean
    };
    txn.commit().map_err(|e| e.to_string())?;
    Ok((db, clean))
}

/// Records that this run ended cleanly: the next start may skip the reconciliation scan.
pub fn mark_clean(db: &Database) -> IndexResult<()> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.open_table(META)
        .map_err(|e| e.to_string())?
        .insert("clean_shutdown", [1u8].as_slice())
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

fn lookup(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    sop_instance_uid: &str,
) -> IndexResult<Option<InstanceRecord>> {
    match table.get(sop_instance_uid).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(v) => postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|e| format!("corrupt index row for {sop_instance_uid}: {e}")),
    }
}

/// The current record of an instance, if any, inside a write transaction.
pub fn existing(
    txn: &WriteTransaction,
    sop_instance_uid: &str,
) -> IndexResult<Option<InstanceRecord>> {
    lookup(
        &txn.open_table(INSTANCES).map_err(|e| e.to_string())?,
        sop_instance_uid,
    )
}

/// The record of an instance, read outside the index thread.
pub fn get(
    db: &impl ReadableDatabase,
    sop_instance_uid: &str,
) -> IndexResult<Option<InstanceRecord>> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    lookup(
        &txn.open_table(INSTANCES).map_err(|e| e.to_string())?,
        sop_instance_uid,
    )
}

/// Inserts `rec`, replacing `old` (the current record of the same SOP Instance UID) if given.
pub fn put(
    txn: &WriteTransaction,
    rec: &InstanceRecord,
    old: Option<&InstanceRecord>,
) -> IndexResult<()> {
    let e = |e: redb::Error| e.to_string();
    let bytes = postcard::to_stdvec(rec).map_err(|x| x.to_string())?;
    txn.open_table(INSTANCES)
        .map_err(|x| e(x.into()))?
        .insert(rec.sop_instance_uid.as_str(), bytes.as_slice())
        .map_err(|x| e(x.into()))?;
    let mut studies = txn.open_table(STUDIES).map_err(|x| e(x.into()))?;
    let mut series = txn.open_table(SERIES).map_err(|x| e(x.into()))?;
    let mut files = txn.open_table(FILES).map_err(|x| e(x.into()))?;
    let mut by_time = txn.open_table(BY_TIME).map_err(|x| e(x.into()))?;
    if let Some(old) = old {
        by_time
            .remove((old.received_at_ms, old.sop_instance_uid.as_str()))
            .map_err(|x| e(x.into()))?;
        studies
            .remove((
                old.study_instance_uid.as_str(),
                old.sop_instance_uid.as_str(),
            ))
            .map_err(|x| e(x.into()))?;
        series
            .remove((
                old.series_instance_uid.as_str(),
                old.sop_instance_uid.as_str(),
            ))
            .map_err(|x| e(x.into()))?;
        files
            .remove(old.checksum.as_slice())
            .map_err(|x| e(x.into()))?;
    }
    by_time
        .insert((rec.received_at_ms, rec.sop_instance_uid.as_str()), ())
        .map_err(|x| e(x.into()))?;
    studies
        .insert(
            (
                rec.study_instance_uid.as_str(),
                rec.sop_instance_uid.as_str(),
            ),
            (),
        )
        .map_err(|x| e(x.into()))?;
    series
        .insert(
            (
                rec.series_instance_uid.as_str(),
                rec.sop_instance_uid.as_str(),
            ),
            (),
        )
        .map_err(|x| e(x.into()))?;
    files
        .insert(rec.checksum.as_slice(), rec.sop_instance_uid.as_str())
        .map_err(|x| e(x.into()))?;
    Ok(())
}

/// Removes every row of an instance (eviction). The caller deletes the file after the commit.
pub fn remove(txn: &WriteTransaction, rec: &InstanceRecord) -> IndexResult<()> {
    let e = |e: redb::Error| e.to_string();
    let sop = rec.sop_instance_uid.as_str();
    txn.open_table(INSTANCES)
        .map_err(|x| e(x.into()))?
        .remove(sop)
        .map_err(|x| e(x.into()))?;
    txn.open_table(STUDIES)
        .map_err(|x| e(x.into()))?
        .remove((rec.study_instance_uid.as_str(), sop))
        .map_err(|x| e(x.into()))?;
    txn.open_table(SERIES)
        .map_err(|x| e(x.into()))?
        .remove((rec.series_instance_uid.as_str(), sop))
        .map_err(|x| e(x.into()))?;
    txn.open_table(FILES)
        .map_err(|x| e(x.into()))?
        .remove(rec.checksum.as_slice())
        .map_err(|x| e(x.into()))?;
    txn.open_table(BY_TIME)
        .map_err(|x| e(x.into()))?
        .remove((rec.received_at_ms, sop))
        .map_err(|x| e(x.into()))?;
    txn.open_table(UNSETTLED)
        .map_err(|x| e(x.into()))?
        .remove(sop)
        .map_err(|x| e(x.into()))?;
    Ok(())
}

/// Up to `n` instances, oldest received first, starting after `after` (exclusive).
pub fn oldest(
    db: &impl ReadableDatabase,
    after: Option<(u64, String)>,
    n: usize,
) -> IndexResult<Vec<(u64, String)>> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = txn.open_table(BY_TIME).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let iter = match &after {
        Some((ms, sop)) => t.range((*ms, sop.as_str())..).map_err(|e| e.to_string())?,
        None => t.iter().map_err(|e| e.to_string())?,
    };
    for row in iter {
        let (k, ()) = row
            .map_err(|e| e.to_string())
            .map(|(k, v)| (k, v.value()))?;
        let (ms, sop) = k.value();
        if after.as_ref().is_some_and(|(a, s)| *a == ms && s == sop) {
            continue;
        }
        out.push((ms, sop.to_owned()));
        if out.len() >= n {
            break;
        }
    }
    Ok(out)
}

/// Whether some row refers to the file with this hash.
pub fn has_file(db: &Database, hash: &Hash) -> IndexResult<bool> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let files = txn.open_table(FILES).map_err(|e| e.to_string())?;
    Ok(files
        .get(hash.as_slice())
        .map_err(|e| e.to_string())?
        .is_some())
}

/// Start-up: checks every `unsettled` marker (see the module doc). A row whose file is missing
/// or does not hash to its name was never acknowledged: it is dropped with its queue entries.
/// Returns the SOP Instance UIDs whose rows were kept, and how many were dropped.
pub fn verify_unsettled(db: &Database, data_dir: &Path) -> IndexResult<(HashSet<String>, usize)> {
    let e = |e: redb::Error| e.to_string();
    let markers: Vec<(String, Hash)> = {
        let txn = db.begin_read().map_err(|x| e(x.into()))?;
        let t = txn.open_table(UNSETTLED).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            if let Ok(h) = Hash::try_from(v.value()) {
                out.push((k.value().to_owned(), h));
            }
        }
        out
    };
    let mut kept = HashSet::new();
    if markers.is_empty() {
        return Ok((kept, 0));
    }
    let txn = db.begin_write().map_err(|x| e(x.into()))?;
    let mut torn = Vec::new();
    for (sop, hash) in markers {
        txn.open_table(UNSETTLED)
            .map_err(|x| e(x.into()))?
            .remove(sop.as_str())
            .map_err(|x| e(x.into()))?;
        let Some(rec) = existing(&txn, &sop)? else {
            continue;
        };
        if rec.checksum != hash {
            continue;
        }
        let path = data_dir.join(spool::relative_path(&hash));
        if spool::hash_dataset(&path).is_ok_and(|(_, _, h, _)| h == hash) {
            kept.insert(sop);
            continue;
        }
        remove(&txn, &rec)?;
        super::queue::remove_entries(&txn, &sop)?;
        log::warn!(
            sop_instance_uid:% = sop, study_instance_uid:% = rec.study_instance_uid, calling_ae:% = rec.calling_ae;
            "instance received just before the unclean stop never became durable and was never acknowledged: dropped (the modality sends it again)"
        );
        torn.push(path);
    }
    txn.commit().map_err(|x| e(x.into()))?;
    for path in &torn {
        let _ = std::fs::remove_file(path);
    }
    Ok((kept, torn.len()))
}

/// Puts a marker back as a crash before [`Request::Settle`] would have left it (tests).
#[cfg(test)]
pub fn mark_unsettled(db: &Database, sop_instance_uid: &str, hash: &Hash) {
    let txn = db.begin_write().unwrap();
    txn.open_table(UNSETTLED)
        .unwrap()
        .insert(sop_instance_uid, hash.as_slice())
        .unwrap();
    txn.commit().unwrap();
}

/// Markers left (tests).
#[cfg(test)]
pub fn unsettled_count(db: &Database) -> u64 {
    let txn = db.begin_read().unwrap();
    txn.open_table(UNSETTLED).unwrap().iter().unwrap().count() as u64
}

/// The `files` table in one read transaction, for a scan of the whole spool.
pub struct FileLookup {
    table: redb::ReadOnlyTable<&'static [u8], &'static str>,
}

impl FileLookup {
    pub fn open(db: &Database) -> IndexResult<FileLookup> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(FILES).map_err(|e| e.to_string())?;
        Ok(FileLookup { table })
    }

    pub fn contains(&self, hash: &Hash) -> IndexResult<bool> {
        Ok(self
            .table
            .get(hash.as_slice())
            .map_err(|e| e.to_string())?
            .is_some())
    }

    /// Rows, one per indexed instance.
    pub fn rows(&self) -> IndexResult<u64> {
        use redb::ReadableTableMetadata;
        self.table.len().map_err(|e| e.to_string())
    }
}

/// Calls `f` with every instance record, in SOP Instance UID order, one at a time.
pub fn for_each_instance(
    db: &impl ReadableDatabase,
    mut f: impl FnMut(InstanceRecord),
) -> IndexResult<()> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
    for row in table.iter().map_err(|e| e.to_string())? {
        let (_, v) = row.map_err(|e| e.to_string())?;
        f(postcard::from_bytes(v.value()).map_err(|e| format!("corrupt index row: {e}"))?);
    }
    Ok(())
}

/// Every instance record, in SOP Instance UID order.
pub fn all_instances(db: &impl ReadableDatabase) -> IndexResult<Vec<InstanceRecord>> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| e.to_string())? {
        let (_, v) = row.map_err(|e| e.to_string())?;
        out.push(postcard::from_bytes(v.value()).map_err(|e| format!("corrupt index row: {e}"))?);
    }
    Ok(out)
}

/// SOP Instance UIDs of one study.
pub fn study_instances(db: &impl ReadableDatabase, study_uid: &str) -> IndexResult<Vec<String>> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = txn.open_table(STUDIES).map_err(|e| e.to_string())?;
    let range = table.range((study_uid, "")..).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in range {
        let (k, ()) = row
            .map_err(|e| e.to_string())
            .map(|(k, v)| (k, v.value()))?;
        let (study, sop) = k.value();
        if study != study_uid {
            break;
        }
        out.push(sop.to_owned());
    }
    Ok(out)
}

/// The sending side of the index thread.
#[derive(Clone)]
pub struct IndexHandle {
    tx: mpsc::SyncSender<Request>,
    heartbeat: Arc<AtomicU64>,
}

impl IndexHandle {
    /// How long since the index thread last turned (it turns at least every second).
    pub fn heartbeat_age(&self) -> Duration {
        Duration::from_millis(
            super::now_ms().saturating_sub(self.heartbeat.load(Ordering::Relaxed)),
        )
    }

    /// Queues a commit; the receiver answers once the commit holding it and the fsyncs of the
    /// directories it renamed into are durable. The file's own data flush is the caller's.
    pub async fn submit(&self, pending: Pending) -> IndexResult<Answer> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Commit(Box::new(pending), reply)).await?;
        Ok(Answer(rx))
    }

    /// Reports the file of a committed row durable (see the module doc).
    pub async fn settled(&self, sop_instance_uid: String, checksum: Hash) -> IndexResult<()> {
        self.send(Request::Settle(sop_instance_uid, checksum)).await
    }

    async fn send(&self, request: Request) -> IndexResult<()> {
        let stopped = || "the index has stopped after an earlier failure".to_owned();
        match self.tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(stopped()),
            Err(mpsc::TrySendError::Full(request)) => {
                // The channel is bounded: when the index thread falls behind, this waits (off
                // the runtime) and the association stops reading: the backpressure we want.
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(request).map_err(|_| ()))
                    .await
                    .map_err(|e| format!("index queue task failed: {e}"))?
                    .map_err(|()| stopped())
            }
        }
    }
}

/// The index thread's answer to one [`IndexHandle::submit`].
pub struct Answer(tokio::sync::oneshot::Receiver<IndexResult<CommitOutcome>>);

impl Answer {
    pub async fn outcome(self) -> IndexResult<CommitOutcome> {
        self.0
            .await
            .map_err(|_| "the index has stopped after an earlier failure".to_owned())?
    }
}

/// The write side of the index; runs on its own thread.
pub struct IndexThread {
    db: Arc<Database>,
    data_dir: PathBuf,
    /// Held from the first rename of a batch until its commit is durable; see [`SpoolLock`].
    spool_lock: SpoolLock,
    /// Fsyncs shard directories as renames land in them (see [`syncer`]).
    syncer: mpsc::Sender<SyncMsg>,
    rx: mpsc::Receiver<Request>,
    wake: Wake,
    /// Unix ms of the thread's last turn; the watchdog checks it is recent.
    heartbeat: Arc<AtomicU64>,
    /// Settled rows whose markers the next transaction removes.
    settled: Vec<(String, Hash)>,
    /// Files of replaced versions, deleted once the replacing (SOP, hash) is settled.
    replaced: HashMap<(String, Hash), Vec<Hash>>,
}

impl IndexThread {
    pub fn new(
        db: Arc<Database>,
        data_dir: PathBuf,
        spool_lock: SpoolLock,
        wake: Wake,
    ) -> std::io::Result<(IndexThread, IndexHandle)> {
        let (tx, rx) = mpsc::sync_channel(MAX_BATCH);
        let (sync_tx, sync_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("spool-sync".into())
            .spawn(move || syncer(&sync_rx))?;
        let heartbeat = Arc::new(AtomicU64::new(super::now_ms()));
        Ok((
            IndexThread {
                db,
                data_dir,
                spool_lock,
                syncer: sync_tx,
                rx,
                wake,
                heartbeat: heartbeat.clone(),
                settled: Vec::new(),
                replaced: HashMap::new(),
            },
            IndexHandle { tx, heartbeat },
        ))
    }

    /// Serves commits until every [`IndexHandle`] is dropped, then returns the database.
    /// Returns `Err` after a failed commit: redb then refuses writes until reopened, so the
    /// caller must stop the gateway (systemd restarts it and redb repairs on open).
    pub fn run(mut self) -> Result<Arc<Database>, String> {
        loop {
            self.heartbeat.store(super::now_ms(), Ordering::Relaxed);
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch)?;
        }
        if !self.settled.is_empty() {
            let txn = self.db.begin_write().map_err(|e| e.to_string())?;
            self.remove_markers(&txn)?;
            txn.commit()
                .map_err(|e| format!("index commit failed: {e}"))?;
        }
        Ok(self.db)
    }

    /// Removes the markers of settled rows (unless a newer version has its own marker).
    fn remove_markers(&mut self, txn: &WriteTransaction) -> Result<(), String> {
        let mut t = txn.open_table(UNSETTLED).map_err(|e| e.to_string())?;
        for (sop, hash) in self.settled.drain(..) {
            let same = t
                .get(sop.as_str())
                .map_err(|e| e.to_string())?
                .is_some_and(|v| v.value() == hash.as_slice());
            if same {
                t.remove(sop.as_str()).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Records settled rows and deletes the files their versions replaced.
    fn settle(&mut self, sop: String, hash: Hash) {
        if let Some(old) = self.replaced.remove(&(sop.clone(), hash)) {
            for h in old {
                // Unreferenced unless a later instance brought the same bytes back.
                if has_file(&self.db, &h) == Ok(false) {
                    let _ = std::fs::remove_file(self.data_dir.join(spool::relative_path(&h)));
                }
            }
        }
        self.settled.push((sop, hash));
    }

    fn commit_batch(&mut self, batch: Vec<Request>) -> Result<(), String> {
        // A poisoned lock only means another holder panicked; the guarded state is the disk.
        let spool_lock = self.spool_lock.clone();
        let _spool = spool_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut commits = Vec::with_capacity(batch.len());
        for r in batch {
            match r {
                Request::Commit(p, reply) => commits.push((p, reply)),
                Request::Settle(sop, hash) => self.settle(sop, hash),
            }
        }
        if commits.is_empty() {
            // Markers go with the next commit: a transaction of its own would cost a flush.
            return Ok(());
        }
        let fail_all = |batch: Vec<(Box<Pending>, Reply)>, msg: &str| {
            for (p, reply) in batch {
                let _ = std::fs::remove_file(&p.tmp);
                let _ = reply.send(Err(msg.to_owned()));
            }
        };
        let txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("index write transaction failed: {e}");
                fail_all(commits, &msg);
                return Err(msg);
            }
        };
        let mut results = Vec::with_capacity(commits.len());
        let mut replaced = Vec::new();
        let mut woken = BTreeSet::new();
        let mut fatal = self.remove_markers(&txn).err();
        for (p, reply) in commits {
            let r = match &fatal {
                Some(msg) => Err(Placement::Fatal(String::clone(msg))),
                None => self.place(&txn, &p),
            };
            match &r {
                Ok(Placed::Stored) => {
                    woken.extend(p.destinations.iter().cloned());
                }
                Ok(Placed::Replaced(old)) => {
                    woken.extend(p.destinations.iter().cloned());
                    replaced.push((p.record.sop_instance_uid.clone(), p.record.checksum, *old));
                }
                Ok(Placed::Duplicate) => {}
                Err(Placement::Fatal(msg)) => {
                    fatal.get_or_insert_with(|| msg.clone());
                }
                Err(Placement::Failed(_)) => {}
            }
            results.push((reply, r));
        }
        let committed = match fatal {
            Some(msg) => Err(msg),
            None => {
                // The directory fsyncs (started by the syncer as each rename landed) and the
                // commit are independent flushes: they run at the same time, and the answer
                // waits for both. A crash in between leaves rows whose rename may be lost: their
                // `unsettled` markers cover that.
                let (done_tx, done_rx) = mpsc::sync_channel(1);
                let barrier = self.syncer.send(SyncMsg::Barrier(done_tx));
                let commit = txn
                    .commit()
                    .map_err(|e| format!("index commit failed: {e}"));
                let dirs_synced = barrier
                    .map_err(|_| ())
                    .and_then(|()| done_rx.recv().map_err(|_| ()))
                    .unwrap_or_else(|()| Err("the directory fsync thread stopped".to_owned()));
                commit.and(dirs_synced)
            }
        };
        match committed {
            Ok(()) => {
                for (sop, hash, old) in replaced {
                    self.replaced.entry((sop, hash)).or_default().push(old);
                }
                for (reply, r) in results {
                    let _ = reply.send(
                        r.map_err(|(Placement::Failed(m) | Placement::Fatal(m))| m)
                            .map(Placed::public),
                    );
                }
                for d in &woken {
                    (self.wake)(d);
                }
                Ok(())
            }
            Err(msg) => {
                // Renamed files stay: the reconciliation at the next start re-indexes those that
                // are complete. Their senders get a failure and resend.
                for (reply, _) in results {
                    let _ = reply.send(Err(msg.clone()));
                }
                Err(msg)
            }
        }
    }

    /// Moves one pending file into place (unless it is a duplicate) and writes its rows.
    fn place(&self, txn: &WriteTransaction, p: &Pending) -> Result<Placed, Placement> {
        let old = existing(txn, &p.record.sop_instance_uid).map_err(Placement::Fatal)?;
        if old
            .as_ref()
            .is_some_and(|o| o.checksum == p.record.checksum)
        {
            let _ = std::fs::remove_file(&p.tmp);
            return Ok(Placed::Duplicate);
        }
        let dest = self.data_dir.join(spool::relative_path(&p.record.checksum));
        if let Err(e) = std::fs::rename(&p.tmp, &dest) {
            let _ = std::fs::remove_file(&p.tmp);
            return Err(Placement::Failed(format!(
                "cannot move {} into the spool: {e}",
                p.tmp.display()
            )));
        }
        if let Some(parent) = dest.parent() {
            self.syncer
                .send(SyncMsg::Dir(parent.to_path_buf()))
                .map_err(|_| Placement::Fatal("the directory fsync thread stopped".into()))?;
        }
        put(txn, &p.record, old.as_ref()).map_err(Placement::Fatal)?;
        super::queue::enqueue(
            txn,
            &p.record.sop_instance_uid,
            &p.destinations,
            p.high_priority,
        )
        .map_err(Placement::Fatal)?;
        txn.open_table(UNSETTLED)
            .map_err(|e| Placement::Fatal(e.to_string()))?
            .insert(
                p.record.sop_instance_uid.as_str(),
                p.record.checksum.as_slice(),
            )
            .map_err(|e| Placement::Fatal(e.to_string()))?;
        Ok(match old {
            Some(o) => Placed::Replaced(o.checksum),
            None => Placed::Stored,
        })
    }
}

/// Work for the [`syncer`] thread.
enum SyncMsg {
    /// A file was renamed into this directory.
    Dir(PathBuf),
    /// Answer once every directory sent before this is fsynced (or with the first failure
    /// since the previous barrier).
    Barrier(mpsc::SyncSender<Result<(), String>>),
}

/// Fsyncs the directories the index thread renames files into, as the renames land, so that
/// their flushes overlap the index work and commit of the same batch. Runs until the index
/// thread drops its sender.
fn syncer(rx: &mpsc::Receiver<SyncMsg>) {
    let mut failure: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut dirs = BTreeSet::new();
        let mut barriers = Vec::new();
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                SyncMsg::Dir(d) => {
                    dirs.insert(d);
                }
                SyncMsg::Barrier(done) => barriers.push(done),
            }
        }
        // Every directory that came before a barrier is in this set or an earlier one.
        for d in &dirs {
            if let Err(e) = spool::fsync_dir(d) {
                failure.get_or_insert_with(|| format!("fsync of {} failed: {e}", d.display()));
            }
        }
        for done in barriers {
            let _ = done.send(failure.take().map_or(Ok(()), Err));
        }
    }
}

/// What [`IndexThread::place`] did; `Replaced` carries the old version's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    Stored,
    Duplicate,
    Replaced(Hash),
}

impl Placed {
    fn public(self) -> CommitOutcome {
        match self {
            Placed::Stored => CommitOutcome::Stored,
            Placed::Duplicate => CommitOutcome::Duplicate,
            Placed::Replaced(_) => CommitOutcome::Replaced,
        }
    }
}

/// Why one instance of a batch was not placed.
enum Placement {
    /// Only this instance failed; the batch goes on.
    Failed(String),
    /// The transaction is no longer trustworthy; the whole batch fails.
    Fatal(String),
}
