//! The durable store: spool files plus the redb index.
//!
//! # Durability contract
//!
//! [`Ingest::finish`] returns `Ok` only after all of these have returned:
//! 1. the dataset bytes, behind a Part 10 preamble and file meta group, were written to a
//!    temporary file under `tmp/` (same filesystem as the spool) and that file `fdatasync`'d;
//! 2. the file was renamed to `spool/<hh>/<hash>.dcm` and that directory fsynced;
//! 3. the index rows, with an `unsettled` marker, were committed by redb with
//!    `Durability::Immediate`.
//!
//! Only then may the association answer C-STORE-RSP Success (PS3.4 Annex B.2.3). Step 1's flush
//! runs on the association while the index thread does steps 2 and 3 (rename first, then the
//! directory fsync and the commit at the same time), shared by every instance waiting at that
//! moment (group commit, see [`index`]): the acknowledgement waits for the slowest of three
//! flushes instead of their sum. Any failure returns `Err` (A700); a failed data flush also stops
//! the gateway, as a failed commit does, because the state of the file is then unknown.
//!
//! Start-up ([`Store::open`]) empties `tmp/` and checks the rows whose marker is still there
//! ([`index::verify_unsettled`]): a row whose file is missing or damaged was never acknowledged
//! and is dropped. After an unclean shutdown it also re-indexes spool files that have no row (a
//! crash between rename and commit) and reports rows whose file is gone.
//!
//! # Bounded memory
//!
//! An instance is never held whole: [`Ingest::write`] buffers at most [`FLUSH_BYTES`] before
//! writing to the file (a PDV of [`DIRECT_BYTES`] or more goes to the file without that copy),
//! and keeps the first [`HEAD_BYTES`] of the dataset, from which the index fields are parsed;
//! the file is read back only for a dataset whose indexed attributes lie beyond that.

pub mod evict;
pub mod index;
pub mod parse;
pub mod queue;
pub mod spool;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::Database;
use snafu::Snafu;

pub use index::Wake;
pub use index::{CommitOutcome, InstanceRecord};
use index::{IndexHandle, IndexThread, Pending};
use spool::{FileMeta, Hash};

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
    pub clean: bool,
    pub temp_files_removed: usize,
    pub reindexed: usize,
    pub quarantined: usize,
    /// Spool files without a row whose content was incomplete: written during a crash, never
    /// acknowledged, removed.
    pub incomplete_removed: usize,
    pub missing_files: usize,
    pub in_flight_returned: usize,
    /// Rows committed just before a crash whose file never became durable (never acknowledged).
    pub unacknowledged_dropped: usize,
}

struct Inner {
    data_dir: PathBuf,
    db: Arc<Database>,
    /// Routes an instance (calling AE, modality, SOP class) to destination names.
    router: Router,
    min_free: u64,
    index: IndexHandle,
    /// Cancelled when the store can no longer vouch for its files (a failed data flush).
    on_fatal: tokio_util::sync::CancellationToken,
    /// Set while free space is below the reserve; logs only state changes.
    low_space: AtomicBool,
    spool_lock: index::SpoolLock,
}

/// Chooses the destinations of an instance: (calling AE, modality, SOP class) → names.
pub type Router = Arc<dyn Fn(&str, &str, &str) -> Vec<String> + Send + Sync>;

/// Cheap to clone; shared by all associations.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Owns the index thread; [`StoreRuntime::close`] waits for it once every [`Store`] is dropped.
pub struct StoreRuntime {
    thread: std::thread::JoinHandle<Result<Arc<Database>, String>>,
}

impl StoreRuntime {
    /// Joins the index thread and records a clean shutdown. Call after every [`Store`] clone
    /// is dropped, or this waits forever.
    pub fn close(self) -> Result<(), String> {
        // Every Store clone must be gone, including the forwarder's, or this waits forever.
        let db = self
            .thread
            .join()
            .map_err(|_| "index thread panicked".to_owned())??;
        index::mark_clean(&db)
    }
}

