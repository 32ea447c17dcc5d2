//! CSI conformance of `tidepool csi` + `tidepool agent` (the real binaries) over the
//! plugin's Unix socket, as kubelet drives them, with real FUSE and bind mounts and a
//! real lake (Azurite): what csi-sanity checks for a node-only plugin (identity,
//! capabilities, node info, argument checks, idempotency, stats of an unknown volume),
//! then real data through published targets, and restarts of each process (kill -9)
//! with every byte read afterwards checked.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_csi::csi_proto as pb;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::mounts::is_mounted;
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::node::{
    NodePaths, NodeProcess, csi_clients, free_port, http_get, ro_capability, sample, volume_stats,
};
use tidepool_csi::testing::{Azurite, pattern, within};
use tonic::Code;

const BIG: usize = 48 << 20;

struct Node {
    paths: NodePaths,
    _work: tempfile::TempDir,
    /// `None` once the lake was stopped.
    az: Option<Azurite>,
    url: String,
    files: Vec<(String, Vec<u8>)>,
}

async fn node() -> Node {
    let az = Azurite::start();
    let lake = az.lake("data").await;
    let mut files = Vec::new();
    for i in 0..12u64 {
        let data = pattern(i, 50_000 + 37_000 * i as usize);
        let name = format!("dir{}/f{i:02}.bin", i % 3);
        lake.put(
            &format!("ds/{name}"),
            Bytes::from(data.clone()),
            &Default::default(),
        )
        .await
        .unwrap();
        files.push((name, data));
    }
    let big = pattern(99, BIG);
    let mut ids = vec![];
    for (i, chunk) in big.chunks(8 << 20).enumerate() {
        let id = BlockId::numbered("b", i as u32);
        lake.put_block("ds/big.bin", &id, Bytes::copy_from_slice(chunk), None)
            .await
            .unwrap();
        ids.push(id);
    }
    lake.put_block_list("ds/big.bin", &ids, None).await.unwrap();
    files.push(("big.bin".into(), big));
    let work = tempfile::tempdir().unwrap();
    let paths = NodePaths::new(Path::new(env!("CARGO_BIN_EXE_tidepool")), work.path());
    Node {
        paths,
        _work: work,
        url: az.url("data", "ds"),
        az: Some(az),
        files,
    }
}

impl Node {
    fn staging(&self) -> PathBuf {
        self.paths.work.join("kubelet/staging/vol1")
    }
    fn target(&self, pod: u32) -> PathBuf {
        self.paths
            .work
            .join(format!("kubelet/pods/p{pod}/volumes/mount"))
    }
    fn context(&self) -> HashMap<String, String> {
        HashMap::from([
            ("tidepool.dev/kind".into(), "DatasetCache".into()),
            ("tidepool.dev/namespace".into(), "ml".into()),
            ("tidepool.dev/name".into(), "imagenet".into()),
            ("tidepool.dev/uid".into(), "u1".into()),
            ("tidepool.dev/url".into(), self.url.clone()),
            // What kubelet adds with podInfoOnMount.
            ("csi.storage.k8s.io/pod.name".into(), "trainer-0".into()),
        ])
    }
    fn stage_req(&self) -> pb::NodeStageVolumeRequest {
        pb::NodeStageVolumeRequest {
            volume_id: "vol1".into(),
            publish_context: Default::default(),
            staging_target_path: self.staging().display().to_string(),
            volume_capability: Some(ro_capability()),
            secrets: HashMap::from([("accountKey".into(), ACCOUNT_KEY.into())]),
            volume_context: self.context(),
        }
    }
    fn publish_req(&self, pod: u32) -> pb::NodePublishVolumeRequest {
        pb::NodePublishVolumeRequest {
            volume_id: "vol1".into(),
            publish_context: Default::default(),
            staging_target_path: self.staging().display().to_string(),
            target_path: self.target(pod).display().to_string(),
            volume_capability: Some(ro_capability()),
            readonly: true,
            secrets: Default::default(),
            volume_context: self.context(),
        }
    }
    fn unpublish_req(&self, pod: u32) -> pb::NodeUnpublishVolumeRequest {
        pb::NodeUnpublishVolumeRequest {
            volume_id: "vol1".into(),
            target_path: self.target(pod).display().to_string(),
        }
    }
    fn unstage_req(&self) -> pb::NodeUnstageVolumeRequest {
        pb::NodeUnstageVolumeRequest {
            volume_id: "vol1".into(),
            staging_target_path: self.staging().display().to_string(),
        }
    }
    /// Every file read through `root`, byte for byte.
    fn check_all(&self, root: &Path) {
        for (name, data) in &self.files {
            let got = std::fs::read(root.join(name))
                .unwrap_or_else(|e| panic!("reading {name} through {}: {e}", root.display()));
            assert!(got == *data, "{name} through {} differs", root.display());
        }
    }
    /// Tidepool mounts left under the work directory.
    fn mounts_left(&self) -> Vec<PathBuf> {
        self.paths.mounts_left()
    }
}

