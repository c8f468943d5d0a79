//! The configuration a test gives the gateway: what it may change, the defaults it starts
//! from, and the TOML written for the daemon; and the rows `instances --json` prints.

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

use super::GATEWAY_AE;

/// A modality registry entry.
#[derive(Clone, Debug)]
pub struct Modality {
    pub ae_title: String,
    pub hosts: Vec<String>,
}

impl Modality {
    pub fn new(ae_title: &str, hosts: &[&str]) -> Modality {
        Modality {
            ae_title: ae_title.to_owned(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        }
    }
}

/// The settings a test may change; `None` leaves the gateway's default.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub ae_title: String,
    pub max_associations: Option<u32>,
    pub max_pdu_length: Option<u32>,
    pub artim_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub dimse_timeout_secs: Option<u64>,
    /// Small by default so the suite runs on a nearly full disk.
    pub min_free_disk_mb: u64,
    /// `gateway.spare_segments`; 0 here (the product default, 4, would make every test
    /// gateway write 260 MiB of spares before READY); the crash test uses them.
    pub spare_segments: u32,
    pub modalities: Vec<Modality>,
    pub any_calling_ae_from: Vec<String>,
    /// `[metrics] address`; empty (the test default) disables the endpoint, so parallel
    /// tests do not compete for one port.
    pub metrics_address: String,
    /// `gateway.run_as`: the user a root-started daemon switches to.
    pub run_as: Option<String>,
}

impl Default for GatewayConfig {
    /// Registers the DCMTK defaults (`STORESCU`, `ECHOSCU`), `CT01` and the raw client `RAW`,
    /// all from 127.0.0.1.
    fn default() -> GatewayConfig {
        GatewayConfig {
            ae_title: GATEWAY_AE.to_owned(),
            max_associations: None,
            max_pdu_length: None,
            artim_timeout_secs: None,
            idle_timeout_secs: None,
            dimse_timeout_secs: None,
            min_free_disk_mb: 16,
            spare_segments: 0,
            modalities: vec![
                Modality::new("STORESCU", &["127.0.0.1"]),
                Modality::new("ECHOSCU", &["127.0.0.1"]),
                Modality::new("CT01", &["127.0.0.1/32"]),
                Modality::new("RAW", &["127.0.0.0/8"]),
            ],
            any_calling_ae_from: Vec::new(),
            metrics_address: String::new(),
            run_as: None,
        }
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn toml_list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ")
    )
}

impl GatewayConfig {
    /// The config file text for this data dir and port.
    pub fn to_toml(&self, data_dir: &Path, port: u16) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "[gateway]");
        let _ = writeln!(t, "ae_title = {}", toml_str(&self.ae_title));
        let _ = writeln!(t, "data_dir = {}", toml_str(&data_dir.to_string_lossy()));
        let opt = |t: &mut String, k: &str, v: Option<u64>| {
            if let Some(v) = v {
                let _ = writeln!(t, "{k} = {v}");
            }
        };
        opt(
            &mut t,
            "max_associations",
            self.max_associations.map(u64::from),
        );
        opt(&mut t, "max_pdu_length", self.max_pdu_length.map(u64::from));
        opt(&mut t, "artim_timeout_secs", self.artim_timeout_secs);
        opt(&mut t, "idle_timeout_secs", self.idle_timeout_secs);
        opt(&mut t, "dimse_timeout_secs", self.dimse_timeout_secs);
        let _ = writeln!(t, "min_free_disk_mb = {}", self.min_free_disk_mb);
        let _ = writeln!(t, "spare_segments = {}", self.spare_segments);
        if let Some(u) = &self.run_as {
            let _ = writeln!(t, "run_as = {}", toml_str(u));
        }
        let _ = writeln!(t, "\n[[listen]]\naddress = \"127.0.0.1:{port}\"");
        for m in &self.modalities {
            let _ = writeln!(
                t,
                "\n[[modality]]\nae_title = {}\nhosts = {}\ndescription = \"test peer\"",
                toml_str(&m.ae_title),
                toml_list(&m.hosts)
            );
        }
        let _ = writeln!(
            t,
            "\n[metrics]\naddress = {}",
            toml_str(&self.metrics_address)
        );
        let _ = writeln!(
            t,
            // The suite runs as root (CI); the daemon refuses root unless told.
            "\n[dangerous]\nany_calling_ae_from = {}\nallow_root = true",
            toml_list(&self.any_calling_ae_from)
        );
        t
    }
}

/// One row of `dicom-gateway instances --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct InstanceJson {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub transfer_syntax: String,
    pub size: u64,
    pub checksum: String,
    pub calling_ae: String,
    /// Segment id and record offset (`segments/<id>.seg`).
    pub segment: u64,
    pub offset: u64,
}
