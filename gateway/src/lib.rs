//! dicom-gateway: a store-and-forward DICOM gateway for an imaging appliance.
//!
//! The data path, in the order the modules follow it:
//! - [`listener`] accepts a socket once an association permit is free, and refuses it with
//!   A-ASSOCIATE-RJ (transient) when none is.
//! - [`association`] negotiates (called AE, the AE-title registry with the peer address,
//!   presentation contexts), applies timeouts to every read and write, and streams each C-STORE
//!   dataset PDU by PDU into [`store`].
//! - [`store`] makes the instance durable: the spool file is fsynced and renamed, its directory
//!   fsynced, and the redb row committed together with one queue entry per routed destination.
//!   Only then does the association answer Success.
//! - [`forward`] leases due queue entries per destination, sends them through
//!   [`forward::upstream`], and records delivered, retry (with backoff) or failed.
//!
//! Only the index records what the gateway holds and what is still pending. [`control`] answers
//! the CLI's status and queue commands over a Unix socket. Supporting modules: [`config`] (validated
//! once), [`sop`] (accepted SOP classes and transfer syntaxes), [`uid`], [`logging`],
//! [`systemd`], [`conformance`].
//!
//! Logging contract: patient demographics are never logged at info level or above; UIDs and AE
//! titles are.

pub mod association;
pub mod config;
pub mod conformance;
pub mod control;
pub mod forward;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod sop;
pub mod store;
pub mod systemd;
pub mod uid;

use std::sync::Arc;
use std::time::Duration;

use snafu::{ResultExt, Snafu};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use association::Shared;
use config::Config;
use listener::Permits;
use store::Store;

/// How long associations in progress may take to finish after a stop signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Snafu)]
pub enum RunError {
    #[snafu(display("cannot open the store: {source}"))]
    OpenStore { source: store::StoreError },
    #[snafu(display("cannot listen on {address}: {source}{hint}"))]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    #[snafu(display("store task failed: {message}"))]
    Join { message: String },
    #[snafu(display("the index failed and the gateway stopped: {message}"))]
    IndexClose { message: String },
}

/// Binds every configured listener.
pub async fn bind(config: &Config) -> Result<Vec<TcpListener>, RunError> {
    let mut out = Vec::new();
    for l in &config.listen {
        let listener = TcpListener::bind(l.address).await.map_err(|source| {
            let hint = match source.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    " (ports below 1024 need CAP_NET_BIND_SERVICE: run from the systemd unit, or use a port above 1023)"
                }
                std::io::ErrorKind::AddrInUse => " (another program, or another gateway, already listens there)",
                std::io::ErrorKind::AddrNotAvailable => " (no interface of this machine has that address)",
                _ => "",
            };
            RunError::Bind {
                address: l.address,
                source,
                hint,
            }
        })?;
        out.push(listener);
    }
    Ok(out)
}

