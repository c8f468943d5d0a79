//! Store-and-forward against a real PACS (Orthanc 1.10) and DCMTK `storescp` sinks
//! (DESIGN.md sections 1 and 3).
//!
//! Failure modes guarded against:
//! - an instance acknowledged to the modality that never reaches the PACS, or reaches it
//!   altered (dataset bytes in Orthanc and in `storescp +B` files are compared with the bytes
//!   sent);
//! - one destination starving or skipping another; a route that sends an instance where it
//!   must not go, or not where it must;
//! - a PACS that is down making the gateway refuse or lose instances, report a healthy link, or
//!   never drain once the PACS is back;
//! - a PACS killed mid-transfer (association reset, instance half-sent) losing the in-flight
//!   instances; a gateway killed mid-drain losing leased entries or corrupting its index;
//! - a SOP class the PACS refuses blocking the queue, being retried forever, or vanishing
//!   silently instead of landing in the failed queue with its reason; `queue retry` not
//!   re-sending; `queue purge` dropping entries without `--yes`;
//! - a PACS that rejects the association for good (wrong called AE title: a configuration
//!   error) failing or dropping the entries instead of keeping them pending and saying why.
//!
//! How a PACS is made to refuse a SOP class: with `storescp` and an association negotiation
//! profile (`-xf`) that lists only Verification and CT Image Storage, as a second destination.
//! Orthanc 1.10.1 cannot do it cleanly: it has no setting to refuse one SOP class at
//! negotiation (`UnknownSopClassAccepted` only covers classes DCMTK does not know), and its
//! `ReceivedCStoreInstanceFilter` Lua callback answered Success to every C-STORE in a trial,
//! discarding the instances for which the script returned 0 and storing those for which it
//! returned a status code.
//!
//! Test configs use retry delays of 1 s (doubling up to 2 s), so every wait is a poll with a
//! deadline, never a fixed sleep. Figures (drain time and rate, kills) are printed with
//! `[figures]`; run with `--nocapture` to see them.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::data::{self, FileInfo, CT_IMAGE_STORAGE, SECONDARY_CAPTURE_IMAGE_STORAGE};
use common::orthanc::{
    counts, dest_status, destinations_toml, queue_list, send_all, start_gateway, status,
    wait_counts, wait_until, Counts, Dest, Orthanc, StoreScp, PACS_AE,
};
use common::{assert_stored, gateway_cli, Gateway, GatewayConfig};

/// Generous deadline for a queue to drain on a loaded 2-core machine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// The kill tests measure drain rates and depend on the drain lasting long enough to be
/// interrupted: they do not run at the same time as each other.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn delivered(n: u64) -> Counts {
    Counts {
        pending: 0,
        failed: 0,
        delivered: n,
    }
}

fn inspect_all(files: &[PathBuf]) -> Vec<FileInfo> {
    files.iter().map(|f| data::inspect(f)).collect()
}

/// Every sent instance is in Orthanc, and its dataset bytes there hash to what was sent.
fn assert_in_orthanc(orthanc: &Orthanc, sent: &[FileInfo]) {
    let have = orthanc.instance_map();
    for f in sent {
        let inst = have.get(&f.sop_instance_uid).unwrap_or_else(|| {
            panic!(
                "{} ({}) is not in Orthanc ({} instances there)",
                f.sop_instance_uid,
                f.path.display(),
                have.len()
            )
        });
        assert_eq!(
            orthanc.dataset_checksum(&inst.id),
            f.checksum,
            "dataset of {} in Orthanc differs from the one sent ({})",
            f.sop_instance_uid,
            f.path.display()
        );
    }
}

/// What a storescp sink should hold: SOP Instance UID → dataset checksum.
fn expected_map(sent: &[FileInfo]) -> BTreeMap<String, String> {
    sent.iter()
        .map(|f| (f.sop_instance_uid.clone(), f.checksum.clone()))
        .collect()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-3)
}