impl Drop for Node {
    /// A failed test leaves no mount behind (detached: its server may be gone).
    fn drop(&mut self) {
        self.paths.detach_mounts();
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn message<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> String {
    r.unwrap_err().message().to_owned()
}

/// The plugin's, the agent's and the keeper's logs, for a failed assertion.
fn three_logs(csi: &NodeProcess, agent: &NodeProcess, keeper: &NodeProcess) -> String {
    format!(
        "plugin:\n{}\nagent:\n{}\nkeeper:\n{}",
        csi.log(),
        agent.log(),
        keeper.log()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_node_info_and_argument_checks_as_csi_sanity_expects() {
    let n = node().await;
    let mut agent = n.paths.start_agent("1GiB");
    let _csi = n.paths.start_csi();
    let (mut id, mut node) = csi_clients(&n.paths.csi_socket).await;

    let info = id
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.tidepool.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "node-only: no controller service"
    );
    let probe = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let ncaps: Vec<i32> = node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(pb::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    use pb::node_service_capability::rpc::Type;
    for want in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::VolumeCondition,
    ] {
        assert!(ncaps.contains(&(want as i32)), "{want:?} advertised");
    }
    assert!(!ncaps.contains(&(Type::ExpandVolume as i32)));
    let ni = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "test-node");

    // Missing fields: InvalidArgument, naming the field.
    let mut r = n.stage_req();
    r.volume_id.clear();
    let e = node.node_stage_volume(r).await;
    assert!(message(e).contains("volume_id"));
    let mut r = n.stage_req();
    r.staging_target_path.clear();
    assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    let mut r = n.stage_req();
    r.volume_capability = None;
    let e = node.node_stage_volume(r).await;
    assert!(message(e).contains("volume_capability"));
    let mut r = n.stage_req();
    r.volume_context.remove("tidepool.dev/url");
    let e = node.node_stage_volume(r).await;
    assert!(message(e).contains("tidepool.dev/url"));
    let mut r = n.publish_req(1);
    r.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = n.publish_req(1);
    r.volume_capability = None;
    assert_eq!(
        code(node.node_publish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = n.unpublish_req(1);
    r.target_path.clear();
    assert_eq!(
        code(node.node_unpublish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = n.unstage_req();
    r.volume_id.clear();
    assert_eq!(
        code(node.node_unstage_volume(r).await),
        Code::InvalidArgument
    );
    // Block access is refused; an unknown volume is NotFound.
    let mut r = n.stage_req();
    r.volume_capability.as_mut().unwrap().access_type = Some(
        pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {}),
    );
    assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    let stats = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "nope".into(),
            volume_path: n.staging().display().to_string(),
            staging_target_path: String::new(),
        })
        .await;
    assert_eq!(code(stats), Code::NotFound);
    assert_eq!(
        code(node.node_publish_volume(n.publish_req(1)).await),
        Code::NotFound,
        "publish before stage"
    );
    assert!(
        n.mounts_left().is_empty(),
        "nothing mounted by refused calls"
    );
    // A probe with the agent gone says not ready.
    agent.kill9();
    let probe = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    assert_eq!(
        code(node.node_stage_volume(n.stage_req()).await),
        Code::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_dataset_published_twice_reads_byte_exact_from_one_cache() {
    let mut n = node().await;
    let _agent = n.paths.start_agent("1GiB");
    let _csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    // kubelet may race itself: eight stages of one volume at once each succeed or are
    // Aborted (never anything else), and leave exactly one mount.
    let calls = (0..8).map(|_| {
        let mut c = node.clone();
        let r = n.stage_req();
        tokio::spawn(async move { c.node_stage_volume(r).await.map(|_| ()) })
    });
    let mut ok = 0;
    for c in futures::future::join_all(calls).await {
        match c.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e}"),
        }
    }
    assert!(ok >= 1, "one of the concurrent stages did it");
    assert_eq!(
        n.mounts_left(),
        vec![n.staging()],
        "one mount for the volume"
    );
    for _ in 0..2 {
        node.node_stage_volume(n.stage_req()).await.unwrap();
    }
    for pod in [1, 2] {
        for _ in 0..2 {
            node.node_publish_volume(n.publish_req(pod)).await.unwrap();
        }
    }
    n.check_all(&n.target(1));
    // Everything is in the node's one cache now: with the lake gone, the second pod
    // reads all of it through its own target.
    let stats = volume_stats(&mut node, "vol1", &n.target(1)).await;
    assert_eq!(
        stats.volume_condition.as_ref().map(|c| c.abnormal),
        Some(false)
    );
    let total: usize = n.files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(stats.usage[0].total, total as i64);
    // Stop the lake: unreachable from here on.
    n.az = None;
    n.check_all(&n.target(2));
    // Read-only whatever the pod does.
    let err = std::fs::write(n.target(2).join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // Unstage while published: refused; then unpublish and unstage leave nothing.
    assert_eq!(
        code(node.node_unstage_volume(n.unstage_req()).await),
        Code::FailedPrecondition
    );
    for pod in [1, 2] {
        for _ in 0..2 {
            node.node_unpublish_volume(n.unpublish_req(pod))
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        node.node_unstage_volume(n.unstage_req()).await.unwrap();
    }
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
}

/// A staging mount taken away while a pod holds a file open in it (`umount -l`: the old
/// connection lives on for that file) is staged again on a new connection, and the
/// agent serves the new one. Before, the agent saw the volume still served and answered
/// OK without serving the new mount, whose every request then waited forever. The file
/// held open keeps reading from the old connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_staged_again_while_its_old_connection_lives_is_served_on_the_new_one() {
    let n = node().await;
    let mut agent = n.paths.start_agent("1GiB");
    let mut csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_stage_volume(n.stage_req()).await.unwrap();
    let (name, data) = n.files[0].clone();
    let held = std::fs::File::open(n.staging().join(&name)).unwrap();
    let st = std::process::Command::new("umount")
        .arg("-l")
        .arg(n.staging())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(&n.staging()).unwrap());
    node.node_stage_volume(n.stage_req()).await.unwrap();
    // Read on a thread of its own: a mount nobody serves would hold it forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let (staging, files) = (n.staging(), n.files.clone());
    std::thread::spawn(move || {
        let r: Result<(), String> =
            files
                .iter()
                .try_for_each(|(name, data)| match std::fs::read(staging.join(name)) {
                    Ok(got) if got == *data => Ok(()),
                    Ok(_) => Err(format!("{name}: other bytes")),
                    Err(e) => Err(format!("{name}: {e}")),
                });
        let _ = tx.send(r);
    });
    let r = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    if r.is_err() {
        // Unblocks the reader: with both gone, nothing holds the connections.
        agent.kill9();
        csi.kill9();
        panic!("the new staging mount did not answer within 60 s: nobody serves it");
    }
    r.unwrap()
        .expect("every file reads exact through the new staging mount");
    // The file held open reads on, from the old connection.
    let mut got = Vec::new();
    (&held).read_to_end(&mut got).unwrap();
    assert!(got == data, "the held file reads exact");
    drop(held);
    node.node_unstage_volume(n.unstage_req()).await.unwrap();
    assert_eq!(n.mounts_left(), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_metrics_count_what_its_volume_served() {
    let n = node().await;
    let addr = free_port();
    // A pool smaller than the dataset: the evictor has work.
    let _agent = n.paths.start_agent_with("32MiB", &["--admin-addr", &addr]);
    let _csi = n.paths.start_csi();
    assert_eq!(http_get(&addr, "/livez"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    assert_eq!(http_get(&addr, "/nope").0, 404);
    let (_, m) = http_get(&addr, "/metrics");
    assert_eq!(sample(&m, "tidepool_node_volumes{kind=\"dataset\"}"), 0.0);
    assert_eq!(
        sample(&m, "tidepool_node_pool_capacity_bytes"),
        (32u64 << 20) as f64
    );
    // The pool's disk's free space, as the cache last saw it (other tests write to the
    // same disk meanwhile: within 1 GiB of what statvfs says now).
    let free_now = {
        let c = std::ffi::CString::new(n.paths.pool.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: zeroed statvfs is a valid out-buffer; c is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        (s.f_bavail * s.f_frsize) as f64
    };
    let seen = sample(&m, "tidepool_node_pool_disk_free_bytes");
    assert!(
        seen > 0.0 && (seen - free_now).abs() < (1u64 << 30) as f64,
        "the pool's disk has {free_now} bytes free; the metric says {seen}"
    );

    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_stage_volume(n.stage_req()).await.unwrap();
    node.node_publish_volume(n.publish_req(1)).await.unwrap();
    n.check_all(&n.target(1));
    let total: usize = n.files.iter().map(|(_, d)| d.len()).sum();
    let (status, m) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&m, "tidepool_node_volumes{kind=\"dataset\"}"), 1.0);
    assert_eq!(
        sample(&m, "tidepool_node_volumes{kind=\"checkpoint\"}"),
        0.0
    );
    assert_eq!(
        sample(&m, "tidepool_node_dataset_objects{volume=\"vol1\"}"),
        13.0
    );
    assert_eq!(
        sample(&m, "tidepool_node_dataset_bytes{volume=\"vol1\"}"),
        total as f64
    );
    assert_eq!(
        sample(&m, "tidepool_node_volume_connected{volume=\"vol1\"}"),
        1.0
    );
    assert!(sample(&m, "tidepool_node_volume_opens_total{volume=\"vol1\"}") >= 13.0);
    // Every byte read came from the lake once (the first read of a file is not a
    // passthrough one), and now sits in the pool.
    assert!(
        sample(&m, "tidepool_node_lake_read_bytes_total") >= total as f64,
        "{m}"
    );
    // ... counted per dataset too; this agent has no peers, so none from them.
    let per_dataset: f64 = m
        .lines()
        .filter(|l| l.starts_with("tidepool_node_dataset_lake_read_bytes_total{dataset=\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(per_dataset >= total as f64, "{m}");
    assert_eq!(sample(&m, "tidepool_node_peer_read_bytes_total"), 0.0);
    assert!(sample(&m, "tidepool_node_volume_read_bytes_total{volume=\"vol1\"}") > 0.0);
    // The 48 MiB file does not fit in the 32 MiB pool: closed files were evicted for it.
    // Each read (none failed here) is timed once, as a hit (resident) or a miss
    // (waited), and seen by FUSE as one READ (counted just after its answer: the last
    // ones may lag).
    let vol = |name: &str| format!("tidepool_node_{name}{{volume=\"vol1\"}}");
    let timed = |served: &str| {
        format!("tidepool_node_read_duration_seconds_count{{volume=\"vol1\",served=\"{served}\"}}")
    };
    let settled = tidepool_csi::testing::within(Duration::from_secs(10), || {
        let (_, m) = http_get(&addr, "/metrics");
        let evicted = sample(&m, "tidepool_node_pool_evicted_bytes_total") > 0.0;
        let reads = sample(&m, &vol("volume_reads_total"));
        let counted = sample(&m, &timed("waited")) + sample(&m, &timed("resident")) == reads
            && sample(
                &m,
                "tidepool_node_fuse_request_duration_seconds_count{volume=\"vol1\",op=\"READ\"}",
            ) == reads;
        (evicted && counted).then_some(m)
    });
    let m = settled.unwrap_or_else(|| {
        panic!(
            "evictions and read times never showed: {}",
            http_get(&addr, "/metrics").1
        )
    });
    assert!(
        sample(&m, &timed("waited")) > 0.0,
        "cold reads wait for their blocks: {m}"
    );
    // FUSE requests by operation: the lookups of every path, and time spent on them,
    // in buckets that add up to the count (cumulative, ending at +Inf).
    let op = |op: &str, part: &str| {
        format!("tidepool_node_fuse_request_duration_seconds_{part}{{volume=\"vol1\",op=\"{op}\"}}")
    };
    let bucket = |op: &str, le: &str| {
        format!(
            "tidepool_node_fuse_request_duration_seconds_bucket{{le=\"{le}\",volume=\"vol1\",op=\"{op}\"}}"
        )
    };
    assert!(sample(&m, &op("LOOKUP", "count")) >= 3.0, "{m}");
    assert!(sample(&m, &op("READ", "sum")) > 0.0, "{m}");
    for name in ["LOOKUP", "READ", "OPEN"] {
        let count = sample(&m, &op(name, "count"));
        let inf = sample(&m, &bucket(name, "+Inf"));
        let fast = sample(&m, &bucket(name, "0.00005"));
        assert!(count > 0.0 && inf == count && fast <= inf, "{name}: {m}");
    }
    assert!(
        sample(&m, "tidepool_node_pool_cache_bytes") < total as f64,
        "what was evicted is no longer counted as resident: {m}"
    );
    assert_eq!(
        sample(
            &m,
            "tidepool_node_volume_read_errors_total{volume=\"vol1\"}"
        ),
        0.0
    );
    assert!(m.trim_end().ends_with("# EOF"), "OpenMetrics text: {m}");
    // Every series the chart's Grafana dashboard queries is one the agent serves.
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/tidepool/dashboards/tidepool-nodes.json"),
    )
    .unwrap();
    let mut queried: Vec<&str> = dashboard
        .match_indices("tidepool_node_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        let served = m.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
                || l.strip_prefix("# TYPE ")
                    .and_then(|r| r.strip_prefix(name))
                    .is_some_and(|r| r.starts_with(' '))
        });
        assert!(
            served,
            "the dashboard queries {name}, which the agent does not serve:\n{m}"
        );
    }

    node.node_unpublish_volume(n.unpublish_req(1))
        .await
        .unwrap();
    node.node_unstage_volume(n.unstage_req()).await.unwrap();
    let (_, m) = http_get(&addr, "/metrics");
    assert_eq!(sample(&m, "tidepool_node_volumes{kind=\"dataset\"}"), 0.0);
    assert!(
        !m.contains("volume=\"vol1\""),
        "an unstaged volume is gone: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_survive_kill_9_of_the_agent_of_the_plugin_and_of_both() {
    let n = node().await;
    let mut agent = n.paths.start_agent("1GiB");
    let mut csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_stage_volume(n.stage_req()).await.unwrap();
    node.node_publish_volume(n.publish_req(1)).await.unwrap();
    let big = n.target(1).join("big.bin");
    let want_big = n.files.last().unwrap().1.clone();

    // 1. The agent dies while a pod reads a cold file; its open file and new opens
    //    work again once an agent is back, and the read in flight completes.
    let mut f = std::fs::File::open(&big).unwrap();
    let mut head = vec![0u8; 8 << 20];
    f.read_exact(&mut head).unwrap();
    agent.kill9();
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).map(|_| rest)
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut agent = n.paths.start_agent("1GiB");
    let rest = reader.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the read in flight should wait for the new agent, got {e}; agent log:\n{}",
            agent.log()
        )
    });
    eprintln!(
        "reads served again {:?} after the agent restarted",
        started.elapsed()
    );
    head.extend_from_slice(&rest);
    assert!(
        head == want_big,
        "the open file read every byte exact across the restart"
    );
    n.check_all(&n.target(1));

    // 2. The plugin dies: mounts are unaffected; restarted, it still unpublishes.
    csi.kill9();
    n.check_all(&n.target(1));
    let csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_publish_volume(n.publish_req(2)).await.unwrap();
    n.check_all(&n.target(2));
    node.node_unpublish_volume(n.unpublish_req(2))
        .await
        .unwrap();
    assert!(!is_mounted(&n.target(2)).unwrap_or(false));

    // 3. Both die: the connection dies with them, and so do the stage secrets (kept in
    //    memory only). Reads fail at once (never hang, never wrong bytes). The
    //    restarted plugin mounts the volume again and binds the pod's target again;
    //    everything was cached and verified, so every byte reads exact without
    //    credentials. kubelet staging it again changes nothing.
    let mut csi = csi;
    agent.kill9();
    csi.kill9();
    let err = std::fs::read(n.target(1).join("big.bin"))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let agent = n.paths.start_agent("1GiB");
    let csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    let logs = || format!("plugin:\n{}\nagent:\n{}", csi.log(), agent.log());
    // The plugin answers first, then repairs (a node with many volumes is not kept
    // from kubelet meanwhile).
    assert!(
        within(Duration::from_secs(30), || csi
            .log()
            .contains("mounted it again")
            .then_some(()))
        .is_some(),
        "the plugin repaired the volume at its start\n{}",
        logs()
    );
    n.check_all(&n.target(1));
    let stats = volume_stats(&mut node, "vol1", &n.target(1)).await;
    assert_eq!(
        stats.volume_condition.as_ref().map(|c| c.abnormal),
        Some(false),
        "{:?}\n{}",
        stats.volume_condition,
        logs()
    );
    node.node_stage_volume(n.stage_req()).await.unwrap();
    n.check_all(&n.target(1));
    node.node_unpublish_volume(n.unpublish_req(1))
        .await
        .unwrap();
    node.node_unstage_volume(n.unstage_req()).await.unwrap();
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
}

/// The node pod replaced (`helm upgrade`, a deleted pod): the plugin and the agent die
/// together while a pod reads. With the keeper (its own pod) holding a copy of the
/// connection, the volume is never lost: the pod's open file and its mount (the very
/// same one, not mounted again) read on, byte-exact, once the new processes are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_keeper_volumes_outlive_the_plugin_and_agent_dying_together() {
    let n = node().await;
    let keeper = n.paths.start_keeper();
    let mut agent = n.paths.start_agent("1GiB");
    let mut csi = n.paths.start_csi_kept();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_stage_volume(n.stage_req()).await.unwrap();
    node.node_publish_volume(n.publish_req(1)).await.unwrap();
    assert!(
        within(Duration::from_secs(10), || csi
            .log()
            .contains("the keeper holds the volume's connection")
            .then_some(()))
        .is_some(),
        "the plugin gave the keeper the connection within its 1 s tick:\n{}",
        csi.log()
    );
    let big = n.target(1).join("big.bin");
    let want_big = n.files.last().unwrap().1.clone();
    let mut f = std::fs::File::open(&big).unwrap();
    let mut head = vec![0u8; 8 << 20];
    f.read_exact(&mut head).unwrap();

    agent.kill9();
    csi.kill9();
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).map(|_| (rest, f))
    });
    std::thread::sleep(Duration::from_millis(500));
    let agent = n.paths.start_agent("1GiB");
    let csi = n.paths.start_csi_kept();
    let logs = || three_logs(&csi, &agent, &keeper);
    let (rest, f) = reader.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the read in flight waits for the new processes, got {e}\n{}",
            logs()
        )
    });
    head.extend_from_slice(&rest);
    assert!(head == want_big, "the open file read every byte exact");
    drop(f);
    let log = csi.log();
    assert!(
        log.contains("took the volumes' connections back from the keeper"),
        "{}",
        logs()
    );
    assert!(
        !log.contains("mounted it again"),
        "the connection lived on; nothing was mounted anew\n{}",
        logs()
    );
    n.check_all(&n.target(1));

    // Unstaged and at once staged again (a new connection under the same volume id,
    // within the plugin's 1 s tick): the keeper holds the new connection, not the
    // ended one, and it too outlives both processes.
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_unpublish_volume(n.unpublish_req(1))
        .await
        .unwrap();
    node.node_unstage_volume(n.unstage_req()).await.unwrap();
    node.node_stage_volume(n.stage_req()).await.unwrap();
    node.node_publish_volume(n.publish_req(1)).await.unwrap();
    let held = |csi: &NodeProcess| {
        csi.log()
            .matches("the keeper holds the volume's connection")
            .count()
    };
    assert!(
        // The plugins' log is one file: the first plugin's hand-over is the first line.
        within(Duration::from_secs(10), || (held(&csi) >= 2).then_some(())).is_some(),
        "the new connection was handed to the keeper\n{}",
        logs()
    );
    let (mut agent, mut csi) = (agent, csi);
    agent.kill9();
    csi.kill9();
    let agent = n.paths.start_agent("1GiB");
    let csi = n.paths.start_csi_kept();
    let logs = || three_logs(&csi, &agent, &keeper);
    n.check_all(&n.target(1));
    assert!(
        !csi.log().contains("mounted it again"),
        "the restaged connection lived on too\n{}",
        logs()
    );

    // Unstaged: the keeper lets the connection go.
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_unpublish_volume(n.unpublish_req(1))
        .await
        .unwrap();
    node.node_unstage_volume(n.unstage_req()).await.unwrap();
    assert!(
        within(Duration::from_secs(10), || keeper
            .log()
            .contains("released the volume's FUSE connection")
            .then_some(()))
        .is_some(),
        "{}",
        logs()
    );
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
}

