//! Queue state machine against a reference model: every transition keeps the counts, the
//! `ready` / `inflight` / `failed` tables and the entry states in step, and nothing vanishes.

use super::*;
use crate::store::index::{self, InstanceRecord};

fn record(sop: &str) -> InstanceRecord {
    InstanceRecord {
        sop_instance_uid: sop.into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        study_instance_uid: "1.2.3".into(),
        series_instance_uid: "1.2.3.4".into(),
        patient_id: String::new(),
        modality: "CT".into(),
        accession_number: String::new(),
        study_date: String::new(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        size: 1,
        checksum: blake3::hash(sop.as_bytes()).into(),
        calling_ae: "CT01".into(),
        received_at_ms: 1,
        state: 0,
        location: Default::default(),
    }
}

fn db_with(sops: &[(&str, bool)], dests: &[&str]) -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let (db, clean) = index::open(dir.path(), 1 << 20).unwrap();
    assert!(clean, "a new index counts as clean");
    let dests: Vec<String> = dests.iter().map(|d| (*d).to_owned()).collect();
    let txn = db.begin_write().unwrap();
    for (sop, high) in sops {
        index::put(&txn, &record(sop), None).unwrap();
        enqueue(&txn, sop, &dests, *high).unwrap();
    }
    txn.commit().unwrap();
    (dir, db)
}

fn counts(db: &Database, d: &str) -> Counts {
    stats(db, d).unwrap().0
}

#[test]
fn lease_order_is_priority_then_arrival_and_per_destination() {
    let (_d, db) = db_with(
        &[("1.1", false), ("1.2", false), ("1.3", true)],
        &["a", "b"],
    );
    let got: Vec<String> = lease(&db, "a", 10, 1)
        .unwrap()
        .into_iter()
        .map(|l| l.sop_instance_uid)
        .collect();
    assert_eq!(got, vec!["1.3", "1.1", "1.2"]);
    // Destination b is untouched by a's lease.
    assert_eq!(counts(&db, "b").pending, 3);
    assert_eq!(lease(&db, "b", 1, 1).unwrap().len(), 1);
    // Nothing left to lease for a while it is in flight.
    assert!(lease(&db, "a", 10, 1).unwrap().is_empty());
}

#[test]
fn completions_move_entries_and_counts() {
    let (_d, db) = db_with(&[("1.1", false), ("1.2", false), ("1.3", false)], &["a"]);
    let leased = lease(&db, "a", 10, 1).unwrap();
    let results = vec![
        (leased[0].clone(), Completion::Delivered { status: 0 }),
        (
            leased[1].clone(),
            Completion::Retry {
                status: Some(0xA700),
                error: "busy".into(),
                attempted: true,
            },
        ),
        (
            leased[2].clone(),
            Completion::Failed {
                status: Some(0xA900),
                error: "mismatch".into(),
            },
        ),
    ];
    complete(&db, "a", &results, None).unwrap();
    assert_eq!(
        counts(&db, "a"),
        Counts {
            pending: 1,
            failed: 1,
            delivered: 1
        }
    );
    let failed = list(&db, Some("a"), Some(State::Failed), 10).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].1, "1.3");
    assert_eq!(failed[0].2.last_status, Some(0xA900));
    // The retried one is pending again and leasable.
    let again = lease(&db, "a", 10, 1).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].sop_instance_uid, "1.2");
    // Operator retry brings the failed one back; purge of nothing failed is a no-op.
    let (n, dests) = retry_failed(
        &db,
        &Selector {
            dest: None,
            sop: None,
        },
    )
    .unwrap();
    assert_eq!((n, dests), (1, vec!["a".to_owned()]));
    assert_eq!(
        counts(&db, "a"),
        Counts {
            pending: 2,
            failed: 0,
            delivered: 1
        }
    );
    assert_eq!(
        purge_failed(
            &db,
            &Selector {
                dest: Some("a"),
                sop: None
            }
        )
        .unwrap(),
        0
    );
}

