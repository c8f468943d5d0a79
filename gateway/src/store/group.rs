//! Group commit of small instances: one shared segment, one `fdatasync` and one index commit
//! for every record appended while the previous flush ran.
//!
//! An instance whose whole record is in memory when its last fragment arrives (see
//! [`super::Ingest`]) is appended here in one write, under the lock, so the shared segment only
//! ever holds whole records back to back, in the order of their sequence numbers. The first
//! waiter that finds no flush running becomes the leader: it takes every record appended so
//! far, flushes the segment, indexes them in file order in one transaction, frees the bodies of
//! duplicates, and answers each; records appended meanwhile go to the next leader.
//!
//! Invariants (docs/durability.md):
//! - A record is answered only after a flush that began after its write returned.
//! - Records are indexed in file order, batch after batch, so the segment's `indexed_end` only
//!   ever covers a prefix of records that are all indexed.
//! - A failed write or flush stops the gateway (`on_fatal`); every waiter gets an error, and no
//!   record is appended after it.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::index::{CommitOutcome, IndexHandle, Pending};
use super::segment::{self, Location, Pool, Segment};
use super::StoreError;

/// The outcome of a record, or why it failed (a flush or the index).
type Answer = Result<(CommitOutcome, Location), String>;

#[derive(Default)]
pub struct GroupLog {
    state: Mutex<State>,
    flushed: Condvar,
}

#[derive(Default)]
struct State {
    segment: Option<Segment>,
    /// The segment's file, for the leader to flush and punch without the lock.
    file: Option<Arc<File>>,
    /// Records written but not yet flushed, in file order.
    unflushed: Vec<(Pending, Arc<OnceLock<Answer>>)>,
    /// A leader is flushing and indexing.
    leading: bool,
    /// Set by a failed write or flush: nothing is appended any more.
    failed: Option<String>,
}

impl GroupLog {
    /// Appends `record` (a record header's worth of space, the body, then `meta_len` bytes of
    /// meta) and returns once it is flushed and indexed with the outcome of `pending`.
    /// Blocking.
    pub fn commit(
        &self,
        pool: &Pool,
        index: &IndexHandle,
        on_fatal: &dyn Fn(),
        record: &mut [u8],
        meta_len: u32,
        mut pending: Pending,
    ) -> Result<(CommitOutcome, Location), StoreError> {
        let answer = Arc::new(OnceLock::new());
        let mut st = self.lock();
        // A full segment is closed once everything in it is flushed; records wait for that.
        while st.segment.as_ref().is_some_and(|s| pool.is_full(s)) {
            failed(&st)?;
            if st.leading || !st.unflushed.is_empty() {
                if st.leading {
                    st = self.wait(st);
                } else {
                    st = self.lead(st, index, on_fatal);
                }
                continue;
            }
            st.file = None;
            if let Some(s) = st.segment.take() {
                pool.give_back(s);
            }
        }
        failed(&st)?;
        if st.segment.is_none() {
            let s = pool.take().map_err(|source| StoreError::Io {
                path: pool.dir(),
                source,
            })?;
            let file = s.file().try_clone().map_err(|source| StoreError::Io {
                path: s.path().to_path_buf(),
                source,
            })?;
            st.file = Some(Arc::new(file));
            st.segment = Some(s);
        }
        let Some(seg) = st.segment.as_mut() else {
            return Err(StoreError::Task {
                message: "group segment missing".into(),
            });
        };
        // Sequence numbers follow file order (recovery applies records in sequence order).
        match seg.append(pool.next_seq(), record, meta_len) {
            Ok(loc) => pending.record.location = loc,
            Err(source) => {
                let path = seg.path().to_path_buf();
                // Part of a record may be in the file: the segment takes nothing more.
                st.failed = Some(format!("writing to {} failed: {source}", path.display()));
                drop(st);
                on_fatal();
                return Err(StoreError::Io { path, source });
            }
        }
        st.unflushed.push((pending, answer.clone()));
        loop {
            if let Some(a) = answer.get() {
                return a.clone().map_err(|message| StoreError::Index { message });
            }
            failed(&st)?;
            st = if st.leading {
                self.wait(st)
            } else {
                self.lead(st, index, on_fatal)
            };
        }
    }

    /// Flushes and indexes every record written so far, and answers them.
    fn lead<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        index: &IndexHandle,
        on_fatal: &dyn Fn(),
    ) -> MutexGuard<'a, State> {
        let batch = std::mem::take(&mut st.unflushed);
        let Some(file) = st.file.clone() else {
            for (_, answer) in batch {
                let _ = answer.set(Err("records without a segment".into()));
            }
            return st;
        };
        st.leading = true;
        drop(st);
        let mut failure = None;
        match file.sync_data() {
            Err(e) => {
                let msg = format!("flushing a segment failed: {e}");
                for (_, answer) in batch {
                    let _ = answer.set(Err(msg.clone()));
                }
                failure = Some(msg);
                on_fatal();
            }
            Ok(()) => {
                let (pendings, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let locations: Vec<Location> = pendings.iter().map(|p| p.record.location).collect();
                let results = index.commit_all(pendings);
                for ((r, loc), answer) in results.into_iter().zip(locations).zip(answers) {
                    if r == Ok(CommitOutcome::Duplicate) {
                        // Never referenced: free the body's space now (recovery skips it).
                        if let Err(e) = segment::punch(&file, loc.body_start(), loc.body_len) {
                            log::warn!(segment = loc.segment, error:% = e; "cannot free the space of a duplicate record");
                        }
                    }
                    let _ = answer.set(r.map(|o| (o, loc)));
                }
            }
        }
        let mut st = self.lock();
        st.leading = false;
        if st.failed.is_none() {
            st.failed = failure;
        }
        self.flushed.notify_all();
        st
    }

    fn wait<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.flushed
            .wait(st)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn failed(st: &State) -> Result<(), StoreError> {
    match &st.failed {
        Some(message) => Err(StoreError::Index {
            message: format!("the spool stopped after an earlier failure: {message}"),
        }),
        None => Ok(()),
    }
}
