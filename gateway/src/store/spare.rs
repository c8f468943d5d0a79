//! Spare segments: files already written with zeros to a segment's full length, so that a
//! record written into one does not change the file's size or allocation, and the `fdatasync`
//! before its acknowledgement has only data to write (with an appended record it also writes
//! the inode: about 0.58 against 0.35 ms for a 0.5 MB record, and 0.26 against 0.15 ms for an
//! 8 KB one on the benchmark machine, docs/benchmarks.md).
//!
//! Layout: `segments/spare/<n>.spare`, each exactly [`Spares::file_len`] bytes, written and flushed
//! whole; `segments/spare/making.tmp` while one is being made. [`super::segment::Pool::take`]
//! renames a spare to the next segment's name and writes the segment header into it.
//!
//! Invariants:
//! - A `.spare` file is complete: it got its name only after its zeros were flushed, so its
//!   blocks are allocated and written. A `making.tmp` that failed or was stopped is deleted at
//!   once; any other file in the directory (one a crash interrupted, a file of the wrong
//!   length) is deleted at start-up.
//! - A spare holds nothing: deleting one loses no data (the disk reserve does that first).
//! - Spares are made only while the disk has [`HEADROOM`] free beyond the reserve and the
//!   spare: before READY in a store without segments (the disk is idle then), otherwise only
//!   after [`IDLE_FOR`] without an arriving instance, paced, pausing as soon as one arrives.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::spool;

pub const SPARE_DIR: &str = "spare";
/// Making spares waits for this long without an arriving instance.
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// Spares are made only while the disk has this much free beyond the reserve and the spare.
pub const HEADROOM: u64 = 1 << 30;
/// Beyond a segment's target length: the last record that starts below the target usually
/// ends inside the spare too (group records are < 256 KiB plus their meta).
pub const SLACK: u64 = 1 << 20;
/// Between chunks of a spare made in the background: at most about 100 MiB/s, so that
/// forwarding and other disk users keep most of the disk.
pub const PACE: Duration = Duration::from_millis(10);
const TMP_NAME: &str = "making.tmp";
const CHUNK: usize = 1 << 20;

pub struct Spares {
    dir: PathBuf,
    len: u64,
    ready: Mutex<Vec<PathBuf>>,
    next_name: AtomicU64,
}

impl Spares {
    /// Opens `segments/spare` (creating it), deletes what is not a complete spare of `len`
    /// bytes, and lists the rest. Blocking.
    pub fn open(segments_dir: &Path, len: u64) -> io::Result<Spares> {
        let dir = segments_dir.join(SPARE_DIR);
        fs::create_dir_all(&dir)?;
        let mut ready = Vec::new();
        let mut next = 0u64;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let n = e
                .file_name()
                .to_str()
                .and_then(|s| s.strip_suffix(".spare"))
                .and_then(|s| s.parse::<u64>().ok());
            match n {
                Some(n) if e.metadata()?.len() == len => {
                    next = next.max(n + 1);
                    ready.push(path);
                }
                _ => fs::remove_file(&path)?,
            }
        }
        spool::fsync_dir(&dir)?;
        Ok(Spares {
            dir,
            len,
            ready: Mutex::new(ready),
            next_name: AtomicU64::new(next),
        })
    }

    /// Length of a spare: a segment's target plus [`SLACK`].
    pub fn file_len(&self) -> u64 {
        self.len
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn count(&self) -> usize {
        lock(&self.ready).len()
    }

    /// A ready spare, no longer listed: the caller renames it into place.
    pub fn take(&self) -> Option<PathBuf> {
        lock(&self.ready).pop()
    }

    /// Deletes every ready spare, to give their space back; returns how many. Blocking.
    pub fn release(&self) -> usize {
        let all = std::mem::take(&mut *lock(&self.ready));
        let mut n = 0;
        for p in all {
            if fs::remove_file(&p).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            let _ = spool::fsync_dir(&self.dir);
        }
        n
    }

    /// Writes one spare: zeros in chunks of 1 MiB, `pace` apart, waiting before each while `pause()`
    /// says so and giving up when `stop()` does; then flushes it and gives it its name. Returns
    /// whether a spare was made. An unfinished one is deleted (a full disk keeps no partial
    /// spare). Blocking; one caller at a time.
    pub fn make_one(
        &self,
        pace: Duration,
        pause: &dyn Fn() -> bool,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<bool> {
        let tmp = self.dir.join(TMP_NAME);
        let made = self.write_one(&tmp, pace, pause, stop);
        if !matches!(made, Ok(true)) {
            let _ = fs::remove_file(&tmp);
        }
        made
    }

    fn write_one(
        &self,
        tmp: &Path,
        pace: Duration,
        pause: &dyn Fn() -> bool,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<bool> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        let zeros = vec![0u8; CHUNK];
        let mut at = 0u64;
        while at < self.len {
            while pause() {
                if stop() {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if stop() {
                return Ok(false);
            }
            let n = (self.len - at).min(CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
        file.sync_all()?;
        let name = self.next_name.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{name}.spare"));
        fs::rename(tmp, &path)?;
        spool::fsync_dir(&self.dir)?;
        lock(&self.ready).push(path);
        Ok(true)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a holder panicked; the guarded data is a plain list.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A spare is complete or absent: one stopped half-way leaves no file behind, and the
    /// directory is listed again with only whole spares.
    #[test]
    fn a_spare_is_whole_or_not_there() {
        let dir = tempfile::tempdir().unwrap();
        let len = 3 * CHUNK as u64 + 17;
        let spares = Spares::open(dir.path(), len).unwrap();
        assert!(spares
            .make_one(Duration::ZERO, &|| false, &|| false)
            .unwrap());
        // Stopped after two chunks.
        let chunks = AtomicUsize::new(0);
        let stop = || chunks.fetch_add(1, Ordering::Relaxed) >= 2;
        assert!(!spares.make_one(Duration::ZERO, &|| false, &stop).unwrap());
        let names: Vec<String> = fs::read_dir(spares.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["0.spare".to_owned()]);
        assert_eq!(
            fs::metadata(spares.dir().join("0.spare")).unwrap().len(),
            len
        );
        assert_eq!(spares.count(), 1);
        // Listed again after a restart; taken, it is no longer listed.
        let again = Spares::open(dir.path(), len).unwrap();
        assert_eq!(again.count(), 1);
        assert!(again.take().is_some());
        assert_eq!(again.count(), 0);
    }
}