#[test]
fn purge_drops_only_failed_entries() {
    let (_d, db) = db_with(&[("1.1", false), ("1.2", false)], &["a"]);
    let leased = lease(&db, "a", 10, 1).unwrap();
    complete(
        &db,
        "a",
        &[
            (
                leased[0].clone(),
                Completion::Failed {
                    status: Some(0x0122),
                    error: "sop class".into(),
                },
            ),
            (
                leased[1].clone(),
                Completion::Retry {
                    status: None,
                    error: "down".into(),
                    attempted: true,
                },
            ),
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        purge_failed(
            &db,
            &Selector {
                dest: None,
                sop: Some("1.1")
            }
        )
        .unwrap(),
        1
    );
    assert_eq!(
        counts(&db, "a"),
        Counts {
            pending: 1,
            failed: 0,
            delivered: 0
        }
    );
    assert!(list(&db, None, Some(State::Failed), 10).unwrap().is_empty());
}

#[test]
fn in_flight_entries_return_to_pending_at_start() {
    let (_d, db) = db_with(&[("1.1", false), ("1.2", true)], &["a"]);
    assert_eq!(lease(&db, "a", 10, 1).unwrap().len(), 2);
    assert_eq!(recover_in_flight(&db).unwrap(), 2);
    let got: Vec<String> = lease(&db, "a", 10, 1)
        .unwrap()
        .into_iter()
        .map(|l| l.sop_instance_uid)
        .collect();
    assert_eq!(
        got,
        vec!["1.2", "1.1"],
        "priority and order survive recovery"
    );
    assert_eq!(counts(&db, "a").pending, 2);
}

#[test]
fn give_up_after_moves_old_retries_to_failed() {
    let (_d, db) = db_with(&[("1.1", false)], &["a"]);
    let leased = lease(&db, "a", 10, 1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    complete(
        &db,
        "a",
        &[(
            leased[0].clone(),
            Completion::Retry {
                status: None,
                error: "down".into(),
                attempted: true,
            },
        )],
        Some(1),
    )
    .unwrap();
    let failed = list(&db, Some("a"), Some(State::Failed), 10).unwrap();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].2.last_error.contains("gave up"),
        "{}",
        failed[0].2.last_error
    );
}

#[test]
fn new_version_requeues_delivered_and_marks_in_flight_for_resend() {
    let (_d, db) = db_with(&[("1.1", false), ("1.2", false)], &["a"]);
    let leased = lease(&db, "a", 10, 1).unwrap();
    complete(
        &db,
        "a",
        &[(leased[0].clone(), Completion::Delivered { status: 0 })],
        None,
    )
    .unwrap();
    // 1.1 delivered, 1.2 in flight; a new version of both arrives.
    let txn = db.begin_write().unwrap();
    enqueue(&txn, "1.1", &["a".to_owned()], false).unwrap();
    enqueue(&txn, "1.2", &["a".to_owned()], false).unwrap();
    txn.commit().unwrap();
    complete(
        &db,
        "a",
        &[(leased[1].clone(), Completion::Delivered { status: 0 })],
        None,
    )
    .unwrap();
    let got: Vec<String> = lease(&db, "a", 10, 1)
        .unwrap()
        .into_iter()
        .map(|l| l.sop_instance_uid)
        .collect();
    assert_eq!(got.len(), 2, "both versions are sent again: {got:?}");
    assert_eq!(counts(&db, "a").pending, 2);
}

#[test]
fn entries_never_sent_do_not_count_attempts() {
    let (_d, db) = db_with(&[("1.1", false)], &["a"]);
    for _ in 0..3 {
        let leased = lease(&db, "a", 10, 1).unwrap();
        let not_sent = Completion::Retry {
            status: None,
            error: "connection refused".into(),
            attempted: false,
        };
        complete(&db, "a", &[(leased[0].clone(), not_sent)], None).unwrap();
    }
    let e = &list(&db, Some("a"), None, 10).unwrap()[0].2;
    assert_eq!(e.attempts, 0);
    assert_eq!(e.last_error, "connection refused");
}

/// Workers split a short backlog: each lease takes at most its share of what is pending or in
/// flight, and never nothing while something is due.
#[test]
fn a_lease_takes_at_most_its_share_of_the_backlog() {
    let items: Vec<(String, bool)> = (0..10).map(|n| (format!("1.{n}"), false)).collect();
    let refs: Vec<(&str, bool)> = items.iter().map(|(s, h)| (s.as_str(), *h)).collect();
    let (_d, db) = db_with(&refs, &["a"]);
    // 10 pending, 4 workers: ceil(10 / 4) = 3, though 32 were asked for.
    assert_eq!(lease(&db, "a", 32, 4).unwrap().len(), 3);
    // Still 10 pending or in flight: the next worker gets 3 as well, and so on.
    assert_eq!(lease(&db, "a", 32, 4).unwrap().len(), 3);
    assert_eq!(lease(&db, "a", 32, 4).unwrap().len(), 3);
    assert_eq!(lease(&db, "a", 32, 4).unwrap().len(), 1);
    assert!(lease(&db, "a", 32, 4).unwrap().is_empty());
    // `max` still bounds a lease when the share is larger.
    let (_d, db) = db_with(&refs, &["a"]);
    assert_eq!(lease(&db, "a", 2, 1).unwrap().len(), 2);
}