/// Runs the gateway on already-bound listeners until `shutdown` is cancelled, then drains:
/// stop accepting, let associations finish within [`SHUTDOWN_GRACE`], close the index cleanly.
pub async fn run(
    config: Config,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let data_dir = config.gateway.data_dir.clone();
    let min_free = config.gateway.min_free_disk_bytes;
    let fatal = CancellationToken::new();
    let on_fatal = fatal.clone();
    let dests = forward::Destinations::new(&config.destinations);
    let router_cfg = config.clone();
    let router: store::Router = Arc::new(move |ae: &str, modality: &str, class: &str| {
        router_cfg.route(ae, modality, class)
    });
    let wake_dests = dests.clone();
    let wake: store::Wake = Arc::new(move |d: &str| wake_dests.wake(d));
    let (store, runtime, recovery) = tokio::task::spawn_blocking(move || {
        Store::open(&data_dir, min_free, on_fatal, router, wake)
    })
    .await
    .map_err(|e| RunError::Join {
        message: e.to_string(),
    })?
    .context(OpenStoreSnafu)?;
    log::info!(
        data_dir:% = config.gateway.data_dir.display(), clean = recovery.clean,
        temp_files_removed = recovery.temp_files_removed, reindexed = recovery.reindexed,
        quarantined = recovery.quarantined, missing_files = recovery.missing_files,
        in_flight_returned = recovery.in_flight_returned;
        "store open"
    );
    let forward_stop = CancellationToken::new();
    let forwarders = TaskTracker::new();
    forward::start(
        &dests,
        store.db().clone(),
        config.gateway.data_dir.clone(),
        forward_stop.clone(),
        &forwarders,
    );
    let evictor = tokio::spawn(evict_loop(
        store.db().clone(),
        config.clone(),
        forward_stop.clone(),
    ));
    if config.destinations.is_empty() {
        log::warn!("no [[destination]] configured: cache-only gateway, nothing is forwarded");
    }

    let shared = Shared {
        config: config.clone(),
        store,
        shutdown: shutdown.clone(),
    };
    let permits = Permits::new(config.gateway.max_associations.get());
    let tracker = TaskTracker::new();
    let control = control::Control {
        config: config.clone(),
        store: shared.store.clone(),
        dests: dests.clone(),
        permits: permits.clone(),
        started_ms: store::now_ms(),
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
    let control_task = match control::listen(&config.gateway.data_dir) {
        Ok(l) => Some(tokio::spawn(control::serve(l, control, shutdown.clone()))),
        Err(e) => {
            log::error!(error:% = e; "control socket unavailable: status and queue commands will not work");
            None
        }
    };
    let mut accept_tasks = Vec::new();
    for l in listeners {
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        log::info!(address:% = addr, ae_title:% = config.gateway.ae_title; "listening");
        accept_tasks.push(tokio::spawn(listener::accept_loop(
            l,
            shared.clone(),
            permits.clone(),
            tracker.clone(),
        )));
    }
    systemd::notify(&format!(
        "READY=1\nSTATUS=listening as {} on {} socket(s)",
        config.gateway.ae_title,
        accept_tasks.len()
    ));
    let supervisor = tokio::spawn(supervise(
        accept_tasks
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .collect(),
        shared.store.clone(),
        dests.clone(),
        permits.clone(),
        shutdown.clone(),
    ));

    let failed = tokio::select! {
        () = shutdown.cancelled() => false,
        () = fatal.cancelled() => {
            // DESIGN: after a failed commit redb refuses writes until reopened; stop and let
            // systemd restart the gateway (redb repairs on open).
            shutdown.cancel();
            true
        }
    };
    systemd::notify("STOPPING=1");
    let _ = supervisor.await;
    log::info!(active_associations = permits.active(); "stopping: no new associations; waiting for those in progress");
    for t in accept_tasks {
        let _ = t.await;
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
    drop(shared);
    // Forwarding stops at a safe point: between instances; leased entries return to pending.
    forward_stop.cancel();
    forwarders.close();
    forwarders.wait().await;
    let _ = evictor.await;
    for t in [control_task, metrics_task].into_iter().flatten() {
        let _ = t.await;
    }
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

/// How often the cache is checked for eviction.
const EVICT_EVERY: Duration = Duration::from_secs(10);

async fn evict_loop(db: Arc<redb::Database>, config: Arc<Config>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(EVICT_EVERY) => {}
        }
        let (db, cfg) = (db.clone(), config.clone());
        let r = tokio::task::spawn_blocking(move || {
            store::evict::run_once(
                &db,
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

/// The checks behind WATCHDOG=1: every accept loop still runs, the index thread turned within
/// the last few seconds, and every destination's workers turned within their timeouts. A
/// timer that pings whatever happens would hide exactly the hangs the watchdog is for.
fn health(
    accepts: &[tokio::task::AbortHandle],
    store: &Store,
    dests: &forward::Destinations,
) -> Vec<String> {
    let mut problems = Vec::new();
    if accepts.iter().any(tokio::task::AbortHandle::is_finished) {
        problems.push("an accept loop has ended".to_owned());
    }
    let age = store.index_heartbeat_age();
    if age > Duration::from_secs(20) {
        problems.push(format!(
            "the index thread has not turned for {} s",
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
    accepts: Vec<tokio::task::AbortHandle>,
    store: Store,
    dests: forward::Destinations,
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
