//! The running gateway: opens the store, starts forwarders, listeners, the control socket and
//! metrics, serves until stopped, reloads the configuration on request, and drains at the end.
//!
//! Reload (SIGHUP or `dicom-gateway reload`): the new file is parsed and validated first; if it
//! is invalid the running configuration stays and the error is logged and returned. Otherwise,
//! in one step: the AE registry, limits and routes apply to new associations (those in progress
//! keep the configuration they started with); destinations that changed get new forwarders
//! (leased entries return to pending); listener addresses that changed are rebound. The data
//! directory cannot change without a restart; `gateway.spare_segments` applies at the next one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snafu::ResultExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::association::Shared;
use crate::config::Config;
use crate::forward::{self, Destinations};
use crate::listener::{self, Permits};
use crate::live::Live;
use crate::store::{self, Store};
use crate::{control, metrics, systemd, OpenStoreSnafu, RunError, SHUTDOWN_GRACE};

/// A reload request; the answer says what changed or why nothing did.
pub type ReloadReply = oneshot::Sender<Result<String, String>>;
/// Sends reload requests to [`run`]: `None` from SIGHUP, `Some(reply)` from the CLI.
pub type ReloadSender = mpsc::Sender<Option<ReloadReply>>;

/// The accept loops, by address.
type Listeners = HashMap<SocketAddr, (CancellationToken, JoinHandle<()>)>;

