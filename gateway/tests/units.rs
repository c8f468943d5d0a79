//! The appliance packaging in `config/`: the systemd unit, the sysusers.d and tmpfiles.d
//! entries, and the nftables ruleset, checked with the tools that install and load them.
//!
//! Guards against: a unit that systemd would reject or half-ignore (an unknown or misspelt key
//! is only a warning in `systemd-analyze verify`, so any warning fails here); hardening lost in
//! an edit (the exposure score must stay at 2.0 or lower, and equal to the score the unit's
//! header states); unit command lines the CLI no longer accepts; a service user or directory
//! with the wrong owner or mode; a ruleset that does not load, or that lets the wrong networks
//! reach the DICOM or management ports.
//!
//! Needs root (chown in tmpfiles, network namespaces), as `.ci/test` runs. Nothing here touches
//! the machine: sysusers and tmpfiles work on a temporary root, and the ruleset is loaded only in
//! network namespaces this test makes and deletes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dicom-gateway");
/// Where the unit expects the binary and the config on the appliance.
const INSTALLED_BIN: &str = "/usr/bin/dicom-gateway";
const INSTALLED_CONFIG: &str = "/etc/dicom-gateway/gateway.toml";
const MAX_EXPOSURE: f64 = 2.0;

fn repo_file(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join(rel);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

fn unit_path() -> PathBuf {
    repo_file("config/systemd/dicom-gateway.service")
}

/// Full path of a system tool; panics with the Debian package to install if it is missing.
/// Looks in PATH and in the sbin directories (nft and ip live there, often outside a user's
/// PATH).
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install {name}: apt-get install {package}");
}

fn systemd_analyze() -> PathBuf {
    tool("systemd-analyze", "systemd")
}

/// Runs a command to completion and returns its output; panics if it cannot be started.
fn run(cmd: &mut Command) -> Output {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    }
}

fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "`{cmd}` ended with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------------------------

/// `systemd-analyze verify` must pass without a single warning.
///
/// verify checks that every Exec*= binary exists and is executable, and on a build machine
/// there is no /usr/bin/dicom-gateway. Installing one would touch the machine, and `--root=`
/// would need a whole tree with the system units the unit refers to, so the test verifies a
/// copy of the unit in a temporary directory whose only change is the binary's path: the one
/// cargo just built. Everything else (keys, values, dependencies) is verified as shipped.
#[test]
fn unit_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let text = fs::read_to_string(unit_path()).expect("read unit");
    assert!(
        text.matches(INSTALLED_BIN).count() >= 2,
        "the unit should run {INSTALLED_BIN} in ExecStartPre= and ExecStart="
    );
    assert!(
        !BIN.contains(char::is_whitespace),
        "the built binary's path {BIN:?} contains whitespace, which an Exec line cannot take unquoted"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("dicom-gateway.service");
    fs::write(&copy, text.replace(INSTALLED_BIN, BIN)).expect("write unit copy");

    let out = run(Command::new(&analyze).arg("verify").arg(&copy));
    // Every message about this unit names it (file:line, or "dicom-gateway.service: ...").
    // Messages about other units of the machine that verify loads on the way are not ours.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("dicom-gateway"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify must pass without warnings (unknown keys are only warnings): {}",
        describe("systemd-analyze verify dicom-gateway.service", &out)
    );
}

/// The exposure score of `systemd-analyze security --offline=yes` must be 2.0 or lower ("OK"),
/// and the header of the unit must state the score it really has.
#[test]
fn unit_exposure_is_ok_and_documented() {
    let analyze = systemd_analyze();
    let unit = unit_path();
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let report = describe("systemd-analyze security --offline=yes", &out);
    assert!(out.status.success(), "{report}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let measured = exposure(&stdout).unwrap_or_else(|| {
        panic!("no 'Overall exposure level for dicom-gateway.service' line: {report}")
    });
    assert!(
        measured <= MAX_EXPOSURE,
        "exposure {measured} is above {MAX_EXPOSURE:.1}: hardening was lost. What is exposed:\n{}",
        stdout
            .lines()
            .filter(|l| l.starts_with('✗'))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let text = fs::read_to_string(&unit).expect("read unit");
    let stated = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .find_map(exposure)
        .expect("the unit's header should state the measured score (Overall exposure level ...)");
    assert!(
        (stated - measured).abs() < 0.05,
        "the unit's header says exposure {stated}, systemd-analyze measures {measured}: update the comment"
    );
}

