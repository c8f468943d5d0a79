//! Benchmark harness for dicom-gateway (issue 6): the gateway against DCMTK `storescp`,
//! Orthanc and dicom-rs `dicom-storescp`, on this machine, interleaved (A B A B ...), with
//! medians, per-pair ratios, the machine's own ceilings and whether each receiver fsyncs.
//!
//! ```text
//! cargo run --release -p dicom-gateway-bench              # full run, writes docs/benchmarks.md
//! cargo run -p dicom-gateway-bench -- --smoke             # CI: small data, 1 repetition, < 60 s
//! ```
//!
//! Options: `--reps N` (default 5), `--work DIR` (generated data, the cached 1 M-instance index,
//! scratch; default `$XDG_CACHE_HOME/dicom-gateway-bench` or `~/.cache/dicom-gateway-bench`),
//! `--out FILE` (default `docs/benchmarks.md`; smoke: `WORK/smoke-report.md`), `--only
//! ceilings,fsync,ct1,ct4,small1,small4,rss,drain,wan,startup`, `--index-size N` (default
//! 1000000), `--gateway PATH` (default: built by cargo in this profile), `--no-install`.
//!
//! Full mode installs missing peers (`apt-get install dcmtk orthanc iperf3 strace`; `cargo
//! install dicom-storescp --version 0.10.1 --locked` into `~/.cargo/bin`). Smoke mode installs
//! nothing and skips absent peers, saying so; it fails only if a measurement that ran produced
//! no number. Needs root for the WAN emulation (network namespaces); without it that part is
//! skipped with the reason.

mod ceilings;
mod data;
mod procs;
mod report;
mod scu;
mod wan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use data::FileSet;
use procs::{settle, storescu, Dest, Peer, Receiver, Res, StartOpts, Tools};
use report::{pair_ratios, Contender, Row};

const SEND_TIMEOUT: Duration = Duration::from_secs(900);

const SECTIONS: [&str; 10] = [
    "ceilings", "fsync", "ct1", "ct4", "small1", "small4", "rss", "drain", "wan", "startup",
];

struct Opts {
    smoke: bool,
    reps: usize,
    work: PathBuf,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    index_size: u64,
    gateway: Option<PathBuf>,
    no_install: bool,
    args: Vec<String>,
}

impl Opts {
    fn parse() -> Res<Opts> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let mut o = Opts {
            smoke: false,
            reps: 5,
            work: cache.join("dicom-gateway-bench"),
            out: None,
            only: None,
            index_size: 1_000_000,
            gateway: None,
            no_install: false,
            args: args.clone(),
        };
        let mut reps = None;
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--smoke" => o.smoke = true,
                "--reps" => reps = Some(val()?.parse().map_err(|e| format!("--reps: {e}"))?),
                "--work" => o.work = PathBuf::from(val()?),
                "--out" => o.out = Some(PathBuf::from(val()?)),
                "--only" => {
                    let v: Vec<String> = val()?.split(',').map(str::to_owned).collect();
                    if let Some(bad) = v.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                        return Err(format!(
                            "--only: unknown section {bad}; known: {SECTIONS:?}"
                        ));
                    }
                    o.only = Some(v);
                }
                "--index-size" => {
                    o.index_size = val()?.parse().map_err(|e| format!("--index-size: {e}"))?;
                }
                "--gateway" => o.gateway = Some(PathBuf::from(val()?)),
                "--no-install" => o.no_install = true,
                // `cargo bench` passes this to harness = false targets; harmless here.
                "--bench" => {}
                "-h" | "--help" => {
                    println!("{}", USAGE.trim());
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}\n{}", USAGE.trim())),
            }
        }
        o.reps = reps.unwrap_or(if o.smoke { 1 } else { 5 });
        if o.smoke {
            o.work = o.work.join("smoke");
        }
        Ok(o)
    }

    fn enabled(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|v| v.iter().any(|s| s == section))
    }
}

const USAGE: &str = "
dicom-gateway-bench [--smoke] [--reps N] [--work DIR] [--out FILE] [--only SECTIONS]
                    [--index-size N] [--gateway PATH] [--no-install]
  full run:  cargo run --release -p dicom-gateway-bench
  smoke:     cargo run -p dicom-gateway-bench -- --smoke
  sections:  ceilings,fsync,ct1,ct4,small1,small4,rss,drain,wan,startup
";

/// Data and run sizes: the issue's in full mode, tiny in smoke mode.
struct Sizes {
    ct: u32,
    small: u32,
    mf_frames: u32,
    index: u64,
    dd_mib: u64,
    fsync_files: u32,
    iperf_secs: u32,
}

impl Sizes {
    fn new(o: &Opts) -> Sizes {
        if o.smoke {
            Sizes {
                ct: 8,
                small: 40,
                mf_frames: 16,
                index: o.index_size.min(2_000),
                dd_mib: 32,
                fsync_files: 20,
                iperf_secs: 1,
            }
        } else {
            Sizes {
                ct: 500,
                small: 2_000,
                mf_frames: 512,
                index: o.index_size,
                dd_mib: 1_024,
                fsync_files: 400,
                iperf_secs: 3,
            }
        }
    }
}

/// Everything a measurement needs.
struct Ctx {
    tools: Tools,
    smoke: bool,
    reps: usize,
    work: PathBuf,
    run: PathBuf,
    log: PathBuf,
    ct: FileSet,
    small: FileSet,
    mf: FileSet,
}

