//! The redb index: what is stored, looked up by instance, study, series and receive time, with
//! each instance's place in the segments ([`super::segment`]).
//!
//! Associations commit instances whose segment records are already durable through
//! [`IndexHandle::commit`], on their own threads; instances that arrive during a commit share
//! the next one (group commit). Those commits are not flushed (`Durability::None`): every
//! row can be rebuilt from its record, and each segment's `indexed_end` (committed with the
//! rows) tells start-up where the records not yet in the durable index begin. A durable commit
//! follows within [`DURABLE_EVERY`], and every other writer (forwarder, eviction) commits
//! durably, which persists what came before.
//!
//! Schema version 2 (key → value):
//! - `meta`: "schema_version" → u32 LE; "clean_shutdown" → [0 | 1]
//! - `instances`: SOP Instance UID → [`InstanceRecord`] (postcard)
//! - `study_instances`, `series_instances`: (Study or Series UID, SOP Instance UID) → ()
//! - `instances_by_time`: (receive time ms, SOP Instance UID) → (): oldest first, for eviction
//! - `segments`: segment id → (indexed_end, live rows): records before `indexed_end` are
//!   reflected in this index; a segment without live rows may be deleted once closed

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::segment::Location;
use super::spool::Hash;

pub const SCHEMA_VERSION: u32 = 2;
pub const INDEX_FILE: &str = "index.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const STUDIES: TableDefinition<(&str, &str), ()> = TableDefinition::new("study_instances");
const SERIES: TableDefinition<(&str, &str), ()> = TableDefinition::new("series_instances");
const BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("instances_by_time");
const SEGMENTS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("segments");

/// Longest time an ingest commit stays unflushed.
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// One indexed instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
    /// The segment record holding the instance as a Part 10 file.
    pub location: Location,
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

/// An instance whose segment record is durable, waiting to be indexed.
#[derive(Clone, Debug)]
pub struct Pending {
    /// With its location.
    pub record: InstanceRecord,
    /// Destinations the instance is routed to; their queue entries join the same commit.
    pub destinations: Vec<String>,
    /// C-STORE priority HIGH (PS3.7 section 9.1.1.1): jumps ahead in the queue.
    pub high_priority: bool,
}

/// Called after a commit with each destination that got new work.
pub type Wake = Arc<dyn Fn(&str) + Send + Sync>;

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
        txn.open_table(BY_TIME).map_err(|e| e.to_string())?;
        txn.open_table(SEGMENTS).map_err(|e| e.to_string())?;
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

/// The record of an instance, read outside the index writer.
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
        update_segment(txn, old.location.segment, -1, 0)?;
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
    // The row's record is reflected in the index from this transaction on.
    update_segment(txn, rec.location.segment, 1, rec.location.end())
}

/// Adds `live_delta` to a segment's live rows and moves its `indexed_end` up to `end` (one
/// read-modify-write of its row).
fn update_segment(
    txn: &WriteTransaction,
    segment: u64,
    live_delta: i64,
    end: u64,
) -> IndexResult<()> {
    let mut t = txn.open_table(SEGMENTS).map_err(|e| e.to_string())?;
    let (indexed_end, live) = t
        .get(segment)
        .map_err(|e| e.to_string())?
        .map_or((0, 0), |v| v.value());
    t.insert(
        segment,
        (indexed_end.max(end), live.saturating_add_signed(live_delta)),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Moves a segment's `indexed_end` past a record that is not indexed (recovery: torn, or a
/// duplicate whose body was freed).
pub fn skip_record(txn: &WriteTransaction, loc: &Location) -> IndexResult<()> {
    update_segment(txn, loc.segment, 0, loc.end())
}

/// Indexes one instance whose record is durable: its rows and queue entries, unless it is an
/// identical duplicate; in any case its segment's `indexed_end` moves past the record.
pub fn apply(txn: &WriteTransaction, p: &Pending) -> IndexResult<CommitOutcome> {
    let old = existing(txn, &p.record.sop_instance_uid)?;
    Ok(match &old {
        Some(o) if o.checksum == p.record.checksum => {
            skip_record(txn, &p.record.location)?;
            CommitOutcome::Duplicate
        }
        _ => {
            put(txn, &p.record, old.as_ref())?;
            super::queue::enqueue(
                txn,
                &p.record.sop_instance_uid,
                &p.destinations,
                p.high_priority,
            )?;
            if old.is_some() {
                CommitOutcome::Replaced
            } else {
                CommitOutcome::Stored
            }
        }
    })
}

/// One row of the `segments` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRow {
    pub id: u64,
    pub indexed_end: u64,
    pub live: u64,
}

/// Every segment the index knows.
pub fn segments(db: &impl ReadableDatabase) -> IndexResult<Vec<SegmentRow>> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = txn.open_table(SEGMENTS).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in t.iter().map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        let (indexed_end, live) = v.value();
        out.push(SegmentRow {
            id: k.value(),
            indexed_end,
            live,
        });
    }
    Ok(out)
}

