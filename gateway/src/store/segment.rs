//! Segment files: the spool. Instances are appended as records to a few large files instead of
//! one file each, so that an acknowledgement costs one `fdatasync` of a file that already
//! exists: no inode, no directory entry, no directory fsync (docs/durability.md).
//!
//! Layout under the data directory: `segments/<id>.seg`, `<id>` 16 hex digits, increasing.
//!
//! A segment starts with a [`SEGMENT_HEADER`]-byte header: magic `DGWSEG01`, its id (u64 LE)
//! and a random 32-byte salt. Records follow back to back. A record is
//! - a [`RECORD_HEADER`]-byte header: magic `DGWREC01`, sequence number, body length (u64 LE),
//!   meta length (u32 LE), 4 reserved bytes, the first 16 bytes of the BLAKE3 hash of the meta,
//!   and a check: the first 16 bytes of BLAKE3(salt ‖ the 48 bytes before it);
//! - the body: a whole DICOM Part 10 file (preamble, file meta group, dataset as received);
//! - the meta: the index row and the destinations of the instance ([`RecordMeta`], postcard),
//!   from which the index rows can be rebuilt.
//!
//! Invariants:
//! - A segment has one writer at a time: an association streaming an instance (the record is
//!   written at the segment's end, body first, meta next, the header last, then the file is
//!   `fdatasync`'d, and only then does the next record start), or the group log of small
//!   instances ([`super::group`]: whole records, one write each, back to back; a record is
//!   answered only after a flush that began after its write). So after a crash every answered
//!   record lies in the unbroken chain of valid records from the segment's start, and the first
//!   position without a valid header is its end.
//! - A header is valid only with this segment's salt: bytes a sender put into a dataset, or an
//!   aborted record, cannot pass for a record.
//! - A record whose header is valid but whose meta or body does not match it (torn by a crash,
//!   or a duplicate whose body was punched out) is skipped, never indexed; the header still
//!   gives the position of the next record.
//! - Every record with a valid header was completed to be indexed: the index holds its row, or
//!   start-up recovery puts it there from the record before READY.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::index::InstanceRecord;
use super::spool;

pub const SEGMENT_DIR: &str = "segments";
pub const SEGMENT_HEADER: u64 = 64;
pub const RECORD_HEADER: u64 = 64;
/// A segment takes no new record once it is this long; it is deleted when no row refers to it.
pub const SEGMENT_TARGET: u64 = 64 << 20;
/// The meta of a record is small (a row with capped fields, and destination names); a longer
/// one is refused before it is written, and read as damage.
pub const MAX_META: u32 = 1 << 20;

const SEGMENT_MAGIC: &[u8; 8] = b"DGWSEG01";
const RECORD_MAGIC: &[u8; 8] = b"DGWREC01";

/// Where an instance lies: segment, record start, and the lengths of its parts.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Location {
    pub segment: u64,
    /// Offset of the record header in the segment.
    pub offset: u64,
    /// Length of the Part 10 file.
    pub body_len: u64,
    pub meta_len: u32,
}

impl Location {
    pub fn body_start(&self) -> u64 {
        self.offset + RECORD_HEADER
    }

    pub fn end(&self) -> u64 {
        self.body_start() + self.body_len + u64::from(self.meta_len)
    }
}

/// What a record carries besides the Part 10 file: enough to rebuild its index rows and queue
/// entries. The location inside `record` is not stored (it is where the record is found).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordMeta {
    pub record: InstanceRecord,
    pub destinations: Vec<String>,
    pub high_priority: bool,
}

pub fn segment_path(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join(SEGMENT_DIR).join(format!("{id:016x}.seg"))
}

