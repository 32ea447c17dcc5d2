//! The node agent's admin server (`tidepool agent --admin-addr`): `/livez`, `/readyz`
//! (both 200 while the agent runs: the server starts after its socket is bound) and
//! `/metrics` (Prometheus text exposition, OpenMetrics), HTTP/1.1 without TLS on a
//! pod-local port, as the operator's.
//!
//! Every value is read at scrape time from the state the agent already keeps (the
//! pool's counters, each volume's FUSE counters, each checkpoint volume's store), so a
//! scrape costs a lock per volume and never a walk of a directory or a listing. Names
//! (each `tidepool_node_` and one line here):
//!
//! - `pool_capacity_bytes`, `pool_cache_bytes` (cache files resident),
//!   `pool_checkpoint_bytes` (checkpoint volumes' files, which the cache makes room
//!   for), `pool_read_buffer_bytes` (fetched blocks held in memory for readers);
//! - `lake_read_bytes_total`: bytes this agent fetched from the lake;
//! - `volumes{kind}`: volumes served (`dataset`, `checkpoint`);
//! - per volume (`volume` is the CSI volume id, the PV's name): `volume_reads_total`,
//!   `volume_read_bytes_total` (reads that reached the agent; passthrough reads go
//!   straight to the cache file and are not counted), `volume_read_errors_total`,
//!   `volume_opens_total`, `volume_passthrough_opens_total`, `volume_connected` (0 once
//!   its FUSE connection ended: the volume must be staged again),
//!   `volume_reads_resident_total` and `volume_reads_waited_total` (cache hits and
//!   misses), and `read_duration_seconds{volume,served}` (a histogram from request to
//!   answer, `served` = `resident` or `waited`, 50 us to 13 s);
//! - per volume and FUSE operation (`op`: `LOOKUP`, `READ`, ...): `fuse_requests_total`
//!   and `fuse_request_handling_seconds_total` (their mean latency is the ratio of the
//!   two rates);
//! - per dataset volume: `dataset_objects`, `dataset_bytes` (of the snapshot it serves;
//!   what is resident is in the CachePool status, which costs a walk of the snapshot);
//! - `pool_evicted_bytes_total`: bytes of cache files the evictor removed;
//! - per checkpoint volume: `checkpoint_uncommitted_steps` (written, rule not fired or
//!   files still open), and from its sync's last pass `checkpoint_pending_bytes`
//!   (committed, not in the lake yet), `checkpoint_oldest_pending_seconds`,
//!   `checkpoint_sync_failing` and `checkpoint_latest_durable_step`.

use std::convert::Infallible;
use std::sync::{Arc, Weak};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::Agent;

/// One volume's numbers at a scrape.
#[derive(Clone, Debug, Default)]
pub struct VolumeMetrics {
    pub id: String,
    pub checkpoint: bool,
    pub connected: bool,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub opens: u64,
    pub passthrough_opens: u64,
    /// FUSE requests handled, by operation: (name, count, nanoseconds handling them).
    pub requests: Vec<(&'static str, u64, u64)>,
    pub reads_resident: u64,
    pub reads_waited: u64,
    /// Read times: (resident, waited) (shared with the volume's counters).
    pub read_seconds: Option<(Histogram, Histogram)>,
    /// Dataset volumes: (objects, bytes) of the snapshot served.
    pub dataset: Option<(u64, u64)>,
    /// Checkpoint volumes: steps written and not committed.
    pub uncommitted_steps: Option<u64>,
    /// Checkpoint volumes: what their sync reported last.
    pub sync: Option<crate::checkpoint::sync::SyncStatus>,
}

/// Reads the agent at scrape time (weakly: the server never keeps it alive).
#[derive(Debug)]
struct AgentCollector(Weak<Agent>);

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(&[(&str, &str)], i64)],
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0i64);
    let mut m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// One sample without labels.
