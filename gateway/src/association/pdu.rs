//! PDU framing on the socket (PS3.8 section 9.3).
//!
//! P-DATA-TF PDUs are parsed here, in place, so that dataset fragments go from the read buffer
//! to the spool file without another copy; every other PDU type is decoded by dicom-ul. Every
//! length is checked before it is used: a PDU longer than the limit, or a PDV item that does not
//! fit its PDU, is an error, never an allocation or a panic.

use std::time::Duration;

use dicom_ul::pdu::{read_pdu, write_pdu, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// A-ASSOCIATE-RQ and the other non-data PDUs are small; this bounds what a peer can make us
/// allocate before association (a request with 128 contexts and 10 syntaxes each is ~40 KiB).
pub const MAX_CONTROL_PDU: u32 = 1024 * 1024;

const PDU_P_DATA_TF: u8 = 0x04;

#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection (or reset it).
    Closed,
    Io(std::io::Error),
    Timeout,
    TooLong {
        pdu_type: u8,
        length: u32,
        max: u32,
    },
    Malformed(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => f.write_str("peer closed the connection"),
            FrameError::Io(e) => write!(f, "socket error: {e}"),
            FrameError::Timeout => f.write_str("timed out waiting for the peer"),
            FrameError::TooLong {
                pdu_type,
                length,
                max,
            } => {
                write!(
                    f,
                    "PDU type {pdu_type:#04x} of {length} bytes exceeds the limit of {max}"
                )
            }
            FrameError::Malformed(m) => write!(f, "malformed PDU: {m}"),
        }
    }
}

/// One PDV item of a P-DATA-TF PDU (PS3.8 section 9.3.5.1).
pub struct Pdv<'a> {
    pub context_id: u8,
    /// Message control header bit 0.
    pub is_command: bool,
    /// Message control header bit 1.
    pub is_last: bool,
    pub data: &'a [u8],
}

pub enum Frame<'a> {
    /// The PDV items of a P-DATA-TF PDU, already checked to be well-formed.
    PData(Vec<Pdv<'a>>),
    Other(Pdu),
}

pub struct PduReader<R> {
    inner: BufReader<R>,
    /// Reused for every PDU and only grown, never zero-filled again: the current PDU is
    /// `body[..len]`; bytes past `len` are stale and never read.
    body: Vec<u8>,
    len: usize,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(inner: R) -> Self {
        PduReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            body: Vec::new(),
            len: 0,
        }
    }

    /// Reads the next PDU within `timeout`. `max_pdata` is the P-DATA-TF limit this side
    /// announced (PS3.8 section D.1).
    pub async fn next(
        &mut self,
        timeout: Duration,
        max_pdata: u32,
    ) -> Result<Frame<'_>, FrameError> {
        match tokio::time::timeout(timeout, self.read_raw(max_pdata)).await {
            Err(_) => Err(FrameError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(pdu_type)) => {
                if pdu_type == PDU_P_DATA_TF {
                    parse_pdata(&self.body[..self.len]).map(Frame::PData)
                } else {
                    decode_other(pdu_type, &self.body[..self.len]).map(Frame::Other)
                }
            }
        }
    }

    /// Reads header and body into `self.body`; returns the PDU type.
    async fn read_raw(&mut self, max_pdata: u32) -> Result<u8, FrameError> {
        let mut header = [0u8; 6];
        match self.inner.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if is_closed(&e) => return Err(FrameError::Closed),
            Err(e) => return Err(FrameError::Io(e)),
        }
        let pdu_type = header[0];
        // A TLS record header (content type 22 = handshake, version major 3, RFC 8446 section
        // 5.1) where a PDU should be: a peer speaking DICOM TLS to a plain port. No PDU type 0x16 exists (PS3.8 section
        // 9.3.1), so this never rejects DICOM; it only makes the log say what happened.
        if pdu_type == 0x16 && header[1] == 0x03 {
            return Err(FrameError::Malformed(
                "TLS ClientHello on a plain DICOM port: the peer speaks DICOM TLS; send it to a TLS listener, or turn TLS off on the peer".into(),
            ));
        }
        // Likewise a TLS alert (content type 21): we sent plain DICOM to a TLS port.
        if pdu_type == 0x15 && header[1] == 0x03 {
            return Err(FrameError::Malformed(
                "TLS alert where a DICOM PDU was expected: the peer's port expects DICOM TLS"
                    .into(),
            ));
        }
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        let max = if pdu_type == PDU_P_DATA_TF {
            max_pdata
        } else {
            MAX_CONTROL_PDU
        };
        if length > max {
            return Err(FrameError::TooLong {
                pdu_type,
                length,
                max,
            });
        }
        // `length <= max`, which the configuration bounds (at most 16 MiB).
        let length = length as usize;
        if self.body.len() < length {
            self.body.resize(length, 0);
        }
        self.len = 0;
        match self.inner.read_exact(&mut self.body[..length]).await {
            Ok(_) => {
                self.len = length;
                Ok(pdu_type)
            }
            Err(e) if is_closed(&e) => Err(FrameError::Closed),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

fn parse_pdata(body: &[u8]) -> Result<Vec<Pdv<'_>>, FrameError> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some((len, after)) = rest.split_first_chunk::<4>() else {
            return Err(FrameError::Malformed("truncated PDV item length".into()));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len < 2 || len > after.len() {
            return Err(FrameError::Malformed(format!(
                "PDV item length {len} does not fit the {} bytes left in the PDU",
                after.len()
            )));
        }
        let (item, next) = after.split_at(len);
        let (context_id, control, data) = (item[0], item[1], &item[2..]);
        if context_id % 2 == 0 {
            return Err(FrameError::Malformed(format!(
                "presentation context ID {context_id} is even (PS3.8 section 9.3.2.2)"
            )));
        }
        out.push(Pdv {
            context_id,
            is_command: control & 0x01 != 0,
            is_last: control & 0x02 != 0,
            data,
        });
        rest = next;
    }
    if out.is_empty() {
        return Err(FrameError::Malformed("P-DATA-TF without PDV items".into()));
    }
    Ok(out)
}

