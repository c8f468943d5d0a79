//! Test harness: runs the real `dicom-gateway` binary and real DCMTK tools on loopback.
//!
//! - [`Gateway`] owns a temporary directory (config, data dir, log file, generated data), a
//!   port picked for it, and the daemon process. It waits for `READY=1` on a `NOTIFY_SOCKET`
//!   datagram socket the way systemd does, and fails with the daemon's log if the process exits
//!   first or is not ready within [`READY_TIMEOUT`].
//! - [`Scu`] runs `storescu`/`echoscu` with `TCP_NODELAY=1` and a deadline, so a hang fails the
//!   test instead of blocking the suite.
//! - [`data`] makes synthetic DICOM files; [`raw`] speaks PDUs byte by byte.
//!
//! Every helper panics with the full context (command line, output, gateway log) on failure.
//! Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod certs;
mod checks;
mod config;
pub mod data;
pub mod orthanc;
pub mod raw;
mod tools;

// Not every test file uses every part.
#[allow(unused_imports)]
pub use checks::*;
#[allow(unused_imports)]
pub use config::*;
#[allow(unused_imports)]
pub use tools::*;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The gateway's own AE title in test configs.
pub const GATEWAY_AE: &str = "DICOM_GW";
/// How long the daemon may take to send `READY=1`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop (SIGTERM) may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for one DCMTK command.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The binary under test, built by Cargo for integration tests.
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_dicom-gateway");

// ---------------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------------

/// Asks the kernel for a free loopback port. The listener is dropped before the gateway binds,
/// so another process may take the port in between; [`Gateway::start`] retries then.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The daemon under test, with its own temporary directory and port.
pub struct Gateway {
    dir: TempDir,
    config: GatewayConfig,
    port: u16,
    child: Option<Child>,
    /// Kept open while the daemon runs, as systemd keeps its notify socket.
    notify: Option<UnixDatagram>,
    starts: u32,
}

enum StartFailure {
    AddressInUse,
}

