//! The forwarding queue in redb: one entry per (destination, instance).
//!
//! States (DESIGN.md section 3): pending → in flight → delivered, or failed; failed → pending
//! by operator retry. Entries are created in the same durable commit that indexes the instance
//! ([`enqueue`] runs inside the ingest commit's transaction), so an acknowledged instance never
//! exists without its queue entries.
//!
//! Tables (key → value):
//! - `queue`: (destination, SOP Instance UID) → [`Entry`] (postcard)
//! - `ready`: (destination, rank, seq) → SOP Instance UID: the pending entries in send order;
//!   rank 0 is priority HIGH, 1 the rest; seq is the arrival order, so a study sent together
//!   stays together.
//! - `inflight`: (destination, seq) → SOP Instance UID: leased entries. Returned to `ready` at
//!   start-up ([`recover_in_flight`]).
//! - `failed`: (destination, seq) → SOP Instance UID: the dead-letter queue.
//! - `queue_stats`: destination → [`Counts`] (postcard), kept in step by every transaction.
//!
//! Leases are committed without fsync (`Durability::None`): a lease lost in a crash leaves the
//! entry in `ready`, which is what recovery would do anyway. Completions are durable.

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::index::{self, IndexResult, InstanceRecord};
use super::now_ms;

const QUEUE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("queue");
const READY: TableDefinition<(&str, u8, u64), &str> = TableDefinition::new("ready");
const INFLIGHT: TableDefinition<(&str, u64), &str> = TableDefinition::new("inflight");
const FAILED: TableDefinition<(&str, u64), &str> = TableDefinition::new("failed");
const STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("queue_stats");
const SEQ: TableDefinition<&str, u64> = TableDefinition::new("queue_seq");

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum State {
    Pending,
    InFlight,
    Delivered,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    pub seq: u64,
    pub rank: u8,
    pub enqueued_ms: u64,
    pub updated_ms: u64,
    pub attempts: u32,
    /// DIMSE status of the last attempt, if one came back.
    pub last_status: Option<u16>,
    /// Why the last attempt did not deliver; empty after success.
    pub last_error: String,
    /// Set when a new version of the instance arrived while this entry was in flight: the
    /// completion puts it back to pending instead of delivered.
    pub resend: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Pending and in flight.
    pub pending: u64,
    pub failed: u64,
    pub delivered: u64,
}

