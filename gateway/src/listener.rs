//! The accept loop: one task per listening socket; each accepted association runs on a thread
//! of its own (`on_own_thread`).
//!
//! Backpressure: an association runs only while it holds a permit of the shared semaphore
//! (`gateway.max_associations`). A connection that finds none is answered A-ASSOCIATE-RJ
//! transient (local-limit-exceeded) by a short task that itself needs one of a bounded number
//! of refusal permits; beyond those the connection is closed at once.
//!
//! DICOM TLS (PS3.15 Annex B): on a TLS listener each connection's task first checks the first
//! byte (a TLS handshake record is 0x16, an A-ASSOCIATE-RQ 0x01, PS3.8 section 9.3.2), then runs
//! the handshake, both within `gateway.artim_timeout` (the association has not started, so the
//! ARTIM timer of PS3.8 section 9.1.5 is the natural bound; dicom-ul has none for it). Only
//! then does the association (or the busy refusal) run over the TLS stream. Every failed
//! handshake is logged with the reason a field engineer needs ([`crate::tls::explain`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::Pdu;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::association::negotiate::Transport;
use crate::association::{self, negotiate, pdu, Shared};
use crate::live::Live;
use crate::tls::{self, ListenerTls, PeerCertificate};

/// Connections being refused at once, at most.
const MAX_REFUSALS: usize = 64;

/// Limits shared by every listener.
#[derive(Clone)]
pub struct Permits {
    pub associations: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    /// The configured limit; the semaphore holds `limit - active` permits.
    limit: Arc<std::sync::atomic::AtomicU32>,
}

impl Permits {
    pub fn new(limit: u32) -> Self {
        Permits {
            associations: Arc::new(Semaphore::new(limit as usize)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            limit: Arc::new(std::sync::atomic::AtomicU32::new(limit)),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Associations in progress.
    pub fn active(&self) -> usize {
        (self.limit() as usize).saturating_sub(self.associations.available_permits())
    }

    /// Changes the limit (reload). Lowering it takes permits away as associations end; the
    /// ones in progress are not cut off.
    pub fn resize(&self, new: u32) {
        let old = self.limit.swap(new, std::sync::atomic::Ordering::Relaxed);
        if new > old {
            self.associations.add_permits((new - old) as usize);
        } else if new < old {
            let sem = self.associations.clone();
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(old - new).await {
                    p.forget();
                }
            });
        }
    }
}

/// Accepts until `stop` is cancelled. Association tasks go to `tracker`, so the caller can
/// wait for them. `stop` ends this loop alone (a reload that drops the address); `live` gives each new
/// connection the configuration current at accept time, `tls` the TLS configuration (plain
/// DICOM when it holds none).
pub async fn accept_loop(
    listener: TcpListener,
    live: Live<Shared>,
    permits: Permits,
    tracker: TaskTracker,
    stop: CancellationToken,
    tls: ListenerTls,
) {
    let local = listener.local_addr().ok();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // EMFILE and friends: wait instead of spinning; the error clears as
                // associations end.
                log::error!(listener:? = local, error:% = e; "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // DESIGN.md section 5: Nagle plus delayed ACK costs ~40 ms per DIMSE message.
        let _ = socket.set_nodelay(true);
        let server_tls = tls.current();
        match permits.associations.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = Shared::clone(&live.get());
                let token = tracker.token();
                let spawned = on_own_thread(socket, peer, move |socket| async move {
                    match server_tls {
                        None => association::serve(socket, peer, Transport::Plain, shared).await,
                        Some(cfg) => {
                            let artim = shared.config.gateway.artim_timeout;
                            if let Some((s, t)) = handshake(socket, peer, cfg, artim).await {
                                association::serve(s, peer, t, shared).await;
                            }
                        }
                    }
                    drop(permit);
                    drop(token);
                });
                if let Err(e) = spawned {
                    log::error!(peer:% = peer, error:% = e; "connection dropped: cannot start its association thread");
                }
            }
            Err(_) => match permits.refusals.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shared = Shared::clone(&live.get());
                    let limit = permits.limit();
                    tracker.spawn(async move {
                        match server_tls {
                            None => refuse_busy(socket, peer, &shared, limit).await,
                            Some(cfg) => {
                                let artim = shared.config.gateway.artim_timeout;
                                if let Some((s, _)) = handshake(socket, peer, cfg, artim).await {
                                    refuse_busy(s, peer, &shared, limit).await;
                                }
                            }
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    log::warn!(peer:% = peer; "connection dropped: association limit and refusal queue both full");
                }
            },
        }
    }
}

