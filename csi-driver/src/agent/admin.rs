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
//!   for), `pool_read_buffer_bytes` (fetched blocks held in memory for readers),
//!   `pool_disk_free_bytes` (the pool's file system's free space at the cache's last
//!   check, which keeps `CacheConfig::free_space` of it free for checkpoint writers;
//!   absent where the file system gives no sizes, as ramfs);
//! - `lake_read_bytes_total`: bytes this agent fetched from the lake;
//! - `volumes{kind}`: volumes served (`dataset`, `checkpoint`);
//! - per volume (`volume` is the CSI volume id, the PV's name): `volume_reads_total`,
//!   `volume_read_bytes_total` (reads that reached the agent; passthrough reads go
//!   straight to the cache file and are not counted), `volume_read_errors_total`,
//!   `volume_opens_total`, `volume_passthrough_opens_total`, `volume_connected` (0 once
//!   its FUSE connection ended: the volume must be staged again), and
//!   `read_duration_seconds{volume,served}` (a histogram from request to answer,
//!   `served` = `resident` (cache hits) or `waited` (misses), 50 us to 13 s: its
//!   `_count`s are the hits and misses);
//! - per volume and FUSE operation (`op`: `LOOKUP`, `READ`, ...):
//!   `fuse_request_duration_seconds` (a histogram of handling times, 50 us to 13 s; its
//!   `_count` is the requests handled);
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
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::Agent;
use crate::checkpoint::commit::step_number;
use crate::checkpoint::sync::SyncStatus;

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
    /// FUSE requests handled, by operation, with their handling times.
    pub requests: Vec<crate::fuse::session::OpTotals>,
    /// Read times: (resident, waited) (shared with the volume's counters; their counts
    /// are the hits and misses).
    pub read_seconds: Option<(Histogram, Histogram)>,
    /// Dataset volumes: (objects, bytes) of the snapshot served.
    pub dataset: Option<(u64, u64)>,
    /// Checkpoint volumes: steps written and not committed.
    pub uncommitted_steps: Option<u64>,
    /// Checkpoint volumes: what their sync reported last.
    pub sync: Option<SyncStatus>,
}

/// One operation's handling times as a histogram (from the connection's counters).
#[derive(Debug)]
struct HandlingTimes(crate::fuse::session::OpTotals);

