//! DICOM TLS against real peers (issue 4): DCMTK `echoscu`/`storescu` (OpenSSL) and `openssl
//! s_client` as modalities and attackers on the listener side, Orthanc with DICOM TLS as the
//! PACS on the upstream side. Certificates are generated per test with rcgen
//! ([`common::certs`]).
//!
//! Failure modes covered: a modality without a client certificate, with an expired one, with one
//! from another CA, with another modality's certificate (pin mismatch); TLS 1.1 and a weak
//! suite offered; plain DICOM to the TLS port and TLS to the plain port; a peer that never
//! starts the handshake; a private key readable by others; a certificate reload under load,
//! with a good and with a broken new certificate; upstream, a PACS certificate from an unknown
//! CA, one for another name, and an expired one. Each refusal must be a clean failure on the
//! peer's side and a log line (or queue status) that names the reason.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::certs::{openssl, write_file, CertFiles, Pki};
use common::orthanc::{
    append_config, dest_status, status, stopped_gateway, wait_counts, wait_until, Counts, Dest,
    Orthanc, PACS_AE,
};
use common::{data, free_port, gateway_cli, run_tool, store_reports, Gateway, GatewayConfig, Scu};
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(15);

/// A gateway with a plain port (the harness's) and a TLS port with client certificates
/// required, and modalities: `MOD_A` pinned by SHA-256, `MOD_B` pinned by subject, `TLS_ONLY`
/// with `allow_plain = false`, plus the harness's defaults (plain allowed).
struct TlsGateway {
    gw: Gateway,
    tls_port: u16,
    pki: Pki,
    gateway_cert: CertFiles,
    mod_a: CertFiles,
    mod_b: CertFiles,
}

impl TlsGateway {
    fn start() -> TlsGateway {
        let config = GatewayConfig {
            artim_timeout_secs: Some(3),
            ..GatewayConfig::default()
        };
        let mut gw = stopped_gateway(config);
        let pki = Pki::new(&gw.dir().join("pki"));
        let gateway_cert = pki.server("gateway", "dicom-gateway", &["localhost", "127.0.0.1"]);
        let mod_a = pki.client("mod-a", "MOD_A");
        let mod_b = pki.client("mod-b", "MOD_B");
        let tls_port = free_port();
        append_config(
            &gw,
            &format!(
                r#"
[[listen]]
address = "127.0.0.1:{tls_port}"
tls = {{ certificate = "{}", private_key = "{}", client_ca = "{}" }}

[[modality]]
ae_title = "MOD_A"
hosts = ["127.0.0.1"]
certificate_sha256 = "{}"

[[modality]]
ae_title = "MOD_B"
hosts = ["127.0.0.1"]
certificate_subject = "CN=MOD_B, O=Example Hospital"

[[modality]]
ae_title = "TLS_ONLY"
hosts = ["127.0.0.1"]
allow_plain = false
"#,
                gateway_cert.cert.display(),
                gateway_cert.key.display(),
                pki.ca_file().display(),
                mod_a.sha256,
            ),
        );
        gw.restart();
        TlsGateway {
            gw,
            tls_port,
            pki,
            gateway_cert,
            mod_a,
            mod_b,
        }
    }

    /// A DCMTK tool on the TLS port, with `cert` as its client certificate (`+tls`) or none
    /// (`+tla`), verifying the gateway against the test CA (`+cf`).
    fn scu(&self, tool: &'static str, cert: Option<&CertFiles>) -> Scu {
        let scu = Scu::new(tool, self.tls_port).timeout(Duration::from_secs(60));
        let scu = match cert {
            Some(c) => scu.arg("+tls").arg(&c.key).arg(&c.cert),
            None => scu.arg("+tla"),
        };
        scu.arg("+cf").arg(self.pki.ca_file())
    }

    /// Waits for a new log line containing every one of `words` (after `seen` lines); returns
    /// it, or panics with the log.
    fn log_line(&self, seen: usize, words: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let logs = self.gw.logs();
            if let Some(l) = logs
                .lines()
                .skip(seen)
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return l.to_owned();
            }
            assert!(
                start.elapsed() < LOG_WAIT,
                "no log line with {words:?}; log:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_len(&self) -> usize {
        self.gw.logs().lines().count()
    }
}