/// The machine's ceilings measured in this run.
#[derive(Default)]
struct Ceil {
    dd: Option<f64>,
    ct_file1: Option<f64>,
    ct_file4: Option<f64>,
    small_file1: Option<f64>,
    small_file4: Option<f64>,
    loopback_mbit: Option<f64>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Res<ExitCode> {
    let started = Instant::now();
    let opts = Opts::parse()?;
    let sizes = Sizes::new(&opts);
    let load_before = loadavg();
    println!(
        "bench: {} mode, {} repetition(s), work dir {}",
        if opts.smoke { "smoke" } else { "full" },
        opts.reps,
        opts.work.display()
    );
    std::fs::create_dir_all(&opts.work).map_err(|e| format!("{}: {e}", opts.work.display()))?;
    let build_start = Instant::now();
    let gateway = match &opts.gateway {
        Some(p) => p
            .canonicalize()
            .map_err(|e| format!("--gateway {}: {e}", p.display()))?,
        None => build_gateway()?,
    };
    let build_time = build_start.elapsed();
    println!(
        "bench: gateway binary {} ready ({:.0} s)",
        gateway.display(),
        build_time.as_secs_f64()
    );
    let mut tools = Tools::find(gateway);
    let mut notes: Vec<String> = Vec::new();
    if !opts.smoke && !opts.no_install {
        install_peers(&mut tools, &mut notes);
    }
    for (name, have) in [
        (
            "DCMTK (storescp, storescu, echoscu)",
            tools.storescp.is_some() && tools.storescu.is_some() && tools.echoscu.is_some(),
        ),
        ("Orthanc", tools.orthanc.is_some()),
        ("dicom-rs dicom-storescp", tools.dicom_storescp.is_some()),
        ("iperf3", tools.iperf3.is_some()),
        ("strace", tools.strace.is_some()),
    ] {
        if !have {
            let n = format!("{name} is not installed: its measurements are skipped");
            println!("bench: NOTE {n}");
            notes.push(n);
        }
    }
    if tools.storescu.is_none() || tools.echoscu.is_none() {
        return Err(
            "DCMTK storescu/echoscu are needed as the sender for every measurement \
                    (apt-get install dcmtk)"
                .into(),
        );
    }

    let gen_start = Instant::now();
    let data_dir = opts.work.join("data");
    let ct = data::ct_set(&data_dir.join("ct"), sizes.ct, 512, 512, 4)
        .map_err(|e| format!("generating CT: {e}"))?;
    let small = data::ct_set(&data_dir.join("small"), sizes.small, 64, 64, 4)
        .map_err(|e| format!("generating small instances: {e}"))?;
    let mf = data::multiframe(&data_dir.join("multiframe"), sizes.mf_frames)
        .map_err(|e| format!("generating the multi-frame instance: {e}"))?;
    println!(
        "bench: data ready in {:.1} s: CT {} x {:.0} KB, small {} x {:.1} KB, multi-frame {:.0} MiB",
        gen_start.elapsed().as_secs_f64(),
        ct.count,
        ct.bytes as f64 / f64::from(ct.count) / 1e3,
        small.count,
        small.bytes as f64 / f64::from(small.count) / 1e3,
        mf.bytes as f64 / f64::from(1 << 20)
    );
    let run = opts.work.join("run");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
    let ctx = Ctx {
        tools,
        smoke: opts.smoke,
        reps: opts.reps,
        work: opts.work.clone(),
        log: run.join("commands.log"),
        run,
        ct,
        small,
        mf,
    };

    let mut rows: Vec<Row> = Vec::new();
    let mut ceil = Ceil::default();
    let mut ceiling_lines: Vec<String> = Vec::new();
    if opts.enabled("ceilings") {
        ceiling_lines = measure_ceilings(&ctx, &sizes, &mut ceil);
    }
    let mut fsync: BTreeMap<Peer, String> = BTreeMap::new();
    if opts.enabled("fsync") {
        fsync = measure_fsync(&ctx, &mut notes);
    }
    let mbs = |set: &FileSet| {
        let b = set.bytes as f64;
        move |secs: f64| b / 1e6 / secs
    };
    let per_s = |set: &FileSet| {
        let n = f64::from(set.count);
        move |secs: f64| n / secs
    };
    if opts.enabled("ct1") {
        let mut r = ingest_row(
            &ctx,
            &format!("CT series {} x 0.5 MB, 1 association", ctx.ct.count),
            "MB/s",
            "≥ 1.0× DCMTK storescp +B",
            &ctx.ct,
            1,
            &[Peer::Dcmtk, Peer::DicomRs, Peer::Orthanc],
            &mbs(&ctx.ct),
        );
        r.ceiling = ceil
            .ct_file1
            .map(|c| (c, "0.5 MB file write+fsync, 1 thread".into()));
        r.verdict = ratio_verdict(&r, &["DCMTK storescp +B"], 1.0);
        rows.push(r);
    }
    if opts.enabled("ct4") {
        let mut r = ingest_row(
            &ctx,
            &format!("CT series {} x 0.5 MB, 4 associations", ctx.ct.count),
            "MB/s",
            "≥ 1.0× DCMTK storescp --fork; ≥ 80 % of durable write ceiling",
            &ctx.ct,
            4,
            &[Peer::DcmtkFork, Peer::DicomRsAsync, Peer::Orthanc],
            &mbs(&ctx.ct),
        );
        r.ceiling = ceil.dd.map(|c| (c, "dd conv=fsync".into()));
        r.verdict = ratio_verdict(&r, &["DCMTK storescp --fork +B"], 1.0).map(|(ok, why)| {
            match (r.contenders[0].median(), ceil.dd) {
                (Some(g), Some(dd)) => {
                    let frac = g / dd;
                    (
                        ok && frac >= 0.8,
                        format!("{why}; {:.0} % of dd conv=fsync", 100.0 * frac),
                    )
                }
                _ => (ok, why),
            }
        });
        rows.push(r);
    }
    for (section, assocs, peers, file_ceil) in [
        (
            "small1",
            1,
            [Peer::Dcmtk, Peer::DicomRs, Peer::Orthanc],
            ceil.small_file1,
        ),
        (
            "small4",
            4,
            [Peer::DcmtkFork, Peer::DicomRsAsync, Peer::Orthanc],
            ceil.small_file4,
        ),
    ] {
        if !opts.enabled(section) {
            continue;
        }
        let mut r = ingest_row(
            &ctx,
            &format!(
                "{} small instances (~{:.0} KB), {assocs} association{}",
                ctx.small.count,
                ctx.small.bytes as f64 / f64::from(ctx.small.count) / 1e3,
                if assocs > 1 { "s" } else { "" }
            ),
            "instances/s",
            "≥ 1.0× the faster of DCMTK and dicom-storescp",
            &ctx.small,
            assocs,
            &peers,
            &per_s(&ctx.small),
        );
        r.ceiling = file_ceil.map(|c| {
            (
                c,
                format!(
                    "8 KB file write+fsync, {assocs} thread{}",
                    if assocs > 1 { "s" } else { "" }
                ),
            )
        });
        let labels = [peers[0].label(), peers[1].label()];
        r.verdict = faster_verdict(&r, &labels);
        rows.push(r);
    }
    if opts.enabled("rss") {
        rows.push(rss_row(&ctx));
    }
    if opts.enabled("drain") {
        rows.extend(drain_rows(&ctx, ceil.loopback_mbit));
    }
    if opts.enabled("wan") {
        match wan_row(&ctx, &mut notes) {
            Ok(r) => rows.push(r),
            Err(e) => {
                let n = format!("WAN drain skipped: {e}");
                println!("bench: NOTE {n}");
                notes.push(n);
                let mut r = Row {
                    measure: "drain over emulated WAN (50 ms RTT, 100 Mbit/s)".into(),
                    unit: "Mbit/s".into(),
                    target: "≥ 90 % of the link".into(),
                    ..Row::default()
                };
                r.contenders.push(Contender::skipped("dicom-gateway", &e));
                rows.push(r);
            }
        }
    }
    if opts.enabled("startup") {
        match startup_row(&ctx, sizes.index, &mut notes) {
            Ok(r) => rows.push(r),
            Err(e) => {
                let mut r = Row {
                    measure: format!("start-up to READY, {} indexed instances", sizes.index),
                    unit: "s".into(),
                    target: "< 1 s with 1 M".into(),
                    ..Row::default()
                };
                let mut c = Contender::new("dicom-gateway");
                c.errors.push(e);
                r.contenders.push(c);
                rows.push(r);
            }
        }
    }
    for r in &mut rows {
        for c in &mut r.contenders {
            if let Some(p) = peer_of(&c.label) {
                if let Some(f) = fsync.get(&p) {
                    c.fsync.clone_from(f);
                }
            }
        }
    }
    procs::empty_trash(&ctx.run);
    let _ = std::fs::remove_dir_all(&ctx.run);
    let load_after = loadavg();
    // The measurements, without building the gateway (a no-op in CI, after cargo test).
    let runtime = started.elapsed() - build_time;

    let generated = render(
        &opts,
        &ctx,
        &rows,
        &ceiling_lines,
        &notes,
        (&load_before, &load_after),
        runtime,
    );
    let out = match (&opts.out, opts.smoke) {
        (Some(p), _) => p.clone(),
        (None, true) => opts.work.join("smoke-report.md"),
        (None, false) => workspace_root().join("docs").join("benchmarks.md"),
    };
    let old = std::fs::read_to_string(&out).unwrap_or_else(|_| {
        "# Benchmarks\n\nProduced by the harness in `hw-tests/bench` (issue 6).\n\n".to_owned()
    });
    std::fs::write(&out, report::splice(&old, &generated))
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("\n{}", report::table(&rows));
    println!(
        "bench: report written to {} ({:.0} s; load average before {load_before}, after {load_after})",
        out.display(),
        runtime.as_secs_f64()
    );

    // Smoke: every measurement that ran must have produced a number.
    let (mut measured, mut skipped, mut failed) = (0, 0, Vec::new());
    for r in &rows {
        for c in &r.contenders {
            if c.skipped.is_some() {
                skipped += 1;
            } else if c.median().is_some() && c.errors.is_empty() {
                measured += 1;
            } else {
                failed.push(format!(
                    "{} / {}: {}",
                    r.measure,
                    c.label,
                    c.errors.join("; ")
                ));
            }
        }
    }
    println!(
        "bench {}: {measured} measurements produced a number, {skipped} skipped, {} without a number",
        if opts.smoke { "smoke" } else { "run" },
        failed.len()
    );
    for f in &failed {
        eprintln!("bench: NO NUMBER: {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// Builds the gateway with cargo in this harness's own profile; returns the binary.
fn build_gateway() -> Res<PathBuf> {
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "dicom-gateway",
        "--bin",
        "dicom-gateway",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err("cargo build -p dicom-gateway failed".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .map(|d| d.join("dicom-gateway"))
        .ok_or("no directory of the harness binary")?;
    if !bin.is_file() {
        return Err(format!("{} not found after cargo build", bin.display()));
    }
    Ok(bin)
}

/// Full mode: installs what is missing (Debian packages, and dicom-storescp from crates.io).
fn install_peers(tools: &mut Tools, notes: &mut Vec<String>) {
    let mut pkgs = Vec::new();
    if tools.storescp.is_none() || tools.storescu.is_none() || tools.echoscu.is_none() {
        pkgs.push("dcmtk");
    }
    if tools.orthanc.is_none() {
        pkgs.push("orthanc");
    }
    if tools.iperf3.is_none() {
        pkgs.push("iperf3");
    }
    if tools.strace.is_none() {
        pkgs.push("strace");
    }
    if !pkgs.is_empty() {
        println!("bench: installing {}", pkgs.join(" "));
        let ok = Command::new("apt-get")
            .arg("update")
            .arg("-qq")
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            notes.push(format!("apt-get install {} failed", pkgs.join(" ")));
        }
    }
    if tools.dicom_storescp.is_none() {
        println!("bench: cargo install dicom-storescp --version 0.10.1 --locked");
        let ok = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "dicom-storescp",
                "--version",
                "0.10.1",
                "--locked",
            ])
            .current_dir(std::env::temp_dir())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            notes.push("cargo install dicom-storescp failed".into());
        }
    }
    *tools = Tools::find(tools.gateway.clone());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn peer_of(label: &str) -> Option<Peer> {
    [
        Peer::Gateway,
        Peer::Dcmtk,
        Peer::DcmtkFork,
        Peer::DcmtkDefault,
        Peer::DicomRs,
        Peer::DicomRsAsync,
        Peer::Orthanc,
    ]
    .into_iter()
    .find(|p| label == p.label())
}

// ---------------------------------------------------------------------------------------------
// Running arms interleaved
// ---------------------------------------------------------------------------------------------

type Arm<'a> = (Contender, Box<dyn FnMut() -> Res<f64> + 'a>);

/// Runs every arm once per repetition, in turn (A B C A B C ...).
fn interleave(title: &str, reps: usize, mut arms: Vec<Arm<'_>>) -> Vec<Contender> {
    for rep in 0..reps {
        for (c, f) in &mut arms {
            if c.skipped.is_some() {
                continue;
            }
            let t = Instant::now();
            match f() {
                Ok(v) => {
                    println!(
                        "bench: {title} | {} | rep {}: {} ({:.1} s)",
                        c.label,
                        rep + 1,
                        report::fmt_num(v),
                        t.elapsed().as_secs_f64()
                    );
                    c.values.push(v);
                }
                Err(e) => {
                    println!(
                        "bench: {title} | {} | rep {}: FAILED: {e}",
                        c.label,
                        rep + 1
                    );
                    c.values.push(f64::NAN);
                    c.errors.push(e);
                }
            }
        }
    }
    arms.into_iter().map(|(c, _)| c).collect()
}

fn arm_or_skip<'a>(
    tools: &Tools,
    peer: Peer,
    label: &str,
    f: impl FnMut() -> Res<f64> + 'a,
) -> Arm<'a> {
    if tools.has(peer) {
        (Contender::new(label), Box::new(f))
    } else {
        (
            Contender::skipped(label, "not installed"),
            Box::new(|| Err("skipped".into())),
        )
    }
}

