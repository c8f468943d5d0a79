//! Store-and-forward: per-destination workers lease due queue entries, send them through
//! [`upstream`], and record delivered / retry / failed (DESIGN.md section 3).
//!
//! Per destination, `max_associations` workers each keep one association open while there is
//! work and release it after `idle_close`. Workers share the destination's link state: after a
//! connection-level failure the destination backs off (exponential, with jitter) and the next
//! attempt is one probe per worker, not one per instance. One slow or dead destination never
//! holds up another: each has its own workers and its own part of the queue.
//!
//! At shutdown a worker stops between instances; what it leased goes back to pending.

pub mod status;
pub mod upstream;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::Database;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Destination;
use crate::store::now_ms;
use crate::store::queue::{self, Completion, Lease};
use crate::store::spool::SpoolSlice;
use status::Disposition;
use upstream::{Offer, Upstream};

/// Entries leased at once by one worker.
const BATCH: usize = 32;
/// Outcomes are made durable after this many instances or bytes at the latest.
const RECORD_EVERY: usize = 8;
const RECORD_BYTES: u64 = 64 * 1024 * 1024;

/// An entry that was leased but not sent: back to pending, no attempt counted.
fn not_sent(why: &str) -> Completion {
    Completion::Retry {
        status: None,
        error: why.to_owned(),
        attempted: false,
    }
}
/// An idle worker looks at the queue at least this often (entries returned by a retry).
const IDLE_POLL: Duration = Duration::from_secs(5);

/// What status reports about a destination's link.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkStatus {
    /// None until the first attempt.
    pub up: Option<bool>,
    pub last_error: Option<String>,
    /// Unix ms of the last change of `up`.
    pub since_ms: u64,
    /// Current backoff in ms (0 while up).
    pub backoff_ms: u64,
    pub open_associations: u32,
    pub delivered_since_start: u64,
    pub failed_since_start: u64,
}

struct Link {
    status: LinkStatus,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// One destination's runtime state, shared by its workers and the control socket.
pub struct DestRuntime {
    pub config: Destination,
    wake: Notify,
    link: Mutex<Link>,
    /// Unix ms of the last turn of any worker loop; every step of a worker is bounded by a
    /// timeout, so a stale heartbeat means a stuck forwarder.
    heartbeat: std::sync::atomic::AtomicU64,
}

impl DestRuntime {
    fn beat(&self) {
        self.heartbeat
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the workers turned recently enough (watchdog).
    pub fn is_alive(&self) -> bool {
        let limit = 2 * (self.config.dimse_timeout + self.config.connect_timeout) + 3 * IDLE_POLL;
        let age =
            now_ms().saturating_sub(self.heartbeat.load(std::sync::atomic::Ordering::Relaxed));
        u128::from(age) <= limit.as_millis()
    }

    pub fn link_status(&self) -> LinkStatus {
        self.link
            .lock()
            .map(|l| l.status.clone())
            .unwrap_or_default()
    }

    /// Wakes one idle worker (new work was committed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn with_link<T>(&self, f: impl FnOnce(&mut Link) -> T) -> Option<T> {
        self.link.lock().ok().map(|mut l| f(&mut l))
    }

    /// How long to wait before the next attempt, if the destination is backing off.
    fn wait_time(&self) -> Option<Duration> {
        self.with_link(|l| {
            l.next_attempt
                .and_then(|t| t.checked_duration_since(Instant::now()))
        })
        .flatten()
    }

    fn record_up(&self) {
        let name = &self.config.name;
        self.with_link(|l| {
            if l.status.up != Some(true) {
                log::info!(destination:% = name, address:% = self.config.address; "destination reachable: forwarding");
                l.status.up = Some(true);
                l.status.since_ms = now_ms();
            }
            l.status.last_error = None;
            l.backoff = Duration::ZERO;
            l.status.backoff_ms = 0;
            l.next_attempt = None;
        });
    }