/// A small CT series in the gateway's scratch directory.
fn small_series(gw: &Gateway, name: &str, count: u32) -> Vec<PathBuf> {
    data::ct_series(&gw.scratch(name), name, count, 64, 64)
}

/// Prints a log line for the record (docs/security.md quotes them).
fn show(case: &str, line: &str) {
    eprintln!("[{case}] {line}");
}

#[test]
fn a_modality_with_its_certificate_echoes_and_stores_over_mutual_tls() {
    let mut t = TlsGateway::start();
    let out = t.scu("echoscu", Some(&t.mod_a)).calling("MOD_A").run();
    assert!(out.success(), "echo over TLS: {}", out.describe());
    let line = t.log_line(0, &["TLS session established", "CN=MOD_A"]);
    show("good certificate", &line);
    assert!(line.contains("TLS13") || line.contains("TLSv1_3"), "{line}");

    let files = small_series(&t.gw, "tls-ok", 3);
    let out = t
        .scu("storescu", Some(&t.mod_b))
        .calling("MOD_B")
        .arg("-v")
        .files(&files)
        .run();
    let reports = store_reports(&out.text());
    assert!(
        out.success() && reports.len() == 3 && reports.iter().all(|r| r.is_success()),
        "store over TLS: {}",
        out.describe()
    );
    // An unpinned, plain-allowed modality may use TLS too (any certificate of the CA).
    t.scu("echoscu", Some(&t.mod_a))
        .calling("ECHOSCU")
        .run()
        .assert_success();
    t.gw.stop();
    let stored = t.gw.instances();
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|i| i.calling_ae == "MOD_B"));
}

