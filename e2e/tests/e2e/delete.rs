//! `kubectl delete` of a DatasetCache releases everything Tidepool made for it.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use tidepool_api::{DatasetCache, Phase, dataset_cache::PrefetchPolicy};
use tidepool_e2e::{Check, Mount, Scenario, SeedFile, Sums, Workload, scenario::command, wait};

fn kubectl() -> String {
    std::env::var("KUBECTL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "kubectl".to_owned())
}

/// A DatasetCache on every node (no selector), Ready, its volume staged on the other node
/// by a Job that read it; then `kubectl delete datasetcache` (which waits for the
/// finalizer): the object, its PV, its PVC, every pool's assignment and every agent's
/// report of it are gone.
#[tokio::test]
async fn kubectl_delete_of_a_dataset_cache_removes_its_pv_pvc_and_pool_assignments() {
    let s = Scenario::start("delete").await;
    let files: Vec<SeedFile> = (0..5u64)
        .map(|i| SeedFile::new(format!("{i}.bin"), 1000 + i))
        .collect();
    let seeded = s.seed("datasets", "delete", &files).await;
    let created = s
        .create_dataset("doomed", &seeded.url, PrefetchPolicy::OnDemand, false)
        .await;
    let uid = created
        .metadata
        .uid
        .clone()
        .expect("a created object has a uid");
    let ready = s
        .wait_dataset("doomed", "Ready on every node", |st| {
            st.phase == Phase::Ready && st.nodes_desired >= 2 && st.nodes_ready == st.nodes_desired
        })
        .await;
    let status = ready.status.unwrap_or_default();
    let pv_name = status.volume_name.clone().expect("status names the PV");
    let claim = status.claim_name.clone().expect("status names the PVC");

    let pvs = Api::<PersistentVolume>::all(s.env.client.clone());
    let pvcs = s.api::<PersistentVolumeClaim>();
    assert!(
        pvs.get_opt(&pv_name)
            .await
            .expect("reading the PV")
            .is_some(),
        "the PV {pv_name} exists"
    );
    let assigned = s.pools_assigning_dataset(&uid).await;
    assert!(
        assigned.contains(&s.env.gpu_node) && assigned.contains(&s.env.other_node),
        "both nodes' pools are assigned the dataset: {assigned:?}"
    );

    // Use the volume once, so that there is a staged mount to release as well.
    let reader = Workload::script("read", &s.env.node_image, "read-all.sh", &["/data"])
        .on(&s.env.other_node)
        .mount(Mount::Claim {
            claim: claim.clone(),
            path: "/data".into(),
            read_only: true,
        });
    let out = s.run_job(&reader, "Never", 0).await;
    seeded.sums.assert_same(
        &Sums::last_block(&out, "the reading Job"),
        "read before the delete",
    );
    s.delete_job("read").await;

    let (ok, out, err) = command(
        &kubectl(),
        &[
            "delete",
            "datasetcaches.tidepool.dev",
            "doomed",
            "-n",
            &s.ns,
            "--wait=true",
            "--timeout=180s",
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    if !ok {
        s.fail(format!("kubectl delete failed:\n{out}\n{err}"))
            .await;
    }

    let datasets = s.api::<DatasetCache>();
    let (datasets, pvs, pvcs, pv_name, claim, uid) =
        (&datasets, &pvs, &pvcs, &pv_name, &claim, &uid);
    let s = &s;
    s.wait(
        "the DatasetCache and all it made gone",
        wait::SETTLE,
        move || async move {
            if let Ok(Some(_)) = datasets.get_opt("doomed").await {
                return Check::Waiting("the DatasetCache still exists".into());
            }
            match pvs.get_opt(pv_name).await {
                Ok(None) => {}
                Ok(Some(_)) => return Check::Waiting(format!("PV {pv_name} still exists")),
                Err(e) => return Check::Waiting(e.to_string()),
            }
            match pvcs.get_opt(claim).await {
                Ok(None) => {}
                Ok(Some(_)) => return Check::Waiting(format!("PVC {claim} still exists")),
                Err(e) => return Check::Waiting(e.to_string()),
            }
            let assigned = s.pools_assigning_dataset(uid).await;
            if !assigned.is_empty() {
                return Check::Waiting(format!("still assigned in pools {assigned:?}"));
            }
            let reporting = s.pools_reporting_dataset(uid).await;
            if !reporting.is_empty() {
                return Check::Waiting(format!("still reported by the agents of {reporting:?}"));
            }
            Check::Done(())
        },
    )
    .await;
}