/// More volumes on one node than one descriptor message carries (`fdpass::MAX_FDS`,
/// 64): with the keeper on, kill -9 of the plugin and the agent together, and the new
/// plugin answers `Probe` at once, takes every connection back from the keeper, page by
/// page, and every volume reads byte-exact with nothing mounted anew. (Before paging,
/// the keeper handed back 64 and dropped the rest, and the plugin's liveness check of
/// the others blocked on connections nobody served, before its socket was even bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_volumes_outlive_the_plugin_and_agent_dying_together() {
    const VOLUMES: usize = 100;
    let n = node().await;
    let keeper = n.paths.start_keeper();
    let mut agent = n.paths.start_agent_with("1GiB", &["--threads", "1"]);
    let mut csi = n.paths.start_csi_kept();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    let staging = |v: usize| n.paths.work.join(format!("kubelet/staging/vol{v:02}"));
    let target = |v: usize| {
        n.paths
            .work
            .join(format!("kubelet/pods/p{v:02}/volumes/mount"))
    };
    for v in 0..VOLUMES {
        let mut stage = n.stage_req();
        stage.volume_id = format!("vol{v:02}");
        stage.staging_target_path = staging(v).display().to_string();
        stage
            .volume_context
            .insert("tidepool.dev/uid".into(), format!("u{v:02}"));
        let context = stage.volume_context.clone();
        node.node_stage_volume(stage).await.unwrap();
        let mut publish = n.publish_req(1);
        publish.volume_id = format!("vol{v:02}");
        publish.staging_target_path = staging(v).display().to_string();
        publish.target_path = target(v).display().to_string();
        publish.volume_context = context;
        node.node_publish_volume(publish).await.unwrap();
    }
    let held = |csi: &NodeProcess| {
        csi.log()
            .matches("the keeper holds the volume's connection")
            .count()
    };
    assert!(
        within(Duration::from_secs(30), || (held(&csi) >= VOLUMES)
            .then_some(()))
        .is_some(),
        "the keeper was given every connection:\n{}",
        csi.log()
    );
    let (name, data) = &n.files[0];
    for v in 0..VOLUMES {
        assert!(std::fs::read(target(v).join(name)).unwrap() == *data);
    }

    agent.kill9();
    csi.kill9();
    let agent = n.paths.start_agent_with("1GiB", &["--threads", "1"]);
    let csi = n.paths.start_csi_kept();
    let logs = || three_logs(&csi, &agent, &keeper);
    let (mut identity, _) = csi_clients(&n.paths.csi_socket).await;
    let probe = tokio::time::timeout(Duration::from_secs(30), identity.probe(pb::ProbeRequest {}))
        .await
        .unwrap_or_else(|_| panic!("Probe did not answer within 30 s\n{}", logs()))
        .unwrap();
    assert_eq!(probe.into_inner().ready, Some(true));
    assert!(
        within(Duration::from_secs(30), || csi
            .log()
            .lines()
            .any(|l| {
                l.contains("took the volumes' connections back from the keeper")
                    && l.contains(&format!("volumes={VOLUMES}"))
            })
            .then_some(()))
        .is_some(),
        "every connection taken back from the keeper\n{}",
        logs()
    );
    for v in 0..VOLUMES {
        let got = std::fs::read(target(v).join(name))
            .unwrap_or_else(|e| panic!("volume {v}: {e}\n{}", logs()));
        assert!(got == *data, "volume {v} reads exact");
    }
    n.check_all(&target(VOLUMES - 1));
    assert!(
        !csi.log().contains("mounted it again"),
        "every connection lived on; nothing was mounted anew\n{}",
        logs()
    );

    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    for v in 0..VOLUMES {
        node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: format!("vol{v:02}"),
            target_path: target(v).display().to_string(),
        })
        .await
        .unwrap();
        node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: format!("vol{v:02}"),
            staging_target_path: staging(v).display().to_string(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
}