/// The id of a segment file name, if it is one.
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Segment ids found in the data directory.
pub fn list(data_dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in fs::read_dir(data_dir.join(SEGMENT_DIR))? {
        let e = e?;
        match e.file_name().to_str().and_then(parse_name) {
            Some(id) => ids.push(id),
            None if e.file_name() == super::spare::SPARE_DIR => {}
            None => {
                log::warn!(path:% = e.path().display(); "unexpected file among the segments; leaving it alone");
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub fn create_layout(data_dir: &Path) -> io::Result<()> {
    fs::create_dir_all(data_dir.join(SEGMENT_DIR))?;
    spool::fsync_dir(data_dir)
}

fn check(salt: &[u8; 32], head: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(salt);
    h.update(head);
    first16(h.finalize().as_bytes())
}

fn first16(b: &[u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&b[..16]);
    out
}

fn record_header(salt: &[u8; 32], seq: u64, body_len: u64, meta: &[u8]) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..8].copy_from_slice(RECORD_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&body_len.to_le_bytes());
    h[24..28].copy_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_le_bytes());
    h[32..48].copy_from_slice(&first16(blake3::hash(meta).as_bytes()));
    let c = check(salt, &h[..48]);
    h[48..].copy_from_slice(&c);
    h
}

/// A parsed, checked record header.
struct Header {
    seq: u64,
    body_len: u64,
    meta_len: u32,
    meta_hash: [u8; 16],
}

fn parse_record_header(salt: &[u8; 32], h: &[u8; 64]) -> Option<Header> {
    if &h[..8] != RECORD_MAGIC || h[48..] != check(salt, &h[..48]) {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
    let mut meta_hash = [0u8; 16];
    meta_hash.copy_from_slice(&h[32..48]);
    Some(Header {
        seq: u64_at(8),
        body_len: u64_at(16),
        meta_len: u32::from_le_bytes(h[24..28].try_into().unwrap_or([0; 4])),
        meta_hash,
    })
}

/// A segment open for appending, owned by one writer at a time.
pub struct Segment {
    id: u64,
    file: File,
    path: PathBuf,
    salt: [u8; 32],
    /// Where the next record starts.
    end: u64,
    /// Made from a spare ([`super::spare`]): written to its full length in advance.
    prewritten: bool,
}

impl Segment {
    /// Creates a new, empty segment: header written and flushed, directory entry flushed.
    pub fn create(data_dir: &Path, id: u64) -> io::Result<Segment> {
        let path = segment_path(data_dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let segment = Segment::with_header(id, file, path, false)?;
        spool::fsync_dir(&data_dir.join(SEGMENT_DIR))?;
        Ok(segment)
    }

    /// Makes segment `id` of the spare file at `spare` ([`super::spare`]): renames it into
    /// place, flushes both directories, then writes and flushes the header. A crash before the
    /// header is durable leaves a file whose header does not name `id`: start-up deletes it as
    /// a segment that was being created.
    pub fn from_spare(data_dir: &Path, id: u64, spare: &Path) -> io::Result<Segment> {
        let path = segment_path(data_dir, id);
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        fs::rename(spare, &path)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        spool::fsync_dir(&data_dir.join(SEGMENT_DIR))?;
        if let Some(dir) = spare.parent() {
            spool::fsync_dir(dir)?;
        }
        Segment::with_header(id, file, path, true)
    }

    /// Writes the header of segment `id` (a new salt) at the start of `file` and flushes it: the
    /// inode too unless the file was `prewritten` to its length.
    fn with_header(id: u64, file: File, path: PathBuf, prewritten: bool) -> io::Result<Segment> {
        let mut salt = [0u8; 32];
        getrandom(&mut salt)?;
        let mut h = [0u8; SEGMENT_HEADER as usize];
        h[..8].copy_from_slice(SEGMENT_MAGIC);
        h[8..16].copy_from_slice(&id.to_le_bytes());
        h[16..48].copy_from_slice(&salt);
        file.write_all_at(&h, 0)?;
        if prewritten {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        Ok(Segment {
            id,
            file,
            path,
            salt,
            end: SEGMENT_HEADER,
            prewritten,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the next record starts.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Writes the meta after a body of `body_len` bytes at the end, then the record header;
    /// returns the record's location. The caller flushes ([`Segment::sync`]) before relying on
    /// it; the record becomes the segment's last only with [`Segment::advance`].
    pub fn complete(&self, seq: u64, body_len: u64, meta: &[u8]) -> io::Result<Location> {
        let meta_len = u32::try_from(meta.len())
            .ok()
            .filter(|&n| n <= MAX_META)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record meta too long"))?;
        let loc = Location {
            segment: self.id,
            offset: self.end,
            body_len,
            meta_len,
        };
        self.file.write_all_at(meta, loc.body_start() + body_len)?;
        self.file
            .write_all_at(&record_header(&self.salt, seq, body_len, meta), loc.offset)?;
        Ok(loc)
    }

    /// Appends a whole record in one write: `record` holds a [`RECORD_HEADER`]'s worth of space
    /// (filled in here), the body, then `meta_len` bytes of meta. The caller flushes before
    /// relying on it. After an error the end of the file is unknown: take no further record.
    pub fn append(&mut self, seq: u64, record: &mut [u8], meta_len: u32) -> io::Result<Location> {
        let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "record meta too long");
        if meta_len > MAX_META {
            return Err(too_long());
        }
        let body_len = (record.len() as u64)
            .checked_sub(RECORD_HEADER + u64::from(meta_len))
            .ok_or_else(too_long)?;
        let (head, rest) = record.split_at_mut(RECORD_HEADER as usize);
        let meta = &rest[rest.len() - meta_len as usize..];
        head.copy_from_slice(&record_header(&self.salt, seq, body_len, meta));
        let loc = Location {
            segment: self.id,
            offset: self.end,
            body_len,
            meta_len,
        };
        self.file.write_all_at(record, loc.offset)?;
        self.end = loc.end();
        Ok(loc)
    }

    /// `fdatasync`: the records written so far are durable when this returns.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes the record at `loc` part of the segment: the next one starts after it.
    pub fn advance(&mut self, loc: &Location) {
        self.end = loc.end();
    }

    /// Drops whatever an abandoned record left beyond the end (no flush: after a crash the
    /// leftovers have no valid header and end the chain anyway). A segment made from a spare
    /// keeps its length, so that its next record overwrites the leftovers in place.
    pub fn discard_tail(&self) {
        if !self.prewritten {
            let _ = self.file.set_len(self.end);
        }
    }
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    File::open("/dev/urandom")?.read_exact(buf)
}

/// Frees the disk space of `len` bytes at `offset` (the file keeps its length; the range reads
/// as zeros).
pub fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    if n == 0 {
        return Ok(());
    }
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        n,
    )
    .map_err(io::Error::from)
}

/// Starts writing `len` bytes at `offset` to the disk without waiting, so that the disk works
/// while the rest of an instance arrives and the `fdatasync` before its acknowledgement has
/// little left to write. `POSIX_FADV_DONTNEED` starts writeback of the range's dirty pages
/// (Linux `generic_fadvise`, `WB_SYNC_NONE`) and keeps them cached while they are dirty or
/// under writeback. Advice only: a failure changes nothing that the later flush does not.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    if let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) {
        let _ = posix_fadvise(file, off, n, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// A record found by [`scan`].
#[derive(Debug)]
pub struct Found {
    pub seq: u64,
    pub location: Location,
    /// The decoded meta, with `record.location` set; `None` if the record is not intact (torn,
    /// or its body punched out): it must not be indexed.
    pub meta: Option<RecordMeta>,
}

/// What a segment holds from a given offset on.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<Found>,
    /// Where the chain of valid headers ends.
    pub valid_end: u64,
    pub file_len: u64,
}

/// Reads a segment's header; `None` if it is not a whole, valid header of segment `id` (a
/// crash during [`Segment::create`]).
pub fn read_salt(file: &File, id: u64) -> io::Result<Option<[u8; 32]>> {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    match file.read_exact_at(&mut h, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &h[..8] != SEGMENT_MAGIC || h[8..16] != id.to_le_bytes() {
        return Ok(None);
    }
    let mut salt = [0u8; 32];
    salt.copy_from_slice(&h[16..48]);
    Ok(Some(salt))
}

/// Walks the records of a segment from `from` (a record start) and checks each whole: header,
/// meta, and the dataset's hash against the meta's. Reads every byte from `from` on.
pub fn scan(file: &File, salt: &[u8; 32], id: u64, from: u64) -> io::Result<Scan> {
    let file_len = file.metadata()?.len();
    let mut records = Vec::new();
    let mut at = from.max(SEGMENT_HEADER);
    loop {
        let mut h = [0u8; RECORD_HEADER as usize];
        if at + RECORD_HEADER > file_len || file.read_exact_at(&mut h, at).is_err() {
            break;
        }
        let Some(head) = parse_record_header(salt, &h) else {
            break;
        };
        let location = Location {
            segment: id,
            offset: at,
            body_len: head.body_len,
            meta_len: head.meta_len,
        };
        if head.meta_len > MAX_META || location.end() > file_len {
            break;
        }
        let meta = read_intact(file, &location, &head)?;
        records.push(Found {
            seq: head.seq,
            location,
            meta,
        });
        at = location.end();
    }
    Ok(Scan {
        records,
        valid_end: at,
        file_len,
    })
}

/// The meta of a record if meta and dataset match its header and each other.
fn read_intact(file: &File, loc: &Location, head: &Header) -> io::Result<Option<RecordMeta>> {
    let mut meta = vec![0u8; head.meta_len as usize];
    file.read_exact_at(&mut meta, loc.body_start() + loc.body_len)?;
    if first16(blake3::hash(&meta).as_bytes()) != head.meta_hash {
        return Ok(None);
    }
    let Ok(mut m) = postcard::from_bytes::<RecordMeta>(&meta) else {
        return Ok(None);
    };
    let mut body =
        io::BufReader::with_capacity(1 << 20, Range::new(file, loc.body_start(), loc.body_len));
    let Ok((_, offset)) = spool::read_header(&mut body) else {
        return Ok(None);
    };
    let mut hasher = blake3::Hasher::new();
    let size = io::copy(&mut body, &mut spool::HashWriter(&mut hasher))?;
    if size != m.record.size
        || offset + size != loc.body_len
        || *hasher.finalize().as_bytes() != m.record.checksum
    {
        return Ok(None);
    }
    m.record.location = *loc;
    Ok(Some(m))
}

/// Reads `len` bytes of a file from `offset` on, with positioned reads.
pub struct Range<'a> {
    file: &'a File,
    at: u64,
    left: u64,
}

impl<'a> Range<'a> {
    pub fn new(file: &'a File, offset: u64, len: u64) -> Range<'a> {
        Range {
            file,
            at: offset,
            left: len,
        }
    }
}

impl Read for Range<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.at)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment ends inside a record",
            ));
        }
        self.at += got as u64;
        self.left -= got as u64;
        Ok(got)
    }
}

