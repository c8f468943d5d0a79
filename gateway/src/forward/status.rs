//! The one place that turns what happened upstream into a queue decision (DESIGN.md section 3):
//! delivered, retried later with backoff, or failed until an operator retries it.
//!
//! DIMSE statuses follow PS3.4 Annex B.2.3 (Table B.2-1, C-STORE) and PS3.7 Annex C (status
//! classes and general codes); association outcomes follow PS3.8 section 9.3.

use std::io;

use dicom_ul::pdu::AssociationRJResult;

use super::upstream::UpstreamError;

/// The standard's name of a status (one table for both directions of the gateway).
pub use crate::association::dimse::status_name;

/// What the queue does with an entry after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The PACS has the instance.
    Delivered,
    /// Try again after the destination's backoff.
    Retry,
    /// The PACS will not take this instance as it is: kept with its status and text for an
    /// operator.
    Failed,
}

/// Classifies a C-STORE-RSP status.
pub fn classify_status(status: u16) -> Disposition {
    match status {
        // Success.
        0x0000 => Disposition::Delivered,
        // Warning class (PS3.7 C.1.2 and C.4): the operation was performed. For C-STORE, B000
        // Coercion of Data Elements, B006 Elements Discarded, B007 Data Set Does Not Match SOP
        // Class (PS3.4 Table B.2-1): the PACS stored the instance, possibly altered. Any other
        // warning code likewise means stored.
        0xB000..=0xBFFF | 0x0001 | 0x0107 | 0x0116 => Disposition::Delivered,
        // A7xx Refused: Out of Resources (PS3.4 Table B.2-1), and 0213 Resource Limitation
        // (PS3.7 C.5): the PACS is full or busy now; the same instance may go later.
        0xA700..=0xA7FF | 0x0213 => Disposition::Retry,
        // A9xx Error: Data Set Does Not Match SOP Class, Cxxx Error: Cannot Understand
        // (PS3.4 Table B.2-1), 0122 Refused: SOP Class Not Supported, 0124 Refused: Not
        // Authorized, 0110 Processing Failure, 0211 Unrecognized Operation and every other
        // failure code (PS3.7 C.5): sending the same bytes again would be answered the same.
        // Cancel (FE00) and Pending (FF00, FF01) are no final answers to a C-STORE; they are
        // kept for an operator as well.
        _ => Disposition::Failed,
    }
}

/// Classifies an error of [`super::upstream`].
///
/// - Resolve, Connect, ConnectionLost, Timeout, Aborted: the network or the PACS is unwell now.
/// - Tls: retried like a link outage (DESIGN.md section 3), but its text says what is wrong
///   (expired, unknown issuer, name mismatch); a certificate problem needs a person, so it is
///   also a configuration error ([`is_configuration_error`]).
/// - Protocol: a PACS answering garbage is usually a PACS in trouble (restarting, overloaded);
///   retrying is harmless (a duplicate C-STORE is answered Success), and `give_up_after`
///   bounds it.
/// - Rejected transient: the PACS says so. Rejected permanent (the PACS does not know our AE
///   title, or its own): a configuration error that someone will fix at the PACS or in our
///   config; the entry must not be lost meanwhile, so Retry, slowly
///   ([`is_configuration_error`]).
/// - NotOffered: the instance was not proposed on this association; a new one proposes it.
/// - NoContext: the PACS refuses this SOP class / transfer syntax, and the gateway does not
///   convert (DESIGN.md section 3: permanent).
/// - File: the spool file is missing or damaged: Failed, except when the gateway itself is out
///   of file descriptors or memory, which passes.
pub fn classify_error(e: &UpstreamError) -> Disposition {
    match e {
        UpstreamError::Resolve { .. }
        | UpstreamError::Connect { .. }
        | UpstreamError::Tls { .. }
        | UpstreamError::ConnectionLost { .. }
        | UpstreamError::Timeout { .. }
        | UpstreamError::Aborted { .. }
        | UpstreamError::Protocol { .. }
        | UpstreamError::Rejected { .. }
        | UpstreamError::NotOffered { .. } => Disposition::Retry,
        UpstreamError::NoContext { .. } => Disposition::Failed,
        UpstreamError::File { source, .. } if is_resource_exhaustion(source) => Disposition::Retry,
        UpstreamError::File { .. } => Disposition::Failed,
    }
}

/// Whether the error needs a person to change a configuration (ours or the PACS's): a
/// permanent A-ASSOCIATE-RJ, or a certificate problem (a PACS certificate that expired, is
/// issued by an unknown CA or names another host; our client certificate refused; unreadable
/// TLS files). The forwarder then retries at its slowest pace and says so.
pub fn is_configuration_error(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Rejected { rj, .. } => rj.result == AssociationRJResult::Permanent,
        UpstreamError::Tls {
            certificate_problem,
            ..
        } => *certificate_problem,
        _ => false,
    }
}

