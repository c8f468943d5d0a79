//! DICOM Part 10 files (PS3.10 section 7.1) written and read by hand, independently of the
//! gateway and of dicom-rs's writer: a minimal explicit VR little endian encoder that streams
//! pixel data to disk, a file meta group reader, the dataset checksum, and what the gateway
//! must report for a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;

use super::ts;

/// Implementation Class UID written into the file meta of generated files (a fixed 2.25 UID).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.302845130391405217318620385620945541712";
const IMPLEMENTATION_VERSION_NAME: &str = "DGW_TESTS";

/// Writes `len` bytes of noise derived from `seed`. With `high_byte_mask` < 0xFF every odd byte
/// (the high byte of a little-endian 16-bit sample) is masked, to keep samples within
/// Bits Stored.
fn write_noise(out: &mut impl Write, seed: &str, len: u64, high_byte_mask: u8) -> io::Result<()> {
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = &mut buf[..n];
        xof.fill(chunk);
        if high_byte_mask != 0xFF {
            for b in chunk.iter_mut().skip(1).step_by(2) {
                *b &= high_byte_mask;
            }
        }
        out.write_all(chunk)?;
        left -= n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A minimal explicit VR little endian encoder
// ---------------------------------------------------------------------------------------------

/// VRs whose explicit VR encoding has two reserved bytes and a 32-bit length (PS3.5 section
/// 7.1.2, table 7.1-1).
fn has_long_length(vr: &str) -> bool {
    matches!(
        vr,
        "OB" | "OD" | "OF" | "OL" | "OV" | "OW" | "SQ" | "SV" | "UC" | "UN" | "UR" | "UT" | "UV"
    )
}

/// Appends one element in explicit VR little endian. `value` must have even length.
fn encode_element(out: &mut Vec<u8>, (group, elem): (u16, u16), vr: &str, value: &[u8]) {
    assert!(
        value.len() % 2 == 0,
        "odd value length for ({group:04X},{elem:04X})"
    );
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr.as_bytes());
    if has_long_length(vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(
            &u32::try_from(value.len())
                .expect("value too long")
                .to_le_bytes(),
        );
    } else {
        out.extend_from_slice(
            &u16::try_from(value.len())
                .expect("value too long")
                .to_le_bytes(),
        );
    }
    out.extend_from_slice(value);
}

/// Pads a value to even length: UIDs and binary values with NUL, text with a space
/// (PS3.5 section 6.2).
fn padded(vr: &str, value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if matches!(vr, "UI" | "OB" | "OW" | "UN") {
            0
        } else {
            b' '
        });
    }
    v
}

/// A dataset under construction: elements kept sorted by tag, as the encoding requires.
/// Pixel data is not stored here; [`write_part10`] streams it after the other elements.
#[derive(Clone, Debug, Default)]
pub struct DataSet {
    elements: BTreeMap<(u16, u16), (&'static str, Vec<u8>)>,
}

impl DataSet {
    pub fn new() -> DataSet {
        DataSet::default()
    }

    /// A string-valued element (UI, CS, LO, PN, DA, DS, IS, ...).
    pub fn str(&mut self, tag: (u16, u16), vr: &'static str, value: &str) -> &mut DataSet {
        self.elements
            .insert(tag, (vr, padded(vr, value.as_bytes())));
        self
    }

    pub fn us(&mut self, tag: (u16, u16), value: u16) -> &mut DataSet {
        self.elements
            .insert(tag, ("US", value.to_le_bytes().to_vec()));
        self
    }

    /// A binary (OB/OW/UN) or pre-encoded value.
    pub fn bytes(&mut self, tag: (u16, u16), vr: &'static str, value: &[u8]) -> &mut DataSet {
        self.elements.insert(tag, (vr, padded(vr, value)));
        self
    }

    /// An empty sequence (type 2 sequence attributes).
    pub fn empty_sq(&mut self, tag: (u16, u16)) -> &mut DataSet {
        self.elements.insert(tag, ("SQ", Vec::new()));
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, (vr, value)) in &self.elements {
            encode_element(&mut out, *tag, vr, value);
        }
        out
    }
}