/// The segments open for appending, and where new ones get their ids.
pub struct Pool {
    data_dir: PathBuf,
    next_id: AtomicU64,
    next_seq: AtomicU64,
    /// [`SEGMENT_TARGET`]; smaller in tests.
    target: AtomicU64,
    idle: Mutex<Vec<Segment>>,
    /// Ids of segments that are idle or being written: not to be deleted.
    open: Mutex<HashSet<u64>>,
    /// Files new segments are made of, when there are any.
    spares: Option<super::spare::Spares>,
    /// How many spares are kept ready (`gateway.spare_segments` at start).
    spares_wanted: usize,
    /// When an instance last began arriving (ms since `started`): spares are made while idle.
    last_busy_ms: AtomicU64,
    started: std::time::Instant,
}

impl Pool {
    pub fn new(data_dir: &Path, next_id: u64) -> Pool {
        Pool {
            data_dir: data_dir.to_path_buf(),
            next_id: AtomicU64::new(next_id),
            next_seq: AtomicU64::new(1),
            target: AtomicU64::new(test_target().unwrap_or(SEGMENT_TARGET)),
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(HashSet::new()),
            spares: None,
            spares_wanted: 0,
            last_busy_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    /// New segments are made of the spares in `segments/spare` ([`super::spare`]) while there
    /// are any; `wanted` are kept ready. Blocking (lists and cleans that directory).
    pub fn with_spares(mut self, wanted: usize) -> io::Result<Pool> {
        let len = self.target.load(Ordering::Relaxed) + super::spare::SLACK;
        self.spares = Some(super::spare::Spares::open(&self.dir(), len)?);
        self.spares_wanted = wanted;
        Ok(self)
    }

    /// How many spares are kept ready.
    pub fn spares_wanted(&self) -> usize {
        self.spares_wanted
    }

    pub fn spares(&self) -> Option<&super::spare::Spares> {
        self.spares.as_ref()
    }

    /// Notes that an instance began arriving.
    pub fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_busy_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since an instance last began arriving (since start if none did).
    pub fn idle_for(&self) -> std::time::Duration {
        let now = self.started.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_busy_ms.load(Ordering::Relaxed)),
        )
    }

