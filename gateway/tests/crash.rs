//! Crash safety of the acknowledgement (DESIGN.md section 2): an instance answered with
//! C-STORE-RSP Success survives a SIGKILL of the daemon at any moment.
//!
//! Guards against: Success sent before the segment record is flushed or before the index commit
//! has returned; a group commit that answers instances it did not contain; start-up recovery
//! that loses rows or leaves unfinished records; a restart that refuses duplicates of instances
//! that were stored but not acknowledged.
//!
//! storescu (`-v`) sends a batch of small CT images; after a random delay (50 to 800 ms, from
//! a printed seed; set `DGW_CRASH_SEED` to replay) the gateway is SIGKILLed. Every file
//! storescu saw answered with Success must then be in the index with its checksum and be
//! exported byte for byte, and no unfinished record may be left after the restart. Unacknowledged files are sent again in the next round.
//! The batch grows while storescu finishes before the kill, so most kills land mid-transfer.
//!
//! The gateway starts with 8 spare segments (docs/durability.md): the first rounds write into
//! segments made of them, the later ones, once they are used up, into appended segments.
//!
//! Limitation: a SIGKILL leaves the kernel's page cache intact, so this checks the order of
//! acknowledgement and commit and the start-up recovery, not the fsyncs themselves; losing
//! power is for `hw-tests/` (or a dm-log-writes replay).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::data::{self, FileInfo, Rng, SeriesSpec};
use common::{store_reports, Gateway, GatewayConfig};

const KILLS: usize = 20;
const FIRST_BATCH: usize = 60;
const MAX_BATCH: usize = 480;