/// Gateway (arm 0) / each other arm, per repetition.
fn ratios_against_first(cs: &mut [Contender]) {
    let Some(first) = cs.first().map(|c| c.values.clone()) else {
        return;
    };
    for c in cs.iter_mut().skip(1) {
        c.ratios = pair_ratios(&first, &c.values);
        c.ratio_label = "gateway / this".into();
    }
}

fn ratio_verdict(r: &Row, against: &[&str], min: f64) -> Option<(bool, String)> {
    let c = r
        .contenders
        .iter()
        .find(|c| against.contains(&c.label.as_str()))?;
    let m = report::median(&c.ratios)?;
    Some((m >= min, format!("{:.2}× {}", m, c.label)))
}

/// Against whichever of the two peers has the higher median.
fn faster_verdict(r: &Row, peers: &[&str; 2]) -> Option<(bool, String)> {
    let best = r
        .contenders
        .iter()
        .filter(|c| peers.contains(&c.label.as_str()))
        .filter_map(|c| c.median().map(|m| (m, c.label.clone())))
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    ratio_verdict(r, &[best.1.as_str()], 1.0)
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

fn measure_ceilings(ctx: &Ctx, sizes: &Sizes, ceil: &mut Ceil) -> Vec<String> {
    let mut lines = Vec::new();
    let dir = ctx.run.join("ceilings");
    let _ = std::fs::create_dir_all(&dir);
    let ct_size = usize::try_from(ctx.ct.bytes / u64::from(ctx.ct.count)).unwrap_or(524_288);
    let one = |lines: &mut Vec<String>, what: &str, unit: &str, r: Res<f64>| -> Option<f64> {
        settle();
        match r {
            Ok(v) => {
                println!("bench: ceiling | {what}: {} {unit}", report::fmt_num(v));
                lines.push(format!("| {what} | {} {unit} |", report::fmt_num(v)));
                Some(v)
            }
            Err(e) => {
                println!("bench: ceiling | {what}: FAILED: {e}");
                lines.push(format!("| {what} | failed: {e} |"));
                None
            }
        }
    };
    ceil.dd = one(
        &mut lines,
        &format!(
            "sequential write, dd bs=1M count={} conv=fsync",
            sizes.dd_mib
        ),
        "MB/s",
        ceilings::dd_fsync(&dir, sizes.dd_mib, &ctx.log),
    );
    let n = sizes.fsync_files;
    for threads in [1u32, 4] {
        let files = one(
            &mut lines,
            &format!(
                "{n} files of {ct_size} B (CT instance): create+write+fsync, {threads} thread(s)"
            ),
            "files/s",
            ceilings::file_fsync(&dir, n, ct_size, threads),
        );
        let mbs = files.map(|f| f * ct_size as f64 / 1e6);
        if let Some(m) = mbs {
            lines.push(format!(
                "| … same, as throughput | {} MB/s |",
                report::fmt_num(m)
            ));
        }
        if threads == 1 {
            ceil.ct_file1 = mbs;
        } else {
            ceil.ct_file4 = mbs;
        }
        let small = one(
            &mut lines,
            &format!(
                "{} files of 8 KB: create+write+fsync, {threads} thread(s)",
                n * 2
            ),
            "files/s",
            ceilings::file_fsync(&dir, n * 2, 8192, threads),
        );
        if threads == 1 {
            ceil.small_file1 = small;
        } else {
            ceil.small_file4 = small;
        }
    }
    // What a segment spool pays: records appended to a growing file (the gateway's segments),
    // or overwriting pre-written, fsynced space; one fdatasync per record, or per 4 records as
    // a group commit of 4 associations would.
    for (size, label) in [(ct_size, "CT instance"), (8192, "8 KB")] {
        for (batch, prewritten) in [(1u32, false), (1, true), (4, true)] {
            let kind = if prewritten {
                "into a pre-written segment file"
            } else {
                "appended to a segment file (the gateway's layout)"
            };
            let r = one(
                &mut lines,
                &format!("{n} records of {size} B ({label}) {kind}, fdatasync every {batch}"),
                "records/s",
                ceilings::segment_fdatasync(&dir, n, size, batch, prewritten),
            );
            if let (Some(r), true) = (r, size == ct_size) {
                lines.push(format!(
                    "| … same, as throughput | {} MB/s |",
                    report::fmt_num(r * size as f64 / 1e6)
                ));
            }
        }
    }
    ceil.loopback_mbit = one(
        &mut lines,
        &format!("loopback TCP, iperf3 -t {}", sizes.iperf_secs),
        "Mbit/s",
        ceilings::iperf3(&ctx.tools, "127.0.0.1", None, sizes.iperf_secs, 1, &dir),
    );
    lines
}

/// One strace run per receiver: sync calls per instance while receiving part of the CT set.
fn measure_fsync(ctx: &Ctx, notes: &mut Vec<String>) -> BTreeMap<Peer, String> {
    let mut out = BTreeMap::new();
    if ctx.tools.strace.is_none() {
        notes.push("strace is not installed: fsync column not measured".into());
        return out;
    }
    let part = &ctx.ct.parts[0];
    let n = procs::count_files(part, None);
    for peer in [
        Peer::Gateway,
        Peer::Dcmtk,
        Peer::DcmtkFork,
        Peer::DcmtkDefault,
        Peer::DicomRs,
        Peer::DicomRsAsync,
        Peer::Orthanc,
    ] {
        if !ctx.tools.has(peer) {
            continue;
        }
        let summary = ctx.run.join(format!("strace-{peer:?}.txt"));
        let r = (|| -> Res<(u64, String)> {
            let opts = StartOpts {
                strace: Some(summary.clone()),
                ..StartOpts::default()
            };
            let rcv = Receiver::start(&ctx.tools, peer, &ctx.run.join("strace"), &opts)?;
            storescu(
                &ctx.tools,
                peer.called_ae(),
                "127.0.0.1",
                rcv.port,
                std::slice::from_ref(part),
                &ctx.log,
                SEND_TIMEOUT,
            )?;
            rcv.finish();
            settle();
            let text = std::fs::read_to_string(&summary).map_err(|e| e.to_string())?;
            let mut calls = 0u64;
            let mut by: Vec<String> = Vec::new();
            for l in text.lines() {
                let t: Vec<&str> = l.split_whitespace().collect();
                if let Some(name) = t.last() {
                    if ["fsync", "fdatasync", "sync_file_range", "syncfs", "msync"].contains(name)
                        && t.len() >= 5
                    {
                        let c: u64 = t[3].parse().unwrap_or(0);
                        calls += c;
                        by.push(format!("{name} {c}"));
                    }
                }
            }
            Ok((calls, by.join(", ")))
        })();
        let text = match r {
            Ok((calls, by)) => {
                let per = calls as f64 / n as f64;
                let v = if per >= 0.9 {
                    format!("yes ({per:.1} sync calls/instance: {by})")
                } else if calls > 0 {
                    format!("partly ({per:.2} sync calls/instance: {by})")
                } else {
                    "no (0 sync calls)".into()
                };
                println!("bench: fsync | {} | {v}", peer.label());
                v
            }
            Err(e) => {
                println!("bench: fsync | {} | FAILED: {e}", peer.label());
                notes.push(format!("strace run of {} failed: {e}", peer.label()));
                "not measured".into()
            }
        };
        out.insert(peer, text);
    }
    notes.push(format!(
        "fsync column: `strace -f -c -e trace=fsync,fdatasync,sync_file_range,syncfs,msync` on one \
         run of {n} CT instances per receiver (1 association); calls divided by instances. A \
         receiver could also use O_SYNC/O_DSYNC writes, which this does not count."
    ));
    out
}

/// Starts `peer`, sends `set` over `assocs` associations, checks the count; seconds.
fn ingest_once(ctx: &Ctx, peer: Peer, set: &FileSet, assocs: usize) -> Res<f64> {
    let dir = ctx.run.join("receiver");
    let r = Receiver::start(&ctx.tools, peer, &dir, &StartOpts::default())?;
    let dirs = if assocs == 1 {
        vec![set.dir.clone()]
    } else {
        set.parts.clone()
    };
    let sent = storescu(
        &ctx.tools,
        peer.called_ae(),
        "127.0.0.1",
        r.port,
        &dirs,
        &ctx.log,
        SEND_TIMEOUT,
    );
    let stored = r.stored();
    r.finish();
    settle();
    let secs = sent?.as_secs_f64();
    if stored != u64::from(set.count) {
        return Err(format!(
            "{} stored {stored} of {} instances",
            peer.label(),
            set.count
        ));
    }
    Ok(secs)
}

#[allow(clippy::too_many_arguments)]
fn ingest_row(
    ctx: &Ctx,
    measure: &str,
    unit: &str,
    target: &str,
    set: &FileSet,
    assocs: usize,
    peers: &[Peer],
    value: &dyn Fn(f64) -> f64,
) -> Row {
    let mut arms: Vec<Arm<'_>> = vec![(
        Contender::new(Peer::Gateway.label()),
        Box::new(move || ingest_once(ctx, Peer::Gateway, set, assocs).map(value)),
    )];
    for &p in peers {
        arms.push(arm_or_skip(&ctx.tools, p, p.label(), move || {
            ingest_once(ctx, p, set, assocs).map(value)
        }));
    }
    let mut contenders = interleave(measure, ctx.reps, arms);
    ratios_against_first(&mut contenders);
    Row {
        measure: measure.into(),
        unit: unit.into(),
        target: target.into(),
        contenders,
        ..Row::default()
    }
}

