//! Reads the few attributes the index needs from the start of a dataset.
//!
//! Only top-level elements up to Series Instance UID (0020,000E) are read; parsing stops there,
//! so pixel data is never touched and memory stays bounded by the elements before it.

use std::io::Read;

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

/// Why a dataset could not be indexed (answered C000, PS3.4 Annex B.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFailure(pub String);

/// Whether the gateway can read datasets of this transfer syntax far enough to index them.
pub fn can_index(ts_uid: &str) -> bool {
    TransferSyntaxRegistry
        .get(ts_uid)
        .is_some_and(|ts| !matches!(ts.codec(), Codec::Dataset(None)))
}

/// Parses `source` (dataset bytes in transfer syntax `ts_uid`).
pub fn read_fields(source: impl Read, ts_uid: &str) -> Result<DatasetFields, ParseFailure> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| ParseFailure(format!("unknown transfer syntax {ts_uid}")))?;
    let source: Box<dyn Read> = match ts.codec() {
        Codec::Dataset(Some(adapter)) => adapter.adapt_reader(Box::new(source)),
        Codec::Dataset(None) => {
            return Err(ParseFailure(format!(
                "transfer syntax {ts_uid} needs a dataset codec this build lacks"
            )))
        }
        _ => Box::new(source),
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
            DataToken::ElementHeader(h) if depth == 0 => {
                if h.tag() > SERIES_INSTANCE_UID {
                    break;
                }
                wanted = Some(h.tag());
            }
            DataToken::PrimitiveValue(v) if depth == 0 => {
                let text = || {
                    v.to_str()
                        .trim_end_matches(['\0', ' '])
                        .trim_start()
                        .to_owned()
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
