//! Reads the few attributes the index needs from the start of a dataset.
//!
//! Only top-level elements up to Series Instance UID (0020,000E) are read; parsing stops there,
//! so pixel data is never touched. Memory stays bounded: an element whose declared length is
//! larger than the bytes that remain (or, in a deflated dataset, larger than
//! [`MAX_VALUE_DEFLATED`]) is refused before the decoder allocates for it, because the decoder
//! reserves and zero-fills the declared length.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use dicom_core::header::Header;
use dicom_core::Tag;
use dicom_encoding::transfer_syntax::Codec;
use dicom_encoding::TransferSyntaxIndex;
use dicom_parser::dataset::{DataSetReader, DataToken};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// The indexed attributes of one instance. Patient ID is kept in the index for reconciliation
/// and is never logged at info or above.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetFields {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub modality: String,
    pub accession_number: String,
    pub study_date: String,
}

const SOP_CLASS_UID: Tag = Tag(0x0008, 0x0016);
const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);
const STUDY_DATE: Tag = Tag(0x0008, 0x0020);
const ACCESSION_NUMBER: Tag = Tag(0x0008, 0x0050);
const MODALITY: Tag = Tag(0x0008, 0x0060);
const PATIENT_ID: Tag = Tag(0x0010, 0x0020);
const STUDY_INSTANCE_UID: Tag = Tag(0x0020, 0x000D);
const SERIES_INSTANCE_UID: Tag = Tag(0x0020, 0x000E);

/// Largest element value read before (0020,000E) in a deflated dataset, whose inflated size is
/// not known in advance.
pub const MAX_VALUE_DEFLATED: u64 = 64 * 1024 * 1024;

/// Characters of an indexed value kept in the index: four times the longest of their VRs
/// (LO and UI, 64; PS3.5 section 6.2), so valid values are never cut.
pub const MAX_FIELD_CHARS: usize = 256;

/// Counts the bytes the decoder has taken.
struct Counted<R> {
    inner: R,
    taken: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.taken.set(self.taken.get() + n as u64);
        Ok(n)
    }
}

/// Why a dataset could not be indexed (answered C000, PS3.4 Annex B.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFailure(pub String);

/// Whether the gateway can read datasets of this transfer syntax far enough to index them.
pub fn can_index(ts_uid: &str) -> bool {
    TransferSyntaxRegistry
        .get(ts_uid)
        .is_some_and(|ts| !matches!(ts.codec(), Codec::Dataset(None)))
}

