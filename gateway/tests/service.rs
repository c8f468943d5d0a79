//! The gateway as an appliance service, driven as a field engineer and systemd drive it.
//!
//! Failure modes guarded against: CLI commands that print something other than the daemon's
//! state (tables and JSON are checked against what was sent); a reload that applies a broken
//! file or loses the old configuration; a SIGTERM during a transfer that acknowledges an
//! instance it then loses; a watchdog fed by a timer instead of a health check (here: fed at
//! all, with STATUS lines); metrics that do not move with traffic.

// Test code: a panic is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::data::ct_series;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn cli(gw: &Gateway, args: &[&str]) -> ToolOutput {
    let config = gw.config_path();
    let mut all: Vec<&str> = args.to_vec();
    all.push("--config");
    all.push(config.to_str().unwrap());
    gateway_cli(all)
}

fn json(out: &ToolOutput) -> serde_json::Value {
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

/// Adds a destination nobody listens on, so instances stay pending.
fn with_dead_destination(gw: &mut Gateway) -> u16 {
    let port = free_port();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(gw.config_path())
        .unwrap();
    write!(
        f,
        "\n[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:{port}\"\nretry_initial_secs = 1\nretry_max_secs = 2\nconnect_timeout_secs = 2\n"
    )
    .unwrap();
    gw.restart();
    port
}

#[test]
fn status_queue_and_studies_show_what_was_sent() {
    let mut gw = Gateway::start(GatewayConfig::default());
    with_dead_destination(&mut gw);
    let files = ct_series(&gw.scratch("ct"), "ct", 3, 64, 64);
    gw.storescu().files(&files).run().assert_success();

    // status: JSON and table agree on the destination being down with 3 pending.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = json(&cli(&gw, &["status", "--json"]));
        let d = &s["destinations"][0];
        if d["link"]["up"] == serde_json::Value::Bool(false) && d["pending"] == 3 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed 3 pending and link down: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["ae_title"], GATEWAY_AE);
    assert_eq!(status["destinations"][0]["name"], "pacs");
    assert!(status["destinations"][0]["link"]["last_error"]
        .as_str()
        .unwrap()
        .contains("cannot connect"));
    assert!(status["destinations"][0]["oldest_pending_age_s"].is_u64());
    let table = cli(&gw, &["status"]);
    table.assert_success();
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("pacs"))
        .unwrap_or_else(|| panic!("{}", table.describe()));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..5], &["pacs", cols[1], "DOWN", "3", "0"], "{row}");

    // queue list: three pending entries with the right UIDs.
    let entries = json(&cli(&gw, &["queue", "list", "--json"]));
    let mut uids: Vec<String> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sop_instance_uid"].as_str().unwrap().to_owned())
        .collect();
    uids.sort();
    let mut sent: Vec<String> = files
        .iter()
        .map(|f| common::data::inspect(f).sop_instance_uid)
        .collect();
    sent.sort();
    assert_eq!(uids, sent);
    assert!(entries
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["state"] == "pending" || e["state"] == "inflight"));
    assert!(json(&cli(&gw, &["queue", "list", "--failed", "--json"]))
        .as_array()
        .unwrap()
        .is_empty());
    // Purge needs confirmation.
    let purge = cli(&gw, &["queue", "purge"]);
    purge.assert_failure();
    assert!(purge.stderr.contains("--yes"), "{}", purge.describe());

    // studies: one study, 3 instances, all pending for pacs.
    let studies = json(&cli(&gw, &["studies", "--json"]));
    let s = &studies[0];
    assert_eq!(s["instances"], 3);
    assert_eq!(s["calling_ae"], "STORESCU");
    assert_eq!(s["destinations"][0]["name"], "pacs");
    assert_eq!(s["destinations"][0]["pending"], 3);
    let table = cli(&gw, &["studies", "--calling-ae", "STORESCU"]);
    assert!(
        table.stdout.contains("pacs: 0/3/0 pending"),
        "{}",
        table.describe()
    );
    let none = json(&cli(&gw, &["studies", "--calling-ae", "CT01", "--json"]));
    assert!(none.as_array().unwrap().is_empty());
    gw.stop();
}

