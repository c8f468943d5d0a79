//! Processes: the receivers under test (the gateway and its peers), the sender (DCMTK
//! `storescu`), and the helpers to start, probe and stop them.
//!
//! Every child is owned by a [`Proc`], which stops it (SIGTERM, then SIGKILL) when dropped, so
//! a failed measurement never leaves a receiver behind. Peers get `TCP_NODELAY=1`.

use std::fs::File;
use std::io::{self, Write as _};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a receiver may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub type Res<T> = Result<T, String>;

/// A free TCP port on loopback (the listener is dropped before the receiver binds).
pub fn free_port() -> Res<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))
}

/// Looks a program up in PATH (and a few extra directories).
pub fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A child process stopped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Res<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether it is still running (false once stopped or exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The tail of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL (a crash, for the recovery start-up measurement).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Runs a command to completion within `timeout`; returns (status, elapsed, output).
pub fn run_timed(mut cmd: Command, timeout: Duration, log: &Path) -> Res<(Duration, String)> {
    let name = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {name}: {e}"))?;
    let out = child.stdout.take();
    let err = child.stderr.take();
    let t_out = std::thread::spawn(move || read_all(out));
    let t_err = std::thread::spawn(move || read_all(err));
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    let text = format!(
        "{}{}",
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default()
    );
    if let Ok(mut f) = File::options().create(true).append(true).open(log) {
        let _ = writeln!(f, "$ {cmd:?}\n{text}");
    }
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("{name} failed ({status}):\n{}", tail.join("\n")));
    }
    Ok((elapsed, text))
}

fn read_all(r: Option<impl io::Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

/// Peak resident set size (VmHWM) of a process, in bytes.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Counts regular files under `dir`, recursively.
pub fn count_files(dir: &Path, suffix: Option<&str>) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t)
                    if t.is_file()
                        && suffix.is_none_or(|s| e.file_name().to_string_lossy().ends_with(s)) =>
                {
                    n += 1;
                }
                _ => {}
            }
        }
    }
    n
}

/// Moves a finished receiver's directory aside instead of deleting it; [`empty_trash`] deletes
/// everything at the end of the run. This file system may have no journal (the project's VMs:
/// ext4 without one), and then ext4's inode allocator skips inodes deleted in the last 60 s,
/// reading their inode table blocks to find out (`recently_deleted()` in `fs/ext4/ialloc.c`):
/// after thousands of deletions, every file creation costs a millisecond of CPU, for whichever
/// receiver runs next. With less than 20 GiB free the directory is deleted at once instead.
pub fn trash(dir: &Path) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0);
    let Some(parent) = dir.parent() else {
        return;
    };
    let bin = parent.join("trash");
    let dest = bin.join(
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string(),
    );
    if free < (20 << 30)
        || std::fs::create_dir_all(&bin).is_err()
        || std::fs::rename(dir, &dest).is_err()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Deletes what [`trash`] set aside under `run` (recursively, every `trash` directory).
pub fn empty_trash(run: &Path) {
    let mut stack = vec![run.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == "trash" {
                    let _ = std::fs::remove_dir_all(e.path());
                } else {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// `sync` and a short pause: every run starts without the previous run's dirty pages (on
/// ext4 with data=ordered, a journal commit triggered by one receiver's fsync would otherwise
/// also write out what the previous, non-fsyncing receiver left in the page cache).
pub fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------------

/// A receiver under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// dicom-gateway, default configuration.
    Gateway,
    /// DCMTK `storescp +B` (bit-preserving), single process.
    Dcmtk,
    /// DCMTK `storescp --fork +B`: one process per association.
    DcmtkFork,
    /// DCMTK `storescp` default mode (whole dataset in memory; for the RSS row).
    DcmtkDefault,
    /// dicom-rs `dicom-storescp` (blocking: one association at a time).
    DicomRs,
    /// dicom-rs `dicom-storescp --non-blocking` (a task per association).
    DicomRsAsync,
    /// Orthanc.
    Orthanc,
}

impl Peer {
    pub fn label(self) -> &'static str {
        match self {
            Peer::Gateway => "dicom-gateway",
            Peer::Dcmtk => "DCMTK storescp +B",
            Peer::DcmtkFork => "DCMTK storescp --fork +B",
            Peer::DcmtkDefault => "DCMTK storescp (default)",
            Peer::DicomRs => "dicom-rs dicom-storescp",
            Peer::DicomRsAsync => "dicom-rs dicom-storescp -n",
            Peer::Orthanc => "Orthanc",
        }
    }

    pub fn called_ae(self) -> &'static str {
        match self {
            Peer::Gateway => "DICOM_GW",
            Peer::Dcmtk | Peer::DcmtkFork | Peer::DcmtkDefault => "STORESCP",
            Peer::DicomRs | Peer::DicomRsAsync => "STORE-SCP",
            Peer::Orthanc => "ORTHANC",
        }
    }
}

