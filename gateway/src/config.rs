//! Configuration: TOML parsed once into raw serde structs, validated once into the types the
//! rest of the gateway uses.
//!
//! Invariants after [`Config::load`] / [`Config::parse`] returned `Ok`:
//! - every AE title is 1..=16 characters of the Default Character Repertoire without backslash
//!   or control characters (PS3.5 section 6.2, VR AE), leading and trailing spaces removed;
//! - modality AE titles are unique, each with at least one allowed host network;
//! - every timeout and limit is non-zero.
//!
//! Unknown keys are errors. Every default is written next to its field and in
//! `config/gateway.example.toml`; a test keeps the two in step.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use snafu::{ResultExt, Snafu};
use toml::Spanned;

/// The configuration used by `dicom-gateway run` when no `--config` is given: a working gateway
/// for a first try, reachable from this machine only.
pub const EMBEDDED_DEFAULT: &str = r#"
[gateway]
ae_title = "DICOM_GW"
data_dir = "./gateway-data"

[[listen]]
address = "127.0.0.1:11112"

[dangerous]
any_calling_ae_from = ["127.0.0.0/8", "::1/128"]
allow_root = true
"#;

/// Where an error was found, for messages that name the file.
const EMBEDDED_NAME: &str = "<embedded default config>";

#[derive(Debug, Snafu)]
pub enum ConfigError {
    #[snafu(display("cannot read config file {}: {source}", path.display()))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[snafu(display("{file}: {message}"))]
    Syntax { file: String, message: String },
    #[snafu(display("{file}:{}{key}: {problem}", line.map(|l| format!("{l}: ")).unwrap_or_default()))]
    Invalid {
        file: String,
        line: Option<usize>,
        key: String,
        problem: String,
    },
}

/// A validated Application Entity title (PS3.5 section 6.2, VR AE): 1 to 16 characters, no
/// backslash, no control characters, not only spaces. Stored without padding spaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AeTitle(String);