/// The plugin's check of a mount whose descriptor it lacks never blocks: a connection
/// that a process holds but does not serve (the keeper's while no agent runs) counts as
/// alive after `ANSWER_WITHIN`, asked again at once while the first check still waits,
/// and, once its last descriptor is closed, as dead.
#[test]
fn checking_a_held_but_unserved_connection_never_blocks() {
    use tidepool_csi::csi::mounter::{LinuxMounter, Mounter};
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("held");
    std::fs::create_dir(&target).unwrap();
    let opts = tidepool_csi::fuse::MountOptions {
        fsname: "held".into(),
        subtype: "tidepool".into(),
        read_only: true,
        allow_other: false,
        default_permissions: true,
    };
    // Mounted, and never served: not even the INIT handshake is answered.
    let fd = LinuxMounter.mount_fuse(&target, &opts).unwrap();
    let ask = |t: PathBuf| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(LinuxMounter.answers(&t)));
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the check returned (a statfs on the caller's thread would block forever)")
    };
    assert!(ask(target.clone()), "held: alive, never mounted anew");
    assert!(ask(target.clone()), "still held");
    drop(fd);
    assert!(
        within(Duration::from_secs(30), || (!ask(target.clone()))
            .then_some(()))
        .is_some(),
        "with its last descriptor closed the connection is dead"
    );
    LinuxMounter.unmount(&target).unwrap();
    assert!(!is_mounted(&target).unwrap());
}

