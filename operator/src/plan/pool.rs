//! The spec of every `CachePool`, computed whole from every object and node.
//!
//! Design: one field manager owns all of `CachePool.spec`, so a pool spec is never
//! patched entry by entry; it is recomputed from the full picture (nodes, pools,
//! every `DatasetCache` and `CheckpointSync`) and applied only where it differs from
//! what the pool holds. Any reconcile can therefore repair any pool: a node added or
//! relabelled gets the right assignments at the next reconcile, a deleted object's
//! entry disappears everywhere.
//!
//! Rules:
//! - Only pools that exist are assigned into (agents create their own pools), and only
//!   if their node exists (a pool of a removed node is garbage; it goes with the node).
//! - A `DatasetCache` goes to every pool whose node labels match `nodeSelector`
//!   (empty: all); a `CheckpointSync` goes to every pool.
//! - An object being deleted is never newly assigned, and keeps the assignments it has
//!   until its own cleanup releases them (`releasing`): pods may still read through
//!   the mount until their PVC is gone.
//! - Entries are sorted by (namespace, name): identical input, identical spec.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::LabelSelector};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};
use tidepool_api::{
    CachePool, CachePoolSpec, CheckpointSync, DatasetCache,
    cache_pool::{
        AssignmentOwner, CheckpointAssignment, DatasetAssignment, MAX_CHECKPOINT_SYNCS,
        MAX_DATASETS,
    },
};

use super::volume::volume_name;

/// Everything observed that pool specs depend on.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// Nodes (only their names and labels matter).
    pub nodes: &'a [&'a Node],
    /// Existing pools.
    pub pools: &'a [&'a CachePool],
    /// Every `DatasetCache`.
    pub datasets: &'a [&'a DatasetCache],
    /// Every `CheckpointSync`.
    pub checkpoints: &'a [&'a CheckpointSync],
}

/// Whether `selector` (absent or empty: everything) selects `labels`. A selector that
/// cannot be parsed selects nothing.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(sel) => Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels)),
    }
}

fn owner<K: kube::Resource>(obj: &K) -> AssignmentOwner {
    AssignmentOwner {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        uid: obj.uid().unwrap_or_default(),
        generation: obj.meta().generation.unwrap_or_default(),
    }
}

fn dataset_assignment(d: &DatasetCache) -> DatasetAssignment {
    let owner = owner(d);
    DatasetAssignment {
        volume_handle: volume_name(&owner.uid),
        owner,
        source: d.spec.source.clone(),
        prefetch: d.spec.prefetch.clone(),
        refresh: d.spec.refresh.clone(),
        pinned: d.spec.pinned,
    }
}

fn checkpoint_assignment(c: &CheckpointSync) -> CheckpointAssignment {
    let owner = owner(c);
    CheckpointAssignment {
        volume_handle: volume_name(&owner.uid),
        owner,
        destination: c.spec.destination.clone(),
        commit: c.spec.commit.clone(),
        retention: c.spec.retention.clone(),
    }
}

/// Whether `obj` may be in `pool`, given whether it is currently assigned there.
fn keeps<K: kube::Resource>(obj: &K, assigned_now: bool, releasing: Option<&str>) -> bool {
    if obj.meta().deletion_timestamp.is_none() {
        return true;
    }
    assigned_now && obj.uid().as_deref() != releasing
}

/// Keeps the `max` oldest of `objs` (by creation time, then uid): a pool holds at most
/// that many (the CRD's bound). Those over it are left out, the newest first, and stay
/// unassigned on this node until older ones go; their status counts this node as not
/// ready.
fn oldest_first<K: kube::Resource<DynamicType = ()>>(objs: &mut Vec<&K>, max: usize) {
    if objs.len() <= max {
        return;
    }
    objs.sort_by(|a, b| {
        (&a.meta().creation_timestamp.as_ref().map(|t| t.0), a.uid())
            .cmp(&(&b.meta().creation_timestamp.as_ref().map(|t| t.0), b.uid()))
    });
    tracing::warn!(
        kind = K::kind(&()).as_ref(),
        wanted = objs.len(),
        max,
        "more objects select one node than its cache pool can hold; the newest are not assigned there"
    );
    objs.truncate(max);
}

