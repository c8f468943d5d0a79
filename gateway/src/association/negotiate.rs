//! Association negotiation (PS3.8 section 7.1): access control and presentation contexts.
//!
//! dicom-ul's `AccessControl` hook sees neither the peer address nor the TLS certificate, so
//! the decision is made here, with both: the calling AE title must be registered, connect from
//! one of its hosts, over TLS if it must (`allow_plain = false`), and with the pinned
//! certificate if it has a pin (a certificate of one modality cannot stand in for another).

use std::collections::HashMap;
use std::net::IpAddr;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};

use crate::config::{Config, Modality};
use crate::sop::{self, Service};
use crate::tls::PeerCertificate;
use crate::uid::{
    APPLICATION_CONTEXT, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, IMPLICIT_VR_LE,
};

/// An accepted presentation context.
#[derive(Debug, Clone)]
pub struct Context {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
    pub service: Service,
}

/// The outcome of a successful negotiation.
pub struct Accepted {
    pub ac: AssociationAC,
    pub contexts: HashMap<u8, Context>,
    pub calling_ae: String,
    pub called_ae: String,
    /// Largest P-DATA-TF PDU the peer accepts (0 = no limit, PS3.8 section D.1).
    pub peer_max_pdu: u32,
    /// One line per rejected context, for the log.
    pub rejected: Vec<String>,
}

/// How the association reached the gateway (PS3.15 Annex B: TLS under the upper layer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Plain,
    /// DICOM TLS; `client` is the certificate the TLS layer verified against the listener's
    /// client CA, `None` if the listener does not require one and the peer sent none.
    Tls { client: Option<PeerCertificate> },
}

/// A refusal, with words a field engineer can act on.
pub struct Refusal {
    pub rj: AssociationRJ,
    pub reason: String,
}

fn refuse(result: AssociationRJResult, source: AssociationRJSource, reason: String) -> Refusal {
    Refusal {
        rj: AssociationRJ { result, source },
        reason,
    }
}

/// The A-ASSOCIATE-RJ for "too many associations" (PS3.8 section 9.3.4: transient,
/// service-provider presentation related, local-limit-exceeded).
pub fn limit_refusal(limit: u32) -> Refusal {
    refuse(
        AssociationRJResult::Transient,
        AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
        format!("association limit of {limit} reached (gateway.max_associations); the modality should retry"),
    )
}

/// Decides on an A-ASSOCIATE-RQ from `peer`, arrived over `transport`.
pub fn negotiate(
    rq: AssociationRQ,
    peer: IpAddr,
    transport: &Transport,
    config: &Config,
) -> Result<Accepted, Refusal> {
    let calling = rq.calling_ae_title.trim().to_owned();
    let called = rq.called_ae_title.trim().to_owned();
    // PS3.8 section 9.3.2: bit 0 of the protocol version identifies version 1.
    if rq.protocol_version & 1 == 0 {
        return Err(refuse(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            format!(
                "protocol version {:#06x} not supported (only version 1)",
                rq.protocol_version
            ),
        ));
    }
    if rq.application_context_name.trim_end_matches('\0') != APPLICATION_CONTEXT {
        return Err(refuse(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            format!(
                "application context '{}' is not the DICOM one",
                rq.application_context_name
            ),
        ));
    }
    let ours = config.gateway.ae_title.as_str();
    if called != ours {
        return Err(refuse(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized),
            format!(
                "called AE title '{called}' is not this gateway's ('{ours}'); fix the destination AE title on the modality"
            ),
        ));
    }
    check_calling(&calling, peer, transport, config)?;

    let mut peer_max_pdu = dicom_ul::pdu::DEFAULT_MAX_PDU;
    for v in &rq.user_variables {
        if let UserVariableItem::MaxLength(n) = v {
            peer_max_pdu = *n;
        }
    }

    let mut contexts = HashMap::new();
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut rejected = Vec::new();
    for pc in rq.presentation_contexts {
        let abs = pc.abstract_syntax.trim_end_matches('\0').to_owned();
        let (reason, ts) = match sop::service_of(&abs) {
            None => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                None,
            ),
            Some(service) => {
                // The first proposed syntax the gateway can store: the SCU's order of preference,
                // so that the dataset arrives as the modality holds it.
                let chosen = pc
                    .transfer_syntaxes
                    .iter()
                    .map(|t| t.trim_end_matches('\0'))
                    .find(|t| sop::accepts_transfer_syntax(t));
                match chosen {
                    Some(t) => {
                        contexts.insert(
                            pc.id,
                            Context {
                                abstract_syntax: abs.clone(),
                                transfer_syntax: t.to_owned(),
                                service,
                            },
                        );
                        (
                            PresentationContextResultReason::Acceptance,
                            Some(t.to_owned()),
                        )
                    }
                    None => (
                        PresentationContextResultReason::TransferSyntaxesNotSupported,
                        None,
                    ),
                }
            }
        };
        if reason != PresentationContextResultReason::Acceptance {
            let offered: Vec<String> = pc
                .transfer_syntaxes
                .iter()
                .map(|t| sop::describe(t.trim_end_matches('\0')))
                .collect();
            rejected.push(format!(
                "context {}: {} with [{}]: {}",
                pc.id,
                sop::describe(&abs),
                offered.join(", "),
                reason
            ));
        }
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            // PS3.8 section 9.3.3.2: the field is not significant when not accepted.
            transfer_syntax: ts.unwrap_or_else(|| IMPLICIT_VR_LE.to_owned()),
        });
    }

    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title,
        called_ae_title: rq.called_ae_title,
        application_context_name: APPLICATION_CONTEXT.to_owned(),
        presentation_contexts: results,
        user_variables: vec![
            UserVariableItem::MaxLength(config.gateway.max_pdu_length),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_owned()),
        ],
    };
    Ok(Accepted {
        ac,
        contexts,
        calling_ae: calling,
        called_ae: called,
        peer_max_pdu,
        rejected,
    })
}

