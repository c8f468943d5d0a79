//! Disk pressure: the data filesystem fills up while the PACS is down (DESIGN.md sections 2, 3
//! and 4: A700 at the reserve, eviction of delivered studies only).
//!
//! Failure modes guarded against:
//! - acknowledging (0000) an instance that could not be stored, or refusing with a status a
//!   modality would not retry (anything but A700 Refused: Out of Resources);
//! - a full disk damaging what was acknowledged before (index rows, spool files, checksums) or
//!   leaving temporary files behind;
//! - eviction deleting instances that are not yet delivered (the PACS is down, so nothing may
//!   go), or never freeing space once they are, so that the gateway stays refusing.
//!
//! The data directory is a 200 MiB tmpfs mounted by the test (unmounted when the test ends,
//! also on failure) with `min_free_disk_mb = 50`. `[cache] high_watermark_percent = 50`: with
//! the PACS down nothing is evictable whatever the watermark, and once everything is delivered
//! the cache is over the mark and must be evicted down to `low_watermark_percent = 20`.
//! Needs root (or CAP_SYS_ADMIN) to mount; without it the test prints why and skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::data::{self, FileInfo};
use common::orthanc::{
    append_config, counts, dest_status, status, stopped_gateway, wait_until, Dest, Orthanc, PACS_AE,
};
use common::{assert_stored, store_reports, Gateway, GatewayConfig};

const TMPFS_MB: u64 = 200;
const RESERVE_MB: u64 = 50;
/// Instances of 1024 x 1024 x 16 bits: 2 MiB each, 8 per study.
const ROWS: u16 = 1024;
const PER_STUDY: u32 = 8;
/// More than fits: 14 x 16 MiB > 200 MiB.
const MAX_STUDIES: u32 = 14;
const MIB: u64 = 1 << 20;
/// What DCMTK prints for 0xA700 in `storescu -v` ("Received Store Response (...)").
const A700_TEXT: &str = "Refused: OutOfResources";

/// A tmpfs mounted by the test.
struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(path: &Path, size_mb: u64) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mb}m,mode=0700"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy: detach now, freed when the last user goes.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        self.mounted = false;
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The gateway on the tmpfs: on drop the daemon is killed first, then the tmpfs unmounted,
/// then the gateway's temporary directory removed.
struct OnTmpfs {
    gw: Gateway,
    tmpfs: Tmpfs,
}

impl Drop for OnTmpfs {
    fn drop(&mut self) {
        if self.gw.is_running() {
            self.gw.kill();
        }
        self.tmpfs.unmount();
    }
}

/// The DIMSE status storescu `-d` printed for its C-STORE-RSP, as a number.
fn debug_statuses(output: &str) -> Vec<u16> {
    output
        .lines()
        .filter(|l| l.contains("DIMSE Status"))
        .filter_map(|l| {
            let hex = l.split("0x").nth(1)?;
            u16::from_str_radix(hex.get(..4)?, 16).ok()
        })
        .collect()
}

fn free_bytes(gw: &Gateway) -> u64 {
    status(gw)["disk_free_bytes"]
        .as_u64()
        .expect("disk_free_bytes")
}