/// What the forwarder decided for one leased entry.
#[derive(Clone, Debug)]
pub enum Completion {
    Delivered {
        status: u16,
    },
    /// Back to pending; `attempted`: something was sent (counts as an attempt).
    Retry {
        status: Option<u16>,
        error: String,
        attempted: bool,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// A leased entry with what the sender needs.
#[derive(Clone, Debug)]
pub struct Lease {
    pub sop_instance_uid: String,
    pub seq: u64,
    pub rank: u8,
    pub record: InstanceRecord,
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Creates the tables (at open) so read transactions never find them missing.
pub fn create_tables(txn: &WriteTransaction) -> IndexResult<()> {
    txn.open_table(QUEUE).map_err(err)?;
    txn.open_table(READY).map_err(err)?;
    txn.open_table(INFLIGHT).map_err(err)?;
    txn.open_table(FAILED).map_err(err)?;
    txn.open_table(STATS).map_err(err)?;
    txn.open_table(SEQ).map_err(err)?;
    Ok(())
}

fn next_seq(txn: &WriteTransaction) -> IndexResult<u64> {
    let mut t = txn.open_table(SEQ).map_err(err)?;
    let n = t.get("next").map_err(err)?.map_or(1, |v| v.value());
    t.insert("next", n + 1).map_err(err)?;
    Ok(n)
}

fn adjust(txn: &WriteTransaction, dest: &str, f: impl FnOnce(&mut Counts)) -> IndexResult<()> {
    let mut t = txn.open_table(STATS).map_err(err)?;
    let mut c: Counts = t
        .get(dest)
        .map_err(err)?
        .and_then(|v| postcard::from_bytes(v.value()).ok())
        .unwrap_or_default();
    f(&mut c);
    let bytes = postcard::to_stdvec(&c).map_err(err)?;
    t.insert(dest, bytes.as_slice()).map_err(err)?;
    Ok(())
}

fn get_entry(txn: &WriteTransaction, dest: &str, sop: &str) -> IndexResult<Option<Entry>> {
    let t = txn.open_table(QUEUE).map_err(err)?;
    let v = t.get((dest, sop)).map_err(err)?;
    Ok(v.and_then(|v| postcard::from_bytes(v.value()).ok()))
}

fn put_entry(txn: &WriteTransaction, dest: &str, sop: &str, e: &Entry) -> IndexResult<()> {
    let bytes = postcard::to_stdvec(e).map_err(err)?;
    txn.open_table(QUEUE)
        .map_err(err)?
        .insert((dest, sop), bytes.as_slice())
        .map_err(err)?;
    Ok(())
}

/// Queues `sop` for each destination (inside the ingest transaction). An entry that exists
/// already (a new version of the instance) goes back to pending; one in flight is marked for
/// resending.
pub fn enqueue(
    txn: &WriteTransaction,
    sop: &str,
    destinations: &[String],
    high_priority: bool,
) -> IndexResult<()> {
    let now = now_ms();
    let rank = u8::from(!high_priority);
    for dest in destinations {
        let d = dest.as_str();
        let existing = get_entry(txn, d, sop)?;
        match existing {
            Some(mut e) if e.state == State::InFlight => {
                e.resend = true;
                put_entry(txn, d, sop, &e)?;
            }
            Some(e) if e.state == State::Pending => {}
            other => {
                if let Some(old) = &other {
                    if old.state == State::Failed {
                        txn.open_table(FAILED)
                            .map_err(err)?
                            .remove((d, old.seq))
                            .map_err(err)?;
                    }
                    let was = old.state;
                    adjust(txn, d, |c| match was {
                        State::Failed => c.failed = c.failed.saturating_sub(1),
                        _ => c.delivered = c.delivered.saturating_sub(1),
                    })?;
                }
                let seq = next_seq(txn)?;
                let e = Entry {
                    state: State::Pending,
                    seq,
                    rank,
                    enqueued_ms: now,
                    updated_ms: now,
                    attempts: 0,
                    last_status: None,
                    last_error: String::new(),
                    resend: false,
                };
                put_entry(txn, d, sop, &e)?;
                txn.open_table(READY)
                    .map_err(err)?
                    .insert((d, rank, seq), sop)
                    .map_err(err)?;
                adjust(txn, d, |c| c.pending += 1)?;
            }
        }
    }
    Ok(())
}

/// Moves every in-flight entry back to pending (start-up).
pub fn recover_in_flight(db: &Database) -> IndexResult<usize> {
    let txn = db.begin_write().map_err(err)?;
    let mut moved = 0;
    {
        let mut inflight = txn.open_table(INFLIGHT).map_err(err)?;
        let items: Vec<(String, u64, String)> = inflight
            .iter()
            .map_err(err)?
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let (d, s) = k.value();
                (d.to_owned(), s, v.value().to_owned())
            })
            .collect();
        for (d, seq, _) in &items {
            inflight.remove((d.as_str(), *seq)).map_err(err)?;
        }
        drop(inflight);
        for (d, _, sop) in items {
            if let Some(mut e) = get_entry(&txn, &d, &sop)? {
                e.state = State::Pending;
                e.resend = false;
                put_entry(&txn, &d, &sop, &e)?;
                txn.open_table(READY)
                    .map_err(err)?
                    .insert((d.as_str(), e.rank, e.seq), sop.as_str())
                    .map_err(err)?;
                moved += 1;
            }
        }
    }
    txn.commit().map_err(err)?;
    Ok(moved)
}

/// Leases up to `max` pending entries of `dest`, oldest first within priority, and at most a
/// `share`-th (rounded up) of the entries pending or in flight: so that `share` workers split
/// a short backlog between them instead of the first taking all of it.
pub fn lease(db: &Database, dest: &str, max: usize, share: usize) -> IndexResult<Vec<Lease>> {
    let mut txn = db.begin_write().map_err(err)?;
    // A lost lease leaves the entry pending: no fsync needed (see the module doc).
    txn.set_durability(Durability::None).map_err(err)?;
    let mut out = Vec::new();
    {
        let pending = txn
            .open_table(STATS)
            .map_err(err)?
            .get(dest)
            .map_err(err)?
            .and_then(|v| postcard::from_bytes::<Counts>(v.value()).ok())
            .map_or(0, |c| c.pending);
        let fair = usize::try_from(pending.div_ceil(share.max(1) as u64)).unwrap_or(usize::MAX);
        let max = max.min(fair.max(1));
        let mut ready = txn.open_table(READY).map_err(err)?;
        let keys: Vec<(u8, u64, String)> = ready
            .range((dest, 0u8, 0u64)..=(dest, u8::MAX, u64::MAX))
            .map_err(err)?
            .take(max)
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let (_, r, s) = k.value();
                (r, s, v.value().to_owned())
            })
            .collect();
        let mut inflight = txn.open_table(INFLIGHT).map_err(err)?;
        for (rank, seq, sop) in keys {
            ready.remove((dest, rank, seq)).map_err(err)?;
            let Some(record) = index::existing(&txn, &sop)? else {
                // The instance row is gone (purged): drop the orphan entry.
                txn.open_table(QUEUE)
                    .map_err(err)?
                    .remove((dest, sop.as_str()))
                    .map_err(err)?;
                adjust(&txn, dest, |c| c.pending = c.pending.saturating_sub(1))?;
                continue;
            };
            inflight.insert((dest, seq), sop.as_str()).map_err(err)?;
            if let Some(mut e) = get_entry(&txn, dest, &sop)? {
                e.state = State::InFlight;
                e.updated_ms = now_ms();
                put_entry(&txn, dest, &sop, &e)?;
            }
            out.push(Lease {
                sop_instance_uid: sop,
                seq,
                rank,
                record,
            });
        }
    }
    txn.commit().map_err(err)?;
    Ok(out)
}

