//! Certificates for the TLS tests, generated at test time with rcgen (ECDSA P-256): a CA, the
//! gateway, modalities, an expired one, one from another CA, and a PACS. Nothing is ever read
//! from outside the test's temporary directory.
//!
//! Every file is PEM; private keys are written with mode 0600 (the gateway refuses others).
//! [`CertFiles::sha256`] comes from the `openssl` command line, as an operator would get the
//! fingerprint for a pin.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use super::run_tool;

/// Writes `text` to `path`, creating it with `mode` (replacing any file there atomically: a
/// temporary file renamed over it, as an operator should rotate certificates).
pub fn write_file(path: &Path, text: &str, mode: u32) {
    let tmp = path.with_extension("tmp-write");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    f.write_all(text.as_bytes()).expect("write PEM");
    f.sync_all().expect("fsync PEM");
    std::fs::rename(&tmp, path).expect("rename PEM into place");
}

/// A certificate and its key on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `sha256 Fingerprint=AB:CD:...` as `openssl x509 -fingerprint -sha256` prints it.
    pub sha256: String,
    /// The common name.
    pub cn: String,
}

/// A test PKI: the CA the gateway and Orthanc trust, and another CA nobody trusts.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    other: CertifiedIssuer<'static, KeyPair>,
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dicom-gateway tests");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("CA certificate")
}

/// What to issue.
struct Spec<'a> {
    cn: &'a str,
    names: &'a [&'a str],
    expired: bool,
    other_ca: bool,
}

impl Pki {
    /// A fresh PKI writing its files to `dir` (created).
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca: ca("Test Modality and Gateway CA"),
            other: ca("Some Other CA"),
        };
        write_file(&pki.ca_file(), &pki.ca.pem(), 0o644);
        write_file(&pki.other_ca_file(), &pki.other.pem(), 0o644);
        pki
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trusted CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA nobody in the tests trusts.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }

    /// A server (and client) certificate for `names` (DNS names or IP addresses), CN `cn`,
    /// written as `<file>.crt` / `<file>.key`.
    pub fn server(&self, file: &str, cn: &str, names: &[&str]) -> CertFiles {
        self.issue(
            file,
            &Spec {
                cn,
                names,
                expired: false,
                other_ca: false,
            },
        )
    }

    /// A modality's client certificate with CN `cn`.
    pub fn client(&self, file: &str, cn: &str) -> CertFiles {
        self.server(file, cn, &[])
    }

    /// A client certificate that expired in 2021.
    pub fn expired(&self, file: &str, cn: &str) -> CertFiles {
        self.issue(
            file,
            &Spec {
                cn,
                names: &[],
                expired: true,
                other_ca: false,
            },
        )
    }

    /// A server certificate for `names` that expired in 2021.
    pub fn expired_server(&self, file: &str, cn: &str, names: &[&str]) -> CertFiles {
        self.issue(
            file,
            &Spec {
                cn,
                names,
                expired: true,
                other_ca: false,
            },
        )
    }

    /// A client certificate from the untrusted CA.
    pub fn issued_by_other_ca(&self, file: &str, cn: &str) -> CertFiles {
        self.issue(
            file,
            &Spec {
                cn,
                names: &[],
                expired: false,
                other_ca: true,
            },
        )
    }

    fn issue(&self, file: &str, spec: &Spec<'_>) -> CertFiles {
        let names: Vec<String> = spec.names.iter().map(|s| (*s).to_owned()).collect();
        let mut p = CertificateParams::new(names).expect("certificate names");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example Hospital");
        dn.push(DnType::CommonName, spec.cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if spec.expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        } else {
            p.not_before = date_time_ymd(2024, 1, 1);
            p.not_after = date_time_ymd(2100, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let issuer = if spec.other_ca { &self.other } else { &self.ca };
        let cert = p.signed_by(&key, issuer).expect("sign certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            sha256: String::new(),
            cn: spec.cn.to_owned(),
        };
        write_file(&files.cert, &cert.pem(), 0o644);
        write_file(&files.key, &key.serialize_pem(), 0o600);
        CertFiles {
            sha256: fingerprint(&files.cert),
            ..files
        }
    }
}

/// `openssl x509 -noout -fingerprint -sha256 -in CERT`.
pub fn fingerprint(cert: &Path) -> String {
    let mut cmd = Command::new(openssl());
    cmd.args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert);
    let out = run_tool(cmd, Duration::from_secs(30));
    out.assert_success();
    out.stdout.trim().to_owned()
}

/// The `openssl` command line tool; panics with the install hint if missing.
pub fn openssl() -> PathBuf {
    let p = PathBuf::from("/usr/bin/openssl");
    assert!(p.exists(), "openssl not found: apt-get install openssl");
    p
}
