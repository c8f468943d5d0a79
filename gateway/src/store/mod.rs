//! The durable store: segment records plus the redb index.
//!
//! # Durability contract
//!
//! [`Ingest::finish`] returns `Ok` only after
//! 1. the instance was appended to a segment ([`segment`]) as one record: the Part 10 file
//!    (preamble, file meta group, dataset as received), then the index row and destinations it
//!    needs, then a header that makes the record valid; and the segment was `fdatasync`'d (for
//!    a small instance: by the flush of its group, [`group`]);
//! 2. its rows and queue entries were committed to the index ([`index`]), so readers see it.
//!
//! Only then may the association answer C-STORE-RSP Success (PS3.4 Annex B.2.3). The commit of
//! step 2 is flushed at most [`index::DURABLE_EVERY`] later (group commit): until then the
//! durable record is what guarantees the instance, because start-up recovery ([`Store::open`])
//! indexes every valid record past its segment's durable `indexed_end` before READY. A failed
//! data flush or commit answers A700 and stops the gateway: the state of the disk is then
//! unknown, and the restart checks it.
//!
//! Start-up also cuts what follows the last valid record of each segment (an unfinished record
//! a crash left, never acknowledged, or the unused zeros of a segment made of a [`spare`]),
//! reports rows whose segment is gone, and deletes segments no row refers to.
//!
//! # Bounded memory
//!
//! An instance is held whole only while it is smaller than [`FLUSH_BYTES`] (then it is appended
//! to the shared segment in one write, [`group`]); [`Ingest::write`] buffers at most that much
//! before streaming to a segment of its own (a PDV of [`DIRECT_BYTES`] or more goes to it
//! without that copy),
//! and keeps the first [`HEAD_BYTES`] of the dataset, from which the index fields are parsed;
//! the record is read back only for a dataset whose indexed attributes lie beyond that.

pub mod evict;
pub mod group;
pub mod index;
pub mod parse;
pub mod queue;
pub mod segment;
pub mod spare;
pub mod spool;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::Database;
use snafu::Snafu;

pub use index::Wake;
pub use index::{CommitOutcome, InstanceRecord};
use index::{IndexHandle, Pending};
use segment::{Location, RecordMeta, Segment};
use spool::FileMeta;

/// Bytes buffered per instance before a write to the spool file.
pub const FLUSH_BYTES: usize = 256 * 1024;

/// A PDV at least this large is written to the file directly when nothing is buffered.
pub const DIRECT_BYTES: usize = 64 * 1024;

/// The start of the dataset kept in memory for parsing the indexed attributes (they are group
/// 0008–0020 elements, which precede the pixel data, PS3.5 section 7.1).
pub const HEAD_BYTES: usize = 64 * 1024;

/// redb page cache; the index is small next to the spool, and the OS caches the rest.
const INDEX_CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Snafu)]
pub enum StoreError {
    #[snafu(display(
        "free space on {} is {} MiB, below the reserve of {} MiB (gateway.min_free_disk_mb)",
        data_dir.display(), free / (1 << 20), reserve / (1 << 20)
    ))]
    DiskReserve {
        data_dir: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[snafu(display("cannot write {}: {source}", path.display()))]
    Io { path: PathBuf, source: io::Error },
    #[snafu(display(
        "SOP {what} in the command ({command}) differs from the dataset ({dataset})"
    ))]
    Mismatch {
        what: &'static str,
        command: String,
        dataset: String,
    },
    #[snafu(display("dataset cannot be indexed: {reason}"))]
    CannotUnderstand { reason: String },
    #[snafu(display("index: {message}"))]
    Index { message: String },
    #[snafu(display("store task failed: {message}"))]
    Task { message: String },
}

/// What the command set says about an incoming instance. UIDs are already validated.
#[derive(Clone, Debug)]
pub struct IncomingInstance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    pub calling_ae: String,
    /// C-STORE Priority (0000,0700) was HIGH.
    pub high_priority: bool,
}

/// A stored instance as the association reports it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub outcome: CommitOutcome,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub size: u64,
}