/// Paths of the programs the harness drives; `None`: absent.
#[derive(Clone, Debug)]
pub struct Tools {
    pub gateway: PathBuf,
    pub storescp: Option<PathBuf>,
    pub storescu: Option<PathBuf>,
    pub echoscu: Option<PathBuf>,
    pub orthanc: Option<PathBuf>,
    pub dicom_storescp: Option<PathBuf>,
    pub iperf3: Option<PathBuf>,
    pub strace: Option<PathBuf>,
}

impl Tools {
    pub fn find(gateway: PathBuf) -> Tools {
        let cargo_bin: Vec<PathBuf> = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|c| vec![c.join("bin")])
            .unwrap_or_default();
        Tools {
            gateway,
            storescp: which("storescp", &[]),
            storescu: which("storescu", &[]),
            echoscu: which("echoscu", &[]),
            orthanc: which("Orthanc", &[]),
            dicom_storescp: which("dicom-storescp", &cargo_bin),
            iperf3: which("iperf3", &[]),
            strace: which("strace", &[]),
        }
    }

    /// Whether this receiver can run here (the sender and echoscu are needed for all).
    pub fn has(&self, peer: Peer) -> bool {
        let dcmtk = self.storescu.is_some() && self.echoscu.is_some();
        dcmtk
            && match peer {
                Peer::Gateway => true,
                Peer::Dcmtk | Peer::DcmtkFork | Peer::DcmtkDefault => self.storescp.is_some(),
                Peer::DicomRs | Peer::DicomRsAsync => self.dicom_storescp.is_some(),
                Peer::Orthanc => self.orthanc.is_some(),
            }
    }
}

/// A forwarding destination for the gateway.
#[derive(Clone, Debug)]
pub struct Dest {
    pub address: String,
    pub ae_title: String,
    pub max_associations: u32,
}

/// How to start a receiver.
#[derive(Clone, Debug, Default)]
pub struct StartOpts {
    /// The gateway's forwarding destination.
    pub dest: Option<Dest>,
    /// Run under `strace -f -c` counting sync calls, summary to this file.
    pub strace: Option<PathBuf>,
    /// Run inside this network namespace (`ip netns exec`), listening on all addresses.
    pub netns: Option<String>,
    /// Reuse this state directory as it is (the gateway's data directory for start-up runs).
    pub keep_dir: bool,
    /// The host echoscu probes readiness at (default 127.0.0.1).
    pub host: Option<String>,
    /// Listen on this port (default: a free one).
    pub port: Option<u16>,
    /// How long it may take to become ready (default 120 s).
    pub ready_timeout: Option<Duration>,
    /// The gateway's `[log] level` (default: its own default, "info").
    pub log_level: Option<String>,
    /// Return right after spawning, without waiting for readiness (a drain sink: the gateway
    /// may connect first, and a single-process storescp would then keep our C-ECHO waiting
    /// until the gateway's association ends).
    pub no_wait: bool,
}

