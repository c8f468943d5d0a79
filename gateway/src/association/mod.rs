//! One association from A-ASSOCIATE-RQ to release or abort (PS3.8 section 9.2), acceptor side.
//!
//! Timeouts on every read and write (dicom-ul sets none):
//! - the A-ASSOCIATE-RQ must arrive within `artim_timeout` (ARTIM, PS3.8 section 9.1.5);
//! - between DIMSE messages the peer may be silent for `idle_timeout`;
//! - inside a message, between its PDUs, for `dimse_timeout`;
//! - every write must complete within `write_timeout`.
//!
//! A C-STORE dataset is written PDU by PDU to the store; at most one PDU (bounded by
//! `max_pdu_length`) and the store's flush buffer are in memory per association.

pub mod dimse;
pub mod error;
pub mod negotiate;
pub mod pdu;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sop::Service;
use crate::store::{IncomingInstance, Ingest, Store};
use crate::uid;
use dimse::{status, Command};
use error::Failure;
use negotiate::{Context, Refusal};
use pdu::{Frame, FrameError, PduReader};

/// Largest command set accepted; real ones are a few hundred bytes.
const MAX_COMMAND_SET: usize = 64 * 1024;

/// What one association needs from the gateway.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    /// Cancelled when the gateway shuts down; associations stop between DIMSE messages.
    pub shutdown: CancellationToken,
}

/// Per-association counters, logged when it ends.
#[derive(Default)]
struct Tally {
    stored: u64,
    duplicates: u64,
    failed: u64,
    bytes: u64,
}

/// Where the association is within a DIMSE message.
enum Msg {
    Idle,
    Command {
        ctx: u8,
        buf: Vec<u8>,
    },
    Data {
        ctx: u8,
        cmd: Command,
        /// Boxed: the hasher inside makes `Ingest` large.
        ingest: Option<Box<Ingest>>,
        /// Set when the instance will not be stored: the data is read and dropped, then this
        /// status is answered.
        refused: Option<(u16, String)>,
    },
}

/// Serves one connection to the end. Never panics on peer input; every way out is logged.
/// `transport` says whether it came over TLS and with which verified client certificate (the
/// listener did the handshake); negotiation checks it against the registry.
pub async fn serve<S>(stream: S, peer: SocketAddr, transport: negotiate::Transport, shared: Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = PduReader::new(rd);
    let g = &shared.config.gateway;

    let rq = match reader.next(g.artim_timeout, g.max_pdu_length).await {
        Ok(Frame::Other(Pdu::AssociationRQ(rq))) => rq,
        Ok(_) => {
            log::warn!(peer:% = peer; "connection closed: first PDU was not an A-ASSOCIATE-RQ");
            abort(
                &mut wr,
                AbortRQServiceProviderReason::UnexpectedPdu,
                g.write_timeout,
            )
            .await;
            return;
        }
        Err(FrameError::Closed) => {
            log::debug!(peer:% = peer; "connection closed before association request");
            return;
        }
        Err(e) => {
            log::warn!(peer:% = peer, reason:% = e; "connection closed before association");
            abort(&mut wr, error::abort_reason(&e), g.write_timeout).await;
            return;
        }
    };
    let calling_raw = rq.calling_ae_title.trim().to_owned();
    let called_raw = rq.called_ae_title.trim().to_owned();
    let accepted = match negotiate::negotiate(rq, peer.ip(), &transport, &shared.config) {
        Ok(a) => a,
        Err(Refusal { rj, reason }) => {
            crate::metrics::get().association_rejected(&rj.source);
            log::warn!(
                peer:% = peer, calling_ae:% = calling_raw, called_ae:% = called_raw, reason:% = reason;
                "association rejected: {}", rj.source
            );
            let _ = pdu::send(&mut wr, &Pdu::AssociationRJ(rj), g.write_timeout).await;
            linger(&mut reader, g.artim_timeout).await;
            return;
        }
    };
    if let Err(e) = pdu::send(
        &mut wr,
        &Pdu::AssociationAC(accepted.ac.clone()),
        g.write_timeout,
    )
    .await
    {
        log::warn!(peer:% = peer, calling_ae:% = accepted.calling_ae, reason:% = e; "could not send A-ASSOCIATE-AC");
        return;
    }
    crate::metrics::get().association_accepted();
    log::info!(
        peer:% = peer, calling_ae:% = accepted.calling_ae, called_ae:% = accepted.called_ae,
        accepted_contexts = accepted.contexts.len(), rejected_contexts = accepted.rejected.len();
        "association accepted"
    );
    for r in &accepted.rejected {
        log::info!(peer:% = peer, calling_ae:% = accepted.calling_ae; "presentation context rejected: {r}");
    }

    let mut conn = Conn {
        peer,
        calling_ae: accepted.calling_ae,
        contexts: accepted.contexts,
        shared: &shared,
        tally: Tally::default(),
        started: Instant::now(),
    };
    let end = conn.run(&mut reader, &mut wr).await;
    let t = &conn.tally;
    let secs = conn.started.elapsed().as_secs_f64();
    match end {
        Ok(how) => log::info!(
            peer:% = peer, calling_ae:% = conn.calling_ae, stored = t.stored, duplicates = t.duplicates,
            failed = t.failed, bytes = t.bytes, seconds:% = format!("{secs:.1}");
            "association {how}"
        ),
        Err(Failure::Abort { reason, detail }) => {
            log::warn!(
                peer:% = peer, calling_ae:% = conn.calling_ae, reason:% = detail, stored = t.stored, failed = t.failed;
                "association aborted by the gateway"
            );
            abort(&mut wr, reason, g.write_timeout).await;
        }
        Err(Failure::Gone { detail }) => log::warn!(
            peer:% = peer, calling_ae:% = conn.calling_ae, reason:% = detail, stored = t.stored, failed = t.failed;
            "association ended abnormally"
        ),
    }
}