/// The desired spec of `pool`, whose node has `labels` (None: the node is gone).
pub fn desired_spec(
    pool: &CachePool,
    labels: Option<&BTreeMap<String, String>>,
    datasets: &[&DatasetCache],
    checkpoints: &[&CheckpointSync],
    releasing: Option<&str>,
) -> CachePoolSpec {
    let Some(labels) = labels else {
        return CachePoolSpec::default();
    };
    let has_dataset = |uid: Option<String>| {
        pool.spec
            .datasets
            .iter()
            .any(|a| Some(&a.owner.uid) == uid.as_ref())
    };
    let has_checkpoint = |uid: Option<String>| {
        pool.spec
            .checkpoint_syncs
            .iter()
            .any(|a| Some(&a.owner.uid) == uid.as_ref())
    };
    let mut datasets: Vec<&DatasetCache> = datasets
        .iter()
        .filter(|d| selects(d.spec.node_selector.as_ref(), labels))
        .filter(|d| keeps(**d, has_dataset(d.uid()), releasing))
        .copied()
        .collect();
    let mut checkpoints: Vec<&CheckpointSync> = checkpoints
        .iter()
        .filter(|c| keeps(**c, has_checkpoint(c.uid()), releasing))
        .copied()
        .collect();
    oldest_first(&mut datasets, MAX_DATASETS);
    oldest_first(&mut checkpoints, MAX_CHECKPOINT_SYNCS);
    let mut spec = CachePoolSpec {
        datasets: datasets.iter().map(|d| dataset_assignment(d)).collect(),
        checkpoint_syncs: checkpoints
            .iter()
            .map(|c| checkpoint_assignment(c))
            .collect(),
    };
    spec.datasets.sort_by(|a, b| a.owner.cmp(&b.owner));
    spec.checkpoint_syncs.sort_by(|a, b| a.owner.cmp(&b.owner));
    spec
}

/// Pools whose spec must change, with their new spec, in pool-name order.
pub fn changed_pools(
    observed: &Observed<'_>,
    releasing: Option<&str>,
) -> Vec<(String, CachePoolSpec)> {
    let labels: BTreeMap<String, &BTreeMap<String, String>> = observed
        .nodes
        .iter()
        .map(|n| (n.name_any(), n.labels()))
        .collect();
    let mut changed: Vec<_> = observed
        .pools
        .iter()
        .filter_map(|pool| {
            let name = pool.name_any();
            let spec = desired_spec(
                pool,
                labels.get(&name).copied(),
                observed.datasets,
                observed.checkpoints,
                releasing,
            );
            (spec != pool.spec).then_some((name, spec))
        })
        .collect();
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    changed
}

/// Names of the pools (that exist, with a node) a dataset should be assigned to.
pub fn dataset_nodes<'a>(d: &DatasetCache, observed: &Observed<'a>) -> Vec<&'a CachePool> {
    let labels: BTreeMap<String, &BTreeMap<String, String>> = observed
        .nodes
        .iter()
        .map(|n| (n.name_any(), n.labels()))
        .collect();
    observed
        .pools
        .iter()
        .filter(|p| {
            labels
                .get(&p.name_any())
                .is_some_and(|l| selects(d.spec.node_selector.as_ref(), l))
        })
        .copied()
        .collect()
}

