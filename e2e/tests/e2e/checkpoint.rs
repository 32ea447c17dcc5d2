//! Checkpoints written on one node, made durable in the lake, and resumed on another.

use tidepool_e2e::{Mount, Scenario, Sums, Workload};

/// CheckpointSync → a Job on the gpu node writes steps 1, 2, 3 (PyTorch DCP's layout,
/// `.metadata` last) → the status shows step 3 durable → a second Job, on the other
/// node, mounts the CheckpointSync's PVC there (a volume staged on that node, served by
/// that node's agent), finds step 3 as the latest, reads it byte-exact (from the lake:
/// nothing of it was ever on that node) and writes step 4, which that node's agent
/// reports durable.
#[tokio::test]
async fn checkpoint_steps_become_durable_and_a_job_resumes_on_the_other_node() {
    let s = Scenario::start("ckpt").await;
    // The destination container must exist; seeding nothing creates it.
    let url = s.seed("checkpoints", "ckpt", &[]).await.url;
    let created = s.create_checkpoint_sync("ckpt", &url).await;
    let uid = created
        .metadata
        .uid
        .clone()
        .expect("a created object has a uid");
    let with_claim = s
        .wait_checkpoint_sync("ckpt", "its PVC named", |st| st.claim_name.is_some())
        .await;
    let claim = with_claim
        .status
        .and_then(|st| st.claim_name)
        .expect("waited for it");
    let volume = |name: &str, node: &str, script: &str, args: &[&str]| {
        Workload::script(name, &s.env.node_image, script, args)
            .on(node)
            .mount(Mount::Claim {
                claim: claim.clone(),
                path: "/ckpt".into(),
                read_only: false,
            })
    };

    let writer = volume(
        "train",
        &s.env.gpu_node,
        "write-steps.sh",
        &["/ckpt", "1", "2", "3"],
    );
    let out = s.run_job(&writer, "Never", 0).await;
    let written = Sums::last_block(&out, "the writing Job");
    assert_eq!(
        written.0.len(),
        9,
        "three steps of three files: {written:?}"
    );

    let durable = s
        .wait_checkpoint_sync("ckpt", "step 3 durable", |st| {
            st.latest_durable_step == Some(3)
        })
        .await;
    let status = durable.status.unwrap_or_default();
    assert_eq!(status.latest_committed_step, Some(3), "{status:?}");

    let resumer = volume("resume", &s.env.other_node, "resume.sh", &["/ckpt"]);
    let out = s.run_job(&resumer, "Never", 0).await;
    assert!(
        out.lines().any(|l| l.trim_end() == "LATEST step-3"),
        "the resuming Job finds step-3 as the latest step; its output:\n{out}"
    );
    let blocks = Sums::blocks(&out);
    assert_eq!(
        blocks.len(),
        2,
        "the resuming Job prints the step it loaded and the step it wrote; its output:\n{out}"
    );
    written.under("step-3/").assert_same(
        &blocks[0],
        "step-3 as read on the other node (from the lake) through its own PVC",
    );
    assert_eq!(blocks[1].0.len(), 3, "step-4 written: {:?}", blocks[1]);

    // The aggregated latestDurableStep is the minimum over the nodes holding checkpoint
    // data (the gpu node's latest is 3), so step 4 shows in the other node's report.
    let other = s.env.other_node.clone();
    s.wait(
        &format!("step 4 durable on {other}"),
        tidepool_e2e::wait::SETTLE,
        || async {
            match s.node_checkpoint_status(&other, &uid).await {
                Some(st) if st.latest_durable_step == Some(4) => tidepool_e2e::Check::Done(()),
                Some(st) if st.failed => tidepool_e2e::Check::Failed(format!("{st:?}")),
                seen => tidepool_e2e::Check::Waiting(format!("{seen:?}")),
            }
        },
    )
    .await;
    s.wait_checkpoint_sync("ckpt", "step 4 committed", |st| {
        st.latest_committed_step == Some(4)
    })
    .await;
}