fn decode_other(pdu_type: u8, body: &[u8]) -> Result<Pdu, FrameError> {
    let mut whole = Vec::with_capacity(body.len() + 6);
    whole.push(pdu_type);
    whole.push(0);
    whole.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    whole.extend_from_slice(body);
    match read_pdu(&whole[..], MAX_CONTROL_PDU, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(FrameError::Malformed("incomplete PDU".into())),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Writes one PDU within `timeout`.
pub async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    pdu: &Pdu,
    timeout: Duration,
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(256);
    write_pdu(&mut buf, pdu)
        .map_err(|e| FrameError::Malformed(format!("cannot encode PDU: {e}")))?;
    send_bytes(w, &buf, timeout).await
}

pub async fn send_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), FrameError> {
    match tokio::time::timeout(timeout, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
    {
        Err(_) => Err(FrameError::Timeout),
        Ok(Err(e)) if is_closed(&e) => Err(FrameError::Closed),
        Ok(Err(e)) => Err(FrameError::Io(e)),
        Ok(Ok(())) => Ok(()),
    }
}

/// Encodes a P-DATA-TF PDU with one PDV item (used for small DIMSE responses).
pub fn pdata_single(context_id: u8, is_command: bool, is_last: bool, data: &[u8]) -> Vec<u8> {
    let item_len = u32::try_from(data.len() + 2).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(data.len() + 12);
    out.push(PDU_P_DATA_TF);
    out.push(0);
    out.extend_from_slice(&(item_len + 4).to_be_bytes());
    out.extend_from_slice(&item_len.to_be_bytes());
    out.push(context_id);
    out.push(u8::from(is_command) | (u8::from(is_last) << 1));
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdata_round_trip_and_bounds() {
        let pdu = pdata_single(1, true, true, b"abcd");
        let pdvs = parse_pdata(&pdu[6..]).unwrap();
        assert_eq!(pdvs.len(), 1);
        assert!(pdvs[0].is_command && pdvs[0].is_last);
        assert_eq!(pdvs[0].data, b"abcd");
        // Item length larger than the PDU body.
        let mut bad = pdu[6..].to_vec();
        bad[3] = 200;
        assert!(matches!(parse_pdata(&bad), Err(FrameError::Malformed(_))));
        // Truncated length field and zero-length item.
        assert!(parse_pdata(&[0, 0]).is_err());
        assert!(parse_pdata(&[0, 0, 0, 0]).is_err());
        // Even presentation context ID.
        assert!(parse_pdata(&pdata_single(2, false, true, b"x")[6..]).is_err());
    }

    #[tokio::test]
    async fn names_a_tls_client_hello_on_a_plain_port() {
        // The first bytes of a TLS 1.2/1.3 ClientHello record.
        let bytes = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        let mut r = PduReader::new(&bytes[..]);
        match r.next(Duration::from_secs(1), 16384).await {
            Err(FrameError::Malformed(m)) => assert!(m.contains("TLS ClientHello"), "{m}"),
            _ => panic!("a TLS ClientHello was not recognised"),
        }
    }

    #[tokio::test]
    async fn rejects_oversized_pdu_without_allocating() {
        let bytes = [0x04u8, 0, 0xff, 0xff, 0xff, 0xff];
        let mut r = PduReader::new(&bytes[..]);
        match r.next(Duration::from_secs(1), 16384).await {
            Err(FrameError::TooLong { length, .. }) => assert_eq!(length, u32::MAX),
            _ => panic!("oversized PDU accepted"),
        }
    }
}