impl StoreRuntime {
    /// Joins the index thread without recording a clean shutdown: what a crash after the last
    /// commit leaves behind (tests).
    #[cfg(test)]
    pub fn close_unclean(self) {
        let _ = self.thread.join();
    }
}

impl Store {
    /// Opens the data directory: layout, index, recovery. Blocking; call before serving.
    /// `on_fatal` is cancelled if the index thread stops after a failed commit.
    pub fn open(
        data_dir: &Path,
        min_free: u64,
        on_fatal: tokio_util::sync::CancellationToken,
        router: Router,
        wake: Wake,
    ) -> Result<(Store, StoreRuntime, Recovery), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        spool::create_layout(data_dir).map_err(io_err(data_dir))?;
        let mut rec = Recovery {
            temp_files_removed: spool::clear_tmp(data_dir).map_err(io_err(data_dir))?,
            ..Recovery::default()
        };
        let (db, clean) = index::open(data_dir, INDEX_CACHE_BYTES)
            .map_err(|message| StoreError::Index { message })?;
        rec.clean = clean;
        let (verified, dropped) = index::verify_unsettled(&db, data_dir)
            .map_err(|message| StoreError::Index { message })?;
        rec.unacknowledged_dropped = dropped;
        if !clean || !verified.is_empty() || dropped > 0 {
            reconcile(&db, data_dir, &mut rec, &router, &verified)?;
        }
        rec.in_flight_returned =
            queue::recover_in_flight(&db).map_err(|message| StoreError::Index { message })?;
        let db = Arc::new(db);
        let spool_lock = index::SpoolLock::default();
        let (thread, handle) =
            IndexThread::new(db.clone(), data_dir.to_path_buf(), spool_lock.clone(), wake)
                .map_err(io_err(data_dir))?;
        let fatal = on_fatal.clone();
        let thread = std::thread::Builder::new()
            .name("index".into())
            .spawn(move || {
                let r = thread.run();
                if let Err(e) = &r {
                    log::error!(error:% = e; "index failed; the gateway stops so that it can be restarted and the index repaired");
                    on_fatal.cancel();
                }
                r
            })
            .map_err(io_err(data_dir))?;
        let store = Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                db,
                router,
                min_free,
                index: handle,
                on_fatal: fatal,
                low_space: AtomicBool::new(false),
                spool_lock,
            }),
        };
        Ok((store, StoreRuntime { thread }, rec))
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// How long since the index thread last turned; the watchdog wants this small.
    pub fn index_heartbeat_age(&self) -> std::time::Duration {
        self.inner.index.heartbeat_age()
    }

    /// The index, for the forwarder and operator queries (redb serialises writers).
    pub fn db(&self) -> &Arc<Database> {
        &self.inner.db
    }

    /// Held by eviction around deleting spool files (see [`index::SpoolLock`]).
    pub fn spool_lock(&self) -> &index::SpoolLock {
        &self.inner.spool_lock
    }

    /// Free bytes for this service on the data directory's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.inner.data_dir).map_err(io::Error::from)?;
        Ok(s.blocks_available().saturating_mul(s.fragment_size()))
    }

    /// Starts receiving one instance: checks the disk reserve, then creates the temporary file
    /// with its Part 10 header. Blocking (a statvfs and a file creation).
    pub fn begin(&self, incoming: IncomingInstance) -> Result<Ingest, StoreError> {
        let inner = &self.inner;
        let free = self.free_bytes().map_err(|source| StoreError::Io {
            path: inner.data_dir.clone(),
            source,
        })?;
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
        let tmp = spool::temp_path(&inner.data_dir);
        let header = spool::encode_header(&FileMeta {
            sop_class_uid: incoming.sop_class_uid.clone(),
            sop_instance_uid: incoming.sop_instance_uid.clone(),
            transfer_syntax: incoming.transfer_syntax.clone(),
            source_ae: incoming.calling_ae.clone(),
        });
        let mut ingest = Ingest {
            store: self.clone(),
            header_len: header.len() as u64,
            incoming,
            file: None,
            buf: Vec::with_capacity(FLUSH_BYTES + 64 * 1024),
            head: Vec::new(),
            hasher: blake3::Hasher::new(),
            size: 0,
            tmp,
        };
        // Read access too: the indexed fields are parsed back from this file.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&ingest.tmp)
            .map_err(|source| StoreError::Io {
                path: ingest.tmp.clone(),
                source,
            })?;
        file.write_all(&header).map_err(|source| StoreError::Io {
            path: ingest.tmp.clone(),
            source,
        })?;
        ingest.file = Some(file);
        Ok(ingest)
    }
}

