//! The Part 10 form of a spooled instance (PS3.10 section 7): the 128-byte preamble, `DICM`, the
//! file meta group in explicit VR little endian (PS3.10 section 7.1), then the dataset bytes
//! exactly as received. It is the body of a segment record ([`super::segment`]), and what
//! `dicom-gateway export` writes out.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::uid::IMPLEMENTATION_CLASS_UID;
use crate::uid::IMPLEMENTATION_VERSION_NAME;

/// A dataset content hash: duplicate detection and integrity checks.
pub type Hash = [u8; 32];

pub fn hex(hash: &Hash) -> String {
    use std::fmt::Write as _;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where a spooled Part 10 file lies: a segment record's body, or a whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolSlice {
    pub path: PathBuf,
    pub offset: u64,
    /// `None`: to the end of the file.
    pub len: Option<u64>,
}

impl SpoolSlice {
    /// The body of the record at `loc`.
    pub fn of(data_dir: &Path, loc: &super::segment::Location) -> SpoolSlice {
        SpoolSlice {
            path: super::segment::segment_path(data_dir, loc.segment),
            offset: loc.body_start(),
            len: Some(loc.body_len),
        }
    }
}

impl From<&Path> for SpoolSlice {
    fn from(path: &Path) -> SpoolSlice {
        SpoolSlice {
            path: path.to_path_buf(),
            offset: 0,
            len: None,
        }
    }
}

impl From<&PathBuf> for SpoolSlice {
    fn from(path: &PathBuf) -> SpoolSlice {
        SpoolSlice::from(path.as_path())
    }
}

impl From<&SpoolSlice> for SpoolSlice {
    fn from(s: &SpoolSlice) -> SpoolSlice {
        s.clone()
    }
}

/// The fields of the Part 10 file meta group that the gateway writes and reads back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    pub source_ae: String,
}

/// Encodes preamble, magic and file meta group (PS3.10 section 7.1, explicit VR LE).
pub fn encode_header(meta: &FileMeta) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    put_elem(&mut group, 0x0001, b"OB", &[0, 1]);
    put_elem(&mut group, 0x0002, b"UI", &pad(&meta.sop_class_uid, 0));
    put_elem(&mut group, 0x0003, b"UI", &pad(&meta.sop_instance_uid, 0));
    put_elem(&mut group, 0x0010, b"UI", &pad(&meta.transfer_syntax, 0));
    put_elem(&mut group, 0x0012, b"UI", &pad(IMPLEMENTATION_CLASS_UID, 0));
    put_elem(
        &mut group,
        0x0013,
        b"SH",
        &pad(IMPLEMENTATION_VERSION_NAME, b' '),
    );
    put_elem(&mut group, 0x0016, b"AE", &pad(&meta.source_ae, b' '));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let len = u32::try_from(group.len()).unwrap_or(u32::MAX);
    put_elem(&mut out, 0x0000, b"UL", &len.to_le_bytes());
    out.extend_from_slice(&group);
    out
}

fn pad(s: &str, with: u8) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(with);
    }
    v
}

fn put_elem(out: &mut Vec<u8>, element: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        // PS3.5 section 7.1.2: OB has two reserved bytes and a 4-byte length.
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
    } else {
        out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    }
    out.extend_from_slice(value);
}

/// Reads the file meta group of a spool file; returns it and the offset of the dataset.
pub fn read_header(file: &mut impl Read) -> io::Result<(FileMeta, u64)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut pre = [0u8; 132];
    file.read_exact(&mut pre)?;
    if &pre[128..] != b"DICM" {
        return Err(bad("no DICM prefix"));
    }
    let mut gl = [0u8; 12];
    file.read_exact(&mut gl)?;
    if gl[..6] != [2, 0, 0, 0, b'U', b'L'] {
        return Err(bad("file meta group does not start with (0002,0000) UL"));
    }
    let len = u32::from_le_bytes([gl[8], gl[9], gl[10], gl[11]]);
    if len > 64 * 1024 {
        return Err(bad("file meta group longer than 64 KiB"));
    }
    let mut group = vec![0u8; len as usize];
    file.read_exact(&mut group)?;
    let mut meta = FileMeta {
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        transfer_syntax: String::new(),
        source_ae: String::new(),
    };
    let mut p = 0usize;
    while p + 8 <= group.len() {
        let elem = u16::from_le_bytes([group[p + 2], group[p + 3]]);
        let vr = [group[p + 4], group[p + 5]];
        let (vlen, start) = if matches!(&vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT" | b"UC" | b"UR")
        {
            let b = group
                .get(p + 8..p + 12)
                .ok_or_else(|| bad("truncated meta element"))?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                p + 12,
            )
        } else {
            (
                usize::from(u16::from_le_bytes([group[p + 6], group[p + 7]])),
                p + 8,
            )
        };
        let value = group
            .get(start..start + vlen)
            .ok_or_else(|| bad("truncated meta element"))?;
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match elem {
            0x0002 => meta.sop_class_uid = text(),
            0x0003 => meta.sop_instance_uid = text(),
            0x0010 => meta.transfer_syntax = text(),
            0x0016 => meta.source_ae = text(),
            _ => {}
        }
        p = start + vlen;
    }
    Ok((meta, 144 + u64::from(len)))
}

/// Feeds written bytes to a hasher.
pub struct HashWriter<'a>(pub &'a mut blake3::Hasher);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3.4.5".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source_ae: "CT01".into(),
        };
        let bytes = encode_header(&meta);
        let (back, offset) = read_header(&mut &bytes[..]).unwrap();
        assert_eq!(back, meta);
        assert_eq!(offset as usize, bytes.len());
    }
}