/// Peak RSS (VmHWM, MiB) of the receiver after storing the multi-frame instance.
fn rss_once(ctx: &Ctx, peer: Peer) -> Res<f64> {
    let r = Receiver::start(
        &ctx.tools,
        peer,
        &ctx.run.join("receiver"),
        &StartOpts::default(),
    )?;
    let sent = storescu(
        &ctx.tools,
        peer.called_ae(),
        "127.0.0.1",
        r.port,
        &ctx.mf.parts,
        &ctx.log,
        SEND_TIMEOUT,
    );
    let hwm = procs::vm_hwm(r.pid());
    let stored = r.stored();
    r.finish();
    settle();
    sent?;
    if stored != 1 {
        return Err(format!("{} stored {stored} of 1 instance", peer.label()));
    }
    hwm.map(|b| b as f64 / f64::from(1 << 20))
        .ok_or_else(|| "no VmHWM".into())
}

fn rss_row(ctx: &Ctx) -> Row {
    let peers = [
        Peer::Gateway,
        Peer::Dcmtk,
        Peer::DcmtkDefault,
        Peer::DicomRs,
        Peer::Orthanc,
    ];
    let arms: Vec<Arm<'_>> = peers
        .iter()
        .map(|&p| arm_or_skip(&ctx.tools, p, p.label(), move || rss_once(ctx, p)))
        .collect();
    let measure = format!(
        "peak RSS (VmHWM) receiving one {:.0} MiB multi-frame instance",
        ctx.mf.bytes as f64 / f64::from(1 << 20)
    );
    let mut contenders = interleave(&measure, ctx.reps, arms);
    ratios_against_first(&mut contenders);
    let verdict = contenders[0]
        .median()
        .map(|m| (m <= 32.0, format!("{} MiB vs ≤ 32 MiB", report::fmt_num(m))));
    Row {
        measure,
        unit: "MiB".into(),
        target: "≤ 32 MiB (DCMTK +B ~15 MiB)".into(),
        contenders,
        verdict,
        ..Row::default()
    }
}

