//! The control socket: the CLI's `status` and `queue` commands talk to the running daemon here,
//! since redb admits one process.
//!
//! A Unix stream socket (`gateway.control_socket`, default `<data_dir>/control.sock`; the
//! appliance puts it in the runtime directory), mode 0660: owner and group. One JSON request
//! line per connection, one JSON response line back.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forward::Destinations;
use crate::listener::Permits;
use crate::live::Live;
use crate::store::queue::{self, Selector, State};
use crate::store::{now_ms, Store};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    QueueList {
        #[serde(default)]
        failed: bool,
        #[serde(default)]
        destination: Option<String>,
        #[serde(default = "default_limit")]
        limit: usize,
    },
    QueueRetry {
        #[serde(default)]
        destination: Option<String>,
        #[serde(default)]
        sop_instance_uid: Option<String>,
    },
    QueuePurge {
        #[serde(default)]
        destination: Option<String>,
        #[serde(default)]
        sop_instance_uid: Option<String>,
    },
    /// Re-read the configuration file (as SIGHUP does) and say what changed.
    Reload,
    /// Studies received since a time, with per-destination delivery counts.
    Studies {
        since_ms: u64,
        #[serde(default)]
        calling_ae: Option<String>,
        #[serde(default = "default_limit")]
        limit: usize,
    },
}

fn default_limit() -> usize {
    100
}

/// What the control socket can see of the running gateway.
#[derive(Clone)]
pub struct Control {
    pub config: Live<Config>,
    pub store: Store,
    pub dests: Live<Destinations>,
    pub permits: Permits,
    pub started_ms: u64,
    /// Asks the daemon to reload its configuration file.
    pub reload: crate::daemon::ReloadSender,
}

/// Binds the socket, replacing a stale one from an earlier run.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, ctl: Control, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            () = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let ctl = ctl.clone();
                tokio::spawn(async move {
                    if let Err(e) = tokio::time::timeout(IO_TIMEOUT, handle(stream, &ctl)).await {
                        log::debug!(error:% = e; "control request timed out");
                    }
                });
            }
            Err(e) => {
                log::warn!(error:% = e; "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(p) = addr.as_pathname() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn handle(stream: UnixStream, ctl: &Control) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST as u64);
    if rd.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Reload) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = ctl.reload.send(Some(tx)).await.is_ok();
            match rx.await {
                Ok(Ok(summary)) if sent => {
                    json!({"ok": true, "result": {"reloaded": true, "changes": summary}})
                }
                Ok(Err(e)) => json!({"ok": false, "error": e}),
                _ => json!({"ok": false, "error": "the gateway is stopping"}),
            }
        }
        Ok(req) => {
            let ctl = ctl.clone();
            match tokio::task::spawn_blocking(move || answer(&ctl, req)).await {
                Ok(Ok(v)) => json!({"ok": true, "result": v}),
                Ok(Err(e)) => json!({"ok": false, "error": e}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = response.to_string();
    out.push('\n');
    let _ = wr.write_all(out.as_bytes()).await;
}

use tokio::io::AsyncReadExt as _;

/// Answers one request (blocking: reads the index).
fn answer(ctl: &Control, req: Request) -> Result<Value, String> {
    let db = ctl.store.db();
    match req {
        Request::Status => {
            let now = now_ms();
            let mut dests = Vec::new();
            for d in ctl.dests.get().iter() {
                let (counts, oldest) = queue::stats(db, &d.config.name)?;
                dests.push(json!({
                    "name": d.config.name,
                    "ae_title": d.config.ae_title.as_str(),
                    "address": d.config.address,
                    "link": d.link_status(),
                    "pending": counts.pending,
                    "failed": counts.failed,
                    "delivered": counts.delivered,
                    "oldest_pending_age_s": oldest.map(|o| now.saturating_sub(o) / 1000),
                }));
            }
            let free = ctl.store.free_bytes().ok();
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": now.saturating_sub(ctl.started_ms) / 1000,
                "ae_title": ctl.config.get().gateway.ae_title.as_str(),
                "listeners": ctl.config.get().listen.iter().map(|l| l.address.to_string()).collect::<Vec<_>>(),
                "active_associations": ctl.permits.active(),
                "max_associations": ctl.config.get().gateway.max_associations.get(),
                "data_dir": ctl.config.get().gateway.data_dir.display().to_string(),
                "disk_free_bytes": free,
                "disk_reserve_bytes": ctl.config.get().gateway.min_free_disk_bytes,
                "spare_segments_ready": ctl.store.pool().spares().map_or(0, |s| s.count()),
                "spare_segments_wanted": ctl.store.pool().spares_wanted(),
                "destinations": dests,
            }))
        }
        Request::QueueList {
            failed,
            destination,
            limit,
        } => {
            let state = failed.then_some(State::Failed);
            let rows = queue::list(db, destination.as_deref(), state, limit.min(100_000))?;
            Ok(Value::Array(
                rows.into_iter()
                    .map(|(d, sop, e)| {
                        json!({
                            "destination": d,
                            "sop_instance_uid": sop,
                            "state": format!("{:?}", e.state).to_lowercase(),
                            "attempts": e.attempts,
                            "last_status": e.last_status.map(|s| format!("{s:04X}")),
                            "last_error": e.last_error,
                            "enqueued_ms": e.enqueued_ms,
                            "updated_ms": e.updated_ms,
                        })
                    })
                    .collect(),
            ))
        }
        Request::QueueRetry {
            destination,
            sop_instance_uid,
        } => {
            let sel = Selector {
                dest: destination.as_deref(),
                sop: sop_instance_uid.as_deref(),
            };
            let (n, dests) = queue::retry_failed(db, &sel)?;
            for d in &dests {
                ctl.dests.get().wake(d);
            }
            log::warn!(count = n, destination:? = destination, sop_instance_uid:? = sop_instance_uid; "operator retry: failed entries back to pending");
            Ok(json!({ "retried": n }))
        }
        Request::Reload => Err("reload is handled by the daemon loop".into()),
        Request::Studies {
            since_ms,
            calling_ae,
            limit,
        } => studies(ctl, since_ms, calling_ae.as_deref(), limit),
        Request::QueuePurge {
            destination,
            sop_instance_uid,
        } => {
            let sel = Selector {
                dest: destination.as_deref(),
                sop: sop_instance_uid.as_deref(),
            };
            let n = queue::purge_failed(db, &sel)?;
            log::warn!(count = n, destination:? = destination, sop_instance_uid:? = sop_instance_uid; "operator purge: failed entries dropped (instances stay in the cache)");
            Ok(json!({ "purged": n }))
        }
    }
}