fn gauge1(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One sample without labels.
fn counter1(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(agent) = self.0.upgrade() else {
            return Ok(());
        };
        let pool = &agent.pool;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge1(
            &mut enc,
            "pool_capacity_bytes",
            "The pool's capacity (--cache-size).",
            g(pool.config().capacity),
        )?;
        gauge1(
            &mut enc,
            "pool_cache_bytes",
            "Bytes of cache files resident in the pool.",
            g(pool.used()),
        )?;
        gauge1(
            &mut enc,
            "pool_checkpoint_bytes",
            "Bytes of checkpoint volumes' files in the pool (the cache makes room for them).",
            g(pool.external()),
        )?;
        gauge1(
            &mut enc,
            "pool_read_buffer_bytes",
            "Bytes of fetched blocks held in memory for their readers.",
            g(pool.read_buffer_bytes()),
        )?;
        counter1(
            &mut enc,
            "lake_read_bytes",
            "Bytes this agent fetched from the lake.",
            pool.fetched(),
        )?;
        counter1(
            &mut enc,
            "pool_evicted_bytes",
            "Bytes of cache files evicted (least recently used, not open, not pinned).",
            pool.evicted(),
        )?;
        let volumes = agent.volume_metrics();
        let kinds = |checkpoint: bool| volumes.iter().filter(move |v| v.checkpoint == checkpoint);
        gauge(
            &mut enc,
            "volumes",
            "Volumes served, by kind.",
            &[
                (&[("kind", "dataset")], kinds(false).count() as i64),
                (&[("kind", "checkpoint")], kinds(true).count() as i64),
            ],
        )?;
        let labels: Vec<[(&str, &str); 1]> = volumes
            .iter()
            .map(|v| [("volume", v.id.as_str())])
            .collect();
        let per = |f: &dyn Fn(&VolumeMetrics) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            volumes
                .iter()
                .zip(&labels)
                .map(|(v, l)| (&l[..], f(v)))
                .collect()
        };
        counter(
            &mut enc,
            "volume_reads",
            "Read requests that reached the agent (passthrough reads do not).",
            &per(&|v| v.reads),
        )?;
        counter(
            &mut enc,
            "volume_read_bytes",
            "Bytes returned by read requests that reached the agent.",
            &per(&|v| v.read_bytes),
        )?;
        counter(
            &mut enc,
            "volume_read_errors",
            "Read requests answered with an error.",
            &per(&|v| v.read_errors),
        )?;
        counter(
            &mut enc,
            "volume_opens",
            "Files opened.",
            &per(&|v| v.opens),
        )?;
        counter(
            &mut enc,
            "volume_reads_resident",
            "Reads answered at once from blocks already in the pool (cache hits).",
            &per(&|v| v.reads_resident),
        )?;
        counter(
            &mut enc,
            "volume_reads_waited",
            "Reads that waited for a block to arrive from the lake or a prefetch in flight (cache misses).",
            &per(&|v| v.reads_waited),
        )?;
        {
            let h = Histogram::new([0.0f64; 0]);
            let mut m = enc.encode_descriptor(
                "read_duration_seconds",
                "Time from a read request to its answer, by whether its blocks were resident.",
                None,
                h.metric_type(),
            )?;
            for (v, l) in volumes.iter().zip(&labels) {
                if let Some((resident, waited)) = &v.read_seconds {
                    for (served, hist) in [("resident", resident), ("waited", waited)] {
                        let labels = [l[0], ("served", served)];
                        hist.encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        let by_op = |f: &dyn Fn(u64, u64) -> u64| {
            volumes
                .iter()
                .flat_map(|v| {
                    v.requests.iter().map(move |&(op, n, nanos)| {
                        ([("volume", v.id.as_str()), ("op", op)], f(n, nanos))
                    })
                })
                .collect::<Vec<_>>()
        };
        let rows = by_op(&|n, _| n);
        let rows: Vec<(&[(&str, &str)], u64)> = rows.iter().map(|(l, v)| (&l[..], *v)).collect();
        counter(
            &mut enc,
            "fuse_requests",
            "FUSE requests handled, by operation (passthrough reads and writes never reach the agent).",
            &rows,
        )?;
        {
            // Seconds as a float counter: the handling time's sum, for mean latency by
            // operation (rate of this over rate of fuse_requests_total).
            let c = ConstCounter::new(0.0f64);
            let mut m = enc.encode_descriptor(
                "fuse_request_handling_seconds",
                "Time spent handling FUSE requests, by operation (a read answered later from a fetch counts until it is handed on; read_duration_seconds has the time to the answer).",
                None,
                c.metric_type(),
            )?;
            for (l, nanos) in by_op(&|_, nanos| nanos) {
                ConstCounter::new(nanos as f64 / 1e9).encode(m.encode_family(&l)?)?;
            }
        }
        counter(
            &mut enc,
            "volume_passthrough_opens",
            "Files opened with FUSE passthrough (reads go to the cache file directly).",
            &per(&|v| v.passthrough_opens),
        )?;
        let rows: Vec<_> = per(&|v| v.connected as u64)
            .into_iter()
            .map(|(l, v)| (l, v as i64))
            .collect();
        gauge(
            &mut enc,
            "volume_connected",
            "1 while the volume's FUSE connection is up; 0 once it ended (stage it again).",
            &rows,
        )?;
        let dataset = |f: &dyn Fn((u64, u64)) -> u64| -> Vec<(&[(&str, &str)], i64)> {
            volumes
                .iter()
                .zip(&labels)
                .filter_map(|(v, l)| v.dataset.map(|d| (&l[..], g(f(d)))))
                .collect()
        };
        gauge(
            &mut enc,
            "dataset_objects",
            "Objects in the dataset volume's snapshot.",
            &dataset(&|d| d.0),
        )?;
        gauge(
            &mut enc,
            "dataset_bytes",
            "Bytes of the dataset volume's snapshot.",
            &dataset(&|d| d.1),
        )?;
        let rows: Vec<_> = volumes
            .iter()
            .zip(&labels)
            .filter_map(|(v, l)| v.uncommitted_steps.map(|n| (&l[..], g(n))))
            .collect();
        gauge(
            &mut enc,
            "checkpoint_uncommitted_steps",
            "Steps written in the checkpoint volume and not committed yet.",
            &rows,
        )?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let synced = |f: &dyn Fn(&crate::checkpoint::sync::SyncStatus) -> i64| {
            volumes
                .iter()
                .zip(&labels)
                .filter_map(|(v, l)| v.sync.as_ref().map(|st| (&l[..], f(st))))
                .collect::<Vec<_>>()
        };
        gauge(
            &mut enc,
            "checkpoint_pending_bytes",
            "Bytes committed in the checkpoint volume and not yet in the lake (as of the sync's last pass).",
            &synced(&|st| g(st.pending_bytes)),
        )?;
        gauge(
            &mut enc,
            "checkpoint_oldest_pending_seconds",
            "Age of the oldest commit not yet durable (0 when none).",
            &synced(&|st| {
                st.oldest_pending_unix_ms
                    .map_or(0, |t| g(now_ms.saturating_sub(t) / 1000))
            }),
        )?;
        gauge(
            &mut enc,
            "checkpoint_sync_failing",
            "1 while the volume's last upload pass failed (it is retried; the reason is in the CheckpointSync's status).",
            &synced(&|st| st.last_error.is_some() as i64),
        )?;
        gauge(
            &mut enc,
            "checkpoint_latest_durable_step",
            "The number of the latest step durable in the lake (-1 when none is).",
            &synced(&|st| {
                st.latest_durable
                    .as_ref()
                    .and_then(|i| crate::checkpoint::commit::step_number(&i.step))
                    .map_or(-1, g)
            }),
        )?;
        Ok(())
    }
}

/// The exposition of `agent`'s metrics now.
pub fn encode(agent: &Arc<Agent>) -> String {
    let mut registry = Registry::with_prefix("tidepool_node");
    registry.register_collector(Box::new(AgentCollector(Arc::downgrade(agent))));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Status, content type and body for a path.
fn respond(path: &str, agent: &Weak<Agent>) -> (StatusCode, &'static str, String) {
    match (path, agent.upgrade()) {
        // The admin server starts once the agent's socket is bound: alive is ready.
        ("/livez" | "/readyz", Some(_)) => (StatusCode::OK, "text/plain", "ok\n".into()),
        ("/metrics", Some(a)) => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(&a),
        ),
        (_, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the agent is stopping\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /livez, /readyz or /metrics\n".into(),
        ),
    }
}

/// Serves `/livez`, `/readyz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Weak<Agent>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin server: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, ty, body) = respond(req.uri().path(), &agent);
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", ty)
                            .body(Full::new(Bytes::from(body)))
                            .expect("a valid response"),
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin server: connection ended");
            }
        });
    }
}
