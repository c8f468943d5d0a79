//! The C-STORE SCU (`forward::upstream`) against real DCMTK peers on loopback, and against
//! peers that fail on purpose.
//!
//! Failure modes covered: a dataset altered or cut on its way (checked byte for byte in the file
//! `storescp +B` wrote, for one PDU and for ~1300 PDUs); a transfer syntax the PACS did not
//! accept sent anyway; a closed port, an unknown called AE title, a peer that accepts TCP but
//! never answers, a PACS that aborts, and one that does not answer in time, each reported as
//! the right error, quickly, with the right queue decision.
//!
//! Each test starts its own peer on its own port with its own temporary directory; a peer
//! process is killed when its guard drops, also when the test fails.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_gateway::config::{Config, Destination};
use dicom_gateway::forward::status::{self, Disposition};
use dicom_gateway::forward::upstream::{
    self as upstream, ContextResult, Offer, Upstream, UpstreamError,
};
use dicom_gateway::store::spool::{self, FileMeta};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use tempfile::TempDir;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
/// Every test finishes well within this, or fails instead of hanging the suite.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

// ---- peers ----------------------------------------------------------------------------------

/// A DCMTK process; killed on drop.
struct Peer {
    child: Child,
    port: u16,
    log: PathBuf,
    /// storescp's output directory.
    out: PathBuf,
    _dir: TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// `storescp -aet PACS +B` (bit-preserving) with `extra` options.
    fn storescp(extra: &[&str]) -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("received");
        std::fs::create_dir(&out).expect("create output dir");
        let port = free_port();
        let mut cmd = Command::new("/usr/bin/storescp");
        cmd.args(["-v", "-aet", "PACS", "+B", "-pdu", "16384", "-od"])
            .arg(&out)
            .args(extra)
            .arg(port.to_string());
        Peer::start(cmd, dir, out, port)
    }

    /// `dcmqrscp` knowing only the AE title PACS: it rejects other called AE titles
    /// (storescp 3.6.7 has no option to check the called AE title).
    fn dcmqrscp() -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("db");
        std::fs::create_dir(&db).expect("create db dir");
        let port = free_port();
        let cfg = dir.path().join("dcmqrscp.cfg");
        std::fs::write(
            &cfg,
            format!(
                "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n\
                 HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n\
                 AETable BEGIN\nPACS {} RW (10, 64mb) ANY\nAETable END\n",
                db.display()
            ),
        )
        .expect("write dcmqrscp.cfg");
        let mut cmd = Command::new("/usr/bin/dcmqrscp");
        cmd.arg("--single-process")
            .arg("-c")
            .arg(&cfg)
            .arg(port.to_string());
        Peer::start(cmd, dir, db, port)
    }

    fn start(mut cmd: Command, dir: TempDir, out: PathBuf, port: u16) -> Peer {
        let log = dir.path().join("peer.log");
        let f = std::fs::File::create(&log).expect("create peer log");
        let child = cmd
            .env("TCP_NODELAY", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone peer log handle"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} (apt-get install dcmtk): {e}"));
        let mut peer = Peer {
            child,
            port,
            log,
            out,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = peer.child.try_wait() {
                panic!("{cmd:?} exited ({st}) before listening:\n{}", peer.log());
            }
            assert!(
                Instant::now() < until,
                "{cmd:?} not listening after 10 s:\n{}",
                peer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The file storescp wrote for `sop_instance`, once it has `min_len` bytes.
    fn received(&self, sop_instance: &str, min_len: u64) -> PathBuf {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let found = std::fs::read_dir(&self.out)
                .expect("read storescp output dir")
                .map(|e| e.expect("read storescp output dir entry").path())
                .find(|p| p.to_string_lossy().ends_with(sop_instance));
            if let Some(p) = found {
                if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= min_len {
                    return p;
                }
            }
            assert!(
                Instant::now() < until,
                "no file for {sop_instance}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A destination through the real config validation.
fn destination(called_ae: &str, port: u16, connect_secs: u64, dimse_secs: u64) -> Destination {
    let toml = format!(
        r#"
[gateway]
ae_title = "DICOM_GW"
data_dir = "/nonexistent/not-used"

[[listen]]
address = "127.0.0.1:11112"

[[destination]]
name = "test-pacs"
ae_title = "{called_ae}"
address = "127.0.0.1:{port}"
connect_timeout_secs = {connect_secs}
dimse_timeout_secs = {dimse_secs}
"#
    );
    let mut cfg = Config::parse(&toml, "upstream test").expect("test config must be valid");
    cfg.destinations.remove(0)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, f)
        .await
        .expect("test deadline exceeded")
}

// ---- data -----------------------------------------------------------------------------------

fn new_uid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "2.25.{}{:04}",
        t,
        N.fetch_add(1, Ordering::Relaxed) % 10_000
    )
}

/// A synthetic instance (no real patient data) encoded in `ts`, with `pixel_bytes` of
/// pseudo-random pixel data.
fn dataset(sop_class: &str, sop_instance: &str, ts: &str, pixel_bytes: usize) -> Vec<u8> {
    let cols: u16 = 512;
    let rows = u16::try_from(pixel_bytes / 2 / usize::from(cols)).expect("rows fit in u16");
    let mut x: u32 = 0x1234_5678;
    let pixels: Vec<u8> = (0..usize::from(rows) * usize::from(cols) * 2)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let study = new_uid();
    let series = new_uid();
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(sop_class)),
        DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
        DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            PrimitiveValue::from("TEST^UPSTREAM"),
        ),
        DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("UPSTREAM-1")),
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(study.as_str()),
        ),
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(series.as_str()),
        ),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("MONOCHROME2"),
        ),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(cols)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
    ]);
    let ts = TransferSyntaxRegistry
        .get(ts)
        .expect("transfer syntax is registered");
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .expect("encode dataset");
    out
}

