//! DICOM TLS (PS3.15 Annex B, secure transport connection profiles; the upper layer of PS3.8
//! runs over it unchanged) for both sides of the gateway, with rustls.
//!
//! Profile: the **BCP195 RFC 8996 TLS Secure Transport Connection Profile** of PS3.15 Annex B:
//! TLS 1.2 and 1.3 only (no fallback to older versions, RFC 8996), and only these suites
//! ([`cipher_suites`]): TLS 1.3 AES-256-GCM, AES-128-GCM and CHACHA20-POLY1305; TLS 1.2
//! ECDHE with RSA or ECDSA and AES-128-GCM or AES-256-GCM. The provider's other suites (the TLS
//! 1.2 CHACHA20-POLY1305 ones of the "Modified" profile) are removed explicitly, so the list does
//! not change when rustls adds suites.
//!
//! - Listener side ([`server_config`], [`ListenerTls`]): certificate chain and key of the
//!   gateway, client certificates verified against `client_ca` (WebPKI path validation, names
//!   not checked: a modality is identified by its AE title, its host and optionally a pin on its
//!   certificate, see [`PeerCertificate`] and `association::negotiate`). A [`ListenerTls`] is
//!   what an accept loop holds; a reload swaps the configuration inside it, so new handshakes
//!   use the new certificate while sessions in progress keep theirs.
//! - Upstream side ([`client_config`]): the PACS certificate is verified against `tls.ca` or
//!   the operating system's trust store, with the server name checked; optionally a client
//!   certificate for mutual TLS.
//! - Private keys must not be accessible by group or others ([`load_key`]); the gateway refuses
//!   to start, or to reload, with one that is.
//! - A certificate that is expired or not yet valid is refused at load and at reload: a reload
//!   with a broken certificate keeps the one in service (see [`prepare_listeners`]).
//!
//! Key material is never logged; certificate subjects and SHA-256 fingerprints are.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::{ring as provider_ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig,
    SupportedCipherSuite, SupportedProtocolVersion,
};
use snafu::Snafu;

use crate::config::{Config, DestinationTls, ListenTls};

/// The name of the profile, as PS3.15 Annex B calls it.
pub const PROFILE: &str = "BCP195 RFC 8996 TLS Secure Transport Connection Profile";

/// TLS 1.3 first; nothing below 1.2 (RFC 8996).
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The suites of [`PROFILE`], in order of preference.
pub fn cipher_suites() -> Vec<SupportedCipherSuite> {
    use provider_ring::cipher_suite as cs;
    vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ]
}

/// The IANA names of [`cipher_suites`] with their TLS version, for the conformance statement.
pub fn cipher_suite_names() -> Vec<(String, &'static str)> {
    cipher_suites()
        .iter()
        .map(|s| {
            let name = format!("{:?}", s.suite());
            match name.strip_prefix("TLS13_") {
                Some(rest) => (format!("TLS_{rest}"), "TLS 1.3"),
                None => (name, "TLS 1.2"),
            }
        })
        .collect()
}

/// The ring provider restricted to [`cipher_suites`]; key exchange groups stay ring's
/// (X25519, secp256r1, secp384r1), all acceptable to BCP 195 (RFC 9325 section 4.2.1).
fn provider() -> Arc<CryptoProvider> {
    let mut p = provider_ring::default_provider();
    p.cipher_suites = cipher_suites();
    Arc::new(p)
}