/// The keeper's and the agent's sockets answer root only: with their file modes opened
/// up on purpose, a process of uid 1000 that connects is refused unanswered (and the
/// refusal logged with its uid), while root is served.
#[test]
fn the_node_sockets_refuse_a_peer_that_is_not_root() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    let paths = NodePaths::new(Path::new(env!("CARGO_BIN_EXE_tidepool")), work.path());
    let keeper = paths.start_keeper();
    let agent = paths.start_agent("64MiB");
    let open_up = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for dir in [work.path(), paths.keeper_socket.parent().unwrap()] {
        open_up(dir, 0o755);
    }
    open_up(&paths.keeper_socket, 0o666);
    open_up(&paths.agent_socket, 0o666);
    // `tidepool keeper --check` is the client: it asks what is held. A copy in the
    // work directory, which uid 1000 can reach wherever the build is.
    let client = work.path().join("tidepool-client");
    std::fs::copy(env!("CARGO_BIN_EXE_tidepool"), &client).unwrap();
    open_up(&client, 0o755);
    let check = |socket: &Path, uid: u32| {
        std::process::Command::new(&client)
            .args(["keeper", "--check", "--socket"])
            .arg(socket)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let out = check(&paths.keeper_socket, 1000);
    assert!(!out.status.success(), "uid 1000 was served by the keeper");
    let out = check(&paths.keeper_socket, 0);
    assert!(
        out.status.success(),
        "root is served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = check(&paths.agent_socket, 1000);
    let refused = |log: String| {
        log.lines()
            .filter(|l| l.contains("refused a connection") && l.contains("uid=1000"))
            .count()
    };
    assert!(
        within(Duration::from_secs(10), || (refused(keeper.log()) == 1
            && refused(agent.log()) == 1)
            .then_some(()))
        .is_some(),
        "each refusal logged once, with the peer's uid\nkeeper:\n{}\nagent:\n{}",
        keeper.log(),
        agent.log()
    );
}

/// csi-sanity cases that need a Controller service (CreateVolume and the like).
const SANITY_SKIP: &str = "Controller Server|should work|should be idempotent|should remove target path|volume does not exist on the specified path|NodeExpandVolume|NodeStageVolume should fail when no volume capability";

/// The upstream suite (kubernetes-csi/csi-test's `csi-sanity`) against the real
/// binaries, where it is installed (on `$PATH` or `$CSI_SANITY`). Tidepool is
/// node-only with static volumes, so the cases that need `CreateVolume` skip
/// themselves; identity, capabilities, node info and the argument checks run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_csi_sanity_passes_where_installed() {
    let bin = std::env::var_os("CSI_SANITY")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("csi-sanity"))
                .find(|p| p.is_file())
        });
    let Some(bin) = bin else {
        tidepool_api::skip::skip(
            tidepool_api::skip::Need::Sanity,
            "upstream_csi_sanity_passes_where_installed",
            &"csi-sanity is not installed (build it from github.com/kubernetes-csi/csi-test, \
              cmd/csi-sanity, and put it on PATH or in $CSI_SANITY); the Rust conformance \
              tests in this file still ran",
        );
        return;
    };
    let n = node().await;
    let _agent = n.paths.start_agent("1GiB");
    let csi = n.paths.start_csi();
    let endpoint = format!("unix://{}", n.paths.csi_socket.display());
    let (staging, mount) = (
        n.paths.work.join("sanity-staging"),
        n.paths.work.join("sanity-mount"),
    );
    let run = bin.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&run)
            .arg(format!("--csi.endpoint={endpoint}"))
            .arg(format!("--csi.stagingdir={}", staging.display()))
            .arg(format!("--csi.mountdir={}", mount.display()))
            .arg("--ginkgo.no-color")
            // Node-only with static volumes: the Controller cases, and the Node cases
            // that make their volume with CreateVolume, do not apply (the Rust tests
            // above stage and publish real volumes instead).
            .arg(format!("--ginkgo.skip={SANITY_SKIP}"))
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let report = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("Passed") || l.contains("[FAIL]") || l.contains("Ran "))
        .collect();
    eprintln!("csi-sanity: {}", summary.join("\n"));
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{report}\n{}\nplugin log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        csi.log()
    );
    // Identity, capabilities, node info, argument checks, stats: all of them ran.
    let passed: usize = report
        .lines()
        .find_map(|l| {
            let i = l.find(" Passed")?;
            l[..i]
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        passed >= 15,
        "only {passed} csi-sanity cases passed:\n{report}"
    );
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
}