impl AeTitle {
    /// Validates a title; the error says what is wrong and what is allowed.
    pub fn new(raw: &str) -> Result<Self, String> {
        let t = raw.trim_matches(' ');
        if t.is_empty() {
            return Err(format!(
                "'{raw}' is empty; an AE title has 1 to 16 characters"
            ));
        }
        let n = t.chars().count();
        if n > 16 {
            return Err(format!(
                "'{t}' is {n} characters; an AE title has at most 16"
            ));
        }
        if let Some(c) = t
            .chars()
            .find(|c| *c == '\\' || c.is_control() || !c.is_ascii())
        {
            return Err(format!(
                "'{t}' contains {c:?}; an AE title uses printable ASCII characters except backslash"
            ));
        }
        Ok(AeTitle(t.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub gateway: GatewaySettings,
    pub listen: Vec<Listener>,
    pub modalities: Vec<Modality>,
    pub destinations: Vec<Destination>,
    pub cache: Cache,
    /// Prometheus endpoint; `None` when disabled.
    pub metrics: Option<SocketAddr>,
    pub dangerous: Dangerous,
    pub log: LogSettings,
    /// The file this came from, or the embedded default's name; for messages.
    pub source: String,
}

#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub ae_title: AeTitle,
    pub data_dir: PathBuf,
    pub max_associations: NonZeroU32,
    pub max_pdu_length: u32,
    pub artim_timeout: Duration,
    pub idle_timeout: Duration,
    pub dimse_timeout: Duration,
    pub write_timeout: Duration,
    pub min_free_disk_bytes: u64,
    /// Segment files kept written in advance (docs/durability.md, "Spare segments").
    pub spare_segments: usize,
    /// The CLI's Unix socket to the daemon (mode 0660: owner and group).
    pub control_socket: PathBuf,
    /// When started as root: the user to switch to once the listeners are bound.
    pub run_as: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Listener {
    pub address: SocketAddr,
    /// DICOM TLS on this port; `None`: plain DICOM.
    pub tls: Option<ListenTls>,
}

/// `[[listen]] tls = { ... }`: the files of a TLS listener (absolute paths; read by
/// [`crate::tls`] at start and at every reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenTls {
    /// PEM certificate chain of the gateway, end-entity certificate first.
    pub certificate: PathBuf,
    /// PEM private key; must not be accessible by group or others.
    pub private_key: PathBuf,
    /// PEM bundle of the CAs that issue modality certificates. Always set when
    /// `require_client_certificate` is true.
    pub client_ca: Option<PathBuf>,
    /// Mutual TLS. Default true; false only with `[dangerous]
    /// allow_tls_without_client_certificate = true`.
    pub require_client_certificate: bool,
}

#[derive(Clone, Debug)]
pub struct Modality {
    pub ae_title: AeTitle,
    pub hosts: Vec<IpNet>,
    pub description: Option<String>,
    /// SHA-256 of the (DER) client certificate this AE title must present over TLS.
    pub certificate_sha256: Option<[u8; 32]>,
    /// Attributes the subject of its client certificate must contain.
    pub certificate_subject: Option<crate::tls::DistinguishedName>,
    /// Whether it may associate over a plain (non-TLS) listener. Default: true without a pin;
    /// a modality with a pin must use TLS (false, and true is refused).
    pub allow_plain: bool,
}

impl Modality {
    /// Whether a certificate pin is configured.
    pub fn has_pin(&self) -> bool {
        self.certificate_sha256.is_some() || self.certificate_subject.is_some()
    }
}

/// The local cache of delivered instances and when it is trimmed.
#[derive(Clone, Debug)]
pub struct Cache {
    /// Eviction starts when the data filesystem is this full (percent).
    pub high_watermark_percent: u8,
    /// ... and deletes whole delivered studies, oldest first, down to this.
    pub low_watermark_percent: u8,
    /// Delivered instances older than this are evicted whatever the disk use; `None`: kept.
    pub retention: Option<Duration>,
}

/// A PACS (or other Storage SCP) that receives everything routed to it.
#[derive(Clone, Debug)]
pub struct Destination {
    /// Short unique name used in the queue, logs and CLI: letters, digits, '-', '_'.
    pub name: String,
    /// The PACS's AE title (the called AE of our associations).
    pub ae_title: AeTitle,
    /// "host:port"; the host may be a name, resolved at each connection.
    pub address: String,
    /// The AE title the gateway uses as calling AE toward this PACS.
    pub calling_ae: AeTitle,
    /// Associations used in parallel while there is work.
    pub max_associations: u32,
    /// First retry delay after a failure; doubles up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Entries pending longer than this go to the failed queue; `None`: retry forever.
    pub give_up_after: Option<Duration>,
    /// Time allowed for TCP connect and association negotiation.
    pub connect_timeout: Duration,
    /// Time allowed for each C-STORE-RSP and for each write.
    pub dimse_timeout: Duration,
    /// An association without work is released after this long.
    pub idle_close: Duration,
    pub route: Route,
    /// DICOM TLS toward this PACS; `None`: plain DICOM.
    pub tls: Option<DestinationTls>,
}

/// `[[destination]] tls = { ... }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationTls {
    /// PEM bundle of the CAs trusted for the PACS certificate; `None`: the operating system's
    /// trust store.
    pub ca: Option<PathBuf>,
    /// The name the PACS certificate must carry (DNS name or IP address); default: the host
    /// part of `address`.
    pub server_name: String,
    /// Client certificate chain and key for mutual TLS; both or neither.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
}

/// Which instances go to a destination. Empty lists match everything; each non-empty list must
/// match.
#[derive(Clone, Debug, Default)]
pub struct Route {
    pub calling_ae: Vec<AeTitle>,
    pub modality: Vec<String>,
    pub sop_class: Vec<String>,
}

impl Route {
    pub fn matches(&self, calling_ae: &str, modality: &str, sop_class: &str) -> bool {
        (self.calling_ae.is_empty() || self.calling_ae.iter().any(|a| a.as_str() == calling_ae))
            && (self.modality.is_empty() || self.modality.iter().any(|m| m == modality))
            && (self.sop_class.is_empty() || self.sop_class.iter().any(|c| c == sop_class))
    }
}

impl Config {
    /// Names of the destinations an instance is routed to.
    pub fn route(&self, calling_ae: &str, modality: &str, sop_class: &str) -> Vec<String> {
        self.destinations
            .iter()
            .filter(|d| d.route.matches(calling_ae, modality, sop_class))
            .map(|d| d.name.clone())
            .collect()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Dangerous {
    /// Networks from which any calling AE title is accepted, registered or not.
    pub any_calling_ae_from: Vec<IpNet>,
    /// Allows `require_client_certificate = false` on TLS listeners.
    pub allow_tls_without_client_certificate: bool,
    /// Allows running as root without `gateway.run_as`.
    pub allow_root: bool,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub level: log::LevelFilter,
}

// ---- raw serde structs: the file's shape, nothing validated yet ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    listen: Vec<RawListen>,
    #[serde(default)]
    modality: Vec<RawModality>,
    #[serde(default)]
    destination: Vec<RawDestination>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    dangerous: RawDangerous,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// Default: "127.0.0.1:9102"; "" disables the endpoint.
    address: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    /// Default: 80.
    high_watermark_percent: Option<Spanned<u8>>,
    /// Default: 70.
    low_watermark_percent: Option<Spanned<u8>>,
    /// Default: 0 = keep until space is needed.
    retention_days: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    name: Spanned<String>,
    ae_title: Spanned<String>,
    address: Spanned<String>,
    /// Default: gateway.ae_title.
    calling_ae: Option<Spanned<String>>,
    /// Default: 2.
    max_associations: Option<Spanned<u32>>,
    /// Default: 5 s.
    retry_initial_secs: Option<Spanned<u64>>,
    /// Default: 300 s.
    retry_max_secs: Option<Spanned<u64>>,
    /// Default: 0 = never give up.
    give_up_after_hours: Option<u64>,
    /// Default: 10 s.
    connect_timeout_secs: Option<Spanned<u64>>,
    /// Default: 120 s.
    dimse_timeout_secs: Option<Spanned<u64>>,
    /// Default: 30 s.
    idle_close_secs: Option<Spanned<u64>>,
    #[serde(default)]
    route: RawRoute,
    tls: Option<RawDestinationTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestinationTls {
    /// Default: the operating system's trust store.
    ca: Option<Spanned<String>>,
    /// Default: the host of `address`.
    server_name: Option<Spanned<String>>,
    certificate: Option<Spanned<String>>,
    private_key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    calling_ae: Vec<Spanned<String>>,
    #[serde(default)]
    modality: Vec<String>,
    #[serde(default)]
    sop_class: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    ae_title: Spanned<String>,
    /// Default: `/var/lib/dicom-gateway`.
    data_dir: Option<PathBuf>,
    /// Default: 32.
    max_associations: Option<Spanned<u32>>,
    /// Default: 262144 bytes (256 KiB); allowed 16384..=16777216.
    max_pdu_length: Option<Spanned<u32>>,
    /// Default: 30 s.
    artim_timeout_secs: Option<Spanned<u64>>,
    /// Default: 120 s.
    idle_timeout_secs: Option<Spanned<u64>>,
    /// Default: 60 s.
    dimse_timeout_secs: Option<Spanned<u64>>,
    /// Default: 60 s.
    write_timeout_secs: Option<Spanned<u64>>,
    /// Default: 1024 MiB.
    min_free_disk_mb: Option<u64>,
    /// Default: 4.
    spare_segments: Option<Spanned<u32>>,
    /// Default: <data_dir>/control.sock.
    control_socket: Option<PathBuf>,
    /// Default: none.
    run_as: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Spanned<String>,
    tls: Option<Spanned<RawListenTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenTls {
    certificate: Spanned<String>,
    private_key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
    /// Default: true.
    require_client_certificate: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModality {
    ae_title: Spanned<String>,
    hosts: Spanned<Vec<Spanned<String>>>,
    description: Option<String>,
    certificate_sha256: Option<Spanned<String>>,
    certificate_subject: Option<Spanned<String>>,
    /// Default: true without a pin, false with one.
    allow_plain: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDangerous {
    #[serde(default)]
    any_calling_ae_from: Vec<Spanned<String>>,
    /// Default: false.
    #[serde(default)]
    allow_tls_without_client_certificate: bool,
    /// Default: false.
    #[serde(default)]
    allow_root: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// Default: "info".
    level: Option<Spanned<String>>,
}

pub const DEFAULT_DATA_DIR: &str = "/var/lib/dicom-gateway";
pub const DEFAULT_MAX_ASSOCIATIONS: u32 = 32;
pub const DEFAULT_MAX_PDU_LENGTH: u32 = 262_144;
pub const MIN_MAX_PDU_LENGTH: u32 = 16_384;
pub const MAX_MAX_PDU_LENGTH: u32 = 16_777_216;
pub const DEFAULT_ARTIM_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;
pub const DEFAULT_DIMSE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_WRITE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_MIN_FREE_DISK_MB: u64 = 1024;
/// 4 × 65 MiB: a CT series of ~250 MB is acknowledged without growing a file.
pub const DEFAULT_SPARE_SEGMENTS: u32 = 4;
pub const MAX_SPARE_SEGMENTS: u32 = 64;
/// One C-STORE per round trip per association (no asynchronous operations window): over 50 ms
/// RTT at 100 Mbit/s, 2 associations filled 54-58 % of the link, 4 filled 64-80 % and 8 filled
/// 72-83 % (docs/benchmarks.md). 4 is kept as a common PACS limit per calling AE.
pub const DEFAULT_DEST_MAX_ASSOCIATIONS: u32 = 4;
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9102";
pub const DEFAULT_HIGH_WATERMARK_PERCENT: u8 = 80;
pub const DEFAULT_LOW_WATERMARK_PERCENT: u8 = 70;
pub const DEFAULT_RETRY_INITIAL_SECS: u64 = 5;
pub const DEFAULT_RETRY_MAX_SECS: u64 = 300;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_UPSTREAM_DIMSE_TIMEOUT_SECS: u64 = 120;
pub const DEFAULT_IDLE_CLOSE_SECS: u64 = 30;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).context(ReadSnafu { path })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The embedded default configuration (see [`EMBEDDED_DEFAULT`]).
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, EMBEDDED_NAME)
            .unwrap_or_else(|e| unreachable!("the embedded default config is invalid: {e}"))
    }

    /// Parses and validates TOML text; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: syntax_message(text, &e),
        })?;
        Validator { text, file }.validate(raw)
    }

    /// Whether this config accepts any calling AE from somewhere (says so at start-up).
    pub fn accepts_any_calling_ae(&self) -> bool {
        !self.dangerous.any_calling_ae_from.is_empty()
    }
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
    match e.span() {
        Some(span) => format!("{}: {msg}", line_of(text, span.start)),
        None => msg,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.bytes().filter(|b| *b == b'\n').count())
        + 1
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        problem: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            file: self.file.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            key: key.to_owned(),
            problem,
        })
    }

    fn ae(&self, v: &Spanned<String>, key: &str) -> Result<AeTitle, ConfigError> {
        AeTitle::new(v.get_ref()).or_else(|p| self.err(Some(v.span()), key, p))
    }

    fn secs(
        &self,
        v: Option<&Spanned<u64>>,
        default: u64,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(s) if *s.get_ref() == 0 || *s.get_ref() > 86_400 => self.err(
                Some(s.span()),
                key,
                format!(
                    "{} is out of range; allowed 1 to 86400 seconds (default {default})",
                    s.get_ref()
                ),
            ),
            Some(s) => Ok(Duration::from_secs(*s.get_ref())),
        }
    }

    fn net(&self, v: &Spanned<String>, key: &str) -> Result<IpNet, ConfigError> {
        parse_net(v.get_ref()).or_else(|p| self.err(Some(v.span()), key, p))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let g = raw.gateway;
        let max_associations = match g.max_associations {
            None => NonZeroU32::new(DEFAULT_MAX_ASSOCIATIONS),
            Some(ref v) => NonZeroU32::new(*v.get_ref()).filter(|n| n.get() <= 10_000),
        };
        let Some(max_associations) = max_associations else {
            return self.err(
                g.max_associations.as_ref().map(Spanned::span),
                "gateway.max_associations",
                format!("allowed 1 to 10000 (default {DEFAULT_MAX_ASSOCIATIONS})"),
            );
        };
        let spare_segments = g
            .spare_segments
            .as_ref()
            .map_or(DEFAULT_SPARE_SEGMENTS, |v| *v.get_ref());
        if spare_segments > MAX_SPARE_SEGMENTS {
            return self.err(
                g.spare_segments.as_ref().map(Spanned::span),
                "gateway.spare_segments",
                format!(
                    "{spare_segments} is too many; allowed 0 (off) to {MAX_SPARE_SEGMENTS} (default {DEFAULT_SPARE_SEGMENTS}; each takes 65 MiB of disk)"
                ),
            );
        }
        let max_pdu_length = g
            .max_pdu_length
            .as_ref()
            .map_or(DEFAULT_MAX_PDU_LENGTH, |v| *v.get_ref());
        if !(MIN_MAX_PDU_LENGTH..=MAX_MAX_PDU_LENGTH).contains(&max_pdu_length) {
            return self.err(
                g.max_pdu_length.as_ref().map(Spanned::span),
                "gateway.max_pdu_length",
                format!(
                    "{max_pdu_length} is out of range; allowed {MIN_MAX_PDU_LENGTH} to {MAX_MAX_PDU_LENGTH} bytes (default {DEFAULT_MAX_PDU_LENGTH})"
                ),
            );
        }
        let data_dir = g
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return self.err(
                None,
                "gateway.data_dir",
                "is empty; give a directory on the spool disk".into(),
            );
        }
        let control_socket = g
            .control_socket
            .clone()
            .unwrap_or_else(|| data_dir.join("control.sock"));
        let gateway = GatewaySettings {
            ae_title: self.ae(&g.ae_title, "gateway.ae_title")?,
            data_dir,
            max_associations,
            max_pdu_length,
            artim_timeout: self.secs(
                g.artim_timeout_secs.as_ref(),
                DEFAULT_ARTIM_TIMEOUT_SECS,
                "gateway.artim_timeout_secs",
            )?,
            idle_timeout: self.secs(
                g.idle_timeout_secs.as_ref(),
                DEFAULT_IDLE_TIMEOUT_SECS,
                "gateway.idle_timeout_secs",
            )?,
            dimse_timeout: self.secs(
                g.dimse_timeout_secs.as_ref(),
                DEFAULT_DIMSE_TIMEOUT_SECS,
                "gateway.dimse_timeout_secs",
            )?,
            write_timeout: self.secs(
                g.write_timeout_secs.as_ref(),
                DEFAULT_WRITE_TIMEOUT_SECS,
                "gateway.write_timeout_secs",
            )?,
            min_free_disk_bytes: g
                .min_free_disk_mb
                .unwrap_or(DEFAULT_MIN_FREE_DISK_MB)
                .saturating_mul(1024 * 1024),
            spare_segments: spare_segments as usize,
            control_socket,
            run_as: g.run_as.clone().filter(|u| !u.is_empty()),
        };

        if raw.listen.is_empty() {
            return self.err(
                None,
                "listen",
                "no [[listen]] entry; add one, e.g. [[listen]] address = \"0.0.0.0:104\"".into(),
            );
        }
        let mut listen = Vec::new();
        let mut seen_addr = HashSet::new();
        for (i, l) in raw.listen.iter().enumerate() {
            let key = format!("listen[{i}].address");
            let address: SocketAddr = match l.address.get_ref().parse() {
                Ok(a) => a,
                Err(_) => {
                    return self.err(
                        Some(l.address.span()),
                        &key,
                        format!(
                            "'{}' is not an IP address and port; write e.g. \"0.0.0.0:104\" or \"[::]:11112\"",
                            l.address.get_ref()
                        ),
                    )
                }
            };
            if !seen_addr.insert(address) {
                return self.err(
                    Some(l.address.span()),
                    &key,
                    format!("{address} is listed twice"),
                );
            }
            let tls = match &l.tls {
                None => None,
                Some(t) => Some(self.listen_tls(
                    i,
                    address,
                    t,
                    raw.dangerous.allow_tls_without_client_certificate,
                )?),
            };
            listen.push(Listener { address, tls });
        }

        let mut modalities = Vec::new();
        let mut seen_ae = HashSet::new();
        for (i, m) in raw.modality.iter().enumerate() {
            let key = format!("modality[{i}]");
            let ae_title = self.ae(&m.ae_title, &format!("{key}.ae_title"))?;
            if !seen_ae.insert(ae_title.clone()) {
                return self.err(
                    Some(m.ae_title.span()),
                    &format!("{key}.ae_title"),
                    format!("'{ae_title}' is registered twice; give each modality one entry with all its hosts"),
                );
            }
            if m.hosts.get_ref().is_empty() {
                return self.err(
                    Some(m.hosts.span()),
                    &format!("{key}.hosts"),
                    "is empty; list the IP addresses or CIDR networks this modality connects from"
                        .into(),
                );
            }
            let hosts = m
                .hosts
                .get_ref()
                .iter()
                .enumerate()
                .map(|(j, h)| self.net(h, &format!("{key}.hosts[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let (certificate_sha256, certificate_subject, allow_plain) =
                self.modality_tls(&key, m)?;
            modalities.push(Modality {
                ae_title,
                hosts,
                description: m.description.clone(),
                certificate_sha256,
                certificate_subject,
                allow_plain,
            });
        }

        let mut destinations = Vec::new();
        let mut seen_dest = HashSet::new();
        for (i, d) in raw.destination.iter().enumerate() {
            destinations.push(self.destination(i, d, &gateway.ae_title, &mut seen_dest)?);
        }

        let high = raw
            .cache
            .high_watermark_percent
            .as_ref()
            .map_or(DEFAULT_HIGH_WATERMARK_PERCENT, |v| *v.get_ref());
        let low = raw
            .cache
            .low_watermark_percent
            .as_ref()
            .map_or(DEFAULT_LOW_WATERMARK_PERCENT, |v| *v.get_ref());
        if !(1..=99).contains(&high) || low >= high {
            return self.err(
                raw.cache.low_watermark_percent.as_ref().or(raw.cache.high_watermark_percent.as_ref()).map(Spanned::span),
                "cache.high_watermark_percent",
                format!("high {high} % and low {low} %: the high watermark must be 1 to 99 and above the low one (defaults 80 and 70)"),
            );
        }
        let cache = Cache {
            high_watermark_percent: high,
            low_watermark_percent: low,
            retention: raw
                .cache
                .retention_days
                .filter(|d| *d > 0)
                .map(|d| Duration::from_secs(d.saturating_mul(86_400))),
        };

        let metrics = match &raw.metrics.address {
            None => DEFAULT_METRICS_ADDRESS.parse().ok(),
            Some(a) if a.get_ref().is_empty() => None,
            Some(a) => match a.get_ref().parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    return self.err(
                        Some(a.span()),
                        "metrics.address",
                        format!(
                            "'{}' is not an IP address and port; write e.g. \"127.0.0.1:9102\", or \"\" to disable",
                            a.get_ref()
                        ),
                    )
                }
            },
        };

        let dangerous = Dangerous {
            any_calling_ae_from: raw
                .dangerous
                .any_calling_ae_from
                .iter()
                .enumerate()
                .map(|(j, h)| self.net(h, &format!("dangerous.any_calling_ae_from[{j}]")))
                .collect::<Result<Vec<_>, _>>()?,
            allow_tls_without_client_certificate: raw
                .dangerous
                .allow_tls_without_client_certificate,
            allow_root: raw.dangerous.allow_root,
        };

        let level = match raw.log.level {
            None => log::LevelFilter::Info,
            Some(ref l) => match l.get_ref().parse() {
                Ok(level) => level,
                Err(_) => {
                    return self.err(
                        Some(l.span()),
                        "log.level",
                        format!(
                            "'{}' is not a level; allowed: error, warn, info, debug, trace (default info)",
                            l.get_ref()
                        ),
                    )
                }
            },
        };

        Ok(Config {
            gateway,
            listen,
            modalities,
            destinations,
            cache,
            metrics,
            dangerous,
            log: LogSettings { level },
            source: self.file.to_owned(),
        })
    }
}

