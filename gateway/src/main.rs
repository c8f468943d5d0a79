//! The `dicom-gateway` binary: argument parsing, config, logging and the runtime around
//! [`dicom_gateway::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dicom_gateway::config::Config;
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
        /// Config file naming the data directory.
        #[arg(long, short, conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// Data directory, instead of --config.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the DICOM Conformance Statement of this version (Markdown).
    Conformance,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
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
        Command::Instances {
            config,
            data_dir,
            json,
        } => instances(config, data_dir, json),
        Command::Conformance => {
            print!("{}", dicom_gateway::conformance::statement());
            ExitCode::SUCCESS
        }
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
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        dicom_gateway::run(config, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
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

fn instances(config: Option<PathBuf>, data_dir: Option<PathBuf>, json: bool) -> ExitCode {
    let data_dir = match (config, data_dir) {
        (_, Some(d)) => d,
        (Some(c), None) => match Config::load(&c) {
            Ok(c) => c.gateway.data_dir,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => Config::embedded_default().gateway.data_dir,
    };
    let rows = match dicom_gateway::store::read_instances(&data_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
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
                    "path": spool::relative_path(&r.checksum),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!(
            "{:<64}  {:<8}  {:<16}  {:>12}",
            "SOP INSTANCE UID", "MODALITY", "CALLING AE", "BYTES"
        );
        for r in &rows {
            println!(
                "{:<64}  {:<8}  {:<16}  {:>12}",
                r.sop_instance_uid, r.modality, r.calling_ae, r.size
            );
        }
        println!("{} instance(s)", rows.len());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
