//! The C-STORE SCU toward a PACS: one association as requestor (PS3.8 section 7.1), C-STORE
//! (PS3.7 section 9.1.1) of spool files as they lie on disk, and C-ECHO (PS3.7 section 9.1.5).
//!
//! Framing and command sets are the gateway's own ([`crate::association::pdu`],
//! [`crate::association::dimse`]); dicom-ul only encodes and decodes the association PDUs. Its
//! `ClientAssociation` is not used: it has no timeouts by default, connects the socket itself
//! (TCP_NODELAY settable only after negotiation; name resolution and connect failures in one
//! error), drops the per-context reasons when nothing is accepted, and its `AsyncPDataWriter`
//! sends whatever it holds as the *last* fragment when dropped (after a failed read or a
//! cancelled write: a truncated instance marked complete), through `block_in_place` (a panic on
//! a current-thread runtime) and without a timeout.
//!
//! DICOM TLS (PS3.15 Annex B, profile in [`crate::tls`]): with `destination.tls` the TCP
//! connection is wrapped in TLS before the A-ASSOCIATE-RQ: the PACS certificate is verified
//! against `tls.ca` (or the system trust store) and `tls.server_name`, and a client certificate
//! is presented if configured. A failed handshake is [`UpstreamError::Tls`], with the reason
//! (expired, unknown issuer, name mismatch, refused client certificate) rather than a network
//! error.
//!
//! Bounds:
//! - name resolution, TCP connect, TLS handshake and negotiation share one deadline,
//!   `connect_timeout`;
//! - every PDU write and every wait for a response is limited by `dimse_timeout`;
//! - a dataset is read from the file straight into PDU-framed buffers of about [`BATCH_BYTES`]:
//!   at most three per association (the batch being sent, the next one being read, and the
//!   first batch of the next instance, [`prepare`]); nothing else of it is held in memory;
//! - PDUs from the PACS are limited to [`RECEIVE_MAX_PDU`] (announced), control PDUs to 1 MiB.
//!
//! After an error for which [`UpstreamError::is_connection_level`] is true the association is
//! gone (an A-ABORT was sent where PS3.8 section 9.2 asks for one): drop the [`Upstream`].
//! Dropping an `Upstream` without [`Upstream::release`] closes the connection without A-RELEASE;
//! so does cancelling a `store` or `echo` future, after which the association must be dropped.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read, Seek};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationAC, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderASCEReason, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ, Pdu,
    PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
};
use snafu::Snafu;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::association::dimse::{self, Command, C_ECHO_RQ, C_STORE_RQ, RESPONSE_BIT};
use crate::association::pdu::{self, Frame, FrameError, PduReader};
use crate::config::{AeTitle, Destination, DestinationTls};
use crate::sop;
use crate::store::spool::{self, FileMeta, SpoolSlice};
use crate::tls;
use crate::uid::{self, APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION};

/// Explicit VR Little Endian (PS3.5 section A.2).
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Largest PDU the gateway accepts from a PACS (announced in A-ASSOCIATE-RQ, PS3.8 D.1). Only
/// responses come back, a few hundred bytes each.
pub const RECEIVE_MAX_PDU: u32 = 65_536;
/// Largest P-DATA-TF PDU sent, even to a PACS that allows more or announces 0 (no limit).
pub const SEND_PDU_CAP: u32 = 262_144;
/// A PACS announcing less than this is refused: the data would go in absurdly many PDUs.
pub const MIN_PEER_PDU: u32 = 1024;
/// Assumed when an A-ASSOCIATE-AC lacks the (mandatory) Maximum Length sub-item.
const DEFAULT_PEER_PDU: u32 = 16_384;
/// Bytes of framed PDUs filled from the file per read and sent per socket write.
pub const BATCH_BYTES: usize = 262_144;
/// PS3.8 section 9.3.2.2: presentation context IDs are odd numbers 1..=255.
pub const MAX_CONTEXTS: usize = 128;
/// P-DATA-TF header (6) + PDV item length (4) + context ID + message control header.
const PDV_PDU_HEADER: usize = 12;
/// A response command set is a few hundred bytes; this bounds what a PACS can make us hold.
const MAX_COMMAND_SET: usize = 64 * 1024;
/// A-ABORT is best effort: a socket that cannot take 2 s of writing is dead anyway.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// One (SOP class, stored transfer syntax) pair the association should be able to send.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offer {
    pub sop_class_uid: String,
    pub transfer_syntax: String,
}

/// A C-STORE-RSP (PS3.7 section 9.3.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreResponse {
    pub status: u16,
    /// Error Comment (0000,0902), if the PACS sent one.
    pub comment: Option<String>,
    pub sop_instance_uid: String,
    /// Dataset bytes sent.
    pub bytes: u64,
}

/// A proposed presentation context and the PACS's answer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
    pub result: ContextResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextResult {
    /// Accepted with this transfer syntax (one of those proposed).
    Accepted(String),
    /// Not usable; the PS3.8 Table 9-18 reason, or why the gateway does not trust the answer.
    Rejected(&'static str),
}

/// The PACS end of an association, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub destination: String,
    pub address: String,
    pub called_ae: AeTitle,
    pub calling_ae: AeTitle,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PACS {} ({}, AE {})",
            self.destination, self.address, self.called_ae
        )
    }
}

/// Where in the exchange something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Resolve,
    Connect,
    TlsHandshake,
    Negotiate,
    SendCommand,
    SendData,
    AwaitResponse,
    Release,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Resolve => "resolving its address",
            Step::Connect => "connecting",
            Step::TlsHandshake => "performing the TLS handshake",
            Step::Negotiate => "negotiating the association",
            Step::SendCommand => "sending a request",
            Step::SendData => "sending the data set",
            Step::AwaitResponse => "waiting for the response",
            Step::Release => "releasing the association",
        })
    }
}

