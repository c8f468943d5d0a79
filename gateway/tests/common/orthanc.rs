//! Real upstream peers for the forwarding tests, and the gateway-side helpers that go with them.
//!
//! - [`Orthanc`]: a real Orthanc (Debian package, `/usr/sbin/Orthanc`) run as a child process
//!   with its own JSON config in a temporary directory: AE title `PACS`, DICOM and HTTP ports
//!   picked free, storage and index in the temporary directory, HTTP without remote access or
//!   authentication, no plugins, no Lua, the gateway registered in `DicomModalities` with
//!   `DicomCheckCalledAet` and `DicomCheckModalityHost` on, verbose log to `orthanc.log`. The
//!   system service is never touched. It can also run inside a network namespace
//!   ([`Orthanc::in_netns`]); its REST API is then reached from a thread that joined that
//!   namespace, so checks never depend on the (possibly cut) link under test.
//! - [`StoreScp`]: DCMTK `storescp +B` (bit-preserving) as a second destination; optionally with
//!   an association negotiation profile (`-xf`) that accepts only the listed SOP classes. This
//!   is how the tests make a PACS refuse a SOP class: Orthanc 1.10.1 has no setting that
//!   refuses one SOP class at negotiation, and its `ReceivedCStoreInstanceFilter` Lua callback
//!   answers Success even for the instances it discards (see forward.rs).
//! - [`Dest`], [`start_gateway`], [`status`], [`queue_list`], [`wait_until`]: a gateway with
//!   `[[destination]]` sections, and polling of `status --json` / `queue list --json` with
//!   deadlines.
//!
//! Every process is killed when its guard drops, also when the test fails; on a failure the last
//! lines of the peer's log are printed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use super::{data, dcmtk, files_under, gateway_cli, store_reports, Gateway, GatewayConfig};
use super::{StoreReport, GATEWAY_AE};

/// Orthanc's AE title in the tests.
pub const PACS_AE: &str = "PACS";
const ORTHANC_BIN: &str = "/usr/sbin/Orthanc";
/// How long Orthanc or storescp may take to start listening.
const PEER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop (SIGTERM) of a peer may take.
const PEER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one REST request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A port that is free on every address right now (Orthanc binds 0.0.0.0; it has no setting
/// for the address in 1.10). Another process may take it before the peer binds; the peers
/// retry their start for a while when that happens.
pub fn free_port_any() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("bind 0.0.0.0:0")
        .port()
}