/// Runs one connection on a thread of its own, under a single-threaded runtime that serves its
/// socket and timers: the association's disk work (spool writes, `fdatasync`, index commit)
/// then blocks this association alone, and an acknowledgement needs no hand-off between
/// threads (the model of DCMTK's `storescp --fork`, without the process). Threads are bounded
/// by the association permits.
fn on_own_thread<F, Fut>(socket: TcpStream, peer: SocketAddr, serve: F) -> std::io::Result<()>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let socket = socket.into_std()?;
    std::thread::Builder::new()
        .name("association".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!(peer:% = peer, error:% = e; "connection dropped: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                match TcpStream::from_std(socket) {
                    Ok(socket) => serve(socket).await,
                    Err(e) => {
                        log::error!(peer:% = peer, error:% = e; "connection dropped: cannot register its socket");
                    }
                }
            });
        })
        .map(drop)
}

/// The first byte of a TLS connection: a handshake record (RFC 8446 section 5.1, content type
/// 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The first byte of a plain DICOM connection: PDU type of A-ASSOCIATE-RQ (PS3.8 section
/// 9.3.2).
const A_ASSOCIATE_RQ: u8 = 0x01;

/// Runs the TLS handshake of a connection to a TLS listener, first byte and handshake together
/// within `artim`. `None` (logged with the reason) if it failed.
async fn handshake(
    socket: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    artim: Duration,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Transport)> {
    let deadline = tokio::time::Instant::now() + artim;
    let refused = |reason: &str| {
        log::warn!(peer:% = peer, reason:% = reason; "TLS handshake failed");
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, socket.peek(&mut first)).await {
        Err(_) => {
            refused(&format!(
                "handshake timeout: the peer sent nothing within {} s (gateway.artim_timeout_secs)",
                artim.as_secs()
            ));
            return None;
        }
        Ok(Ok(0)) => {
            log::debug!(peer:% = peer; "connection closed before the TLS handshake");
            return None;
        }
        Ok(Err(e)) => {
            log::debug!(peer:% = peer, error:% = e; "connection failed before the TLS handshake");
            return None;
        }
        Ok(Ok(_)) => {}
    }
    match first[0] {
        TLS_HANDSHAKE_RECORD => {}
        A_ASSOCIATE_RQ => {
            refused("plain DICOM sent to a TLS port (the first PDU is an A-ASSOCIATE-RQ, not a TLS ClientHello): configure DICOM TLS on the modality, or send to a plain DICOM port");
            return None;
        }
        b => {
            refused(&format!(
                "not a TLS handshake (first byte {b:#04x}); is the peer speaking DICOM TLS?"
            ));
            return None;
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
        Err(_) => {
            refused(&format!(
                "handshake timeout: not finished within {} s (gateway.artim_timeout_secs)",
                artim.as_secs()
            ));
            return None;
        }
        Ok(Err(e)) => {
            refused(&tls::explain(&e, tls::Side::Listener).reason);
            return None;
        }
        Ok(Ok(s)) => s,
    };
    let conn = stream.get_ref().1;
    let client = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerCertificate::from_der(c));
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    match &client {
        Some(c) => log::info!(
            peer:% = peer, tls_version:% = version, cipher_suite:% = suite,
            client_subject:% = c.subject, client_sha256:% = c.fingerprint();
            "TLS session established"
        ),
        None => log::info!(
            peer:% = peer, tls_version:% = version, cipher_suite:% = suite;
            "TLS session established without a client certificate"
        ),
    }
    Some((stream, Transport::Tls { client }))
}

/// Reads the A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ transient, local-limit-exceeded.
async fn refuse_busy<S>(socket: S, peer: SocketAddr, shared: &Shared, limit: u32)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let g = &shared.config.gateway;
    let (rd, mut wr) = tokio::io::split(socket);
    let mut reader = pdu::PduReader::new(rd);
    let rq = reader.next(g.artim_timeout, g.max_pdu_length).await;
    let Ok(pdu::Frame::Other(Pdu::AssociationRQ(rq))) = rq else {
        return;
    };
    let refusal = negotiate::limit_refusal(limit);
    crate::metrics::get().association_rejected(&refusal.rj.source);
    log::warn!(
        peer:% = peer, calling_ae:% = rq.calling_ae_title.trim(), called_ae:% = rq.called_ae_title.trim(),
        reason:% = refusal.reason;
        "association rejected: {}", refusal.rj.source
    );
    let _ = pdu::send(&mut wr, &Pdu::AssociationRJ(refusal.rj), g.write_timeout).await;
}