/// The reconciliation view: studies received since `since_ms` (by receive time of their
/// instances), each with its instance count and, per destination, how many are delivered,
/// pending and failed.
fn studies(
    ctl: &Control,
    since_ms: u64,
    calling_ae: Option<&str>,
    limit: usize,
) -> Result<Value, String> {
    use std::collections::BTreeMap;
    let db = ctl.store.db();
    let dests: Vec<String> = ctl
        .dests
        .get()
        .iter()
        .map(|d| d.config.name.clone())
        .collect();
    #[derive(Default)]
    struct Study {
        calling_ae: String,
        modality: String,
        accession: String,
        study_date: String,
        first_ms: u64,
        last_ms: u64,
        instances: u64,
        per_dest: BTreeMap<String, [u64; 3]>,
    }
    let mut studies: BTreeMap<String, Study> = BTreeMap::new();
    let mut after = Some((since_ms.saturating_sub(1), String::from("\u{10FFFF}")));
    'scan: loop {
        let batch = crate::store::index::oldest(db.as_ref(), after.clone(), 1024)?;
        let Some(last) = batch.last().cloned() else {
            break;
        };
        after = Some(last);
        for (ms, sop) in batch {
            let Some(r) = crate::store::index::get(db.as_ref(), &sop)? else {
                continue;
            };
            if calling_ae.is_some_and(|a| a != r.calling_ae) {
                continue;
            }
            if !studies.contains_key(&r.study_instance_uid) && studies.len() >= limit {
                break 'scan;
            }
            let s = studies
                .entry(r.study_instance_uid.clone())
                .or_insert_with(|| Study {
                    calling_ae: r.calling_ae.clone(),
                    modality: r.modality.clone(),
                    accession: r.accession_number.clone(),
                    study_date: r.study_date.clone(),
                    first_ms: ms,
                    ..Study::default()
                });
            s.instances += 1;
            s.last_ms = s.last_ms.max(ms);
            for (d, e) in queue::entries_of(db, &sop, &dests)? {
                let c = s.per_dest.entry(d).or_default();
                match e.state {
                    State::Delivered => c[0] += 1,
                    State::Pending | State::InFlight => c[1] += 1,
                    State::Failed => c[2] += 1,
                }
            }
        }
    }
    Ok(Value::Array(
        studies
            .into_iter()
            .map(|(uid, s)| {
                json!({
                    "study_instance_uid": uid,
                    "calling_ae": s.calling_ae,
                    "modality": s.modality,
                    "accession_number": s.accession,
                    "study_date": s.study_date,
                    "first_received_ms": s.first_ms,
                    "last_received_ms": s.last_ms,
                    "instances": s.instances,
                    "destinations": s.per_dest.into_iter().map(|(d, [delivered, pending, failed])| {
                        json!({"name": d, "delivered": delivered, "pending": pending, "failed": failed})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect(),
    ))
}

/// Client side: sends one request to the daemon of `data_dir`.
pub fn request(path: &Path, req: &Request) -> Result<Value, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the gateway at {} ({e}): is it running? (systemctl status dicom-gateway)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut resp)
        .map_err(|e| e.to_string())?;
    let v: Value =
        serde_json::from_str(&resp).map_err(|e| format!("bad answer from the gateway: {e}"))?;
    if v["ok"] == Value::Bool(true) {
        Ok(v["result"].clone())
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_owned())
    }
}