/// The forwarder workers of one configuration of destinations.
struct Forwarding {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Forwarding {
    fn start(dests: &Destinations, store: &Store, data_dir: PathBuf) -> Forwarding {
        let f = Forwarding {
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        forward::start(
            dests,
            store.db().clone(),
            data_dir,
            f.stop.clone(),
            &f.tracker,
        );
        f
    }

    /// Stops at a safe point: between instances; leased entries return to pending.
    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Runs the gateway on already-bound listeners until `shutdown` is cancelled, then drains:
/// stop accepting, let associations finish within [`SHUTDOWN_GRACE`], stop forwarding between
/// instances, close the index cleanly.
pub async fn run(
    config: Config,
    bound: Vec<TcpListener>,
    shutdown: CancellationToken,
    reload_tx: ReloadSender,
    mut reload_rx: mpsc::Receiver<Option<ReloadReply>>,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    // TLS material first: a missing or broken file, or a key readable by others, refuses to
    // start, before anything is opened.
    let tls_listeners = crate::tls::Listeners::load(&config).context(crate::TlsSnafu)?;
    crate::tls::check_destinations(&config).context(crate::TlsSnafu)?;
    let live_config: Live<Config> = Live::new(Config::clone(&config));
    let data_dir = config.gateway.data_dir.clone();
    let min_free = config.gateway.min_free_disk_bytes;
    let spare_segments = config.gateway.spare_segments;
    let fatal = CancellationToken::new();
    let on_fatal = fatal.clone();
    let live_dests: Live<Destinations> = Live::new(Destinations::new(&config.destinations));
    let router_cfg = live_config.clone();
    let router: store::Router = Arc::new(move |ae: &str, modality: &str, class: &str| {
        router_cfg.get().route(ae, modality, class)
    });
    let wake_dests = live_dests.clone();
    let wake: store::Wake = Arc::new(move |d: &str| wake_dests.get().wake(d));
    let (store, runtime, recovery) = tokio::task::spawn_blocking(move || {
        Store::open(&data_dir, min_free, spare_segments, on_fatal, router, wake)
    })
    .await
    .map_err(|e| RunError::Join {
        message: e.to_string(),
    })?
    .context(OpenStoreSnafu)?;
    log::info!(
        data_dir:% = config.gateway.data_dir.display(), clean = recovery.clean,
        reindexed = recovery.reindexed, skipped = recovery.skipped,
        tail_bytes_removed = recovery.tail_bytes_removed,
        segments_removed = recovery.segments_removed, spares_made = recovery.spares_made,
        missing_records = recovery.missing_records,
        in_flight_returned = recovery.in_flight_returned;
        "store open"
    );
    let mut forwarding =
        Forwarding::start(&live_dests.get(), &store, config.gateway.data_dir.clone());
    let background_stop = CancellationToken::new();
    let evictor = tokio::spawn(evict_loop(
        store.db().clone(),
        store.pool().clone(),
        live_config.clone(),
        background_stop.clone(),
    ));
    if config.destinations.is_empty() {
        log::warn!("no [[destination]] configured: cache-only gateway, nothing is forwarded");
    }

    let live_shared = Live::new(Shared {
        config: config.clone(),
        store: store.clone(),
        shutdown: shutdown.clone(),
    });
    let permits = Permits::new(config.gateway.max_associations.get());
    let tracker = TaskTracker::new();
    let control = control::Control {
        config: live_config.clone(),
        store: store.clone(),
        dests: live_dests.clone(),
        permits: permits.clone(),
        started_ms: store::now_ms(),
        reload: reload_tx,
    };
    let metrics_task = match config.metrics {
        None => None,
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => {
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                log::info!(address:% = addr; "metrics endpoint listening");
                Some(tokio::spawn(metrics::serve(
                    l,
                    control.clone(),
                    shutdown.clone(),
                )))
            }
            Err(e) => {
                log::error!(address:% = addr, error:% = e; "metrics endpoint unavailable ([metrics] address)");
                None
            }
        },
    };
    let control_task = match control::listen(&config.gateway.control_socket) {
        Ok(l) => Some(tokio::spawn(control::serve(l, control, shutdown.clone()))),
        Err(e) => {
            log::error!(error:% = e; "control socket unavailable: status and queue commands will not work");
            None
        }
    };
    let mut listeners: Listeners = HashMap::new();
    for l in bound {
        start_listener(
            l,
            &mut listeners,
            &live_shared,
            &permits,
            &tracker,
            &shutdown,
            &config,
            &tls_listeners,
        );
    }
    let accept_handles: Arc<Mutex<Vec<AbortHandle>>> =
        Arc::new(Mutex::new(abort_handles(&listeners)));
    systemd::notify(&format!(
        "READY=1\nSTATUS=listening as {} on {} socket(s)",
        config.gateway.ae_title,
        listeners.len()
    ));
    let supervisor = tokio::spawn(supervise(
        accept_handles.clone(),
        store.clone(),
        live_dests.clone(),
        permits.clone(),
        background_stop.clone(),
    ));

    let failed = loop {
        tokio::select! {
            () = shutdown.cancelled() => break false,
            () = fatal.cancelled() => {
                // DESIGN: after a failed commit redb refuses writes until reopened; stop and
                // let systemd restart the gateway (redb repairs on open).
                shutdown.cancel();
                break true;
            }
            req = reload_rx.recv() => {
                let Some(reply) = req else { continue };
                systemd::notify("RELOADING=1");
                let r = reload(
                    &live_config, &live_shared, &live_dests, &permits, &mut listeners,
                    &mut forwarding, &store, &tracker, &shutdown, &tls_listeners,
                ).await;
                if let Ok(mut h) = accept_handles.lock() {
                    *h = abort_handles(&listeners);
                }
                match &r {
                    Ok(summary) => log::info!(changes:% = summary; "configuration reloaded"),
                    Err(e) => log::error!(error:% = e; "reload refused: the running configuration stays"),
                }
                systemd::notify("READY=1");
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
        }
    };
    systemd::notify("STOPPING=1");
    background_stop.cancel();
    let _ = supervisor.await;
    log::info!(active_associations = permits.active(); "stopping: no new associations; waiting for those in progress");
    for (_, (stop, task)) in listeners {
        stop.cancel();
        let _ = task.await;
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        // Their instances were not acknowledged, so nothing is lost; the next start finds the
        // index not marked clean and reconciles.
        log::warn!(active_associations = permits.active(); "grace period over; exiting with associations still open");
        return Ok(());
    }
    drop(live_shared);
    forwarding.stop().await;
    let _ = evictor.await;
    for t in [control_task, metrics_task].into_iter().flatten() {
        let _ = t.await;
    }
    drop(store);
    if failed {
        return Err(RunError::IndexClose {
            message: "an index commit failed (see the error above)".into(),
        });
    }
    tokio::task::spawn_blocking(move || runtime.close())
        .await
        .map_err(|e| RunError::Join {
            message: e.to_string(),
        })?
        .map_err(|message| RunError::IndexClose { message })?;
    log::info!("stopped cleanly");
    Ok(())
}

fn abort_handles(listeners: &Listeners) -> Vec<AbortHandle> {
    listeners.values().map(|(_, t)| t.abort_handle()).collect()
}

#[allow(clippy::too_many_arguments)]
fn start_listener(
    l: TcpListener,
    listeners: &mut Listeners,
    live: &Live<Shared>,
    permits: &Permits,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    config: &Config,
    tls: &crate::tls::Listeners,
) {
    let Ok(addr) = l.local_addr() else {
        return;
    };
    log::info!(address:% = addr, ae_title:% = config.gateway.ae_title; "listening");
    let stop = shutdown.child_token();
    let task = tokio::spawn(listener::accept_loop(
        l,
        live.clone(),
        permits.clone(),
        tracker.clone(),
        stop.clone(),
        tls.for_address(addr),
    ));
    listeners.insert(addr, (stop, task));
}

/// Applies a new configuration file (see the module doc). Returns a summary of what changed.
#[allow(clippy::too_many_arguments)]
async fn reload(
    live_config: &Live<Config>,
    live_shared: &Live<Shared>,
    live_dests: &Live<Destinations>,
    permits: &Permits,
    listeners: &mut Listeners,
    forwarding: &mut Forwarding,
    store: &Store,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    tls: &crate::tls::Listeners,
) -> Result<String, String> {
    let old = live_config.get();
    if old.source.starts_with('<') {
        return Err("the gateway runs on the embedded default configuration; start it with --config FILE to reload".into());
    }
    let path = PathBuf::from(&old.source);
    let new = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if new.gateway.spare_segments != old.gateway.spare_segments {
        log::warn!(
            running = old.gateway.spare_segments, configured = new.gateway.spare_segments;
            "gateway.spare_segments changed: it applies at the next restart"
        );
    }
    if new.gateway.data_dir != old.gateway.data_dir {
        return Err(format!(
            "gateway.data_dir changed ({} -> {}): that needs a restart",
            old.gateway.data_dir.display(),
            new.gateway.data_dir.display()
        ));
    }
    // TLS files next (a reload is how certificates are rotated): a broken certificate or key
    // keeps every listener on the one in service, and nothing else changes either.
    let tls_prepared = crate::tls::prepare_listeners(&new).map_err(|e| e.to_string())?;
    crate::tls::check_destinations(&new).map_err(|e| e.to_string())?;
    // Bind new addresses first: if one fails, nothing changes.
    let old_addrs: Vec<SocketAddr> = listeners.keys().copied().collect();
    let want: Vec<SocketAddr> = new.listen.iter().map(|l| l.address).collect();
    let mut fresh = Vec::new();
    for a in want.iter().filter(|a| !old_addrs.contains(a)) {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| format!("cannot listen on {a}: {e}"))?;
        fresh.push(l);
    }
    let mut changes = Vec::new();
    let new = Arc::new(new);
    live_config.set(Config::clone(&new));
    live_shared.set(Shared {
        config: new.clone(),
        store: store.clone(),
        shutdown: shutdown.clone(),
    });
    let tls_reloaded = tls.apply(tls_prepared);
    if !tls_reloaded.is_empty() {
        let addrs: Vec<String> = tls_reloaded.iter().map(ToString::to_string).collect();
        changes.push(format!("TLS certificates re-read for {}", addrs.join(", ")));
    }
    if new.gateway.max_associations != old.gateway.max_associations {
        permits.resize(new.gateway.max_associations.get());
        changes.push(format!("max_associations {}", new.gateway.max_associations));
    }
    if format!("{:?}", new.modalities) != format!("{:?}", old.modalities) {
        changes.push(format!("{} modalities", new.modalities.len()));
    }
    if format!("{:?}", new.destinations) != format!("{:?}", old.destinations) {
        let dests = Destinations::new(&new.destinations);
        let previous = std::mem::replace(
            forwarding,
            Forwarding::start(&dests, store, new.gateway.data_dir.clone()),
        );
        // Old workers stop between instances while the new ones start on what is pending.
        previous.stop().await;
        live_dests.set(dests);
        changes.push(format!(
            "{} destinations (forwarders restarted)",
            new.destinations.len()
        ));
    }
    for a in old_addrs.iter().filter(|a| !want.contains(a)) {
        if let Some((stop, task)) = listeners.remove(a) {
            stop.cancel();
            let _ = task.await;
            changes.push(format!("stopped listening on {a}"));
        }
    }
    for l in fresh {
        if let Ok(a) = l.local_addr() {
            changes.push(format!("listening on {a}"));
        }
        start_listener(
            l,
            listeners,
            live_shared,
            permits,
            tracker,
            shutdown,
            &new,
            tls,
        );
    }
    if new.log.level != old.log.level {
        log::set_max_level(new.log.level.max(log::LevelFilter::Warn));
        changes.push(format!("log level {}", new.log.level));
    }
    if changes.is_empty() {
        changes.push("timeouts, routes and registry re-read; nothing else changed".into());
    }
    Ok(changes.join("; "))
}
/// How often the cache is checked for eviction.
const EVICT_EVERY: Duration = Duration::from_secs(10);

async fn evict_loop(
    db: Arc<redb::Database>,
    pool: Arc<store::segment::Pool>,
    config: Live<Config>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVICT_EVERY) => {}
        }
        let (db, pool, cfg) = (db.clone(), pool.clone(), config.get());
        let r = tokio::task::spawn_blocking(move || {
            store::evict::run_once(
                &db,
                &pool,
                &cfg.gateway.data_dir,
                &cfg.cache,
                cfg.gateway.min_free_disk_bytes,
            )
        })
        .await;
        match r {
            Ok(Ok(e)) if e.studies > 0 || e.held > 0 => {
                metrics::get().evicted(e.instances, e.bytes);
                log::info!(
                studies = e.studies, instances = e.instances, bytes = e.bytes, held_studies = e.held;
                "cache eviction pass"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::error!(error:% = e; "cache eviction failed"),
            Err(e) => log::error!(error:% = e; "cache eviction task failed"),
        }
    }
}

/// The checks behind WATCHDOG=1: every accept loop still runs, the index flush thread turned within
/// the last few seconds, and every destination's workers turned within their timeouts. A
/// timer that pings whatever happens would hide exactly the hangs the watchdog is for.
fn health(accepts: &[AbortHandle], store: &Store, dests: &forward::Destinations) -> Vec<String> {
    let mut problems = Vec::new();
    if accepts.iter().any(tokio::task::AbortHandle::is_finished) {
        problems.push("an accept loop has ended".to_owned());
    }
    let age = store.index_heartbeat_age();
    if age > Duration::from_secs(20) {
        problems.push(format!(
            "the index flush thread has not turned for {} s (an index commit hangs)",
            age.as_secs()
        ));
    }
    for d in dests.iter() {
        if !d.is_alive() {
            problems.push(format!(
                "the forwarder of destination {} is stuck",
                d.config.name
            ));
        }
    }
    problems
}

/// Sends WATCHDOG=1 while [`health`] finds nothing wrong, and a STATUS= summary.
async fn supervise(
    accepts: Arc<Mutex<Vec<AbortHandle>>>,
    store: Store,
    dests: Live<Destinations>,
    permits: Permits,
    stop: CancellationToken,
) {
    let watchdog = systemd::watchdog_interval();
    let every = watchdog.map_or(Duration::from_secs(10), |w| {
        (w / 2).min(Duration::from_secs(10))
    });
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let dests = dests.get();
        let accepts = accepts.lock().map(|a| a.clone()).unwrap_or_default();
        let problems = health(&accepts, &store, &dests);
        if problems.is_empty() {
            if watchdog.is_some() {
                systemd::notify("WATCHDOG=1");
            }
        } else {
            log::error!(problems:? = problems; "health check failed: not feeding the watchdog");
        }
        let db = store.db().clone();
        let names: Vec<(String, bool)> = dests
            .iter()
            .map(|d| (d.config.name.clone(), d.link_status().up != Some(false)))
            .collect();
        let queues = tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|(n, up)| {
                    let c = store::queue::stats(&db, &n)
                        .map(|s| s.0)
                        .unwrap_or_default();
                    format!(
                        "{n}: {} pending, {} failed{}",
                        c.pending,
                        c.failed,
                        if up { "" } else { ", link DOWN" }
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let queues = if queues.is_empty() {
            "cache only".to_owned()
        } else {
            queues.join("; ")
        };
        systemd::notify(&format!(
            "STATUS={} association(s); {queues}",
            permits.active()
        ));
    }
}
