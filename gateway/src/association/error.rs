//! How failures map to what the peer sees: the one place that decides between a DIMSE status
//! and an A-ABORT (DESIGN.md section 4).

use dicom_ul::pdu::AbortRQServiceProviderReason;

use super::dimse::status;
use super::pdu::FrameError;
use crate::store::StoreError;

/// Why an association ends abnormally.
#[derive(Debug)]
pub enum Failure {
    /// A protocol error: the gateway sends A-ABORT with this reason (PS3.8 section 9.3.8).
    Abort {
        reason: AbortRQServiceProviderReason,
        detail: String,
    },
    /// The peer is gone (closed, reset, aborted, or a write failed): nothing to send.
    Gone { detail: String },
}

impl Failure {
    pub fn abort(reason: AbortRQServiceProviderReason, detail: impl Into<String>) -> Self {
        Failure::Abort {
            reason,
            detail: detail.into(),
        }
    }

    pub fn gone(detail: impl Into<String>) -> Self {
        Failure::Gone {
            detail: detail.into(),
        }
    }
}

/// The A-ABORT reason for a framing error.
pub fn abort_reason(e: &FrameError) -> AbortRQServiceProviderReason {
    match e {
        FrameError::TooLong { .. } | FrameError::Malformed(_) => {
            AbortRQServiceProviderReason::InvalidPduParameter
        }
        FrameError::Closed | FrameError::Io(_) | FrameError::Timeout => {
            AbortRQServiceProviderReason::ReasonNotSpecified
        }
    }
}

/// A framing error during an association; `mid_message` says whether an instance was cut off.
pub fn frame_failure(e: FrameError, mid_message: bool) -> Failure {
    let cut = if mid_message {
        " in the middle of a message; nothing of it was stored"
    } else {
        ""
    };
    match e {
        FrameError::Closed => Failure::gone(format!("peer closed the connection{cut}")),
        FrameError::Io(e) => Failure::gone(format!("socket error: {e}{cut}")),
        FrameError::Timeout => Failure::abort(
            AbortRQServiceProviderReason::ReasonNotSpecified,
            format!("peer silent longer than the timeout{cut}"),
        ),
        e @ (FrameError::TooLong { .. } | FrameError::Malformed(_)) => {
            Failure::abort(abort_reason(&e), format!("{e}{cut}"))
        }
    }
}

/// The C-STORE status for a store failure (PS3.4 Annex B.2.3) and its error comment.
pub fn store_status(e: &StoreError) -> (u16, String) {
    let code = match e {
        StoreError::DiskReserve { .. }
        | StoreError::Io { .. }
        | StoreError::Index { .. }
        | StoreError::Task { .. } => status::OUT_OF_RESOURCES,
        StoreError::Mismatch { .. } => status::DATASET_DOES_NOT_MATCH_SOP_CLASS,
        StoreError::CannotUnderstand { .. } => status::CANNOT_UNDERSTAND,
    };
    (code, e.to_string())
}