/// Parses `source` (the `size` dataset bytes in transfer syntax `ts_uid`).
pub fn read_fields(
    source: impl Read,
    size: u64,
    ts_uid: &str,
) -> Result<DatasetFields, ParseFailure> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| ParseFailure(format!("unknown transfer syntax {ts_uid}")))?;
    let taken = Rc::new(Cell::new(0u64));
    let mut deflated = false;
    let source: Box<dyn Read> = match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            deflated = true;
            Box::new(Counted {
                inner: adapter.adapt_reader(Box::new(source)),
                taken: taken.clone(),
            })
        }
        Codec::Dataset(None) => {
            return Err(ParseFailure(format!(
                "transfer syntax {ts_uid} needs a dataset codec this build lacks"
            )))
        }
        _ => Box::new(Counted {
            inner: source,
            taken: taken.clone(),
        }),
    };
    let room = |len: u64| -> Result<(), ParseFailure> {
        let limit = if deflated {
            MAX_VALUE_DEFLATED
        } else {
            size.saturating_sub(taken.get())
        };
        if len > limit {
            return Err(ParseFailure(format!(
                "an element declares {len} bytes but only {limit} can follow"
            )));
        }
        Ok(())
    };
    let mut reader = DataSetReader::new_with_ts(source, ts)
        .map_err(|e| ParseFailure(format!("cannot start decoding: {e}")))?;
    let mut fields = DatasetFields::default();
    let mut depth = 0usize;
    let mut wanted: Option<Tag> = None;
    loop {
        let token = match reader.next() {
            None => break,
            Some(Ok(t)) => t,
            // A decoding error after the last wanted attribute does not matter here; before it,
            // the required ones are checked below.
            Some(Err(e)) => {
                if fields.sop_instance_uid.is_empty() || fields.sop_class_uid.is_empty() {
                    return Err(ParseFailure(format!("malformed dataset: {e}")));
                }
                break;
            }
        };
        match token {
            DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart => depth += 1,
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ElementHeader(h) => {
                if depth == 0 && h.tag() > SERIES_INSTANCE_UID {
                    break;
                }
                if let Some(len) = h.len.get() {
                    room(u64::from(len))?;
                }
                if depth == 0 {
                    wanted = Some(h.tag());
                }
            }
            DataToken::PrimitiveValue(v) if depth == 0 => {
                // The index keeps at most MAX_FIELD_CHARS of a value (the spooled bytes keep it
                // whole): a sender's oversized value cannot bloat the row or the record meta.
                let text = || {
                    v.to_str()
                        .trim_end_matches(['\0', ' '])
                        .trim_start()
                        .chars()
                        .take(MAX_FIELD_CHARS)
                        .collect::<String>()
                };
                match wanted.take() {
                    Some(SOP_CLASS_UID) => fields.sop_class_uid = text(),
                    Some(SOP_INSTANCE_UID) => fields.sop_instance_uid = text(),
                    Some(STUDY_DATE) => fields.study_date = text(),
                    Some(ACCESSION_NUMBER) => fields.accession_number = text(),
                    Some(MODALITY) => fields.modality = text(),
                    Some(PATIENT_ID) => fields.patient_id = text(),
                    Some(STUDY_INSTANCE_UID) => fields.study_instance_uid = text(),
                    Some(SERIES_INSTANCE_UID) => {
                        fields.series_instance_uid = text();
                        break;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if fields.sop_instance_uid.is_empty() || fields.sop_class_uid.is_empty() {
        return Err(ParseFailure(
            "dataset has no SOP Class UID (0008,0016) or SOP Instance UID (0008,0018)".into(),
        ));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPLICIT: &str = "1.2.840.10008.1.2.1";

    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v);
    }

    fn head() -> Vec<u8> {
        let mut d = Vec::new();
        el(
            &mut d,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
        );
        el(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        d
    }

    #[test]
    fn reads_the_indexed_fields() {
        let mut d = head();
        el(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3\0");
        el(&mut d, 0x0020, 0x000E, b"UI", b"1.2.3.4.5\0");
        let f = read_fields(&d[..], d.len() as u64, EXPLICIT).unwrap();
        assert_eq!(f.sop_instance_uid, "1.2.3.4");
        assert_eq!(f.series_instance_uid, "1.2.3.4.5");
    }

    /// An oversized value (implicit VR allows 4 GiB for a Patient ID) is cut for the index, so
    /// the row and the segment record's meta stay small whatever the sender puts there.
    #[test]
    fn oversized_indexed_values_are_capped() {
        let mut d = head();
        el(&mut d, 0x0010, 0x0020, b"LO", "X".repeat(60_000).as_bytes());
        el(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3\0");
        let f = read_fields(&d[..], d.len() as u64, EXPLICIT).unwrap();
        assert_eq!(f.patient_id.len(), MAX_FIELD_CHARS);
        assert_eq!(f.study_instance_uid, "1.2.3");
    }

    /// A lying length must be refused before the decoder reserves and zero-fills it.
    #[test]
    fn huge_declared_length_is_refused_without_allocating() {
        let mut d = head();
        d.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        d.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        d.extend_from_slice(&[0; 16]);
        let e = read_fields(&d[..], d.len() as u64, EXPLICIT).unwrap_err();
        assert!(e.0.contains("declares"), "{e:?}");
    }
}
