//! The machine's own limits, measured in the same run: durable sequential write (`dd ...
//! conv=fsync`), durable file-per-instance writes (create, write, fsync: what every receiver
//! that fsyncs pays per instance), and loopback TCP (iperf3).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{free_port, run_timed, Proc, Res, Tools};

/// `dd if=/dev/zero of=... bs=1M count=mib conv=fsync`; MB/s (10^6 bytes), fsync included.
pub fn dd_fsync(dir: &Path, mib: u64, log: &Path) -> Res<f64> {
    let file = dir.join("dd.tmp");
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync"]);
    let r = run_timed(cmd, Duration::from_secs(600), log);
    let _ = std::fs::remove_file(&file);
    let (elapsed, _) = r?;
    Ok((mib * (1 << 20)) as f64 / 1e6 / elapsed.as_secs_f64())
}

/// `count` files of `size` bytes each created, written and fsynced (then closed), by `threads`
/// threads at once; returns files per second.
pub fn file_fsync(dir: &Path, count: u32, size: usize, threads: u32) -> Res<f64> {
    let d = dir.join(format!("fsync-{size}-{threads}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size];
    let mut xof = blake3::Hasher::new().update(b"fsync").finalize_xof();
    xof.fill(&mut buf);
    let buf = std::sync::Arc::new(buf);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (d, buf) = (d.clone(), buf.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                for i in (t..count).step_by(threads as usize) {
                    let mut f = File::create(d.join(format!("{i}.dcm")))?;
                    f.write_all(&buf)?;
                    f.sync_all()?;
                }
                Ok(())
            })
        })
        .collect();
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e.to_string()),
            Err(_) => result = Err("fsync thread panicked".into()),
        }
    }
    let elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(&d);
    result?;
    Ok(f64::from(count) / elapsed.as_secs_f64())
}

/// iperf3 TCP throughput in Mbit/s (received, all `streams` together) from this namespace to
/// `host`; the server runs in `server_ns` when given.
pub fn iperf3(
    tools: &Tools,
    host: &str,
    server_ns: Option<&str>,
    secs: u32,
    streams: u32,
    dir: &Path,
) -> Res<f64> {
    let bin = tools.iperf3.as_ref().ok_or("iperf3 is not installed")?;
    let port = free_port()?;
    let mut server = match server_ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    server.args(["-s", "-1", "-p", &port.to_string()]);
    let mut server = Proc::spawn("iperf3 -s", server, &dir.join("iperf3-server.log"))?;
    // The server needs a moment to listen; retry the client briefly.
    let mut last = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let mut client = Command::new(bin);
        client.args([
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]);
        match run_timed(
            client,
            Duration::from_secs(u64::from(secs) + 30),
            &dir.join("iperf3-client.log"),
        ) {
            Ok((_, out)) => {
                server.stop(Duration::from_secs(5));
                let v: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| format!("iperf3 -J: {e}"))?;
                return v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .map(|b| b / 1e6)
                    .ok_or_else(|| "iperf3 -J: no end.sum_received".into());
            }
            Err(e) => last = e,
        }
    }
    Err(format!("iperf3 client failed: {last}"))
}

/// `count` records of `size` bytes written one after another into one file, with `fdatasync`
/// after every `batch` records: the flush cost of a segment spool, for comparison with
/// [`file_fsync`] (a new file, its inode and directory entry per instance). `prewritten`: the
/// file was filled and fsynced beforehand, so no block allocation or size change remains;
/// otherwise each record extends the file (what the gateway's segments do). Returns records
/// per second.
pub fn segment_fdatasync(
    dir: &Path,
    count: u32,
    size: usize,
    batch: u32,
    prewritten: bool,
) -> Res<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("segment-{size}-{batch}"));
    let total = u64::from(count) * size as u64;
    let r = (|| -> std::io::Result<f64> {
        let f = File::create(&path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = if prewritten { total } else { 0 };
        while left > 0 {
            let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
            f.write_all_at(&zeros[..n], total - left)?;
            left -= n as u64;
        }
        f.sync_all()?;
        let mut rec = vec![0u8; size];
        blake3::Hasher::new()
            .update(b"segment")
            .finalize_xof()
            .fill(&mut rec);
        let start = Instant::now();
        for i in 0..count {
            f.write_all_at(&rec, u64::from(i) * size as u64)?;
            if (i + 1) % batch == 0 || i + 1 == count {
                f.sync_data()?;
            }
        }
        Ok(f64::from(count) / start.elapsed().as_secs_f64())
    })();
    let _ = std::fs::remove_file(&path);
    r.map_err(|e| e.to_string())
}