/// Start-up recovery figures.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// The previous run ended with a clean shutdown.
    pub clean: bool,
    /// Records past the durable index (their commit was not yet flushed when the previous run
    /// stopped) that were indexed again.
    pub reindexed: usize,
    /// Records not indexed because their content does not match their header: being written
    /// when the previous run stopped (never acknowledged), or duplicates whose body was freed.
    pub skipped: usize,
    /// Bytes cut from segment ends: unfinished records (never acknowledged), and the unused
    /// part of segments made from spares ([`spare`]; segments are not appended to again).
    pub tail_bytes_removed: u64,
    /// Segments deleted because no row refers to them.
    pub segments_removed: usize,
    /// Rows whose segment file is missing (deleted outside the gateway).
    pub missing_records: u64,
    /// Spare segments made before READY (a store without segments, [`spare`]).
    pub spares_made: usize,
    pub in_flight_returned: usize,
}

struct Inner {
    data_dir: PathBuf,
    db: Arc<Database>,
    /// Routes an instance (calling AE, modality, SOP class) to destination names.
    router: Router,
    min_free: u64,
    index: IndexHandle,
    /// The shared segment of small instances.
    group: group::GroupLog,
    /// Cancelled when the store can no longer vouch for its files (a failed data flush).
    on_fatal: tokio_util::sync::CancellationToken,
    /// Set while free space is below the reserve; logs only state changes.
    low_space: AtomicBool,
    /// The last free-space reading that was far above the reserve: (Unix ms, free bytes).
    roomy: std::sync::Mutex<Option<(u64, u64)>>,
    pool: Arc<segment::Pool>,
}

/// A free-space reading at least this far above the reserve is reused for [`ROOMY_FOR_MS`]:
/// no sender fills this much in that time, so the reserve still holds, and an instance does
/// not pay a `statvfs`.
const ROOMY_MARGIN: u64 = 1 << 30;
const ROOMY_FOR_MS: u64 = 100;

/// Chooses the destinations of an instance: (calling AE, modality, SOP class) → names.
pub type Router = Arc<dyn Fn(&str, &str, &str) -> Vec<String> + Send + Sync>;

/// Cheap to clone; shared by all associations.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Owns the index flush thread; [`StoreRuntime::close`] waits for it once every [`Store`] is
/// dropped.
pub struct StoreRuntime {
    thread: index::FlushThread,
    spares: Option<SpareMaker>,
}

impl StoreRuntime {
    /// Flushes the index and records a clean shutdown. Call after every [`Store`] clone is
    /// dropped (the forwarder's too), or this waits forever.
    pub fn close(mut self) -> Result<(), String> {
        self.stop_spares();
        let db = self.thread.join()?;
        index::mark_clean(&db)
    }

    /// Flushes the index without recording a clean shutdown: what a crash after the last
    /// commit leaves behind (tests).
    #[cfg(test)]
    pub fn close_unclean(mut self) {
        self.stop_spares();
        let _ = self.thread.join();
    }

