//! The `dicom-gateway` binary: argument parsing, config, logging and the runtime around
//! [`dicom_gateway::run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dicom_gateway::config::Config;
use dicom_gateway::control::{self, Request};
use dicom_gateway::store::spool;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "dicom-gateway",
    version,
    about = "Store-and-forward DICOM gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where an offline command finds the data directory: `--data-dir`, the config file, or the
/// embedded default.
#[derive(clap::Args)]
struct DataDir {
    /// Config file naming the data directory.
    #[arg(long, short, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// Data directory, instead of --config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground (SIGTERM or Ctrl-C stops it cleanly).
    Run {
        /// Config file; without it, the embedded default (AE DICOM_GW on 127.0.0.1:11112,
        /// data in ./gateway-data, any calling AE from this machine).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 if valid, 1 with the problem otherwise.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List stored instances from the index (the gateway must be stopped).
    Instances {
        #[command(flatten)]
        dir: DataDir,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write stored instances out as DICOM Part 10 files, each checked against its checksum
    /// (the gateway must be stopped). With a SOP Instance UID: that one, to the file --out;
    /// without: every instance, into the directory --out as <SOP Instance UID>.dcm.
    Export {
        #[command(flatten)]
        dir: DataDir,
        /// SOP Instance UID of the instance; without it, all.
        sop_instance_uid: Option<String>,
        /// File to write (it must not exist), or the directory for all instances.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// List the records in the segment files and whether each is intact (reads only the
    /// segments: works while the gateway runs).
    Segments {
        #[command(flatten)]
        dir: DataDir,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the DICOM Conformance Statement of this version (Markdown).
    Conformance,
    /// Show the running gateway: associations, destinations, queue depth, disk.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Make the running gateway re-read its configuration file (like SIGHUP); prints what
    /// changed, or why the new file was refused (the running configuration then stays).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Inspect and steer the forwarding queue of the running gateway.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Recent studies with instance counts and per-destination delivery state
    /// ("was everything from CT01 yesterday delivered?").
    Studies {
        #[command(flatten)]
        target: Target,
        /// How far back: e.g. 30m, 12h, 2d (default 24h).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only studies from this calling AE title.
        #[arg(long)]
        calling_ae: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// C-ECHO a configured destination with the gateway's settings, or any peer with --to.
    Echo {
        /// Name of a [[destination]] in the config.
        destination: Option<String>,
        /// Config file (default: the embedded default).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ad-hoc peer HOST:PORT instead of a configured destination.
        #[arg(long, conflicts_with = "destination", requires = "aet")]
        to: Option<String>,
        /// Called AE title of the ad-hoc peer.
        #[arg(long)]
        aet: Option<String>,
        /// Calling AE title (default: the gateway's).
        #[arg(long)]
        calling_ae: Option<String>,
    },
}

/// Which gateway a client command talks to.
#[derive(clap::Args, Clone)]
struct Target {
    /// Config file naming the control socket (default: /etc/dicom-gateway/gateway.toml if it
    /// exists, else the embedded default's).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory, instead of --config.
    #[arg(long, conflicts_with = "config")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queue entries (all states, or only failed ones with their reason).
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put failed entries back to pending (all, or of one destination / instance).
    Retry {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        destination: Option<String>,
        #[arg(long)]
        sop_instance_uid: Option<String>,
    },
    /// Drop failed entries for good (the instances stay in the local cache). Needs --yes.
    Purge {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        destination: Option<String>,
        #[arg(long)]
        sop_instance_uid: Option<String>,
        /// Confirm: purged entries are never forwarded.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                // The TLS files too: a missing certificate or a key readable by others would
                // stop `run`, so ExecStartPre should catch it.
                if let Err(e) = dicom_gateway::tls::check_config(&c) {
                    eprintln!("error: {}: {e}", config.display());
                    return ExitCode::FAILURE;
                }
                println!(
                    "{}: valid (AE {}, {} listener(s), {} modalities)",
                    config.display(),
                    c.gateway.ae_title,
                    c.listen.len(),
                    c.modalities.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Instances { dir, json } => instances(dir, json),
        Command::Export {
            dir,
            sop_instance_uid,
            out,
        } => export(dir, sop_instance_uid.as_deref(), &out),
        Command::Segments { dir, json } => segments(dir, json),
        Command::Conformance => {
            print!("{}", dicom_gateway::conformance::statement());
            ExitCode::SUCCESS
        }
        Command::Status { target, json } => client(&target, &Request::Status, |v| {
            if json {
                println!("{v:#}");
            } else {
                print_status(v);
            }
        }),
        Command::Queue { action } => queue(action),
        Command::Reload { target } => client(&target, &Request::Reload, |v| {
            println!("reloaded: {}", v["changes"].as_str().unwrap_or(""));
        }),
        Command::Studies {
            target,
            since,
            calling_ae,
            limit,
            json,
        } => {
            let Some(age) = parse_age(&since) else {
                eprintln!("error: --since '{since}' is not a duration; write e.g. 30m, 12h or 2d");
                return ExitCode::FAILURE;
            };
            let since_ms = dicom_gateway::store::now_ms().saturating_sub(age);
            let req = Request::Studies {
                since_ms,
                calling_ae,
                limit,
            };
            client(&target, &req, |v| {
                if json {
                    println!("{v:#}");
                } else {
                    print_studies(v);
                }
            })
        }
        Command::Echo {
            destination,
            config,
            to,
            aet,
            calling_ae,
        } => echo(destination, config, to, aet, calling_ae),
    }
}

/// The control socket of the gateway a client command talks to.
fn socket_of(target: &Target) -> Result<PathBuf, String> {
    match (&target.config, &target.data_dir) {
        (_, Some(d)) => Ok(d.join("control.sock")),
        (Some(c), None) => Config::load(c)
            .map(|c| c.gateway.control_socket)
            .map_err(|e| e.to_string()),
        // On the appliance the installed config names the socket; elsewhere, the embedded
        // default's (./gateway-data/control.sock).
        (None, None) if Path::new(INSTALLED_CONFIG).exists() => {
            Config::load(Path::new(INSTALLED_CONFIG))
                .map(|c| c.gateway.control_socket)
                .map_err(|e| e.to_string())
        }
        (None, None) => Ok(Config::embedded_default().gateway.control_socket),
    }
}

/// Where the appliance keeps its configuration (the systemd unit's --config).
const INSTALLED_CONFIG: &str = "/etc/dicom-gateway/gateway.toml";

/// Runs one control request and prints the answer with `show`.
fn client(target: &Target, req: &Request, show: impl FnOnce(&serde_json::Value)) -> ExitCode {
    let result = socket_of(target).and_then(|d| control::request(&d, req));
    match result {
        Ok(v) => {
            show(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn queue(action: QueueAction) -> ExitCode {
    match action {
        QueueAction::List {
            target,
            failed,
            destination,
            limit,
            json,
        } => client(
            &target,
            &Request::QueueList {
                failed,
                destination,
                limit,
            },
            |v| {
                if json {
                    println!("{v:#}");
                    return;
                }
                let rows = v.as_array().cloned().unwrap_or_default();
                println!(
                    "{:<16} {:<64} {:<10} {:>8} {:>6}  LAST ERROR",
                    "DESTINATION", "SOP INSTANCE UID", "STATE", "ATTEMPTS", "STATUS"
                );
                for r in &rows {
                    println!(
                        "{:<16} {:<64} {:<10} {:>8} {:>6}  {}",
                        r["destination"].as_str().unwrap_or(""),
                        r["sop_instance_uid"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["attempts"].to_string(),
                        r["last_status"].as_str().unwrap_or("-"),
                        r["last_error"].as_str().unwrap_or("")
                    );
                }
                println!(
                    "{} entr{}",
                    rows.len(),
                    if rows.len() == 1 { "y" } else { "ies" }
                );
            },
        ),
        QueueAction::Retry {
            target,
            destination,
            sop_instance_uid,
        } => client(
            &target,
            &Request::QueueRetry {
                destination,
                sop_instance_uid,
            },
            |v| {
                println!("{} failed entr(ies) put back to pending", v["retried"]);
            },
        ),
        QueueAction::Purge {
            target,
            destination,
            sop_instance_uid,
            yes,
        } => {
            if !yes {
                eprintln!("error: purging drops failed entries for good (they are never forwarded); add --yes to confirm");
                return ExitCode::FAILURE;
            }
            client(
                &target,
                &Request::QueuePurge {
                    destination,
                    sop_instance_uid,
                },
                |v| {
                    println!("{} failed entr(ies) purged", v["purged"]);
                },
            )
        }
    }
}

fn print_status(v: &serde_json::Value) {
    let gib = |b: &serde_json::Value| {
        b.as_u64().map_or("?".into(), |b| {
            format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
        })
    };
    println!(
        "dicom-gateway {}  up {} s  AE {}",
        v["version"].as_str().unwrap_or("?"),
        v["uptime_s"],
        v["ae_title"].as_str().unwrap_or("?")
    );
    println!(
        "listening: {}",
        v["listeners"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    println!(
        "associations: {} of {}",
        v["active_associations"], v["max_associations"]
    );
    println!(
        "disk: {} free, reserve {} ({}); spare segments {} of {}",
        gib(&v["disk_free_bytes"]),
        gib(&v["disk_reserve_bytes"]),
        v["data_dir"].as_str().unwrap_or(""),
        v["spare_segments_ready"],
        v["spare_segments_wanted"]
    );
    let dests = v["destinations"].as_array().cloned().unwrap_or_default();
    if dests.is_empty() {
        println!("destinations: none (cache-only)");
        return;
    }
    println!();
    println!(
        "{:<16} {:<28} {:<6} {:>9} {:>7} {:>10} {:>11}  LAST ERROR",
        "DESTINATION", "ADDRESS", "LINK", "PENDING", "FAILED", "DELIVERED", "OLDEST (s)"
    );
    for d in &dests {
        let link = match d["link"]["up"].as_bool() {
            Some(true) => "up",
            Some(false) => "DOWN",
            None => "-",
        };
        println!(
            "{:<16} {:<28} {:<6} {:>9} {:>7} {:>10} {:>11}  {}",
            d["name"].as_str().unwrap_or(""),
            format!(
                "{}@{}",
                d["ae_title"].as_str().unwrap_or(""),
                d["address"].as_str().unwrap_or("")
            ),
            link,
            d["pending"].to_string(),
            d["failed"].to_string(),
            d["delivered"].to_string(),
            d["oldest_pending_age_s"]
                .as_u64()
                .map_or("-".into(), |s| s.to_string()),
            d["link"]["last_error"].as_str().unwrap_or("")
        );
    }
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let config = match &config_path {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded_default(),
    };
    dicom_gateway::logging::init(config.log.level);
    if config_path.is_none() {
        log::warn!(
            "no --config given: using the embedded default (AE DICOM_GW on 127.0.0.1:11112, data in ./gateway-data, ANY calling AE accepted from this machine only)"
        );
    } else if config.accepts_any_calling_ae() {
        log::warn!(networks:? = config.dangerous.any_calling_ae_from; "[dangerous] any_calling_ae_from is set: any calling AE title is accepted from these networks");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!(error:% = e; "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let listeners = dicom_gateway::bind(&config).await?;
        let who = dicom_gateway::privilege::drop_or_refuse(
            config.gateway.run_as.as_deref(),
            config.dangerous.allow_root,
            &config.gateway.data_dir,
        )
        .map_err(|message| dicom_gateway::RunError::Privilege { message })?;
        log::info!("{who}");
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tokio::spawn(reload_on_sighup(reload_tx.clone()));
        dicom_gateway::run(config, listeners, shutdown, reload_tx, reload_rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP (systemctl reload) re-reads the configuration file.
async fn reload_on_sighup(tx: dicom_gateway::daemon::ReloadSender) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        log::error!("cannot install the SIGHUP handler; use 'dicom-gateway reload'");
        return;
    };
    while hup.recv().await.is_some() {
        log::info!("SIGHUP received: reloading the configuration");
        if tx.send(None).await.is_err() {
            return;
        }
    }
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C) start a clean shutdown.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot install signal handlers; stop the gateway with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// The data directory named by `--data-dir`, the config file, or the embedded default.
fn resolve_data_dir(dir: DataDir) -> Result<PathBuf, ExitCode> {
    match (dir.config, dir.data_dir) {
        (_, Some(d)) => Ok(d),
        (Some(c), None) => match Config::load(&c) {
            Ok(c) => Ok(c.gateway.data_dir),
            Err(e) => {
                eprintln!("error: {e}");
                Err(ExitCode::FAILURE)
            }
        },
        (None, None) => Ok(Config::embedded_default().gateway.data_dir),
    }
}

fn export(dir: DataDir, sop_instance_uid: Option<&str>, out: &std::path::Path) -> ExitCode {
    let data_dir = match resolve_data_dir(dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let Some(sop_instance_uid) = sop_instance_uid else {
        return match dicom_gateway::store::export_all(&data_dir, out) {
            Ok(n) => {
                println!("wrote {n} instance(s) to {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    };
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot create {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    };
    use std::io::Write as _;
    let mut w = std::io::BufWriter::new(file);
    let r = dicom_gateway::store::export(&data_dir, sop_instance_uid, &mut w)
        .and_then(|n| w.flush().map(|()| n).map_err(|e| e.to_string()));
    match r {
        Ok(n) => {
            println!("wrote {} ({n} bytes)", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            drop(w);
            let _ = std::fs::remove_file(out);
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `load` on the data directory named by the arguments; prints its error and fails.
fn load_offline<T>(
    dir: DataDir,
    load: impl FnOnce(&std::path::Path) -> Result<T, String>,
) -> Result<T, ExitCode> {
    let data_dir = resolve_data_dir(dir)?;
    load(&data_dir).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

/// Prints `rows` as one JSON array, or as a table: header, a line each, and a count.
fn print_rows<T>(
    rows: &[T],
    json: bool,
    to_json: impl Fn(&T) -> serde_json::Value,
    header: &str,
    line: impl Fn(&T) -> String,
    noun: &str,
) -> ExitCode {
    if json {
        let v: Vec<serde_json::Value> = rows.iter().map(to_json).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!("{header}");
        for r in rows {
            println!("{}", line(r));
        }
        println!("{} {noun}(s)", rows.len());
    }
    ExitCode::SUCCESS
}

fn segments(dir: DataDir, json: bool) -> ExitCode {
    let records = match load_offline(dir, dicom_gateway::store::list_records) {
        Ok(r) => r,
        Err(code) => return code,
    };
    print_rows(
        &records,
        json,
        |r| {
            serde_json::json!({
                "segment": r.location.segment,
                "offset": r.location.offset,
                "length": r.location.end() - r.location.offset,
                "intact": r.sop_instance_uid.is_some(),
                "sop_instance_uid": r.sop_instance_uid,
            })
        },
        &format!(
            "{:>16}  {:>12}  {:>12}  {:<7}  SOP INSTANCE UID",
            "SEGMENT", "OFFSET", "BYTES", "INTACT"
        ),
        |r| {
            format!(
                "{:>16x}  {:>12}  {:>12}  {:<7}  {}",
                r.location.segment,
                r.location.offset,
                r.location.end() - r.location.offset,
                if r.sop_instance_uid.is_some() {
                    "yes"
                } else {
                    "no"
                },
                r.sop_instance_uid.as_deref().unwrap_or("-")
            )
        },
        "record",
    )
}

fn instances(dir: DataDir, json: bool) -> ExitCode {
    let rows = match load_offline(dir, dicom_gateway::store::read_instances) {
        Ok(r) => r,
        Err(code) => return code,
    };
    print_rows(
        &rows,
        json,
        |r| {
            serde_json::json!({
                "sop_instance_uid": r.sop_instance_uid,
                "sop_class_uid": r.sop_class_uid,
                "study_instance_uid": r.study_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "modality": r.modality,
                "transfer_syntax": r.transfer_syntax,
                "size": r.size,
                "checksum": spool::hex(&r.checksum),
                "calling_ae": r.calling_ae,
                "received_at_ms": r.received_at_ms,
                "segment": r.location.segment,
                "offset": r.location.offset,
            })
        },
        &format!(
            "{:<64}  {:<8}  {:<16}  {:>12}",
            "SOP INSTANCE UID", "MODALITY", "CALLING AE", "BYTES"
        ),
        |r| {
            format!(
                "{:<64}  {:<8}  {:<16}  {:>12}",
                r.sop_instance_uid, r.modality, r.calling_ae, r.size
            )
        },
        "instance",
    )
}

/// "30m", "12h", "2d" → milliseconds.
fn parse_age(s: &str) -> Option<u64> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms)
}

fn print_studies(v: &serde_json::Value) {
    let rows = v.as_array().cloned().unwrap_or_default();
    println!(
        "{:<64} {:<16} {:<4} {:<10} {:>9}  DELIVERY (delivered/pending/failed)",
        "STUDY INSTANCE UID", "CALLING AE", "MOD", "DATE", "INSTANCES"
    );
    for r in &rows {
        let delivery: Vec<String> = r["destinations"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        let (ok, pending, failed) = (
                            d["delivered"].as_u64().unwrap_or(0),
                            d["pending"].as_u64().unwrap_or(0),
                            d["failed"].as_u64().unwrap_or(0),
                        );
                        let flag = if failed > 0 {
                            " FAILED"
                        } else if pending > 0 {
                            " pending"
                        } else {
                            " complete"
                        };
                        format!(
                            "{}: {ok}/{pending}/{failed}{flag}",
                            d["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<64} {:<16} {:<4} {:<10} {:>9}  {}",
            r["study_instance_uid"].as_str().unwrap_or(""),
            r["calling_ae"].as_str().unwrap_or(""),
            r["modality"].as_str().unwrap_or(""),
            r["study_date"].as_str().unwrap_or(""),
            r["instances"].to_string(),
            if delivery.is_empty() {
                "not routed (cache only)".to_owned()
            } else {
                delivery.join("; ")
            }
        );
    }
    println!(
        "{} stud{}",
        rows.len(),
        if rows.len() == 1 { "y" } else { "ies" }
    );
}

fn echo(
    destination: Option<String>,
    config: Option<PathBuf>,
    to: Option<String>,
    aet: Option<String>,
    calling_ae: Option<String>,
) -> ExitCode {
    let cfg = match &config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded_default(),
    };
    let dest = match (destination, to) {
        (Some(name), None) => match cfg.destinations.iter().find(|d| d.name == name) {
            Some(d) => d.clone(),
            None => {
                let names: Vec<&str> = cfg.destinations.iter().map(|d| d.name.as_str()).collect();
                eprintln!(
                    "error: no destination '{name}' in {}; configured: {}",
                    cfg.source,
                    names.join(", ")
                );
                return ExitCode::FAILURE;
            }
        },
        (None, Some(addr)) => {
            let text = format!(
                "[gateway]\nae_title = \"{}\"\n[[listen]]\naddress = \"127.0.0.1:1\"\n[[destination]]\nname = \"adhoc\"\nae_title = {:?}\naddress = {:?}\n",
                cfg.gateway.ae_title,
                aet.unwrap_or_default(),
                addr
            );
            match Config::parse(&text, "--to/--aet") {
                Ok(c) => c.destinations[0].clone(),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => {
            eprintln!("error: name a configured destination, or give --to HOST:PORT --aet AE");
            return ExitCode::FAILURE;
        }
    };
    let mut dest = dest;
    if let Some(a) = calling_ae {
        match dicom_gateway::config::AeTitle::new(&a) {
            Ok(a) => dest.calling_ae = a,
            Err(e) => {
                eprintln!("error: --calling-ae: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let r = rt.block_on(async {
        let mut up = dicom_gateway::forward::upstream::Upstream::connect(&dest, &[]).await?;
        let status = up.echo().await;
        up.release().await;
        status
    });
    match r {
        Ok(0) => {
            println!(
                "C-ECHO {} -> {}@{}: Success ({} ms)",
                dest.calling_ae,
                dest.ae_title,
                dest.address,
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Ok(s) => {
            println!("C-ECHO {}@{}: status {s:04X}", dest.ae_title, dest.address);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