#[test]
fn cli_without_daemon_says_what_to_do() {
    let mut gw = Gateway::start(GatewayConfig::default());
    gw.stop();
    let out = cli(&gw, &["status"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("is it running?")
            && out.stderr.contains("systemctl status dicom-gateway"),
        "{}",
        out.describe()
    );
}

#[test]
fn reload_applies_a_good_config_and_refuses_a_broken_one() {
    let mut gw = Gateway::start(GatewayConfig {
        modalities: vec![Modality::new("ECHOSCU", &["127.0.0.1"])],
        ..GatewayConfig::default()
    });
    gw.echoscu().calling("MR01").run().assert_failure();
    let good = std::fs::read_to_string(gw.config_path()).unwrap();

    // Broken file via SIGHUP: refused, logged, old config keeps serving.
    std::fs::write(gw.config_path(), format!("{good}\nnot_a_key = 1\n")).unwrap();
    kill(Pid::from_raw(gw.pid().unwrap() as i32), Signal::SIGHUP).unwrap();
    let line = gw
        .wait_for_log(Duration::from_secs(10), |l| l.contains("reload refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", gw.logs()));
    assert!(line.contains("not_a_key"), "{line}");
    gw.echoscu().run().assert_success();

    // Good file via the CLI: MR01 is registered and the answer says what changed.
    std::fs::write(
        gw.config_path(),
        format!("{good}\n[[modality]]\nae_title = \"MR01\"\nhosts = [\"127.0.0.1\"]\n")
            .replace("[dangerous]", "[dangerous]"),
    )
    .unwrap();
    let out = cli(&gw, &["reload"]);
    out.assert_success();
    assert!(out.stdout.contains("2 modalities"), "{}", out.describe());
    gw.echoscu().calling("MR01").run().assert_success();
    gw.stop();
}

#[test]
fn sigterm_during_a_transfer_loses_no_acknowledged_instance() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let files = ct_series(&gw.scratch("ct"), "ct", 150, 128, 128);
    let scu = gw.storescu().arg("-v").files(&files).spawn();
    // Let part of the series through, then stop the daemon as systemd does.
    gw.wait_for_log(Duration::from_secs(30), |l| l.contains("instance stored"))
        .expect("nothing stored");
    std::thread::sleep(Duration::from_millis(150));
    let exit = gw.stop();
    assert!(exit.success(), "SIGTERM exit: {exit:?}\n{}", gw.logs());
    let out = scu.wait();
    let acked: Vec<_> = store_reports(&out.text())
        .into_iter()
        .filter(|r| r.status == "Success")
        .collect();
    assert!(
        !acked.is_empty(),
        "no instance acknowledged before SIGTERM:\n{}",
        out.describe()
    );
    let rows = gw.instances();
    for r in &acked {
        let uid = common::data::inspect(&r.file).sop_instance_uid;
        assert!(
            rows.iter().any(|row| row.sop_instance_uid == uid),
            "acknowledged {uid} missing after SIGTERM"
        );
    }
    assert!(
        gw.unfinished_records().is_empty(),
        "half-written files left: {:?}",
        gw.unfinished_records()
    );
    eprintln!(
        "SIGTERM mid-transfer: {} acknowledged, {} indexed, 0 lost",
        acked.len(),
        rows.len()
    );
}

#[test]
fn watchdog_and_status_notifications_flow() {
    let gw = Gateway::start(GatewayConfig::default());
    let config = gw.config_path();
    let mut gw = gw;
    gw.stop();
    // A second daemon on the same config, started as systemd would with WatchdogSec=2s.
    let sock_path = gw.scratch("notify").join("sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !(seen.contains("READY=1")
            && seen.matches("WATCHDOG=1").count() >= 2
            && seen.contains("STATUS=0 association(s)"))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("READY=1"), "{seen}");
    assert!(
        seen.matches("WATCHDOG=1").count() >= 2,
        "watchdog not fed every WatchdogSec/2: {seen}"
    );
    assert!(
        seen.contains("STATUS=0 association(s); cache only"),
        "{seen}"
    );
    assert!(seen.contains("STOPPING=1"), "{seen}");
    assert!(status.success());
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn metrics_move_with_traffic() {
    let port = free_port();
    let mut gw = Gateway::start(GatewayConfig {
        metrics_address: format!("127.0.0.1:{port}"),
        spare_segments: 2,
        ..GatewayConfig::default()
    });
    with_dead_destination(&mut gw);
    let files = ct_series(&gw.scratch("ct"), "ct", 4, 64, 64);
    gw.storescu().files(&files).run().assert_success();
    gw.echoscu().called("NOT_US").run().assert_failure();
    let text = scrape(port);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        metric(&text, "dicom_gateway_cstore_total{status=\"0000\"}"),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "dicom_gateway_associations_total{result=\"accepted\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "dicom_gateway_associations_total{result=\"rejected\",reason=\"called_ae_title\"}"
        ),
        1.0
    );
    assert!(metric(&text, "dicom_gateway_received_bytes_total") > 4.0 * 64.0 * 64.0 * 2.0);
    assert_eq!(
        metric(&text, "dicom_gateway_queue_pending{destination=\"pacs\"}"),
        4.0
    );
    assert_eq!(
        metric(&text, "dicom_gateway_destination_up{destination=\"pacs\"}"),
        0.0
    );
    assert!(metric(&text, "dicom_gateway_disk_free_bytes") > 0.0);
    // Two spares made before READY, one became the segment of the 4 instances; the other is
    // still there, and the used one may already be made again (after 5 s without traffic).
    let spares = metric(&text, "dicom_gateway_spare_segments");
    assert!((1.0..=2.0).contains(&spares), "{spares}");
    gw.stop();
}

/// Started as root with `run_as`, the daemon binds and then runs as that user; started as root
/// without it (and without `allow_root`), it refuses with the fix in the message.
#[test]
fn root_switches_to_run_as_or_refuses() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root to test the privilege drop");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let mut gw = Gateway::start(GatewayConfig {
        run_as: Some("nobody".into()),
        ..GatewayConfig::default()
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid().unwrap())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == nobody.uid.as_raw()), "{uid_line}");
    let files = ct_series(&gw.scratch("ct"), "ct", 2, 32, 32);
    gw.storescu().files(&files).run().assert_success();
    assert!(
        gw.logs().contains("switched to user nobody"),
        "{}",
        gw.logs()
    );
    gw.stop();
    assert_eq!(gw.instances().len(), 2);

    // Root without run_as and without allow_root: refused, with the fix named.
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let text = text
        .replace("run_as = \"nobody\"\n", "")
        .replace("allow_root = true", "allow_root = false");
    std::fs::write(gw.config_path(), text).unwrap();
    let out = gateway_cli(["run", "--config", gw.config_path().to_str().unwrap()]);
    out.assert_failure();
    assert!(
        out.text().contains("refusing to run as root") && out.text().contains("run_as"),
        "{}",
        out.describe()
    );
}