#[derive(Debug, Snafu)]
#[snafu(visibility(pub(crate)))]
pub enum TlsError {
    #[snafu(display("cannot read {what} {}: {source}", path.display()))]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[snafu(display("{what} {}: {problem}", path.display()))]
    Pem {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[snafu(display(
        "private key {} is accessible by group or others (mode {mode:04o}); the gateway refuses to use it: run `chmod 600 {}` (and make the service user its owner)",
        path.display(),
        path.display()
    ))]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[snafu(display("certificate {} {problem}", path.display()))]
    Validity { path: PathBuf, problem: String },
    #[snafu(display(
        "private key {} does not belong to certificate {}: {problem}",
        key.display(),
        certificate.display()
    ))]
    KeyMismatch {
        key: PathBuf,
        certificate: PathBuf,
        problem: String,
    },
    #[snafu(display("client CA bundle {}: {problem}", path.display()))]
    ClientCa { path: PathBuf, problem: String },
    #[snafu(display("no trusted CA certificates in the operating system's trust store ({problem}); set destination.tls.ca to the CA bundle that issued the PACS certificate"))]
    SystemRoots { problem: String },
    #[snafu(display("cannot build the TLS configuration: {source}"))]
    Build { source: rustls::Error },
    #[snafu(display("TLS listener {address}: {source}"))]
    Listener {
        address: SocketAddr,
        source: Box<TlsError>,
    },
    #[snafu(display("destination {name}: {source}"))]
    Destination { name: String, source: Box<TlsError> },
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    Ok(v)
}

/// Every certificate in a PEM file, in file order (a chain: end entity first).
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            problem: format!("not valid PEM: {}", pem_problem(&e)),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            problem: "holds no \"-----BEGIN CERTIFICATE-----\" block".into(),
        });
    }
    Ok(certs)
}

/// A PEM parse error in words (the library's names raw bytes).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "a section has no \"-----END {}-----\" line (truncated file?)",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => format!(
            "bad section start line \"{}\"",
            String::from_utf8_lossy(line).trim()
        ),
        E::Base64Decode(m) => format!("bad base64 ({m})"),
        E::NoItemsFound => "no key found (expected \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")".into(),
        other => other.to_string(),
    }
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). The permission check uses the metadata of
/// the file as opened, so the file checked is the file read.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_err = |source| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mode = f.metadata().map_err(read_err)?.mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    let mut pem = Vec::new();
    f.read_to_end(&mut pem).map_err(read_err)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        problem: format!("no usable PEM private key ({})", pem_problem(&e)),
    })
}

/// A certificate that expires sooner than this is loaded with a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// Refuses a certificate outside its validity period (a reload must not put an expired
/// certificate in service).
/// `warn`: log a warning if it expires within [`EXPIRY_WARNING_DAYS`] (at start and reload,
/// not for every connection).
fn check_validity(cert: &CertificateDer<'_>, path: &Path, warn: bool) -> Result<(), TlsError> {
    let info = PeerCertificate::from_der(cert);
    let now = unix_now();
    let problem = match (info.not_before, info.not_after) {
        (_, Some(na)) if na < now => format!("expired on {}", format_unix(na)),
        (Some(nb), _) if nb > now => format!(
            "is not valid before {} (check this gateway's clock)",
            format_unix(nb)
        ),
        (None, _) | (_, None) => "cannot be parsed as an X.509 certificate".into(),
        (_, Some(na)) => {
            let days = (na - now) / 86_400;
            if warn && days < EXPIRY_WARNING_DAYS {
                log::warn!(
                    certificate:% = path.display(), subject:% = info.subject, not_after:% = format_unix(na);
                    "certificate expires in {days} day(s): renew it, then reload (SIGHUP)"
                );
            }
            return Ok(());
        }
    };
    Err(TlsError::Validity {
        path: path.to_owned(),
        problem,
    })
}

fn root_store(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let certs = load_certs(what, path)?;
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            problem: format!("none of its {ignored} certificate(s) can be used as a trust anchor"),
        });
    }
    Ok(roots)
}

// ---------------------------------------------------------------------------------------------
// Listener side
// ---------------------------------------------------------------------------------------------

