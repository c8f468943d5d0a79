//! Association establishment (PS3.8 section 9.3.2 to 9.3.4, DESIGN.md section 4).
//!
//! Guards against: an open relay (any AE title from any host gets to store); rejections with
//! the wrong result, source or reason (a modality retries a transient rejection but gives up
//! on, or alarms for, a permanent one); a rejection that leaves no log line naming the peer;
//! an association limit that hangs new connections instead of refusing them, or that stays
//! exhausted after an association ends; presentation context negotiation that ignores the
//! order of the SCU's proposal.

mod common;

use std::time::Duration;

use common::raw::{self, AssociateRq, Pdu, RawClient};
use common::{Gateway, GatewayConfig, Modality, GATEWAY_AE};

const LOG_WAIT: Duration = Duration::from_secs(5);

/// PS3.8 9.3.4 result/source/reason of the A-ASSOCIATE-RJ the gateway sends for `rq`.
fn rejection(gw: &Gateway, rq: &AssociateRq) -> (u8, u8, u8) {
    let mut c = RawClient::connect(gw.port());
    match c.request(rq) {
        Pdu::AssociateRj {
            result,
            source,
            reason,
        } => (result, source, reason),
        other => panic!("expected A-ASSOCIATE-RJ for {rq:?}, got {other:?}"),
    }
}

