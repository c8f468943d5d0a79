//! Which abstract and transfer syntaxes the gateway accepts, derived from the dicom-rs
//! dictionaries rather than typed by hand.
//!
//! A Storage SOP Class is any SOP class of the standard dictionary under the arc PS3.4 Annex B
//! uses (1.2.840.10008.5.1.4) whose name says "Storage", retired ones included. That excludes
//! Storage Commitment (1.2.840.10008.1.20.x), Media Storage Directory Storage (DICOMDIR) and the
//! retired print classes, none of which is sent with C-STORE.

use dicom_core::dictionary::UidDictionary;
use dicom_dictionary_std::StandardSopClassDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::uid::VERIFICATION;

const STORAGE_ARC: &str = "1.2.840.10008.5.1.4.";

/// What a proposed abstract syntax is to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Verification,
    Storage,
}

pub fn service_of(abstract_syntax: &str) -> Option<Service> {
    if abstract_syntax == VERIFICATION {
        return Some(Service::Verification);
    }
    is_storage(abstract_syntax).then_some(Service::Storage)
}

pub fn is_storage(uid: &str) -> bool {
    uid.starts_with(STORAGE_ARC)
        && StandardSopClassDictionary
            .by_uid(uid)
            .is_some_and(|e| e.name.contains("Storage"))
}

/// A name for logs: "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)".
pub fn describe(uid: &str) -> String {
    match StandardSopClassDictionary.by_uid(uid) {
        Some(e) => format!("{} ({uid})", e.name),
        None => match TransferSyntaxRegistry.get(uid) {
            Some(ts) => format!("{} ({uid})", ts.name()),
            None => format!("unknown ({uid})"),
        },
    }
}

/// Whether the gateway accepts this transfer syntax: known to the registry and readable far
/// enough to index (pixel data is stored as received, never decoded).
pub fn accepts_transfer_syntax(uid: &str) -> bool {
    crate::store::parse::can_index(uid)
}

/// All Storage SOP classes of the dictionary, for the conformance statement. The dictionary
/// offers look-up only, so the arcs PS3.4 uses are probed: 1.2.840.10008.5.1.4.1.1.a[.b[.c[.d]]]
/// (a up to 700, b up to 120, c and d up to 12)
/// (the fourth level only below an existing a.b, as in 77.1.5.x) and 1.2.840.10008.5.1.4.a.b.
pub fn all_storage_classes() -> Vec<(&'static str, &'static str, bool)> {
    let dict = StandardSopClassDictionary;
    let mut out = Vec::new();
    let mut probe = |uid: &str| {
        if let Some(e) = dict.by_uid(uid) {
            if is_storage(e.uid) {
                out.push((e.uid, e.name, e.retired));
            }
        }
    };
    for a in 1..=700 {
        let pa = format!("1.2.840.10008.5.1.4.1.1.{a}");
        probe(&pa);
        for b in 1..=120 {
            let pb = format!("{pa}.{b}");
            probe(&pb);
            let deep = dict.by_uid(&pb).is_some();
            for c in 1..=12 {
                let pc = format!("{pb}.{c}");
                probe(&pc);
                if deep {
                    for d in 1..=12 {
                        probe(&format!("{pc}.{d}"));
                    }
                }
            }
        }
    }
    for a in 2..=100 {
        for b in 1..=20 {
            probe(&format!("1.2.840.10008.5.1.4.{a}.{b}"));
        }
    }
    out.sort_by(|x, y| x.1.cmp(y.1));
    out.dedup();
    out
}

/// All transfer syntaxes the gateway accepts, for the conformance statement.
pub fn all_transfer_syntaxes() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = TransferSyntaxRegistry
        .iter()
        .filter(|ts| accepts_transfer_syntax(ts.uid()))
        .map(|ts| (ts.uid(), ts.name()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_classes_come_from_the_dictionary() {
        for uid in [
            "1.2.840.10008.5.1.4.1.1.2",     // CT Image Storage
            "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT Image Storage
            "1.2.840.10008.5.1.4.1.1.4",     // MR Image Storage
            "1.2.840.10008.5.1.4.1.1.1.1",   // Digital X-Ray Image Storage - For Presentation
            "1.2.840.10008.5.1.4.1.1.6.1",   // Ultrasound Image Storage
            "1.2.840.10008.5.1.4.1.1.3.1",   // Ultrasound Multi-frame Image Storage
            "1.2.840.10008.5.1.4.1.1.7",     // Secondary Capture Image Storage
            "1.2.840.10008.5.1.4.1.1.88.11", // Basic Text SR Storage
            "1.2.840.10008.5.1.4.1.1.104.1", // Encapsulated PDF Storage
            "1.2.840.10008.5.1.4.1.1.104.2", // Encapsulated CDA Storage
            "1.2.840.10008.5.1.4.1.1.11.1",  // Grayscale Softcopy Presentation State Storage
            "1.2.840.10008.5.1.4.1.1.481.1", // RT Image Storage
        ] {
            assert_eq!(service_of(uid), Some(Service::Storage), "{}", describe(uid));
        }
        assert_eq!(service_of(VERIFICATION), Some(Service::Verification));
        assert_eq!(service_of("1.2.840.10008.1.3.10"), None); // Media Storage Directory
        assert_eq!(service_of("1.2.840.10008.5.1.1.27"), None); // Stored Print (retired)
        assert_eq!(service_of("1.2.840.10008.5.1.4.1.2.2.1"), None); // Study Root FIND
        assert_eq!(service_of("1.2.840.10008.1.20.1"), None); // Storage Commitment
        assert_eq!(service_of("1.2.3.4"), None);
        let all = all_storage_classes();
        // dicom-dictionary-std 0.10.1 names 211 storage classes under 1.2.840.10008.5.1.4; the
        // probe must find them all (update the figure when the dictionary grows).
        assert_eq!(all.len(), 211, "storage classes found by the probe");
        assert!(all.iter().all(|(uid, _, _)| is_storage(uid)));
    }

    #[test]
    fn transfer_syntaxes_include_compressed_and_deflated() {
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5",
        ] {
            assert!(accepts_transfer_syntax(ts), "{ts}");
        }
        assert!(!accepts_transfer_syntax("1.2.3"));
    }
}
