//! dicom-gateway: a store-and-forward DICOM gateway for an imaging appliance.
//!
//! The data path, in the order the modules follow it:
//! - [`listener`] accepts a socket once an association permit is free, and refuses it with
//!   A-ASSOCIATE-RJ (transient) when none is.
//! - [`association`] negotiates (called AE, the AE-title registry with the peer address,
//!   presentation contexts), applies timeouts to every read and write, and streams each C-STORE
//!   dataset PDU by PDU into [`store`].
//! - [`store`] makes the instance durable: the spool file is fsynced and renamed, its directory
//!   fsynced, and the redb row committed. Only then does the association answer Success.
//!
//! Only the index records what the gateway holds. Supporting modules: [`config`] (validated
//! once), [`sop`] (accepted SOP classes and transfer syntaxes), [`uid`], [`logging`],
//! [`systemd`], [`conformance`].
//!
//! Logging contract: patient demographics are never logged at info level or above; UIDs and AE
//! titles are.

pub mod association;
pub mod config;
pub mod conformance;
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
    let (store, runtime, recovery) =
        tokio::task::spawn_blocking(move || Store::open(&data_dir, min_free, on_fatal))
            .await
            .map_err(|e| RunError::Join {
                message: e.to_string(),
            })?
            .context(OpenStoreSnafu)?;
    log::info!(
        data_dir:% = config.gateway.data_dir.display(), clean = recovery.clean,
        temp_files_removed = recovery.temp_files_removed, reindexed = recovery.reindexed,
        quarantined = recovery.quarantined, missing_files = recovery.missing_files;
        "store open"
    );

    let shared = Shared {
        config: config.clone(),
        store,
        shutdown: shutdown.clone(),
    };
    let permits = Permits::new(config.gateway.max_associations.get());
    let tracker = TaskTracker::new();
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
