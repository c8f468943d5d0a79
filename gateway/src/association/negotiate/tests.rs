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
        user_reason(negotiate(rq("CT01", "OTHER", ctx()), ip("10.0.0.5"), &c)),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized
        )
    );
    assert_eq!(
        user_reason(negotiate(rq("MR01", "GW", ctx()), ip("10.0.0.5"), &c)),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized
        )
    );
    // Registered AE from a host not listed for it.
    assert_eq!(
        user_reason(negotiate(rq("CT01", "GW", ctx()), ip("10.0.0.6"), &c)),
        AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized
        )
    );
    // From a listed network, also as an IPv4-mapped IPv6 peer; padded titles.
    assert!(negotiate(rq("CT01", "GW", ctx()), ip("192.168.1.77"), &c).is_ok());
    assert!(negotiate(rq("CT01 ", "GW  ", ctx()), ip("::ffff:10.0.0.5"), &c).is_ok());
    let mut bad_version = rq("CT01", "GW", ctx());
    bad_version.protocol_version = 2;
    assert_eq!(
        user_reason(negotiate(bad_version, ip("10.0.0.5"), &c)),
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