impl EncodeMetric for HandlingTimes {
    fn encode(&self, mut enc: MetricEncoder) -> std::fmt::Result {
        use crate::fuse::session::HANDLING_BOUNDS;
        let t = &self.0;
        // The count is the buckets' sum, so the histogram is consistent even when a
        // request is counted between two loads.
        let buckets: Vec<(f64, u64)> = HANDLING_BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(t.buckets)
            .collect();
        let count = t.buckets.iter().sum();
        enc.encode_histogram::<NoLabelSet>(t.nanos as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Reads the agent at scrape time (weakly: the server never keeps it alive).
#[derive(Debug)]
struct AgentCollector(Weak<Agent>);

/// A metric family: its descriptor, then one sample per row. A family without rows
/// still names itself (a dashboard finds it before the first volume is staged).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, metric) in rows {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric without labels.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> std::fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let Some(agent) = self.0.upgrade() else {
            return Ok(());
        };
        let pool = &agent.pool;
        let g = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let e = &mut enc;
        single(
            e,
            "pool_capacity_bytes",
            "The pool's capacity (--cache-size).",
            g(pool.config().capacity),
        )?;
        single(
            e,
            "pool_cache_bytes",
            "Bytes of cache files resident in the pool.",
            g(pool.used()),
        )?;
        single(
            e,
            "pool_checkpoint_bytes",
            "Bytes of checkpoint volumes' files in the pool (the cache makes room for them).",
            g(pool.external()),
        )?;
        if let Some(free) = pool.disk_free() {
            single(
                e,
                "pool_disk_free_bytes",
                "Free bytes of the pool's file system at the last check (the cache evicts to keep a reserve of it free for checkpoint writers).",
                g(free),
            )?;
        }
        single(
            e,
            "pool_read_buffer_bytes",
            "Bytes of fetched blocks held in memory for their readers.",
            g(pool.read_buffer_bytes()),
        )?;
        single(
            e,
            "lake_read_bytes",
            "Bytes this agent fetched from the lake.",
            ConstCounter::new(pool.fetched()),
        )?;
        single(
            e,
            "pool_evicted_bytes",
            "Bytes of cache files evicted (least recently used, not open, not pinned).",
            ConstCounter::new(pool.evicted()),
        )?;
        single(
            e,
            "peer_read_bytes",
            "Bytes this agent took from its peers (the cluster-wide cache) instead of the lake.",
            ConstCounter::new(pool.fetched_from_peers()),
        )?;
        let ids = agent.registry.dataset_ids();
        let peers = agent.peers.get().map(|p| p.peers.clone());
        type Row = ([(&'static str, String); 1], ConstCounter<u64>);
        let per_dataset = |f: &dyn Fn(&str) -> u64| -> Vec<Row> {
            ids.iter()
                .map(|id| ([("dataset", id.clone())], ConstCounter::new(f(id))))
                .collect()
        };
        family(
            e,
            "dataset_lake_read_bytes",
            "Bytes of each dataset (by id, as in the CachePool status) fetched from the lake.",
            Counter,
            per_dataset(&|id| pool.dataset_bytes(id).0),
        )?;
        family(
            e,
            "dataset_peer_read_bytes",
            "Bytes of each dataset taken from peers: lake bytes saved.",
            Counter,
            per_dataset(&|id| pool.dataset_bytes(id).1),
        )?;
        family(
            e,
            "dataset_peer_served_bytes",
            "Bytes of each dataset served to peers.",
            Counter,
            per_dataset(&|id| peers.as_ref().map_or(0, |p| p.served_of(id))),
        )?;
        if let Some(p) = &peers {
            single(
                e,
                "peer_members",
                "Other agents this one shares its cache with (fresh CachePools with a peer endpoint).",
                g(p.members().len() as u64),
            )?;
            family(
                e,
                "peer_failures",
                "Peer fetches that failed, by kind (unreachable, slow, refused, corrupt: bytes that failed their check and were not used); the blocks came from the lake.",
                Counter,
                p.faults()
                    .into_iter()
                    .map(|(f, n)| ([("kind", f.as_str())], ConstCounter::new(n))),
            )?;
        }
        let volumes = agent.volume_metrics();
        let kinds = [("dataset", false), ("checkpoint", true)].map(|(kind, checkpoint)| {
            let n = volumes
                .iter()
                .filter(|v| v.checkpoint == checkpoint)
                .count();
            ([("kind", kind)], g(n as u64))
        });
        family(e, "volumes", "Volumes served, by kind.", Gauge, kinds)?;
        let vol = |v: &VolumeMetrics| [("volume", v.id.clone())];
        let counted = |f: fn(&VolumeMetrics) -> u64| {
            volumes
                .iter()
                .map(move |v| (vol(v), ConstCounter::new(f(v))))
        };
        family(
            e,
            "volume_reads",
            "Read requests that reached the agent (passthrough reads do not).",
            Counter,
            counted(|v| v.reads),
        )?;
        family(
            e,
            "volume_read_bytes",
            "Bytes returned by read requests that reached the agent.",
            Counter,
            counted(|v| v.read_bytes),
        )?;
        family(
            e,
            "volume_read_errors",
            "Read requests answered with an error.",
            Counter,
            counted(|v| v.read_errors),
        )?;
        family(
            e,
            "volume_opens",
            "Files opened.",
            Counter,
            counted(|v| v.opens),
        )?;
        family(
            e,
            "volume_passthrough_opens",
            "Files opened with FUSE passthrough (reads go to the cache file directly).",
            Counter,
            counted(|v| v.passthrough_opens),
        )?;
        // Hits and misses are this histogram's counts by `served`.
        let timed = volumes.iter().flat_map(|v| {
            v.read_seconds.iter().flat_map(move |(resident, waited)| {
                [("resident", resident), ("waited", waited)].map(|(served, h)| {
                    (
                        [("volume", v.id.clone()), ("served", served.into())],
                        h.clone(),
                    )
                })
            })
        });
        family(
            e,
            "read_duration_seconds",
            "Time from a read request to its answer, by whether its blocks were resident (a cache hit) or it waited for them (a miss).",
            MetricType::Histogram,
            timed,
        )?;
        let ops = volumes.iter().flat_map(|v| {
            v.requests.iter().map(move |t| {
                (
                    [("volume", v.id.clone()), ("op", t.op.to_owned())],
                    HandlingTimes(t.clone()),
                )
            })
        });
        family(
            e,
            "fuse_request_duration_seconds",
            "Time spent handling FUSE requests, by operation; its count is the requests handled (passthrough reads and writes never reach the agent; a read answered later from a fetch counts until it is handed on, read_duration_seconds has the time to the answer).",
            MetricType::Histogram,
            ops,
        )?;
        family(
            e,
            "volume_connected",
            "1 while the volume's FUSE connection is up; 0 once it ended (stage it again).",
            Gauge,
            volumes.iter().map(|v| (vol(v), g(v.connected as u64))),
        )?;
        family(
            e,
            "dataset_objects",
            "Objects in the dataset volume's snapshot.",
            Gauge,
            volumes
                .iter()
                .filter_map(|v| v.dataset.map(|(n, _)| (vol(v), g(n)))),
        )?;
        family(
            e,
            "dataset_bytes",
            "Bytes of the dataset volume's snapshot.",
            Gauge,
            volumes
                .iter()
                .filter_map(|v| v.dataset.map(|(_, b)| (vol(v), g(b)))),
        )?;
        family(
            e,
            "checkpoint_uncommitted_steps",
            "Steps written in the checkpoint volume and not committed yet.",
            Gauge,
            volumes
                .iter()
                .filter_map(|v| v.uncommitted_steps.map(|n| (vol(v), g(n)))),
        )?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let synced = |f: fn(&SyncStatus, u64) -> i64| {
            volumes.iter().filter_map(move |v| {
                v.sync
                    .as_ref()
                    .map(|st| (vol(v), ConstGauge::new(f(st, now_ms))))
            })
        };
        family(
            e,
            "checkpoint_pending_bytes",
            "Bytes committed in the checkpoint volume and not yet in the lake (as of the sync's last pass).",
            Gauge,
            synced(|st, _| i64::try_from(st.pending_bytes).unwrap_or(i64::MAX)),
        )?;
        family(
            e,
            "checkpoint_oldest_pending_seconds",
            "Age of the oldest commit not yet durable (0 when none).",
            Gauge,
            synced(|st, now_ms| {
                st.oldest_pending_unix_ms
                    .map_or(0, |t| (now_ms.saturating_sub(t) / 1000) as i64)
            }),
        )?;
        family(
            e,
            "checkpoint_sync_failing",
            "1 while the volume's last upload pass failed (it is retried; the reason is in the CheckpointSync's status).",
            Gauge,
            synced(|st, _| st.last_error.is_some() as i64),
        )?;
        family(
            e,
            "checkpoint_latest_durable_step",
            "The number of the latest step durable in the lake (-1 when none is).",
            Gauge,
            synced(|st, _| {
                st.latest_durable
                    .as_ref()
                    .and_then(|i| step_number(&i.step))
                    .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
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