    /// A connection-level failure or a PACS out of resources: back off, once per window.
    fn record_failure(&self, error: &str, slow: bool) {
        let cfg = &self.config;
        self.with_link(|l| {
            let now = Instant::now();
            if l.next_attempt.is_some_and(|t| t > now) {
                // Another worker already started this backoff window.
                return;
            }
            l.backoff = if slow {
                cfg.retry_max
            } else if l.backoff.is_zero() {
                cfg.retry_initial
            } else {
                (l.backoff * 2).min(cfg.retry_max)
            };
            let delay = jitter(l.backoff);
            l.next_attempt = Some(now + delay);
            l.status.backoff_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            if l.status.up != Some(false) || l.status.last_error.as_deref() != Some(error) {
                log::warn!(
                    destination:% = cfg.name, address:% = cfg.address, called_ae:% = cfg.ae_title, reason:% = error;
                    "destination unavailable: instances stay queued; next attempt in {:.0} s", delay.as_secs_f64()
                );
            }
            if l.status.up != Some(false) {
                l.status.since_ms = now_ms();
            }
            l.status.up = Some(false);
            l.status.last_error = Some(error.to_owned());
        });
    }

    fn count(&self, delivered: u64, failed: u64) {
        self.with_link(|l| {
            l.status.delivered_since_start += delivered;
            l.status.failed_since_start += failed;
        });
    }

    fn associations(&self, delta: i32) {
        self.with_link(|l| {
            l.status.open_associations = l.status.open_associations.saturating_add_signed(delta);
        });
    }
}

/// "Equal jitter": between half and all of `d`, so that workers and gateways spread out.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let r = f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(0.5 + 0.5 * r)
}

/// The destinations' runtime state, by name.
#[derive(Clone, Default)]
pub struct Destinations {
    by_name: Arc<HashMap<String, Arc<DestRuntime>>>,
    order: Arc<Vec<String>>,
}

impl Destinations {
    pub fn new(configs: &[Destination]) -> Self {
        let by_name = configs
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    Arc::new(DestRuntime {
                        config: c.clone(),
                        wake: Notify::new(),
                        link: Mutex::new(Link {
                            status: LinkStatus::default(),
                            next_attempt: None,
                            backoff: Duration::ZERO,
                        }),
                        heartbeat: std::sync::atomic::AtomicU64::new(now_ms()),
                    }),
                )
            })
            .collect();
        Destinations {
            by_name: Arc::new(by_name),
            order: Arc::new(configs.iter().map(|c| c.name.clone()).collect()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<DestRuntime>> {
        self.by_name.get(name)
    }

    /// In configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<DestRuntime>> {
        self.order.iter().filter_map(|n| self.by_name.get(n))
    }

    pub fn wake(&self, name: &str) {
        if let Some(d) = self.by_name.get(name) {
            d.wake();
        }
    }
}

/// Starts every destination's workers on `tracker`.
pub fn start(
    dests: &Destinations,
    db: Arc<Database>,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    for d in dests.iter() {
        for id in 0..d.config.max_associations {
            let w = Worker {
                dest: d.clone(),
                db: db.clone(),
                data_dir: data_dir.clone(),
                shutdown: shutdown.clone(),
                id,
            };
            tracker.spawn(w.run());
        }
        // Work may be queued from before this start.
        d.wake();
    }
}

struct Worker {
    dest: Arc<DestRuntime>,
    db: Arc<Database>,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    id: u32,
}

impl Worker {
    async fn run(self) {
        let cfg = &self.dest.config;
        let mut conn: Option<Upstream> = None;
        let mut last_used = Instant::now();
        let mut recording = Recording::default();
        while !self.shutdown.is_cancelled() {
            self.dest.beat();
            if let Some(wait) = self.dest.wait_time() {
                // Sleep in short steps so the heartbeat stays fresh through long backoffs.
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait.min(IDLE_POLL)) => {}
                }
                continue;
            }
            let leases = match self.lease().await {
                Ok(l) => l,
                Err(e) => {
                    log::error!(destination:% = cfg.name, error:% = e; "cannot read the queue");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            if leases.is_empty() {
                let idle_left = cfg
                    .idle_close
                    .checked_sub(last_used.elapsed())
                    .unwrap_or_default();
                let poll = if conn.is_some() {
                    idle_left.min(IDLE_POLL)
                } else {
                    IDLE_POLL
                };
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    () = self.dest.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
                if conn.is_some() && last_used.elapsed() >= cfg.idle_close {
                    self.close(conn.take()).await;
                }
                continue;
            }
            // Another worker may have work too (a lease takes at most its share, or a batch).
            self.dest.wake();
            let results = self.send_batch(&mut conn, leases, &mut recording).await;
            self.dest.beat();
            last_used = Instant::now();
            self.record(results, &mut recording).await;
        }
        recording.finish().await;
        self.close(conn).await;
    }