/// A running receiver.
pub struct Receiver {
    pub peer: Peer,
    pub proc: Proc,
    pub port: u16,
    /// Its whole state (removed by [`Receiver::finish`]).
    pub dir: PathBuf,
    /// Where stored instances are counted.
    pub store_dir: PathBuf,
    /// The gateway binary (its `segments` command counts what it stored).
    cli: PathBuf,
    pub config: PathBuf,
    /// Time from spawn to ready (the gateway: to READY=1).
    pub startup: Duration,
    /// Runs under strace: signals go to the traced child, so strace writes its summary.
    traced: bool,
    /// Kept open while the gateway runs, as systemd keeps its notify socket.
    _notify: Option<UnixDatagram>,
}

/// The gateway's configuration file text.
pub fn gateway_toml(data_dir: &Path, port: u16, dest: Option<&Dest>, log: Option<&str>) -> String {
    let mut t = format!(
        "[gateway]\nae_title = \"DICOM_GW\"\ndata_dir = \"{}\"\nmin_free_disk_mb = 64\n\n\
         [[listen]]\naddress = \"127.0.0.1:{port}\"\n\n",
        data_dir.display()
    );
    if let Some(d) = dest {
        t.push_str(&format!(
            "[[destination]]\nname = \"sink\"\nae_title = \"{}\"\naddress = \"{}\"\n\
             max_associations = {}\nretry_initial_secs = 1\nretry_max_secs = 2\n\n",
            d.ae_title, d.address, d.max_associations
        ));
    }
    t.push_str("[metrics]\naddress = \"\"\n\n[dangerous]\nany_calling_ae_from = [\"127.0.0.0/8\"]\n# The benchmark runs as root; the gateway refuses root unless told.\nallow_root = true\n");
    if let Some(level) = log {
        t.push_str(&format!("\n[log]\nlevel = \"{level}\"\n"));
    }
    t
}

fn orthanc_json(dir: &Path, port: u16, http_port: u16) -> String {
    format!(
        r#"{{
  "Name": "bench",
  "StorageDirectory": "{s}",
  "IndexDirectory": "{i}",
  "StorageCompression": false,
  "DicomServerEnabled": true,
  "DicomAet": "ORTHANC",
  "DicomPort": {port},
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowStore": true,
  "MaximumPduLength": 131072,
  "HttpServerEnabled": false,
  "HttpPort": {http_port},
  "RemoteAccessAllowed": false,
  "Plugins": [],
  "SaveJobs": false,
  "MetricsEnabled": false
}}
"#,
        s = dir.join("storage").display(),
        i = dir.join("index").display()
    )
}