/// The gateway drains a backlog of `set` to `sink` with `assocs` associations; seconds from
/// its first association to an empty queue.
fn drain_gateway_once(
    ctx: &Ctx,
    set: &FileSet,
    assocs: u32,
    sink: Peer,
    wan: Option<&wan::Wan>,
) -> Res<f64> {
    let sink_port = procs::free_port()?;
    let (host, ns) = match wan {
        Some(w) => (w.sink_ip(), Some(w.sink_ns.clone())),
        None => ("127.0.0.1".to_owned(), None),
    };
    let dest = Dest {
        address: format!("{host}:{sink_port}"),
        ae_title: sink.called_ae().into(),
        max_associations: assocs,
    };
    // 1. The backlog: the destination is down while the series arrives.
    let gw = Receiver::start(
        &ctx.tools,
        Peer::Gateway,
        &ctx.run.join("gateway"),
        &StartOpts {
            dest: Some(dest),
            ..StartOpts::default()
        },
    )?;
    storescu(
        &ctx.tools,
        Peer::Gateway.called_ae(),
        "127.0.0.1",
        gw.port,
        std::slice::from_ref(&set.dir),
        &ctx.log,
        SEND_TIMEOUT,
    )?;
    let pending = gw.pending(&ctx.tools)?;
    if pending != u64::from(set.count) {
        return Err(format!("backlog is {pending}, expected {}", set.count));
    }
    settle();
    // 2. The destination comes back; the gateway's next attempt (backoff ≤ 2 s) starts the
    // clock: its first open association, seen by polling the control socket every 10 ms from
    // the moment the sink is spawned.
    let mut sink_rcv = Receiver::start(
        &ctx.tools,
        sink,
        &ctx.run.join("sink"),
        &StartOpts {
            port: Some(sink_port),
            netns: ns,
            host: Some(host),
            no_wait: true,
            ..StartOpts::default()
        },
    )?;
    let deadline = Instant::now() + SEND_TIMEOUT;
    let mut t0: Option<Instant> = None;
    let t1 = loop {
        let st = gw.control_status()?;
        let d = st["destinations"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        let link = &d["link"];
        if t0.is_none()
            && (link["open_associations"].as_u64().unwrap_or(0) > 0
                || link["delivered_since_start"].as_u64().unwrap_or(0) > 0)
        {
            t0 = Some(Instant::now());
        }
        if d["pending"].as_u64() == Some(0) {
            break Instant::now();
        }
        if Instant::now() > deadline {
            return Err(format!("backlog not drained within {SEND_TIMEOUT:?}: {d}"));
        }
        if let Some(s) = sink_rcv.proc.exited() {
            return Err(format!(
                "the sink exited ({s}):\n{}",
                sink_rcv.proc.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let t0 = t0.ok_or("the gateway drained without an association being seen")?;
    let stored = sink_rcv.stored();
    gw.finish();
    sink_rcv.finish();
    settle();
    if stored != u64::from(set.count) {
        return Err(format!("the sink stored {stored} of {}", set.count));
    }
    Ok((t1 - t0).as_secs_f64())
}

/// DCMTK storescu sends `set` straight to `sink` (the comparison for the drain); seconds.
fn direct_once(ctx: &Ctx, set: &FileSet, sink: Peer, wan: Option<&wan::Wan>) -> Res<f64> {
    let (host, ns) = match wan {
        Some(w) => (w.sink_ip(), Some(w.sink_ns.clone())),
        None => ("127.0.0.1".to_owned(), None),
    };
    let r = Receiver::start(
        &ctx.tools,
        sink,
        &ctx.run.join("sink"),
        &StartOpts {
            netns: ns,
            host: Some(host.clone()),
            ..StartOpts::default()
        },
    )?;
    let sent = storescu(
        &ctx.tools,
        sink.called_ae(),
        &host,
        r.port,
        std::slice::from_ref(&set.dir),
        &ctx.log,
        SEND_TIMEOUT,
    );
    let stored = r.stored();
    r.finish();
    settle();
    let secs = sent?.as_secs_f64();
    if stored != u64::from(set.count) {
        return Err(format!("the sink stored {stored} of {}", set.count));
    }
    Ok(secs)
}

fn drain_rows(ctx: &Ctx, loopback_mbit: Option<f64>) -> Vec<Row> {
    let set = &ctx.ct;
    let mbs = |secs: f64| set.bytes as f64 / 1e6 / secs;
    let title = format!(
        "backlog drain of {} CT instances to a local sink",
        set.count
    );
    let arms: Vec<Arm<'_>> = vec![
        arm_or_skip(
            &ctx.tools,
            Peer::Dcmtk,
            "dicom-gateway → storescp +B, 1 association",
            move || drain_gateway_once(ctx, set, 1, Peer::Dcmtk, None).map(mbs),
        ),
        arm_or_skip(
            &ctx.tools,
            Peer::Dcmtk,
            "storescu → storescp +B direct, 1 association",
            move || direct_once(ctx, set, Peer::Dcmtk, None).map(mbs),
        ),
        arm_or_skip(
            &ctx.tools,
            Peer::DcmtkFork,
            "dicom-gateway → storescp --fork +B, 4 associations",
            move || drain_gateway_once(ctx, set, 4, Peer::DcmtkFork, None).map(mbs),
        ),
    ];
    let cs = interleave(&title, ctx.reps, arms);
    let (mut g1, direct, mut g4) = (cs[0].clone(), cs[1].clone(), cs[2].clone());
    for g in [&mut g1, &mut g4] {
        g.ratios = pair_ratios(&g.values, &direct.values);
        g.ratio_label = "this / storescu direct".into();
    }
    let ceiling = loopback_mbit.map(|m| (m / 8.0, "loopback TCP, iperf3".to_owned()));
    let verdict = |g: &Contender, min: f64| {
        report::median(&g.ratios).map(|m| (m >= min, format!("{m:.2}× storescu direct")))
    };
    vec![
        Row {
            measure: format!("{title}, 1 association"),
            unit: "MB/s".into(),
            target: "≥ 1.0× storescu direct".into(),
            verdict: verdict(&g1, 1.0),
            contenders: vec![g1, direct.clone()],
            ceiling: ceiling.clone(),
        },
        Row {
            measure: format!("{title}, parallel associations"),
            unit: "MB/s".into(),
            target: "≥ 1.5× storescu direct".into(),
            verdict: verdict(&g4, 1.5),
            contenders: vec![g4, direct],
            ceiling,
        },
    ]
}

fn wan_row(ctx: &Ctx, notes: &mut Vec<String>) -> Res<Row> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root for network namespaces".into());
    }
    let w = wan::Wan::create()?;
    notes.push(format!("WAN emulation: {}.", w.method));
    // What TCP itself gets through the emulation: one stream, and 4 as the gateway's default
    // associations are.
    for streams in [1, 4] {
        let m = ceilings::iperf3(
            &ctx.tools,
            &w.sink_ip(),
            Some(&w.sink_ns),
            if ctx.smoke { 1 } else { 5 },
            streams,
            &ctx.run,
        );
        let what = if streams == 1 {
            "one TCP stream".to_owned()
        } else {
            format!("{streams} TCP streams together")
        };
        match m {
            Ok(m) => {
                println!("bench: ceiling | iperf3 over the emulated WAN, {what}: {m:.1} Mbit/s");
                notes.push(format!(
                    "iperf3 over the emulated WAN ({what}): {m:.1} Mbit/s of the nominal 100."
                ));
            }
            Err(e) => notes.push(format!("iperf3 over the emulated WAN ({what}) failed: {e}")),
        }
    }
    // A quarter of the CT series (~65 MB): about 5 s at the line rate.
    let set = FileSet {
        dir: ctx.ct.parts[0].clone(),
        count: u32::try_from(procs::count_files(&ctx.ct.parts[0], None)).unwrap_or(0),
        parts: vec![ctx.ct.parts[0].clone()],
        bytes: ctx.ct.bytes / 4,
    };
    let set = &set;
    let mbit = |secs: f64| set.bytes as f64 * 8.0 / 1e6 / secs;
    let (wr, tools) = (&w, &ctx.tools);
    let arms: Vec<Arm<'_>> = vec![
        arm_or_skip(
            tools,
            Peer::DcmtkFork,
            "dicom-gateway, max_associations = 4 (default)",
            move || drain_gateway_once(ctx, set, 4, Peer::DcmtkFork, Some(wr)).map(mbit),
        ),
        arm_or_skip(
            tools,
            Peer::DcmtkFork,
            "dicom-gateway, max_associations = 2",
            move || drain_gateway_once(ctx, set, 2, Peer::DcmtkFork, Some(wr)).map(mbit),
        ),
        arm_or_skip(
            tools,
            Peer::DcmtkFork,
            "dicom-gateway, max_associations = 8",
            move || drain_gateway_once(ctx, set, 8, Peer::DcmtkFork, Some(wr)).map(mbit),
        ),
        arm_or_skip(
            tools,
            Peer::DcmtkFork,
            "storescu direct, 1 association",
            move || direct_once(ctx, set, Peer::DcmtkFork, Some(wr)).map(mbit),
        ),
    ];
    let title = format!(
        "drain of {} CT instances over emulated WAN (50 ms RTT, 100 Mbit/s)",
        set.count
    );
    let mut cs = interleave(&title, ctx.reps, arms);
    let direct = cs[3].values.clone();
    for c in cs.iter_mut().take(3) {
        c.ratios = pair_ratios(&c.values, &direct);
        c.ratio_label = "this / storescu direct".into();
    }
    if w.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        notes.push(format!(
            "the WAN delay line failed to forward {} frames",
            w.dropped.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    let verdict = match (cs[1].median(), cs[0].median(), cs[2].median()) {
        (Some(d), Some(f), Some(e)) => Some((
            f >= 90.0,
            format!(
                "{f:.0} % of the link at the default 4 associations, {d:.0} % with 2, {e:.0} % with 8"
            ),
        )),
        _ => None,
    };
    drop(w);
    Ok(Row {
        measure: title,
        unit: "Mbit/s".into(),
        target: "≥ 90 % of the link".into(),
        contenders: cs,
        ceiling: Some((100.0, "nominal link rate".into())),
        verdict,
    })
}

/// Builds (once, cached in the work directory) a gateway data directory holding `n` tiny
/// instances, ingested through the gateway itself.
fn ensure_index(ctx: &Ctx, n: u64, notes: &mut Vec<String>) -> Res<PathBuf> {
    // Named after the index schema: a data directory of another schema is refused at start.
    let dir = ctx.work.join(format!("index-v2-{n}"));
    let marker = dir.with_extension("complete");
    if marker.exists() {
        notes.push(format!(
            "start-up index: {n} instances, cached in {} (built by an earlier run: {})",
            dir.display(),
            std::fs::read_to_string(&marker).unwrap_or_default().trim()
        ));
        return Ok(dir);
    }
    // On tmpfs the gateway's per-instance fsyncs cost nothing, so the build is bounded by CPU;
    // the finished data directory is then copied to the work directory (on the real disk).
    let shm = Path::new("/dev/shm");
    let free = nix::sys::statvfs::statvfs(shm)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0);
    let need = n.saturating_mul(8 * 1024) + (1 << 30);
    let build = if free > need {
        shm.join(format!("dgw-bench-index-{}", std::process::id()))
    } else {
        dir.clone()
    };
    let start = Instant::now();
    println!(
        "bench: building the start-up index: {n} tiny instances through the gateway in {}",
        build.display()
    );
    let mut gw = Receiver::start(
        &ctx.tools,
        Peer::Gateway,
        &build,
        &StartOpts {
            log_level: Some("warn".into()),
            ..StartOpts::default()
        },
    )?;
    let addr = format!("127.0.0.1:{}", gw.port);
    let threads = 4u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addr = addr.clone();
            let (lo, hi) = (n * t / threads, n * (t + 1) / threads);
            std::thread::spawn(move || -> Res<u64> {
                // Several associations in turn, so that none lives for hours.
                let mut done = 0;
                let mut next = lo;
                while next < hi {
                    let end = (next + 50_000).min(hi);
                    done += scu::send_tiny(&addr, "DICOM_GW", next..end)?;
                    next = end;
                }
                Ok(done)
            })
        })
        .collect();
    let mut stored = 0;
    for h in handles {
        stored += h.join().map_err(|_| "SCU thread panicked".to_owned())??;
    }
    gw.stop();
    let ingest = start.elapsed();
    if stored != n {
        return Err(format!("index build stored {stored} of {n}"));
    }
    let _ = std::fs::remove_file(build.join("gateway.log"));
    if build != dir {
        let _ = std::fs::remove_dir_all(&dir);
        let st = Command::new("cp")
            .arg("-a")
            .arg(&build)
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&build);
        if !st.success() {
            return Err("copying the index to the work directory failed".into());
        }
    }
    settle();
    let text = format!(
        "ingested through the gateway in {:.0} s ({:.0} instances/s{}), {:.0} s in all",
        ingest.as_secs_f64(),
        n as f64 / ingest.as_secs_f64(),
        if build == dir {
            ", on the work disk"
        } else {
            ", data directory on tmpfs, then copied to the work disk"
        },
        start.elapsed().as_secs_f64()
    );
    std::fs::write(&marker, format!("{text}\n")).map_err(|e| e.to_string())?;
    notes.push(format!(
        "start-up index: {n} tiny instances (~0.5 KB, no pixel data, 500 per study, cache-only \
         gateway), {text}; cached in {}",
        dir.display()
    ));
    Ok(dir)
}