/// Pools (that exist, with a node) a checkpoint sync runs on: all of them.
pub fn checkpoint_nodes<'a>(observed: &Observed<'a>) -> Vec<&'a CachePool> {
    let nodes: std::collections::BTreeSet<String> =
        observed.nodes.iter().map(|n| n.name_any()).collect();
    observed
        .pools
        .iter()
        .filter(|p| nodes.contains(&p.name_any()))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time},
        jiff::Timestamp,
    };
    use kube::api::ObjectMeta;
    use tidepool_api::{DatasetCacheSpec, LakeLocation, checkpoint_sync::CheckpointSyncSpec};

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pool(name: &str) -> CachePool {
        CachePool::new(name, CachePoolSpec::default())
    }

    fn dataset(ns: &str, name: &str, selector: Option<LabelSelector>) -> DatasetCache {
        let mut d = DatasetCache::new(
            name,
            DatasetCacheSpec {
                source: LakeLocation {
                    url: format!("https://a.blob.core.windows.net/c/{name}"),
                    credentials: None,
                },
                node_selector: selector,
                ..Default::default()
            },
        );
        d.metadata.namespace = Some(ns.into());
        d.metadata.uid = Some(format!("uid-{ns}-{name}"));
        d.metadata.generation = Some(3);
        d
    }

    fn checkpoint(name: &str) -> CheckpointSync {
        let mut c = CheckpointSync::new(name, CheckpointSyncSpec::default());
        c.metadata.namespace = Some("ml".into());
        c.metadata.uid = Some(format!("uid-{name}"));
        c
    }

    fn gpu_selector() -> LabelSelector {
        LabelSelector {
            match_labels: Some([("gpu".to_owned(), "h100".to_owned())].into()),
            ..Default::default()
        }
    }

    fn names(spec: &CachePoolSpec) -> Vec<String> {
        spec.datasets
            .iter()
            .map(|a| format!("{}/{}", a.owner.namespace, a.owner.name))
            .collect()
    }

    #[test]
    fn selector_table() {
        let labels: BTreeMap<String, String> = [
            ("gpu".to_owned(), "h100".to_owned()),
            ("zone".to_owned(), "a".to_owned()),
        ]
        .into();
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        };
        let cases = [
            ("absent selects all", None, true),
            ("empty selects all", Some(LabelSelector::default()), true),
            ("matchLabels hit", Some(gpu_selector()), true),
            (
                "matchLabels miss",
                Some(LabelSelector {
                    match_labels: Some([("gpu".to_owned(), "a100".to_owned())].into()),
                    ..Default::default()
                }),
                false,
            ),
            ("In hit", Some(expr("zone", "In", &["a", "b"])), true),
            ("NotIn miss", Some(expr("zone", "NotIn", &["a"])), false),
            ("Exists", Some(expr("gpu", "Exists", &[])), true),
            (
                "DoesNotExist",
                Some(expr("gpu", "DoesNotExist", &[])),
                false,
            ),
            (
                "bad operator selects nothing",
                Some(expr("gpu", "Near", &["x"])),
                false,
            ),
        ];
        for (name, selector, want) in cases {
            assert_eq!(selects(selector.as_ref(), &labels), want, "{name}");
        }
    }

    #[test]
    fn datasets_go_to_matching_pools_and_checkpoints_everywhere() {
        let n1 = node("n1", &[("gpu", "h100")]);
        let n2 = node("n2", &[("gpu", "a100")]);
        let n3 = node("n3", &[("gpu", "h100")]); // no pool: never invented
        let (p1, p2) = (pool("n1"), pool("n2"));
        let all = dataset("ml", "all", None);
        let h100 = dataset("ml", "h100-only", Some(gpu_selector()));
        let ck = checkpoint("ckpt");
        let observed = Observed {
            nodes: &[&n1, &n2, &n3],
            pools: &[&p1, &p2],
            datasets: &[&h100, &all],
            checkpoints: &[&ck],
        };
        let changed = changed_pools(&observed, None);
        assert_eq!(
            changed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["n1", "n2"],
            "only existing pools"
        );
        assert_eq!(
            names(&changed[0].1),
            ["ml/all", "ml/h100-only"],
            "sorted, both match n1"
        );
        assert_eq!(names(&changed[1].1), ["ml/all"]);
        for (_, spec) in &changed {
            assert_eq!(spec.checkpoint_syncs.len(), 1);
            assert_eq!(spec.checkpoint_syncs[0].volume_handle, "tidepool-uid-ckpt");
        }
        let a = &changed[0].1.datasets[0];
        assert_eq!(
            a.owner.generation, 3,
            "the agent sees which generation it serves"
        );
        assert_eq!(a.source.url, "https://a.blob.core.windows.net/c/all");
    }

    #[test]
    fn applied_pools_are_left_alone() {
        let n1 = node("n1", &[]);
        let d = dataset("ml", "a", None);
        let mut p1 = pool("n1");
        p1.spec = desired_spec(&p1, Some(n1.labels()), &[&d], &[], None);
        let observed = Observed {
            nodes: &[&n1],
            pools: &[&p1],
            datasets: &[&d],
            checkpoints: &[],
        };
        assert!(
            changed_pools(&observed, None).is_empty(),
            "no write when nothing changed"
        );
    }

    #[test]
    fn relabelled_node_loses_and_gains_assignments() {
        let d = dataset("ml", "a", Some(gpu_selector()));
        let before = node("n1", &[("gpu", "h100")]);
        let mut p1 = pool("n1");
        p1.spec = desired_spec(&p1, Some(before.labels()), &[&d], &[], None);
        assert_eq!(names(&p1.spec), ["ml/a"]);
        let after = node("n1", &[("gpu", "none")]);
        let observed = Observed {
            nodes: &[&after],
            pools: &[&p1],
            datasets: &[&d],
            checkpoints: &[],
        };
        let changed = changed_pools(&observed, None);
        assert_eq!(changed.len(), 1);
        assert!(changed[0].1.datasets.is_empty());
    }

    #[test]
    fn deleting_objects_keep_assignments_until_released_and_are_never_added() {
        let n1 = node("n1", &[]);
        let n2 = node("n2", &[]);
        let mut d = dataset("ml", "a", None);
        let mut p1 = pool("n1");
        p1.spec = desired_spec(&p1, Some(n1.labels()), &[&d], &[], None);
        let p2 = pool("n2"); // joined after the deletion started
        d.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(10).unwrap()));
        let observed = Observed {
            nodes: &[&n1, &n2],
            pools: &[&p1, &p2],
            datasets: &[&d],
            checkpoints: &[],
        };
        assert!(
            changed_pools(&observed, None).is_empty(),
            "kept on n1, not added to n2"
        );
        let released = changed_pools(&observed, Some("uid-ml-a"));
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].0, "n1");
        assert!(released[0].1.datasets.is_empty());
    }

    #[test]
    fn pool_of_a_removed_node_is_emptied_not_left_dangling() {
        let d = dataset("ml", "a", None);
        let n1 = node("n1", &[]);
        let mut p1 = pool("n1");
        p1.spec = desired_spec(&p1, Some(n1.labels()), &[&d], &[], None);
        let observed = Observed {
            nodes: &[],
            pools: &[&p1],
            datasets: &[&d],
            checkpoints: &[],
        };
        assert_eq!(
            changed_pools(&observed, None)[0].1,
            CachePoolSpec::default()
        );
        assert!(
            dataset_nodes(&d, &observed).is_empty(),
            "not desired there either"
        );
    }

    #[test]
    fn many_nodes_many_datasets() {
        // 200 nodes in 4 GPU classes, 50 datasets each selecting one class or all.
        let classes = ["h100", "a100", "l40s", "mi300"];
        let nodes: Vec<Node> = (0..200)
            .map(|i| node(&format!("n{i:03}"), &[("gpu", classes[i % 4])]))
            .collect();
        let pools: Vec<CachePool> = (0..200).map(|i| pool(&format!("n{i:03}"))).collect();
        let datasets: Vec<DatasetCache> = (0..50)
            .map(|i| {
                let selector = (i % 5 != 0).then(|| LabelSelector {
                    match_labels: Some([("gpu".to_owned(), classes[i % 4].to_owned())].into()),
                    ..Default::default()
                });
                dataset(&format!("team{}", i % 3), &format!("ds{i:02}"), selector)
            })
            .collect();
        let (nodes_r, pools_r, ds_r): (Vec<_>, Vec<_>, Vec<_>) = (
            nodes.iter().collect(),
            pools.iter().collect(),
            datasets.iter().collect(),
        );
        let observed = Observed {
            nodes: &nodes_r,
            pools: &pools_r,
            datasets: &ds_r,
            checkpoints: &[],
        };
        let changed = changed_pools(&observed, None);
        assert_eq!(changed.len(), 200);
        // 10 datasets select all (i % 5 == 0); the other 40 are spread over 4 classes.
        for (name, spec) in &changed {
            let i: usize = name[1..].parse().unwrap();
            let class = classes[i % 4];
            let want = datasets
                .iter()
                .filter(|d| {
                    d.spec
                        .node_selector
                        .as_ref()
                        .is_none_or(|s| s.match_labels.as_ref().unwrap()["gpu"] == class)
                })
                .count();
            assert_eq!(spec.datasets.len(), want, "{name}");
        }
        let total: usize = changed.iter().map(|(_, s)| s.datasets.len()).sum();
        let expected: usize = datasets
            .iter()
            .map(|d| dataset_nodes(d, &observed).len())
            .sum();
        assert_eq!(
            total, expected,
            "pool specs and per-dataset node sets agree"
        );
    }

    #[test]
    fn a_pool_holds_at_most_its_bound_the_oldest_first() {
        let labels = BTreeMap::new();
        let all: Vec<DatasetCache> = (0..MAX_DATASETS + 10)
            .map(|i| {
                let mut d = dataset("ml", &format!("d{i:03}"), None);
                // Created in reverse name order: the oldest have the highest numbers.
                d.metadata.creation_timestamp =
                    Some(Time(Timestamp::from_second(1_000_000 - i as i64).unwrap()));
                d
            })
            .collect();
        let refs: Vec<&DatasetCache> = all.iter().collect();
        let spec = desired_spec(&pool("n1"), Some(&labels), &refs, &[], None);
        assert_eq!(spec.datasets.len(), MAX_DATASETS, "bounded as the CRD is");
        let kept = names(&spec);
        assert!(
            kept.contains(&format!("ml/d{:03}", MAX_DATASETS + 9)),
            "the oldest is kept"
        );
        assert!(
            !kept.contains(&"ml/d000".to_owned()),
            "the newest is left out"
        );
        let mut sorted = kept.clone();
        sorted.sort();
        assert_eq!(kept, sorted, "still in (namespace, name) order");
    }
}
