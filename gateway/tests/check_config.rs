//! `dicom-gateway check-config` (run from `ExecStartPre=`) and `run` with a bad file.
//!
//! Guards against: a typo silently falling back to a default (an unknown key must be an
//! error); an invalid AE title or network accepted and failing later at run time; error
//! messages that do not say which key is wrong; `run` starting with a config that
//! `check-config` would refuse; exit codes other than 0 (valid) and 1 (invalid).

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::{gateway_cli, GatewayConfig, Modality, ToolOutput};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

fn check(path: &Path) -> ToolOutput {
    gateway_cli([
        OsStr::new("check-config"),
        OsStr::new("--config"),
        path.as_os_str(),
    ])
}

/// Panics unless `check-config` exits 1 and its stderr contains every one of `needles`.
fn assert_invalid(dir: &Path, name: &str, text: &str, needles: &[&str]) {
    let path = write(dir, name, text);
    let out = check(&path);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{name} should be invalid (exit 1): {}",
        out.describe()
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "{name}: the error should mention {n:?}; stderr:\n{}",
            out.stderr
        );
    }
}

/// A valid config text for a data dir under `dir`.
fn valid(dir: &Path) -> String {
    GatewayConfig::default().to_toml(&dir.join("data"), common::free_port())
}

#[test]
fn valid_config_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = check(&write(dir.path(), "ok.toml", &valid(dir.path())));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());

    // Boundaries that are still valid: a 16-character AE title, a CIDR and an IPv6 host.
    let mut cfg = GatewayConfig::default();
    cfg.modalities.push(Modality::new(
        "ABCDEFGHIJKLMNOP",
        &["10.1.0.0/16", "::1", "fd00::/8"],
    ));
    let out = check(&write(
        dir.path(),
        "edge.toml",
        &cfg.to_toml(&dir.path().join("data"), 104),
    ));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = valid(dir.path());
    assert_invalid(
        dir.path(),
        "typo.toml",
        &base.replacen("[gateway]\n", "[gateway]\nmax_asociations = 4\n", 1),
        &["max_asociations"],
    );
    assert_invalid(
        dir.path(),
        "table.toml",
        &format!("{base}\n[forwarding_rules]\nenabled = true\n"),
        &["forwarding_rules"],
    );
}

#[test]
fn ae_title_longer_than_16_characters_names_the_modality() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = GatewayConfig::default();
    cfg.modalities[1].ae_title = "ABCDEFGHIJKLMNOPQ".into(); // 17 characters
    assert_invalid(
        dir.path(),
        "long-ae.toml",
        &cfg.to_toml(&dir.path().join("data"), 104),
        &["modality[1]", "ae_title"],
    );

    let cfg = GatewayConfig {
        ae_title: "GATEWAY_TITLE_TOO_LONG".into(),
        ..GatewayConfig::default()
    };
    assert_invalid(
        dir.path(),
        "long-gw-ae.toml",
        &cfg.to_toml(&dir.path().join("data"), 104),
        &["ae_title"],
    );
}

#[test]
fn bad_host_networks_are_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, bad) in ["10.0.0.0/33", "ct-room-1.example", "300.1.2.3"]
        .iter()
        .enumerate()
    {
        let mut cfg = GatewayConfig::default();
        cfg.modalities[2].hosts = vec!["127.0.0.1".into(), (*bad).into()];
        assert_invalid(
            dir.path(),
            &format!("bad-host-{i}.toml"),
            &cfg.to_toml(&dir.path().join("data"), 104),
            &["modality[2]", "hosts", bad],
        );
    }
    let cfg = GatewayConfig {
        any_calling_ae_from: vec!["127.0.0.0/99".into()],
        ..GatewayConfig::default()
    };
    assert_invalid(
        dir.path(),
        "bad-any.toml",
        &cfg.to_toml(&dir.path().join("data"), 104),
        &["any_calling_ae_from"],
    );
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let out = check(&missing);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("nope.toml"),
        "the error should name the file: {}",
        out.describe()
    );
}

#[test]
fn run_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "bad.toml",
        &valid(dir.path()).replacen("[gateway]\n", "[gateway]\nlisten_everywhere = true\n", 1),
    );
    let out = gateway_cli([OsStr::new("run"), OsStr::new("--config"), path.as_os_str()]);
    assert!(
        !out.success(),
        "run must not start with an invalid config: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("listen_everywhere"),
        "{}",
        out.describe()
    );
}