/// Builds the rustls configuration of a TLS listener from its files.
pub fn server_config(cfg: &ListenTls) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs("certificate", &cfg.certificate)?;
    if let Some(leaf) = chain.first() {
        check_validity(leaf, &cfg.certificate, true)?;
    }
    let key = load_key(&cfg.private_key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Build { source })?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let roots = root_store(ca, "client CA bundle")?;
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !cfg.require_client_certificate {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| TlsError::ClientCa {
                path: ca.clone(),
                problem: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        // Config validation allows no client_ca only with client certificates not required.
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            key: cfg.private_key.clone(),
            certificate: cfg.certificate.clone(),
            problem: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// What an accept loop holds: plain DICOM (`None`) or the TLS configuration in service. A
/// reload replaces the value; connections accepted later use the new one.
#[derive(Clone, Default)]
pub struct ListenerTls(Arc<RwLock<Option<Arc<ServerConfig>>>>);

impl ListenerTls {
    pub fn new(config: Option<Arc<ServerConfig>>) -> Self {
        ListenerTls(Arc::new(RwLock::new(config)))
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Option<Arc<ServerConfig>> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, config: Option<Arc<ServerConfig>>) {
        match self.0.write() {
            Ok(mut g) => *g = config,
            Err(p) => *p.into_inner() = config,
        }
    }
}

/// The TLS state of every listening address, shared by the accept loops and reload.
#[derive(Clone, Default)]
pub struct Listeners(Arc<RwLock<HashMap<SocketAddr, ListenerTls>>>);

/// TLS configurations loaded from the files of a [`Config`], not yet in service.
pub struct Prepared(HashMap<SocketAddr, Option<Arc<ServerConfig>>>);

/// Loads the TLS material of every `[[listen]]` entry of `config`. Nothing is put in service:
/// the caller applies the result with [`Listeners::apply`] only if every listener loaded, so a
/// broken file leaves every listener as it was.
pub fn prepare_listeners(config: &Config) -> Result<Prepared, TlsError> {
    let mut out = HashMap::new();
    for l in &config.listen {
        let tls = match &l.tls {
            None => None,
            Some(t) => Some(server_config(t).map_err(|e| TlsError::Listener {
                address: l.address,
                source: Box::new(e),
            })?),
        };
        out.insert(l.address, tls);
    }
    Ok(Prepared(out))
}

impl Listeners {
    /// Loads `config`'s listeners (start-up: an error refuses to start).
    pub fn load(config: &Config) -> Result<Listeners, TlsError> {
        let l = Listeners::default();
        l.apply(prepare_listeners(config)?);
        Ok(l)
    }

    /// The holder for a listening address (plain if the configuration has no TLS for it).
    /// Invariant: `address` is a configured `[[listen]]` address, as `bind` binds exactly those
    /// (config validation refuses port 0 on TLS listeners, so the bound address is the
    /// configured one); a socket from elsewhere would be served plain.
    pub fn for_address(&self, address: SocketAddr) -> ListenerTls {
        let mut map = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry(address).or_default().clone()
    }

    /// Puts prepared configurations in service; returns the TLS listeners reloaded.
    pub fn apply(&self, prepared: Prepared) -> Vec<SocketAddr> {
        let mut map = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut tls = Vec::new();
        for (address, config) in prepared.0 {
            if config.is_some() {
                tls.push(address);
            }
            map.entry(address).or_default().set(config);
        }
        tls.sort();
        tls
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream side
// ---------------------------------------------------------------------------------------------

/// Builds the rustls client configuration of a destination from its files (read at every
/// connection, so a rotated client certificate or CA bundle applies to the next association).
pub fn client_config(cfg: &DestinationTls) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(cfg, false)
}

fn build_client_config(cfg: &DestinationTls, warn: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &cfg.ca {
        Some(ca) => root_store(ca, "CA bundle")?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Build { source })?
        .with_root_certificates(roots);
    let config = match (&cfg.certificate, &cfg.private_key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs("certificate", cert)?;
            if let Some(leaf) = chain.first() {
                check_validity(leaf, cert, warn)?;
            }
            let k = load_key(key)?;
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| TlsError::KeyMismatch {
                    key: key.clone(),
                    certificate: cert.clone(),
                    problem: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The operating system's trust store (rustls-native-certs: on Linux the bundle that
/// `update-ca-certificates` maintains, or `SSL_CERT_FILE`).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let problem = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(TlsError::SystemRoots { problem });
    }
    Ok(roots)
}

/// Loads the TLS material of every destination (start-up check: a broken file refuses to
/// start instead of failing at the first forward).
pub fn check_destinations(config: &Config) -> Result<(), TlsError> {
    for d in &config.destinations {
        if let Some(t) = &d.tls {
            build_client_config(t, true).map_err(|e| TlsError::Destination {
                name: d.name.clone(),
                source: Box::new(e),
            })?;
        }
    }
    Ok(())
}

/// Every TLS file of `config` (listeners and destinations), for `check-config`.
pub fn check_config(config: &Config) -> Result<(), TlsError> {
    prepare_listeners(config)?;
    check_destinations(config)
}

/// The server name a destination's certificate must carry.
pub fn server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).ok()
}

// ---------------------------------------------------------------------------------------------
// Peer identity
// ---------------------------------------------------------------------------------------------

/// A distinguished name as a list of (attribute type, value), in certificate order. Types are
/// upper-case short names (CN, O, OU, C, L, ST, DC, UID, SERIALNUMBER, EMAILADDRESS) or dotted
/// OIDs for others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DistinguishedName(pub Vec<(String, String)>);

impl DistinguishedName {
    /// Parses a subject as people copy it: `CN=CT01, O=Hospital` (RFC 4514), `CN = CT01, O =
    /// Hospital` (`openssl x509 -subject`) or `/O=Hospital/CN=CT01` (OpenSSL's old form).
    /// `\,` escapes a comma in a value; `+` separates attributes of one RDN like `,`.
    pub fn parse(text: &str) -> Result<DistinguishedName, String> {
        let t = text.trim();
        let t = t.strip_prefix("subject=").unwrap_or(t).trim();
        let parts: Vec<String> = if let Some(rest) = t.strip_prefix('/') {
            rest.split('/').map(str::to_owned).collect()
        } else {
            let mut parts = Vec::new();
            let mut cur = String::new();
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            cur.push(n);
                        }
                    }
                    ',' | '+' => parts.push(std::mem::take(&mut cur)),
                    _ => cur.push(c),
                }
            }
            parts.push(cur);
            parts
        };
        let mut out = Vec::new();
        for p in parts {
            let Some((ty, value)) = p.split_once('=') else {
                return Err(format!(
                    "'{}' is not TYPE=VALUE; write e.g. \"CN=CT01, O=Hospital\"",
                    p.trim()
                ));
            };
            let (ty, value) = (normalize_type(ty.trim()), value.trim());
            if ty.is_empty() || value.is_empty() {
                return Err(format!(
                    "'{}' has an empty type or value; write e.g. \"CN=CT01\"",
                    p.trim()
                ));
            }
            out.push((ty, value.to_owned()));
        }
        if out.is_empty() {
            return Err("is empty; write e.g. \"CN=CT01, O=Hospital\"".into());
        }
        Ok(DistinguishedName(out))
    }

    /// Whether every attribute of `pin` is in this name with the same value (order and other
    /// attributes do not matter; values compare exactly).
    pub fn contains_all(&self, pin: &DistinguishedName) -> bool {
        pin.0.iter().all(|a| self.0.contains(a))
    }
}