/// The AE-title registry check: calling AE registered and connecting from one of its hosts, or
/// the peer in a `[dangerous] any_calling_ae_from` network; then, for a registered AE (also
/// from such a network), its transport rules ([`check_transport`]).
fn check_calling(
    calling: &str,
    peer: IpAddr,
    transport: &Transport,
    config: &Config,
) -> Result<(), Refusal> {
    let peer = canonical(peer);
    let open = config
        .dangerous
        .any_calling_ae_from
        .iter()
        .any(|n| n.contains(&peer));
    let deny = |reason: String| {
        Err(refuse(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
            reason,
        ))
    };
    match config.modalities.iter().find(|m| m.ae_title.as_str() == calling) {
        None if open => Ok(()),
        None => deny(format!(
            "calling AE title '{calling}' is not registered; add a [[modality]] entry for it"
        )),
        Some(m) if !open && !m.hosts.iter().any(|n| n.contains(&peer)) => deny(format!(
            "calling AE title '{calling}' is registered, but not for host {peer}; add {peer} to its hosts if this is the modality"
        )),
        Some(m) => check_transport(m, transport).or_else(deny),
    }
}

/// `allow_plain` and the certificate pins of a registered modality.
fn check_transport(m: &Modality, transport: &Transport) -> Result<(), String> {
    let ae = &m.ae_title;
    let client = match transport {
        Transport::Plain if m.allow_plain => return Ok(()),
        Transport::Plain => {
            return Err(format!(
                "calling AE title '{ae}' must use DICOM TLS ({}) but came in over a plain DICOM port; configure TLS on the modality",
                if m.has_pin() {
                    "its certificate is pinned"
                } else {
                    "allow_plain = false"
                }
            ))
        }
        Transport::Tls { .. } if !m.has_pin() => return Ok(()),
        Transport::Tls { client: None } => {
            return Err(format!(
                "calling AE title '{ae}' is pinned to a certificate, but the peer presented no client certificate"
            ))
        }
        Transport::Tls { client: Some(c) } => c,
    };
    if let Some(want) = &m.certificate_sha256 {
        if *want != client.sha256 {
            return Err(format!(
                "certificate pin mismatch: the peer presented the certificate of '{}' (SHA-256 {}), not the one pinned for calling AE title '{ae}' (certificate_sha256 {})",
                client.subject,
                client.fingerprint(),
                crate::tls::hex_colon(want)
            ));
        }
    }
    if let Some(pin) = &m.certificate_subject {
        if !client.subject.contains_all(pin) {
            return Err(format!(
                "certificate pin mismatch: the peer presented the certificate of '{}', but calling AE title '{ae}' requires certificate_subject '{pin}'",
                client.subject
            ));
        }
    }
    Ok(())
}

/// IPv4 peers on a dual-stack socket arrive as ::ffff:a.b.c.d; match them as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