#[derive(Debug, Snafu)]
pub enum UpstreamError {
    #[snafu(display("cannot resolve the address of {peer}: {source} — check destination.address and this host's DNS"))]
    Resolve { peer: Arc<Peer>, source: io::Error },
    #[snafu(display("cannot connect to {peer}{}: {source} — {}", addr.map(|a| format!(" at {a}")).unwrap_or_default(), connect_hint(source)))]
    Connect {
        peer: Arc<Peer>,
        addr: Option<SocketAddr>,
        source: io::Error,
    },
    #[snafu(display("TLS with {peer} failed: {reason}"))]
    Tls {
        peer: Arc<Peer>,
        /// What went wrong, in words for the status (from [`tls::explain`]).
        reason: String,
        /// A certificate or TLS file must be fixed by someone (expired, unknown issuer, name
        /// mismatch, refused client certificate, unreadable file), rather than a passing fault.
        certificate_problem: bool,
    },
    #[snafu(display("{peer} rejected the association {}: {} (source: {}) — {}", rj_result(&rj.result), rj_reason(&rj.source), rj_source(&rj.source), rj_hint(rj, peer)))]
    Rejected { peer: Arc<Peer>, rj: AssociationRJ },
    #[snafu(display("{peer} aborted the association while {step} ({}) — {}", abort_words(by), if *step == Step::Negotiate { "often the PACS refusing an unknown calling AE or host without A-ASSOCIATE-RJ; its log says why" } else { "its log says why; the gateway retries" }))]
    Aborted {
        peer: Arc<Peer>,
        step: Step,
        by: AbortRQSource,
    },
    #[snafu(display("connection to {peer} lost while {step}: {detail}{}", if *step == Step::Negotiate { format!(" — the PACS hung up without answering: often it refuses the calling AE {} or this host silently; its log says why", peer.calling_ae) } else { String::new() }))]
    ConnectionLost {
        peer: Arc<Peer>,
        step: Step,
        detail: String,
    },
    #[snafu(display("{peer} timed out after {} s while {step} — {}", after.as_secs(), timeout_hint(*step)))]
    Timeout {
        peer: Arc<Peer>,
        step: Step,
        after: Duration,
    },
    #[snafu(display(
        "{peer} broke the DICOM protocol while {step}: {detail}; the association was aborted"
    ))]
    Protocol {
        peer: Arc<Peer>,
        step: Step,
        detail: String,
    },
    #[snafu(display("{peer} accepted no presentation context for {} in {}; proposed: {} — configure the PACS to accept it (the gateway does not convert transfer syntaxes)", sop::describe(sop_class), sop::describe(transfer_syntax), proposed.join("; ")))]
    NoContext {
        peer: Arc<Peer>,
        sop_class: String,
        transfer_syntax: String,
        /// One line per context proposed for this SOP class, with the PACS's answer.
        proposed: Vec<String>,
    },
    #[snafu(display("{} in {} was not proposed when the association with {peer} was opened (at most {} per association); it goes on a new association", sop::describe(sop_class), sop::describe(transfer_syntax), MAX_CONTEXTS - 1))]
    NotOffered {
        peer: Arc<Peer>,
        sop_class: String,
        transfer_syntax: String,
    },
    #[snafu(display("cannot read spool file {} for {peer}: {source}{}", path.display(), if *association_lost { "; the association was aborted mid-instance" } else { "" }))]
    File {
        peer: Arc<Peer>,
        path: PathBuf,
        source: io::Error,
        /// The command had been sent: the association was aborted.
        association_lost: bool,
    },
}

impl UpstreamError {
    /// Whether the association (or the attempt to open one) is finished.
    pub fn is_connection_level(&self) -> bool {
        match self {
            UpstreamError::NoContext { .. } | UpstreamError::NotOffered { .. } => false,
            UpstreamError::File {
                association_lost, ..
            } => *association_lost,
            _ => true,
        }
    }

    pub fn peer(&self) -> &Peer {
        match self {
            UpstreamError::Resolve { peer, .. }
            | UpstreamError::Connect { peer, .. }
            | UpstreamError::Tls { peer, .. }
            | UpstreamError::Rejected { peer, .. }
            | UpstreamError::Aborted { peer, .. }
            | UpstreamError::ConnectionLost { peer, .. }
            | UpstreamError::Timeout { peer, .. }
            | UpstreamError::Protocol { peer, .. }
            | UpstreamError::NoContext { peer, .. }
            | UpstreamError::NotOffered { peer, .. }
            | UpstreamError::File { peer, .. } => peer,
        }
    }

    /// The A-ABORT to send after this error, if the association is still open (PS3.8 section
    /// 9.3.8): our own decision to give up is a service-user abort, a protocol violation by the
    /// PACS a service-provider abort.
    fn abort_source(&self) -> Option<AbortRQSource> {
        match self {
            UpstreamError::Timeout { .. }
            | UpstreamError::File {
                association_lost: true,
                ..
            } => Some(AbortRQSource::ServiceUser),
            UpstreamError::Protocol { .. } => Some(AbortRQSource::ServiceProvider(
                AbortRQServiceProviderReason::ReasonNotSpecified,
            )),
            _ => None,
        }
    }
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "nothing listens there: is the PACS's DICOM service running, and is the port right?"
        }
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            "no route to the PACS: check the network, VLAN and firewall"
        }
        io::ErrorKind::PermissionDenied => "a local firewall rule forbids the connection",
        _ => "check that the PACS is reachable from this gateway",
    }
}

fn timeout_hint(step: Step) -> &'static str {
    match step {
        Step::Resolve => "DNS did not answer in time (destination.connect_timeout_secs)",
        Step::Connect => "no answer to the TCP connection request: the host is down or a firewall drops it (destination.connect_timeout_secs)",
        Step::TlsHandshake => "the port accepted the connection but the TLS handshake did not finish: is it a DICOM TLS port? (destination.connect_timeout_secs)",
        Step::Negotiate => "the port accepted the connection but nothing answered the A-ASSOCIATE-RQ: is it a DICOM port, and is the PACS overloaded? (destination.connect_timeout_secs)",
        Step::SendCommand | Step::SendData => "the PACS stopped reading: overloaded or stalled (destination.dimse_timeout_secs)",
        Step::AwaitResponse => "the PACS is overloaded or slow to store; raise destination.dimse_timeout_secs if it is merely slow",
        Step::Release => "harmless: everything sent before was answered",
    }
}

/// PS3.8 Table 9-21, Result.
fn rj_result(r: &AssociationRJResult) -> &'static str {
    match r {
        AssociationRJResult::Permanent => "permanently",
        AssociationRJResult::Transient => "for now (transient)",
    }
}

/// PS3.8 Table 9-21, Source.
fn rj_source(s: &AssociationRJSource) -> &'static str {
    match s {
        AssociationRJSource::ServiceUser(_) => "DICOM UL service-user",
        AssociationRJSource::ServiceProviderASCE(_) => {
            "DICOM UL service-provider, ACSE related function"
        }
        AssociationRJSource::ServiceProviderPresentation(_) => {
            "DICOM UL service-provider, presentation related function"
        }
    }
}

/// PS3.8 Table 9-21, Reason/Diag., in the standard's words.
fn rj_reason(s: &AssociationRJSource) -> String {
    match s {
        AssociationRJSource::ServiceUser(r) => match r {
            AssociationRJServiceUserReason::NoReasonGiven => "no-reason-given".into(),
            AssociationRJServiceUserReason::ApplicationContextNameNotSupported => {
                "application-context-name-not-supported".into()
            }
            AssociationRJServiceUserReason::CallingAETitleNotRecognized => {
                "calling-AE-title-not-recognized".into()
            }
            AssociationRJServiceUserReason::CalledAETitleNotRecognized => {
                "called-AE-title-not-recognized".into()
            }
            AssociationRJServiceUserReason::Reserved(x) => format!("reserved reason {x}"),
        },
        AssociationRJSource::ServiceProviderASCE(r) => match r {
            AssociationRJServiceProviderASCEReason::NoReasonGiven => "no-reason-given".into(),
            AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported => {
                "protocol-version-not-supported".into()
            }
        },
        AssociationRJSource::ServiceProviderPresentation(r) => match r {
            AssociationRJServiceProviderPresentationReason::TemporaryCongestion => {
                "temporary-congestion".into()
            }
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded => {
                "local-limit-exceeded".into()
            }
            AssociationRJServiceProviderPresentationReason::Reserved(x) => {
                format!("reserved reason {x}")
            }
        },
    }
}

fn rj_hint(rj: &AssociationRJ, peer: &Peer) -> String {
    use AssociationRJServiceUserReason as U;
    match &rj.source {
        AssociationRJSource::ServiceUser(U::CallingAETitleNotRecognized) => format!(
            "register {} (and this gateway's IP address, if the PACS checks hosts) at the PACS, or set destination.calling_ae to a title it knows",
            peer.calling_ae
        ),
        AssociationRJSource::ServiceUser(U::CalledAETitleNotRecognized) => format!(
            "the PACS does not answer to {}: correct destination.ae_title",
            peer.called_ae
        ),
        AssociationRJSource::ServiceUser(U::ApplicationContextNameNotSupported)
        | AssociationRJSource::ServiceProviderASCE(
            AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
        ) => "the peer does not accept standard DICOM associations: is destination.address a DICOM port?".into(),
        AssociationRJSource::ServiceProviderPresentation(_) => {
            "the PACS is busy; the gateway retries (lower destination.max_associations if this persists)".into()
        }
        _ if rj.result == AssociationRJResult::Permanent => format!(
            "the PACS gave no usable reason; its log says why (often an unregistered calling AE {} or host)",
            peer.calling_ae
        ),
        _ => "the gateway retries".into(),
    }
}