impl fmt::Display for DistinguishedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (t, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{t}={}", v.replace(',', "\\,"))?;
        }
        Ok(())
    }
}

fn normalize_type(t: &str) -> String {
    let up = t.to_ascii_uppercase();
    match up.as_str() {
        "E" | "EMAIL" | "EMAILADDRESS" | "1.2.840.113549.1.9.1" => "EMAILADDRESS".into(),
        "S" | "ST" | "STATEORPROVINCENAME" | "2.5.4.8" => "ST".into(),
        "CN" | "COMMONNAME" | "2.5.4.3" => "CN".into(),
        "O" | "ORGANIZATIONNAME" | "2.5.4.10" => "O".into(),
        "OU" | "ORGANIZATIONALUNITNAME" | "2.5.4.11" => "OU".into(),
        "C" | "COUNTRYNAME" | "2.5.4.6" => "C".into(),
        "L" | "LOCALITYNAME" | "2.5.4.7" => "L".into(),
        "SERIALNUMBER" | "2.5.4.5" => "SERIALNUMBER".into(),
        "DC" | "DOMAINCOMPONENT" | "0.9.2342.19200300.100.1.25" => "DC".into(),
        "UID" | "USERID" | "0.9.2342.19200300.100.1.1" => "UID".into(),
        _ => up,
    }
}