impl Validator<'_> {
    fn destination(
        &self,
        i: usize,
        d: &RawDestination,
        gateway_ae: &AeTitle,
        seen: &mut HashSet<String>,
    ) -> Result<Destination, ConfigError> {
        let key = format!("destination[{i}]");
        let name = d.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return self.err(
                Some(d.name.span()),
                &format!("{key}.name"),
                format!("'{name}' is not a valid name; use 1 to 32 letters, digits, '-' or '_'"),
            );
        }
        if !seen.insert(name.clone()) {
            return self.err(
                Some(d.name.span()),
                &format!("{key}.name"),
                format!("'{name}' is used twice"),
            );
        }
        let address = d.address.get_ref().clone();
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return self.err(
                Some(d.address.span()),
                &format!("{key}.address"),
                format!("'{address}' is not host:port; write e.g. \"pacs.example.org:104\" or \"10.0.0.5:11112\""),
            );
        }
        let max_associations = match &d.max_associations {
            None => DEFAULT_DEST_MAX_ASSOCIATIONS,
            Some(v) if (1..=16).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return self.err(
                    Some(v.span()),
                    &format!("{key}.max_associations"),
                    format!(
                    "{} is out of range; allowed 1 to 16 (default {DEFAULT_DEST_MAX_ASSOCIATIONS})",
                    v.get_ref()
                ),
                )
            }
        };
        let retry_initial = self.secs(
            d.retry_initial_secs.as_ref(),
            DEFAULT_RETRY_INITIAL_SECS,
            &format!("{key}.retry_initial_secs"),
        )?;
        let retry_max = self.secs(
            d.retry_max_secs.as_ref(),
            DEFAULT_RETRY_MAX_SECS,
            &format!("{key}.retry_max_secs"),
        )?;
        if retry_max < retry_initial {
            return self.err(
                d.retry_max_secs.as_ref().map(Spanned::span),
                &format!("{key}.retry_max_secs"),
                "is smaller than retry_initial_secs".into(),
            );
        }
        let route = Route {
            calling_ae: d
                .route
                .calling_ae
                .iter()
                .enumerate()
                .map(|(j, a)| self.ae(a, &format!("{key}.route.calling_ae[{j}]")))
                .collect::<Result<_, _>>()?,
            modality: d
                .route
                .modality
                .iter()
                .map(|m| m.trim().to_owned())
                .collect(),
            sop_class: d
                .route
                .sop_class
                .iter()
                .enumerate()
                .map(|(j, c)| match crate::uid::validate(c.get_ref()) {
                    Some(u) => Ok(u.to_owned()),
                    None => self.err(
                        Some(c.span()),
                        &format!("{key}.route.sop_class[{j}]"),
                        format!("'{}' is not a UID", c.get_ref()),
                    ),
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Destination {
            name,
            ae_title: self.ae(&d.ae_title, &format!("{key}.ae_title"))?,
            address,
            calling_ae: match &d.calling_ae {
                Some(a) => self.ae(a, &format!("{key}.calling_ae"))?,
                None => gateway_ae.clone(),
            },
            max_associations,
            retry_initial,
            retry_max,
            give_up_after: d
                .give_up_after_hours
                .filter(|h| *h > 0)
                .map(|h| Duration::from_secs(h.saturating_mul(3600))),
            connect_timeout: self.secs(
                d.connect_timeout_secs.as_ref(),
                DEFAULT_CONNECT_TIMEOUT_SECS,
                &format!("{key}.connect_timeout_secs"),
            )?,
            dimse_timeout: self.secs(
                d.dimse_timeout_secs.as_ref(),
                DEFAULT_UPSTREAM_DIMSE_TIMEOUT_SECS,
                &format!("{key}.dimse_timeout_secs"),
            )?,
            idle_close: self.secs(
                d.idle_close_secs.as_ref(),
                DEFAULT_IDLE_CLOSE_SECS,
                &format!("{key}.idle_close_secs"),
            )?,
            route,
            tls: match &d.tls {
                None => None,
                Some(t) => Some(self.destination_tls(&key, d.address.get_ref(), t)?),
            },
        })
    }
}