struct Conn<'a> {
    peer: SocketAddr,
    calling_ae: String,
    contexts: HashMap<u8, Context>,
    shared: &'a Shared,
    tally: Tally,
    started: Instant,
}

impl Conn<'_> {
    /// The DIMSE loop. `Ok` names how the association ended normally.
    async fn run<R, W>(
        &mut self,
        reader: &mut PduReader<R>,
        wr: &mut W,
    ) -> Result<&'static str, Failure>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let g = &self.shared.config.gateway;
        let mut msg = Msg::Idle;
        loop {
            let frame = if matches!(msg, Msg::Idle) {
                tokio::select! {
                    biased;
                    () = self.shared.shutdown.cancelled() => {
                        return Err(Failure::abort(AbortRQServiceProviderReason::ReasonNotSpecified, "gateway is shutting down"));
                    }
                    f = reader.next(g.idle_timeout, g.max_pdu_length) => f,
                }
            } else {
                reader.next(g.dimse_timeout, g.max_pdu_length).await
            };
            let pdvs = match frame {
                Ok(Frame::PData(pdvs)) => pdvs,
                Ok(Frame::Other(Pdu::ReleaseRQ)) => {
                    if !matches!(msg, Msg::Idle) {
                        return Err(Failure::abort(
                            AbortRQServiceProviderReason::UnexpectedPdu,
                            "A-RELEASE-RQ in the middle of a DIMSE message",
                        ));
                    }
                    pdu::send(wr, &Pdu::ReleaseRP, g.write_timeout)
                        .await
                        .map_err(|e| Failure::gone(format!("sending A-RELEASE-RP: {e}")))?;
                    return Ok("released");
                }
                Ok(Frame::Other(Pdu::AbortRQ { source })) => {
                    return match msg {
                        Msg::Idle => Ok("aborted by the peer"),
                        _ => Err(Failure::gone(format!(
                            "peer sent A-ABORT ({source:?}) during a message"
                        ))),
                    }
                }
                Ok(Frame::Other(other)) => {
                    return Err(Failure::abort(
                        AbortRQServiceProviderReason::UnexpectedPdu,
                        format!("unexpected PDU {}", pdu_name(&other)),
                    ))
                }
                Err(FrameError::Closed) if matches!(msg, Msg::Idle) => {
                    return Ok("closed by the peer without release")
                }
                Err(e) => return Err(error::frame_failure(e, !matches!(msg, Msg::Idle))),
            };
            for pdv in pdvs {
                if !self.contexts.contains_key(&pdv.context_id) {
                    return Err(Failure::abort(
                        AbortRQServiceProviderReason::InvalidPduParameter,
                        format!(
                            "PDV on presentation context {} that was not accepted",
                            pdv.context_id
                        ),
                    ));
                }
                msg = match (msg, pdv.is_command) {
                    (Msg::Idle, true) => Msg::Command {
                        ctx: pdv.context_id,
                        buf: pdv.data.to_vec(),
                    },
                    (Msg::Command { ctx, mut buf }, true) if ctx == pdv.context_id => {
                        if buf.len() + pdv.data.len() > MAX_COMMAND_SET {
                            return Err(Failure::abort(
                                AbortRQServiceProviderReason::InvalidPduParameter,
                                "command set larger than 64 KiB",
                            ));
                        }
                        buf.extend_from_slice(pdv.data);
                        Msg::Command { ctx, buf }
                    }
                    (Msg::Data { ctx, cmd, mut ingest, mut refused }, false) if ctx == pdv.context_id => {
                        self.tally.bytes += pdv.data.len() as u64;
                        if let Some(i) = ingest.as_mut() {
                            if let Err(e) = i.write(pdv.data) {
                                refused = Some(error::store_status(&e));
                                ingest = None;
                            }
                        }
                        Msg::Data { ctx, cmd, ingest, refused }
                    }
                    _ => {
                        return Err(Failure::abort(
                            AbortRQServiceProviderReason::UnexpectedPduParameter,
                            "PDV out of sequence (command/data fragment or presentation context not as expected)",
                        ))
                    }
                };
                if !pdv.is_last {
                    continue;
                }
                msg = match msg {
                    Msg::Command { ctx, buf } => {
                        let service = ctx_service(&self.contexts, ctx);
                        self.on_command(ctx, service, &buf, wr).await?
                    }
                    Msg::Data {
                        ctx,
                        cmd,
                        ingest,
                        refused,
                    } => {
                        self.on_dataset(ctx, &cmd, ingest, refused, wr).await?;
                        Msg::Idle
                    }
                    Msg::Idle => Msg::Idle,
                };
            }
        }
    }

    /// A complete command set arrived on context `ctx`.
    async fn on_command<W: AsyncWrite + Unpin>(
        &mut self,
        ctx: u8,
        service: Option<Service>,
        buf: &[u8],
        wr: &mut W,
    ) -> Result<Msg, Failure> {
        let cmd = dimse::decode(buf).map_err(|e| {
            Failure::abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                format!("bad command set: {e}"),
            )
        })?;
        match (cmd.command_field, service) {
            (dimse::C_ECHO_RQ, Some(Service::Verification)) if !cmd.has_dataset => {
                self.respond(ctx, &cmd, status::SUCCESS, None, wr).await?;
                log::debug!(peer:% = self.peer, calling_ae:% = self.calling_ae; "C-ECHO answered");
                Ok(Msg::Idle)
            }
            (dimse::C_STORE_RQ, Some(Service::Storage)) if cmd.has_dataset => {
                let (ingest, refused) = match self.begin_store(ctx, &cmd) {
                    Ok(i) => (Some(i), None),
                    Err(r) => (None, Some(r)),
                };
                Ok(Msg::Data {
                    ctx,
                    cmd,
                    ingest,
                    refused,
                })
            }
            (field, _) if cmd.has_dataset => Ok(Msg::Data {
                ctx,
                refused: Some((
                    status::UNRECOGNIZED_OPERATION,
                    format!("command {field:#06x} not supported on this presentation context"),
                )),
                cmd,
                ingest: None,
            }),
            (field, _) => {
                log::warn!(peer:% = self.peer, calling_ae:% = self.calling_ae; "unsupported DIMSE command {field:#06x}");
                self.respond(
                    ctx,
                    &cmd,
                    status::UNRECOGNIZED_OPERATION,
                    Some("operation not supported"),
                    wr,
                )
                .await?;
                Ok(Msg::Idle)
            }
        }
    }

    /// Checks the C-STORE command against its context and opens the spool file.
    fn begin_store(&self, ctx: u8, cmd: &Command) -> Result<Box<Ingest>, (u16, String)> {
        let context = self
            .contexts
            .get(&ctx)
            .ok_or((status::CANNOT_UNDERSTAND, "no context".to_owned()))?;
        let sop_class = uid::validate(&cmd.affected_sop_class_uid).ok_or_else(|| {
            (
                status::CANNOT_UNDERSTAND,
                "Affected SOP Class UID is not a valid UID".to_owned(),
            )
        })?;
        let sop_instance = uid::validate(&cmd.affected_sop_instance_uid).ok_or_else(|| {
            (
                status::CANNOT_UNDERSTAND,
                "Affected SOP Instance UID is not a valid UID".to_owned(),
            )
        })?;
        if sop_class != context.abstract_syntax {
            return Err((
                status::DATASET_DOES_NOT_MATCH_SOP_CLASS,
                format!(
                    "SOP class {sop_class} sent on a context for {}",
                    context.abstract_syntax
                ),
            ));
        }
        let incoming = IncomingInstance {
            sop_class_uid: sop_class.to_owned(),
            sop_instance_uid: sop_instance.to_owned(),
            transfer_syntax: context.transfer_syntax.clone(),
            calling_ae: self.calling_ae.clone(),
            // PS3.7 section 9.1.1.1: Priority 0x0001 is HIGH.
            high_priority: cmd.priority == 0x0001,
        };
        self.shared
            .store
            .begin(incoming)
            .map(Box::new)
            .map_err(|e| error::store_status(&e))
    }

    /// The last fragment of a dataset arrived: make it durable, then answer.
    async fn on_dataset<W: AsyncWrite + Unpin>(
        &mut self,
        ctx: u8,
        cmd: &Command,
        ingest: Option<Box<Ingest>>,
        refused: Option<(u16, String)>,
        wr: &mut W,
    ) -> Result<(), Failure> {
        let result = match (ingest, refused) {
            (_, Some(r)) => Err(r),
            (Some(i), None) => i.finish().map_err(|e| error::store_status(&e)),
            (None, None) => Err((status::CANNOT_UNDERSTAND, "no data set".to_owned())),
        };
        let sop = uid::validate(&cmd.affected_sop_instance_uid).unwrap_or("(invalid UID)");
        match result {
            Ok(stored) => {
                match stored.outcome {
                    crate::store::CommitOutcome::Duplicate => self.tally.duplicates += 1,
                    _ => self.tally.stored += 1,
                }
                crate::metrics::get().cstore(status::SUCCESS, stored.size);
                // The answer first: the log line is not on the modality's critical path.
                let sent = self.respond(ctx, cmd, status::SUCCESS, None, wr).await;
                log::info!(
                    calling_ae:% = self.calling_ae, sop_instance_uid:% = sop,
                    study_instance_uid:% = stored.study_instance_uid, size = stored.size, outcome:? = stored.outcome;
                    "instance stored"
                );
                sent
            }
            Err((code, why)) => {
                self.tally.failed += 1;
                crate::metrics::get().cstore(code, 0);
                log::warn!(
                    peer:% = self.peer, calling_ae:% = self.calling_ae, sop_instance_uid:% = sop,
                    dimse_status:% = format!("{code:04X}"), reason:% = why;
                    "C-STORE failed: {}", dimse::status_name(code)
                );
                self.respond(ctx, cmd, code, Some(&why), wr).await
            }
        }
    }

    async fn respond<W: AsyncWrite + Unpin>(
        &self,
        ctx: u8,
        cmd: &Command,
        code: u16,
        comment: Option<&str>,
        wr: &mut W,
    ) -> Result<(), Failure> {
        let rsp = dimse::response(cmd, code, comment);
        let bytes = pdu::pdata_single(ctx, true, true, &rsp);
        pdu::send_bytes(wr, &bytes, self.shared.config.gateway.write_timeout)
            .await
            .map_err(|e| Failure::gone(format!("sending response: {e}")))
    }
}

fn ctx_service(contexts: &HashMap<u8, Context>, ctx: u8) -> Option<Service> {
    contexts.get(&ctx).map(|c| c.service)
}

fn pdu_name(p: &Pdu) -> &'static str {
    match p {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "of unknown type",
    }
}

/// Sends A-ABORT (PS3.8 section 9.3.8), best effort.
async fn abort<W: AsyncWrite + Unpin>(
    wr: &mut W,
    reason: AbortRQServiceProviderReason,
    timeout: std::time::Duration,
) {
    let pdu = Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    };
    let _ = pdu::send(wr, &pdu, timeout).await;
    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
}

/// After A-ASSOCIATE-RJ the requestor closes the connection; wait for that (ARTIM), then drop.
async fn linger<R: AsyncRead + Unpin>(reader: &mut PduReader<R>, artim: std::time::Duration) {
    let _ = tokio::time::timeout(artim, async {
        let mut sink = [0u8; 512];
        loop {
            match tokio::io::AsyncReadExt::read(reader.get_mut(), &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
