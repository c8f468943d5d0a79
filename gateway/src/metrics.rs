//! Prometheus metrics: the KPIs an imaging department tracks, served as text on a management
//! address (`[metrics] address`, loopback by default).
//!
//! Counters are updated where things happen; queue, link and disk gauges are read from the
//! index and the forwarder at scrape time, so they are never stale.

use std::sync::LazyLock;
use std::time::Duration;

use dicom_ul::pdu::AssociationRJSource;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::store::{evict, now_ms, queue};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    associations: Family<Labels, Counter>,
    cstore: Family<Labels, Counter>,
    received_bytes: Counter,
    forward: Family<Labels, Counter>,
    evicted_instances: Counter,
    evicted_bytes: Counter,
    active_associations: Gauge,
    queue_pending: Family<Labels, Gauge>,
    queue_failed: Family<Labels, Gauge>,
    queue_delivered: Family<Labels, Gauge>,
    queue_oldest: Family<Labels, Gauge>,
    destination_up: Family<Labels, Gauge>,
    disk_free: Gauge,
    disk_used_percent: Gauge,
    spare_segments: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("dicom_gateway");
        let m = Metrics {
            associations: Family::default(),
            cstore: Family::default(),
            received_bytes: Counter::default(),
            forward: Family::default(),
            evicted_instances: Counter::default(),
            evicted_bytes: Counter::default(),
            active_associations: Gauge::default(),
            queue_pending: Family::default(),
            queue_failed: Family::default(),
            queue_delivered: Family::default(),
            queue_oldest: Family::default(),
            destination_up: Family::default(),
            disk_free: Gauge::default(),
            disk_used_percent: Gauge::default(),
            spare_segments: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "associations",
            "Associations requested, by result (accepted, rejected) and rejection reason",
            m.associations.clone(),
        );
        registry.register(
            "cstore",
            "C-STORE requests answered, by DIMSE status",
            m.cstore.clone(),
        );
        registry.register(
            "received_bytes",
            "Dataset bytes received",
            m.received_bytes.clone(),
        );
        registry.register(
            "forward",
            "Forwarding attempts, by destination, outcome (delivered, retry, failed) and DIMSE status",
            m.forward.clone(),
        );
        registry.register(
            "evicted_instances",
            "Instances evicted from the cache",
            m.evicted_instances.clone(),
        );
        registry.register(
            "evicted_bytes",
            "Bytes evicted from the cache",
            m.evicted_bytes.clone(),
        );
        registry.register(
            "active_associations",
            "Associations in progress",
            m.active_associations.clone(),
        );
        registry.register(
            "queue_pending",
            "Queue entries pending or in flight",
            m.queue_pending.clone(),
        );
        registry.register(
            "queue_failed",
            "Queue entries in the failed queue",
            m.queue_failed.clone(),
        );
        registry.register(
            "queue_delivered",
            "Queue entries delivered",
            m.queue_delivered.clone(),
        );
        registry.register(
            "queue_oldest_pending_seconds",
            "Age of the oldest pending queue entry",
            m.queue_oldest.clone(),
        );
        registry.register(
            "destination_up",
            "1 if the destination's link is up, 0 if down",
            m.destination_up.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the data filesystem",
            m.disk_free.clone(),
        );
        registry.register(
            "disk_used_percent",
            "Use of the data filesystem in percent",
            m.disk_used_percent.clone(),
        );
        registry.register(
            "spare_segments",
            "Spare segments ready (written in advance; gateway.spare_segments wanted)",
            m.spare_segments.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn association_accepted(&self) {
        self.associations
            .get_or_create(&vec![("result", "accepted".into())])
            .inc();
    }

    pub fn association_rejected(&self, source: &AssociationRJSource) {
        use dicom_ul::pdu::{
            AssociationRJServiceProviderASCEReason as Asce,
            AssociationRJServiceProviderPresentationReason as Pres,
            AssociationRJServiceUserReason as User,
        };
        let reason = match source {
            AssociationRJSource::ServiceUser(User::CalledAETitleNotRecognized) => "called_ae_title",
            AssociationRJSource::ServiceUser(User::CallingAETitleNotRecognized) => {
                "calling_ae_title"
            }
            AssociationRJSource::ServiceUser(User::ApplicationContextNameNotSupported) => {
                "application_context"
            }
            AssociationRJSource::ServiceProviderASCE(Asce::ProtocolVersionNotSupported) => {
                "protocol_version"
            }
            AssociationRJSource::ServiceProviderPresentation(Pres::LocalLimitExceeded) => {
                "association_limit"
            }
            _ => "other",
        };
        self.associations
            .get_or_create(&vec![
                ("result", "rejected".into()),
                ("reason", reason.into()),
            ])
            .inc();
    }

    pub fn cstore(&self, status: u16, bytes: u64) {
        self.cstore
            .get_or_create(&vec![("status", format!("{status:04X}"))])
            .inc();
        self.received_bytes.inc_by(bytes);
    }

    pub fn forwarded(&self, destination: &str, outcome: &'static str, status: Option<u16>) {
        self.forward
            .get_or_create(&vec![
                ("destination", destination.to_owned()),
                ("outcome", outcome.into()),
                (
                    "status",
                    status.map_or_else(|| "none".into(), |s| format!("{s:04X}")),
                ),
            ])
            .inc();
    }

    pub fn evicted(&self, instances: u64, bytes: u64) {
        self.evicted_instances.inc_by(instances);
        self.evicted_bytes.inc_by(bytes);
    }

    /// Sets the gauges from the running gateway, then renders the text exposition format.
    pub fn render(&self, ctl: &Control) -> String {
        self.active_associations
            .set(i64::try_from(ctl.permits.active()).unwrap_or(i64::MAX));
        let now = now_ms();
        let db = ctl.store.db();
        for d in ctl.dests.get().iter() {
            let l: Labels = vec![("destination", d.config.name.clone())];
            if let Ok((c, oldest)) = queue::stats(db, &d.config.name) {
                let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.queue_pending.get_or_create(&l).set(g(c.pending));
                self.queue_failed.get_or_create(&l).set(g(c.failed));
                self.queue_delivered.get_or_create(&l).set(g(c.delivered));
                self.queue_oldest
                    .get_or_create(&l)
                    .set(g(oldest.map_or(0, |o| now.saturating_sub(o) / 1000)));
            }
            self.destination_up
                .get_or_create(&l)
                .set(i64::from(d.link_status().up == Some(true)));
        }
        if let Ok((pct, free)) = evict::disk_use(&ctl.config.get().gateway.data_dir) {
            self.disk_free.set(i64::try_from(free).unwrap_or(i64::MAX));
            // Truncation to whole percent is what the gauge shows.
            #[allow(clippy::cast_possible_truncation)]
            self.disk_used_percent.set(pct as i64);
        }
        let spares = ctl.store.pool().spares().map_or(0, |s| s.count());
        self.spare_segments
            .set(i64::try_from(spares).unwrap_or(i64::MAX));
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, ctl: Control, shutdown: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                // The request itself does not matter; read what the client sent first.
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let body = tokio::task::spawn_blocking(move || get().render(&ctl)).await.unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            })
            .await;
        });
    }
}