    /// An idle segment, or a new one, made of a spare if there is one. Blocking (creating one
    /// flushes).
    pub fn take(&self) -> io::Result<Segment> {
        if let Some(s) = lock(&self.idle).pop() {
            return Ok(s);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(id);
        let spare = self.spares.as_ref().and_then(|s| s.take());
        let made = match spare {
            Some(path) => Segment::from_spare(&self.data_dir, id, &path).or_else(|e| {
                log::warn!(path:% = path.display(), error:% = e; "cannot use a spare segment; creating one");
                // Neither file holds a record: the spare, or the segment it was renamed to
                // before its header was written.
                let _ = std::fs::remove_file(&path);
                if e.kind() != io::ErrorKind::AlreadyExists {
                    let _ = std::fs::remove_file(segment_path(&self.data_dir, id));
                }
                Segment::create(&self.data_dir, id)
            }),
            None => Segment::create(&self.data_dir, id),
        };
        made.inspect_err(|_| {
            lock(&self.open).remove(&id);
        })
    }

    /// Returns a segment after a completed or abandoned record; a full one is closed.
    pub fn give_back(&self, segment: Segment) {
        if self.is_full(&segment) {
            lock(&self.open).remove(&segment.id);
        } else {
            lock(&self.idle).push(segment);
        }
    }

    /// Whether a segment takes no new record.
    pub fn is_full(&self, segment: &Segment) -> bool {
        segment.end >= self.target.load(Ordering::Relaxed)
    }

    /// Makes segments full sooner, to exercise closing them.
    #[cfg(test)]
    pub fn set_target(&self, bytes: u64) {
        self.target.store(bytes, Ordering::Relaxed);
    }

    /// The directory of the segments.
    pub fn dir(&self) -> PathBuf {
        self.data_dir.join(SEGMENT_DIR)
    }

    /// Whether a segment may still get records.
    pub fn is_open(&self, id: u64) -> bool {
        lock(&self.open).contains(&id)
    }

    /// Orders records across segments (recovery applies them in this order).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
thread_local! {
    /// A segment target for pools made on this thread (tests: small spares).
    pub static TEST_TARGET: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn test_target() -> Option<u64> {
    TEST_TARGET.with(|t| t.get())
}

#[cfg(not(test))]
fn test_target() -> Option<u64> {
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a holder panicked; the guarded data is a plain list.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(dataset: &[u8]) -> Vec<u8> {
        let mut b = spool::encode_header(&spool::FileMeta {
            sop_class_uid: "1.2.3".into(),
            sop_instance_uid: "1.2.3.4".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source_ae: "CT01".into(),
        });
        b.extend_from_slice(dataset);
        b
    }

    fn meta(dataset: &[u8]) -> RecordMeta {
        RecordMeta {
            record: InstanceRecord {
                sop_instance_uid: "1.2.3.4".into(),
                size: dataset.len() as u64,
                checksum: *blake3::hash(dataset).as_bytes(),
                ..InstanceRecord::default()
            },
            destinations: vec!["PACS".into()],
            high_priority: false,
        }
    }

    fn append(seg: &mut Segment, seq: u64, dataset: &[u8]) -> Location {
        let b = body(dataset);
        seg.file.write_all_at(&b, seg.end + RECORD_HEADER).unwrap();
        let m = postcard::to_stdvec(&meta(dataset)).unwrap();
        let loc = seg.complete(seq, b.len() as u64, &m).unwrap();
        seg.sync().unwrap();
        seg.advance(&loc);
        loc
    }

    #[test]
    fn records_chain_and_a_torn_or_punched_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        create_layout(dir.path()).unwrap();
        let mut seg = Segment::create(dir.path(), 7).unwrap();
        let a = append(&mut seg, 1, b"first dataset");
        let b = append(&mut seg, 2, &vec![5u8; 100_000]);
        let c = append(&mut seg, 3, b"third");
        // The body of b read as zeros (a duplicate punched out, or never flushed).
        punch(seg.file(), b.body_start(), b.body_len).unwrap();
        // An abandoned record after c: a body without header.
        seg.file
            .write_all_at(&[9u8; 5000], c.end() + RECORD_HEADER)
            .unwrap();
        let f = File::open(segment_path(dir.path(), 7)).unwrap();
        let salt = read_salt(&f, 7).unwrap().unwrap();
        let s = scan(&f, &salt, 7, 0).unwrap();
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.valid_end, c.end());
        assert!(s.file_len > c.end());
        let m = s.records[0].meta.as_ref().unwrap();
        assert_eq!(m.record.location, a);
        assert_eq!(m.destinations, ["PACS"]);
        assert!(s.records[1].meta.is_none(), "punched body must not verify");
        assert_eq!(s.records[2].seq, 3);
        assert!(s.records[2].meta.is_some());
        // From a watermark on, only what follows it.
        let tail = scan(&f, &salt, 7, b.end()).unwrap();
        assert_eq!(tail.records.len(), 1);
        assert_eq!(tail.records[0].location, c);
        // Another segment's salt validates nothing.
        assert!(scan(&f, &[0; 32], 7, 0).unwrap().records.is_empty());
        assert_eq!(read_salt(&f, 8).unwrap(), None);
    }

    #[test]
    fn a_header_over_torn_content_is_skipped_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        create_layout(dir.path()).unwrap();
        let mut seg = Segment::create(dir.path(), 1).unwrap();
        let a = append(&mut seg, 1, &vec![1u8; 9000]);
        // What a crash can leave: the header on disk, part of the body not.
        seg.file
            .write_all_at(&[0u8; 4096], a.body_start() + 200)
            .unwrap();
        let f = seg.file();
        let salt = read_salt(f, 1).unwrap().unwrap();
        let s = scan(f, &salt, 1, 0).unwrap();
        assert_eq!(s.records.len(), 1);
        assert!(s.records[0].meta.is_none());
        assert_eq!(s.valid_end, a.end());
    }

    #[test]
    fn names_round_trip() {
        let p = segment_path(Path::new("/d"), 0x2a);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_name(name), Some(0x2a));
        assert_eq!(parse_name("../x.seg"), None);
        assert_eq!(parse_name("000000000000002a.dcm"), None);
    }
}