/// PS3.8 Table 9-26, Source and Reason/Diag.
fn abort_words(s: &AbortRQSource) -> String {
    match s {
        AbortRQSource::ServiceUser => "A-ABORT from the DICOM UL service-user".into(),
        AbortRQSource::ServiceProvider(r) => {
            let reason = match r {
                AbortRQServiceProviderReason::ReasonNotSpecified => "reason-not-specified",
                AbortRQServiceProviderReason::UnrecognizedPdu => "unrecognized-PDU",
                AbortRQServiceProviderReason::UnexpectedPdu => "unexpected-PDU",
                AbortRQServiceProviderReason::Reserved => "reserved",
                AbortRQServiceProviderReason::UnrecognizedPduParameter => {
                    "unrecognized-PDU parameter"
                }
                AbortRQServiceProviderReason::UnexpectedPduParameter => "unexpected-PDU parameter",
                AbortRQServiceProviderReason::InvalidPduParameter => "invalid-PDU-parameter value",
            };
            format!("A-ABORT from the DICOM UL service-provider: {reason}")
        }
        AbortRQSource::Reserved => "A-ABORT with a reserved source".into(),
    }
}

/// PS3.8 Table 9-18, Result/Reason.
fn context_rejection(r: &PresentationContextResultReason) -> &'static str {
    match r {
        PresentationContextResultReason::Acceptance => "acceptance",
        PresentationContextResultReason::UserRejection => "user-rejection",
        PresentationContextResultReason::NoReason => "no-reason (provider rejection)",
        PresentationContextResultReason::AbstractSyntaxNotSupported => {
            "abstract-syntax-not-supported (provider rejection)"
        }
        PresentationContextResultReason::TransferSyntaxesNotSupported => {
            "transfer-syntaxes-not-supported (provider rejection)"
        }
    }
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
        Pdu::Unknown { .. } => "PDU of unknown type",
    }
}

/// A framing error while `step` was in progress; `limit` is the timeout that applied.
fn frame_error(peer: &Arc<Peer>, step: Step, e: FrameError, limit: Duration) -> UpstreamError {
    let peer = peer.clone();
    match e {
        FrameError::Timeout => UpstreamError::Timeout {
            peer,
            step,
            after: limit,
        },
        FrameError::Closed => UpstreamError::ConnectionLost {
            peer,
            step,
            detail: "the PACS closed the connection".into(),
        },
        // With TLS 1.3 the PACS judges our client certificate after our side of the handshake
        // is done: its refusal arrives as an alert on the first read (PS3.8 negotiation).
        FrameError::Io(e) if tls::is_tls_error(&e) => {
            let f = tls::explain(&e, tls::Side::Upstream);
            UpstreamError::Tls {
                peer,
                reason: f.reason,
                certificate_problem: f.certificate_problem,
            }
        }
        FrameError::Io(e) => UpstreamError::ConnectionLost {
            peer,
            step,
            detail: e.to_string(),
        },
        e @ (FrameError::TooLong { .. } | FrameError::Malformed(_)) => UpstreamError::Protocol {
            peer,
            step,
            detail: e.to_string(),
        },
    }
}

/// The error for a PDU other than the one awaited: A-ABORT ends the association, anything else
/// violates the protocol.
fn unexpected(peer: &Arc<Peer>, step: Step, frame: Frame<'_>, awaited: &str) -> UpstreamError {
    let got = match frame {
        Frame::Other(Pdu::AbortRQ { source }) => {
            return UpstreamError::Aborted {
                peer: peer.clone(),
                step,
                by: source,
            }
        }
        Frame::Other(p) => pdu_name(&p),
        Frame::PData(_) => "P-DATA-TF",
    };
    protocol(peer, step, format!("{got} instead of {awaited}"))
}

fn protocol(peer: &Arc<Peer>, step: Step, detail: impl Into<String>) -> UpstreamError {
    UpstreamError::Protocol {
        peer: peer.clone(),
        step,
        detail: detail.into(),
    }
}

/// One open association with a PACS.
pub struct Upstream {
    peer: Arc<Peer>,
    reader: PduReader<ReadHalf<Link>>,
    writer: WriteHalf<Link>,
    contexts: Vec<ProposedContext>,
    /// Largest PDU-length sent: the PACS's maximum, capped at [`SEND_PDU_CAP`]; at least
    /// [`MIN_PEER_PDU`].
    send_max_pdu: u32,
    dimse_timeout: Duration,
    /// Message ID of the last request (PS3.7 section 9.1.1.1: unique among outstanding ones;
    /// there is never more than one outstanding).
    message_id: u16,
    /// Set after a connection-level error: nothing more may be sent.
    broken: bool,
    /// The buffer later batches of a dataset are read into while the one before is sent
    /// (the first batch comes with the [`Prepared`] instance); reused from one instance to the
    /// next.
    buf_next: Vec<u8>,
}