/// Records the outcome of leased entries in one durable transaction. `give_up_after_ms`:
/// entries retried for longer than this are failed instead.
pub fn complete(
    db: &Database,
    dest: &str,
    results: &[(Lease, Completion)],
    give_up_after_ms: Option<u64>,
) -> IndexResult<()> {
    let txn = db.begin_write().map_err(err)?;
    let now = now_ms();
    for (lease, outcome) in results {
        let sop = lease.sop_instance_uid.as_str();
        txn.open_table(INFLIGHT)
            .map_err(err)?
            .remove((dest, lease.seq))
            .map_err(err)?;
        let Some(mut e) = get_entry(&txn, dest, sop)? else {
            continue;
        };
        e.updated_ms = now;
        if !matches!(
            outcome,
            Completion::Retry {
                attempted: false,
                ..
            }
        ) {
            e.attempts = e.attempts.saturating_add(1);
        }
        let mut outcome = outcome.clone();
        if e.resend {
            outcome = Completion::Retry {
                status: None,
                error: "a new version arrived during the transfer".into(),
                attempted: false,
            };
            e.resend = false;
            e.attempts = 0;
        }
        if let (Completion::Retry { status, error, .. }, Some(limit)) = (&outcome, give_up_after_ms)
        {
            if now.saturating_sub(e.enqueued_ms) > limit {
                outcome = Completion::Failed {
                    status: *status,
                    error: format!(
                        "gave up after {} h of retries; last error: {error}",
                        limit / 3_600_000
                    ),
                };
            }
        }
        match outcome {
            Completion::Delivered { status } => {
                e.state = State::Delivered;
                e.last_status = Some(status);
                e.last_error.clear();
                adjust(&txn, dest, |c| {
                    c.pending = c.pending.saturating_sub(1);
                    c.delivered += 1;
                })?;
            }
            Completion::Retry { status, error, .. } => {
                e.state = State::Pending;
                e.last_status = status;
                e.last_error = error;
                txn.open_table(READY)
                    .map_err(err)?
                    .insert((dest, e.rank, e.seq), sop)
                    .map_err(err)?;
            }
            Completion::Failed { status, error } => {
                e.state = State::Failed;
                e.last_status = status;
                e.last_error = error;
                txn.open_table(FAILED)
                    .map_err(err)?
                    .insert((dest, e.seq), sop)
                    .map_err(err)?;
                adjust(&txn, dest, |c| {
                    c.pending = c.pending.saturating_sub(1);
                    c.failed += 1;
                })?;
            }
        }
        put_entry(&txn, dest, sop, &e)?;
    }
    txn.commit().map_err(err)
}