#[test]
fn refusals_on_the_tls_port_are_clean_and_say_why() {
    let t = TlsGateway::start();
    let expired = t.pki.expired("expired", "MOD_A");
    let foreign = t.pki.issued_by_other_ca("foreign", "MOD_A");

    // No client certificate.
    let n = t.log_len();
    t.scu("echoscu", None)
        .calling("ECHOSCU")
        .run()
        .assert_failure();
    let line = t.log_line(n, &["TLS handshake failed", "no client certificate"]);
    show("no client certificate", &line);

    // Expired client certificate.
    let n = t.log_len();
    t.scu("echoscu", Some(&expired))
        .calling("ECHOSCU")
        .run()
        .assert_failure();
    let line = t.log_line(n, &["TLS handshake failed", "client certificate expired"]);
    assert!(line.contains("2021-01-01"), "{line}");
    show("expired client certificate", &line);

    // A certificate from another CA.
    let n = t.log_len();
    t.scu("echoscu", Some(&foreign))
        .calling("ECHOSCU")
        .run()
        .assert_failure();
    let line = t.log_line(n, &["TLS handshake failed", "unknown CA"]);
    show("certificate from another CA", &line);

    // Modality A's (valid) certificate with B's AE title, and B's with A's.
    let n = t.log_len();
    let out = t.scu("echoscu", Some(&t.mod_a)).calling("MOD_B").run();
    out.assert_failure();
    out.assert_contains("rejected");
    let line = t.log_line(
        n,
        &["association rejected", "certificate pin mismatch", "MOD_B"],
    );
    assert!(line.contains("certificate_subject"), "{line}");
    show("A's certificate with B's AE title", &line);
    let n = t.log_len();
    t.scu("echoscu", Some(&t.mod_b))
        .calling("MOD_A")
        .run()
        .assert_failure();
    let line = t.log_line(
        n,
        &["association rejected", "certificate pin mismatch", "MOD_A"],
    );
    assert!(line.contains("certificate_sha256"), "{line}");
    show("B's certificate with A's AE title", &line);

    // Pinned and allow_plain = false modalities on the plain port.
    for ae in ["MOD_A", "TLS_ONLY"] {
        let n = t.log_len();
        let out = t.gw.echoscu().calling(ae).run();
        out.assert_failure();
        out.assert_contains("rejected");
        let line = t.log_line(n, &["association rejected", "must use DICOM TLS", ae]);
        show(&format!("{ae} on the plain port"), &line);
    }

    // Plain DICOM to the TLS port.
    let n = t.log_len();
    Scu::new("echoscu", t.tls_port)
        .timeout(Duration::from_secs(30))
        .run()
        .assert_failure();
    let line = t.log_line(
        n,
        &["TLS handshake failed", "plain DICOM sent to a TLS port"],
    );
    show("plain DICOM to the TLS port", &line);

    // TLS to the plain port.
    let n = t.log_len();
    Scu::new("echoscu", t.gw.port())
        .arg("+tls")
        .arg(&t.mod_a.key)
        .arg(&t.mod_a.cert)
        .arg("+cf")
        .arg(t.pki.ca_file())
        .timeout(Duration::from_secs(30))
        .run()
        .assert_failure();
    let line = t.log_line(n, &["TLS ClientHello on a plain DICOM port"]);
    show("TLS to the plain port", &line);

    // TLS 1.1, and TLS 1.2 with a suite outside the profile (RSA key exchange, CBC, SHA-1).
    // OpenSSL's own configuration would refuse to offer them; an empty one lets it.
    for (case, args) in [
        ("TLS 1.1", &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..]),
        (
            "weak suite",
            &[
                "-tls1_2",
                "-cipher",
                "AES128-SHA:ECDHE-RSA-AES128-SHA@SECLEVEL=0",
            ][..],
        ),
    ] {
        let n = t.log_len();
        let out = s_client(&t, args);
        // Refused: no session ("Cipher is (NONE)"), with a handshake_failure alert.
        assert!(
            !out.success() && out.text().contains("Cipher is (NONE)"),
            "{case} was accepted: {}",
            out.describe()
        );
        let line = t.log_line(
            n,
            &[
                "TLS handshake failed",
                "no TLS version or cipher suite in common",
            ],
        );
        show(case, &line);
    }

    // A peer that connects and says nothing.
    let n = t.log_len();
    let idle = std::net::TcpStream::connect(("127.0.0.1", t.tls_port)).expect("connect");
    let line = t.log_line(n, &["TLS handshake failed", "handshake timeout"]);
    drop(idle);
    show("handshake timeout", &line);

    // After all that, the gateway still serves both ports.
    t.scu("echoscu", Some(&t.mod_a))
        .calling("MOD_A")
        .run()
        .assert_success();
    t.gw.echoscu().run().assert_success();
}

/// `openssl s_client` to the TLS port with the test CA and MOD_A's certificate, plus `args`.
fn s_client(t: &TlsGateway, args: &[&str]) -> common::ToolOutput {
    let empty_conf = t.gw.dir().join("openssl-empty.cnf");
    std::fs::write(&empty_conf, "").expect("write empty openssl.cnf");
    let mut cmd = Command::new(openssl());
    cmd.env("OPENSSL_CONF", &empty_conf)
        .arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{}", t.tls_port))
        .arg("-CAfile")
        .arg(t.pki.ca_file())
        .arg("-cert")
        .arg(&t.mod_a.cert)
        .arg("-key")
        .arg(&t.mod_a.key)
        .args(args)
        .stdin(std::process::Stdio::null());
    run_tool(cmd, Duration::from_secs(30))
}

