use super::*;
use crate::uid::VERIFICATION;
use dicom_ul::pdu::PresentationContextProposed;

fn config() -> Config {
    Config::parse(
        r#"
[gateway]
ae_title = "GW"
[[listen]]
address = "127.0.0.1:104"
[[modality]]
ae_title = "CT01"
hosts = ["10.0.0.5", "192.168.1.0/24"]
"#,
        "t",
    )
    .unwrap()
}

fn rq(calling: &str, called: &str, contexts: Vec<(&str, Vec<&str>)>) -> AssociationRQ {
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: called.into(),
        application_context_name: APPLICATION_CONTEXT.into(),
        presentation_contexts: contexts
            .into_iter()
            .enumerate()
            .map(|(i, (a, ts))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: a.into(),
                transfer_syntaxes: ts.into_iter().map(String::from).collect(),
            })
            .collect(),
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn user_reason(r: Result<Accepted, Refusal>) -> AssociationRJSource {
    match r {
        Ok(_) => panic!("accepted"),
        Err(r) => r.rj.source,
    }
}

#[test]
fn called_and_calling_checks_give_the_standard_reasons() {
    let c = config();
    let ctx = || vec![(VERIFICATION, vec![IMPLICIT_VR_LE])];
    assert_eq!(
        user_reason(negotiate(
            rq("CT01", "OTHER", ctx()),
            ip("10.0.0.5"),
            &Transport::Plain,
            &c
        )),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized
        )
    );
    assert_eq!(
        user_reason(negotiate(
            rq("MR01", "GW", ctx()),
            ip("10.0.0.5"),
            &Transport::Plain,
            &c
        )),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized
        )
    );
    // Registered AE from a host not listed for it.
    assert_eq!(
        user_reason(negotiate(
            rq("CT01", "GW", ctx()),
            ip("10.0.0.6"),
            &Transport::Plain,
            &c
        )),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized
        )
    );
    // From a listed network, also as an IPv4-mapped IPv6 peer; padded titles.
    assert!(negotiate(
        rq("CT01", "GW", ctx()),
        ip("192.168.1.77"),
        &Transport::Plain,
        &c
    )
    .is_ok());
    assert!(negotiate(
        rq("CT01 ", "GW  ", ctx()),
        ip("::ffff:10.0.0.5"),
        &Transport::Plain,
        &c
    )
    .is_ok());
    let mut bad_version = rq("CT01", "GW", ctx());
    bad_version.protocol_version = 2;
    assert_eq!(
        user_reason(negotiate(
            bad_version,
            ip("10.0.0.5"),
            &Transport::Plain,
            &c
        )),
        AssociationRJSource::ServiceProviderASCE(
            AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported
        )
    );
}

