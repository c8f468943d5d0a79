//! Synthetic test data, made by the tests themselves (never real patient data).
//!
//! Files are written as DICOM Part 10 (PS3.10 section 7.1) in explicit VR little endian by a
//! small hand-written encoder, so that pixel data can be streamed to disk: the 200 MB
//! multi-frame instance never exists whole in the test process. Other transfer syntaxes are made
//! from these files with DCMTK (`dcmconv`, `dcmcrle`, `dcmcjpeg`, `dcmcjpls`), so the bytes the
//! gateway receives come from an independent encoder.
//!
//! Pixel data is noise from the BLAKE3 extended output, which is fast even in a debug build
//! (the hashing core is assembly) and does not compress, so no layer can cheat by shrinking it.
//!
//! Encoded datasets are canonical in DCMTK's sense (sorted, even lengths, defined lengths, no
//! group lengths), so storescu re-encodes them to the same bytes when it sends them in their own
//! transfer syntax; the checksums the tests expect rely on this.

mod part10;

pub use part10::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{dcmtk, run_tool};

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const SECONDARY_CAPTURE_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.7";
pub const MULTIFRAME_GRAYSCALE_WORD_SC_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.7.3";
pub const ENCAPSULATED_PDF_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.104.1";

/// Transfer syntax UIDs (PS3.5 section 10 and PS3.6 Annex A).
pub mod ts {
    pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
    pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
    pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
    pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
    pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    pub const JPEG_LOSSLESS_SV1: &str = "1.2.840.10008.1.2.4.70";
    pub const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
    pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
}

/// A transfer syntax the tests can produce with DCMTK and make storescu propose first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    ImplicitLe,
    ExplicitLe,
    ExplicitBe,
    Deflated,
    Rle,
    JpegLossless,
    JpegLs,
    JpegBaseline,
}

impl Syntax {
    pub const ALL: [Syntax; 8] = [
        Syntax::ImplicitLe,
        Syntax::ExplicitLe,
        Syntax::ExplicitBe,
        Syntax::Deflated,
        Syntax::Rle,
        Syntax::JpegLossless,
        Syntax::JpegLs,
        Syntax::JpegBaseline,
    ];

    pub fn uid(self) -> &'static str {
        match self {
            Syntax::ImplicitLe => ts::IMPLICIT_VR_LE,
            Syntax::ExplicitLe => ts::EXPLICIT_VR_LE,
            Syntax::ExplicitBe => ts::EXPLICIT_VR_BE,
            Syntax::Deflated => ts::DEFLATED_EXPLICIT_VR_LE,
            Syntax::Rle => ts::RLE_LOSSLESS,
            Syntax::JpegLossless => ts::JPEG_LOSSLESS_SV1,
            Syntax::JpegLs => ts::JPEG_LS_LOSSLESS,
            Syntax::JpegBaseline => ts::JPEG_BASELINE,
        }
    }

    /// The storescu option that puts this transfer syntax first in its proposal (DCMTK 3.6.7:
    /// `-xs` proposes JPEG lossless SV1, `-xy` JPEG baseline, `-xt` JPEG-LS lossless, `-xr` RLE).
    pub fn storescu_flag(self) -> &'static str {
        match self {
            Syntax::ImplicitLe => "-xi",
            Syntax::ExplicitLe => "-xe",
            Syntax::ExplicitBe => "-xb",
            Syntax::Deflated => "-xd",
            Syntax::Rle => "-xr",
            Syntax::JpegLossless => "-xs",
            Syntax::JpegLs => "-xt",
            Syntax::JpegBaseline => "-xy",
        }
    }

    /// Whether the source image must be 8 bits per sample (JPEG baseline is 8-bit only).
    pub fn needs_8bit(self) -> bool {
        self == Syntax::JpegBaseline
    }
}

// ---------------------------------------------------------------------------------------------
// Identifiers and randomness
// ---------------------------------------------------------------------------------------------