#[test]
fn a_private_key_readable_by_others_refuses_to_start() {
    let t = TlsGateway::start();
    let mut gw = t.gw;
    gw.stop();
    std::fs::set_permissions(&t.gateway_cert.key, std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    for args in [["run", "--config"], ["check-config", "--config"]] {
        let config = gw.config_path();
        let out = gateway_cli([
            std::ffi::OsStr::new(args[0]),
            std::ffi::OsStr::new(args[1]),
            config.as_os_str(),
        ]);
        out.assert_failure();
        out.assert_contains("accessible by group or others (mode 0640)");
        out.assert_contains(&format!("chmod 600 {}", t.gateway_cert.key.display()));
        if args[0] == "run" {
            let line = out
                .text()
                .lines()
                .find(|l| l.contains("chmod 600"))
                .unwrap_or_default()
                .to_owned();
            show("key readable by others", &line);
        }
    }
}

/// The subject CN of the certificate the TLS port serves now.
fn served_cn(t: &TlsGateway) -> String {
    let out = s_client(t, &["-brief"]);
    let text = out.text();
    text.lines()
        .find_map(|l| l.strip_prefix("Peer certificate: "))
        .and_then(|s| s.split("CN = ").nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no peer certificate in {}", out.describe()))
}

#[test]
fn certificates_reload_on_sighup_without_dropping_a_store_loop() {
    let t = TlsGateway::start();
    assert_eq!(served_cn(&t), "dicom-gateway");
    let files = small_series(&t.gw, "reload", 2);

    // A storescu loop on the TLS port, one association after another, each with a new
    // handshake, for as long as the test needs.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let loop_scu = t
        .scu("storescu", Some(&t.mod_a))
        .calling("MOD_A")
        .files(&files);
    let worker = {
        let (stop, ok) = (stop.clone(), ok.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = loop_scu.run();
                if out.success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(out.describe());
                }
            }
            failures
        })
    };
    let wait_ok = |at_least: u32| {
        wait_until(
            Duration::from_secs(60),
            || {
                format!(
                    "the storescu loop made {} rounds",
                    ok.load(Ordering::Relaxed)
                )
            },
            || (ok.load(Ordering::Relaxed) >= at_least).then_some(()),
        );
    };
    wait_ok(2);

    // Rotate: a new certificate from the same CA, written over the old files, then SIGHUP.
    let next = t.pki.server(
        "gateway-next",
        "dicom-gateway-2",
        &["localhost", "127.0.0.1"],
    );
    let copy = |from: &Path, to: &Path, mode| {
        write_file(to, &std::fs::read_to_string(from).expect("read PEM"), mode);
    };
    copy(&next.cert, &t.gateway_cert.cert, 0o644);
    copy(&next.key, &t.gateway_cert.key, 0o600);
    let n = t.log_len();
    sighup(&t.gw);
    let line = t.log_line(n, &["configuration reloaded", "TLS certificates re-read"]);
    show("reload", &line);
    let rounds = ok.load(Ordering::Relaxed);
    wait_ok(rounds + 2);
    assert_eq!(served_cn(&t), "dicom-gateway-2");

    // A broken certificate: the one in service stays, and the log says why.
    write_file(
        &t.gateway_cert.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
        0o644,
    );
    let n = t.log_len();
    sighup(&t.gw);
    let line = t.log_line(n, &["reload refused", "certificate"]);
    show("reload with a broken certificate", &line);
    let rounds = ok.load(Ordering::Relaxed);
    wait_ok(rounds + 2);
    assert_eq!(served_cn(&t), "dicom-gateway-2");

    // An expired one likewise.
    let old = t
        .pki
        .expired_server("gateway-old", "dicom-gateway-old", &["127.0.0.1"]);
    copy(&old.cert, &t.gateway_cert.cert, 0o644);
    copy(&old.key, &t.gateway_cert.key, 0o600);
    let n = t.log_len();
    sighup(&t.gw);
    let line = t.log_line(n, &["reload refused", "expired on 2021-01-01"]);
    show("reload with an expired certificate", &line);
    assert_eq!(served_cn(&t), "dicom-gateway-2");

    stop.store(true, Ordering::Relaxed);
    let failures = worker.join().expect("storescu loop");
    assert!(
        failures.is_empty(),
        "{} of {} storescu runs failed during the reloads; first: {}",
        failures.len(),
        failures.len() as u32 + ok.load(Ordering::Relaxed),
        failures[0]
    );
    eprintln!(
        "[reload] {} storescu associations succeeded across 3 reloads",
        ok.load(Ordering::Relaxed)
    );
}