/// One instance being received. Dropping it without [`Ingest::finish`] removes the temporary
/// file, so an aborted transfer leaves nothing behind.
pub struct Ingest {
    store: Store,
    incoming: IncomingInstance,
    tmp: PathBuf,
    file: Option<File>,
    header_len: u64,
    buf: Vec<u8>,
    /// The first [`HEAD_BYTES`] of the dataset.
    head: Vec<u8>,
    hasher: blake3::Hasher,
    size: u64,
}

impl Ingest {
    /// Appends dataset bytes. Writes to the file once [`FLUSH_BYTES`] are buffered (or at once
    /// for a large PDV), on a blocking section of the runtime.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.head.len() < HEAD_BYTES {
            let n = data.len().min(HEAD_BYTES - self.head.len());
            self.head.extend_from_slice(&data[..n]);
        }
        if self.buf.is_empty() && data.len() >= DIRECT_BYTES {
            return tokio::task::block_in_place(|| self.write_out(data));
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FLUSH_BYTES {
            tokio::task::block_in_place(|| self.flush())?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_out(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn write_out(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        self.hasher.update(data);
        self.size += data.len() as u64;
        file.write_all(data).map_err(|source| StoreError::Io {
            path: self.tmp.clone(),
            source,
        })
    }

    /// Completes the instance under the durability contract (see the module doc).
    pub async fn finish(mut self) -> Result<Stored, StoreError> {
        let (record, study, series) = tokio::task::block_in_place(|| self.seal())?;
        let size = record.size;
        let (sop, checksum) = (record.sop_instance_uid.clone(), record.checksum);
        let destinations =
            (self.store.inner.router)(&record.calling_ae, &record.modality, &record.sop_class_uid);
        let tmp = std::mem::take(&mut self.tmp);
        let pending = Pending {
            tmp: tmp.clone(),
            record,
            destinations,
            high_priority: self.incoming.high_priority,
        };
        let file = self.file.take().ok_or_else(|| StoreError::Task {
            message: "instance already finished".into(),
        })?;
        let index = &self.store.inner.index;
        // From here the index thread owns the temporary file (it renames or removes it).
        let answer = index.submit(pending).await.map_err(|message| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::Index { message }
        })?;
        let synced = tokio::task::block_in_place(|| file.sync_data());
        let outcome = answer
            .outcome()
            .await
            .map_err(|message| StoreError::Index { message })?;
        if let Err(source) = synced {
            log::error!(
                sop_instance_uid:% = sop, path:% = tmp.display(), error:% = source;
                "data flush of a spool file failed: answering A700 and stopping, so that the restart checks what is on disk"
            );
            self.store.inner.on_fatal.cancel();
            return Err(StoreError::Io { path: tmp, source });
        }
        if outcome != CommitOutcome::Duplicate {
            // Only a stopped index fails here; the marker then stays and the next start checks
            // this file, which is durable.
            let _ = index.settled(sop, checksum).await;
        }
        Ok(Stored {
            outcome,
            study_instance_uid: study,
            series_instance_uid: series,
            size,
        })
    }

    /// Writes out what is buffered and checks the indexed fields (the data flush is
    /// [`Ingest::finish`]'s).
    fn seal(&mut self) -> Result<(InstanceRecord, String, String), StoreError> {
        self.flush()?;
        let file = self.file.as_ref().ok_or_else(|| StoreError::Task {
            message: "instance already finished".into(),
        })?;
        // The rest of the dataset is read from the file only if parsing gets past the head.
        let rest_at = self.header_len + self.head.len() as u64;
        let rest = LazyAt {
            file,
            at: rest_at,
            positioned: false,
        };
        let fields = parse::read_fields(
            self.head
                .as_slice()
                .chain(BufReader::with_capacity(64 * 1024, rest)),
            self.size,
            &self.incoming.transfer_syntax,
        )
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
        };
        Ok((
            record,
            fields.study_instance_uid,
            fields.series_instance_uid,
        ))
    }
}

