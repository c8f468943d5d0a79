//! Hostile or broken peers (PS3.8 section 9 state machine; DESIGN.md section 4 "Protocol
//! errors").
//!
//! Guards against: a daemon that panics, hangs, or allocates what a length field claims when
//! fed garbage, an oversized or unknown PDU, or a PDU out of sequence; connections that are
//! never closed (a port scanner, or a stuck modality holding a slot and a temporary file
//! forever); a transfer cut off in the middle leaving a temporary file or a half instance in
//! the index. After each, the gateway must still serve a normal C-ECHO.

mod common;

use std::time::Duration;

use common::data::{self, CT_IMAGE_STORAGE};
use common::raw::{self, pdu_type, AssociateRq, Closed, Pdu, RawClient};
use common::{Gateway, GatewayConfig, GATEWAY_AE};

/// How long the gateway may take to abort after a protocol error (well under any timeout).
const ABORT_WITHIN: Duration = Duration::from_secs(5);

fn verification_association(gw: &Gateway) -> RawClient {
    let mut c = RawClient::connect(gw.port());
    c.associate(&AssociateRq::verification(GATEWAY_AE, "RAW"));
    c
}

/// Panics unless the gateway closes `c` within [`ABORT_WITHIN`], having sent nothing but
/// (at most) one A-ABORT.
fn assert_closed(c: &mut RawClient, what: &str) -> Closed {
    let closed = c
        .wait_closed(ABORT_WITHIN)
        .unwrap_or_else(|| panic!("{what}: the connection is still open after {ABORT_WITHIN:?}"));
    assert!(
        closed.pdus.iter().all(|p| matches!(p, Pdu::Abort { .. })) && closed.trailing.is_empty(),
        "{what}: the gateway may only send A-ABORT before closing, sent {closed:?}"
    );
    closed
}

/// Panics unless the gateway sends an A-ABORT and closes `c`.
fn assert_aborted(c: &mut RawClient, what: &str) {
    let closed = assert_closed(c, what);
    assert!(
        closed.got_abort(),
        "{what}: closed without an A-ABORT PDU: {closed:?}"
    );
}

/// Panics unless some log line mentions the connection from `local_port` (peer address).
fn assert_logged_peer(gw: &Gateway, local_port: u16, what: &str) {
    let peer = format!("127.0.0.1:{local_port}");
    assert!(
        gw.wait_for_log(Duration::from_secs(5), |l| l.contains(&peer))
            .is_some(),
        "{what}: no log line names the peer {peer}:\n{}",
        gw.logs()
    );
}

#[test]
fn garbage_instead_of_a_pdu_is_dropped() {
    let mut gw = Gateway::start(GatewayConfig::default());

    // A web client on the DICOM port: 'G' is no PDU type and "T / " no sane length.
    let mut c = RawClient::connect(gw.port());
    let port = c.local_port();
    c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    assert_closed(&mut c, "HTTP request");
    assert_logged_peer(&gw, port, "HTTP request");

    // Zeros: PDU type 0 is not defined.
    let mut c = RawClient::connect(gw.port());
    c.send(&[0u8; 64]).expect("send");
    assert_closed(&mut c, "zeros");

    gw.assert_echo_ok();
    assert!(gw.unfinished_records().is_empty());
}

#[test]
fn oversized_pdu_length_is_aborted_without_allocating_it() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let rss_before = gw.peak_rss_kib();

    // After association: a P-DATA-TF claiming ~4 GiB, far above max_pdu_length.
    let mut c = verification_association(&gw);
    let port = c.local_port();
    let mut pdu = vec![pdu_type::P_DATA_TF, 0];
    pdu.extend_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    pdu.extend_from_slice(&[0u8; 16]);
    c.send(&pdu).expect("send");
    assert_aborted(&mut c, "P-DATA-TF with a 4 GiB length");
    assert_logged_peer(&gw, port, "oversized P-DATA-TF");

    // Before association: an A-ASSOCIATE-RQ claiming 2 GiB.
    let mut c = RawClient::connect(gw.port());
    let mut pdu = vec![pdu_type::ASSOCIATE_RQ, 0];
    pdu.extend_from_slice(&0x7FFF_FFFFu32.to_be_bytes());
    pdu.extend_from_slice(&[0u8; 16]);
    c.send(&pdu).expect("send");
    assert_closed(&mut c, "A-ASSOCIATE-RQ with a 2 GiB length");

    gw.assert_echo_ok();
    let rss_after = gw.peak_rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "peak RSS grew from {rss_before} KiB to {rss_after} KiB: a length field was trusted"
    );
}

#[test]
fn unknown_and_unexpected_pdus_are_aborted() {
    let mut gw = Gateway::start(GatewayConfig::default());

    let mut c = verification_association(&gw);
    c.send(&raw::pdu(0x0A, &[0; 4])).expect("send");
    assert_aborted(&mut c, "unknown PDU type 0x0A");

    let mut c = verification_association(&gw);
    c.send(&raw::pdu(0xFF, &[1, 2, 3, 4, 5, 6])).expect("send");
    assert_aborted(&mut c, "unknown PDU type 0xFF");

    // A second A-ASSOCIATE-RQ on an established association (PS3.8 table 9-10, AA-8).
    let mut c = verification_association(&gw);
    c.send(&AssociateRq::verification(GATEWAY_AE, "RAW").encode())
        .expect("send");
    assert_aborted(&mut c, "A-ASSOCIATE-RQ while associated");

    // An A-ASSOCIATE-AC from the requestor (only an acceptor sends it).
    let mut c = RawClient::connect(gw.port());
    let mut ac = AssociateRq::verification(GATEWAY_AE, "RAW").encode();
    ac[0] = pdu_type::ASSOCIATE_AC;
    c.send(&ac).expect("send");
    assert_closed(&mut c, "A-ASSOCIATE-AC instead of -RQ");

    // P-DATA-TF before any association.
    let mut c = RawClient::connect(gw.port());
    c.send(&raw::p_data(&[(1, 0x03, &[0u8; 12])]))
        .expect("send");
    assert_closed(&mut c, "P-DATA-TF before association");

    gw.assert_echo_ok();
}