/// Drops the row of a segment whose file was deleted.
pub fn forget_segment(txn: &WriteTransaction, id: u64) -> IndexResult<()> {
    txn.open_table(SEGMENTS)
        .map_err(|e| e.to_string())?
        .remove(id)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Removes every row of an instance (eviction). The caller frees its record after the commit.
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
    txn.open_table(BY_TIME)
        .map_err(|x| e(x.into()))?
        .remove((rec.received_at_ms, sop))
        .map_err(|x| e(x.into()))?;
    update_segment(txn, rec.location.segment, -1, 0)
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
    let mut out = Vec::new();
    for_each_instance(db, |r| out.push(r))?;
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

/// The write side of the index, shared by every association. An association commits its own
/// instance on its own thread; instances that arrive while another commit runs are committed by
/// the next association to take the writer, all in one transaction (flat combining: a group
/// commit without a thread to hand off to and back from).
pub struct IndexHandle {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Database>,
    /// Instances waiting for a commit; whoever holds `writer` commits all of them.
    waiting: Mutex<Vec<Request>>,
    writer: Mutex<Writer>,
    wake: Wake,
    /// Called once, with the reason, when a commit fails: the gateway must stop.
    fatal: Box<dyn Fn(&str) + Send + Sync>,
    /// Unix ms of the flush thread's last turn; the watchdog checks it is recent.
    heartbeat: AtomicU64,
    /// Set when every [`IndexHandle`] is gone; the flush thread then flushes and ends.
    closed: Mutex<bool>,
    closing: Condvar,
}

struct Writer {
    /// When the oldest unflushed commit returned; `None` while nothing is unflushed.
    unflushed_since: Option<Instant>,
    /// Set by a failed commit: redb refuses writes from then on, so does the index.
    failed: Option<String>,
}

type Slot = Arc<OnceLock<IndexResult<CommitOutcome>>>;

struct Request(Box<Pending>, Slot);

impl IndexHandle {
    /// The write side of `db`, and the thread that flushes its commits within
    /// [`DURABLE_EVERY`]. The thread returns the database once every handle is dropped, or
    /// `Err` if a commit failed; `fatal` is called once at the failure.
    pub fn start(
        db: Arc<Database>,
        wake: Wake,
        fatal: Box<dyn Fn(&str) + Send + Sync>,
    ) -> std::io::Result<(IndexHandle, FlushThread)> {
        let shared = Arc::new(Shared {
            db,
            waiting: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer {
                unflushed_since: None,
                failed: None,
            }),
            wake,
            fatal,
            heartbeat: AtomicU64::new(super::now_ms()),
            closed: Mutex::new(false),
            closing: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("index-flush".into())
            .spawn(move || s.flush_loop())?;
        Ok((IndexHandle { shared }, FlushThread(thread)))
    }

    /// How long since the flush thread last turned (it turns at least every second, and not
    /// while a commit hangs).
    pub fn heartbeat_age(&self) -> Duration {
        Duration::from_millis(
            super::now_ms().saturating_sub(self.shared.heartbeat.load(Ordering::Relaxed)),
        )
    }

    /// Indexes an instance whose record is durable; returns once the commit holding it is
    /// visible to readers (see the module doc for its durability). Blocks: call from a thread
    /// that may (an association's).
    pub fn commit(&self, pending: Pending) -> IndexResult<CommitOutcome> {
        self.commit_all(vec![pending])
            .pop()
            .unwrap_or_else(|| Err("the index lost a commit request".to_owned()))
    }

    /// [`IndexHandle::commit`] for several instances, applied in this order; one result each.
    pub fn commit_all(&self, pendings: Vec<Pending>) -> Vec<IndexResult<CommitOutcome>> {
        let s = &self.shared;
        let slots: Vec<Slot> = pendings.iter().map(|_| Slot::default()).collect();
        lock(&s.waiting).extend(
            pendings
                .into_iter()
                .zip(&slots)
                .map(|(p, slot)| Request(Box::new(p), slot.clone())),
        );
        let mut writer = lock(&s.writer);
        if slots.iter().any(|slot| slot.get().is_none()) {
            // Not taken by the previous holder: commit them with everything queued since.
            let batch = std::mem::take(&mut *lock(&s.waiting));
            writer.commit_batch(s, batch);
        }
        drop(writer);
        slots
            .iter()
            .map(|slot| {
                slot.get()
                    .cloned()
                    .unwrap_or_else(|| Err("the index lost a commit request".to_owned()))
            })
            .collect()
    }
}

impl Drop for IndexHandle {
    fn drop(&mut self) {
        *lock(&self.shared.closed) = true;
        self.shared.closing.notify_all();
    }
}

/// A poisoned lock means a panic while committing; the index state is still what redb
/// committed, so go on with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread that makes ingest commits durable within [`DURABLE_EVERY`].
pub struct FlushThread(std::thread::JoinHandle<Result<Arc<Database>, String>>);

impl FlushThread {
    /// Waits for the thread; it ends once every [`IndexHandle`] is dropped.
    pub fn join(self) -> Result<Arc<Database>, String> {
        self.0
            .join()
            .map_err(|_| "index flush thread panicked".to_owned())?
    }
}

impl Shared {
    fn flush_loop(self: Arc<Self>) -> Result<Arc<Database>, String> {
        let mut closed = lock(&self.closed);
        loop {
            self.heartbeat.store(super::now_ms(), Ordering::Relaxed);
            let done = *closed;
            drop(closed);
            {
                let mut writer = lock(&self.writer);
                if let Some(msg) = &writer.failed {
                    return Err(msg.clone());
                }
                let due = writer
                    .unflushed_since
                    .is_some_and(|t| done || t.elapsed() >= DURABLE_EVERY);
                if due {
                    writer.flush(&self)?;
                }
                if done {
                    return Ok(self.db.clone());
                }
            }
            let wait = lock(&self.writer)
                .unflushed_since
                .map_or(DURABLE_EVERY, |t| DURABLE_EVERY.saturating_sub(t.elapsed()));
            closed = lock(&self.closed);
            if !*closed {
                closed = self
                    .closing
                    .wait_timeout(closed, wait)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
    }
}

impl Writer {
    fn fail(&mut self, shared: &Shared, msg: String) -> String {
        if self.failed.is_none() {
            (shared.fatal)(&msg);
            self.failed = Some(msg.clone());
        }
        msg
    }

    /// A durable commit: persists every commit before it.
    fn flush(&mut self, shared: &Shared) -> Result<(), String> {
        let r = shared
            .db
            .begin_write()
            .map_err(|e| e.to_string())
            .and_then(|txn| {
                txn.commit()
                    .map_err(|e| format!("index commit failed: {e}"))
            });
        match r {
            Ok(()) => {
                self.unflushed_since = None;
                Ok(())
            }
            Err(msg) => Err(self.fail(shared, msg)),
        }
    }

    /// Commits `batch` in one transaction and answers each request in it.
    fn commit_batch(&mut self, shared: &Shared, batch: Vec<Request>) {
        let answer_all = |batch: Vec<Request>, msg: &str| {
            for Request(_, slot) in batch {
                let _ = slot.set(Err(msg.to_owned()));
            }
        };
        if let Some(msg) = &self.failed {
            answer_all(batch, msg);
            return;
        }
        // Rows can be rebuilt from their durable records (module doc); flush only when the
        // oldest unflushed commit is due.
        let durable = self
            .unflushed_since
            .is_some_and(|t| t.elapsed() >= DURABLE_EVERY);
        let txn = shared
            .db
            .begin_write()
            .map_err(|e| e.to_string())
            .and_then(|mut txn| {
                if !durable {
                    txn.set_durability(Durability::None)
                        .map_err(|e| e.to_string())?;
                }
                Ok(txn)
            });
        let txn = match txn {
            Ok(t) => t,
            Err(e) => {
                let msg = self.fail(shared, format!("index write transaction failed: {e}"));
                answer_all(batch, &msg);
                return;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        let mut woken = BTreeSet::new();
        let mut failure = None;
        for Request(p, slot) in batch {
            let r = match &failure {
                Some(msg) => Err(String::clone(msg)),
                None => apply(&txn, &p),
            };
            match &r {
                Ok(CommitOutcome::Stored | CommitOutcome::Replaced) => {
                    woken.extend(p.destinations.iter().cloned());
                }
                Ok(CommitOutcome::Duplicate) => {}
                Err(msg) => {
                    failure.get_or_insert_with(|| msg.clone());
                }
            }
            results.push((slot, r));
        }
        let committed = match failure {
            Some(msg) => Err(msg),
            None => txn
                .commit()
                .map_err(|e| format!("index commit failed: {e}")),
        };
        match committed {
            Ok(()) => {
                if durable {
                    self.unflushed_since = None;
                } else {
                    self.unflushed_since.get_or_insert_with(Instant::now);
                }
                for (slot, r) in results {
                    let _ = slot.set(r);
                }
                for d in &woken {
                    (shared.wake)(d);
                }
            }
            Err(msg) => {
                // The records stay in their segments: the next start indexes them. Their
                // senders get a failure and resend.
                let msg = self.fail(shared, msg);
                for (slot, _) in results {
                    let _ = slot.set(Err(msg.clone()));
                }
            }
        }
    }
}