impl Gateway {
    /// Writes the config, starts the daemon and waits for `READY=1`.
    pub fn start(config: GatewayConfig) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("dgw-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("create data dir");
        let mut gw = Gateway {
            dir,
            config,
            port: 0,
            child: None,
            notify: None,
            starts: 0,
        };
        for _ in 0..5 {
            gw.port = free_port();
            gw.write_config();
            match gw.spawn_and_wait_ready() {
                Ok(()) => return gw,
                Err(StartFailure::AddressInUse) => continue,
            }
        }
        panic!("could not start the gateway on a free port:\n{}", gw.logs());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory that holds everything of this test; put generated data here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh subdirectory of [`Gateway::dir`] for test data.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("input").join(name);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Replaces the configuration; it takes effect at the next [`Gateway::restart`].
    pub fn set_config(&mut self, config: GatewayConfig) {
        self.config = config;
        self.write_config();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    fn write_config(&self) {
        std::fs::write(
            self.config_path(),
            self.config.to_toml(&self.data_dir(), self.port),
        )
        .expect("write config");
    }

    /// Everything the daemon printed (stderr and stdout) over all its runs.
    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until a log line contains every one of `words`, compared after [`normalize`]
    /// (so `calling_ae`, `calling-AE` and `Calling AE` all match "calling ae"); returns it.
    pub fn wait_for_log_words(&self, timeout: Duration, words: &[&str]) -> Option<String> {
        let words: Vec<String> = words.iter().map(|w| normalize(w)).collect();
        self.wait_for_log(timeout, |l| {
            let l = normalize(l);
            words.iter().all(|w| l.contains(w.as_str()))
        })
    }

    /// Waits until a log line satisfies `pred`; returns it.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.logs().lines().find(|l| pred(l)) {
                return Some(l.to_owned());
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the daemon process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }

    /// Panics with the log if the daemon has exited.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!("the gateway exited unexpectedly; log:\n{}", self.logs());
        }
    }

    fn spawn_and_wait_ready(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "the gateway is already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open log file");
        let _ = writeln!(
            log,
            "---- harness: start #{} on port {} ----",
            self.starts, self.port
        );
        let sock_path = self.dir.path().join("notify.sock");
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        if self.config.run_as.is_some() {
            // A daemon that switches to an unprivileged user must still reach its data dir
            // and notify socket, as with systemd's StateDirectory= and NOTIFY_SOCKET.
            use std::os::unix::fs::PermissionsExt;
            let open =
                |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
            open(self.dir.path(), 0o755).expect("chmod temp dir");
            open(&sock_path, 0o777).expect("chmod notify socket");
        }
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("socket timeout");

        let mut cmd = Command::new(GATEWAY_BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("NOTIFY_SOCKET", &sock_path)
            // Log to the captured stderr, never to a journal this test cannot read.
            .env_remove("JOURNAL_STREAM")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // Owned by `self` from here on, so that any panic below kills it in `Drop`.
        let child = self.child.insert(cmd.spawn().expect("spawn dicom-gateway"));
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    if msg.split('\n').any(|l| l == "READY=1") {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                let logs = self.logs();
                let tail = logs
                    .rsplit("---- harness: start")
                    .next()
                    .unwrap_or("")
                    .to_lowercase();
                if tail.contains("address already in use") || tail.contains("addrinuse") {
                    return Err(StartFailure::AddressInUse);
                }
                panic!("the gateway exited with {status} before READY=1; log:\n{logs}");
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "the gateway sent no READY=1 within {READY_TIMEOUT:?}; log:\n{}",
                    self.logs()
                );
            }
        }
        self.notify = Some(sock);
        Ok(())
    }

    /// SIGKILL: the process dies at once, as in a power cut of the process (not of the disk).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("kill: the gateway is not running");
        let _ = child.kill();
        child.wait().expect("wait after SIGKILL");
        self.notify = None;
    }

    /// SIGTERM and wait; returns how the daemon exited.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("stop: the gateway is not running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.notify = None;
        status
    }

    /// Starts the daemon again on the same data dir and port (stopping it first if it runs).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if self.spawn_and_wait_ready().is_err() {
            panic!(
                "restart: port {} is in use (another process took it, or the daemon binds \
                 without SO_REUSEADDR while old connections are in TIME_WAIT); log:\n{}",
                self.port,
                self.logs()
            );
        }
    }

    /// Peak resident set size (VmHWM) of the running daemon, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self
            .pid()
            .expect("peak_rss_kib: the gateway is not running");
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `dicom-gateway instances --json` as it ran (for tests of the command itself).
    pub fn instances_output(&self) -> ToolOutput {
        gateway_cli([
            OsStr::new("instances"),
            OsStr::new("--config"),
            self.config_path().as_os_str(),
            OsStr::new("--json"),
        ])
    }

    /// The index, read offline: call only while the daemon is stopped (redb allows one process).
    pub fn instances(&self) -> Vec<InstanceJson> {
        assert!(
            self.child.is_none(),
            "instances() needs the gateway stopped"
        );
        let out = self.instances_output();
        out.assert_success();
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "instances --json printed no valid JSON array ({e}):\n{}",
                out.stdout
            )
        })
    }

    /// Writes a stored instance out with `dicom-gateway export` (gateway stopped); returns the
    /// Part 10 file.
    pub fn export(&self, sop_instance_uid: &str) -> PathBuf {
        self.run_export(Some(sop_instance_uid))
    }

    /// Writes every stored instance out with `dicom-gateway export` (gateway stopped) into a
    /// new directory, as `<SOP Instance UID>.dcm`; returns the directory.
    pub fn export_all(&self) -> PathBuf {
        self.run_export(None)
    }

    fn run_export(&self, sop_instance_uid: Option<&str>) -> PathBuf {
        let n = EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.scratch("export").join(match sop_instance_uid {
            Some(uid) => format!("{uid}-{n}.dcm"),
            None => format!("all-{n}"),
        });
        let config = self.config_path();
        let mut args = vec![
            OsStr::new("export"),
            OsStr::new("--config"),
            config.as_os_str(),
        ];
        args.extend(sop_instance_uid.map(OsStr::new));
        args.extend([OsStr::new("--out"), out.as_os_str()]);
        gateway_cli(args).assert_success();
        out
    }

    /// The records in the segments (`dicom-gateway segments --json`; works while running).
    pub fn records(&self) -> Vec<RecordJson> {
        let out = gateway_cli([
            OsStr::new("segments"),
            OsStr::new("--data-dir"),
            self.data_dir().as_os_str(),
            OsStr::new("--json"),
        ]);
        out.assert_success();
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "segments --json printed no valid JSON array ({e}):\n{}",
                out.stdout
            )
        })
    }

    /// SOP Instance UIDs of the intact records in the segments: what is stored, live or not
    /// (a duplicate's record is not intact: its body is freed).
    pub fn stored_records(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .filter_map(|r| r.sop_instance_uid)
            .collect()
    }

    /// Bytes in segment files after their last complete record: what an unfinished instance
    /// left behind. One entry per segment that has any.
    pub fn unfinished_records(&self) -> Vec<String> {
        let mut ends: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for r in self.records() {
            let e = ends.entry(r.segment).or_insert(0);
            *e = (*e).max(r.offset + r.length);
        }
        let mut out = Vec::new();
        let spares = self.data_dir().join("segments").join("spare");
        for f in files_under(&self.data_dir().join("segments")) {
            // Spare segments hold nothing (docs/durability.md); an interrupted one is
            // `making.tmp`, which start-up deletes.
            if f.parent() == Some(spares.as_path()) && f.extension().is_some_and(|e| e == "spare") {
                continue;
            }
            let Some(id) = f
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                out.push(format!("unexpected file {}", f.display()));
                continue;
            };
            let len = std::fs::metadata(&f).map_or(0, |m| m.len());
            // 64: the segment header.
            let end = ends.get(&id).copied().unwrap_or(64);
            if len > end {
                out.push(format!(
                    "{}: {} bytes after the last record",
                    f.display(),
                    len - end
                ));
            }
        }
        out
    }

    /// Waits until no segment holds an unfinished record; panics with what is left.
    pub fn assert_no_unfinished_within(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let left = self.unfinished_records();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "unfinished records left {left:?} after {timeout:?}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn storescu(&self) -> Scu {
        Scu::new("storescu", self.port)
    }

    pub fn echoscu(&self) -> Scu {
        Scu::new("echoscu", self.port)
    }

    /// An echoscu with default AE titles that must succeed: proof that the gateway serves.
    pub fn assert_echo_ok(&mut self) {
        self.assert_running();
        let out = self.echoscu().timeout(Duration::from_secs(30)).run();
        if !out.success() {
            panic!(
                "echoscu failed: {}\ngateway log:\n{}",
                out.describe(),
                self.logs()
            );
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let from = lines.len().saturating_sub(80);
            eprintln!(
                "---- last {} lines of the gateway log ({}) ----\n{}",
                lines.len() - from,
                self.log_path().display(),
                lines[from..].join("\n")
            );
        }
    }
}

/// Lowercase, with `-` and `_` as spaces: for loose matching of log lines.
pub fn normalize(s: &str) -> String {
    s.to_lowercase().replace(['-', '_'], " ")
}

/// Every regular file under `dir`, sorted; empty if `dir` does not exist.
static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One line of `dicom-gateway segments --json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RecordJson {
    pub segment: u64,
    pub offset: u64,
    pub length: u64,
    pub intact: bool,
    pub sop_instance_uid: Option<String>,
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}