#[test]
fn presentation_contexts_get_per_context_results() {
    let c = config();
    let a = negotiate(
        rq(
            "CT01",
            "GW",
            vec![
                (
                    "1.2.840.10008.5.1.4.1.1.2",
                    vec!["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
                ),
                ("1.2.840.10008.5.1.4.1.2.2.1", vec![IMPLICIT_VR_LE]),
                ("1.2.840.10008.5.1.4.1.1.4", vec!["1.2.3.4.5.6"]),
                (VERIFICATION, vec![IMPLICIT_VR_LE]),
            ],
        ),
        ip("10.0.0.5"),
        &Transport::Plain,
        &c,
    )
    .unwrap_or_else(|_| panic!("rejected"));
    let r = &a.ac.presentation_contexts;
    assert_eq!(r[0].reason, PresentationContextResultReason::Acceptance);
    // The requestor's first choice wins, compressed or not.
    assert_eq!(r[0].transfer_syntax, "1.2.840.10008.1.2.4.70");
    assert_eq!(
        r[1].reason,
        PresentationContextResultReason::AbstractSyntaxNotSupported
    );
    assert_eq!(
        r[2].reason,
        PresentationContextResultReason::TransferSyntaxesNotSupported
    );
    assert_eq!(r[3].reason, PresentationContextResultReason::Acceptance);
    assert_eq!(a.contexts.len(), 2);
    assert_eq!(a.rejected.len(), 2);
    assert!(a.rejected[0].contains("Study Root"), "{}", a.rejected[0]);
    assert_eq!(a.peer_max_pdu, 16384);
}

/// A registry with pins: A pinned by fingerprint, B by subject, C must use TLS, D may use either.
fn pinned_config() -> Config {
    let fp_a = crate::tls::hex_colon(&cert("MOD_A").sha256);
    Config::parse(
        &format!(
            r#"
[gateway]
ae_title = "GW"
[[listen]]
address = "127.0.0.1:104"
[[modality]]
ae_title = "MOD_A"
hosts = ["10.0.0.0/24"]
certificate_sha256 = "{fp_a}"
[[modality]]
ae_title = "MOD_B"
hosts = ["10.0.0.0/24"]
certificate_subject = "CN=MOD_B, O=Hospital"
[[modality]]
ae_title = "MOD_C"
hosts = ["10.0.0.0/24"]
allow_plain = false
[[modality]]
ae_title = "MOD_D"
hosts = ["10.0.0.0/24"]
[dangerous]
any_calling_ae_from = ["192.168.7.0/24"]
"#
        ),
        "t",
    )
    .unwrap()
}

/// A verified peer certificate as the TLS layer would report it.
fn cert(cn: &str) -> PeerCertificate {
    let mut sha256 = [0u8; 32];
    for (i, b) in cn.bytes().enumerate() {
        sha256[i % 32] ^= b;
    }
    PeerCertificate {
        sha256,
        subject: crate::tls::DistinguishedName::parse(&format!("C=DE, O=Hospital, CN={cn}"))
            .unwrap(),
        not_before: None,
        not_after: None,
    }
}

fn tls(cn: Option<&str>) -> Transport {
    Transport::Tls {
        client: cn.map(cert),
    }
}

fn refusal(r: Result<Accepted, Refusal>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(r) => {
            assert_eq!(
                r.rj.source,
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized
                )
            );
            r.reason
        }
    }
}

#[test]
fn certificate_pins_and_allow_plain_are_enforced() {
    let c = pinned_config();
    let ctx = || vec![(VERIFICATION, vec![IMPLICIT_VR_LE])];
    let go = |ae: &str, t: Transport| negotiate(rq(ae, "GW", ctx()), ip("10.0.0.9"), &t, &c);
    // Each pinned modality with its own certificate.
    assert!(go("MOD_A", tls(Some("MOD_A"))).is_ok());
    assert!(go("MOD_B", tls(Some("MOD_B"))).is_ok());
    // A's certificate used with B's AE title, and the other way round.
    let r = refusal(go("MOD_B", tls(Some("MOD_A"))));
    assert!(
        r.contains("pin mismatch") && r.contains("certificate_subject"),
        "{r}"
    );
    let r = refusal(go("MOD_A", tls(Some("MOD_B"))));
    assert!(
        r.contains("pin mismatch") && r.contains("certificate_sha256"),
        "{r}"
    );
    // Pinned, but no certificate (a listener with client certificates optional).
    let r = refusal(go("MOD_A", tls(None)));
    assert!(r.contains("no client certificate"), "{r}");
    // Pinned and allow_plain = false modalities on a plain port.
    let r = refusal(go("MOD_A", Transport::Plain));
    assert!(
        r.contains("must use DICOM TLS") && r.contains("pinned"),
        "{r}"
    );
    let r = refusal(go("MOD_C", Transport::Plain));
    assert!(r.contains("allow_plain = false"), "{r}");
    assert!(go("MOD_C", tls(Some("ANY"))).is_ok());
    // Unpinned, plain allowed: both ways.
    assert!(go("MOD_D", Transport::Plain).is_ok());
    assert!(go("MOD_D", tls(Some("ANY"))).is_ok());
    // A [dangerous] network skips the host check, not the pins.
    let open = |ae: &str, t: Transport| negotiate(rq(ae, "GW", ctx()), ip("192.168.7.1"), &t, &c);
    assert!(open("UNKNOWN", Transport::Plain).is_ok());
    assert!(open("MOD_A", tls(Some("MOD_A"))).is_ok());
    let r = refusal(open("MOD_A", tls(Some("MOD_B"))));
    assert!(r.contains("pin mismatch"), "{r}");
}