/// Runs `f` on a new thread that joined the network namespace `ns` (`/var/run/netns/NS`, as
/// made by `ip netns add`). Sockets made there stay in that namespace wherever they are used;
/// threads spawned from `f` are in it too.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::spawn(move || -> io::Result<T> {
        let fd = File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread in the network namespace panicked"))?
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn sigterm_and_wait(child: &mut Child, what: &str) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return;
        }
        if start.elapsed() > PEER_STOP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {PEER_STOP_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Orthanc
// ---------------------------------------------------------------------------------------------

/// One instance as Orthanc has it.
#[derive(Clone, Debug)]
pub struct OrthancInstance {
    /// Orthanc's own identifier (for `/instances/{id}/...`).
    pub id: String,
    pub sop_instance_uid: String,
}

/// A real Orthanc acting as the central PACS.
pub struct Orthanc {
    dir: TempDir,
    dicom_port: u16,
    http_port: u16,
    netns: Option<String>,
    child: Option<Child>,
    starts: u32,
}

impl Orthanc {
    /// Prepares an Orthanc on free ports that accepts C-STORE from the gateway (AE
    /// [`GATEWAY_AE`]) connecting from `gateway_host`; it is not started yet.
    pub fn new(gateway_host: &str) -> Orthanc {
        Orthanc::prepare(gateway_host, None, free_port_any(), free_port_any())
    }

    /// Prepares and starts it.
    pub fn start_new() -> Orthanc {
        let mut o = Orthanc::new("127.0.0.1");
        o.start();
        o
    }

    /// Prepares an Orthanc that runs inside the network namespace `ns` (ports are free there:
    /// the namespace is new).
    pub fn in_netns(ns: &str, gateway_host: &str) -> Orthanc {
        Orthanc::prepare(gateway_host, Some(ns.to_owned()), 4242, 8042)
    }

    fn prepare(
        gateway_host: &str,
        netns: Option<String>,
        dicom_port: u16,
        http_port: u16,
    ) -> Orthanc {
        let dir = tempfile::Builder::new()
            .prefix("dgw-orthanc-")
            .tempdir()
            .expect("temp dir for Orthanc");
        for d in ["storage", "tmp"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("create Orthanc dir");
        }
        let o = Orthanc {
            dir,
            dicom_port,
            http_port,
            netns,
            child: None,
            starts: 0,
        };
        let p = o.dir.path();
        let config = serde_json::json!({
            "Name": "dgw-test-pacs",
            "StorageDirectory": p.join("storage"),
            "IndexDirectory": p.join("storage"),
            "TemporaryDirectory": p.join("tmp"),
            "StorageCompression": false,
            "HttpServerEnabled": true,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "SslEnabled": false,
            "KeepAlive": false,
            "HttpDescribeErrors": true,
            "WebDavEnabled": false,
            "DicomServerEnabled": true,
            "DicomAet": PACS_AE,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": true,
            "DicomCheckModalityHost": true,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": false,
            "UnknownSopClassAccepted": false,
            "DicomModalities": {
                "gateway": {
                    "AET": GATEWAY_AE,
                    "Host": gateway_host,
                    "Port": 104,
                    "AllowEcho": true,
                    "AllowStore": true
                }
            },
            "Plugins": [],
            "LuaScripts": [],
            "SaveJobs": false,
            "ConcurrentJobs": 1,
            "OverwriteInstances": false
        });
        std::fs::write(
            o.config_path(),
            serde_json::to_string_pretty(&config).expect("Orthanc config JSON"),
        )
        .expect("write Orthanc config");
        o
    }

    pub fn dicom_port(&self) -> u16 {
        self.dicom_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `127.0.0.1:PORT` of the DICOM port (for a namespaced Orthanc the caller knows the
    /// namespace's address).
    pub fn dicom_address(&self) -> String {
        format!("127.0.0.1:{}", self.dicom_port)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.json")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.log")
    }

    fn out_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.out")
    }

    /// Orthanc's verbose log (all runs).
    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }

    /// Starts Orthanc (first start, or again after [`Orthanc::kill`] / [`Orthanc::stop`] on
    /// the same storage and ports) and waits until both its REST API and its DICOM port answer.
    /// While the DICOM port is still taken (an old process, a TIME_WAIT), it retries.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "Orthanc is already running");
        let deadline = Instant::now() + PEER_START_TIMEOUT;
        loop {
            self.starts += 1;
            let out = File::options()
                .create(true)
                .append(true)
                .open(self.out_path())
                .expect("open Orthanc output file");
            let mut cmd = match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns.as_str(), ORTHANC_BIN]);
                    c
                }
                None => Command::new(ORTHANC_BIN),
            };
            cmd.arg("--verbose")
                .arg(format!("--logfile={}", self.log_path().display()))
                .arg(self.config_path())
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup"))
                .stderr(out);
            let mut child = cmd.spawn().unwrap_or_else(|e| {
                panic!("cannot start {ORTHANC_BIN} (apt-get install orthanc): {e}")
            });
            loop {
                if let Some(st) = child.try_wait().expect("try_wait") {
                    let log = tail(&self.log_path(), 40);
                    if log.contains("already in use") && Instant::now() < deadline {
                        // The previous process's port is not free yet: try again.
                        std::thread::sleep(Duration::from_millis(300));
                        break;
                    }
                    panic!(
                        "Orthanc exited ({st}) before it was ready; log:\n{log}\noutput:\n{}",
                        tail(&self.out_path(), 20)
                    );
                }
                if self.http_get("/system").is_ok_and(|(code, _)| code == 200)
                    && self.connect(self.dicom_port).is_ok()
                {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "Orthanc was not ready within {PEER_START_TIMEOUT:?}; log:\n{}",
                        tail(&self.log_path(), 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Starts it again after a kill or stop (same storage, same ports).
    pub fn start_again(&mut self) {
        self.start();
    }

    /// SIGKILL: Orthanc dies at once, its connections are reset.
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("kill: Orthanc is not running");
        let _ = c.kill();
        c.wait().expect("wait for Orthanc after SIGKILL");
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("stop: Orthanc is not running");
        sigterm_and_wait(&mut c, "Orthanc");
    }

    /// A TCP connection to `port` on Orthanc's loopback (inside its namespace if it has one).
    fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match &self.netns {
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
            Some(ns) => in_netns(ns, move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })?,
        }
    }

    /// `GET path` over HTTP/1.0: (status code, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, Vec<u8>)> {
        let mut s = self.connect(self.http_port)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("GET {path}: {m}"));
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| bad("no end of headers"))?;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| bad("no status code"))?;
        let mut body = buf[end + 4..].to_vec();
        let lower = head.to_lowercase();
        if lower.contains("transfer-encoding: chunked") {
            body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
        } else if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            if body.len() != len {
                return Err(bad(&format!(
                    "body of {} bytes, Content-Length {len}",
                    body.len()
                )));
            }
        }
        Ok((code, body))
    }

    /// `GET path` that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let (code, body) = self
            .http_get(path)
            .unwrap_or_else(|e| panic!("Orthanc REST {path}: {e}"));
        assert_eq!(
            code,
            200,
            "Orthanc REST {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("Orthanc REST {path}: not JSON ({e})"))
    }

    /// Every instance Orthanc has, by SOP Instance UID.
    pub fn instance_map(&self) -> BTreeMap<String, OrthancInstance> {
        let v = self.get_json("/instances?expand");
        v.as_array()
            .expect("/instances?expand is an array")
            .iter()
            .map(|i| {
                let inst = OrthancInstance {
                    id: i["ID"].as_str().expect("instance ID").to_owned(),
                    sop_instance_uid: i["MainDicomTags"]["SOPInstanceUID"]
                        .as_str()
                        .expect("SOPInstanceUID")
                        .to_owned(),
                };
                (inst.sop_instance_uid.clone(), inst)
            })
            .collect()
    }

    /// SOP Instance UIDs of every instance Orthanc has (sorted).
    pub fn instances(&self) -> Vec<String> {
        self.instance_map().into_keys().collect()
    }

    /// Number of instances (`/statistics`).
    pub fn count(&self) -> usize {
        let v = self.get_json("/statistics");
        usize::try_from(v["CountInstances"].as_u64().expect("CountInstances")).expect("count fits")
    }

    /// The Part 10 file Orthanc stores for instance `id` (`/instances/{id}/file`).
    pub fn file_bytes(&self, id: &str) -> Vec<u8> {
        let path = format!("/instances/{id}/file");
        let (code, body) = self
            .http_get(&path)
            .unwrap_or_else(|e| panic!("Orthanc REST {path}: {e}"));
        assert_eq!(code, 200, "Orthanc REST {path}");
        body
    }

    /// BLAKE3 of the dataset of instance `id` as Orthanc stores it (everything after its file
    /// meta group): comparable with [`data::FileInfo::checksum`] of the file sent.
    pub fn dataset_checksum(&self, id: &str) -> String {
        let bytes = self.file_bytes(id);
        let off = part10_dataset_offset(&bytes)
            .unwrap_or_else(|| panic!("Orthanc's file of {id} is not DICOM Part 10"));
        blake3::hash(&bytes[off..]).to_hex().to_string()
    }

    /// Lines of Orthanc's log that contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> usize {
        self.logs().lines().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of the Orthanc log ({}) ----\n{}",
                self.log_path().display(),
                tail(&self.log_path(), 40)
            );
        }
    }
}