/// Drops the index file's pages from the page cache (what a reboot would do to it).
fn evict_index(data_dir: &Path) -> Res<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let f = std::fs::File::open(data_dir.join("index.redb")).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| format!("posix_fadvise: {e}"))
}

fn startup_row(ctx: &Ctx, n: u64, notes: &mut Vec<String>) -> Res<Row> {
    let dir = ensure_index(ctx, n, notes)?;
    let keep = StartOpts {
        keep_dir: true,
        ..StartOpts::default()
    };
    let start_once = |cold: bool| -> Res<f64> {
        if cold {
            evict_index(&dir.join("data"))?;
        }
        let mut r = Receiver::start(&ctx.tools, Peer::Gateway, &dir, &keep)?;
        let secs = r.startup.as_secs_f64();
        r.stop();
        Ok(secs)
    };
    let arms: Vec<Arm<'_>> = vec![
        (
            Contender::new("dicom-gateway, index file in the page cache"),
            Box::new(|| start_once(false)),
        ),
        (
            Contender::new("dicom-gateway, index file evicted (posix_fadvise DONTNEED)"),
            Box::new(|| start_once(true)),
        ),
    ];
    let title = format!("start-up to READY=1, {n} indexed instances");
    let mut cs = interleave(&title, ctx.reps, arms);
    if !ctx.smoke {
        // After a crash the gateway repairs redb and indexes the segment records past the durable index
        // before READY (DESIGN.md section 2). One run: SIGKILL, then time the next start.
        let mut c = Contender::new("dicom-gateway after SIGKILL (redb repair + segment recovery)");
        let r = (|| -> Res<f64> {
            let mut r = Receiver::start(&ctx.tools, Peer::Gateway, &dir, &keep)?;
            r.proc.crash();
            let mut r = Receiver::start(
                &ctx.tools,
                Peer::Gateway,
                &dir,
                &StartOpts {
                    keep_dir: true,
                    ready_timeout: Some(Duration::from_secs(1800)),
                    ..StartOpts::default()
                },
            )?;
            let secs = r.startup.as_secs_f64();
            r.stop();
            Ok(secs)
        })();
        match r {
            Ok(v) => {
                println!("bench: {title} | after crash: {v:.2} s");
                c.values.push(v);
            }
            Err(e) => c.errors.push(e),
        }
        cs.push(c);
    }
    let verdict = cs
        .iter()
        .filter_map(Contender::median)
        .reduce(f64::max)
        .map(|worst| {
            let at = if n >= 1_000_000 {
                String::new()
            } else {
                format!(" at {n} instances (target is for 1 M)")
            };
            let (warm, cold) = (
                cs[0].median().unwrap_or(f64::NAN),
                cs[1].median().unwrap_or(f64::NAN),
            );
            let _ = worst;
            (
                warm.max(cold) < 1.0,
                format!("clean start {warm:.2} s warm, {cold:.2} s cold{at}"),
            )
        });
    Ok(Row {
        measure: title,
        unit: "s".into(),
        target: "< 1 s with 1 M instances".into(),
        contenders: cs,
        ceiling: None,
        verdict,
    })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn first_line(cmd: &Path, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let s = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            s.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine_facts(work: &Path) -> Vec<String> {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
        })
        .unwrap_or_default();
    let df = sh("df", &["-hT", &work.to_string_lossy()]);
    let df = df
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>();
    let disk = if df.len() >= 3 {
        format!(
            "{} ({}, {} size) holding the work and data directories",
            df[0], df[1], df[2]
        )
    } else {
        String::new()
    };
    let dev = df.first().map_or("", |d| d.trim_start_matches("/dev/"));
    let journal = std::fs::read_dir("/proc/fs/jbd2").is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(dev))
    });
    let disk = format!(
        "{disk}, {}",
        if journal {
            "with a jbd2 journal"
        } else {
            "no jbd2 journal (ext4 without journal)"
        }
    );
    vec![
        format!(
            "nproc {}; CPU {cpu}",
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
        ),
        format!("RAM {mem}"),
        format!("disk {disk}"),
        format!("kernel {}", sh("uname", &["-srm"])),
    ]
}