#[test]
fn registered_calling_ae_can_echo_and_release() {
    let cfg = GatewayConfig {
        max_pdu_length: Some(65536),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(cfg);

    gw.echoscu().run().assert_success();
    gw.echoscu().calling("CT01").run().assert_success();

    let mut c = RawClient::connect(gw.port());
    let ac = c.request(&AssociateRq::verification(GATEWAY_AE, "RAW"));
    let Pdu::AssociateAc {
        contexts,
        max_pdu_length,
    } = ac
    else {
        panic!("RAW (registered for 127.0.0.0/8) was not accepted: {ac:?}");
    };
    assert_eq!(
        max_pdu_length,
        Some(65536),
        "the A-ASSOCIATE-AC must announce gateway.max_pdu_length"
    );
    assert_eq!(contexts.len(), 1);
    assert_eq!((contexts[0].id, contexts[0].result), (1, 0), "{contexts:?}");
    assert_eq!(contexts[0].transfer_syntax, raw::IMPLICIT_VR_LE);
    for id in 1..=3u16 {
        raw::assert_status(
            c.c_echo(1, id),
            raw::status::SUCCESS,
            "C-ECHO #{id} over one association",
        );
    }
    assert_eq!(
        c.release(),
        Pdu::ReleaseRp,
        "A-RELEASE-RQ must be answered by A-RELEASE-RP"
    );

    let status = gw.stop();
    assert!(
        status.success(),
        "SIGTERM should end the gateway cleanly, got {status}"
    );
}

#[test]
fn transfer_syntax_is_the_first_supported_one_in_the_proposal() {
    let gw = Gateway::start(GatewayConfig::default());
    let ct = common::data::CT_IMAGE_STORAGE;
    let unknown_ts = "1.2.3.4.5.6.7.8.9";
    let rq = AssociateRq::new(
        GATEWAY_AE,
        "RAW",
        &[
            (
                raw::VERIFICATION,
                &[raw::EXPLICIT_VR_LE, raw::IMPLICIT_VR_LE],
            ),
            (
                raw::VERIFICATION,
                &[raw::IMPLICIT_VR_LE, raw::EXPLICIT_VR_LE],
            ),
            (ct, &[unknown_ts, raw::EXPLICIT_VR_LE, raw::IMPLICIT_VR_LE]),
            (ct, &[unknown_ts]),
            // Patient Root Query/Retrieve FIND: not a service the gateway offers.
            ("1.2.840.10008.5.1.4.1.2.1.1", &[raw::IMPLICIT_VR_LE]),
        ],
    );
    let mut c = RawClient::connect(gw.port());
    let Pdu::AssociateAc { contexts, .. } = c.request(&rq) else {
        panic!("association with mixed contexts was not accepted");
    };
    let get = |id: u8| {
        contexts
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no answer for presentation context {id}: {contexts:?}"))
    };
    assert_eq!(
        (get(1).result, get(1).transfer_syntax.as_str()),
        (0, raw::EXPLICIT_VR_LE)
    );
    assert_eq!(
        (get(3).result, get(3).transfer_syntax.as_str()),
        (0, raw::IMPLICIT_VR_LE)
    );
    assert_eq!(
        (get(5).result, get(5).transfer_syntax.as_str()),
        (0, raw::EXPLICIT_VR_LE),
        "an unknown transfer syntax first in the list must be skipped"
    );
    assert_eq!(
        get(7).result,
        4,
        "only unknown transfer syntaxes: transfer-syntaxes-not-supported"
    );
    assert_eq!(
        get(9).result,
        3,
        "C-FIND model: abstract-syntax-not-supported"
    );
    raw::assert_status(c.c_echo(1, 1), raw::status::SUCCESS, "C-ECHO");
    raw::assert_status(c.c_echo(3, 2), raw::status::SUCCESS, "C-ECHO");
    assert_eq!(c.release(), Pdu::ReleaseRp);
}

#[test]
fn wrong_called_ae_is_rejected_permanently() {
    let mut gw = Gateway::start(GatewayConfig::default());

    let out = gw.echoscu().called("WRONG_AE").run();
    out.assert_failure()
        .assert_contains("Association Rejected")
        .assert_contains("Rejected Permanent")
        .assert_contains("Called AE Title Not Recognized");
    let line = gw.wait_for_log_words(LOG_WAIT, &["reject", "127.0.0.1", "WRONG_AE", "called"]);
    assert!(
        line.is_some(),
        "no log line with 'rejected', the peer, the called AE title sent and 'called':\n{}",
        gw.logs()
    );

    assert_eq!(
        rejection(&gw, &AssociateRq::verification("WRONG_AE", "RAW")),
        (1, 1, 7),
        "called AE not ours: permanent, service-user, called-AE-title-not-recognized"
    );
    gw.assert_echo_ok();
}

#[test]
fn unregistered_calling_ae_is_rejected_permanently() {
    let mut gw = Gateway::start(GatewayConfig::default());

    let out = gw.echoscu().calling("NOBODY").run();
    out.assert_failure()
        .assert_contains("Rejected Permanent")
        .assert_contains("Calling AE Title Not Recognized");
    let line = gw.wait_for_log_words(LOG_WAIT, &["reject", "127.0.0.1", "NOBODY", "calling"]);
    assert!(
        line.is_some(),
        "no log line with 'rejected', the peer, the calling AE title and 'calling':\n{}",
        gw.logs()
    );

    assert_eq!(
        rejection(&gw, &AssociateRq::verification(GATEWAY_AE, "NOBODY")),
        (1, 1, 3),
        "unknown calling AE: permanent, service-user, calling-AE-title-not-recognized"
    );
    // The gateway still serves registered peers.
    gw.assert_echo_ok();
}

#[test]
fn registered_ae_from_another_host_is_rejected() {
    let cfg = GatewayConfig {
        modalities: vec![
            Modality::new("ECHOSCU", &["127.0.0.1"]),
            Modality::new("CT01", &["10.9.9.9"]),
            Modality::new("CT02", &["10.0.0.0/8", "192.168.0.0/16"]),
            Modality::new("CT03", &["127.0.0.0/8"]),
        ],
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(cfg);

    let out = gw.echoscu().calling("CT01").run();
    out.assert_failure()
        .assert_contains("Calling AE Title Not Recognized");
    let line = gw.wait_for_log_words(LOG_WAIT, &["reject", "127.0.0.1", "CT01"]);
    assert!(
        line.is_some(),
        "no rejection log line naming CT01 and the peer:\n{}",
        gw.logs()
    );

    assert_eq!(
        rejection(&gw, &AssociateRq::verification(GATEWAY_AE, "CT01")),
        (1, 1, 3)
    );
    assert_eq!(
        rejection(&gw, &AssociateRq::verification(GATEWAY_AE, "CT02")),
        (1, 1, 3)
    );
    // A CIDR that does contain 127.0.0.1 is accepted.
    gw.echoscu().calling("CT03").run().assert_success();
    gw.assert_echo_ok();
}

#[test]
fn any_calling_ae_from_accepts_unknown_titles_only_from_listed_networks() {
    let cfg = GatewayConfig {
        any_calling_ae_from: vec!["127.0.0.0/8".into()],
        ..GatewayConfig::default()
    };
    let open = Gateway::start(cfg);
    open.echoscu().calling("WHOEVER").run().assert_success();
    // The called AE title is still checked.
    assert_eq!(
        rejection(&open, &AssociateRq::verification("NOT_THE_GW", "WHOEVER")),
        (1, 1, 7)
    );

    let cfg = GatewayConfig {
        any_calling_ae_from: vec!["10.0.0.0/8".into()],
        ..GatewayConfig::default()
    };
    let closed = Gateway::start(cfg);
    closed
        .echoscu()
        .calling("WHOEVER")
        .run()
        .assert_failure()
        .assert_contains("Calling AE Title Not Recognized");
}

#[test]
fn unsupported_protocol_version_is_rejected() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let mut rq = AssociateRq::verification(GATEWAY_AE, "RAW");
    rq.protocol_version = 0x0002; // bit 0 clear: version 1 not offered (PS3.8 9.3.2)
    assert_eq!(
        rejection(&gw, &rq),
        (1, 2, 2),
        "permanent, service-provider (ACSE), protocol-version-not-supported"
    );
    gw.assert_echo_ok();
}

#[test]
fn association_limit_refuses_transiently_and_frees_its_slot() {
    let cfg = GatewayConfig {
        max_associations: Some(1),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(cfg);

    // Hold the only slot with a live association.
    let mut held = RawClient::connect(gw.port());
    held.associate(&AssociateRq::verification(GATEWAY_AE, "RAW"));
    raw::assert_status(held.c_echo(1, 1), raw::status::SUCCESS, "C-ECHO");

    let out = gw
        .echoscu()
        .args(["-ta", "10"])
        .timeout(Duration::from_secs(30))
        .run();
    out.assert_failure()
        .assert_contains("Rejected Transient")
        .assert_contains("Local Limit Exceeded");
    assert!(
        out.elapsed < Duration::from_secs(5),
        "the refusal should be immediate, took {:?}",
        out.elapsed
    );
    assert_eq!(
        rejection(&gw, &AssociateRq::verification(GATEWAY_AE, "RAW")),
        (2, 3, 2),
        "over the limit: transient, service-provider (presentation), local-limit-exceeded"
    );
    let line = gw.wait_for_log(LOG_WAIT, |l| {
        let l = common::normalize(l);
        l.contains("reject")
            && l.contains("127.0.0.1")
            && (l.contains("limit") || l.contains("max associations"))
    });
    assert!(
        line.is_some(),
        "no log line for the refusal over the limit:\n{}",
        gw.logs()
    );

    // The held association still works, and its end frees the slot.
    raw::assert_status(held.c_echo(1, 2), raw::status::SUCCESS, "C-ECHO");
    assert_eq!(held.release(), Pdu::ReleaseRp);
    drop(held);
    let start = std::time::Instant::now();
    loop {
        let out = gw.echoscu().run();
        if out.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was not freed 5 s after release: {}",
            out.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.assert_running();
}