impl Upstream {
    /// Connects and negotiates within `dest.connect_timeout`. Proposes Verification, then one
    /// presentation context per distinct offer (stored transfer syntax first; for uncompressed
    /// ones also the other of explicit/implicit VR little endian), at most [`MAX_CONTEXTS`] in
    /// all; later offers are not proposed ([`UpstreamError::NotOffered`] when sent). The
    /// association is returned even if the PACS accepted none of them: see [`Self::contexts`].
    pub async fn connect(dest: &Destination, offers: &[Offer]) -> Result<Upstream, UpstreamError> {
        let peer = Arc::new(Peer {
            destination: dest.name.clone(),
            address: dest.address.clone(),
            called_ae: dest.ae_title.clone(),
            calling_ae: dest.calling_ae.clone(),
        });
        let limit = dest.connect_timeout;
        let deadline = Instant::now() + limit;
        let left = || deadline.saturating_duration_since(Instant::now());
        let stream = open(&peer, deadline, limit).await?;
        let link = match &dest.tls {
            None => Link::Plain(stream),
            Some(t) => Link::Tls(Box::new(
                start_tls(&peer, t, stream, deadline, limit).await?,
            )),
        };
        let (rd, mut wr) = tokio::io::split(link);
        let mut reader = PduReader::new(rd);
        let mut contexts = propose(offers);
        let rq = Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: dest.calling_ae.as_str().to_owned(),
            called_ae_title: dest.ae_title.as_str().to_owned(),
            application_context_name: APPLICATION_CONTEXT.to_owned(),
            presentation_contexts: contexts
                .iter()
                .map(|c| PresentationContextProposed {
                    id: c.id,
                    abstract_syntax: c.abstract_syntax.clone(),
                    transfer_syntaxes: c.transfer_syntaxes.clone(),
                })
                .collect(),
            user_variables: vec![
                UserVariableItem::MaxLength(RECEIVE_MAX_PDU),
                UserVariableItem::ImplementationClassUID(uid::IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(
                    uid::IMPLEMENTATION_VERSION_NAME.into(),
                ),
            ],
        });
        let step = Step::Negotiate;
        let answer = match pdu::send(&mut wr, &rq, left()).await {
            Ok(()) => reader.next(left(), RECEIVE_MAX_PDU).await,
            Err(e) => Err(e),
        };
        let result = match answer {
            Ok(Frame::Other(Pdu::AssociationAC(ac))) => {
                apply_ac(&mut contexts, &ac).map_err(|detail| protocol(&peer, step, detail))
            }
            Ok(Frame::Other(Pdu::AssociationRJ(rj))) => Err(UpstreamError::Rejected {
                peer: peer.clone(),
                rj,
            }),
            Ok(other) => Err(unexpected(&peer, step, other, "A-ASSOCIATE-AC/RJ")),
            Err(e) => Err(frame_error(&peer, step, e, limit)),
        };
        let send_max_pdu = match result {
            Ok(m) => m,
            Err(e) => {
                if let Some(source) = e.abort_source() {
                    abort(&mut wr, source, ABORT_TIMEOUT).await;
                }
                return Err(e);
            }
        };
        log::debug!(
            destination:% = peer.destination, address:% = peer.address, called_ae:% = peer.called_ae,
            accepted = contexts.iter().filter(|c| matches!(c.result, ContextResult::Accepted(_))).count(),
            proposed = contexts.len(), max_pdu = send_max_pdu;
            "association established"
        );
        Ok(Upstream {
            peer,
            reader,
            writer: wr,
            contexts,
            send_max_pdu,
            dimse_timeout: dest.dimse_timeout,
            message_id: 0,
            broken: false,
            buf_next: Vec::new(),
        })
    }

    /// Whether an instance stored in `ts` with `sop_class` can be sent as-is.
    pub fn can_send(&self, sop_class: &str, ts: &str) -> bool {
        self.context_for(sop_class, ts).is_some()
    }

    /// Every proposed context with the PACS's answer, Verification first.
    pub fn contexts(&self) -> &[ProposedContext] {
        &self.contexts
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Largest PDU-length this association sends.
    pub fn send_max_pdu(&self) -> u32 {
        self.send_max_pdu
    }

    /// False after a connection-level error.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Sends one spool file with C-STORE and returns the PACS's answer. The dataset is streamed
    /// from the file after its file meta group; it is never in memory as a whole.
    pub async fn store(
        &mut self,
        source: impl Into<SpoolSlice>,
        priority: u16,
    ) -> Result<StoreResponse, UpstreamError> {
        self.check_usable()?;
        let source = source.into();
        let (file, meta, len) = open_spool(source.clone())
            .await
            .map_err(|e| self.file_error(&source, e, false))?;
        let Some(ctx) = self.context_for(&meta.sop_class_uid, &meta.transfer_syntax) else {
            return Err(self.no_context(&meta.sop_class_uid, &meta.transfer_syntax));
        };
        let max_data = self.max_data();
        let prepared = blocking(source.clone(), move || {
            Prepared::read_first(source, (file, meta, len), ctx, max_data)
        })
        .await;
        self.store_prepared(prepared, priority).await
    }

    /// The presentation context for instances of `sop_class` in `ts` on this association, if
    /// the PACS accepted one ([`prepare`] needs it).
    pub fn context_id(&self, sop_class: &str, ts: &str) -> Option<u8> {
        self.context_for(sop_class, ts)
    }

    /// Sends an instance [`prepare`]d for this association (its file opened and its first
    /// batch read while the previous instance was still being answered) and returns the PACS's
    /// answer. `prepared` carries the preparation's error, reported as [`Self::store`] would.
    pub async fn store_prepared(
        &mut self,
        prepared: Result<Prepared, (SpoolSlice, io::Error)>,
        priority: u16,
    ) -> Result<StoreResponse, UpstreamError> {
        self.check_usable()?;
        let p = prepared.map_err(|(source, e)| self.file_error(&source, e, false))?;
        let Prepared {
            source,
            meta,
            len,
            ctx,
            max_data,
            first,
        } = p;
        if self.context_for(&meta.sop_class_uid, &meta.transfer_syntax) != Some(ctx)
            || max_data != self.max_data()
        {
            // Prepared for another association, or the file's meta names another class or
            // syntax than the index did.
            return Err(self.no_context(&meta.sop_class_uid, &meta.transfer_syntax));
        }
        let cmd = Command {
            command_field: C_STORE_RQ,
            message_id: self.next_message_id(),
            affected_sop_class_uid: meta.sop_class_uid.clone(),
            affected_sop_instance_uid: meta.sop_instance_uid.clone(),
            priority,
            has_dataset: true,
            ..Command::default()
        };
        let result = match self.send_store(ctx, &cmd, first).await {
            Ok(()) => self.await_response(ctx, &cmd).await,
            Err(SendFailure::Net(e)) => Err(e),
            Err(SendFailure::File {
                source: e,
                sent_command,
            }) => Err(self.file_error(&source, e, sent_command)),
        };
        match result {
            Ok(rsp) => Ok(StoreResponse {
                status: rsp.status,
                comment: rsp.comment,
                sop_instance_uid: meta.sop_instance_uid,
                bytes: len,
            }),
            Err(e) => Err(self.fail(e).await),
        }
    }

    fn file_error(
        &self,
        source: &SpoolSlice,
        e: io::Error,
        association_lost: bool,
    ) -> UpstreamError {
        UpstreamError::File {
            peer: self.peer.clone(),
            path: source.path.clone(),
            source: e,
            association_lost,
        }
    }

    /// C-ECHO (PS3.7 section 9.1.5) on the Verification context; returns the status.
    pub async fn echo(&mut self) -> Result<u16, UpstreamError> {
        self.check_usable()?;
        let Some(ctx) = self
            .contexts
            .iter()
            .find(|c| {
                c.abstract_syntax == VERIFICATION && matches!(c.result, ContextResult::Accepted(_))
            })
            .map(|c| c.id)
        else {
            return Err(self.no_context(VERIFICATION, IMPLICIT_VR_LE));
        };
        let cmd = Command {
            command_field: C_ECHO_RQ,
            message_id: self.next_message_id(),
            affected_sop_class_uid: VERIFICATION.to_owned(),
            has_dataset: false,
            ..Command::default()
        };
        let bytes = frame_all(ctx, true, &dimse::request(&cmd), self.max_data());
        let result = match pdu::send_bytes(&mut self.writer, &bytes, self.dimse_timeout).await {
            Ok(()) => self.await_response(ctx, &cmd).await,
            Err(e) => Err(frame_error(
                &self.peer,
                Step::SendCommand,
                e,
                self.dimse_timeout,
            )),
        };
        match result {
            Ok(rsp) => Ok(rsp.status),
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// A-RELEASE (PS3.8 section 7.2) within `dimse_timeout`; A-ABORT if that fails.
    pub async fn release(mut self) {
        if self.broken {
            return;
        }
        if let Err(e) = self.try_release().await {
            log::warn!(
                destination:% = self.peer.destination, address:% = self.peer.address, reason:% = e;
                "association release failed; aborted"
            );
            abort(&mut self.writer, AbortRQSource::ServiceUser, ABORT_TIMEOUT).await;
            return;
        }
        let _ = tokio::time::timeout(ABORT_TIMEOUT, self.writer.shutdown()).await;
    }

    async fn try_release(&mut self) -> Result<(), UpstreamError> {
        let (t, step) = (self.dimse_timeout, Step::Release);
        pdu::send(&mut self.writer, &Pdu::ReleaseRQ, t)
            .await
            .map_err(|e| frame_error(&self.peer, step, e, t))?;
        loop {
            match self.reader.next(t, RECEIVE_MAX_PDU).await {
                Ok(Frame::Other(Pdu::ReleaseRP)) => return Ok(()),
                // Release collision, requestor side (PS3.8 section 9.2, states Sta9 and Sta11):
                // answer it, then keep waiting for our A-RELEASE-RP.
                Ok(Frame::Other(Pdu::ReleaseRQ)) => pdu::send(&mut self.writer, &Pdu::ReleaseRP, t)
                    .await
                    .map_err(|e| frame_error(&self.peer, step, e, t))?,
                Ok(other) => return Err(unexpected(&self.peer, step, other, "A-RELEASE-RP")),
                Err(e) => return Err(frame_error(&self.peer, step, e, t)),
            }
        }
    }

    fn check_usable(&self) -> Result<(), UpstreamError> {
        if self.broken {
            return Err(UpstreamError::ConnectionLost {
                peer: self.peer.clone(),
                step: Step::SendCommand,
                detail: "the association failed earlier".into(),
            });
        }
        Ok(())
    }

    /// Marks the association dead after a connection-level error, sending A-ABORT if needed.
    async fn fail(&mut self, e: UpstreamError) -> UpstreamError {
        if e.is_connection_level() {
            self.broken = true;
            if let Some(source) = e.abort_source() {
                abort(
                    &mut self.writer,
                    source,
                    ABORT_TIMEOUT.min(self.dimse_timeout),
                )
                .await;
            }
        }
        e
    }

    fn next_message_id(&mut self) -> u16 {
        self.message_id = self.message_id.checked_add(1).unwrap_or(1);
        self.message_id
    }

    /// PDV data bytes per PDU (at least 1012, as `send_max_pdu` >= [`MIN_PEER_PDU`]). 12 rather
    /// than 6 bytes of overhead are subtracted, as DCMTK does, for peers that count the PDU
    /// header against their limit.
    pub fn max_data(&self) -> usize {
        (self.send_max_pdu as usize)
            .saturating_sub(PDV_PDU_HEADER)
            .max(1)
    }

    fn context_for(&self, sop_class: &str, ts: &str) -> Option<u8> {
        self.contexts
            .iter()
            .find(|c| {
                c.abstract_syntax == sop_class
                    && matches!(&c.result, ContextResult::Accepted(t) if t == ts)
            })
            .map(|c| c.id)
    }

    fn no_context(&self, sop_class: &str, ts: &str) -> UpstreamError {
        let proposed: Vec<String> = self
            .contexts
            .iter()
            .filter(|c| c.abstract_syntax == sop_class)
            .map(|c| {
                let offered = c
                    .transfer_syntaxes
                    .iter()
                    .map(|t| sop::describe(t))
                    .collect::<Vec<_>>();
                let answer = match &c.result {
                    ContextResult::Accepted(t) => format!("accepted in {}", sop::describe(t)),
                    ContextResult::Rejected(r) => format!("rejected: {r}"),
                };
                format!("context {} [{}] {answer}", c.id, offered.join(", "))
            })
            .collect();
        let (peer, sop_class, transfer_syntax) =
            (self.peer.clone(), sop_class.to_owned(), ts.to_owned());
        if proposed.is_empty() {
            UpstreamError::NotOffered {
                peer,
                sop_class,
                transfer_syntax,
            }
        } else {
            UpstreamError::NoContext {
                peer,
                sop_class,
                transfer_syntax,
                proposed,
            }
        }
    }

    /// Sends the C-STORE-RQ command and the dataset, whose first batch `first` was read before
    /// (so an unreadable file leaves the association clean). Each later batch is read (on a
    /// blocking thread) while the one before it is being sent.
    async fn send_store(
        &mut self,
        ctx: u8,
        cmd: &Command,
        first: Batch,
    ) -> Result<(), SendFailure> {
        let max_data = self.max_data();
        let pdus = batch_pdus(max_data);
        let mut next = std::mem::take(&mut self.buf_next);
        let t = self.dimse_timeout;
        let (mut file, mut cur, mut used, mut left) = first;
        let bytes = frame_all(ctx, true, &dimse::request(cmd), max_data);
        pdu::send_bytes(&mut self.writer, &bytes, t)
            .await
            .map_err(|e| SendFailure::Net(frame_error(&self.peer, Step::SendCommand, e, t)))?;
        loop {
            if left == 0 {
                pdu::send_bytes(&mut self.writer, cur.get(..used).unwrap_or_default(), t)
                    .await
                    .map_err(|e| SendFailure::Net(frame_error(&self.peer, Step::SendData, e, t)))?;
                self.buf_next = next;
                return Ok(());
            }
            let reading = read_batch(file, next, ctx, max_data, pdus, left);
            let sending = pdu::send_bytes(&mut self.writer, cur.get(..used).unwrap_or_default(), t);
            let (sent, read) = tokio::join!(sending, reading);
            sent.map_err(|e| SendFailure::Net(frame_error(&self.peer, Step::SendData, e, t)))?;
            let filled;
            (file, filled, used, left) = read.map_err(|source| SendFailure::File {
                source,
                sent_command: true,
            })?;
            next = std::mem::replace(&mut cur, filled);
        }
    }

    /// Reads the response to `rq` (a command set with no data set, PS3.7 section 9.3) and checks
    /// that it answers it.
    async fn await_response(&mut self, ctx: u8, rq: &Command) -> Result<Response, UpstreamError> {
        let (t, step) = (self.dimse_timeout, Step::AwaitResponse);
        let mut set = Vec::new();
        'pdus: loop {
            let frame = self
                .reader
                .next(t, RECEIVE_MAX_PDU)
                .await
                .map_err(|e| frame_error(&self.peer, step, e, t))?;
            let pdvs = match frame {
                Frame::PData(pdvs) => pdvs,
                other => return Err(unexpected(&self.peer, step, other, "a response")),
            };
            for pdv in pdvs {
                if !pdv.is_command || pdv.context_id != ctx {
                    return Err(protocol(
                        &self.peer,
                        step,
                        format!(
                            "{} fragment on presentation context {} where the response command to a request on context {ctx} was expected",
                            if pdv.is_command { "command" } else { "data set" },
                            pdv.context_id
                        ),
                    ));
                }
                if set.len() + pdv.data.len() > MAX_COMMAND_SET {
                    return Err(protocol(
                        &self.peer,
                        step,
                        "response command set larger than 64 KiB",
                    ));
                }
                set.extend_from_slice(pdv.data);
                if pdv.is_last {
                    break 'pdus;
                }
            }
        }
        let rsp = dimse::decode(&set)
            .map_err(|e| protocol(&self.peer, step, format!("malformed response: {e}")))?;
        let expected = rq.command_field | RESPONSE_BIT;
        let answers_other = uid::validate(&rsp.affected_sop_instance_uid)
            .is_some_and(|u| u != rq.affected_sop_instance_uid);
        let problem = match rsp.status {
            _ if rsp.command_field != expected => format!(
                "command field {:#06x} where {expected:#06x} was expected",
                rsp.command_field
            ),
            _ if rsp.message_id_being_responded_to != rq.message_id => format!(
                "response to message {} where {} was outstanding",
                rsp.message_id_being_responded_to, rq.message_id
            ),
            _ if rsp.has_dataset => "response announces a data set".into(),
            _ if answers_other => "response names another SOP instance".into(),
            None => "response without Status (0000,0900)".into(),
            Some(status) => {
                return Ok(Response {
                    status,
                    comment: rsp.error_comment.filter(|c| !c.is_empty()),
                })
            }
        };
        Err(protocol(&self.peer, step, problem))
    }
}

/// A checked response command set.
struct Response {
    status: u16,
    comment: Option<String>,
}

/// How sending a C-STORE request failed.
enum SendFailure {
    Net(UpstreamError),
    /// Reading the spool file failed; `sent_command`: the request was already under way.
    File {
        source: io::Error,
        sent_command: bool,
    },
}

/// Resolves `peer.address` and connects to the first address that answers, all before
/// `deadline`; sets TCP_NODELAY (DESIGN.md section 5).
async fn open(
    peer: &Arc<Peer>,
    deadline: Instant,
    limit: Duration,
) -> Result<TcpStream, UpstreamError> {
    let timeout = |step| UpstreamError::Timeout {
        peer: peer.clone(),
        step,
        after: limit,
    };
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host(peer.address.as_str()))
            .await
        {
            Err(_) => return Err(timeout(Step::Resolve)),
            Ok(Err(source)) => {
                return Err(UpstreamError::Resolve {
                    peer: peer.clone(),
                    source,
                })
            }
            Ok(Ok(a)) => a.collect(),
        };
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timeout(Step::Connect)),
            Ok(Ok(s)) => {
                return match s.set_nodelay(true) {
                    Ok(()) => Ok(s),
                    Err(source) => Err(UpstreamError::Connect {
                        peer: peer.clone(),
                        addr: Some(addr),
                        source,
                    }),
                }
            }
            Ok(Err(e)) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, source)) => UpstreamError::Connect {
            peer: peer.clone(),
            addr: Some(addr),
            source,
        },
        None => UpstreamError::Resolve {
            peer: peer.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "the name has no address"),
        },
    })
}