/// The client: one GetPluginInfo per channel setting, the answer as JSON.
const GRPCIO_CLIENT: &str = r#"
import json, sys
import grpc
out = {}
for name, options in [("default", []), ("localhost", [("grpc.default_authority", "localhost")])]:
    with grpc.insecure_channel("unix://" + sys.argv[1], options=options) as ch:
        call = ch.unary_unary("/csi.v1.Identity/GetPluginInfo")
        try:
            answer = call(b"", timeout=20)
            out[name] = {"ok": True, "names_the_driver": b"csi.tidepool.dev" in answer}
        except grpc.RpcError as e:
            out[name] = {"ok": False, "code": e.code().name, "details": e.details() or ""}
print(json.dumps(out))
"#;

/// Interop with Python's grpcio (CSI tooling written in Python): over a Unix socket
/// grpcio (gRPC core since 1.57) sends the socket's path, percent-encoded, as
/// `:authority`, which the HTTP/2 server under tonic (h2, through the `http` crate's
/// authority parser, which refuses `%` in a host) resets with PROTOCOL_ERROR before any
/// Tidepool code sees the request. With `grpc.default_authority=localhost` (what Go
/// clients, kubelet and csi-sanity included, send) it is served. The README says so; this
/// fails when either changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_clients_are_served_with_a_host_authority_and_refused_with_a_path() {
    const TEST: &str = "grpcio_clients_are_served_with_a_host_authority_and_refused_with_a_path";
    let python = std::env::var_os("TIDEPOOL_GRPCIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/grpcio-venv/bin/python")
        });
    if !python.exists() {
        tidepool_api::skip::skip(
            tidepool_api::skip::Need::Grpcio,
            TEST,
            &format!("{} is missing: run `make deps`", python.display()),
        );
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let paths = NodePaths::new(Path::new(env!("CARGO_BIN_EXE_tidepool")), work.path());
    let _csi = paths.start_csi();
    let out = tokio::task::spawn_blocking({
        let socket = paths.csi_socket.clone();
        move || {
            std::process::Command::new(&python)
                .args(["-c", GRPCIO_CLIENT])
                .arg(&socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["localhost"],
        serde_json::json!({"ok": true, "names_the_driver": true}),
        "{answer}"
    );
    assert_eq!(answer["default"]["ok"], false, "{answer}");
    assert_eq!(answer["default"]["code"], "INTERNAL", "{answer}");
    assert!(
        answer["default"]["details"]
            .as_str()
            .unwrap()
            .contains("RST_STREAM"),
        "{answer}"
    );
}