/// Reads a file from `at` on, seeking there on the first read only.
struct LazyAt<'a> {
    file: &'a File,
    at: u64,
    positioned: bool,
}

impl io::Read for LazyAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut f = self.file;
        if !self.positioned {
            f.seek(SeekFrom::Start(self.at))?;
            self.positioned = true;
        }
        f.read(buf)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.file.take().is_some() && !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// After an unclean shutdown: index spool files that have no row, remove those whose content is
/// incomplete (never acknowledged), quarantine those that cannot be indexed, and report rows
/// whose file is gone.
/// `replacing`: instances whose newest row was just verified ([`index::verify_unsettled`]); a
/// file of theirs without a row is the version that row replaced, not a newer one.
fn reconcile(
    db: &Database,
    data_dir: &Path,
    rec: &mut Recovery,
    router: &Router,
    replacing: &HashSet<String>,
) -> Result<(), StoreError> {
    let idx = |message: String| StoreError::Index { message };
    let spool_dir = data_dir.join(spool::SPOOL_DIR);
    log::warn!(data_dir:% = data_dir.display(); "previous run did not shut down cleanly: reconciling spool files with the index");
    let mut orphans: Vec<(PathBuf, Hash)> = Vec::new();
    let files = index::FileLookup::open(db).map_err(idx)?;
    // Spool files that have a row. If it equals the number of rows, no row lacks its file and
    // the second pass (a stat per row) is not needed.
    let mut matched = 0u64;
    let shards = std::fs::read_dir(&spool_dir).map_err(|source| StoreError::Io {
        path: spool_dir.clone(),
        source,
    })?;
    for shard in shards.flatten() {
        let Ok(entries) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let hash = name
                .to_str()
                .and_then(|n| n.strip_suffix(".dcm"))
                .and_then(spool::parse_hex);
            match hash {
                Some(h) if files.contains(&h).map_err(idx)? => matched += 1,
                Some(h) => orphans.push((e.path(), h)),
                None => {
                    log::warn!(path:% = e.path().display(); "unexpected file in the spool; leaving it alone")
                }
            }
        }
    }
    let rows = files.rows().map_err(idx)?;
    drop(files);
    for (path, name_hash) in orphans {
        match reindex_file(db, data_dir, &path, &name_hash, router, replacing) {
            Ok(Orphan::Reindexed) => rec.reindexed += 1,
            Ok(Orphan::Superseded) => {}
            Ok(Orphan::Incomplete(reason)) => {
                // No row: never acknowledged. The data flush and the rename run concurrently
                // (module doc), so a crash can leave a final name over incomplete content.
                let _ = std::fs::remove_file(&path);
                log::warn!(path:% = path.display(), reason:% = reason; "removed an incomplete spool file of an instance that was never acknowledged (written when the previous run stopped)");
                rec.incomplete_removed += 1;
            }
            Err(reason) => {
                let dest = spool::quarantine(data_dir, &path);
                log::error!(path:% = path.display(), reason:% = reason, quarantined:? = dest.ok(); "spool file could not be re-indexed");
                rec.quarantined += 1;
            }
        }
    }
    if matched < rows {
        index::for_each_instance(db, |r| {
            if !data_dir.join(spool::relative_path(&r.checksum)).exists() {
                rec.missing_files += 1;
                log::error!(
                    sop_instance_uid:% = r.sop_instance_uid, study_instance_uid:% = r.study_instance_uid, calling_ae:% = r.calling_ae;
                    "INDEXED INSTANCE HAS NO SPOOL FILE: the file was deleted or lost outside the gateway; ask the modality to resend the study"
                );
            }
        })
        .map_err(idx)?;
    }
    log::warn!(reindexed = rec.reindexed, incomplete_removed = rec.incomplete_removed, quarantined = rec.quarantined, missing_files = rec.missing_files; "reconciliation finished");
    Ok(())
}