/// What the gateway knows about a verified peer certificate (the end-entity one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    /// SHA-256 of the DER encoding (what `openssl x509 -noout -fingerprint -sha256` prints).
    pub sha256: [u8; 32],
    pub subject: DistinguishedName,
    /// Unix seconds; `None` if the certificate could not be parsed.
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

impl PeerCertificate {
    pub fn from_der(der: &[u8]) -> PeerCertificate {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        let mut out = PeerCertificate {
            sha256,
            ..PeerCertificate::default()
        };
        // The verifier has already parsed and checked the certificate; a parse failure here
        // leaves the subject empty (no subject pin can match) rather than failing.
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            out.subject = DistinguishedName(
                cert.subject()
                    .iter_rdn()
                    .flat_map(|rdn| rdn.iter())
                    .map(|a| {
                        let value = a.as_str().map_or_else(
                            |_| String::from_utf8_lossy(a.as_slice()).into_owned(),
                            str::to_owned,
                        );
                        (normalize_type(&a.attr_type().to_id_string()), value)
                    })
                    .collect(),
            );
            out.not_before = Some(cert.validity().not_before.timestamp());
            out.not_after = Some(cert.validity().not_after.timestamp());
        }
        out
    }

    /// `AB:CD:...`, as OpenSSL prints fingerprints.
    pub fn fingerprint(&self) -> String {
        hex_colon(&self.sha256)
    }
}

/// Upper-case hex with colons.
pub fn hex_colon(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses a SHA-256 fingerprint written as 64 hex digits, with or without colons or spaces,
/// optionally after OpenSSL's `sha256 Fingerprint=`.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let t = t.rsplit_once('=').map_or(t, |(_, v)| v);
    let hex: String = t.chars().filter(|c| *c != ':' && *c != ' ').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "'{text}' is not a SHA-256 fingerprint: 64 hex digits, colons allowed (openssl x509 -noout -fingerprint -sha256 -in CERT)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Why a handshake failed, in a field engineer's words
// ---------------------------------------------------------------------------------------------

/// Which side of a handshake the gateway was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Accepting a modality on a TLS listener.
    Listener,
    /// Connecting to a PACS.
    Upstream,
}

/// What went wrong in a failed handshake: the sentence for the log or the queue status, and
/// whether a certificate (or a configuration) must be fixed by someone, as opposed to a network
/// or peer hiccup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeFailure {
    pub reason: String,
    pub certificate_problem: bool,
}

/// Whether an I/O error is a TLS failure (an alert from the peer, a bad record), as opposed to
/// the connection itself failing.
pub fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// The one place that turns a TLS handshake error into words.
pub fn explain(e: &io::Error, side: Side) -> HandshakeFailure {
    let plain = |reason: String| HandshakeFailure {
        reason,
        certificate_problem: false,
    };
    let Some(err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => plain(match side {
                Side::Listener => "the modality closed the connection during the TLS handshake (often: it does not trust the gateway's certificate, or expects plain DICOM)".into(),
                Side::Upstream => "the PACS closed the connection during the TLS handshake (often: it refused the gateway's client certificate, or its port expects plain DICOM)".into(),
            }),
            _ => plain(format!("TLS handshake failed: {e}")),
        };
    };
    explain_rustls(err, side)
}