/// The connection to a PACS: plain TCP, or DICOM TLS over it.
enum Link {
    Plain(TcpStream),
    /// Boxed: a TLS connection state is a few KiB.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// For TLS this sends close_notify first (RFC 8446 section 6.1).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS handshake with the PACS, before `deadline`. The TLS files are read for every
/// connection (off the runtime), so rotated files apply to the next association.
async fn start_tls(
    peer: &Arc<Peer>,
    cfg: &DestinationTls,
    tcp: TcpStream,
    deadline: Instant,
    limit: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let tls_error = |reason: String, certificate_problem: bool| UpstreamError::Tls {
        peer: peer.clone(),
        reason,
        certificate_problem,
    };
    let files = cfg.clone();
    let config = tokio::task::spawn_blocking(move || tls::client_config(&files))
        .await
        .map_err(|e| tls_error(format!("TLS set-up task failed: {e}"), false))?
        .map_err(|e| tls_error(format!("cannot use the TLS files: {e}"), true))?;
    // Validated with the configuration; checked again rather than trusted.
    let name = tls::server_name(&cfg.server_name).ok_or_else(|| {
        tls_error(
            format!(
                "'{}' is not a valid TLS server name (destination.tls.server_name)",
                cfg.server_name
            ),
            true,
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
        Err(_) => Err(UpstreamError::Timeout {
            peer: peer.clone(),
            step: Step::TlsHandshake,
            after: limit,
        }),
        Ok(Err(e)) => {
            let f = tls::explain(&e, tls::Side::Upstream);
            Err(tls_error(f.reason, f.certificate_problem))
        }
        Ok(Ok(s)) => Ok(s),
    }
}

/// Sends A-ABORT (PS3.8 section 9.3.8), best effort, and closes our side.
async fn abort<W: AsyncWrite + Unpin>(wr: &mut W, source: AbortRQSource, limit: Duration) {
    let _ = pdu::send(wr, &Pdu::AbortRQ { source }, limit).await;
    let _ = tokio::time::timeout(limit, wr.shutdown()).await;
}

/// The proposed contexts for `offers`, every result preset to "no answer".
fn propose(offers: &[Offer]) -> Vec<ProposedContext> {
    let unanswered = ContextResult::Rejected("no result in the A-ASSOCIATE-AC");
    let mut out = vec![ProposedContext {
        id: 1,
        abstract_syntax: VERIFICATION.to_owned(),
        transfer_syntaxes: vec![IMPLICIT_VR_LE.to_owned()],
        result: unanswered.clone(),
    }];
    let mut seen = HashSet::new();
    for o in offers {
        if out.len() == MAX_CONTEXTS {
            break;
        }
        // A UID that is not one could not even be encoded; such an offer is NotOffered later.
        let (Some(class), Some(ts)) = (
            uid::validate(&o.sop_class_uid),
            uid::validate(&o.transfer_syntax),
        ) else {
            continue;
        };
        if !seen.insert((class, ts)) {
            continue;
        }
        // Only the stored syntax: the gateway sends datasets as received and does not convert,
        // so another syntax in the same context could be chosen and then not be sendable.
        // Every SCP accepts implicit VR LE (PS3.5 section 10.1), so uncompressed data always
        // finds a context with its own syntax.
        let syntaxes = vec![ts.to_owned()];
        out.push(ProposedContext {
            // out.len() < 128, so the ID is at most 255.
            id: u8::try_from(2 * out.len() + 1).unwrap_or(u8::MAX),
            abstract_syntax: class.to_owned(),
            transfer_syntaxes: syntaxes,
            result: unanswered.clone(),
        });
    }
    out
}

/// Records the PACS's answers (PS3.8 section 9.3.3.2) and returns the PDU-length to send with.
/// A context accepted with a transfer syntax that was not proposed is treated as rejected;
/// results for unknown context IDs are ignored.
fn apply_ac(contexts: &mut [ProposedContext], ac: &AssociationAC) -> Result<u32, String> {
    for r in &ac.presentation_contexts {
        let Some(c) = contexts.iter_mut().find(|c| c.id == r.id) else {
            continue;
        };
        c.result = match r.reason {
            PresentationContextResultReason::Acceptance => {
                match uid::validate(&r.transfer_syntax) {
                    Some(ts) if c.transfer_syntaxes.iter().any(|t| t == ts) => {
                        ContextResult::Accepted(ts.to_owned())
                    }
                    _ => ContextResult::Rejected(
                        "accepted with a transfer syntax that was not proposed",
                    ),
                }
            }
            ref other => ContextResult::Rejected(context_rejection(other)),
        };
    }
    let announced = ac.user_variables.iter().find_map(|v| match v {
        UserVariableItem::MaxLength(n) => Some(*n),
        _ => None,
    });
    match announced.unwrap_or(DEFAULT_PEER_PDU) {
        // PS3.8 section D.1.1: 0 means no limit.
        0 => Ok(SEND_PDU_CAP),
        n if n < MIN_PEER_PDU => Err(format!(
            "maximum PDU length of {n} bytes announced; at least {MIN_PEER_PDU} is needed"
        )),
        n => Ok(n.min(SEND_PDU_CAP)),
    }
}

/// Opens a spooled Part 10 file and reads its file meta group (off the runtime). Returns the
/// file positioned at the dataset, the meta, and the dataset length.
async fn open_spool(source: SpoolSlice) -> io::Result<(std::fs::File, FileMeta, u64)> {
    tokio::task::spawn_blocking(move || open_spool_blocking(&source))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
}

/// Opens a spool file, reads its file meta group and checks its UIDs; returns the file
/// positioned at the dataset, the meta and the dataset length.
fn open_spool_blocking(source: &SpoolSlice) -> io::Result<(std::fs::File, FileMeta, u64)> {
    let mut file = std::fs::File::open(&source.path)?;
    let size = match source.len {
        Some(n) => n,
        None => file.metadata()?.len().saturating_sub(source.offset),
    };
    file.seek(io::SeekFrom::Start(source.offset))?;
    let (meta, offset) = spool::read_header(&mut file)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if uid::validate(&meta.sop_class_uid).is_none()
        || uid::validate(&meta.sop_instance_uid).is_none()
    {
        return Err(bad(
            "file meta group lacks a valid SOP Class or SOP Instance UID",
        ));
    }
    if uid::validate(&meta.transfer_syntax).is_none() {
        return Err(bad("file meta group lacks a valid Transfer Syntax UID"));
    }
    let len = size
        .checked_sub(offset)
        .ok_or_else(|| bad("file shorter than its meta group"))?;
    Ok((file, meta, len))
}

/// The 12 bytes before `n` data bytes: a P-DATA-TF PDU with one PDV item (PS3.8 sections
/// 9.3.5 and E.2; message control header bit 0: command, bit 1: last fragment).
fn pdv_pdu_header(ctx: u8, is_command: bool, is_last: bool, n: usize) -> [u8; PDV_PDU_HEADER] {
    let item = u32::try_from(n + 2).unwrap_or(u32::MAX);
    let pdu = item.saturating_add(4);
    let mut h = [0u8; PDV_PDU_HEADER];
    h[0] = 0x04;
    h[2..6].copy_from_slice(&pdu.to_be_bytes());
    h[6..10].copy_from_slice(&item.to_be_bytes());
    h[10] = ctx;
    h[11] = u8::from(is_command) | (u8::from(is_last) << 1);
    h
}

/// A batch of framed dataset PDUs read from a file: the file (positioned after it), the
/// buffer, the bytes of it used, and the dataset bytes still to send.
type Batch = (std::fs::File, Vec<u8>, usize, u64);

/// PDUs per batch of about [`BATCH_BYTES`].
fn batch_pdus(max_data: usize) -> usize {
    (BATCH_BYTES / (PDV_PDU_HEADER + max_data)).max(1)
}

/// [`fill_batch`] into `buf` (sized here) on a blocking thread.
async fn read_batch(
    mut file: std::fs::File,
    mut buf: Vec<u8>,
    ctx: u8,
    max_data: usize,
    pdus: usize,
    left: u64,
) -> io::Result<Batch> {
    tokio::task::spawn_blocking(move || {
        buf.resize(pdus * (PDV_PDU_HEADER + max_data), 0);
        let (used, left) = fill_batch(&mut file, &mut buf, ctx, false, max_data, pdus, left)?;
        Ok((file, buf, used, left))
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// An instance ready to be sent on an association: its spool file opened and checked, and its
/// first batch of PDUs read for presentation context `ctx` and `max_data` bytes per PDU.
pub struct Prepared {
    source: SpoolSlice,
    meta: FileMeta,
    len: u64,
    ctx: u8,
    max_data: usize,
    first: Batch,
}

impl Prepared {
    /// Reads the first batch of `opened` (from [`open_spool_blocking`]). Blocking.
    fn read_first(
        source: SpoolSlice,
        (mut file, meta, len): (std::fs::File, FileMeta, u64),
        ctx: u8,
        max_data: usize,
    ) -> Result<Prepared, (SpoolSlice, io::Error)> {
        let pdus = batch_pdus(max_data);
        let mut buf = vec![0u8; pdus * (PDV_PDU_HEADER + max_data)];
        match fill_batch(&mut file, &mut buf, ctx, false, max_data, pdus, len) {
            Ok((used, left)) => Ok(Prepared {
                source,
                meta,
                len,
                ctx,
                max_data,
                first: (file, buf, used, left),
            }),
            Err(e) => Err((source, e)),
        }
    }
}

/// Opens `source` and reads its first batch on a blocking thread, for an association where
/// its class and syntax have context `ctx` and PDUs carry `max_data` bytes
/// ([`Upstream::context_id`], [`Upstream::max_data`]); meant to run while the previous
/// instance is being answered. Memory: one batch (about [`BATCH_BYTES`]).
pub async fn prepare(
    source: SpoolSlice,
    ctx: u8,
    max_data: usize,
) -> Result<Prepared, (SpoolSlice, io::Error)> {
    blocking(source.clone(), move || match open_spool_blocking(&source) {
        Ok(opened) => Prepared::read_first(source, opened, ctx, max_data),
        Err(e) => Err((source, e)),
    })
    .await
}

/// Runs a preparation on the blocking pool; a failed task is an error about `source`.
async fn blocking(
    source: SpoolSlice,
    f: impl FnOnce() -> Result<Prepared, (SpoolSlice, io::Error)> + Send + 'static,
) -> Result<Prepared, (SpoolSlice, io::Error)> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err((source, io::Error::other(e.to_string()))))
}

/// Fills `buf` with up to `pdus` PDUs of at most `max_data` data bytes each, read from `src`,
/// of the `left` bytes still to send; the PDU that carries the final byte is marked last (an
/// empty message is one empty last fragment). Returns the bytes of `buf` used and the data
/// still to send. A source shorter than `left` is an error (`UnexpectedEof`), never a
/// short message marked complete.
fn fill_batch(
    src: &mut impl Read,
    buf: &mut [u8],
    ctx: u8,
    is_command: bool,
    max_data: usize,
    pdus: usize,
    mut left: u64,
) -> io::Result<(usize, u64)> {
    let mut pos = 0;
    for _ in 0..pdus {
        let n = usize::try_from(left).map_or(max_data, |l| l.min(max_data));
        let Some(slot) = buf.get_mut(pos..pos + PDV_PDU_HEADER + n) else {
            break;
        };
        let (header, data) = slot.split_at_mut(PDV_PDU_HEADER);
        src.read_exact(data)?;
        left -= n as u64;
        header.copy_from_slice(&pdv_pdu_header(ctx, is_command, left == 0, n));
        pos += PDV_PDU_HEADER + n;
        if left == 0 {
            break;
        }
    }
    Ok((pos, left))
}

/// Frames a whole small message (a command set) into PDUs.
fn frame_all(ctx: u8, is_command: bool, data: &[u8], max_data: usize) -> Vec<u8> {
    let pdus = data.len() / max_data.max(1) + 1;
    let mut buf = vec![0u8; pdus * PDV_PDU_HEADER + data.len()];
    let used = fill_batch(
        &mut &data[..],
        &mut buf,
        ctx,
        is_command,
        max_data,
        pdus,
        data.len() as u64,
    )
    .map_or(0, |(used, _)| used);
    buf.truncate(used);
    buf
}

#[cfg(test)]
mod tests {
    use dicom_ul::pdu::PresentationContextResult;

    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";

    fn offer(class: &str, ts: &str) -> Offer {
        Offer {
            sop_class_uid: class.into(),
            transfer_syntax: ts.into(),
        }
    }

    #[test]
    fn proposes_verification_then_one_context_per_distinct_offer() {
        let c = propose(&[
            offer(CT, EXPLICIT_VR_LE),
            offer(CT, EXPLICIT_VR_LE),
            offer(MR, IMPLICIT_VR_LE),
            offer(CT, JPEG_BASELINE),
            offer("../etc", JPEG_BASELINE),
        ]);
        let summary: Vec<(u8, &str, Vec<&str>)> = c
            .iter()
            .map(|c| {
                let ts = c.transfer_syntaxes.iter().map(String::as_str).collect();
                (c.id, c.abstract_syntax.as_str(), ts)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, VERIFICATION, vec![IMPLICIT_VR_LE]),
                (3, CT, vec![EXPLICIT_VR_LE]),
                (5, MR, vec![IMPLICIT_VR_LE]),
                (7, CT, vec![JPEG_BASELINE]),
            ]
        );
    }

    #[test]
    fn proposes_at_most_128_contexts_with_odd_ids() {
        let offers: Vec<Offer> = (1..=300)
            .map(|i| offer(&format!("1.2.3.{i}"), EXPLICIT_VR_LE))
            .collect();
        let c = propose(&offers);
        assert_eq!(c.len(), MAX_CONTEXTS);
        assert!(c.iter().all(|c| c.id % 2 == 1));
        assert_eq!(c.last().map(|c| c.id), Some(255));
    }

    fn ac(
        results: Vec<(u8, PresentationContextResultReason, &str)>,
        max: Option<u32>,
    ) -> AssociationAC {
        AssociationAC {
            protocol_version: 1,
            calling_ae_title: "DICOM_GW".into(),
            called_ae_title: "PACS".into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: results
                .into_iter()
                .map(|(id, reason, ts)| PresentationContextResult {
                    id,
                    reason,
                    transfer_syntax: ts.into(),
                })
                .collect(),
            user_variables: max.map(UserVariableItem::MaxLength).into_iter().collect(),
        }
    }

    #[test]
    fn applies_the_answers_of_the_pacs() {
        use PresentationContextResultReason as R;
        let mut c = propose(&[
            offer(CT, EXPLICIT_VR_LE),
            offer(MR, IMPLICIT_VR_LE),
            offer(CT, JPEG_BASELINE),
        ]);
        let max = apply_ac(
            &mut c,
            &ac(
                vec![
                    (1, R::Acceptance, "1.2.840.10008.1.2\0"),
                    (3, R::Acceptance, EXPLICIT_VR_LE),
                    // A syntax that was not proposed for this context.
                    (5, R::Acceptance, JPEG_BASELINE),
                    (99, R::Acceptance, EXPLICIT_VR_LE),
                ],
                Some(16_384),
            ),
        )
        .unwrap();
        assert_eq!(max, 16_384);
        let results: Vec<&ContextResult> = c.iter().map(|c| &c.result).collect();
        assert_eq!(
            results,
            vec![
                &ContextResult::Accepted(IMPLICIT_VR_LE.into()),
                &ContextResult::Accepted(EXPLICIT_VR_LE.into()),
                &ContextResult::Rejected("accepted with a transfer syntax that was not proposed"),
                &ContextResult::Rejected("no result in the A-ASSOCIATE-AC"),
            ]
        );

        let mut c = propose(&[offer(CT, JPEG_BASELINE)]);
        let answer = ac(vec![(3, R::TransferSyntaxesNotSupported, "")], Some(0));
        assert_eq!(apply_ac(&mut c, &answer), Ok(SEND_PDU_CAP));
        assert_eq!(
            c[1].result,
            ContextResult::Rejected("transfer-syntaxes-not-supported (provider rejection)")
        );
        assert_eq!(apply_ac(&mut c, &ac(vec![], None)), Ok(DEFAULT_PEER_PDU));
        assert_eq!(
            apply_ac(&mut c, &ac(vec![], Some(u32::MAX))),
            Ok(SEND_PDU_CAP)
        );
        assert!(apply_ac(&mut c, &ac(vec![], Some(100))).is_err());
    }

    /// Reads PDUs back with the acceptor's own reader: (context, command, last, data).
    async fn parse(bytes: &[u8]) -> Vec<(u8, bool, bool, Vec<u8>)> {
        let mut r = PduReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.next(Duration::from_secs(1), SEND_PDU_CAP).await {
                Ok(Frame::PData(pdvs)) => {
                    for p in pdvs {
                        out.push((p.context_id, p.is_command, p.is_last, p.data.to_vec()));
                    }
                }
                Ok(Frame::Other(p)) => panic!("unexpected {}", pdu_name(&p)),
                Err(FrameError::Closed) => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn fragments_a_stream_in_batches_marking_only_the_end_last() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (len, max_data, pdus) in [
            (10_000, 1000, 3),
            (3000, 1000, 2),
            (999, 1000, 4),
            (0, 1000, 1),
        ] {
            let mut src = &data[..len];
            let mut buf = vec![0u8; pdus * (PDV_PDU_HEADER + max_data)];
            let mut left = len as u64;
            let mut wire = Vec::new();
            loop {
                let (used, rest) =
                    fill_batch(&mut src, &mut buf, 5, false, max_data, pdus, left).unwrap();
                assert!(used <= buf.len());
                wire.extend_from_slice(&buf[..used]);
                left = rest;
                if left == 0 {
                    break;
                }
            }
            let pdvs = parse(&wire).await;
            assert_eq!(pdvs.len(), len.div_ceil(max_data).max(1), "len {len}");
            assert!(pdvs
                .iter()
                .all(|p| p.0 == 5 && !p.1 && p.3.len() <= max_data));
            let lasts: Vec<bool> = pdvs.iter().map(|p| p.2).collect();
            assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
            assert_eq!(lasts.last(), Some(&true));
            let joined: Vec<u8> = pdvs.iter().flat_map(|p| p.3.iter().copied()).collect();
            assert_eq!(joined, &data[..len]);
        }
    }

    #[test]
    fn a_short_file_is_an_error_not_a_complete_message() {
        let mut src = &[1u8, 2, 3][..];
        let mut buf = vec![0u8; 2 * (PDV_PDU_HEADER + 1000)];
        let e = fill_batch(&mut src, &mut buf, 1, false, 1000, 2, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn requests_encode_and_decode_back() {
        let store = Command {
            command_field: C_STORE_RQ,
            message_id: 7,
            affected_sop_class_uid: CT.into(),
            affected_sop_instance_uid: "1.2.3.4.5".into(),
            priority: 1,
            has_dataset: true,
            ..Command::default()
        };
        let bytes = dimse::request(&store);
        let back = dimse::decode(&bytes).unwrap();
        assert_eq!(back.command_field, C_STORE_RQ);
        assert_eq!(back.message_id, 7);
        assert_eq!(back.priority, 1);
        assert!(back.has_dataset);
        assert_eq!(
            uid::validate(&back.affected_sop_instance_uid),
            Some("1.2.3.4.5")
        );
        let gl = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        assert_eq!(gl, bytes.len() - 12);

        let echo = Command {
            command_field: C_ECHO_RQ,
            message_id: 8,
            affected_sop_class_uid: VERIFICATION.into(),
            ..Command::default()
        };
        let back = dimse::decode(&dimse::request(&echo)).unwrap();
        assert!(!back.has_dataset);
        assert_eq!(
            uid::validate(&back.affected_sop_class_uid),
            Some(VERIFICATION)
        );

        // A response as the acceptor side writes it carries what `await_response` checks.
        let rsp = dimse::decode(&dimse::response(&store, 0xA700, Some("disk full"))).unwrap();
        assert_eq!(rsp.command_field, C_STORE_RQ | RESPONSE_BIT);
        assert_eq!(rsp.message_id_being_responded_to, 7);
        assert_eq!(rsp.status, Some(0xA700));
        assert_eq!(rsp.error_comment.as_deref(), Some("disk full"));

        // Framed for the wire in one PDU.
        let pdvs = parse(&frame_all(3, true, &bytes, 1000)).await;
        assert_eq!(pdvs.len(), 1);
        assert!(pdvs[0].1 && pdvs[0].2);
        assert_eq!(pdvs[0].3, bytes);
    }
}
