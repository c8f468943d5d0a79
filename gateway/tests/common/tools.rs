//! Running external programs with a deadline: DCMTK's SCUs and the gateway's CLI.
//!
//! Every program gets a deadline, so a hang fails the test with what the program printed so
//! far instead of blocking the suite; DCMTK tools are run by full path with `TCP_NODELAY=1`.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{GATEWAY_AE, GATEWAY_BIN, TOOL_TIMEOUT};

/// Full path of a DCMTK tool; panics with the install hint if it is missing.
pub fn dcmtk(tool: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(tool);
    assert!(
        p.exists(),
        "{} not found: install dcmtk: apt-get install dcmtk",
        p.display()
    );
    p
}

// ---------------------------------------------------------------------------------------------
// Running external programs with a deadline
// ---------------------------------------------------------------------------------------------

/// What a finished program printed and how it ended.
#[derive(Debug)]
pub struct ToolOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ToolOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout followed by stderr (DCMTK logs to either, depending on the level).
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn describe(&self) -> String {
        format!(
            "`{}` ended with {} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.elapsed, self.stdout, self.stderr
        )
    }

    pub fn assert_success(&self) -> &ToolOutput {
        assert!(self.success(), "expected success: {}", self.describe());
        self
    }

    pub fn assert_failure(&self) -> &ToolOutput {
        assert!(!self.success(), "expected failure: {}", self.describe());
        self
    }

    /// Panics with the whole output unless `text()` contains `needle` (case-insensitive).
    pub fn assert_contains(&self, needle: &str) -> &ToolOutput {
        assert!(
            self.text().to_lowercase().contains(&needle.to_lowercase()),
            "expected {needle:?} in the output of {}",
            self.describe()
        );
        self
    }
}

/// A program started by [`spawn_tool`]; its output is collected by two threads.
pub struct RunningTool {
    child: Child,
    command: String,
    started: Instant,
    timeout: Duration,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Starts `cmd` with piped stdout/stderr and no stdin; [`RunningTool::wait`] allows it
/// `timeout` from now.
pub fn spawn_tool(mut cmd: Command, timeout: Duration) -> RunningTool {
    let command = describe_command(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let stdout = child.stdout.take().map(collect);
    let stderr = child.stderr.take().map(collect);
    RunningTool {
        child,
        command,
        started: Instant::now(),
        timeout,
        stdout,
        stderr,
    }
}

impl RunningTool {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the program to end; past its deadline it is killed and the test fails with
    /// what it printed so far.
    pub fn wait(mut self) -> ToolOutput {
        let timeout = self.timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for tool") {
                break Some(s);
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let status = match status {
            Some(s) => s,
            None => self.child.wait().expect("wait for killed tool"),
        };
        let out = ToolOutput {
            command: self.command.clone(),
            status,
            stdout: self
                .stdout
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            elapsed: self.started.elapsed(),
        };
        assert!(
            out.elapsed <= timeout,
            "timed out after {timeout:?} and killed: {}",
            out.describe()
        );
        out
    }
}

/// Runs `cmd` to completion within `timeout` (see [`RunningTool::wait`]).
pub fn run_tool(cmd: Command, timeout: Duration) -> ToolOutput {
    spawn_tool(cmd, timeout).wait()
}

/// Runs the gateway binary with `args` (a CLI subcommand such as `check-config` or
/// `instances`, or a `run` that is expected to fail); it must end within 30 s.
pub fn gateway_cli<I, S>(args: I) -> ToolOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM");
    run_tool(cmd, Duration::from_secs(30))
}

// ---------------------------------------------------------------------------------------------
// DCMTK SCUs
// ---------------------------------------------------------------------------------------------

/// A `storescu` or `echoscu` invocation against a gateway on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct Scu {
    tool: &'static str,
    port: u16,
    calling_ae: String,
    called_ae: String,
    args: Vec<OsString>,
    files: Vec<PathBuf>,
    timeout: Duration,
}

impl Scu {
    pub fn new(tool: &'static str, port: u16) -> Scu {
        Scu {
            tool,
            port,
            calling_ae: if tool == "echoscu" {
                "ECHOSCU"
            } else {
                "STORESCU"
            }
            .to_owned(),
            called_ae: GATEWAY_AE.to_owned(),
            args: Vec::new(),
            files: Vec::new(),
            timeout: TOOL_TIMEOUT,
        }
    }

    /// Our calling AE title (`-aet`).
    pub fn calling(mut self, ae: &str) -> Scu {
        ae.clone_into(&mut self.calling_ae);
        self
    }

    /// The gateway's AE title we call (`-aec`).
    pub fn called(mut self, ae: &str) -> Scu {
        ae.clone_into(&mut self.called_ae);
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Scu {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, a: I) -> Scu {
        self.args
            .extend(a.into_iter().map(|s| s.as_ref().to_owned()));
        self
    }

    pub fn file(mut self, f: impl AsRef<Path>) -> Scu {
        self.files.push(f.as_ref().to_path_buf());
        self
    }

    pub fn files<I: IntoIterator<Item = P>, P: AsRef<Path>>(mut self, f: I) -> Scu {
        self.files
            .extend(f.into_iter().map(|p| p.as_ref().to_path_buf()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Scu {
        self.timeout = t;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(dcmtk(self.tool));
        cmd.env("TCP_NODELAY", "1")
            .arg("-aet")
            .arg(&self.calling_ae)
            .arg("-aec")
            .arg(&self.called_ae)
            .args(&self.args)
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .args(&self.files);
        cmd
    }

    pub fn spawn(&self) -> RunningTool {
        spawn_tool(self.command(), self.timeout)
    }

    pub fn run(&self) -> ToolOutput {
        run_tool(self.command(), self.timeout)
    }
}

/// One file as storescu reported it (`-v`): `I: Sending file: PATH` then
/// `I: Received Store Response (STATUS)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreReport {
    pub file: PathBuf,
    /// The text in parentheses, e.g. `Success` or `Refused: OutOfResources`.
    pub status: String,
}

impl StoreReport {
    pub fn is_success(&self) -> bool {
        self.status == "Success"
    }
}

/// Parses storescu `-v` output into one report per answered C-STORE, in order.
pub fn store_reports(output: &str) -> Vec<StoreReport> {
    let mut current: Option<PathBuf> = None;
    let mut out = Vec::new();
    for line in output.lines() {
        if let Some(f) = line.split_once("Sending file: ").map(|(_, f)| f.trim()) {
            current = Some(PathBuf::from(f));
        } else if let Some(rest) = line
            .split_once("Received Store Response")
            .map(|(_, r)| r.trim())
        {
            let status = rest
                .trim_start_matches('(')
                .split(')')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            let file = current
                .take()
                .unwrap_or_else(|| panic!("store response without a file in:\n{output}"));
            out.push(StoreReport { file, status });
        }
    }
    out
}
