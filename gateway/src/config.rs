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
}

#[derive(Clone, Debug)]
pub struct Listener {
    pub address: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct Modality {
    pub ae_title: AeTitle,
    pub hosts: Vec<IpNet>,
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Dangerous {
    /// Networks from which any calling AE title is accepted, registered or not.
    pub any_calling_ae_from: Vec<IpNet>,
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
    dangerous: RawDangerous,
    #[serde(default)]
    log: RawLog,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModality {
    ae_title: Spanned<String>,
    hosts: Spanned<Vec<Spanned<String>>>,
    description: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDangerous {
    #[serde(default)]
    any_calling_ae_from: Vec<Spanned<String>>,
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
            listen.push(Listener { address });
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
            modalities.push(Modality {
                ae_title,
                hosts,
                description: m.description.clone(),
            });
        }

        let dangerous = Dangerous {
            any_calling_ae_from: raw
                .dangerous
                .any_calling_ae_from
                .iter()
                .enumerate()
                .map(|(j, h)| self.net(h, &format!("dangerous.any_calling_ae_from[{j}]")))
                .collect::<Result<Vec<_>, _>>()?,
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
            dangerous,
            log: LogSettings { level },
            source: self.file.to_owned(),
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