/// Offset of the dataset in Part 10 bytes: after the preamble, `DICM` and the file meta group
/// (whose length is in (0002,0000), explicit VR LE).
pub fn part10_dataset_offset(b: &[u8]) -> Option<usize> {
    if b.get(128..132)? != b"DICM" || b.get(132..138)? != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return None;
    }
    let len = u32::from_le_bytes(b.get(140..144)?.try_into().ok()?);
    let off = 144usize.checked_add(usize::try_from(len).ok()?)?;
    (off <= b.len()).then_some(off)
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------------------------
// DCMTK storescp as a second destination
// ---------------------------------------------------------------------------------------------

/// `storescp +B` on a free loopback port, writing what it receives to its own directory.
pub struct StoreScp {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl StoreScp {
    /// Accepts every storage SOP class DCMTK knows, in every transfer syntax it supports.
    pub fn start() -> StoreScp {
        StoreScp::start_accepting(None)
    }

    /// With `Some(classes)`, accepts only Verification and these SOP classes (explicit and
    /// implicit VR little endian) through a negotiation profile; the others are rejected per
    /// presentation context (abstract syntax not supported).
    pub fn start_accepting(classes: Option<&[&str]>) -> StoreScp {
        let dir = tempfile::Builder::new()
            .prefix("dgw-storescp-")
            .tempdir()
            .expect("temp dir for storescp");
        std::fs::create_dir_all(dir.path().join("received")).expect("create output dir");
        let mut s = StoreScp {
            dir,
            port: free_port_any(),
            child: None,
        };
        s.launch(classes);
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("storescp.log")
    }

    fn out_dir(&self) -> PathBuf {
        self.dir.path().join("received")
    }