/// Writes a spool-format file (the gateway's header, then the dataset) and returns its path.
fn spool_file(dir: &Path, sop_class: &str, sop_instance: &str, ts: &str, data: &[u8]) -> PathBuf {
    let meta = FileMeta {
        sop_class_uid: sop_class.into(),
        sop_instance_uid: sop_instance.into(),
        transfer_syntax: ts.into(),
        source_ae: "CT01".into(),
    };
    let path = dir.join(format!("{sop_instance}.dcm"));
    let mut bytes = spool::encode_header(&meta);
    bytes.extend_from_slice(data);
    std::fs::write(&path, bytes).expect("write spool file");
    path
}

/// The meta and dataset bytes of a Part 10 file.
fn part10_dataset(path: &Path) -> (FileMeta, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read received file");
    let (meta, offset) =
        spool::read_header(&mut &bytes[..]).expect("received file has a Part 10 header");
    (meta, bytes[offset as usize..].to_vec())
}

fn offer(sop_class: &str, ts: &str) -> Offer {
    Offer {
        sop_class_uid: sop_class.into(),
        transfer_syntax: ts.into(),
    }
}

// ---- tests ----------------------------------------------------------------------------------

#[tokio::test]
async fn stores_bit_exact_in_one_pdu_and_in_many() {
    let pacs = Peer::storescp(&[]);
    let dir = tempfile::tempdir().unwrap();
    let small_uid = new_uid();
    let large_uid = new_uid();
    let small = dataset(CT, &small_uid, EXPLICIT, 4096);
    let large = dataset(CT, &large_uid, EXPLICIT, 20 * 1024 * 1024);
    let small_path = spool_file(dir.path(), CT, &small_uid, EXPLICIT, &small);
    let large_path = spool_file(dir.path(), CT, &large_uid, EXPLICIT, &large);

    within(async {
        let dest = destination("PACS", pacs.port, 5, 10);
        let mut up = Upstream::connect(&dest, &[offer(CT, EXPLICIT)])
            .await
            .unwrap();
        assert!(up.can_send(CT, EXPLICIT));
        assert_eq!(up.send_max_pdu(), 16384, "storescp -pdu 16384");

        let started = Instant::now();
        for (uid, data, path, priority) in [
            (&small_uid, &small, &small_path, 0x0000),
            (&large_uid, &large, &large_path, 0x0001),
        ] {
            let rsp = up.store(path, priority).await.unwrap();
            assert_eq!(rsp.status, 0x0000, "{rsp:?}\n{}", pacs.log());
            assert_eq!(status::classify_status(rsp.status), Disposition::Delivered);
            assert_eq!(&rsp.sop_instance_uid, uid);
            assert_eq!(rsp.bytes, data.len() as u64);
            let (meta, received) = part10_dataset(&pacs.received(uid, data.len() as u64));
            assert_eq!(meta.transfer_syntax, EXPLICIT);
            assert_eq!(&meta.sop_instance_uid, uid);
            assert!(received == *data, "dataset of {uid} differs after transfer");
        }
        eprintln!(
            "two instances ({} MB) in {:?}",
            large.len() >> 20,
            started.elapsed()
        );
        assert_eq!(up.echo().await.unwrap(), 0x0000);
        up.release().await;
    })
    .await;
    assert!(
        pacs.wait_log("Association Release"),
        "no release seen by storescp:\n{}",
        pacs.log()
    );
}