/// Guards against: acknowledged instances that never reach the PACS or reach it altered, and
/// a status that does not say so.
#[test]
fn study_reaches_the_pacs_byte_for_byte() {
    let orthanc = Orthanc::start_new();
    let gw = start_gateway(
        GatewayConfig::default(),
        &Dest::new("pacs", PACS_AE, &orthanc.dicom_address()).to_toml(),
    );
    let files = data::ct_series(&gw.scratch("study"), "ct", 20, 128, 128);
    let sent = inspect_all(&files);

    let t0 = Instant::now();
    send_all(&gw, &files);
    let st = wait_counts(&gw, "pacs", delivered(20), DRAIN_TIMEOUT);
    let took = t0.elapsed();

    let d = dest_status(&st, "pacs");
    assert_eq!(d["link"]["up"], true, "link should be up: {d:#}");
    assert!(
        d["link"]["last_error"].is_null(),
        "no error expected: {d:#}"
    );
    assert!(
        d["oldest_pending_age_s"].is_null(),
        "nothing pending, so no oldest pending age: {d:#}"
    );
    assert_eq!(orthanc.count(), 20, "Orthanc should hold exactly the study");
    assert_in_orthanc(&orthanc, &sent);
    assert!(
        queue_list(&gw, false, None)
            .iter()
            .all(|e| e["state"] == "delivered" && e["destination"] == "pacs"),
        "every queue entry should be delivered"
    );
    eprintln!(
        "[figures] 20 CT 128x128 sent and forwarded to Orthanc in {took:.2?} ({:.1} instances/s end to end)",
        rate(20, took)
    );
}

/// Guards against: one destination missing what another got, and routes that leak or drop
/// instances (`[destination.route] modality = ["CT"]`).
#[test]
fn two_destinations_get_everything_and_a_route_only_its_modality() {
    let orthanc = Orthanc::start_new();
    let archive = StoreScp::start();
    let ctlab = StoreScp::start();
    let mut lab = Dest::new("ctlab", "CTLAB", &ctlab.address());
    lab.route_modality = vec!["CT".into()];
    let gw = start_gateway(
        GatewayConfig::default(),
        &destinations_toml(&[
            Dest::new("pacs", PACS_AE, &orthanc.dicom_address()),
            Dest::new("archive", "ARCHIVE", &archive.address()),
            lab,
        ]),
    );
    let dir = gw.scratch("mixed");
    let ct = data::ct_series(&dir, "ct", 6, 64, 64);
    let sc: Vec<PathBuf> = (1..=3)
        .map(|i| data::sc_8bit(&dir.join(format!("sc-{i}.dcm")), 64, 64))
        .collect();
    let ct_sent = inspect_all(&ct);
    let sc_sent = inspect_all(&sc);
    let all_sent: Vec<FileInfo> = ct_sent.iter().chain(&sc_sent).cloned().collect();

    send_all(&gw, &[ct.clone(), sc.clone()].concat());
    wait_counts(&gw, "pacs", delivered(9), DRAIN_TIMEOUT);
    wait_counts(&gw, "archive", delivered(9), DRAIN_TIMEOUT);
    wait_counts(&gw, "ctlab", delivered(6), DRAIN_TIMEOUT);

    assert_in_orthanc(&orthanc, &all_sent);
    assert_eq!(orthanc.count(), 9);
    assert_eq!(
        archive.received(),
        expected_map(&all_sent),
        "the storescp archive should hold every instance, bytes unchanged"
    );
    assert_eq!(
        ctlab.received(),
        expected_map(&ct_sent),
        "the CT-only destination should hold the CT instances and nothing else"
    );
    let lab_entries = queue_list(&gw, false, Some("ctlab"));
    assert_eq!(
        lab_entries.len(),
        6,
        "only CT is queued for ctlab: {lab_entries:#?}"
    );
    for f in &sc_sent {
        assert!(
            lab_entries
                .iter()
                .all(|e| e["sop_instance_uid"] != f.sop_instance_uid.as_str()),
            "SC instance {} was queued for the CT-only destination",
            f.sop_instance_uid
        );
    }
}

