//! A dataset prefetched onto the gpu node and read there through its PVC.

use tidepool_api::{Phase, cache_pool::NodeDatasetPhase, dataset_cache::PrefetchPolicy};
use tidepool_e2e::{Mount, Scenario, SeedFile, Sums, Workload};

const MIB: u64 = 1 << 20;

/// Sizes around the cache's 4 MiB blocks and 8 MiB ranged reads and the 1 MiB small-file
/// threshold, an empty file, and a tree of small files two levels deep.
fn files() -> Vec<SeedFile> {
    let mut files = vec![
        SeedFile::new("empty.bin", 0),
        SeedFile::new("one-byte.bin", 1),
        SeedFile::new("page.bin", 4096),
        SeedFile::new("page-plus-one.bin", 4097),
        SeedFile::new("small-file-threshold.bin", MIB),
        SeedFile::new("block-plus-three.bin", 4 * MIB + 3),
        SeedFile::new("two-ranges-plus-one.bin", 16 * MIB + 1),
        SeedFile::new("shards/train-00000.parquet", 9 * MIB + 12_345),
        SeedFile::new("shards/train-00001.parquet", 7 * MIB + 54_321),
    ];
    for dir in 0..3 {
        for i in 0..10u64 {
            let size = 1 + (i * 7_919 + dir * 104_729) % (96 * 1024);
            files.push(SeedFile::new(format!("small/d{dir}/f{i:02}.json"), size));
        }
    }
    files
}

/// DatasetCache, Eager, on the gpu node only → Ready with every byte cached there (and
/// nowhere else), which the node agent's /metrics (through the API server's pod proxy)
/// confirms → a Job on that node reads every file through the PVC, as a non-root user,
/// and every checksum and every name matches the lake's.
#[tokio::test]
async fn eager_dataset_is_cached_on_the_gpu_node_and_read_byte_exact() {
    let s = Scenario::start("eager").await;
    let files = files();
    let seeded = s.seed("datasets", "eager", &files).await;

    let created = s
        .create_dataset("train", &seeded.url, PrefetchPolicy::Eager, true)
        .await;
    let uid = created
        .metadata
        .uid
        .clone()
        .expect("a created object has a uid");
    let ready = s
        .wait_dataset("train", "Ready with every byte cached", |st| {
            st.phase == Phase::Ready && st.bytes_cached == seeded.bytes
        })
        .await;
    let status = ready.status.clone().unwrap_or_default();
    assert_eq!(
        (status.nodes_desired, status.nodes_ready),
        (1, 1),
        "the dataset selects the gpu node only"
    );
    let snapshot = status
        .snapshot
        .clone()
        .expect("a Ready dataset has a snapshot");
    assert_eq!(
        (snapshot.objects, snapshot.bytes),
        (files.len() as i64, seeded.bytes),
        "the snapshot lists every seeded object"
    );
    assert_eq!(
        s.pools_assigning_dataset(&uid).await,
        vec![s.env.gpu_node.clone()],
        "only the gpu node's pool is assigned the dataset"
    );
    let on_gpu = s
        .node_dataset_status(&s.env.gpu_node, &uid)
        .await
        .expect("the gpu node's agent reports the dataset");
    assert_eq!(on_gpu.phase, NodeDatasetPhase::Ready, "{on_gpu:?}");
    assert_eq!(
        (on_gpu.bytes_cached, on_gpu.bytes_total),
        (seeded.bytes, seeded.bytes),
        "the gpu node holds every byte"
    );

    // The gpu node's agent says so in its metrics too (the chart serves them on 9090).
    let metrics = s.env.node_metrics(&s.env.gpu_node).await;
    let fetched: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidepool_node_lake_read_bytes_total ")?.parse().ok())
        .unwrap_or_else(|| panic!("no tidepool_node_lake_read_bytes_total in:\n{metrics}"));
    assert!(
        fetched >= seeded.bytes as f64,
        "the agent fetched {fetched} bytes from the lake, fewer than the {} it caches",
        seeded.bytes
    );

    let claim = status.claim_name.clone().expect("status names the PVC");
    let reader = Workload::script("read", &s.env.node_image, "read-all.sh", &["/data"])
        .on(&s.env.gpu_node)
        .run_as(65532)
        .mount(Mount::Claim {
            claim,
            path: "/data".into(),
            read_only: true,
        });
    let out = s.run_job(&reader, "Never", 0).await;
    seeded.sums.assert_same(
        &Sums::last_block(&out, "the reading Job"),
        "every file read through the PVC on the gpu node",
    );
}