static UID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh UID under the 2.25 root (PS3.5 section B.2): "2.25." and a 128-bit number, at most
/// 44 characters. Unique across processes and threads (pid, clock and a counter are hashed).
pub fn new_uid() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&now_nanos().to_le_bytes());
    h.update(&UID_COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&h.finalize().as_bytes()[..16]);
    // A leading 1 bit keeps the number from being 0 and its decimal form from changing length.
    let n = u128::from_le_bytes(n) | (1u128 << 127);
    format!("2.25.{n}")
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
}

/// xorshift64*: a small, seedable generator for test decisions (kill delays). Print the seed
/// so that a failing run can be replayed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A generator seeded from the clock; returns the seed too.
    pub fn from_time() -> (Rng, u64) {
        let seed = (now_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
        (Rng::new(seed), seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Patient/study level attributes shared by the generated instances.
fn patient_and_study(ds: &mut DataSet, study_uid: &str) {
    ds.str((0x0008, 0x0005), "CS", "ISO_IR 100")
        .str((0x0008, 0x0020), "DA", "20261122")
        .str((0x0008, 0x0030), "TM", "100000")
        .str((0x0008, 0x0050), "SH", "SYN0001")
        .str((0x0008, 0x0070), "LO", "dicom-gateway tests")
        .str((0x0008, 0x0090), "PN", "")
        .str((0x0010, 0x0010), "PN", "Test^Synthetic")
        .str((0x0010, 0x0020), "LO", "SYN-0001")
        .str((0x0010, 0x0030), "DA", "")
        .str((0x0010, 0x0040), "CS", "O")
        .str((0x0020, 0x000D), "UI", study_uid)
        .str((0x0020, 0x0010), "SH", "1");
}

/// A grayscale image module (PS3.3 C.7.6.3) with `bits` allocated and stored.
fn image_pixel(ds: &mut DataSet, rows: u16, cols: u16, allocated: u16, stored: u16) {
    ds.us((0x0028, 0x0002), 1)
        .str((0x0028, 0x0004), "CS", "MONOCHROME2")
        .us((0x0028, 0x0010), rows)
        .us((0x0028, 0x0011), cols)
        .us((0x0028, 0x0100), allocated)
        .us((0x0028, 0x0101), stored)
        .us((0x0028, 0x0102), stored - 1)
        .us((0x0028, 0x0103), 0);
}

/// A CT series sharing one study, series and frame of reference.
#[derive(Clone, Debug)]
pub struct SeriesSpec {
    pub study_uid: String,
    pub series_uid: String,
    pub frame_of_reference_uid: String,
    pub rows: u16,
    pub cols: u16,
}

impl SeriesSpec {
    pub fn new(rows: u16, cols: u16) -> SeriesSpec {
        SeriesSpec {
            study_uid: new_uid(),
            series_uid: new_uid(),
            frame_of_reference_uid: new_uid(),
            rows,
            cols,
        }
    }

    /// Writes CT image number `number` of the series (12 bits stored, noise) to `path`.
    pub fn write_ct(&self, path: &Path, number: u32) -> PathBuf {
        let sop_uid = new_uid();
        let mut ds = DataSet::new();
        patient_and_study(&mut ds, &self.study_uid);
        let z = format!("{:.1}", -f64::from(number));
        ds.str((0x0008, 0x0008), "CS", "ORIGINAL\\PRIMARY\\AXIAL")
            .str((0x0008, 0x0012), "DA", "20261122")
            .str((0x0008, 0x0016), "UI", CT_IMAGE_STORAGE)
            .str((0x0008, 0x0018), "UI", &sop_uid)
            .str((0x0008, 0x0060), "CS", "CT")
            .str((0x0008, 0x103E), "LO", "synthetic noise")
            .str((0x0018, 0x0050), "DS", "1.0")
            .str((0x0018, 0x0060), "DS", "120")
            .str((0x0020, 0x000E), "UI", &self.series_uid)
            .str((0x0020, 0x0011), "IS", "1")
            .str((0x0020, 0x0013), "IS", &number.to_string())
            .str((0x0020, 0x0032), "DS", &format!("0.0\\0.0\\{z}"))
            .str((0x0020, 0x0037), "DS", "1\\0\\0\\0\\1\\0")
            .str((0x0020, 0x0052), "UI", &self.frame_of_reference_uid)
            .str((0x0020, 0x1041), "DS", &z)
            .str((0x0028, 0x0030), "DS", "0.5\\0.5")
            .str((0x0028, 0x1050), "DS", "1024")
            .str((0x0028, 0x1051), "DS", "4096")
            .str((0x0028, 0x1052), "DS", "-1024")
            .str((0x0028, 0x1053), "DS", "1");
        image_pixel(&mut ds, self.rows, self.cols, 16, 12);
        let pixels = NoisePixels {
            vr: "OW",
            len: u64::from(self.rows) * u64::from(self.cols) * 2,
            seed: sop_uid,
            high_byte_mask: 0x0F,
        };
        write_part10(path, &ds, Some(&pixels)).expect("write CT instance");
        path.to_path_buf()
    }

    /// Writes `count` instances as `dir/<prefix>-NNN.dcm`.
    pub fn write_series(&self, dir: &Path, prefix: &str, count: u32) -> Vec<PathBuf> {
        std::fs::create_dir_all(dir).expect("create data dir");
        (1..=count)
            .map(|i| self.write_ct(&dir.join(format!("{prefix}-{i:03}.dcm")), i))
            .collect()
    }
}

/// A CT series of `count` instances of `rows` x `cols` 16-bit noise, in a fresh study.
pub fn ct_series(dir: &Path, prefix: &str, count: u32, rows: u16, cols: u16) -> Vec<PathBuf> {
    SeriesSpec::new(rows, cols).write_series(dir, prefix, count)
}

/// An 8-bit secondary capture image (for JPEG baseline, which is 8-bit only).
pub fn sc_8bit(path: &Path, rows: u16, cols: u16) -> PathBuf {
    let sop_uid = new_uid();
    let mut ds = DataSet::new();
    patient_and_study(&mut ds, &new_uid());
    ds.str((0x0008, 0x0016), "UI", SECONDARY_CAPTURE_IMAGE_STORAGE)
        .str((0x0008, 0x0018), "UI", &sop_uid)
        .str((0x0008, 0x0060), "CS", "OT")
        .str((0x0008, 0x0064), "CS", "WSD")
        .str((0x0020, 0x000E), "UI", &new_uid())
        .str((0x0020, 0x0011), "IS", "1")
        .str((0x0020, 0x0013), "IS", "1");
    image_pixel(&mut ds, rows, cols, 8, 8);
    let pixels = NoisePixels {
        vr: "OB",
        len: u64::from(rows) * u64::from(cols),
        seed: sop_uid,
        high_byte_mask: 0xFF,
    };
    write_part10(path, &ds, Some(&pixels)).expect("write SC instance");
    path.to_path_buf()
}

/// A Multi-frame Grayscale Word Secondary Capture instance of `frames` frames of
/// `rows` x `cols` x 16 bits, streamed to disk (the test process never holds it).
pub fn multiframe(path: &Path, frames: u32, rows: u16, cols: u16) -> PathBuf {
    let sop_uid = new_uid();
    let mut ds = DataSet::new();
    patient_and_study(&mut ds, &new_uid());
    ds.str((0x0008, 0x0016), "UI", MULTIFRAME_GRAYSCALE_WORD_SC_STORAGE)
        .str((0x0008, 0x0018), "UI", &sop_uid)
        .str((0x0008, 0x0060), "CS", "OT")
        .str((0x0008, 0x0064), "CS", "WSD")
        .str((0x0020, 0x000E), "UI", &new_uid())
        .str((0x0020, 0x0011), "IS", "1")
        .str((0x0020, 0x0013), "IS", "1")
        .str((0x0028, 0x0008), "IS", &frames.to_string())
        // Frame Increment Pointer → Frame Time (0018,1063), as AT.
        .bytes((0x0028, 0x0009), "AT", &[0x18, 0x00, 0x63, 0x10])
        .str((0x0018, 0x1063), "DS", "100");
    image_pixel(&mut ds, rows, cols, 16, 16);
    let pixels = NoisePixels {
        vr: "OW",
        len: u64::from(frames) * u64::from(rows) * u64::from(cols) * 2,
        seed: sop_uid,
        high_byte_mask: 0xFF,
    };
    write_part10(path, &ds, Some(&pixels)).expect("write multi-frame instance");
    path.to_path_buf()
}

/// A small but well-formed one-page PDF (the cross-reference offsets are computed).
pub fn tiny_pdf() -> Vec<u8> {
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        "<< /Length 44 >>\nstream\nBT /F1 12 Tf 20 50 Td (Synthetic) Tj ET\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for off in offsets {
        pdf.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

/// An Encapsulated PDF instance (PS3.3 A.45.1) holding [`tiny_pdf`].
pub fn encapsulated_pdf(path: &Path) -> PathBuf {
    let mut ds = DataSet::new();
    patient_and_study(&mut ds, &new_uid());
    ds.str((0x0008, 0x0016), "UI", ENCAPSULATED_PDF_STORAGE)
        .str((0x0008, 0x0018), "UI", &new_uid())
        .str((0x0008, 0x0023), "DA", "20261122")
        .str((0x0008, 0x002A), "DT", "20261122100000")
        .str((0x0008, 0x0033), "TM", "100000")
        .str((0x0008, 0x0060), "CS", "DOC")
        .str((0x0008, 0x0064), "CS", "SD")
        .str((0x0020, 0x000E), "UI", &new_uid())
        .str((0x0020, 0x0011), "IS", "1")
        .str((0x0020, 0x0013), "IS", "1")
        .str((0x0028, 0x0301), "CS", "NO")
        .empty_sq((0x0040, 0xA043))
        .str((0x0042, 0x0010), "ST", "Synthetic report")
        .bytes((0x0042, 0x0011), "OB", &tiny_pdf())
        .str((0x0042, 0x0012), "LO", "application/pdf");
    write_part10(path, &ds, None).expect("write encapsulated PDF");
    path.to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// Conversion with DCMTK
// ---------------------------------------------------------------------------------------------

/// Converts an explicit VR little endian file to `to` with DCMTK; returns `output`.
/// Lossless conversions keep the SOP Instance UID; JPEG baseline gets a new one (dcmcjpeg's
/// default for lossy compression), so read the result with [`inspect`].
pub fn convert(input: &Path, output: &Path, to: Syntax) -> PathBuf {
    let (tool, flags): (&str, &[&str]) = match to {
        Syntax::ImplicitLe => ("dcmconv", &["+ti"]),
        Syntax::ExplicitLe => ("dcmconv", &["+te"]),
        Syntax::ExplicitBe => ("dcmconv", &["+tb"]),
        Syntax::Deflated => ("dcmconv", &["+td"]),
        Syntax::Rle => ("dcmcrle", &[]),
        Syntax::JpegLossless => ("dcmcjpeg", &["+e1"]),
        Syntax::JpegLs => ("dcmcjpls", &["+el"]),
        Syntax::JpegBaseline => ("dcmcjpeg", &["+eb"]),
    };
    let mut cmd = Command::new(dcmtk(tool));
    cmd.args(flags).arg(input).arg(output);
    run_tool(cmd, Duration::from_secs(120)).assert_success();
    let got = read_meta(output)
        .expect("read converted file")
        .transfer_syntax;
    assert_eq!(
        got,
        to.uid(),
        "{tool} wrote {} with an unexpected transfer syntax",
        output.display()
    );
    output.to_path_buf()
}
