//! dicom-gateway: a store-and-forward DICOM gateway for an imaging appliance.
//!
//! The data path, in the order the modules follow it:
//! - [`listener`] accepts a socket once an association permit is free, and refuses it with
//!   A-ASSOCIATE-RJ (transient) when none is; on a TLS port it first runs the DICOM TLS
//!   handshake ([`tls`]: profile, certificates, reload).
//! - [`association`] negotiates (called AE, the AE-title registry with the peer address and the
//!   TLS client certificate, presentation contexts), applies timeouts to every read and write,
//!   and streams each C-STORE dataset PDU by PDU into [`store`].
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
pub mod daemon;
pub mod forward;
pub mod listener;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod privilege;
pub mod sop;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod uid;

use std::time::Duration;

use snafu::Snafu;
use tokio::net::TcpListener;

use config::Config;
pub use daemon::run;

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
    #[snafu(display("{message}"))]
    Privilege { message: String },
    #[snafu(display("the index failed and the gateway stopped: {message}"))]
    IndexClose { message: String },
    #[snafu(display("{source}"))]
    Tls { source: tls::TlsError },
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