fn explain_rustls(err: &rustls::Error, side: Side) -> HandshakeFailure {
    let cert = |reason: String| HandshakeFailure {
        reason,
        certificate_problem: true,
    };
    let other = |reason: String| HandshakeFailure {
        reason,
        certificate_problem: false,
    };
    let whose = match side {
        Side::Listener => "client certificate",
        Side::Upstream => "PACS certificate",
    };
    match err {
        rustls::Error::NoCertificatesPresented => cert(match side {
            Side::Listener => "no client certificate: the modality sent none, and this port requires one (mutual TLS); configure the modality's certificate and key".into(),
            Side::Upstream => "the PACS presented no certificate".into(),
        }),
        rustls::Error::InvalidCertificate(ce) => cert(certificate_problem(ce, side, whose)),
        rustls::Error::AlertReceived(alert) => {
            let peer = match side {
                Side::Listener => "the modality",
                Side::Upstream => "the PACS",
            };
            let hint = match (alert, side) {
                (
                    AlertDescription::UnknownCA
                    | AlertDescription::BadCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::AccessDenied
                    | AlertDescription::DecryptError,
                    Side::Listener,
                ) => "it does not accept the gateway's certificate: give it the CA that issued listen.tls.certificate, or check that certificate's names and dates",
                (
                    AlertDescription::UnknownCA
                    | AlertDescription::BadCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::AccessDenied
                    | AlertDescription::CertificateRequired
                    | AlertDescription::DecryptError,
                    Side::Upstream,
                ) => "it does not accept the gateway's client certificate (or needs one): check destination.tls.certificate and that the PACS trusts its CA",
                (
                    AlertDescription::HandshakeFailure
                    | AlertDescription::ProtocolVersion
                    | AlertDescription::InsufficientSecurity,
                    _,
                ) => "no TLS version or cipher suite in common (the gateway offers TLS 1.2 with ECDHE and AES-GCM, and TLS 1.3)",
                _ => "its log says why",
            };
            let reason = format!("{peer} aborted the TLS handshake with alert {alert:?}: {hint}");
            if hint.starts_with("it does not accept") {
                cert(reason)
            } else {
                other(reason)
            }
        }
        rustls::Error::PeerIncompatible(p) => other(format!(
            "no TLS version or cipher suite in common: the gateway accepts only TLS 1.2 (ECDHE with AES-GCM) and TLS 1.3 ({PROFILE}); the peer's offer was refused ({p:?})"
        )),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::PeerSentOversizedRecord => other(format!(
            "not a valid TLS handshake from the peer ({err}); is it speaking DICOM TLS?"
        )),
        _ => other(format!("TLS handshake failed: {err}")),
    }
}

fn certificate_problem(ce: &CertificateError, side: Side, whose: &str) -> String {
    match ce {
        CertificateError::Expired => format!("{whose} expired"),
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "{whose} expired on {}",
            format_unix(i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX))
        ),
        CertificateError::NotValidYet => {
            format!("{whose} is not valid yet (check the clocks of both sides)")
        }
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "{whose} is not valid before {} (check the clocks of both sides)",
            format_unix(i64::try_from(not_before.as_secs()).unwrap_or(i64::MAX))
        ),
        CertificateError::UnknownIssuer => match side {
            Side::Listener => format!("unknown CA: the {whose} was not issued by a CA in listen.tls.client_ca"),
            Side::Upstream => format!("unknown issuer: the {whose} was not issued by a CA this gateway trusts (destination.tls.ca, or the system trust store)"),
        },
        CertificateError::NotValidForName => format!(
            "name mismatch: the {whose} is not valid for destination.tls.server_name"
        ),
        CertificateError::NotValidForNameContext { expected, presented } => format!(
            "name mismatch: the {whose} is not valid for '{}' (it names {}); set destination.tls.server_name to one of its names, or reissue it",
            expected.to_str(),
            if presented.is_empty() {
                "nothing".to_owned()
            } else {
                presented
                    .iter()
                    .map(|n| presented_name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        CertificateError::BadSignature => format!("{whose} has a bad signature"),
        CertificateError::Revoked => format!("{whose} is revoked"),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "{whose} is not for TLS {} authentication (extended key usage)",
                match side {
                    Side::Listener => "client",
                    Side::Upstream => "server",
                }
            )
        }
        other => format!("{whose} refused: {other:?}"),
    }
}

/// `DnsName("pacs.local")` / `IpAddress(10.0.0.5)` (how rustls lists the names in a
/// certificate) as `pacs.local` / `10.0.0.5`.
fn presented_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            n.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(n)
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `2025-03-01 12:00:00 UTC` (proleptic Gregorian calendar, H. Hinnant's days-to-civil).
pub fn format_unix(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests;
