//! `helm upgrade` with a changed value while a pod has a Tidepool volume mounted.

use kube::ResourceExt;
use tidepool_api::{Phase, dataset_cache::PrefetchPolicy};
use tidepool_e2e::{
    Check, Mount, Scenario, SeedFile, Workload, env::daemonset_rolled_out, scenario::command, wait,
    workload::env,
};

const KIB: u64 = 1 << 10;

fn helm() -> String {
    std::env::var("HELM")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "helm".to_owned())
}

/// The chart the release was installed from (this repository's).
fn chart() -> String {
    std::env::var("TIDEPOOL_E2E_CHART")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/tidepool").to_owned())
}

fn count(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// A pod on the gpu node checks a mounted dataset every 2 s, in one process for its whole
/// life (`verify-loop.sh`: listing, every file opened and read, checksums). Then
/// `helm upgrade --reuse-values --set logLevel=<the other level>`: a value a platform team
/// changes, and one that changes the node DaemonSet's pod template, so the node pods (CSI
/// plugin, agent, sync) are replaced one node at a time. Once the rollout is done and the
/// gpu node's pod is a new one, the same container must keep passing: never a failed
/// pass, never a restart.
#[tokio::test]
async fn helm_upgrade_with_a_changed_value_keeps_mounted_volumes_working() {
    let s = Scenario::start("upgrade").await;
    let files: Vec<SeedFile> = (0..12u64)
        .map(|i| SeedFile::new(format!("f/{i:02}.bin"), 1 + i * 300 * KIB))
        .collect();
    let seeded = s.seed("datasets", "upgrade", &files).await;
    s.create_dataset("live", &seeded.url, PrefetchPolicy::OnDemand, true)
        .await;
    let ready = s
        .wait_dataset("live", "Ready", |st| st.phase == Phase::Ready)
        .await;
    let claim = ready
        .status
        .and_then(|st| st.claim_name)
        .expect("status names the PVC");

    let expected = k8s_openapi::api::core::v1::ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("expected".into()),
            ..Default::default()
        },
        data: Some([("SHA256SUMS".to_owned(), seeded.sums.to_sha256sum())].into()),
        ..Default::default()
    };
    s.api::<k8s_openapi::api::core::v1::ConfigMap>()
        .create(&Default::default(), &expected)
        .await
        .expect("creating the expected checksums");
    let checker = Workload::script(
        "checker",
        &s.env.node_image,
        "verify-loop.sh",
        &["/data", "/expected/SHA256SUMS"],
    )
    .on(&s.env.gpu_node)
    .run_as(65532)
    .env(env("PAUSE", "2"))
    .mount(Mount::Claim {
        claim,
        path: "/data".into(),
        read_only: true,
    })
    .mount(Mount::ConfigMap {
        name: "expected".into(),
        path: "/expected".into(),
    });
    s.api::<k8s_openapi::api::core::v1::Pod>()
        .create(&Default::default(), &checker.pod())
        .await
        .expect("creating the checking pod");
    s.wait("the mounted volume checked once", wait::SETTLE, || async {
        let out = s.output("checker").await;
        if count(&out, "FAIL") > 0 {
            return Check::Failed(out);
        }
        if count(&out, "PASS") > 0 {
            Check::Done(())
        } else {
            Check::Waiting(s.describe_pods(Some("checker")).await)
        }
    })
    .await;

    // The other log level than the release has now.
    let (ok, values, err) = command(
        &helm(),
        &[
            "get",
            "values",
            &s.env.release,
            "-n",
            &s.env.release_namespace,
            "--all",
            "-o",
            "json",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(ok, "helm get values failed: {err}");
    let values: serde_json::Value = serde_json::from_str(&values).expect("helm prints JSON");
    let level = if values["logLevel"] == "debug" {
        "info"
    } else {
        "debug"
    };
    let before = s.env.node_daemonset().await;
    let old_generation = before.metadata.generation.unwrap_or_default();
    let old_pod = s
        .env
        .node_pod(&s.env.gpu_node)
        .await
        .expect("a node pod on the gpu node");
    eprintln!("helm upgrade {} --set logLevel={level}", s.env.release);
    let chart = chart();
    let (ok, out, err) = command(
        &helm(),
        &[
            "upgrade",
            &s.env.release,
            &chart,
            "-n",
            &s.env.release_namespace,
            "--reuse-values",
            "--set",
            &format!("logLevel={level}"),
            "--wait",
            "--timeout",
            "10m",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    if !ok {
        s.fail(format!("helm upgrade failed:\n{out}\n{err}")).await;
    }

    s.wait("the node DaemonSet rolled out", wait::SETTLE, || async {
        let ds = s.env.node_daemonset().await;
        if ds.metadata.generation.unwrap_or_default() <= old_generation {
            return Check::Failed(format!(
                "the upgrade did not change the node DaemonSet (generation {old_generation}); \
                 the changed value must reach the node pods for this scenario to mean anything"
            ));
        }
        match daemonset_rolled_out(&ds) {
            Ok(()) => Check::Done(()),
            Err(why) => Check::Waiting(why),
        }
    })
    .await;
    let new_pod = s
        .env
        .node_pod(&s.env.gpu_node)
        .await
        .expect("a node pod on the gpu node");
    assert_ne!(
        new_pod.uid(),
        old_pod.uid(),
        "the gpu node's node pod was replaced by the upgrade"
    );
    let args = new_pod
        .spec
        .as_ref()
        .and_then(|sp| sp.containers.iter().find(|c| c.name == "agent"))
        .and_then(|c| c.args.clone())
        .unwrap_or_default();
    assert!(
        args.iter()
            .any(|a| a.ends_with(&format!("tidepool_csi={level}"))),
        "the new agent runs with the new log level: {args:?}"
    );
    s.env.wait_ready().await;

    let passes_then = count(&s.output("checker").await, "PASS");
    s.wait(
        "three more passes of the same container after the rollout",
        wait::SETTLE,
        || async {
            let out = s.output("checker").await;
            if count(&out, "FAIL") > 0 {
                return Check::Failed(format!(
                    "the pod that had the volume mounted before the upgrade can no longer \
                     read it:\n{}",
                    tidepool_e2e::sums::tail(&out, 10)
                ));
            }
            match count(&out, "PASS") {
                n if n >= passes_then + 3 => Check::Done(()),
                n => Check::Waiting(format!(
                    "{n} passes ({passes_then} at the end of the rollout); {}",
                    s.describe_pods(Some("checker")).await
                )),
            }
        },
    )
    .await;
    let pod = s
        .workload_pod("checker")
        .await
        .expect("the checking pod exists");
    let status = pod.status.clone().unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Running"), "{status:?}");
    let restarts: i32 = status
        .container_statuses
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0, "the checking container was never restarted");
}