/// Guards against: refusing or losing instances while the PACS is unreachable, a status that
/// hides the outage, and a queue that does not drain by itself once the PACS is back.
#[test]
fn pacs_down_from_the_start_queues_then_drains() {
    let mut orthanc = Orthanc::new("127.0.0.1");
    let gw = start_gateway(
        GatewayConfig::default(),
        &Dest::new("pacs", PACS_AE, &orthanc.dicom_address()).to_toml(),
    );
    let files = data::ct_series(&gw.scratch("down"), "ct", 30, 64, 64);
    let sent = inspect_all(&files);
    send_all(&gw, &files);

    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let st = wait_until(
        Duration::from_secs(30),
        || {
            format!(
                "link down with 30 pending expected; last status {:#}",
                last.borrow()
            )
        },
        || {
            let s = status(&gw);
            let d = dest_status(&s, "pacs").clone();
            *last.borrow_mut() = s.clone();
            (d["link"]["up"] == false
                && d["link"]["last_error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty())
                && counts(&s, "pacs")
                    == Counts {
                        pending: 30,
                        failed: 0,
                        delivered: 0,
                    })
            .then_some(s)
        },
    );
    let d = dest_status(&st, "pacs");
    assert!(
        d["oldest_pending_age_s"].is_u64(),
        "oldest pending age should be reported: {d:#}"
    );
    eprintln!(
        "[figures] PACS down: status reports link down, last_error {}",
        d["link"]["last_error"]
    );

    orthanc.start();
    let t0 = Instant::now();
    let st = wait_counts(&gw, "pacs", delivered(30), DRAIN_TIMEOUT);
    let took = t0.elapsed();
    let d = dest_status(&st, "pacs");
    assert_eq!(d["link"]["up"], true, "link should be up again: {d:#}");
    assert!(
        d["link"]["last_error"].is_null(),
        "last_error clears: {d:#}"
    );
    assert_in_orthanc(&orthanc, &sent);
    eprintln!(
        "[figures] PACS back: 30 queued instances drained {took:.2?} after Orthanc was ready"
    );
}

/// Backlog of small instances queued while the PACS is down.
fn backlog(gw: &Gateway, n: u32) -> Vec<FileInfo> {
    let dir = gw.scratch("backlog");
    let files = data::ct_series(&dir, "ct", n, 32, 32);
    let sent = inspect_all(&files);
    let t0 = Instant::now();
    send_all(gw, &files);
    eprintln!(
        "[figures] {n} CT 32x32 acknowledged by the gateway in {:.2?}",
        t0.elapsed()
    );
    sent
}

/// Guards against: losing the instances in flight when the PACS dies mid-association
/// (connection reset mid-instance, response never sent), and a gateway that stops retrying.
#[test]
fn pacs_killed_repeatedly_during_a_drain_loses_nothing() {
    let _serial = heavy();
    const N: u32 = 200;
    let (mut rng, seed) = data::Rng::from_time();
    eprintln!("pacs kill test seed {seed}");
    let mut orthanc = Orthanc::new("127.0.0.1");
    let gw = start_gateway(
        GatewayConfig::default(),
        &Dest::new("pacs", PACS_AE, &orthanc.dicom_address()).to_toml(),
    );
    let sent = backlog(&gw, N);

    orthanc.start();
    let t0 = Instant::now();
    let mut kills = Vec::new();
    for threshold in [30usize, 80, 130] {
        let at = wait_until(
            DRAIN_TIMEOUT,
            || format!("Orthanc should reach {threshold} instances"),
            || {
                let c = orthanc.count();
                (c >= threshold).then_some(c)
            },
        );
        assert!(
            at < N as usize,
            "the drain finished before kill #{} (Orthanc has {at}); the backlog is too small to \
             test kills on this machine",
            kills.len() + 1
        );
        orthanc.kill();
        let pending = counts(&status(&gw), "pacs").pending;
        kills.push((at, pending));
        std::thread::sleep(Duration::from_millis(rng.range(200, 1500)));
        orthanc.start_again();
    }
    let st = wait_counts(&gw, "pacs", delivered(u64::from(N)), DRAIN_TIMEOUT);
    let took = t0.elapsed();
    assert_eq!(
        orthanc.count(),
        N as usize,
        "Orthanc should hold every instance once"
    );
    assert_in_orthanc(&orthanc, &sent);
    let entries = queue_list(&gw, false, Some("pacs"));
    let attempts: u64 = entries.iter().filter_map(|e| e["attempts"].as_u64()).sum();
    let retried = entries
        .iter()
        .filter(|e| e["attempts"].as_u64().is_some_and(|a| a > 1))
        .count();
    eprintln!(
        "[figures] Orthanc SIGKILLed 3x during a drain of {N}: (Orthanc count, gateway pending incl. in flight just after the kill) at \
         each kill {kills:?}; drained in {took:.2?} including restarts; {attempts} send attempts \
         for {N} entries ({retried} entries needed more than one); duplicates stored by Orthanc: \
         {}; lost: 0; link {}",
        orthanc.log_lines_with("Already stored"),
        dest_status(&st, "pacs")["link"]
    );
}

/// Guards against: a gateway crash mid-drain losing leased (in-flight) entries, losing
/// completions, or damaging the index and spool.
#[test]
fn gateway_killed_repeatedly_during_a_drain_loses_nothing() {
    let _serial = heavy();
    const N: u32 = 200;
    let mut orthanc = Orthanc::new("127.0.0.1");
    let mut gw = start_gateway(
        GatewayConfig::default(),
        &Dest::new("pacs", PACS_AE, &orthanc.dicom_address()).to_toml(),
    );
    let sent = backlog(&gw, N);

    orthanc.start();
    let t0 = Instant::now();
    let mut at_kill = Vec::new();
    let mut last = 0usize;
    for k in 1..=5 {
        let threshold = last + 15;
        let at = wait_until(
            DRAIN_TIMEOUT,
            || format!("Orthanc should reach {threshold} instances before gateway kill #{k}"),
            || {
                let c = orthanc.count();
                (c >= threshold).then_some(c)
            },
        );
        assert!(
            at < N as usize,
            "the drain finished before gateway kill #{k}; the backlog is too small to test kills \
             on this machine"
        );
        gw.kill();
        at_kill.push(at);
        last = at;
        gw.restart();
    }
    wait_counts(&gw, "pacs", delivered(u64::from(N)), DRAIN_TIMEOUT);
    let took = t0.elapsed();
    assert_eq!(orthanc.count(), N as usize);
    assert_in_orthanc(&orthanc, &sent);
    let entries = queue_list(&gw, false, Some("pacs"));
    let attempts: u64 = entries.iter().filter_map(|e| e["attempts"].as_u64()).sum();

    gw.stop();
    let rows = gw.instances();
    assert_eq!(
        rows.len(),
        N as usize,
        "the index should hold every instance"
    );
    assert_stored(&gw, &rows, &sent, "STORESCU");
    eprintln!(
        "[figures] gateway SIGKILLed 5x during a drain of {N}: Orthanc count at each kill \
         {at_kill:?}; drained in {took:.2?} including restarts; {attempts} send attempts for {N} \
         entries; duplicates stored by Orthanc: {}; lost: 0",
        orthanc.log_lines_with("Already stored")
    );
}

fn cli(gw: &Gateway, args: &[&str]) -> common::ToolOutput {
    let mut full: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    full.push("--config".into());
    full.push(gw.config_path().into_os_string());
    gateway_cli(&full)
}

/// Guards against: a refused SOP class blocking or being retried forever, failing silently, or
/// taking other instances with it; `queue retry` not re-sending; `queue purge` without `--yes`.
#[test]
fn sop_class_refused_by_the_pacs_goes_to_the_failed_queue_until_retried() {
    let orthanc = Orthanc::start_new();
    let mut picky = StoreScp::start_accepting(Some(&[CT_IMAGE_STORAGE]));
    let gw = start_gateway(
        GatewayConfig::default(),
        &destinations_toml(&[
            Dest::new("pacs", PACS_AE, &orthanc.dicom_address()),
            Dest::new("picky", "PICKY", &picky.address()),
        ]),
    );
    let dir = gw.scratch("refused");
    let sc: Vec<PathBuf> = (1..=3)
        .map(|i| data::sc_8bit(&dir.join(format!("sc-{i}.dcm")), 64, 64))
        .collect();
    let ct = data::ct_series(&dir, "ct", 4, 64, 64);
    let sc_sent = inspect_all(&sc);
    let ct_sent = inspect_all(&ct);
    let all_sent: Vec<FileInfo> = ct_sent.iter().chain(&sc_sent).cloned().collect();

    // SC alone first: an association whose only proposed context the PACS rejects.
    send_all(&gw, &sc);
    let refused = Counts {
        pending: 0,
        failed: 3,
        delivered: 0,
    };
    wait_counts(&gw, "picky", refused, DRAIN_TIMEOUT);
    // Then CT, which the PACS accepts: not held up by the failed entries.
    send_all(&gw, &ct);
    wait_counts(
        &gw,
        "picky",
        Counts {
            pending: 0,
            failed: 3,
            delivered: 4,
        },
        DRAIN_TIMEOUT,
    );
    wait_counts(&gw, "pacs", delivered(7), DRAIN_TIMEOUT);
    assert_in_orthanc(&orthanc, &all_sent);
    assert_eq!(picky.received(), expected_map(&ct_sent));

    let failed = queue_list(&gw, true, None);
    assert_eq!(failed.len(), 3, "three failed entries: {failed:#?}");
    for e in &failed {
        assert_eq!(e["destination"], "picky", "{e:#}");
        assert_eq!(e["state"], "failed", "{e:#}");
        assert!(
            sc_sent
                .iter()
                .any(|f| e["sop_instance_uid"] == f.sop_instance_uid.as_str()),
            "only SC instances fail: {e:#}"
        );
        let reason = e["last_error"].as_str().unwrap_or_default();
        assert!(
            reason.contains(SECONDARY_CAPTURE_IMAGE_STORAGE),
            "the reason should name the refused SOP class: {e:#}"
        );
        assert!(
            e["last_status"].is_null() || e["last_status"].is_string(),
            "{e:#}"
        );
    }
    eprintln!(
        "[figures] refused SOP class: failed entry {:#}",
        failed.first().cloned().unwrap_or_default()
    );
    let text = cli(&gw, &["queue", "list", "--failed"]);
    text.assert_success();
    assert!(
        text.stdout.contains(SECONDARY_CAPTURE_IMAGE_STORAGE),
        "the table shows the reason: {}",
        text.describe()
    );

    // purge without --yes refuses and drops nothing.
    cli(&gw, &["queue", "purge", "--destination", "picky"])
        .assert_failure()
        .assert_contains("--yes");
    assert_eq!(counts(&status(&gw), "picky"), refused_plus_ct());

    // The PACS is fixed (now accepts every storage class); the operator retries.
    picky.restart_accepting(None);
    cli(&gw, &["queue", "retry", "--destination", "picky"])
        .assert_success()
        .assert_contains("3");
    wait_counts(&gw, "picky", delivered(7), DRAIN_TIMEOUT);
    assert_eq!(picky.received(), expected_map(&all_sent));
    assert!(queue_list(&gw, true, None).is_empty());
    // Nothing failed is left: purge --yes finds nothing to drop.
    cli(&gw, &["queue", "purge", "--yes"])
        .assert_success()
        .assert_contains("0");
    wait_counts(&gw, "picky", delivered(7), Duration::from_secs(5));
}

fn refused_plus_ct() -> Counts {
    Counts {
        pending: 0,
        failed: 3,
        delivered: 4,
    }
}

/// Guards against (DESIGN.md section 3): a permanent A-ASSOCIATE-RJ (the PACS does not know the
/// called AE title: a configuration error) moving entries to the failed queue or losing them
/// instead of keeping them pending, and a status that does not say what is wrong; once the
/// configuration is fixed the queue drains.
#[test]
fn pacs_rejecting_the_association_keeps_entries_pending_until_the_config_is_fixed() {
    let orthanc = Orthanc::start_new();
    let mut gw = start_gateway(
        GatewayConfig::default(),
        &Dest::new("pacs", "NOT_PACS", &orthanc.dicom_address()).to_toml(),
    );
    let files = data::ct_series(&gw.scratch("wrong-ae"), "ct", 5, 64, 64);
    let sent = inspect_all(&files);
    send_all(&gw, &files);

    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let st = wait_until(
        Duration::from_secs(30),
        || {
            format!(
                "link down with a reason expected; last status {:#}",
                last.borrow()
            )
        },
        || {
            let s = status(&gw);
            let d = dest_status(&s, "pacs").clone();
            *last.borrow_mut() = s.clone();
            (d["link"]["up"] == false
                && d["link"]["last_error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty()))
            .then_some(s)
        },
    );
    let reason = dest_status(&st, "pacs")["link"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("NOT_PACS"),
        "the reason should name the called AE title the PACS refused: {reason}"
    );
    // Let a few retry windows (1 to 2 s) pass: the entries stay pending, none fails.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let c = counts(&status(&gw), "pacs");
        assert_eq!(
            c,
            Counts {
                pending: 5,
                failed: 0,
                delivered: 0
            },
            "a rejected association must leave the entries pending"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(orthanc.count(), 0);
    eprintln!("[figures] association rejected: status last_error {reason:?}");

    // The field engineer fixes the AE title and restarts the gateway.
    gw.stop();
    let text = std::fs::read_to_string(gw.config_path()).expect("read config");
    std::fs::write(
        gw.config_path(),
        text.replace("ae_title = \"NOT_PACS\"", "ae_title = \"PACS\""),
    )
    .expect("write config");
    gw.restart();
    wait_counts(&gw, "pacs", delivered(5), DRAIN_TIMEOUT);
    assert_in_orthanc(&orthanc, &sent);
}
