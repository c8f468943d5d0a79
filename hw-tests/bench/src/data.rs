//! Synthetic DICOM data, made here (never real patient data) and cached in the work directory.
//!
//! Files are DICOM Part 10 (PS3.10 section 7.1) in explicit VR little endian, written by a small
//! encoder that streams the pixel data from the BLAKE3 extended output in 1 MiB chunks, so the
//! 256 MiB multi-frame instance never exists whole in this process. The noise does not
//! compress, so no layer can cheat by shrinking it. The encoder follows the idea of
//! `gateway/tests/common/data/part10.rs` (our own test generator).
//!
//! UIDs are derived from fixed labels ("2.25." + 128 bits of BLAKE3), so a cached data set is
//! the same from run to run.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const MF_GRAYSCALE_WORD_SC: &str = "1.2.840.10008.5.1.4.1.1.7.3";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLEMENTATION_CLASS_UID: &str = "2.25.191962364440931296655911563224150771467";
const IMPLEMENTATION_VERSION_NAME: &str = "DGW_BENCH";

/// A UID under the 2.25 root from a label: "2.25." and a 128-bit number (at most 44 chars).
pub fn uid(label: &str) -> String {
    let h = blake3::hash(label.as_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&h.as_bytes()[..16]);
    // A leading 1 bit keeps the decimal length stable and the number non-zero.
    let n = u128::from_le_bytes(n) | (1u128 << 127);
    format!("2.25.{n}")
}

fn long_length(vr: &str) -> bool {
    matches!(
        vr,
        "OB" | "OD" | "OF" | "OL" | "OV" | "OW" | "SQ" | "SV" | "UC" | "UN" | "UR" | "UT" | "UV"
    )
}

/// Appends one explicit VR little endian element; pads the value to even length.
fn element(out: &mut Vec<u8>, (group, elem): (u16, u16), vr: &str, value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if matches!(vr, "UI" | "OB" | "OW" | "UN") {
            0
        } else {
            b' '
        });
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr.as_bytes());
    let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
    if long_length(vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    }
    out.extend_from_slice(&v);
}

/// A dataset under construction; elements are encoded in tag order by [`DataSet::encode`].
#[derive(Default)]
pub struct DataSet {
    elements: Vec<((u16, u16), &'static str, Vec<u8>)>,
}

impl DataSet {
    pub fn str(&mut self, tag: (u16, u16), vr: &'static str, value: &str) -> &mut Self {
        self.elements.push((tag, vr, value.as_bytes().to_vec()));
        self
    }

    pub fn us(&mut self, tag: (u16, u16), value: u16) -> &mut Self {
        self.elements
            .push((tag, "US", value.to_le_bytes().to_vec()));
        self
    }