#[test]
fn acknowledged_instances_survive_sigkill() {
    let started = Instant::now();
    let (mut rng, seed) = match std::env::var("DGW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => (Rng::new(seed), seed),
        None => Rng::from_time(),
    };
    eprintln!("crash test seed: {seed} (DGW_CRASH_SEED={seed} replays the kill delays)");

    // The first rounds write into segments made of spares (written in advance, so a record
    // does not grow the file), the later ones into appended segments.
    let mut gw = Gateway::start(GatewayConfig {
        spare_segments: 8,
        ..GatewayConfig::default()
    });
    let dir = gw.scratch("crash");
    let series = SeriesSpec::new(64, 64);
    let mut next_number = 1u32;
    let mut by_path: HashMap<PathBuf, FileInfo> = HashMap::new();
    let mut by_uid: HashMap<String, FileInfo> = HashMap::new();
    // Generated but not yet acknowledged, in sending order.
    let mut pending: Vec<PathBuf> = Vec::new();
    // Acknowledged with Success: SOP Instance UID -> file.
    let mut acked: BTreeMap<String, FileInfo> = BTreeMap::new();
    let mut batch_size = FIRST_BATCH;
    let (mut interrupted, mut losses) = (0usize, Vec::<String>::new());

    for kill in 1..=KILLS {
        while pending.len() < batch_size {
            let path = series.write_ct(&dir.join(format!("img-{next_number:05}.dcm")), next_number);
            let info = data::as_sent_by_storescu(&path);
            by_uid.insert(info.sop_instance_uid.clone(), info.clone());
            by_path.insert(path.clone(), info);
            pending.push(path);
            next_number += 1;
        }
        let batch: Vec<PathBuf> = pending.iter().take(batch_size).cloned().collect();
        let scu = gw
            .storescu()
            .arg("-v")
            .arg("-xe")
            .files(&batch)
            .timeout(Duration::from_secs(60))
            .spawn();
        let delay = rng.range(50, 800);
        std::thread::sleep(Duration::from_millis(delay));
        gw.kill();
        let out = scu.wait();

        let reports = store_reports(&out.text());
        for r in &reports {
            assert!(
                r.is_success(),
                "kill {kill}: {} was answered {:?} (only Success or no answer is expected): {}",
                r.file.display(),
                r.status,
                out.describe()
            );
            let info = by_path.get(&r.file).unwrap_or_else(|| {
                panic!("storescu reported an unknown file {}", r.file.display())
            });
            acked.insert(info.sop_instance_uid.clone(), info.clone());
        }
        let completed = out.success() && reports.len() == batch.len();
        if completed {
            batch_size = (batch_size * 2).min(MAX_BATCH);
        } else {
            interrupted += 1;
        }
        pending.retain(|p| !acked.contains_key(&by_path[p].sop_instance_uid));
        eprintln!(
            "kill {kill:2}: after {delay:3} ms, {:3}/{:3} acknowledged{}",
            reports.len(),
            batch.len(),
            if completed {
                " (storescu finished before the kill)"
            } else {
                ""
            }
        );

        // Recovery: READY only after unfinished records are cut and the index brought up to the
        // segments.
        gw.restart();
        let left = gw.unfinished_records();
        assert!(
            left.is_empty(),
            "kill {kill}: unfinished records after recovery: {left:?}"
        );
        gw.stop();

        let rows = gw.instances();
        let exported = gw.export_all();
        let row_of: HashMap<&str, &common::InstanceJson> = rows
            .iter()
            .map(|r| (r.sop_instance_uid.as_str(), r))
            .collect();
        assert_eq!(
            row_of.len(),
            rows.len(),
            "kill {kill}: an instance is indexed twice"
        );
        for (uid, info) in &acked {
            match row_of.get(uid.as_str()) {
                None => losses.push(format!(
                    "kill {kill}: acknowledged {uid} ({}) is not indexed",
                    info.path.display()
                )),
                Some(r) if r.checksum != info.checksum || r.size != info.size => {
                    losses.push(format!(
                        "kill {kill}: {uid} indexed with size {} checksum {}, sent {} {}",
                        r.size, r.checksum, info.size, info.checksum
                    ))
                }
                Some(r) => common::assert_exported_file(
                    &exported.join(format!("{}.dcm", r.sop_instance_uid)),
                    r,
                ),
            }
        }
        // Rows of instances that were received but not yet acknowledged must be intact too.
        for r in &rows {
            let info = by_uid.get(&r.sop_instance_uid).unwrap_or_else(|| {
                panic!("kill {kill}: the index holds an instance never sent: {r:?}")
            });
            assert_eq!(
                r.checksum, info.checksum,
                "kill {kill}: unacknowledged row {} corrupt",
                r.sop_instance_uid
            );
        }
        gw.restart();
    }
    eprintln!(
        "crash test: {KILLS} kills ({interrupted} mid-transfer), {} instances acknowledged, {} losses, {:.1?}",
        acked.len(),
        losses.len(),
        started.elapsed()
    );
    assert!(
        losses.is_empty(),
        "acknowledged instances lost:\n{}",
        losses.join("\n")
    );
    assert!(
        interrupted > 0,
        "no kill landed during a transfer; the test proved nothing"
    );

    // Send whatever was never acknowledged, without a kill: all of it must be accepted,
    // including instances stored before a kill but not acknowledged (duplicates).
    if !pending.is_empty() {
        let out = gw.storescu().arg("-v").arg("-xe").files(&pending).run();
        out.assert_success();
        let reports = store_reports(&out.text());
        assert_eq!(reports.len(), pending.len(), "{}", out.describe());
        for r in &reports {
            assert!(
                r.is_success(),
                "{} answered {:?}",
                r.file.display(),
                r.status
            );
            let info = &by_path[&r.file];
            acked.insert(info.sop_instance_uid.clone(), info.clone());
        }
    }
    gw.stop();
    let rows = gw.instances();
    let expected: Vec<FileInfo> = by_path.values().cloned().collect();
    assert_eq!(
        rows.len(),
        expected.len(),
        "every generated instance exactly once"
    );
    common::assert_stored(&gw, &rows, &expected, "STORESCU");
}