fn sighup(gw: &Gateway) {
    let pid = gw.pid().expect("gateway running");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

// ---------------------------------------------------------------------------------------------
// Upstream: Orthanc with DICOM TLS as the PACS
// ---------------------------------------------------------------------------------------------

/// Turns on DICOM TLS in a prepared (not started) Orthanc: its certificate and key, the CA it
/// trusts for client certificates, and client certificates required.
fn orthanc_tls(o: &Orthanc, cert: &CertFiles, trusted_ca: &Path) {
    let path = o.config_path();
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read Orthanc config"))
            .expect("Orthanc config JSON");
    v["DicomTlsEnabled"] = true.into();
    v["DicomTlsCertificate"] = cert.cert.display().to_string().into();
    v["DicomTlsPrivateKey"] = cert.key.display().to_string().into();
    v["DicomTlsTrustedCertificates"] = trusted_ca.display().to_string().into();
    v["DicomTlsRemoteCertificateRequired"] = true.into();
    std::fs::write(&path, serde_json::to_string_pretty(&v).expect("JSON")).expect("write");
}

/// A `[[destination]]` with `tls = {...}` appended.
fn tls_dest(name: &str, orthanc: &Orthanc, tls: &str) -> String {
    let d = Dest::new(name, PACS_AE, &orthanc.dicom_address());
    format!("{}tls = {{ {tls} }}\n", d.to_toml())
}

fn last_error(gw: &Gateway, name: &str) -> Option<String> {
    dest_status(&status(gw), name)["link"]["last_error"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn a_study_goes_from_a_tls_modality_to_orthanc_over_mutual_tls() {
    let t = TlsGateway::start();
    let mut gw = t.gw;
    gw.stop();
    let pacs_cert = t.pki.server("pacs", "pacs", &["localhost", "127.0.0.1"]);
    let gw_client = t.pki.client("gateway-client", "DICOM_GW");
    let mut orthanc = Orthanc::new("127.0.0.1");
    orthanc_tls(&orthanc, &pacs_cert, &t.pki.ca_file());
    orthanc.start();
    append_config(
        &gw,
        &tls_dest(
            "pacs-tls",
            &orthanc,
            &format!(
                "ca = \"{}\", certificate = \"{}\", private_key = \"{}\"",
                t.pki.ca_file().display(),
                gw_client.cert.display(),
                gw_client.key.display()
            ),
        ),
    );
    gw.restart();
    let t = TlsGateway { gw, ..t };

    let files = small_series(&t.gw, "e2e", 5);
    let out = t
        .scu("storescu", Some(&t.mod_a))
        .calling("MOD_A")
        .files(&files)
        .run();
    assert!(out.success(), "{}", out.describe());
    wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "Orthanc has {} of 5; status {:#}",
                orthanc.count(),
                status(&t.gw)
            )
        },
        || (orthanc.count() == 5).then_some(()),
    );
    let s = wait_counts(
        &t.gw,
        "pacs-tls",
        Counts {
            pending: 0,
            failed: 0,
            delivered: 5,
        },
        Duration::from_secs(30),
    );
    let d = dest_status(&s, "pacs-tls");
    assert!(d["link"]["last_error"].is_null(), "{d:#}");
    // Orthanc saw a TLS association from the gateway's client certificate.
    assert!(
        orthanc.log_lines_with("TLS") > 0,
        "Orthanc's log does not mention TLS:\n{}",
        orthanc.logs()
    );
}

