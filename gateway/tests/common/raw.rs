//! A raw DICOM Upper Layer client: PDUs built and parsed by hand from PS3.8 section 9.3, so
//! tests can send exactly the bytes they mean (valid, truncated, oversized or garbage) and see
//! exactly what comes back (result/source/reason of an A-ASSOCIATE-RJ, A-ABORT, status codes).
//!
//! It shares no code with the gateway or dicom-ul on purpose: a bug in a shared encoder would
//! otherwise cancel out.

mod pdu;

pub use pdu::*;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Panics unless a DIMSE status is `want`, showing both in hex as the standard writes them.
#[track_caller]
pub fn assert_status(got: u16, want: u16, what: &str) {
    assert!(
        got == want,
        "{what}: status {got:#06X}, expected {want:#06X}"
    );
}

/// DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATASET_MISMATCH: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// What happened while waiting for the peer to close.
#[derive(Debug)]
pub struct Closed {
    /// PDUs received before the end of the stream.
    pub pdus: Vec<Pdu>,
    /// Bytes that did not form a whole PDU.
    pub trailing: Vec<u8>,
    /// Time from the start of the wait to the end of the stream.
    pub after: Duration,
    /// The stream ended with a reset rather than an orderly close.
    pub reset: bool,
}

impl Closed {
    pub fn got_abort(&self) -> bool {
        self.pdus.iter().any(|p| matches!(p, Pdu::Abort { .. }))
    }
}

/// A TCP connection speaking raw PDUs.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().expect("local addr").port()
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes our sending side (the peer reads end of stream).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Reads until `n` bytes are buffered or the deadline passes.
    fn fill(&mut self, n: usize, deadline: Instant) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no PDU from the gateway in time",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ))
                }
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no PDU from the gateway in time",
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives one whole PDU.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Pdu> {
        let deadline = Instant::now() + timeout;
        self.fill(6, deadline)?;
        let t = self.buf[0];
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        assert!(
            len <= 64 << 20,
            "the gateway sent a PDU of {len} bytes (type {t:#04x})"
        );
        self.fill(6 + len, deadline)?;
        let body = self.buf[6..6 + len].to_vec();
        self.buf.drain(..6 + len);
        Ok(parse_pdu(t, body))
    }

    /// Sends an A-ASSOCIATE-RQ and returns the answer.
    pub fn request(&mut self, rq: &AssociateRq) -> Pdu {
        self.send(&rq.encode()).expect("send A-ASSOCIATE-RQ");
        self.recv(Duration::from_secs(10))
            .expect("answer to A-ASSOCIATE-RQ")
    }

    /// Sends an A-ASSOCIATE-RQ and panics unless it is accepted with every context accepted.
    /// Returns the accepted contexts.
    pub fn associate(&mut self, rq: &AssociateRq) -> Vec<AcceptedContext> {
        match self.request(rq) {
            Pdu::AssociateAc { contexts, .. } => {
                for c in &contexts {
                    assert_eq!(
                        c.result, 0,
                        "presentation context {} not accepted: {contexts:?}",
                        c.id
                    );
                }
                contexts
            }
            other => panic!("association not accepted: {other:?}"),
        }
    }

    /// Waits until the peer closes the connection, collecting PDUs it sends first.
    /// Returns `None` if the connection is still open after `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<Closed> {
        let start = Instant::now();
        let mut chunk = [0u8; 65536];
        let mut reset = false;
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    reset = true;
                    break;
                }
            }
        }
        let after = start.elapsed();
        let mut pdus = Vec::new();
        while self.buf.len() >= 6 {
            let len =
                u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
            if self.buf.len() < 6 + len {
                break;
            }
            let body = self.buf[6..6 + len].to_vec();
            pdus.push(parse_pdu(self.buf[0], body));
            self.buf.drain(..6 + len);
        }
        Some(Closed {
            pdus,
            trailing: std::mem::take(&mut self.buf),
            after,
            reset,
        })
    }

    /// Receives a whole DIMSE command set (PDVs of context `id` until the last fragment).
    pub fn recv_command(&mut self, timeout: Duration) -> io::Result<CommandSet> {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Pdu::PData(pdvs) => {
                    for pdv in pdvs {
                        assert!(
                            pdv.is_command(),
                            "expected a command fragment, got data: {pdv:?}"
                        );
                        bytes.extend_from_slice(&pdv.data);
                        if pdv.is_last() {
                            return Ok(CommandSet::parse(&bytes));
                        }
                    }
                }
                other => {
                    return Err(io::Error::other(format!(
                        "expected P-DATA-TF with a DIMSE response, got {other:?}"
                    )))
                }
            }
        }
    }

    /// Sends a C-ECHO-RQ on context `id` and returns the response status.
    pub fn c_echo(&mut self, id: u8, message_id: u16) -> u16 {
        let cmd = CommandSet::new()
            .with_ui(0x0002, VERIFICATION)
            .with_us(0x0100, 0x0030)
            .with_us(0x0110, message_id)
            .with_us(0x0800, 0x0101)
            .encode();
        self.send(&p_data(&[(id, 0x03, &cmd)]))
            .expect("send C-ECHO-RQ");
        let rsp = self
            .recv_command(Duration::from_secs(10))
            .expect("C-ECHO-RSP");
        assert_eq!(rsp.us(0x0100), Some(0x8030), "not a C-ECHO-RSP: {rsp:?}");
        assert_eq!(
            rsp.us(0x0120),
            Some(message_id),
            "C-ECHO-RSP answers another message"
        );
        rsp.us(0x0900).expect("C-ECHO-RSP without status")
    }

    /// Sends a C-STORE-RQ (command UIDs as given) and `dataset` in PDVs of at most
    /// `max_fragment` bytes; returns the response status.
    pub fn c_store(
        &mut self,
        id: u8,
        message_id: u16,
        sop_class: &str,
        sop_instance: &str,
        dataset: &[u8],
        max_fragment: usize,
    ) -> u16 {
        let cmd = store_command(message_id, sop_class, sop_instance);
        self.send(&p_data(&[(id, 0x03, &cmd)]))
            .expect("send C-STORE-RQ");
        let chunks: Vec<&[u8]> = dataset.chunks(max_fragment.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            let control = if i + 1 == chunks.len() { 0x02 } else { 0x00 };
            self.send(&p_data(&[(id, control, c)]))
                .expect("send dataset fragment");
        }
        let rsp = self
            .recv_command(Duration::from_secs(30))
            .expect("C-STORE-RSP");
        assert_eq!(rsp.us(0x0100), Some(0x8001), "not a C-STORE-RSP: {rsp:?}");
        assert_eq!(
            rsp.us(0x0120),
            Some(message_id),
            "C-STORE-RSP answers another message"
        );
        rsp.us(0x0900).expect("C-STORE-RSP without status")
    }

    /// Sends A-RELEASE-RQ and returns the answer.
    pub fn release(&mut self) -> Pdu {
        self.send(&release_rq()).expect("send A-RELEASE-RQ");
        self.recv(Duration::from_secs(10))
            .expect("answer to A-RELEASE-RQ")
    }
}