    fn get(&self, tag: (u16, u16)) -> String {
        self.elements
            .iter()
            .find(|(t, _, _)| *t == tag)
            .map(|(_, _, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The dataset bytes (without pixel data), sorted by tag.
    pub fn encode(&self) -> Vec<u8> {
        let mut sorted: Vec<_> = self.elements.iter().collect();
        sorted.sort_by_key(|(t, _, _)| *t);
        let mut out = Vec::with_capacity(1024);
        for (tag, vr, v) in sorted {
            element(&mut out, *tag, vr, v);
        }
        out
    }
}

/// Preamble, "DICM" and the file meta group (PS3.10 section 7.1).
fn part10_header(sop_class: &str, sop_instance: &str) -> Vec<u8> {
    let mut group = Vec::new();
    element(&mut group, (0x0002, 0x0001), "OB", &[0, 1]);
    element(&mut group, (0x0002, 0x0002), "UI", sop_class.as_bytes());
    element(&mut group, (0x0002, 0x0003), "UI", sop_instance.as_bytes());
    element(
        &mut group,
        (0x0002, 0x0010),
        "UI",
        EXPLICIT_VR_LE.as_bytes(),
    );
    element(
        &mut group,
        (0x0002, 0x0012),
        "UI",
        IMPLEMENTATION_CLASS_UID.as_bytes(),
    );
    element(
        &mut group,
        (0x0002, 0x0013),
        "SH",
        IMPLEMENTATION_VERSION_NAME.as_bytes(),
    );
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let len = u32::try_from(group.len()).unwrap_or(u32::MAX);
    element(&mut out, (0x0002, 0x0000), "UL", &len.to_le_bytes());
    out.extend_from_slice(&group);
    out
}

/// Writes a Part 10 file: header, dataset, then `pixel_bytes` of noise as (7FE0,0010) OW,
/// streamed. `mask_high` keeps 16-bit samples within 12 bits stored. The file is fsynced so
/// that generation does not leave dirty pages behind to disturb the measurements.
fn write_part10(path: &Path, ds: &DataSet, pixel_bytes: u64, mask_high: bool) -> io::Result<()> {
    let sop_class = ds.get((0x0008, 0x0016));
    let sop_instance = ds.get((0x0008, 0x0018));
    let tmp = path.with_extension("part");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    w.write_all(&part10_header(&sop_class, &sop_instance))?;
    w.write_all(&ds.encode())?;
    if pixel_bytes > 0 {
        let mut head = Vec::new();
        element(&mut head, (0x7FE0, 0x0010), "OW", &[]);
        let n = head.len();
        let len =
            u32::try_from(pixel_bytes).map_err(|_| io::Error::other("pixel data over 4 GiB"))?;
        head[n - 4..].copy_from_slice(&len.to_le_bytes());
        w.write_all(&head)?;
        let mut xof = blake3::Hasher::new()
            .update(sop_instance.as_bytes())
            .finalize_xof();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = pixel_bytes;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = &mut buf[..n];
            xof.fill(chunk);
            if mask_high {
                for b in chunk.iter_mut().skip(1).step_by(2) {
                    *b &= 0x0F;
                }
            }
            w.write_all(chunk)?;
            left -= n as u64;
        }
    }
    let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn patient_study(ds: &mut DataSet, study_uid: &str, series_uid: &str, number: u32) {
    ds.str((0x0008, 0x0005), "CS", "ISO_IR 100")
        .str((0x0008, 0x0020), "DA", "20261122")
        .str((0x0008, 0x0030), "TM", "100000")
        .str((0x0008, 0x0050), "SH", "BENCH0001")
        .str((0x0008, 0x0070), "LO", "dicom-gateway bench")
        .str((0x0010, 0x0010), "PN", "Bench^Synthetic")
        .str((0x0010, 0x0020), "LO", "BENCH-0001")
        .str((0x0010, 0x0040), "CS", "O")
        .str((0x0020, 0x000D), "UI", study_uid)
        .str((0x0020, 0x000E), "UI", series_uid)
        .str((0x0020, 0x0010), "SH", "1")
        .str((0x0020, 0x0011), "IS", "1")
        .str((0x0020, 0x0013), "IS", &number.to_string());
}

/// A CT image dataset of `rows` x `cols` x 16 bits (12 stored); returns it and the pixel
/// data length.
fn ct_dataset(set: &str, number: u32, rows: u16, cols: u16) -> (DataSet, u64) {
    let mut ds = DataSet::default();
    patient_study(
        &mut ds,
        &uid(&format!("{set}/study")),
        &uid(&format!("{set}/series")),
        number,
    );
    let z = format!("{:.1}", -f64::from(number));
    ds.str((0x0008, 0x0008), "CS", "ORIGINAL\\PRIMARY\\AXIAL")
        .str((0x0008, 0x0016), "UI", CT_IMAGE_STORAGE)
        .str((0x0008, 0x0018), "UI", &uid(&format!("{set}/{number}")))
        .str((0x0008, 0x0060), "CS", "CT")
        .str((0x0018, 0x0050), "DS", "1.0")
        .str((0x0020, 0x0032), "DS", &format!("0.0\\0.0\\{z}"))
        .str((0x0020, 0x0037), "DS", "1\\0\\0\\0\\1\\0")
        .str((0x0020, 0x0052), "UI", &uid(&format!("{set}/for")))
        .str((0x0028, 0x0004), "CS", "MONOCHROME2")
        .str((0x0028, 0x0030), "DS", "0.5\\0.5")
        .str((0x0028, 0x1050), "DS", "40")
        .str((0x0028, 0x1051), "DS", "400")
        .str((0x0028, 0x1052), "DS", "-1024")
        .str((0x0028, 0x1053), "DS", "1")
        .us((0x0028, 0x0002), 1)
        .us((0x0028, 0x0010), rows)
        .us((0x0028, 0x0011), cols)
        .us((0x0028, 0x0100), 16)
        .us((0x0028, 0x0101), 12)
        .us((0x0028, 0x0102), 11)
        .us((0x0028, 0x0103), 0);
    (ds, u64::from(rows) * u64::from(cols) * 2)
}

/// A set of files split into `parts` subdirectories (one per concurrent association).
#[derive(Clone, Debug)]
pub struct FileSet {
    pub dir: PathBuf,
    pub count: u32,
    pub parts: Vec<PathBuf>,
    /// Dataset bytes (what crosses the network), summed.
    pub bytes: u64,
}

/// `count` CT images of `rows` x `cols` in `dir/0 .. dir/(parts-1)`; reuses a complete set.
pub fn ct_set(dir: &Path, count: u32, rows: u16, cols: u16, parts: u32) -> io::Result<FileSet> {
    let label = dir.to_string_lossy().into_owned();
    // The marker lives beside the set: storescu sends every file under `dir`.
    let marker = dir.with_extension("complete");
    let part_dirs: Vec<PathBuf> = (0..parts).map(|p| dir.join(p.to_string())).collect();
    let mut bytes = 0u64;
    let fresh = !marker.exists();
    if fresh {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(&marker);
        for d in &part_dirs {
            std::fs::create_dir_all(d)?;
        }
    }
    for i in 1..=count {
        let (ds, pixels) = ct_dataset(&label, i, rows, cols);
        bytes += ds.encode().len() as u64 + 12 + pixels;
        if fresh {
            let d = &part_dirs[(i % parts) as usize];
            write_part10(&d.join(format!("{i:06}.dcm")), &ds, pixels, true)?;
        }
    }
    if fresh {
        std::fs::write(&marker, format!("{count}\n"))?;
    }
    Ok(FileSet {
        dir: dir.to_path_buf(),
        count,
        parts: part_dirs,
        bytes,
    })
}

/// One Multi-frame Grayscale Word SC instance of `frames` frames of 512 x 512 x 16 bits.
pub fn multiframe(dir: &Path, frames: u32) -> io::Result<FileSet> {
    let path = dir.join("0").join("multiframe.dcm");
    let label = dir.to_string_lossy().into_owned();
    let mut ds = DataSet::default();
    patient_study(
        &mut ds,
        &uid(&format!("{label}/study")),
        &uid(&format!("{label}/series")),
        1,
    );
    ds.str((0x0008, 0x0016), "UI", MF_GRAYSCALE_WORD_SC)
        .str((0x0008, 0x0018), "UI", &uid(&format!("{label}/mf")))
        .str((0x0008, 0x0060), "CS", "OT")
        .str((0x0008, 0x0064), "CS", "WSD")
        .str((0x0028, 0x0004), "CS", "MONOCHROME2")
        .str((0x0028, 0x0008), "IS", &frames.to_string())
        .us((0x0028, 0x0002), 1)
        .us((0x0028, 0x0010), 512)
        .us((0x0028, 0x0011), 512)
        .us((0x0028, 0x0100), 16)
        .us((0x0028, 0x0101), 16)
        .us((0x0028, 0x0102), 15)
        .us((0x0028, 0x0103), 0);
    let pixels = u64::from(frames) * 512 * 512 * 2;
    if !path.exists() {
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        write_part10(&path, &ds, pixels, false)?;
    }
    Ok(FileSet {
        dir: dir.to_path_buf(),
        count: 1,
        parts: vec![dir.join("0")],
        bytes: ds.encode().len() as u64 + 12 + pixels,
    })
}

/// The dataset of tiny instance `n` of the index build (no pixel data, ~0.5 KB): 500 instances
/// per study, as a CT series would be. Returns (SOP Instance UID, dataset bytes).
pub fn tiny_instance(n: u64) -> (String, Vec<u8>) {
    let study = n / 500;
    let sop = uid(&format!("index/{n}"));
    let mut ds = DataSet::default();
    patient_study(
        &mut ds,
        &uid(&format!("index/study/{study}")),
        &uid(&format!("index/series/{study}")),
        u32::try_from(n % 500).unwrap_or(0) + 1,
    );
    ds.str((0x0008, 0x0016), "UI", CT_IMAGE_STORAGE)
        .str((0x0008, 0x0018), "UI", &sop)
        .str((0x0008, 0x0060), "CS", "CT");
    (sop, ds.encode())
}
