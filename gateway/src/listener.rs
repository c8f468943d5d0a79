//! The accept loop: one task per listening socket.
//!
//! Backpressure: an association runs only while it holds a permit of the shared semaphore
//! (`gateway.max_associations`). A connection that finds none is answered A-ASSOCIATE-RJ
//! transient (local-limit-exceeded) by a short task that itself needs one of a bounded number
//! of refusal permits; beyond those the connection is closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::Pdu;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::association::{self, negotiate, pdu, Shared};
use crate::live::Live;

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
/// connection the configuration current at accept time.
pub async fn accept_loop(
    listener: TcpListener,
    live: Live<Shared>,
    permits: Permits,
    tracker: TaskTracker,
    stop: CancellationToken,
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
        match permits.associations.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = Shared::clone(&live.get());
                tracker.spawn(async move {
                    association::serve(socket, peer, shared).await;
                    drop(permit);
                });
            }
            Err(_) => match permits.refusals.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shared = Shared::clone(&live.get());
                    let limit = permits.limit();
                    tracker.spawn(async move {
                        refuse_busy(socket, peer, &shared, limit).await;
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

/// Reads the A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ transient, local-limit-exceeded.
async fn refuse_busy(socket: TcpStream, peer: SocketAddr, shared: &Shared, limit: u32) {
    let g = &shared.config.gateway;
    let (rd, mut wr) = socket.into_split();
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