/// The score from a line "... Overall exposure level for dicom-gateway.service: 1.4 OK ...".
fn exposure(text: &str) -> Option<f64> {
    const MARK: &str = "Overall exposure level for dicom-gateway.service:";
    let line = text.lines().find(|l| l.contains(MARK))?;
    let rest = &line[line.find(MARK)? + MARK.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A small valid config: data under `dir`, one listener, CT01 registered from 10.20.0.2.
fn minimal_config(dir: &Path, listen: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    fs::write(
        &path,
        format!(
            "[gateway]\nae_title = \"DICOM_GW\"\ndata_dir = \"{}\"\n\n\
             [[listen]]\naddress = \"{listen}\"\n\n\
             [[modality]]\nae_title = \"CT01\"\nhosts = [\"10.20.0.2\"]\n\n\
             [dangerous]\nallow_root = true\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

/// Every Exec line that runs the gateway must be accepted by the CLI as built: `check-config`
/// (ExecStartPre=, ExecReload=) passes on a valid config given in place of
/// /etc/dicom-gateway/gateway.toml, and `run` takes its arguments. (Not the example config: it
/// names TLS files that exist only on an appliance.)
#[test]
fn unit_command_lines_match_the_cli() {
    let text = fs::read_to_string(unit_path()).expect("read unit");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = minimal_config(dir.path(), "127.0.0.1:11112");
    let config = config.to_str().expect("utf-8 path");
    let mut seen = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !key.starts_with("Exec") || !value.starts_with(INSTALLED_BIN) {
            continue;
        }
        let args: Vec<String> = value[INSTALLED_BIN.len()..]
            .split_whitespace()
            .map(|a| a.replace(INSTALLED_CONFIG, config))
            .collect();
        let mut cmd = Command::new(BIN);
        cmd.args(&args);
        if args.first().map(String::as_str) == Some("run") {
            // Parse the arguments without starting a daemon on port 104.
            cmd.arg("--help");
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "{key}= of the unit is not accepted by the CLI: {}",
            describe(line, &out)
        );
        seen.push(key.to_string());
    }
    for key in ["ExecStartPre", "ExecStart", "ExecReload"] {
        assert!(
            seen.iter().any(|k| k == key),
            "the unit should have {key}= running {INSTALLED_BIN} (found {seen:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// sysusers.d and tmpfiles.d
// ---------------------------------------------------------------------------------------------

/// Installs the sysusers.d and tmpfiles.d entries into an empty temporary root and applies
/// them with `--root=` as systemd would at boot; then checks the user, the group, and the owner
/// and mode of every directory and of the config file. Applying twice must be harmless.
#[test]
fn sysusers_and_tmpfiles_create_user_and_directories() {
    let sysusers = tool("systemd-sysusers", "systemd");
    let tmpfiles = tool("systemd-tmpfiles", "systemd");
    let root = tempfile::tempdir().expect("temp dir");
    let r = root.path();
    for (dir, file) in [
        ("usr/lib/sysusers.d", "config/sysusers.d/dicom-gateway.conf"),
        ("usr/lib/tmpfiles.d", "config/tmpfiles.d/dicom-gateway.conf"),
    ] {
        fs::create_dir_all(r.join(dir)).expect("mkdir");
        fs::copy(repo_file(file), r.join(dir).join("dicom-gateway.conf")).expect("copy");
    }
    fs::create_dir_all(r.join("etc")).expect("mkdir etc");

    let apply = |what: &Path| {
        let out = run(Command::new(what)
            .arg(format!("--root={}", r.display()))
            .args(if what == tmpfiles {
                &["--create"][..]
            } else {
                &[][..]
            }));
        assert!(
            out.status.success(),
            "{} (these tests run as root, as .ci/test does)",
            describe(&what.display().to_string(), &out)
        );
    };
    apply(&sysusers);

    let passwd = fs::read_to_string(r.join("etc/passwd")).expect("read passwd");
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("dicom-gateway:"))
        .unwrap_or_else(|| panic!("no dicom-gateway user in passwd:\n{passwd}"))
        .split(':')
        .collect();
    let uid: u32 = user[2].parse().expect("uid");
    let gid: u32 = user[3].parse().expect("gid");
    assert!(uid > 0 && uid < 1000, "a system UID expected, got {uid}");
    assert_eq!(user[5], "/var/lib/dicom-gateway", "home");
    assert_eq!(user[6], "/usr/sbin/nologin", "shell: no login");
    let group = fs::read_to_string(r.join("etc/group")).expect("read group");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("dicom-gateway:x:{gid}:"))),
        "group dicom-gateway with GID {gid} expected:\n{group}"
    );

    apply(&tmpfiles);
    // The config is installed after the directory exists; tmpfiles then fixes its mode and owner.
    let config = r.join("etc/dicom-gateway/gateway.toml");
    fs::copy(repo_file("config/gateway.example.toml"), &config).expect("install config");
    fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    apply(&sysusers);
    apply(&tmpfiles);

    for (path, mode, owner, group) in [
        ("var/lib/dicom-gateway", 0o750, uid, gid),
        ("etc/dicom-gateway", 0o750, 0, gid),
        ("etc/dicom-gateway/tls", 0o750, 0, gid),
        ("etc/dicom-gateway/gateway.toml", 0o640, 0, gid),
    ] {
        let m = fs::metadata(r.join(path)).unwrap_or_else(|e| panic!("/{path}: {e}"));
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (mode, owner, group),
            "/{path}: expected mode {mode:o} owner {owner}:{group}, found {:o} {}:{}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The nftables ruleset
// ---------------------------------------------------------------------------------------------

fn ruleset() -> PathBuf {
    repo_file("config/nftables/dicom-gateway.nft")
}

/// `nft -c -f`: parsed and checked by the kernel, not applied.
#[test]
fn nftables_ruleset_checks() {
    let nft = tool("nft", "nftables");
    let out = run(Command::new(&nft).arg("-c").arg("-f").arg(ruleset()));
    assert!(
        out.status.success(),
        "{} (nft -c needs root or CAP_NET_ADMIN)",
        describe("nft -c -f config/nftables/dicom-gateway.nft", &out)
    );
}

/// A network namespace made for this test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(ip: &Path, name: String) -> Netns {
        // A namespace left by an aborted earlier run of this process ID.
        let _ = run(Command::new(ip).args(["netns", "delete", &name]));
        ip_ok(ip, &["netns", "add", &name]);
        Netns(name)
    }

    /// A command run inside the namespace.
    fn cmd(&self, ip: &Path, program: &Path) -> Command {
        let mut c = Command::new(ip);
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(ip) = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .iter()
            .find(|p| Path::new(p).exists())
        {
            let _ = Command::new(ip)
                .args(["netns", "delete", &self.0])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip_ok(ip: &Path, args: &[&str]) {
    let out = run(Command::new(ip).args(args));
    assert!(
        out.status.success(),
        "{} (network namespaces need root)",
        describe(&format!("ip {}", args.join(" ")), &out)
    );
}

/// Kills the gateway started in the namespace when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, PartialEq, Clone, Copy)]
enum Reach {
    /// A listener answered.
    Connected,
    /// The SYN got through and the host answered with a reset (no listener): not filtered.
    Refused,
    /// No answer: dropped by the firewall.
    Blocked,
}

/// Tries a TCP connection from inside `ns` (bash's /dev/tcp, 3 s deadline).
fn probe(ip: &Path, ns: &Netns, addr: &str, port: u16) -> Reach {
    let out = run(ns.cmd(ip, Path::new("timeout")).args([
        "3",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{addr}/{port}"),
    ]));
    match out.status.code() {
        Some(0) => Reach::Connected,
        Some(124) => Reach::Blocked,
        _ if String::from_utf8_lossy(&out.stderr).contains("refused") => Reach::Refused,
        _ => panic!("unexpected probe result: {}", describe(addr, &out)),
    }
}

/// Loads the ruleset (as shipped, with its placeholder networks) into the gateway's network
/// namespace, links it to a client namespace that has one address in the modality network
/// (10.20.0.0/16), one in the support network (10.99.0.0/24) and one in neither (10.30.0.0/24),
/// and checks who reaches which port; the destination address picks the client's source.
/// Loading the file twice must be fine (it replaces its own table). A real gateway answers
/// C-ECHO on port 104 through the firewall.
#[test]
fn nftables_ruleset_filters_by_network() {
    let ip = tool("ip", "iproute2");
    let nft = tool("nft", "nftables");
    let echoscu = tool("echoscu", "dcmtk");
    let tag = std::process::id();
    let gw = Netns::new(&ip, format!("dgw-units-{tag}-gw"));
    let cl = Netns::new(&ip, format!("dgw-units-{tag}-cl"));
    ip_ok(
        &ip,
        &[
            "-n", &gw.0, "link", "add", "gw0", "type", "veth", "peer", "name", "cl0", "netns",
            &cl.0,
        ],
    );
    for (ns, dev, host) in [(&gw, "gw0", "1"), (&cl, "cl0", "2")] {
        for net in ["10.20.0.{h}/16", "10.99.0.{h}/24", "10.30.0.{h}/24"] {
            let a = net.replace("{h}", host);
            ip_ok(&ip, &["-n", &ns.0, "addr", "add", &a, "dev", dev]);
        }
        for net in ["2001:db8::{h}/64", "fd00:30::{h}/64"] {
            let a = net.replace("{h}", host);
            ip_ok(&ip, &["-n", &ns.0, "addr", "add", &a, "dev", dev, "nodad"]);
        }
        ip_ok(&ip, &["-n", &ns.0, "link", "set", dev, "up"]);
        ip_ok(&ip, &["-n", &ns.0, "link", "set", "lo", "up"]);
    }
    for _ in 0..2 {
        let out = run(gw.cmd(&ip, &nft).arg("-f").arg(ruleset()));
        assert!(
            out.status.success(),
            "{}",
            describe("nft -f (in a test netns)", &out)
        );
    }
    let tables = run(gw.cmd(&ip, &nft).args(["list", "tables"]));
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout).trim(),
        "table inet dicom_gateway",
        "loading twice should leave exactly one table"
    );

    // The gateway, listening on port 104 on every IPv4 address of its namespace.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = minimal_config(dir.path(), "0.0.0.0:104");
    let log = fs::File::create(dir.path().join("gateway.log")).expect("log file");
    let _gateway = KillOnDrop(
        gw.cmd(&ip, Path::new(BIN))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the gateway"),
    );

    // C-ECHO from the modality network (retried while the gateway starts).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(cl.cmd(&ip, &echoscu).args([
            "-to",
            "2",
            "-aet",
            "CT01",
            "-aec",
            "DICOM_GW",
            "10.20.0.1",
            "104",
        ]));
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C-ECHO from the modality network through the firewall failed: {}\n--- gateway log ---\n{}",
            describe("echoscu 10.20.0.1 104", &out),
            fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }

    use Reach::{Blocked, Connected, Refused};
    // (client's network, gateway address, port, expected). The client's source address is the
    // one in the same network as the gateway address.
    let cases: &[(&str, &str, u16, Reach)] = &[
        ("modality", "10.20.0.1", 104, Connected),
        ("modality", "10.20.0.1", 11112, Refused),
        ("modality", "10.20.0.1", 2762, Refused),
        ("modality", "10.20.0.1", 22, Blocked),
        ("modality", "10.20.0.1", 9102, Blocked),
        ("support", "10.99.0.1", 22, Refused),
        ("support", "10.99.0.1", 9102, Refused),
        ("support", "10.99.0.1", 104, Blocked),
        ("other", "10.30.0.1", 104, Blocked),
        ("other", "10.30.0.1", 11112, Blocked),
        ("other", "10.30.0.1", 22, Blocked),
        ("other", "10.30.0.1", 8080, Blocked),
        // The IPv6 placeholder (2001:db8::/32) is both the modality and the support network.
        ("modality+support", "2001:db8::1", 104, Refused),
        ("modality+support", "2001:db8::1", 22, Refused),
        ("other", "fd00:30::1", 104, Blocked),
        ("other", "fd00:30::1", 22, Blocked),
    ];
    // Blocked probes wait for their deadline: run them all at once.
    let results: Vec<Reach> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(_, addr, port, _)| {
                let (ip, cl) = (&ip, &cl);
                s.spawn(move || probe(ip, cl, addr, port))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    let wrong: Vec<String> = cases
        .iter()
        .zip(&results)
        .filter(|((_, _, _, want), got)| want != *got)
        .map(|((from, addr, port, want), got)| {
            format!("from the {from} network to {addr} port {port}: expected {want:?}, got {got:?}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the ruleset lets the wrong traffic through:\n{}",
        wrong.join("\n")
    );
}