#[tokio::test]
async fn echo_on_a_verification_only_association() {
    let pacs = Peer::storescp(&[]);
    within(async {
        let mut up = Upstream::connect(&destination("PACS", pacs.port, 5, 10), &[])
            .await
            .unwrap();
        assert_eq!(up.contexts().len(), 1);
        assert_eq!(up.echo().await.unwrap(), 0x0000);
        assert_eq!(up.echo().await.unwrap(), 0x0000);
        up.release().await;
    })
    .await;
}

/// An instance stored in a syntax the PACS refuses (storescp accepts no JPEG by default) cannot go
/// as-is: it is refused before anything is sent, and the association stays usable. Implicit VR
/// LE, proposed alone, is accepted as such.
#[tokio::test]
async fn an_instance_without_a_matching_context_is_refused_before_sending() {
    let pacs = Peer::storescp(&[]);
    let dir = tempfile::tempdir().unwrap();
    let uid = new_uid();
    let path = spool_file(
        dir.path(),
        CT,
        &uid,
        JPEG_BASELINE,
        &dataset(CT, &uid, EXPLICIT, 1024),
    );
    let implicit_uid = new_uid();
    let implicit = spool_file(
        dir.path(),
        CT,
        &implicit_uid,
        IMPLICIT,
        &dataset(CT, &implicit_uid, IMPLICIT, 1024),
    );
    let mr_uid = new_uid();
    let mr = spool_file(
        dir.path(),
        MR,
        &mr_uid,
        EXPLICIT,
        &dataset(MR, &mr_uid, EXPLICIT, 1024),
    );
    within(async {
        let mut up = Upstream::connect(
            &destination("PACS", pacs.port, 5, 10),
            &[offer(CT, JPEG_BASELINE), offer(CT, IMPLICIT)],
        )
        .await
        .unwrap();
        assert!(matches!(
            up.contexts()[1].result,
            ContextResult::Rejected(_)
        ));
        assert_eq!(
            up.contexts()[2].result,
            ContextResult::Accepted(IMPLICIT.into())
        );
        assert!(!up.can_send(CT, JPEG_BASELINE));
        assert!(up.can_send(CT, IMPLICIT));
        assert_eq!(up.store(&implicit, 0).await.unwrap().status, 0);

        let e = up.store(&path, 0).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NoContext { .. }), "{e}");
        assert!(!e.is_connection_level());
        assert_eq!(status::classify_error(&e), Disposition::Failed);
        let text = e.to_string();
        assert!(
            text.contains("CT Image Storage") && text.contains("JPEG Baseline"),
            "{text}"
        );

        let e = up.store(&mr, 0).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NotOffered { .. }), "{e}");
        assert_eq!(status::classify_error(&e), Disposition::Retry);

        let e = up
            .store(&dir.path().join("missing.dcm"), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                UpstreamError::File {
                    association_lost: false,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(status::classify_error(&e), Disposition::Failed);

        // The forwarder's path: the next instance prepared while the previous one is in
        // flight. A good one is sent; a missing file is the same file error, nothing sent; one
        // prepared for a context its file does not match is refused, nothing sent.
        let ctx = up
            .context_id(CT, IMPLICIT)
            .expect("CT in implicit VR accepted");
        let good = upstream::prepare((&implicit).into(), ctx, up.max_data()).await;
        assert_eq!(up.store_prepared(good, 0).await.unwrap().status, 0);
        let gone = dir.path().join("gone.dcm");
        let missing = upstream::prepare((&gone).into(), ctx, up.max_data()).await;
        assert!(missing.is_err());
        let e = up.store_prepared(missing, 0).await.unwrap_err();
        assert!(
            matches!(
                e,
                UpstreamError::File {
                    association_lost: false,
                    ..
                }
            ),
            "{e}"
        );
        let other_ctx = ctx.wrapping_add(2);
        let wrong = upstream::prepare((&implicit).into(), other_ctx, up.max_data()).await;
        let e = up.store_prepared(wrong, 0).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NoContext { .. }), "{e}");

        // Nothing was sent: the association is still good.
        assert_eq!(up.echo().await.unwrap(), 0x0000);
        up.release().await;
    })
    .await;
}