    fn stop_spares(&mut self) {
        if let Some(m) = self.spares.as_mut() {
            m.stop.store(true, Ordering::Relaxed);
            if let Some(t) = m.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The thread that keeps spare segments ready ([`spare`]).
struct SpareMaker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SpareMaker {
    /// A runtime dropped without [`StoreRuntime::close`] (an error at start) still stops it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keeps `want` spares ready: made while no instance arrives and the disk has room.
fn make_spares(
    pool: &segment::Pool,
    data_dir: &Path,
    min_free: u64,
    want: usize,
    stop: &AtomicBool,
) {
    let Some(spares) = pool.spares() else { return };
    let stopped = || stop.load(Ordering::Relaxed);
    let busy = || pool.idle_for() < spare::IDLE_FOR;
    while !stopped() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if spares.count() >= want
            || busy()
            || !room_for_spare(data_dir, min_free, spares.file_len())
        {
            continue;
        }
        match spares.make_one(spare::PACE, &busy, &stopped) {
            Ok(true) => {
                log::debug!(ready = spares.count(); "spare segment made");
            }
            Ok(false) => {}
            Err(e) => {
                log::warn!(dir:% = spares.dir().display(), error:% = e; "cannot make a spare segment; trying again in a minute");
                for _ in 0..300 {
                    if stopped() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
    }
}

/// Whether the disk has room for one more spare of `len` bytes with [`spare::HEADROOM`] to
/// spare beyond the reserve.
fn room_for_spare(data_dir: &Path, min_free: u64, len: u64) -> bool {
    nix::sys::statvfs::statvfs(data_dir).is_ok_and(|s| {
        s.blocks_available().saturating_mul(s.fragment_size())
            >= min_free.saturating_add(spare::HEADROOM).saturating_add(len)
    })
}

impl Store {
    /// Opens the data directory: layout, index, recovery. Blocking; call before serving.
    /// `on_fatal` is cancelled if a data flush or an index commit fails.
    pub fn open(
        data_dir: &Path,
        min_free: u64,
        spare_segments: usize,
        on_fatal: tokio_util::sync::CancellationToken,
        router: Router,
        wake: Wake,
    ) -> Result<(Store, StoreRuntime, Recovery), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        segment::create_layout(data_dir).map_err(io_err(data_dir))?;
        let (db, clean) = index::open(data_dir, INDEX_CACHE_BYTES)
            .map_err(|message| StoreError::Index { message })?;
        let mut rec = Recovery {
            clean,
            ..Recovery::default()
        };
        let next_id = recover(&db, data_dir, &mut rec)?;
        rec.in_flight_returned =
            queue::recover_in_flight(&db).map_err(|message| StoreError::Index { message })?;
        let db = Arc::new(db);
        let fatal = on_fatal.clone();
        let (handle, thread) = IndexHandle::start(
            db.clone(),
            wake,
            Box::new(move |e| {
                log::error!(error:% = e; "index failed; the gateway stops so that it can be restarted and the index repaired");
                fatal.cancel();
            }),
        )
        .map_err(io_err(data_dir))?;
        let mut pool = segment::Pool::new(data_dir, next_id);
        let mut maker = None;
        if spare_segments > 0 {
            let dir = pool.dir();
            pool = pool.with_spares(spare_segments).map_err(io_err(&dir))?;
            if let Some(spares) = pool.spares() {
                // A store that holds no segment is new (or empty): the disk is idle, so the
                // spares are made now, before the first instance, rather than during it.
                if next_id == 1 {
                    while spares.count() < spare_segments
                        && room_for_spare(data_dir, min_free, spares.file_len())
                    {
                        if !spares
                            .make_one(std::time::Duration::ZERO, &|| false, &|| false)
                            .map_err(io_err(spares.dir()))?
                        {
                            break;
                        }
                        rec.spares_made += 1;
                    }
                }
            }
        }
        let pool = Arc::new(pool);
        if spare_segments > 0 {
            let stop = Arc::new(AtomicBool::new(false));
            let (p, d, s) = (pool.clone(), data_dir.to_path_buf(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("spare-segments".into())
                .spawn(move || make_spares(&p, &d, min_free, spare_segments, &s))
                .map_err(io_err(data_dir))?;
            maker = Some(SpareMaker {
                stop,
                thread: Some(thread),
            });
        }
        let store = Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                db,
                router,
                min_free,
                index: handle,
                group: group::GroupLog::default(),
                on_fatal,
                low_space: AtomicBool::new(false),
                roomy: std::sync::Mutex::new(None),
                pool,
            }),
        };
        Ok((
            store,
            StoreRuntime {
                thread,
                spares: maker,
            },
            rec,
        ))
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// How long since the index flush thread last turned; the watchdog wants this small.
    pub fn index_heartbeat_age(&self) -> std::time::Duration {
        self.inner.index.heartbeat_age()
    }

    /// The index, for the forwarder and operator queries (redb serialises writers).
    pub fn db(&self) -> &Arc<Database> {
        &self.inner.db
    }

    /// The segments open for appending (eviction must not delete those).
    pub fn pool(&self) -> &Arc<segment::Pool> {
        &self.inner.pool
    }

    /// Below the reserve: deletes the spare segments (they hold nothing) and returns the free
    /// space after that (`free` if there were none).
    fn release_spares(&self, free: u64) -> u64 {
        let Some(spares) = self.inner.pool.spares() else {
            return free;
        };
        let n = spares.release();
        if n == 0 {
            return free;
        }
        log::warn!(released = n; "disk reserve reached: deleted the spare segments");
        self.free_bytes().unwrap_or(free)
    }

    /// Free bytes for this service on the data directory's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.inner.data_dir).map_err(io::Error::from)?;
        Ok(s.blocks_available().saturating_mul(s.fragment_size()))
    }

    /// Starts receiving one instance: checks the disk reserve, then takes a segment and writes
    /// the record's Part 10 header. Blocking (a `statvfs` unless a recent one found plenty of
    /// room, a write, perhaps a segment creation).
    pub fn begin(&self, incoming: IncomingInstance) -> Result<Ingest, StoreError> {
        let inner = &self.inner;
        let now = now_ms();
        let recent = match *inner.roomy.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, free)) if now.saturating_sub(at) < ROOMY_FOR_MS => Some(free),
            _ => None,
        };
        let free = match recent {
            Some(free) => free,
            None => {
                let free = self.free_bytes().map_err(|source| StoreError::Io {
                    path: inner.data_dir.clone(),
                    source,
                })?;
                *inner.roomy.lock().unwrap_or_else(|e| e.into_inner()) =
                    (free >= inner.min_free.saturating_add(ROOMY_MARGIN)).then_some((now, free));
                free
            }
        };
        let free = if free < inner.min_free {
            self.release_spares(free)
        } else {
            free
        };
        if free < inner.min_free {
            if !inner.low_space.swap(true, Ordering::Relaxed) {
                log::error!(
                    data_dir:% = inner.data_dir.display(), free_mib = free >> 20, reserve_mib = inner.min_free >> 20;
                    "disk reserve reached: refusing new instances with A700 (Out of Resources) until space is freed"
                );
            }
            return Err(StoreError::DiskReserve {
                data_dir: inner.data_dir.clone(),
                free,
                reserve: inner.min_free,
            });
        }
        if inner.low_space.swap(false, Ordering::Relaxed) {
            log::warn!(free_mib = free >> 20; "disk space is above the reserve again: accepting instances");
        }
        inner.pool.touch();
        let header = spool::encode_header(&FileMeta {
            sop_class_uid: incoming.sop_class_uid.clone(),
            sop_instance_uid: incoming.sop_instance_uid.clone(),
            transfer_syntax: incoming.transfer_syntax.clone(),
            source_ae: incoming.calling_ae.clone(),
        });
        Ok(Ingest {
            store: self.clone(),
            body_start: 0,
            segment: None,
            completed: None,
            committed: false,
            header_len: header.len() as u64,
            prefix: header,
            written: 0,
            incoming,
            buf: Vec::with_capacity(FLUSH_BYTES + 64 * 1024),
            head: Vec::new(),
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }
}

/// One instance being received. A small one stays in memory and is appended whole to the
/// shared segment of [`group::GroupLog`] at the end (one flush for all instances finishing
/// together); once more than [`FLUSH_BYTES`] arrive (or a PDV of [`DIRECT_BYTES`]), it is
/// streamed into a segment it holds alone. Its methods do disk I/O in place (writes,
/// `fdatasync`): the association that drives it runs on a thread of its own. Dropping it
/// without [`Ingest::finish`] cuts what it wrote, so an aborted transfer leaves nothing behind.
pub struct Ingest {
    store: Store,
    incoming: IncomingInstance,
    /// The segment being streamed into; `None` while the instance is in memory.
    segment: Option<Segment>,
    /// The Part 10 preamble and file meta group, until written.
    prefix: Vec<u8>,
    /// Set once the record's header is written: from then on the record is never cut.
    completed: Option<Location>,
    /// The index answered the record's commit.
    committed: bool,
    /// Offset of the record's body (the Part 10 file) in the segment.
    body_start: u64,
    /// Bytes of the body written so far.
    written: u64,
    header_len: u64,
    buf: Vec<u8>,
    /// The first [`HEAD_BYTES`] of the dataset.
    head: Vec<u8>,
    hasher: blake3::Hasher,
    /// Dataset bytes so far.
    size: u64,
}

impl Ingest {
    /// Appends dataset bytes. Writes to the segment once [`FLUSH_BYTES`] are buffered (or at
    /// once for a large PDV). Blocks: called from the association's own thread (see
    /// [`crate::listener`]), never from the shared runtime.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.head.len() < HEAD_BYTES {
            let n = data.len().min(HEAD_BYTES - self.head.len());
            self.head.extend_from_slice(&data[..n]);
        }
        if self.buf.is_empty() && data.len() >= DIRECT_BYTES {
            return self.write_dataset(data);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_dataset(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn write_dataset(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        let at = self.body_start + self.written;
        self.put(data)?;
        if data.len() >= DIRECT_BYTES {
            segment::start_writeback(self.segment()?.file(), at, data.len() as u64);
        }
        Ok(())
    }

    /// Writes body bytes at the end of what is written; the first write takes a segment and
    /// writes the Part 10 header first.
    fn put(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.segment.is_none() {
            if self.prefix.is_empty() {
                return Err(StoreError::Task {
                    message: "instance already finished".into(),
                });
            }
            let pool = &self.store.inner.pool;
            let seg = pool.take().map_err(|source| StoreError::Io {
                path: pool.dir(),
                source,
            })?;
            self.body_start = seg.end() + segment::RECORD_HEADER;
            let prefix = std::mem::take(&mut self.prefix);
            self.segment = Some(seg);
            self.put(&prefix)?;
        }
        let seg = self.segment()?;
        seg.file()
            .write_all_at(data, self.body_start + self.written)
            .map_err(|source| StoreError::Io {
                path: seg.path().to_path_buf(),
                source,
            })?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn segment(&self) -> Result<&Segment, StoreError> {
        self.segment.as_ref().ok_or_else(|| StoreError::Task {
            message: "instance already finished".into(),
        })
    }

    /// Completes the instance under the durability contract (see the module doc).
    pub fn finish(mut self) -> Result<Stored, StoreError> {
        let (record, study, series) = self.seal()?;
        let size = record.size;
        let destinations =
            (self.store.inner.router)(&record.calling_ae, &record.modality, &record.sop_class_uid);
        let meta = RecordMeta {
            record,
            destinations,
            high_priority: self.incoming.high_priority,
        };
        let bytes = postcard::to_stdvec(&meta).map_err(|e| StoreError::Task {
            message: format!("cannot encode the record meta: {e}"),
        })?;
        if bytes.len() > segment::MAX_META as usize {
            // Only a broken invariant gets here (parse caps the indexed fields): refuse this
            // instance, nothing is written yet.
            return Err(StoreError::CannotUnderstand {
                reason: format!("its index entry would take {} bytes", bytes.len()),
            });
        }
        if self.segment.is_none() {
            return self.finish_in_group(meta, &bytes, study, series);
        }
        let seq = self.store.inner.pool.next_seq();
        let body_len = self.written;
        let seg = self.segment()?;
        let path = seg.path().to_path_buf();
        let completed = seg
            .complete(seq, body_len, &bytes)
            .and_then(|loc| seg.sync().map(|()| loc));
        let loc = match completed {
            Ok(loc) => loc,
            Err(source) => {
                log::error!(
                    sop_instance_uid:% = meta.record.sop_instance_uid, path:% = path.display(), error:% = source;
                    "writing or flushing a segment failed: answering A700 and stopping, so that the restart checks what is on disk"
                );
                // The segment's state is unknown: it takes no further record.
                self.segment = None;
                self.store.inner.on_fatal.cancel();
                return Err(StoreError::Io { path, source });
            }
        };
        self.completed = Some(loc);
        let mut record = meta.record;
        record.location = loc;
        let pending = Pending {
            record,
            destinations: meta.destinations,
            high_priority: meta.high_priority,
        };
        let outcome = self.store.inner.index.commit(pending).map_err(|message| {
            // The failed commit stopped the gateway; this record is indexed at the restart.
            self.segment = None;
            StoreError::Index { message }
        })?;
        self.committed = true;
        if outcome == CommitOutcome::Duplicate {
            // Never referenced: free the body's space now (recovery skips such a record).
            if let Some(seg) = &self.segment {
                if let Err(e) = segment::punch(seg.file(), loc.body_start(), loc.body_len) {
                    log::warn!(path:% = path.display(), error:% = e; "cannot free the space of a duplicate record");
                }
            }
        }
        Ok(Stored {
            outcome,
            study_instance_uid: study,
            series_instance_uid: series,
            size,
        })
    }

    /// Appends the whole record of an instance held in memory to the shared segment; returns
    /// once it is flushed and indexed (group commit, [`group`]).
    fn finish_in_group(
        mut self,
        meta: RecordMeta,
        meta_bytes: &[u8],
        study_instance_uid: String,
        series_instance_uid: String,
    ) -> Result<Stored, StoreError> {
        let prefix = std::mem::take(&mut self.prefix);
        let mut record = Vec::with_capacity(
            segment::RECORD_HEADER as usize + prefix.len() + self.buf.len() + meta_bytes.len(),
        );
        record.resize(segment::RECORD_HEADER as usize, 0);
        record.extend_from_slice(&prefix);
        record.extend_from_slice(&self.buf);
        record.extend_from_slice(meta_bytes);
        let size = meta.record.size;
        let sop = meta.record.sop_instance_uid.clone();
        let pending = Pending {
            record: meta.record,
            destinations: meta.destinations,
            high_priority: meta.high_priority,
        };
        let inner = &self.store.inner;
        let on_fatal = || inner.on_fatal.cancel();
        let meta_len = u32::try_from(meta_bytes.len()).unwrap_or(u32::MAX);
        let (outcome, _) = inner
            .group
            .commit(
                &inner.pool,
                &inner.index,
                &on_fatal,
                &mut record,
                meta_len,
                pending,
            )
            .inspect_err(|e| {
                log::error!(sop_instance_uid:% = sop, error:% = e; "storing an instance failed: answering A700");
            })?;
        Ok(Stored {
            outcome,
            study_instance_uid,
            series_instance_uid,
            size,
        })
    }

    /// Writes out what is buffered (unless the instance stays in memory for the group commit)
    /// and checks the indexed fields (the record's completion and flush are
    /// [`Ingest::finish`]'s).
    fn seal(&mut self) -> Result<(InstanceRecord, String, String), StoreError> {
        let fields = if self.segment.is_none() && self.buf.len() < FLUSH_BYTES {
            self.hasher.update(&self.buf);
            self.size += self.buf.len() as u64;
            parse::read_fields(
                self.buf.as_slice(),
                self.size,
                &self.incoming.transfer_syntax,
            )
        } else {
            self.flush()?;
            let seg = self.segment()?;
            // The rest of the dataset is read back only if parsing gets past the head.
            let head_len = self.head.len() as u64;
            let rest = segment::Range::new(
                seg.file(),
                self.body_start + self.header_len + head_len,
                self.size.saturating_sub(head_len),
            );
            parse::read_fields(
                self.head
                    .as_slice()
                    .chain(BufReader::with_capacity(64 * 1024, rest)),
                self.size,
                &self.incoming.transfer_syntax,
            )
        }
        .map_err(|e| StoreError::CannotUnderstand { reason: e.0 })?;
        let inc = &self.incoming;
        if crate::uid::validate(&fields.sop_instance_uid) != Some(inc.sop_instance_uid.as_str()) {
            return Err(StoreError::Mismatch {
                what: "Instance UID",
                command: inc.sop_instance_uid.clone(),
                dataset: fields.sop_instance_uid,
            });
        }
        if crate::uid::validate(&fields.sop_class_uid) != Some(inc.sop_class_uid.as_str()) {
            return Err(StoreError::Mismatch {
                what: "Class UID",
                command: inc.sop_class_uid.clone(),
                dataset: fields.sop_class_uid,
            });
        }
        let record = InstanceRecord {
            sop_instance_uid: inc.sop_instance_uid.clone(),
            sop_class_uid: inc.sop_class_uid.clone(),
            study_instance_uid: fields.study_instance_uid.clone(),
            series_instance_uid: fields.series_instance_uid.clone(),
            patient_id: fields.patient_id,
            modality: fields.modality,
            accession_number: fields.accession_number,
            study_date: fields.study_date,
            transfer_syntax: inc.transfer_syntax.clone(),
            size: self.size,
            checksum: *self.hasher.finalize().as_bytes(),
            calling_ae: inc.calling_ae.clone(),
            received_at_ms: now_ms(),
            state: 0,
            location: Location::default(),
        };
        Ok((
            record,
            fields.study_instance_uid,
            fields.series_instance_uid,
        ))
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let Some(mut seg) = self.segment.take() else {
            return;
        };
        let pool = &self.store.inner.pool;
        match self.completed {
            Some(loc) => {
                // A complete record stays: indexed now, or by the next start.
                seg.advance(&loc);
                if self.committed {
                    pool.give_back(seg);
                }
                // Otherwise its commit may still be on its way (the caller went away while
                // waiting): the segment stays open for the rest of this run, so that it is
                // neither written nor deleted under that commit.
            }
            None => {
                seg.discard_tail();
                pool.give_back(seg);
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Start-up: brings the index up to the segments (see the module doc). Returns the id for the
/// next new segment.
fn recover(db: &Database, data_dir: &Path, rec: &mut Recovery) -> Result<u64, StoreError> {
    let idx = |message: String| StoreError::Index { message };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let rows: HashMap<u64, index::SegmentRow> = index::segments(db)
        .map_err(idx)?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let ids = segment::list(data_dir).map_err(io(data_dir))?;
    let mut next_id = rows.keys().max().map_or(1, |m| m + 1);
    let mut found = Vec::new();
    let mut unreferenced = Vec::new();
    for &id in &ids {
        next_id = next_id.max(id + 1);
        let path = segment::segment_path(data_dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let row = rows.get(&id);
        let Some(salt) = segment::read_salt(&file, id).map_err(io(&path))? else {
            if row.is_some_and(|r| r.live > 0) {
                return Err(StoreError::Index {
                    message: format!(
                        "segment {} has a damaged header but {} indexed instances; restore it or move the data directory aside",
                        path.display(),
                        row.map_or(0, |r| r.live)
                    ),
                });
            }
            // Created when the previous run stopped: it holds nothing acknowledged.
            unreferenced.push(id);
            continue;
        };
        let from = row.map_or(0, |r| r.indexed_end);
        let scan = segment::scan(&file, &salt, id, from).map_err(io(&path))?;
        if scan.valid_end < scan.file_len {
            // An unfinished record: its sender was never answered.
            file.set_len(scan.valid_end).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
            rec.tail_bytes_removed += scan.file_len - scan.valid_end;
        }
        if row.is_none() && scan.records.is_empty() {
            unreferenced.push(id);
        }
        found.extend(scan.records);
    }
    if !found.is_empty() {
        found.sort_by_key(|f| f.seq);
        let txn = db.begin_write().map_err(|e| idx(e.to_string()))?;
        for f in found {
            match f.meta {
                Some(m) => {
                    let sop = m.record.sop_instance_uid.clone();
                    let outcome = index::apply(
                        &txn,
                        &Pending {
                            record: m.record,
                            destinations: m.destinations,
                            high_priority: m.high_priority,
                        },
                    )
                    .map_err(idx)?;
                    if outcome != CommitOutcome::Duplicate {
                        rec.reindexed += 1;
                        log::info!(sop_instance_uid:% = sop; "indexed an instance whose index commit was not yet flushed when the previous run stopped");
                    }
                }
                None => {
                    rec.skipped += 1;
                    index::skip_record(&txn, &f.location).map_err(idx)?;
                }
            }
        }
        txn.commit().map_err(|e| idx(e.to_string()))?;
    }
    for row in rows.values() {
        if row.live > 0 && !segment::segment_path(data_dir, row.id).exists() {
            rec.missing_records += row.live;
            log::error!(
                segment = row.id, instances = row.live;
                "INDEXED INSTANCES HAVE NO SEGMENT FILE: it was deleted or lost outside the gateway; their forwarding fails visibly; ask the modalities to resend"
            );
        }
    }
    for id in unreferenced {
        let path = segment::segment_path(data_dir, id);
        std::fs::remove_file(&path).map_err(io(&path))?;
        rec.segments_removed += 1;
    }
    rec.segments_removed += reap(db, data_dir, &|_| false).map_err(idx)?;
    // Cut tails are not reported here: they are never acknowledged records, or the unused
    // zeros of a segment made from a spare (the "store open" line gives their size).
    if rec.reindexed + rec.skipped > 0 {
        log::warn!(reindexed = rec.reindexed, skipped = rec.skipped; "segments recovered after an unclean stop");
    }
    Ok(next_id)
}

/// Deletes the segments that no row refers to, except those `open` says may still get records.
/// Returns how many. The file goes first, then its row: a crash in between leaves a row without
/// file and without instances, which the next call drops.
pub fn reap(db: &Database, data_dir: &Path, open: &dyn Fn(u64) -> bool) -> Result<usize, String> {
    let dead: Vec<u64> = index::segments(db)?
        .into_iter()
        .filter(|r| r.live == 0 && !open(r.id))
        .map(|r| r.id)
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let mut removed = 0;
    for &id in &dead {
        match std::fs::remove_file(segment::segment_path(data_dir, id)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot delete segment {id:016x}: {e}")),
        }
    }
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    for id in dead {
        index::forget_segment(&txn, id)?;
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(removed)
}

fn open_read_only(data_dir: &Path) -> Result<redb::ReadOnlyDatabase, String> {
    let path = data_dir.join(index::INDEX_FILE);
    if !path.exists() {
        return Err(format!("no index at {}", path.display()));
    }
    redb::ReadOnlyDatabase::open(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (is the gateway running? this command needs it stopped)",
            path.display()
        )
    })
}

/// Writes an indexed instance out as a Part 10 file (CLI `export`; the daemon must be stopped).
pub fn export(
    data_dir: &Path,
    sop_instance_uid: &str,
    out: &mut impl io::Write,
) -> Result<u64, String> {
    let db = open_read_only(data_dir)?;
    let rec = index::get(&db, sop_instance_uid)?
        .ok_or_else(|| format!("no instance {sop_instance_uid} in the index"))?;
    write_part10(data_dir, &rec, out)
}

/// Writes every indexed instance into `dir` as `<SOP Instance UID>.dcm` (CLI `export` without
/// a UID; the daemon must be stopped). Returns how many.
pub fn export_all(data_dir: &Path, dir: &Path) -> Result<usize, String> {
    let db = open_read_only(data_dir)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut n = 0;
    let mut failed = Vec::new();
    index::for_each_instance(&db, |rec| {
        // Validated at ingest (digits and dots): safe as a file name.
        let path = dir.join(format!("{}.dcm", rec.sop_instance_uid));
        let r = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))
            .and_then(|f| {
                let mut w = io::BufWriter::new(f);
                write_part10(data_dir, &rec, &mut w)?;
                io::Write::flush(&mut w)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))
            });
        match r {
            Ok(()) => n += 1,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                failed.push(e);
            }
        }
    })?;
    if failed.is_empty() {
        Ok(n)
    } else {
        Err(format!(
            "{} of {} instances could not be exported: {}",
            failed.len(),
            n + failed.len(),
            failed.join("; ")
        ))
    }
}

/// Copies the Part 10 file of a record to `out`, checking the dataset against its hash.
fn write_part10(
    data_dir: &Path,
    rec: &InstanceRecord,
    out: &mut impl io::Write,
) -> Result<u64, String> {
    let sop_instance_uid = &rec.sop_instance_uid;
    let loc = rec.location;
    let seg = segment::segment_path(data_dir, loc.segment);
    let file =
        std::fs::File::open(&seg).map_err(|e| format!("cannot open {}: {e}", seg.display()))?;
    let mut body = segment::Range::new(&file, loc.body_start(), loc.body_len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut copied, mut header_left) = (0u64, loc.body_len.saturating_sub(rec.size));
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", seg.display()))?;
        if n == 0 {
            break;
        }
        let skip = usize::try_from(header_left).unwrap_or(usize::MAX).min(n);
        hasher.update(&buf[skip..n]);
        header_left -= skip as u64;
        out.write_all(&buf[..n])
            .map_err(|e| format!("cannot write: {e}"))?;
        copied += n as u64;
    }
    if *hasher.finalize().as_bytes() != rec.checksum {
        return Err(format!(
            "the stored bytes of {sop_instance_uid} do not match their checksum (segment {}, offset {})",
            seg.display(),
            loc.offset
        ));
    }
    Ok(copied)
}

/// A record found in a segment file by [`list_records`].
#[derive(Debug, Clone)]
pub struct RecordInfo {
    pub location: Location,
    /// `None` if the record is not intact (its body freed, or torn by a stop).
    pub sop_instance_uid: Option<String>,
}

/// Every record in the segment files, in order, checked whole (CLI `segments`). Reads only the
/// segments, so it works while the gateway runs; a record being written is not yet listed.
pub fn list_records(data_dir: &Path) -> Result<Vec<RecordInfo>, String> {
    let mut out = Vec::new();
    let ids = segment::list(data_dir).map_err(|e| {
        format!(
            "cannot list {}: {e}",
            data_dir.join(segment::SEGMENT_DIR).display()
        )
    })?;
    for id in ids {
        let path = segment::segment_path(data_dir, id);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Deleted since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let read = |e: io::Error| format!("cannot read {}: {e}", path.display());
        let Some(salt) = segment::read_salt(&file, id).map_err(read)? else {
            continue;
        };
        for f in segment::scan(&file, &salt, id, 0).map_err(read)?.records {
            out.push(RecordInfo {
                location: f.location,
                sop_instance_uid: f.meta.map(|m| m.record.sop_instance_uid),
            });
        }
    }
    Ok(out)
}

/// Opens the index of a data directory for reading while no daemon runs (CLI `instances`).
pub fn read_instances(data_dir: &Path) -> Result<Vec<InstanceRecord>, String> {
    index::all_instances(&open_read_only(data_dir)?)
}

#[cfg(test)]
mod tests;