/// Per-destination counts and the age of the oldest pending entry.
pub fn stats(db: &Database, dest: &str) -> IndexResult<(Counts, Option<u64>)> {
    let txn = db.begin_read().map_err(err)?;
    let counts: Counts = txn
        .open_table(STATS)
        .map_err(err)?
        .get(dest)
        .map_err(err)?
        .and_then(|v| postcard::from_bytes(v.value()).ok())
        .unwrap_or_default();
    let queue = txn.open_table(QUEUE).map_err(err)?;
    let mut oldest: Option<u64> = None;
    let ready = txn.open_table(READY).map_err(err)?;
    let inflight = txn.open_table(INFLIGHT).map_err(err)?;
    let mut firsts = Vec::new();
    for rank in [0u8, 1u8] {
        if let Some(Ok((_, v))) = ready
            .range((dest, rank, 0u64)..=(dest, rank, u64::MAX))
            .map_err(err)?
            .next()
        {
            firsts.push(v.value().to_owned());
        }
    }
    if let Some(Ok((_, v))) = inflight
        .range((dest, 0u64)..=(dest, u64::MAX))
        .map_err(err)?
        .next()
    {
        firsts.push(v.value().to_owned());
    }
    for sop in firsts {
        if let Some(v) = queue.get((dest, sop.as_str())).map_err(err)? {
            if let Ok(e) = postcard::from_bytes::<Entry>(v.value()) {
                oldest = Some(oldest.map_or(e.enqueued_ms, |o| o.min(e.enqueued_ms)));
            }
        }
    }
    Ok((counts, oldest))
}

