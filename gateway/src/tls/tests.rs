use super::*;

#[test]
fn subjects_parse_in_the_forms_people_copy() {
    let want = DistinguishedName(vec![
        ("CN".into(), "CT01".into()),
        ("O".into(), "Hospital".into()),
    ]);
    assert_eq!(
        DistinguishedName::parse("CN=CT01, O=Hospital").unwrap(),
        want
    );
    assert_eq!(
        DistinguishedName::parse("CN = CT01, O = Hospital").unwrap(),
        want
    );
    assert_eq!(
        DistinguishedName::parse("subject=CN = CT01,O = Hospital").unwrap(),
        want
    );
    assert_eq!(
        DistinguishedName::parse("/CN=CT01/O=Hospital").unwrap(),
        want
    );
    assert_eq!(
        DistinguishedName::parse("commonName=CT01,organizationName=Hospital").unwrap(),
        want
    );
    let escaped = DistinguishedName::parse(r"CN=CT01, O=Hospital\, Inc.").unwrap();
    assert_eq!(escaped.0[1].1, "Hospital, Inc.");
    assert_eq!(escaped.to_string(), r"CN=CT01, O=Hospital\, Inc.");
    assert!(DistinguishedName::parse("CT01").is_err());
    assert!(DistinguishedName::parse("CN=").is_err());
    assert!(DistinguishedName::parse("").is_err());
}

#[test]
fn a_subject_pin_matches_by_attributes_not_order() {
    let subject = DistinguishedName::parse("C=DE, O=Hospital, CN=CT01").unwrap();
    assert!(subject.contains_all(&DistinguishedName::parse("CN=CT01").unwrap()));
    assert!(subject.contains_all(&DistinguishedName::parse("CN=CT01, O=Hospital").unwrap()));
    assert!(!subject.contains_all(&DistinguishedName::parse("CN=CT02").unwrap()));
    assert!(!subject.contains_all(&DistinguishedName::parse("CN=ct01").unwrap()));
    assert!(!subject.contains_all(&DistinguishedName::parse("CN=CT01, OU=Radiology").unwrap()));
}

#[test]
fn fingerprints_parse_with_or_without_colons() {
    let hex = "AB".repeat(32);
    let colons = vec!["ab"; 32].join(":");
    assert_eq!(parse_sha256(&hex).unwrap(), [0xAB; 32]);
    assert_eq!(parse_sha256(&colons).unwrap(), [0xAB; 32]);
    assert_eq!(
        parse_sha256(&format!("sha256 Fingerprint={colons}")).unwrap(),
        [0xAB; 32]
    );
    assert!(parse_sha256("AB:CD").is_err());
    assert!(parse_sha256(&"ZZ".repeat(32)).is_err());
    assert_eq!(hex_colon(&[0xAB, 0x01]), "AB:01");
}

#[test]
fn the_profile_is_tls12_and_13_with_aead_only() {
    let names = cipher_suite_names();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names
        .iter()
        .all(|(n, _)| n.contains("GCM") || n.contains("CHACHA20")));
    assert!(names
        .iter()
        .filter(|(_, v)| *v == "TLS 1.2")
        .all(|(n, _)| n.starts_with("TLS_ECDHE_") && n.contains("_GCM_")));
    assert_eq!(names.iter().filter(|(_, v)| *v == "TLS 1.3").count(), 3);
    assert!(names.contains(&("TLS_AES_128_GCM_SHA256".into(), "TLS 1.3")));
    assert_eq!(VERSIONS.len(), 2);
}

#[test]
fn dates_format_as_utc() {
    assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(format_unix(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(format_unix(1_735_689_599), "2024-12-31 23:59:59 UTC");
}

#[test]
fn key_files_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    std::fs::write(&path, "not a key").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load_key(&path).unwrap_err().to_string();
    assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = load_key(&path).unwrap_err().to_string();
    assert!(e.contains("no usable PEM private key"), "{e}");
}

#[test]
fn presented_names_read_as_written() {
    assert_eq!(presented_name("DnsName(\"pacs.local\")"), "pacs.local");
    assert_eq!(presented_name("IpAddress(10.0.0.5)"), "10.0.0.5");
    assert_eq!(presented_name("URI(x)"), "URI(x)");
}

fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[test]
fn handshake_errors_are_explained_for_each_side() {
    use rustls::pki_types::UnixTime;
    let f = explain(
        &tls_io(rustls::Error::InvalidCertificate(
            CertificateError::ExpiredContext {
                time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000)),
                not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    1_609_459_200,
                )),
            },
        )),
        Side::Upstream,
    );
    assert_eq!(
        f.reason,
        "PACS certificate expired on 2021-01-01 00:00:00 UTC"
    );
    assert!(f.certificate_problem);
    let f = explain(
        &tls_io(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )),
        Side::Listener,
    );
    assert!(f.reason.contains("listen.tls.client_ca"), "{}", f.reason);
    let f = explain(
        &tls_io(rustls::Error::NoCertificatesPresented),
        Side::Listener,
    );
    assert!(
        f.reason.starts_with("no client certificate"),
        "{}",
        f.reason
    );
    let f = explain(
        &tls_io(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
        Side::Listener,
    );
    assert!(
        f.reason
            .contains("does not accept the gateway's certificate")
            && f.certificate_problem,
        "{}",
        f.reason
    );
    let f = explain(
        &tls_io(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoCipherSuitesInCommon,
        )),
        Side::Listener,
    );
    assert!(
        f.reason
            .contains("no TLS version or cipher suite in common")
            && !f.certificate_problem
    );
    let f = explain(
        &io::Error::from(io::ErrorKind::UnexpectedEof),
        Side::Upstream,
    );
    assert!(f
        .reason
        .contains("closed the connection during the TLS handshake"));
    assert!(is_tls_error(&tls_io(rustls::Error::DecryptError)));
    assert!(!is_tls_error(&io::Error::from(
        io::ErrorKind::ConnectionReset
    )));
}