    fn launch(&mut self, classes: Option<&[&str]>) {
        let deadline = Instant::now() + PEER_START_TIMEOUT;
        loop {
            let log = File::options()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("open storescp log");
            let mut cmd = Command::new(dcmtk("storescp"));
            cmd.env("TCP_NODELAY", "1")
                .args(["-v", "-aet", "SINK", "+B", "-od"])
                .arg(self.out_dir());
            match classes {
                Some(classes) => {
                    let cfg = self.dir.path().join("profile.cfg");
                    let mut t = String::from(
                        "[[TransferSyntaxes]]\n[Uncompressed]\n\
                         TransferSyntax1 = 1.2.840.10008.1.2.1\n\
                         TransferSyntax2 = 1.2.840.10008.1.2\n\
                         [[PresentationContexts]]\n[Picky]\n\
                         PresentationContext1 = 1.2.840.10008.1.1\\Uncompressed\n",
                    );
                    for (i, c) in classes.iter().enumerate() {
                        let _ = writeln!(t, "PresentationContext{} = {c}\\Uncompressed", i + 2);
                    }
                    t.push_str("[[Profiles]]\n[Picky]\nPresentationContexts = Picky\n");
                    std::fs::write(&cfg, t).expect("write storescp profile");
                    cmd.arg("-xf").arg(&cfg).arg("Picky");
                }
                None => {
                    cmd.arg("+xa");
                }
            }
            cmd.arg(self.port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log);
            let mut child = cmd.spawn().expect("spawn storescp");
            loop {
                if let Some(st) = child.try_wait().expect("try_wait") {
                    let log = tail(&self.log_path(), 20);
                    if log.to_lowercase().contains("address already in use")
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(300));
                        break;
                    }
                    panic!("storescp exited ({st}) before listening:\n{log}");
                }
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "storescp did not listen within {PEER_START_TIMEOUT:?}:\n{}",
                        tail(&self.log_path(), 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops it and starts it again on the same port and output directory, accepting
    /// `classes` (see [`StoreScp::start_accepting`]).
    pub fn restart_accepting(&mut self, classes: Option<&[&str]>) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch(classes);
    }

    /// What it has received: SOP Instance UID → BLAKE3 of the dataset as written (`+B`: the
    /// bytes as they came off the wire). Files still being written are skipped; read this only
    /// after the gateway reports them delivered.
    pub fn received(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for f in files_under(&self.out_dir()) {
            if let Ok(meta) = data::read_meta(&f) {
                out.insert(meta.sop_instance_uid, data::dataset_checksum(&f));
            }
        }
        out
    }

    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of the storescp log ({}) ----\n{}",
                self.log_path().display(),
                tail(&self.log_path(), 30)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A gateway with destinations
// ---------------------------------------------------------------------------------------------

/// One `[[destination]]` with test-friendly timings (short retry delays and timeouts).
#[derive(Clone, Debug)]
pub struct Dest {
    pub name: String,
    pub ae_title: String,
    pub address: String,
    pub max_associations: u32,
    pub retry_initial_secs: u64,
    pub retry_max_secs: u64,
    pub connect_timeout_secs: u64,
    pub dimse_timeout_secs: u64,
    pub idle_close_secs: u64,
    /// `[destination.route] modality = [...]`; empty: everything.
    pub route_modality: Vec<String>,
}

impl Dest {
    /// Retries after 1 s, at most every 2 s; 3 s to connect, 10 s per DIMSE message.
    pub fn new(name: &str, ae_title: &str, address: &str) -> Dest {
        Dest {
            name: name.to_owned(),
            ae_title: ae_title.to_owned(),
            address: address.to_owned(),
            max_associations: 2,
            retry_initial_secs: 1,
            retry_max_secs: 2,
            connect_timeout_secs: 3,
            dimse_timeout_secs: 10,
            idle_close_secs: 5,
            route_modality: Vec::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "\n[[destination]]");
        let _ = writeln!(t, "name = {:?}", self.name);
        let _ = writeln!(t, "ae_title = {:?}", self.ae_title);
        let _ = writeln!(t, "address = {:?}", self.address);
        let _ = writeln!(t, "max_associations = {}", self.max_associations);
        let _ = writeln!(t, "retry_initial_secs = {}", self.retry_initial_secs);
        let _ = writeln!(t, "retry_max_secs = {}", self.retry_max_secs);
        let _ = writeln!(t, "connect_timeout_secs = {}", self.connect_timeout_secs);
        let _ = writeln!(t, "dimse_timeout_secs = {}", self.dimse_timeout_secs);
        let _ = writeln!(t, "idle_close_secs = {}", self.idle_close_secs);
        if !self.route_modality.is_empty() {
            let _ = writeln!(
                t,
                "[destination.route]\nmodality = [{}]",
                self.route_modality
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        t
    }
}

/// The TOML of several destinations.
pub fn destinations_toml(dests: &[Dest]) -> String {
    dests.iter().map(Dest::to_toml).collect()
}

/// Starts a gateway on `config` and returns it stopped, so that [`append_config`] can add
/// sections the harness's config has no field for (destinations, cache) before
/// [`Gateway::restart`].
pub fn stopped_gateway(config: GatewayConfig) -> Gateway {
    let mut gw = Gateway::start(config);
    gw.stop();
    gw
}

/// Appends TOML (e.g. `[[destination]]` and `[cache]` sections) to the gateway's config file;
/// it takes effect at the next start.
pub fn append_config(gw: &Gateway, extra: &str) {
    let mut f = File::options()
        .append(true)
        .open(gw.config_path())
        .expect("open gateway config");
    f.write_all(extra.as_bytes())
        .expect("append to gateway config");
}

/// A running gateway with `config` plus the TOML `extra` (destinations, cache).
pub fn start_gateway(config: GatewayConfig, extra: &str) -> Gateway {
    let mut gw = stopped_gateway(config);
    append_config(&gw, extra);
    gw.restart();
    gw
}

fn cli_json(gw: &Gateway, args: &[&str]) -> Result<Value, String> {
    let mut full: Vec<OsString> = args.iter().map(OsString::from).collect();
    full.push("--config".into());
    full.push(gw.config_path().into_os_string());
    full.push("--json".into());
    let out = gateway_cli(&full);
    if !out.success() {
        return Err(out.describe());
    }
    serde_json::from_str(&out.stdout).map_err(|e| format!("not JSON ({e}): {}", out.describe()))
}

/// `status --json` of the running gateway.
pub fn status(gw: &Gateway) -> Value {
    cli_json(gw, &["status"]).unwrap_or_else(|e| panic!("status --json failed: {e}"))
}

/// The entry of destination `name` in a `status --json` answer.
pub fn dest_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["destinations"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no destination {name:?} in status: {status:#}"))
}

/// `queue list --json` (all entries, or only failed ones; of one destination or all).
pub fn queue_list(gw: &Gateway, failed: bool, destination: Option<&str>) -> Vec<Value> {
    let mut args = vec!["queue", "list", "--limit", "100000"];
    if failed {
        args.push("--failed");
    }
    if let Some(d) = destination {
        args.push("--destination");
        args.push(d);
    }
    let v = cli_json(gw, &args).unwrap_or_else(|e| panic!("queue list failed: {e}"));
    v.as_array()
        .cloned()
        .unwrap_or_else(|| panic!("queue list --json is not an array: {v:#}"))
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` with `what()`.
pub fn wait_until<T>(
    timeout: Duration,
    what: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Counters of one destination from a `status --json` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub failed: u64,
    pub delivered: u64,
}

pub fn counts(status: &Value, name: &str) -> Counts {
    let d = dest_status(status, name);
    let n = |k: &str| {
        d[k].as_u64()
            .unwrap_or_else(|| panic!("{name}.{k} is not a number: {d:#}"))
    };
    Counts {
        pending: n("pending"),
        failed: n("failed"),
        delivered: n("delivered"),
    }
}

/// Waits until destination `name` has nothing pending and `delivered` (and `failed`) entries;
/// returns the last status. Panics with the last status seen.
pub fn wait_counts(gw: &Gateway, name: &str, want: Counts, timeout: Duration) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    wait_until(
        timeout,
        || {
            format!(
                "{name} should reach {want:?}; last status: {:#}",
                last.borrow()
            )
        },
        || {
            let s = status(gw);
            let done = counts(&s, name) == want;
            *last.borrow_mut() = s.clone();
            done.then_some(s)
        },
    )
}

/// Sends `files` with storescu `-v` in one association; every one must be answered Success.
pub fn send_all(gw: &Gateway, files: &[PathBuf]) -> Vec<StoreReport> {
    let out = gw.storescu().arg("-v").files(files).run();
    let reports = store_reports(&out.text());
    assert!(
        out.success() && reports.len() == files.len() && reports.iter().all(|r| r.is_success()),
        "every C-STORE should succeed ({} of {} answered): {}",
        reports.len(),
        files.len(),
        out.describe()
    );
    reports
}
