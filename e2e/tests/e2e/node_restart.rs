//! The node pod (CSI plugin, agent, sync sidecar) deleted while a Job reads through it.

use kube::{ResourceExt, api::DeleteParams};
use tidepool_api::{Phase, dataset_cache::PrefetchPolicy};
use tidepool_e2e::{Check, Mount, Scenario, SeedFile, Sums, Workload, wait, workload::env};

const MIB: u64 = 1 << 20;

/// An OnDemand dataset (every read goes through the agent, cold) on the gpu node; a Job
/// reads it slowly (1 MiB, then a pause); once it is reading, the node DaemonSet's pod on
/// that node is deleted, so both the plugin and the agent stop. The Job must still
/// complete with every checksum right.
///
/// What the Job may do meanwhile: with both processes gone the volume's FUSE connection
/// dies (README, "What survives what"); reads then fail at once (never a wrong byte), the
/// container exits, kubelet restarts it (`restartPolicy: OnFailure`), and the new plugin
/// mounts the volume again and binds the pod's target again, so the restarted container
/// reads it all again. The number of restarts is printed, not asserted: a future node
/// side that keeps the connection across the pod's replacement would show 0.
#[tokio::test]
async fn deleting_the_node_pod_mid_read_does_not_fail_the_reading_job() {
    let s = Scenario::start("noderestart").await;
    let files: Vec<SeedFile> = (0..4)
        .map(|i| SeedFile::new(format!("part-{i}.bin"), 16 * MIB + i))
        .collect();
    let seeded = s.seed("datasets", "slow", &files).await;
    s.create_dataset("slow", &seeded.url, PrefetchPolicy::OnDemand, true)
        .await;
    let ready = s
        .wait_dataset("slow", "Ready", |st| st.phase == Phase::Ready)
        .await;
    let claim = ready
        .status
        .and_then(|st| st.claim_name)
        .expect("status names the PVC");

    // 64 MiB at 1 MiB per 0.25 s: at least 16 s of reading per attempt.
    let reader = Workload::script("read", &s.env.node_image, "read-all.sh", &["/data"])
        .on(&s.env.gpu_node)
        .run_as(65532)
        .env(env("PAUSE", "0.25"))
        .mount(Mount::Claim {
            claim,
            path: "/data".into(),
            read_only: true,
        });
    s.start_job(&reader, "OnFailure", 6).await;
    s.wait(
        "the reader reading through the mount",
        wait::SETTLE,
        || async {
            let out = s.output("read").await;
            match out.lines().filter(|l| l.starts_with("PROGRESS ")).count() {
                0 => Check::Waiting(s.describe_pods(Some("read")).await),
                n if n >= 3 => Check::Done(()),
                n => Check::Waiting(format!("{n} MiB read")),
            }
        },
    )
    .await;
    if s.output("read")
        .await
        .lines()
        .any(|l| l.starts_with("END "))
    {
        s.fail("the reader finished before the node pod could be deleted; make it slower")
            .await;
    }

    let old = s
        .env
        .node_pod(&s.env.gpu_node)
        .await
        .unwrap_or_else(|| panic!("no node pod on {}", s.env.gpu_node));
    let old_uid = old.uid().unwrap_or_default();
    eprintln!("deleting node pod {} mid-read", old.name_any());
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
        s.env.client.clone(),
        &s.env.release_namespace,
    )
    .delete(&old.name_any(), &DeleteParams::default())
    .await
    .unwrap_or_else(|e| panic!("deleting node pod {}: {e}", old.name_any()));

    s.wait("a new node pod on the gpu node", wait::SETTLE, || async {
        match s.env.node_pod(&s.env.gpu_node).await {
            Some(p) if p.uid().unwrap_or_default() != old_uid => Check::Done(()),
            _ => Check::Waiting("the old pod, or none".into()),
        }
    })
    .await;
    s.env.wait_ready().await;

    let out = s.wait_job("read").await;
    seeded.sums.assert_same(
        &Sums::last_block(&out, "the reading Job"),
        "every file read through the PVC across the node pod's replacement",
    );
    let restarts = s
        .workload_pod("read")
        .await
        .and_then(|p| p.status)
        .and_then(|st| st.container_statuses)
        .and_then(|c| c.first().map(|c| c.restart_count))
        .unwrap_or_default();
    eprintln!("the reading Job completed; its container was restarted {restarts} time(s)");
}