#[tokio::test]
async fn a_closed_port_is_a_quick_connection_level_retry() {
    let port = free_port();
    let started = Instant::now();
    let e = within(Upstream::connect(&destination("PACS", port, 5, 10), &[]))
        .await
        .err()
        .expect("connected to a closed port");
    assert!(matches!(e, UpstreamError::Connect { .. }), "{e}");
    assert!(e.is_connection_level());
    assert_eq!(status::classify_error(&e), Disposition::Retry);
    assert!(!status::is_configuration_error(&e));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("nothing listens there"), "{e}");
}

#[tokio::test]
async fn an_unknown_called_ae_title_is_rejected_permanently() {
    let pacs = Peer::dcmqrscp();
    let e = within(Upstream::connect(
        &destination("NOT_PACS", pacs.port, 5, 10),
        &[],
    ))
    .await
    .err()
    .expect("association accepted for an unknown called AE title");
    assert!(
        matches!(e, UpstreamError::Rejected { .. }),
        "{e}\n{}",
        pacs.log()
    );
    assert!(e.is_connection_level());
    assert_eq!(status::classify_error(&e), Disposition::Retry);
    assert!(status::is_configuration_error(&e));
    let text = e.to_string();
    assert!(
        text.contains("rejected the association permanently: called-AE-title-not-recognized")
            && text.contains("correct destination.ae_title"),
        "{text}"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out_within_connect_timeout() {
    // The kernel completes the TCP handshake for the backlog; nothing ever reads.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let e = within(Upstream::connect(&destination("PACS", port, 1, 10), &[]))
        .await
        .err()
        .expect("association with a silent peer");
    let took = started.elapsed();
    assert!(
        matches!(
            e,
            UpstreamError::Timeout {
                step: dicom_gateway::forward::upstream::Step::Negotiate,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(e.is_connection_level());
    assert_eq!(status::classify_error(&e), Disposition::Retry);
    drop(silent);
}

#[tokio::test]
async fn a_pacs_abort_ends_the_association() {
    let pacs = Peer::storescp(&["--abort-after"]);
    let dir = tempfile::tempdir().unwrap();
    let uid = new_uid();
    let path = spool_file(
        dir.path(),
        CT,
        &uid,
        EXPLICIT,
        &dataset(CT, &uid, EXPLICIT, 1024),
    );
    within(async {
        let mut up = Upstream::connect(
            &destination("PACS", pacs.port, 5, 10),
            &[offer(CT, EXPLICIT)],
        )
        .await
        .unwrap();
        let e = up.store(&path, 0).await.unwrap_err();
        assert!(
            matches!(e, UpstreamError::Aborted { .. }),
            "{e}\n{}",
            pacs.log()
        );
        assert!(e.is_connection_level());
        assert_eq!(status::classify_error(&e), Disposition::Retry);
        assert!(!up.is_usable());
        assert!(up.echo().await.is_err());
    })
    .await;
}

#[tokio::test]
async fn a_slow_pacs_times_out_waiting_for_the_response() {
    let pacs = Peer::storescp(&["--sleep-during", "5"]);
    let dir = tempfile::tempdir().unwrap();
    let uid = new_uid();
    let path = spool_file(
        dir.path(),
        CT,
        &uid,
        EXPLICIT,
        &dataset(CT, &uid, EXPLICIT, 1024),
    );
    within(async {
        let mut up = Upstream::connect(
            &destination("PACS", pacs.port, 5, 1),
            &[offer(CT, EXPLICIT)],
        )
        .await
        .unwrap();
        let started = Instant::now();
        let e = up.store(&path, 0).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(
                e,
                UpstreamError::Timeout {
                    step: dicom_gateway::forward::upstream::Step::AwaitResponse,
                    ..
                }
            ),
            "{e}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(e.is_connection_level());
        assert_eq!(status::classify_error(&e), Disposition::Retry);
    })
    .await;
}