/// Queue entries of one state (or all), optionally for one destination, at most `limit`.
pub fn list(
    db: &Database,
    dest: Option<&str>,
    state: Option<State>,
    limit: usize,
) -> IndexResult<Vec<(String, String, Entry)>> {
    let txn = db.begin_read().map_err(err)?;
    let mut out = Vec::new();
    if state == Some(State::Failed) {
        // The failed table is small and ordered; no full scan.
        let failed = txn.open_table(FAILED).map_err(err)?;
        let queue = txn.open_table(QUEUE).map_err(err)?;
        for row in failed.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (d, _) = k.value();
            if dest.is_some_and(|x| x != d) {
                continue;
            }
            let sop = v.value().to_owned();
            if let Some(ev) = queue.get((d, sop.as_str())).map_err(err)? {
                if let Ok(e) = postcard::from_bytes(ev.value()) {
                    out.push((d.to_owned(), sop, e));
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        return Ok(out);
    }
    let queue = txn.open_table(QUEUE).map_err(err)?;
    for row in queue.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        let (d, sop) = k.value();
        if dest.is_some_and(|x| x != d) {
            continue;
        }
        let Ok(e) = postcard::from_bytes::<Entry>(v.value()) else {
            continue;
        };
        if state.is_none_or(|s| s == e.state) {
            out.push((d.to_owned(), sop.to_owned(), e));
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Queue entries of one instance (every destination).
pub fn entries_of(
    db: &Database,
    sop: &str,
    destinations: &[String],
) -> IndexResult<Vec<(String, Entry)>> {
    let txn = db.begin_read().map_err(err)?;
    let queue = txn.open_table(QUEUE).map_err(err)?;
    let mut out = Vec::new();
    for d in destinations {
        if let Some(v) = queue.get((d.as_str(), sop)).map_err(err)? {
            if let Ok(e) = postcard::from_bytes(v.value()) {
                out.push((d.clone(), e));
            }
        }
    }
    Ok(out)
}

/// Which failed entries an operator command applies to.
pub struct Selector<'a> {
    pub dest: Option<&'a str>,
    pub sop: Option<&'a str>,
}

fn select_failed(
    txn: &WriteTransaction,
    sel: &Selector<'_>,
) -> IndexResult<Vec<(String, u64, String)>> {
    let failed = txn.open_table(FAILED).map_err(err)?;
    let mut out = Vec::new();
    for row in failed.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        let (d, seq) = k.value();
        let sop = v.value();
        if sel.dest.is_some_and(|x| x != d) || sel.sop.is_some_and(|x| x != sop) {
            continue;
        }
        out.push((d.to_owned(), seq, sop.to_owned()));
    }
    Ok(out)
}

/// Operator retry: failed entries back to pending. Returns how many, and the destinations.
pub fn retry_failed(db: &Database, sel: &Selector<'_>) -> IndexResult<(usize, Vec<String>)> {
    let txn = db.begin_write().map_err(err)?;
    let items = select_failed(&txn, sel)?;
    let mut dests = Vec::new();
    for (d, seq, sop) in &items {
        txn.open_table(FAILED)
            .map_err(err)?
            .remove((d.as_str(), *seq))
            .map_err(err)?;
        if let Some(mut e) = get_entry(&txn, d, sop)? {
            e.state = State::Pending;
            e.attempts = 0;
            e.enqueued_ms = now_ms();
            e.updated_ms = e.enqueued_ms;
            put_entry(&txn, d, sop, &e)?;
            txn.open_table(READY)
                .map_err(err)?
                .insert((d.as_str(), e.rank, e.seq), sop.as_str())
                .map_err(err)?;
            adjust(&txn, d, |c| {
                c.failed = c.failed.saturating_sub(1);
                c.pending += 1;
            })?;
        }
        if !dests.contains(d) {
            dests.push(d.clone());
        }
    }
    txn.commit().map_err(err)?;
    Ok((items.len(), dests))
}

/// Operator purge: failed entries are dropped (the instance stays in the cache).
pub fn purge_failed(db: &Database, sel: &Selector<'_>) -> IndexResult<usize> {
    let txn = db.begin_write().map_err(err)?;
    let items = select_failed(&txn, sel)?;
    for (d, seq, sop) in &items {
        txn.open_table(FAILED)
            .map_err(err)?
            .remove((d.as_str(), *seq))
            .map_err(err)?;
        txn.open_table(QUEUE)
            .map_err(err)?
            .remove((d.as_str(), sop.as_str()))
            .map_err(err)?;
        adjust(&txn, d, |c| c.failed = c.failed.saturating_sub(1))?;
    }
    txn.commit().map_err(err)?;
    Ok(items.len())
}

/// Whether any entry of `sop` is pending, in flight or failed (it must not be evicted).
pub fn has_open_entries(
    txn: &WriteTransaction,
    sop: &str,
    destinations: &[String],
) -> IndexResult<bool> {
    for d in destinations {
        if let Some(e) = get_entry(txn, d, sop)? {
            if e.state != State::Delivered {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Removes the delivered entries of an evicted instance (keeping the delivered counts).
pub fn remove_delivered(
    txn: &WriteTransaction,
    sop: &str,
    destinations: &[String],
) -> IndexResult<()> {
    let mut q = txn.open_table(QUEUE).map_err(err)?;
    for d in destinations {
        q.remove((d.as_str(), sop)).map_err(err)?;
    }
    Ok(())
}

/// Destinations that have queue statistics (configured now or in the past).
pub fn known_destinations(db: &Database) -> IndexResult<Vec<String>> {
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(STATS).map_err(err)?;
    let mut out = Vec::new();
    for row in t.iter().map_err(err)? {
        let (k, _) = row.map_err(err)?;
        out.push(k.value().to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