fn reindex_file(
    db: &Database,
    data_dir: &Path,
    path: &Path,
    name_hash: &Hash,
    router: &Router,
    replacing: &HashSet<String>,
) -> Result<Orphan, String> {
    let (meta, offset, hash, size) = match spool::hash_dataset(path) {
        Ok(v) => v,
        Err(e) => return Ok(Orphan::Incomplete(e.to_string())),
    };
    if &hash != name_hash {
        return Ok(Orphan::Incomplete("content does not match its name".into()));
    }
    if replacing.contains(&meta.sop_instance_uid) {
        // Replaced by the verified row; its deletion was due once that row was settled.
        let _ = std::fs::remove_file(path);
        log::info!(sop_instance_uid:% = meta.sop_instance_uid; "removed the replaced version of an instance");
        return Ok(Orphan::Superseded);
    }
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let fields =
        parse::read_fields(BufReader::new(f), size, &meta.transfer_syntax).map_err(|e| e.0)?;
    let record = InstanceRecord {
        sop_instance_uid: meta.sop_instance_uid,
        sop_class_uid: meta.sop_class_uid,
        study_instance_uid: fields.study_instance_uid,
        series_instance_uid: fields.series_instance_uid,
        patient_id: fields.patient_id,
        modality: fields.modality,
        accession_number: fields.accession_number,
        study_date: fields.study_date,
        transfer_syntax: meta.transfer_syntax,
        size,
        checksum: hash,
        calling_ae: meta.source_ae,
        received_at_ms: now_ms(),
        state: 0,
    };
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let old = index::existing(&txn, &record.sop_instance_uid)?;
    // The file without a row is the newest version: it was renamed just before a crash.
    index::put(&txn, &record, old.as_ref())?;
    let destinations = router(&record.calling_ae, &record.modality, &record.sop_class_uid);
    queue::enqueue(&txn, &record.sop_instance_uid, &destinations, false)?;
    txn.commit().map_err(|e| e.to_string())?;
    if let Some(old) = old.filter(|o| o.checksum != hash) {
        let _ = std::fs::remove_file(data_dir.join(spool::relative_path(&old.checksum)));
    }
    log::info!(sop_instance_uid:% = record.sop_instance_uid; "re-indexed spool file found without index row");
    Ok(Orphan::Reindexed)
}

/// What became of a spool file found without an index row.
enum Orphan {
    /// Complete: indexed and queued (a crash between rename and commit).
    Reindexed,
    /// The older version of an instance whose newer one was verified: removed.
    Superseded,
    /// Unreadable or not matching its name: it was being flushed when the run stopped.
    Incomplete(String),
}

/// Opens the index of a data directory for reading while no daemon runs (CLI `instances`).
pub fn read_instances(data_dir: &Path) -> Result<Vec<InstanceRecord>, String> {
    let path = data_dir.join(index::INDEX_FILE);
    if !path.exists() {
        return Err(format!("no index at {}", path.display()));
    }
    let db = redb::ReadOnlyDatabase::open(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (is the gateway running? this command needs it stopped)",
            path.display()
        )
    })?;
    index::all_instances(&db)
}

#[cfg(test)]
mod tests;