/// "PACS answered A700 (Refused: Out of Resources): disk full", for the queue and logs.
pub fn describe_response(status: u16, comment: Option<&str>) -> String {
    let mut s = format!("PACS answered {status:04X} ({})", status_name(status));
    if let Some(c) = comment.map(str::trim).filter(|c| !c.is_empty()) {
        s.push_str(": ");
        s.extend(c.chars().filter(|ch| !ch.is_control()).take(64));
    }
    s
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.kind() == io::ErrorKind::OutOfMemory
        || e.raw_os_error().is_some_and(|n| {
            [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM].contains(&Errno::from_raw(n))
        })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use dicom_ul::pdu::{
        AssociationRJ, AssociationRJServiceProviderPresentationReason,
        AssociationRJServiceUserReason, AssociationRJSource,
    };

    use super::*;
    use crate::config::AeTitle;
    use crate::forward::upstream::{Peer, Step};

    #[test]
    fn statuses_follow_ps3_4_and_ps3_7() {
        use Disposition::*;
        for (status, want) in [
            (0x0000, Delivered),
            (0xB000, Delivered),
            (0xB006, Delivered),
            (0xB007, Delivered),
            (0xA700, Retry),
            (0xA7FF, Retry),
            (0x0213, Retry),
            (0xA900, Failed),
            (0xA9FF, Failed),
            (0xC000, Failed),
            (0xCFFF, Failed),
            (0x0122, Failed),
            (0x0124, Failed),
            (0x0110, Failed),
            (0x0211, Failed),
            (0xFF00, Failed),
            (0xFE00, Failed),
            (0x1234, Failed),
        ] {
            assert_eq!(classify_status(status), want, "{status:04X}");
        }
        assert_eq!(status_name(0x0122), "Refused: SOP Class Not Supported");
        assert_eq!(status_name(0x0124), "Refused: Not Authorized");
        assert_eq!(status_name(0xA701), "Refused: Out of Resources");
        assert_eq!(status_name(0xB006), "Warning: Elements Discarded");
        assert_eq!(status_name(0xB123), "Warning");
        assert_eq!(status_name(0x0999), "Failure");
    }

    #[test]
    fn response_text_names_status_and_comment() {
        assert_eq!(
            describe_response(0xA700, Some(" disk full ")),
            "PACS answered A700 (Refused: Out of Resources): disk full"
        );
        assert_eq!(
            describe_response(0x0122, None),
            "PACS answered 0122 (Refused: SOP Class Not Supported)"
        );
        assert_eq!(
            describe_response(0xC000, Some("")),
            "PACS answered C000 (Error: Cannot Understand)"
        );
    }

    fn peer() -> Arc<Peer> {
        Arc::new(Peer {
            destination: "central".into(),
            address: "10.0.0.5:104".into(),
            called_ae: AeTitle::new("PACS").unwrap(),
            calling_ae: AeTitle::new("DICOM_GW").unwrap(),
        })
    }

    fn rejected(result: AssociationRJResult, source: AssociationRJSource) -> UpstreamError {
        UpstreamError::Rejected {
            peer: peer(),
            rj: AssociationRJ { result, source },
        }
    }

    fn file(source: io::Error) -> UpstreamError {
        UpstreamError::File {
            peer: peer(),
            path: PathBuf::from("/spool/ab/x.dcm"),
            source,
            association_lost: false,
        }
    }

    #[test]
    fn errors_follow_design_section_3() {
        let permanent = rejected(
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
        );
        assert_eq!(classify_error(&permanent), Disposition::Retry);
        assert!(is_configuration_error(&permanent));
        assert!(permanent.is_connection_level());
        assert_eq!(
            permanent.to_string(),
            "PACS central (10.0.0.5:104, AE PACS) rejected the association permanently: \
             calling-AE-title-not-recognized (source: DICOM UL service-user) — register DICOM_GW \
             (and this gateway's IP address, if the PACS checks hosts) at the PACS, or set \
             destination.calling_ae to a title it knows"
        );

        let transient = rejected(
            AssociationRJResult::Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        );
        assert_eq!(classify_error(&transient), Disposition::Retry);
        assert!(!is_configuration_error(&transient));

        let timeout = UpstreamError::Timeout {
            peer: peer(),
            step: Step::AwaitResponse,
            after: Duration::from_secs(120),
        };
        assert_eq!(classify_error(&timeout), Disposition::Retry);
        assert!(timeout
            .to_string()
            .contains("timed out after 120 s while waiting for the response"));

        let no_context = UpstreamError::NoContext {
            peer: peer(),
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.4.50".into(),
            proposed: vec![
                "context 3 [JPEG Baseline] rejected: transfer-syntaxes-not-supported".into(),
            ],
        };
        assert_eq!(classify_error(&no_context), Disposition::Failed);
        assert!(!no_context.is_connection_level());
        assert!(no_context
            .to_string()
            .contains("CT Image Storage (1.2.840.10008.5.1.4.1.1.2)"));

        let not_offered = UpstreamError::NotOffered {
            peer: peer(),
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        };
        assert_eq!(classify_error(&not_offered), Disposition::Retry);
        assert!(!not_offered.is_connection_level());

        let missing = file(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(classify_error(&missing), Disposition::Failed);
        assert!(!missing.is_connection_level());
        let no_fds = file(io::Error::from_raw_os_error(
            nix::errno::Errno::EMFILE as i32,
        ));
        assert_eq!(classify_error(&no_fds), Disposition::Retry);
    }

    #[test]
    fn tls_failures_are_retried_and_say_what_is_wrong() {
        let expired = UpstreamError::Tls {
            peer: peer(),
            reason: "PACS certificate expired on 2024-01-01 00:00:00 UTC".into(),
            certificate_problem: true,
        };
        assert_eq!(classify_error(&expired), Disposition::Retry);
        assert!(is_configuration_error(&expired));
        assert!(expired.is_connection_level());
        assert_eq!(
            expired.to_string(),
            "TLS with PACS central (10.0.0.5:104, AE PACS) failed: PACS certificate expired on \
             2024-01-01 00:00:00 UTC"
        );
        let hiccup = UpstreamError::Tls {
            peer: peer(),
            reason: "the PACS closed the connection during the TLS handshake".into(),
            certificate_problem: false,
        };
        assert_eq!(classify_error(&hiccup), Disposition::Retry);
        assert!(!is_configuration_error(&hiccup));
    }
}