    async fn lease(&self) -> Result<Vec<Lease>, String> {
        let (db, name) = (self.db.clone(), self.dest.config.name.clone());
        let share = self.dest.config.max_associations as usize;
        tokio::task::spawn_blocking(move || queue::lease(&db, &name, BATCH, share))
            .await
            .map_err(|e| e.to_string())?
    }

    async fn close(&self, conn: Option<Upstream>) {
        if let Some(c) = conn {
            c.release().await;
            self.dest.associations(-1);
            log::debug!(destination:% = self.dest.config.name, worker = self.id; "association released");
        }
    }

    /// Sends a batch on `conn` (opening or replacing it as needed); every lease gets an outcome.
    /// `recording`: the commit of outcomes still running; it is awaited before the next one
    /// starts, so a worker has at most one in flight and they land in order.
    async fn send_batch(
        &self,
        conn: &mut Option<Upstream>,
        leases: Vec<Lease>,
        recording: &mut Recording,
    ) -> Vec<(Lease, Completion)> {
        let cfg = &self.dest.config;
        let offers: BTreeSet<(String, String)> = leases
            .iter()
            .map(|l| {
                (
                    l.record.sop_class_uid.clone(),
                    l.record.transfer_syntax.clone(),
                )
            })
            .collect();
        if conn
            .as_ref()
            .is_some_and(|c| !offers.iter().all(|(s, t)| c.can_send(s, t)))
        {
            self.close(conn.take()).await;
        }
        if conn.is_none() {
            let offers: Vec<Offer> = offers
                .into_iter()
                .map(|(sop_class_uid, transfer_syntax)| Offer {
                    sop_class_uid,
                    transfer_syntax,
                })
                .collect();
            match Upstream::connect(cfg, &offers).await {
                Ok(c) => {
                    self.dest.record_up();
                    self.dest.associations(1);
                    *conn = Some(c);
                }
                Err(e) => {
                    let text = e.to_string();
                    self.dest
                        .record_failure(&text, status::is_configuration_error(&e));
                    return leases.into_iter().map(|l| (l, not_sent(&text))).collect();
                }
            }
        }
        let mut results = Vec::with_capacity(leases.len());
        let mut unrecorded_bytes = 0u64;
        let mut rest = leases.into_iter().peekable();
        // The next instance, opened and its first batch read while the current one is answered.
        let mut prefetched: Option<(String, PrepareResult)> = None;
        while let Some(lease) = rest.next() {
            // Outcomes are recorded every few instances, not once per batch, so that a crash
            // re-sends little that was already delivered.
            if results.len() >= RECORD_EVERY || unrecorded_bytes >= RECORD_BYTES {
                self.record(std::mem::take(&mut results), recording).await;
                unrecorded_bytes = 0;
            }
            let Some(c) = conn.as_mut() else {
                results.push((lease, not_sent("association lost")));
                continue;
            };
            if self.shutdown.is_cancelled() {
                results.push((lease, not_sent("gateway stopping")));
                continue;
            }
            let r = &lease.record;
            let Some(ctx) = c.context_id(&r.sop_class_uid, &r.transfer_syntax) else {
                let error = format!(
                    "the PACS accepted no presentation context for {} in {}; transcoding is not supported yet",
                    crate::sop::describe(&r.sop_class_uid),
                    crate::sop::describe(&r.transfer_syntax)
                );
                results.push((
                    lease,
                    Completion::Failed {
                        status: None,
                        error,
                    },
                ));
                continue;
            };
            unrecorded_bytes += r.size;
            let max_data = c.max_data();
            let prepared = match prefetched.take() {
                Some((sop, p)) if sop == lease.sop_instance_uid => p,
                _ => {
                    let source = SpoolSlice::of(&self.data_dir, &r.location);
                    upstream::prepare(source, ctx, max_data).await
                }
            };
            // The next instance is prepared while this one is sent and answered.
            let next = rest.peek().and_then(|l| {
                let ctx = c.context_id(&l.record.sop_class_uid, &l.record.transfer_syntax)?;
                let source = SpoolSlice::of(&self.data_dir, &l.record.location);
                Some((l.sop_instance_uid.clone(), source, ctx))
            });
            // PS3.7 section 9.1.1.1: Priority HIGH = 0x0001, MEDIUM = 0x0000.
            let priority = if lease.rank == 0 { 0x0001 } else { 0x0000 };
            let (stored, next) = tokio::join!(c.store_prepared(prepared, priority), async {
                match next {
                    Some((sop, source, ctx)) => {
                        Some((sop, upstream::prepare(source, ctx, max_data).await))
                    }
                    None => None,
                }
            });
            prefetched = next;
            let (outcome, stop_batch) = match stored {
                Ok(rsp) => {
                    let status = rsp.status;
                    let text = || status::describe_response(status, rsp.comment.as_deref());
                    match status::classify_status(status) {
                        Disposition::Delivered => (Completion::Delivered { status }, None),
                        Disposition::Failed => (
                            Completion::Failed {
                                status: Some(status),
                                error: text(),
                            },
                            None,
                        ),
                        Disposition::Retry => {
                            // The PACS is out of resources: stop this batch, back off.
                            let error = text();
                            self.dest.record_failure(&error, false);
                            let r = Completion::Retry {
                                status: Some(status),
                                error,
                                attempted: true,
                            };
                            (r, Some("PACS busy".to_owned()))
                        }
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    let outcome = match status::classify_error(&e) {
                        Disposition::Failed => Completion::Failed {
                            status: None,
                            error: text.clone(),
                        },
                        _ => Completion::Retry {
                            status: None,
                            error: text.clone(),
                            attempted: true,
                        },
                    };
                    if e.is_connection_level() {
                        if conn.take().is_some() {
                            self.dest.associations(-1);
                        }
                        self.dest.record_failure(&text, false);
                        (outcome, Some(text))
                    } else {
                        (outcome, None)
                    }
                }
            };
            results.push((lease, outcome));
            if let Some(why) = stop_batch {
                results.extend(rest.by_ref().map(|l| (l, not_sent(&why))));
            }
        }
        results
    }

    /// Reports `results` (log, counters, metrics) and starts committing them to the queue in
    /// one durable transaction, after the commit `recording` holds has finished. The next
    /// instances are sent while this one is flushed; until it lands, its entries stay in flight
    /// (after a crash they are sent again: at least once, never lost).
    async fn record(&self, results: Vec<(Lease, Completion)>, recording: &mut Recording) {
        let cfg = &self.dest.config;
        let delivered = results
            .iter()
            .filter(|(_, c)| matches!(c, Completion::Delivered { .. }))
            .count() as u64;
        let failed: Vec<_> = results
            .iter()
            .filter_map(|(l, c)| match c {
                Completion::Failed { status, error } => {
                    Some((l.sop_instance_uid.clone(), *status, error.clone()))
                }
                _ => None,
            })
            .collect();
        for (sop, status, error) in &failed {
            log::error!(
                destination:% = cfg.name, sop_instance_uid:% = sop,
                dimse_status:% = status.map(|s| format!("{s:04X}")).unwrap_or_default(), reason:% = error;
                "instance moved to the failed queue"
            );
        }
        if delivered > 0 {
            log::info!(destination:% = cfg.name, worker = self.id, delivered = delivered; "forwarded");
        }
        self.dest.count(delivered, failed.len() as u64);
        let m = crate::metrics::get();
        for (_, c) in &results {
            match c {
                Completion::Delivered { status } => {
                    m.forwarded(&cfg.name, "delivered", Some(*status))
                }
                Completion::Retry { status, .. } => m.forwarded(&cfg.name, "retry", *status),
                Completion::Failed { status, .. } => m.forwarded(&cfg.name, "failed", *status),
            }
        }
        let give_up = cfg
            .give_up_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (db, name) = (self.db.clone(), cfg.name.clone());
        recording.finish().await;
        recording.0 = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = queue::complete(&db, &name, &results, give_up) {
                // The entries stay in flight and return to pending at the next start; nothing
                // is lost, at worst sent twice.
                log::error!(destination:% = name, error:% = e; "cannot record forwarding results");
            }
        }));
    }
}

type PrepareResult = Result<upstream::Prepared, (SpoolSlice, std::io::Error)>;

/// The commit of a worker's last outcomes, while it runs.
#[derive(Default)]
struct Recording(Option<tokio::task::JoinHandle<()>>);

impl Recording {
    async fn finish(&mut self) {
        if let Some(h) = self.0.take() {
            if let Err(e) = h.await {
                log::error!(error:% = e; "cannot record forwarding results");
            }
        }
    }
}
