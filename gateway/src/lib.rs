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
    if let Some(t) = control_task {
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
            Ok(Ok(e)) if e.studies > 0 || e.held > 0 => log::info!(
                studies = e.studies, instances = e.instances, bytes = e.bytes, held_studies = e.held;
                "cache eviction pass"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::error!(error:% = e; "cache eviction failed"),
            Err(e) => log::error!(error:% = e; "cache eviction task failed"),
        }
    }
}