impl Receiver {
    /// Starts `peer` with its state in `dir` (emptied first unless `opts.keep_dir`) and waits
    /// until it answers C-ECHO (the gateway: until READY=1).
    pub fn start(tools: &Tools, peer: Peer, dir: &Path, opts: &StartOpts) -> Res<Receiver> {
        if !opts.keep_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let store_dir = match peer {
            Peer::Gateway => dir.join("data"),
            Peer::Orthanc => dir.join("storage"),
            _ => dir.join("out"),
        };
        let _ = std::fs::create_dir_all(&store_dir);
        let config = match peer {
            Peer::Gateway => dir.join("gateway.toml"),
            Peer::Orthanc => dir.join("orthanc.json"),
            _ => PathBuf::new(),
        };
        let log = dir.join(format!("{peer:?}.log").to_lowercase());
        let mut argv: Vec<String> = Vec::new();
        let path = |p: &Option<PathBuf>| -> Res<String> {
            p.as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{} is not installed", peer.label()))
        };
        match peer {
            Peer::Gateway => {
                std::fs::write(
                    &config,
                    gateway_toml(
                        &dir.join("data"),
                        port,
                        opts.dest.as_ref(),
                        opts.log_level.as_deref(),
                    ),
                )
                .map_err(|e| e.to_string())?;
                argv.push(tools.gateway.to_string_lossy().into_owned());
                argv.extend(["run".into(), "--config".into()]);
                argv.push(config.to_string_lossy().into_owned());
            }
            Peer::Dcmtk | Peer::DcmtkFork | Peer::DcmtkDefault => {
                argv.push(path(&tools.storescp)?);
                if peer != Peer::DcmtkDefault {
                    argv.push("+B".into());
                }
                if peer == Peer::DcmtkFork {
                    argv.push("--fork".into());
                }
                // 131072 is DCMTK's largest receive PDU; -dhl: no reverse DNS per association.
                argv.extend(["-pdu", "131072", "-dhl", "-od"].map(String::from));
                argv.push(store_dir.to_string_lossy().into_owned());
                argv.push(port.to_string());
            }
            Peer::DicomRs | Peer::DicomRsAsync => {
                argv.push(path(&tools.dicom_storescp)?);
                if peer == Peer::DicomRsAsync {
                    argv.push("--non-blocking".into());
                }
                argv.extend(["-m", "131072", "-o"].map(String::from));
                argv.push(store_dir.to_string_lossy().into_owned());
                argv.extend(["-p".into(), port.to_string()]);
            }
            Peer::Orthanc => {
                std::fs::write(&config, orthanc_json(dir, port, free_port()?))
                    .map_err(|e| e.to_string())?;
                argv.push(path(&tools.orthanc)?);
                argv.push(config.to_string_lossy().into_owned());
            }
        }
        if let Some(out) = &opts.strace {
            let strace = tools.strace.as_ref().ok_or("strace is not installed")?;
            let mut pre = vec![
                strace.to_string_lossy().into_owned(),
                "-f".into(),
                "-c".into(),
                "-e".into(),
                "trace=fsync,fdatasync,sync_file_range,syncfs,msync".into(),
                "-o".into(),
                out.to_string_lossy().into_owned(),
            ];
            pre.append(&mut argv);
            argv = pre;
        }
        if let Some(ns) = &opts.netns {
            let mut pre = vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()];
            pre.append(&mut argv);
            argv = pre;
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(dir)
            .env("TCP_NODELAY", "1")
            .env_remove("NOTIFY_SOCKET");
        let mut notify = None;
        if peer == Peer::Gateway {
            let sock_path = dir.join("notify.sock");
            let _ = std::fs::remove_file(&sock_path);
            let s = UnixDatagram::bind(&sock_path).map_err(|e| format!("notify socket: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            cmd.env("NOTIFY_SOCKET", &sock_path);
            notify = Some(s);
        }
        let start = Instant::now();
        let mut proc = Proc::spawn(peer.label(), cmd, &log)?;
        let host = opts.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let timeout = opts.ready_timeout.unwrap_or(READY_TIMEOUT);
        match &notify {
            Some(sock) => wait_ready_notify(sock, &mut proc, timeout)?,
            None if opts.no_wait => {}
            None => wait_echo(tools, peer, &host, port, &mut proc, timeout)?,
        }
        let startup = start.elapsed();
        Ok(Receiver {
            peer,
            proc,
            port,
            dir: dir.to_path_buf(),
            store_dir,
            cli: tools.gateway.clone(),
            config,
            startup,
            traced: opts.strace.is_some(),
            _notify: notify,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Instances stored so far (files in its storage directory).
    pub fn stored(&self) -> u64 {
        match self.peer {
            // Intact records in its segments, as `dicom-gateway segments` lists them.
            Peer::Gateway => {
                let out = Command::new(&self.cli)
                    .arg("segments")
                    .arg("--data-dir")
                    .arg(&self.store_dir)
                    .arg("--json")
                    .output();
                out.ok()
                    .and_then(|o| serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).ok())
                    .map_or(0, |v| {
                        v.iter().filter(|r| r["intact"] == true).count() as u64
                    })
            }
            _ => count_files(&self.store_dir, None),
        }
    }

    /// Stops it (SIGTERM; the gateway drains and closes its index).
    pub fn stop(&mut self) {
        if self.traced && self.proc.running() {
            // SIGTERM to the traced program itself: strace then sees it exit and writes
            // the summary (a signal to strace would detach and lose the tail).
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.proc.pid()))
                    .unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let _ = kill(Pid::from_raw(c), Signal::SIGTERM);
            }
            let start = Instant::now();
            while self.proc.running() && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.proc.stop(Duration::from_secs(60));
    }

    /// Stops it and removes its state.
    pub fn finish(mut self) {
        self.stop();
        trash(&self.dir);
    }

    /// The gateway's `status --json`.
    pub fn gateway_status(&self, tools: &Tools) -> Res<serde_json::Value> {
        let out = Command::new(&tools.gateway)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status --json: {e}"))
    }

    /// The gateway's status straight from its control socket (cheaper than running the CLI,
    /// so it can be polled every few milliseconds during a drain).
    pub fn control_status(&self) -> Res<serde_json::Value> {
        use std::io::{BufRead, BufReader};
        let path = self.dir.join("data").join("control.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"{\"cmd\":\"status\"}\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("control socket: {e}"))?;
        if v["ok"] != true {
            return Err(format!("control socket: {v}"));
        }
        Ok(v["result"].clone())
    }

    /// Pending entries of the gateway's destination "sink".
    pub fn pending(&self, tools: &Tools) -> Res<u64> {
        let v = self.gateway_status(tools)?;
        v["destinations"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == "sink"))
            .and_then(|d| d["pending"].as_u64())
            .ok_or_else(|| format!("no destinations[].pending in status: {v}"))
    }
}

/// Waits for READY=1 on the notify socket (systemd's protocol).
fn wait_ready_notify(sock: &UnixDatagram, proc: &mut Proc, timeout: Duration) -> Res<()> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                return Ok(());
            }
        }
        if let Some(s) = proc.exited() {
            return Err(format!(
                "{} exited ({s}) before READY:\n{}",
                proc.name,
                proc.log_tail()
            ));
        }
    }
    Err(format!(
        "{} not READY within {timeout:?}:\n{}",
        proc.name,
        proc.log_tail()
    ))
}