/// Validation of the TLS keys (`tls` of `[[listen]]` and `[[destination]]`, the pins of
/// `[[modality]]`). Files are only named here; [`crate::tls`] reads them.
impl Validator<'_> {
    /// An absolute path (a service's working directory is `/`, so a relative one would be a
    /// trap).
    fn abs_path(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(v.get_ref());
        if v.get_ref().is_empty() || !p.is_absolute() {
            return self.err(
                Some(v.span()),
                key,
                format!(
                    "'{}' is not an absolute path; write e.g. \"/etc/dicom-gateway/tls/gateway.crt\"",
                    v.get_ref()
                ),
            );
        }
        Ok(p)
    }

    fn listen_tls(
        &self,
        i: usize,
        address: SocketAddr,
        t: &Spanned<RawListenTls>,
        allow_without_client_cert: bool,
    ) -> Result<ListenTls, ConfigError> {
        let key = format!("listen[{i}].tls");
        if address.port() == 0 {
            return self.err(
                Some(t.span()),
                &key,
                "a TLS listener needs a fixed port (not 0); 2762 is the registered DICOM TLS port"
                    .into(),
            );
        }
        let raw = t.get_ref();
        let require = raw
            .require_client_certificate
            .as_ref()
            .is_none_or(|r| *r.get_ref());
        if !require && !allow_without_client_cert {
            return self.err(
                raw.require_client_certificate.as_ref().map(Spanned::span),
                &format!("{key}.require_client_certificate"),
                "false needs [dangerous] allow_tls_without_client_certificate = true: without client certificates, any host in a modality's hosts that knows its AE title can store over this port".into(),
            );
        }
        let client_ca = match &raw.client_ca {
            Some(c) => Some(self.abs_path(c, &format!("{key}.client_ca"))?),
            None if require => {
                return self.err(
                    Some(t.span()),
                    &format!("{key}.client_ca"),
                    "is missing: client certificates are required (the default), so give the PEM bundle of the CA(s) that issue the modalities' certificates".into(),
                )
            }
            None => None,
        };
        Ok(ListenTls {
            certificate: self.abs_path(&raw.certificate, &format!("{key}.certificate"))?,
            private_key: self.abs_path(&raw.private_key, &format!("{key}.private_key"))?,
            client_ca,
            require_client_certificate: require,
        })
    }

    /// (certificate_sha256, certificate_subject, allow_plain) of a `[[modality]]`.
    #[allow(clippy::type_complexity)]
    fn modality_tls(
        &self,
        key: &str,
        m: &RawModality,
    ) -> Result<
        (
            Option<[u8; 32]>,
            Option<crate::tls::DistinguishedName>,
            bool,
        ),
        ConfigError,
    > {
        let sha =
            match &m.certificate_sha256 {
                None => None,
                Some(v) => Some(crate::tls::parse_sha256(v.get_ref()).or_else(|p| {
                    self.err(Some(v.span()), &format!("{key}.certificate_sha256"), p)
                })?),
            };
        let subject =
            match &m.certificate_subject {
                None => None,
                Some(v) => Some(crate::tls::DistinguishedName::parse(v.get_ref()).or_else(
                    |p| self.err(Some(v.span()), &format!("{key}.certificate_subject"), p),
                )?),
            };
        let pinned = sha.is_some() || subject.is_some();
        let allow_plain = match &m.allow_plain {
            None => !pinned,
            Some(v) if *v.get_ref() && pinned => {
                return self.err(
                    Some(v.span()),
                    &format!("{key}.allow_plain"),
                    "true is not allowed with a certificate pin: a pinned modality must use DICOM TLS (remove allow_plain or the pin)".into(),
                )
            }
            Some(v) => *v.get_ref(),
        };
        Ok((sha, subject, allow_plain))
    }

    fn destination_tls(
        &self,
        key: &str,
        address: &str,
        t: &RawDestinationTls,
    ) -> Result<DestinationTls, ConfigError> {
        let key = format!("{key}.tls");
        let server_name = match &t.server_name {
            Some(n) => {
                if crate::tls::server_name(n.get_ref()).is_none() {
                    return self.err(
                        Some(n.span()),
                        &format!("{key}.server_name"),
                        format!(
                            "'{}' is not a DNS name or IP address; write the name in the PACS certificate, e.g. \"pacs.example.org\"",
                            n.get_ref()
                        ),
                    );
                }
                n.get_ref().clone()
            }
            None => {
                // `address` was checked to be host:port; IPv6 hosts are in brackets.
                let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if crate::tls::server_name(host).is_none() {
                    return self.err(
                        None,
                        &format!("{key}.server_name"),
                        format!("the host '{host}' of the address cannot be checked against a certificate; set server_name to the name in the PACS certificate"),
                    );
                }
                host.to_owned()
            }
        };
        let certificate = t
            .certificate
            .as_ref()
            .map(|c| self.abs_path(c, &format!("{key}.certificate")))
            .transpose()?;
        let private_key = t
            .private_key
            .as_ref()
            .map(|c| self.abs_path(c, &format!("{key}.private_key")))
            .transpose()?;
        if certificate.is_some() != private_key.is_some() {
            return self.err(
                None,
                &format!("{key}.certificate"),
                "certificate and private_key go together (mutual TLS): give both or neither".into(),
            );
        }
        Ok(DestinationTls {
            ca: t
                .ca
                .as_ref()
                .map(|c| self.abs_path(c, &format!("{key}.ca")))
                .transpose()?,
            server_name,
            certificate,
            private_key,
        })
    }
}

/// Parses "10.1.2.3", "10.1.2.0/24", "::1" or "fd00::/8".
fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "'{s}' is not an IP address or CIDR network; write e.g. \"10.20.30.40\" or \"10.20.30.0/24\" (host names are not accepted)"
    ))
}

#[cfg(test)]
mod tests;