/// The 128-byte preamble, `DICM` and the file meta group (PS3.10 section 7.1), explicit VR LE,
/// with File Meta Information Group Length first.
pub fn part10_header(sop_class: &str, sop_instance: &str, transfer_syntax: &str) -> Vec<u8> {
    let mut group = Vec::new();
    encode_element(&mut group, (0x0002, 0x0001), "OB", &[0, 1]);
    encode_element(
        &mut group,
        (0x0002, 0x0002),
        "UI",
        &padded("UI", sop_class.as_bytes()),
    );
    encode_element(
        &mut group,
        (0x0002, 0x0003),
        "UI",
        &padded("UI", sop_instance.as_bytes()),
    );
    encode_element(
        &mut group,
        (0x0002, 0x0010),
        "UI",
        &padded("UI", transfer_syntax.as_bytes()),
    );
    encode_element(
        &mut group,
        (0x0002, 0x0012),
        "UI",
        &padded("UI", IMPLEMENTATION_CLASS_UID.as_bytes()),
    );
    encode_element(
        &mut group,
        (0x0002, 0x0013),
        "SH",
        &padded("SH", IMPLEMENTATION_VERSION_NAME.as_bytes()),
    );
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let len = u32::try_from(group.len()).expect("meta group too long");
    encode_element(&mut out, (0x0002, 0x0000), "UL", &len.to_le_bytes());
    out.extend_from_slice(&group);
    out
}

/// Pixel data to stream after the other elements: `len` bytes of noise.
#[derive(Clone, Debug)]
pub struct NoisePixels {
    pub vr: &'static str,
    pub len: u64,
    pub seed: String,
    /// Mask for the high byte of each 16-bit sample (0xFF: none; 0x0F: 12 bits stored).
    pub high_byte_mask: u8,
}

/// Writes a Part 10 file in explicit VR little endian; SOP Class and Instance UIDs for the meta
/// group are taken from the dataset's (0008,0016) and (0008,0018).
pub fn write_part10(path: &Path, ds: &DataSet, pixels: Option<&NoisePixels>) -> io::Result<()> {
    let uid = |tag| {
        ds.elements
            .get(&tag)
            .map(|(_, v)| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned())
            .expect("dataset without SOP Class/Instance UID")
    };
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    w.write_all(&part10_header(
        &uid((0x0008, 0x0016)),
        &uid((0x0008, 0x0018)),
        ts::EXPLICIT_VR_LE,
    ))?;
    w.write_all(&ds.encode())?;
    if let Some(p) = pixels {
        assert!(p.len % 2 == 0, "pixel data length must be even");
        let mut head = Vec::new();
        encode_element(&mut head, (0x7FE0, 0x0010), p.vr, &[]);
        // Patch the 32-bit length (the value itself is streamed below).
        let n = head.len();
        head[n - 4..].copy_from_slice(
            &u32::try_from(p.len)
                .expect("pixel data over 4 GiB")
                .to_le_bytes(),
        );
        w.write_all(&head)?;
        write_noise(&mut w, &p.seed, p.len, p.high_byte_mask)?;
    }
    w.flush()?;
    w.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()
}

// ---------------------------------------------------------------------------------------------
// Reading Part 10 files back
// ---------------------------------------------------------------------------------------------

/// The file meta group of a Part 10 file, read by a parser independent of the gateway's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part10Meta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Byte offset of the dataset: 132 + 12 + File Meta Information Group Length.
    pub dataset_offset: u64,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads and checks the preamble, `DICM` and the file meta group (explicit VR LE, PS3.10 7.1).
pub fn read_meta(path: &Path) -> io::Result<Part10Meta> {
    let mut f = BufReader::new(File::open(path)?);
    let mut head = [0u8; 144];
    f.read_exact(&mut head)?;
    if &head[128..132] != b"DICM" {
        return Err(bad(format!(
            "{}: no DICM prefix at offset 128",
            path.display()
        )));
    }
    if head[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] || head[138..140] != [4, 0] {
        return Err(bad(format!(
            "{}: the meta group does not start with (0002,0000) UL",
            path.display()
        )));
    }
    let group_len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]);
    let mut group = vec![0u8; group_len as usize];
    f.read_exact(&mut group)?;
    let mut meta = Part10Meta {
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        transfer_syntax: String::new(),
        dataset_offset: 144 + u64::from(group_len),
    };
    let mut pos = 0usize;
    while pos + 8 <= group.len() {
        let g = u16::from_le_bytes([group[pos], group[pos + 1]]);
        let e = u16::from_le_bytes([group[pos + 2], group[pos + 3]]);
        let vr = [group[pos + 4], group[pos + 5]];
        if g != 0x0002 {
            return Err(bad(format!(
                "{}: element ({g:04X},{e:04X}) inside the meta group",
                path.display()
            )));
        }
        let vr = std::str::from_utf8(&vr)
            .map_err(|_| bad(format!("{}: bad VR in meta", path.display())))?;
        let (len, hdr) = if has_long_length(vr) {
            let b = group
                .get(pos + 8..pos + 12)
                .ok_or_else(|| bad(format!("{}: truncated meta element", path.display())))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        } else {
            (
                usize::from(u16::from_le_bytes([group[pos + 6], group[pos + 7]])),
                8,
            )
        };
        let value = group.get(pos + hdr..pos + hdr + len).ok_or_else(|| {
            bad(format!(
                "{}: meta element overruns the group length",
                path.display()
            ))
        })?;
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match e {
            0x0002 => meta.sop_class_uid = text(),
            0x0003 => meta.sop_instance_uid = text(),
            0x0010 => meta.transfer_syntax = text(),
            _ => {}
        }
        pos += hdr + len;
    }
    if pos != group.len() {
        return Err(bad(format!(
            "{}: meta group length does not match its elements",
            path.display()
        )));
    }
    Ok(meta)
}