/// Waits until the receiver answers C-ECHO.
fn wait_echo(
    tools: &Tools,
    peer: Peer,
    host: &str,
    port: u16,
    proc: &mut Proc,
    timeout: Duration,
) -> Res<()> {
    let echoscu = tools.echoscu.as_ref().ok_or("echoscu is not installed")?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = proc.exited() {
            return Err(format!(
                "{} exited ({s}) before it was ready:\n{}",
                proc.name,
                proc.log_tail()
            ));
        }
        let ok = Command::new(echoscu)
            .args([
                "-aec",
                peer.called_ae(),
                "-to",
                "2",
                host,
                &port.to_string(),
            ])
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not answer C-ECHO within {timeout:?}:\n{}",
        proc.name,
        proc.log_tail()
    ))
}

// ---------------------------------------------------------------------------------------------
// The sender
// ---------------------------------------------------------------------------------------------

/// Sends every file under each of `dirs` with one `storescu` association per directory, all
/// at once; returns the wall time from the first start to the last exit.
pub fn storescu(
    tools: &Tools,
    called_ae: &str,
    host: &str,
    port: u16,
    dirs: &[PathBuf],
    log: &Path,
    timeout: Duration,
) -> Res<Duration> {
    let bin = tools.storescu.as_ref().ok_or("storescu is not installed")?;
    let start = Instant::now();
    let handles: Vec<_> = dirs
        .iter()
        .map(|d| {
            let mut cmd = Command::new(bin);
            // +sd +r: scan the directory; -nh: go on after a failed store (the count check
            // below reports it); the default proposal covers CT and SC in explicit VR LE.
            cmd.args(["-aet", "STORESCU", "-aec", called_ae, "-nh", "+sd", "+r"])
                .arg(host)
                .arg(port.to_string())
                .arg(d)
                .env("TCP_NODELAY", "1");
            let log = log.to_path_buf();
            std::thread::spawn(move || run_timed(cmd, timeout, &log))
        })
        .collect();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("storescu thread panicked".into());
            }
        }
    }
    let elapsed = start.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}