#[test]
fn transfer_cut_off_mid_dataset_stores_nothing() {
    let mut gw = Gateway::start(GatewayConfig::default());
    let files = data::ct_series(&gw.scratch("cut"), "ct", 1, 256, 256);
    let info = data::as_sent_by_storescu(&files[0]);
    let dataset = data::dataset_bytes(&files[0]);

    let mut c = RawClient::connect(gw.port());
    c.associate(&AssociateRq::new(
        GATEWAY_AE,
        "RAW",
        &[(CT_IMAGE_STORAGE, &[raw::EXPLICIT_VR_LE])],
    ));
    let cmd = raw::store_command(1, CT_IMAGE_STORAGE, &info.sop_instance_uid);
    c.send(&raw::p_data(&[(1, 0x03, &cmd)]))
        .expect("send command");
    // Half the dataset in complete, non-last fragments ...
    for chunk in dataset[..dataset.len() / 2].chunks(16000) {
        c.send(&raw::p_data(&[(1, 0x00, chunk)]))
            .expect("send fragment");
    }
    // ... then a P-DATA-TF whose header promises 16 KiB of which 1 KiB arrives, and hang up.
    let mut partial = vec![pdu_type::P_DATA_TF, 0];
    partial.extend_from_slice(&16384u32.to_be_bytes());
    partial.extend_from_slice(&16380u32.to_be_bytes());
    partial.extend_from_slice(&[1, 0x00]);
    partial.extend_from_slice(&dataset[dataset.len() / 2..dataset.len() / 2 + 1024]);
    c.send(&partial).expect("send truncated PDU");
    // Give the gateway time to write what it got to its segment before the connection ends.
    std::thread::sleep(Duration::from_millis(200));
    drop(c);

    gw.assert_no_unfinished_within(Duration::from_secs(10));
    gw.assert_echo_ok();
    assert!(
        gw.stored_records().is_empty(),
        "a cut-off instance was spooled: {:?}",
        gw.stored_records()
    );

    gw.stop();
    assert!(gw.instances().is_empty(), "a cut-off instance was indexed");

    // The whole instance is accepted afterwards.
    gw.restart();
    gw.storescu()
        .arg("-xe")
        .file(&files[0])
        .run()
        .assert_success();
    gw.stop();
    let rows = gw.instances();
    common::assert_stored(&gw, &rows, &[info], "STORESCU");
}

#[test]
fn silent_connections_are_closed_after_the_timeouts() {
    let cfg = GatewayConfig {
        artim_timeout_secs: Some(2),
        idle_timeout_secs: Some(2),
        dimse_timeout_secs: Some(2),
        ..GatewayConfig::default()
    };
    let mut gw = Gateway::start(cfg);
    let files = data::ct_series(&gw.scratch("stall"), "ct", 1, 256, 256);
    let info = data::inspect(&files[0]);
    let dataset = data::dataset_bytes(&files[0]);

    // Connects and never sends an A-ASSOCIATE-RQ: ARTIM (PS3.8 9.1.5).
    let mut silent = RawClient::connect(gw.port());
    // Associates, then says nothing: idle timeout.
    let mut idle = verification_association(&gw);
    // Stops in the middle of a C-STORE: DIMSE timeout, with a temporary file open.
    let mut stalled = RawClient::connect(gw.port());
    stalled.associate(&AssociateRq::new(
        GATEWAY_AE,
        "RAW",
        &[(CT_IMAGE_STORAGE, &[raw::EXPLICIT_VR_LE])],
    ));
    let cmd = raw::store_command(1, CT_IMAGE_STORAGE, &info.sop_instance_uid);
    stalled
        .send(&raw::p_data(&[(1, 0x03, &cmd)]))
        .expect("send command");
    stalled
        .send(&raw::p_data(&[(1, 0x00, &dataset[..16000])]))
        .expect("send first fragment");

    let closed = silent.wait_closed(Duration::from_secs(15)).expect(
        "a connection without A-ASSOCIATE-RQ is still open 15 s later (artim_timeout_secs = 2)",
    );
    assert!(
        closed.after >= Duration::from_millis(1500),
        "closed after {:?}, before the 2 s ARTIM timeout",
        closed.after
    );
    assert!(
        closed.pdus.iter().all(|p| matches!(p, Pdu::Abort { .. })),
        "{closed:?}"
    );

    let closed = idle
        .wait_closed(Duration::from_secs(15))
        .expect("an idle association is still open 15 s later (idle_timeout_secs = 2)");
    assert!(
        closed.pdus.iter().all(|p| matches!(p, Pdu::Abort { .. })),
        "{closed:?}"
    );

    let closed = stalled.wait_closed(Duration::from_secs(15)).expect(
        "an association stalled inside a C-STORE is still open 15 s later (dimse_timeout_secs = 2)",
    );
    assert!(
        closed.pdus.iter().all(|p| matches!(p, Pdu::Abort { .. })),
        "{closed:?}"
    );
    gw.assert_no_unfinished_within(Duration::from_secs(5));

    gw.assert_echo_ok();
    gw.stop();
    assert!(gw.instances().is_empty(), "a stalled instance was indexed");
}