/// BLAKE3 (lowercase hex) of the dataset bytes of a Part 10 file: everything after the file
/// meta group, i.e. exactly what an SCU sends when the negotiated transfer syntax is the
/// file's own.
pub fn dataset_checksum(path: &Path) -> String {
    let meta = read_meta(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut f = File::open(path).expect("open for hashing");
    f.seek(SeekFrom::Start(meta.dataset_offset))
        .expect("seek to dataset");
    let mut h = blake3::Hasher::new();
    h.update_reader(&mut f).expect("hash dataset");
    h.finalize().to_hex().to_string()
}

/// What the gateway must report for a file it received unchanged.
#[derive(Clone, Debug)]
pub struct FileInfo {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub transfer_syntax: String,
    /// Dataset bytes (file length minus preamble and meta group).
    pub size: u64,
    pub checksum: String,
}

/// Reads a Part 10 file: meta group with [`read_meta`], identifying attributes with
/// dicom-object (stopping before pixel data), dataset size and checksum.
pub fn inspect(path: &Path) -> FileInfo {
    let meta = read_meta(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .unwrap_or_else(|e| panic!("dicom-object cannot read {}: {e}", path.display()));
    let get = |tag, name: &str| {
        obj.element(tag)
            .unwrap_or_else(|e| panic!("{}: no {name}: {e}", path.display()))
            .to_str()
            .unwrap_or_else(|e| panic!("{}: {name} is not text: {e}", path.display()))
            .trim_end_matches(['\0', ' '])
            .to_owned()
    };
    let info = FileInfo {
        path: path.to_path_buf(),
        sop_class_uid: get(tags::SOP_CLASS_UID, "SOP Class UID"),
        sop_instance_uid: get(tags::SOP_INSTANCE_UID, "SOP Instance UID"),
        study_instance_uid: get(tags::STUDY_INSTANCE_UID, "Study Instance UID"),
        series_instance_uid: get(tags::SERIES_INSTANCE_UID, "Series Instance UID"),
        transfer_syntax: meta.transfer_syntax.clone(),
        size: std::fs::metadata(path).expect("stat").len() - meta.dataset_offset,
        checksum: dataset_checksum(path),
    };
    assert_eq!(
        info.sop_instance_uid,
        meta.sop_instance_uid,
        "{}: meta and dataset disagree",
        path.display()
    );
    info
}

/// What storescu puts on the wire for `path` when the negotiated transfer syntax is the
/// file's own: [`inspect`], except that a deflated dataset of odd length is sent with one NUL
/// byte of padding (DCMTK 3.6.7: `dcmconv +td` writes odd-length deflate streams unpadded, the
/// network encoder pads every dataset to even length).
pub fn as_sent_by_storescu(path: &Path) -> FileInfo {
    let mut info = inspect(path);
    if info.transfer_syntax == ts::DEFLATED_EXPLICIT_VR_LE && info.size % 2 == 1 {
        let meta = read_meta(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut f = File::open(path).expect("open for hashing");
        f.seek(SeekFrom::Start(meta.dataset_offset))
            .expect("seek to dataset");
        let mut h = blake3::Hasher::new();
        h.update_reader(&mut f).expect("hash dataset");
        h.update(&[0]);
        info.size += 1;
        info.checksum = h.finalize().to_hex().to_string();
    }
    info
}

/// The dataset bytes of a Part 10 file (for raw C-STOREs; small files only).
pub fn dataset_bytes(path: &Path) -> Vec<u8> {
    let meta = read_meta(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all = std::fs::read(path).expect("read file");
    all[usize::try_from(meta.dataset_offset).expect("offset")..].to_vec()
}