#[test]
fn tls_problems_upstream_keep_instances_queued_with_the_reason() {
    let t = TlsGateway::start();
    let mut gw = t.gw;
    gw.stop();
    let pacs_cert = t.pki.server("pacs", "pacs", &["localhost", "127.0.0.1"]);
    let expired_cert =
        t.pki
            .expired_server("pacs-expired", "pacs-expired", &["localhost", "127.0.0.1"]);
    let gw_client = t.pki.client("gateway-client", "DICOM_GW");
    let mut orthanc = Orthanc::new("127.0.0.1");
    orthanc_tls(&orthanc, &pacs_cert, &t.pki.ca_file());
    orthanc.start();
    let mut expired = Orthanc::new("127.0.0.1");
    orthanc_tls(&expired, &expired_cert, &t.pki.ca_file());
    expired.start();
    let client = format!(
        "certificate = \"{}\", private_key = \"{}\"",
        gw_client.cert.display(),
        gw_client.key.display()
    );
    let ca = t.pki.ca_file();
    let other = t.pki.other_ca_file();
    append_config(
        &gw,
        &[
            tls_dest(
                "wrong-ca",
                &orthanc,
                &format!("ca = \"{}\", {client}", other.display()),
            ),
            tls_dest(
                "wrong-name",
                &orthanc,
                &format!(
                    "ca = \"{}\", server_name = \"pacs.example.org\", {client}",
                    ca.display()
                ),
            ),
            tls_dest(
                "expired",
                &expired,
                &format!("ca = \"{}\", {client}", ca.display()),
            ),
            tls_dest(
                "no-client-cert",
                &orthanc,
                &format!("ca = \"{}\"", ca.display()),
            ),
        ]
        .concat(),
    );
    gw.restart();
    let t = TlsGateway { gw, ..t };
    let files = small_series(&t.gw, "queued", 2);
    common::orthanc::send_all(&t.gw, &files);

    for (name, words) in [
        ("wrong-ca", &["unknown issuer"][..]),
        ("wrong-name", &["name mismatch", "pacs.example.org"][..]),
        ("expired", &["PACS certificate expired on 2021-01-01"][..]),
        (
            "no-client-cert",
            &["aborted the TLS handshake", "client certificate"][..],
        ),
    ] {
        let err = wait_until(
            Duration::from_secs(30),
            || {
                format!(
                    "{name}: last_error should say {words:?}; status {:#}",
                    status(&t.gw)
                )
            },
            || last_error(&t.gw, name).filter(|e| words.iter().all(|w| e.contains(w))),
        );
        assert!(err.starts_with("TLS with PACS"), "{err}");
        eprintln!("[upstream {name}] last_error: {err}");
        let line = t.log_line(0, &[&format!("TLS with PACS {name} (")]);
        show(&format!("upstream {name}"), &line);
        let s = status(&t.gw);
        let d = dest_status(&s, name);
        assert_eq!(d["pending"], 2, "{name}: {d:#}");
        assert_eq!(d["delivered"], 0, "{name}: {d:#}");
        assert_eq!(d["failed"], 0, "{name}: {d:#}");
    }
    assert_eq!(orthanc.count(), 0);
    assert_eq!(expired.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Throughput: TLS vs plain ingest on the same data
// ---------------------------------------------------------------------------------------------

/// Not an assertion: prints the median of 3 storescu runs of 100 × 0.5 MB CT instances over the
/// plain and the TLS port of the same gateway (fresh UIDs each run, so every instance is
/// stored durably). Run with `--release` for numbers that mean something.
#[test]
fn tls_ingest_throughput_against_plain() {
    let t = TlsGateway::start();
    let mut results: Vec<(&str, f64)> = Vec::new();
    for (mode, tls) in [
        ("plain", false),
        ("tls", true),
        ("plain", false),
        ("tls", true),
        ("plain", false),
        ("tls", true),
    ] {
        let dir = t.gw.scratch(&format!("tp-{}", results.len()));
        let files = data::ct_series(&dir, "tp", 100, 512, 512);
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let scu = if tls {
            t.scu("storescu", Some(&t.mod_a)).calling("MOD_A")
        } else {
            t.gw.storescu()
        };
        let start = Instant::now();
        let out = scu.timeout(Duration::from_secs(600)).files(&files).run();
        let secs = start.elapsed().as_secs_f64();
        assert!(out.success(), "{}", out.describe());
        let mbps = bytes as f64 / secs / 1e6;
        results.push((mode, mbps));
        let _ = std::fs::remove_dir_all(&dir);
    }
    let median = |m: &str| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == m).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, tls) = (median("plain"), median("tls"));
    eprintln!(
        "[throughput] 100 x 0.5 MB CT via storescu, median of 3: plain {plain:.1} MB/s, TLS {tls:.1} MB/s, ratio TLS/plain {:.2} (runs: {results:?}; {} build of the gateway)",
        tls / plain,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
}