#[test]
fn full_disk_refuses_with_a700_keeps_what_was_acknowledged_and_recovers() {
    let config = GatewayConfig {
        min_free_disk_mb: RESERVE_MB,
        ..GatewayConfig::default()
    };
    let gw = stopped_gateway(config);
    let tmpfs = match Tmpfs::mount(&gw.data_dir(), TMPFS_MB) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "SKIPPED disk_pressure: cannot mount a {TMPFS_MB} MiB tmpfs on {} ({e}); this \
                 test needs root or CAP_SYS_ADMIN",
                gw.data_dir().display()
            );
            return;
        }
    };
    let mut s = OnTmpfs { gw, tmpfs };
    let mut orthanc = Orthanc::new("127.0.0.1");
    append_config(
        &s.gw,
        &format!(
            "{}\n[cache]\nhigh_watermark_percent = 50\nlow_watermark_percent = 20\n",
            Dest::new("pacs", PACS_AE, &orthanc.dicom_address()).to_toml()
        ),
    );
    s.gw.restart();

    // Phase 1: PACS down; send studies until the gateway refuses.
    let mut acked: Vec<FileInfo> = Vec::new();
    let mut refused: Vec<(PathBuf, String)> = Vec::new();
    let mut studies = 0;
    while refused.is_empty() {
        studies += 1;
        assert!(
            studies <= MAX_STUDIES,
            "{} MiB sent into a {TMPFS_MB} MiB tmpfs with a {RESERVE_MB} MiB reserve and nothing \
             was refused",
            acked.len() as u64 * 2
        );
        let dir = s.gw.scratch(&format!("study-{studies}"));
        let files = data::SeriesSpec::new(ROWS, ROWS).write_series(&dir, "ct", PER_STUDY);
        let out = s.gw.storescu().args(["-v", "-nh"]).files(&files).run();
        let reports = store_reports(&out.text());
        assert_eq!(
            reports.len(),
            files.len(),
            "every C-STORE should be answered: {}",
            out.describe()
        );
        for r in reports {
            if r.is_success() {
                acked.push(data::inspect(&r.file));
            } else {
                refused.push((r.file.clone(), r.status.clone()));
            }
        }
    }
    for (f, st) in &refused {
        assert_eq!(
            st,
            A700_TEXT,
            "{} refused with the wrong status",
            f.display()
        );
    }
    let free_at_refusal = free_bytes(&s.gw);
    assert!(
        free_at_refusal < RESERVE_MB * MIB,
        "refusing while {} MiB are free, above the {RESERVE_MB} MiB reserve",
        free_at_refusal / MIB
    );
    // The exact status: one more instance with storescu -d, which prints it in hex.
    let probe = data::ct_series(&s.gw.scratch("probe"), "probe", 1, ROWS, ROWS);
    let out = s.gw.storescu().arg("-d").files(&probe).run();
    let st = debug_statuses(&out.text());
    assert_eq!(
        st,
        vec![0xA700],
        "still refused with A700 while the disk is full: {}",
        out.describe()
    );
    assert!(
        s.gw.wait_for_log_words(Duration::from_secs(5), &["disk reserve reached"])
            .is_some(),
        "the gateway should log that the reserve was reached"
    );
    s.gw.assert_no_unfinished_within(Duration::from_secs(10));
    let st = status(&s.gw);
    assert_eq!(
        counts(&st, "pacs").pending,
        acked.len() as u64,
        "every acknowledged instance is queued: {st:#}"
    );
    eprintln!(
        "[figures] {} instances (2 MiB) acknowledged, then {} refused with A700 at {} MiB free \
         (reserve {RESERVE_MB} MiB)",
        acked.len(),
        refused.len(),
        free_at_refusal / MIB
    );

    // Everything acknowledged is intact; nothing refused was indexed.
    s.gw.stop();
    let rows = s.gw.instances();
    assert_eq!(
        rows.len(),
        acked.len(),
        "exactly the acknowledged instances are indexed"
    );
    assert_stored(&s.gw, &rows, &acked, "STORESCU");
    assert_eq!(
        s.gw.stored_records().len(),
        acked.len(),
        "one intact record each"
    );
    assert!(s.gw.unfinished_records().is_empty(), "no unfinished record");

    // Phase 2: the PACS comes back; the queue drains, eviction frees space, sends succeed.
    s.gw.restart();
    orthanc.start();
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(120),
        || format!("Orthanc should receive {} instances", acked.len()),
        || (orthanc.count() == acked.len()).then_some(()),
    );
    wait_until(
        Duration::from_secs(30),
        || "nothing pending or failed".into(),
        || {
            let c = counts(&status(&s.gw), "pacs");
            (c.pending == 0 && c.failed == 0).then_some(())
        },
    );
    let drained = t0.elapsed();
    let have = orthanc.instance_map();
    for f in &acked {
        let inst = have
            .get(&f.sop_instance_uid)
            .unwrap_or_else(|| panic!("{} not in Orthanc", f.sop_instance_uid));
        assert_eq!(
            orthanc.dataset_checksum(&inst.id),
            f.checksum,
            "{}",
            f.sop_instance_uid
        );
    }
    let t1 = Instant::now();
    let free_after = wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "eviction should bring the tmpfs down to the low watermark (20 %); status {:#}",
                status(&s.gw)
            )
        },
        || {
            // tmpfs: free = total - used, so at most 20 % used is at least 80 % free.
            let free = free_bytes(&s.gw);
            (free >= TMPFS_MB * MIB * 80 / 100).then_some(free)
        },
    );
    let evicted_after = t1.elapsed();
    assert!(
        s.gw.logs().contains("evicted delivered study"),
        "eviction should be logged"
    );
    let st = status(&s.gw);
    assert!(
        dest_status(&st, "pacs")["link"]["up"] == true,
        "link up: {st:#}"
    );

    let again = data::ct_series(&s.gw.scratch("after"), "after", PER_STUDY, ROWS, ROWS);
    let out = s.gw.storescu().arg("-v").files(&again).run();
    let reports = store_reports(&out.text());
    assert!(
        reports.len() == again.len() && reports.iter().all(|r| r.is_success()),
        "sends succeed again once space is freed: {}",
        out.describe()
    );
    wait_until(
        Duration::from_secs(60),
        || "the new study should be forwarded".into(),
        || (orthanc.count() == acked.len() + again.len()).then_some(()),
    );
    eprintln!(
        "[figures] PACS back: {} instances ({} MiB) drained in {drained:.2?}; eviction brought \
         free space to {} MiB (low watermark reached) {evicted_after:.2?} later; a new study of {PER_STUDY} was accepted",
        acked.len(),
        acked.len() as u64 * 2,
        free_after / MIB
    );
}