fn render(
    opts: &Opts,
    ctx: &Ctx,
    rows: &[Row],
    ceilings: &[String],
    notes: &[String],
    (load_before, load_after): (&str, &str),
    runtime: Duration,
) -> String {
    let mut s = String::new();
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        "--release "
    };
    let args = if opts.args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", opts.args.join(" "))
    };
    s.push_str(&format!(
        "## Results ({} mode)\n\nCommand: `cargo run {profile}-p dicom-gateway-bench{args}`  \n",
        if opts.smoke { "smoke" } else { "full" }
    ));
    s.push_str(&format!(
        "Date: {}; run time {:.0} s; {} repetition(s) per arm, interleaved (A B C A B C …).  \n",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        runtime.as_secs_f64(),
        opts.reps
    ));
    s.push_str(&format!(
        "Gateway: commit {}{}.  \n",
        sh(
            "git",
            &[
                "-C",
                &workspace_root().to_string_lossy(),
                "rev-parse",
                "--short",
                "HEAD"
            ]
        ),
        if sh(
            "git",
            &[
                "-C",
                &workspace_root().to_string_lossy(),
                "status",
                "--porcelain",
                "gateway"
            ]
        )
        .is_empty()
        {
            ""
        } else {
            " with uncommitted changes in gateway/"
        }
    ));
    let t = &ctx.tools;
    let ver = |p: &Option<PathBuf>, arg: &str| {
        p.as_ref()
            .map_or_else(|| "absent".to_owned(), |p| first_line(p, arg))
    };
    s.push_str(&format!(
        "Peers: {}; {}; {}; sender DCMTK storescu; all with TCP_NODELAY=1.  \n",
        ver(&t.storescp, "--version"),
        ver(&t.orthanc, "--version"),
        ver(&t.dicom_storescp, "--version")
    ));
    s.push_str(&format!(
        "Machine: {}.  \nLoad average (1, 5, 15 min) before: {load_before}; after: {load_after}.\n\n",
        machine_facts(&opts.work).join("; ")
    ));
    s.push_str(
        "MB = 10^6 bytes of DICOM dataset on the wire. Ratios are computed per repetition \
         (pairs run back to back) and the median of those is shown. Each run starts a fresh \
         receiver on an empty directory and ends with `sync`, outside the timed window, so no \
         run pays for the previous one's dirty pages. Finished runs' directories are deleted \
         only at the end (on ext4 without a journal, creating a file shortly after many \
         deletions costs the creator about a millisecond of CPU in the inode allocator).\n\n",
    );
    s.push_str(&report::table(rows));
    if !ceilings.is_empty() {
        s.push_str(
            "\n### Ceilings of this machine (same run)\n\n| ceiling | value |\n| --- | --- |\n",
        );
        for l in ceilings {
            s.push_str(l);
            s.push('\n');
        }
    }
    s.push_str("\n### Notes from the run\n\n");
    s.push_str(&format!(
        "- Data: CT {} × {:.0} KB (512×512×16 bit noise, explicit VR LE), small {} × {:.1} KB \
         (64×64×16 bit), multi-frame {:.0} MiB ({} frames of 512×512×16 bit); generated in {}.\n",
        ctx.ct.count,
        ctx.ct.bytes as f64 / f64::from(ctx.ct.count) / 1e3,
        ctx.small.count,
        ctx.small.bytes as f64 / f64::from(ctx.small.count) / 1e3,
        ctx.mf.bytes as f64 / f64::from(1 << 20),
        ctx.mf.bytes / (512 * 512 * 2),
        ctx.work.join("data").display()
    ));
    for n in notes {
        s.push_str(&format!("- {n}\n"));
    }
    s
}
