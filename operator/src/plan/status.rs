//! Status of a `DatasetCache` or `CheckpointSync`, summed from the pools it is
//! assigned to.
//!
//! Rules (a table test below pins each one):
//! - A pool counts only while its agent reports: a heartbeat older than `stale_after`
//!   (or none at all) makes the node not ready, whatever it last said, and the
//!   `PoolsReporting` condition names those nodes.
//! - Phase: no desired node → Pending; all ready → Ready; some ready while others
//!   failed or went silent → Degraded; none ready and one failed → Failed; some
//!   progress → Warming; otherwise Pending.
//! - Reports are matched by uid: what a node says about an older incarnation of a
//!   same-named object is ignored.
//! - A checkpoint step is reported durable only if it is durable on every node that
//!   holds checkpoint data (minimum over those nodes): resuming from it is safe on any
//!   node. This is conservative: a node that never held a newer step holds it back.
//! - `lastTransitionTime` only moves when a condition's status flips, so recomputing
//!   an unchanged status produces identical bytes.

use std::collections::BTreeMap;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use tidepool_api::{
    CachePool, CheckpointSync, DatasetCache, Phase,
    cache_pool::{CheckpointNodeStatus, DatasetNodeStatus, NodeDatasetPhase},
    checkpoint_sync::{CheckpointSyncStatus, PendingNode},
    conditions::{self, ConditionUpdate, POOLS_REPORTING, READY},
    dataset_cache::{DatasetCacheStatus, SnapshotSummary},
};

use super::{Workload, volume::volume_name};

/// Time inputs of status planning.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// The current time.
    pub now: Timestamp,
    /// A pool whose heartbeat is older than this is not ready.
    pub stale_after: SignedDuration,
}

impl Clock {
    fn fresh(&self, pool: &CachePool) -> bool {
        pool.status
            .as_ref()
            .and_then(|s| s.heartbeat_time.as_ref())
            .is_some_and(|t| self.now.duration_since(t.0) <= self.stale_after)
    }
}

/// Per-node counts feeding the phase rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Nodes the object is assigned to.
    pub desired: usize,
    /// Fresh and ready.
    pub ready: usize,
    /// Fresh and failed.
    pub failed: usize,
    /// Fresh and making progress (listing, warming) but not ready.
    pub progressing: usize,
    /// Not reporting.
    pub stale: usize,
}

impl Tally {
    /// The aggregated phase.
    pub fn phase(&self) -> Phase {
        if self.desired == 0 {
            Phase::Pending
        } else if self.ready == self.desired {
            Phase::Ready
        } else if self.ready > 0 && (self.failed > 0 || self.stale > 0) {
            Phase::Degraded
        } else if self.failed > 0 {
            Phase::Failed
        } else if self.ready > 0 || self.progressing > 0 {
            Phase::Warming
        } else {
            Phase::Pending
        }
    }
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Names listed in a condition message before "and N more": enough to act on, short
/// enough for `kubectl describe`.
const LISTED_NODES: usize = 5;

fn list_nodes(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(LISTED_NODES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED_NODES {
        text.push_str(&format!(" and {} more", names.len() - LISTED_NODES));
    }
    text
}

/// Node failures quoted in the Ready condition, and the length each is cut to: enough
/// to say what is wrong (a refused endpoint, a missing or forbidden Secret) without
/// burying the condition.
const QUOTED_FAILURES: usize = 3;
const QUOTED_LEN: usize = 240;

/// "; node n1: why; node n2: why (and 4 more failed)", from the nodes' own messages.
fn quote_failures(failures: &[(String, String)]) -> String {
    let mut text = String::new();
    for (node, why) in failures.iter().take(QUOTED_FAILURES) {
        let mut why = why.trim().to_owned();
        if why.len() > QUOTED_LEN {
            let mut end = QUOTED_LEN;
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            why.truncate(end);
            why.push('…');
        }
        text.push_str(&format!("; node {node}: {why}"));
    }
    if failures.len() > QUOTED_FAILURES {
        text.push_str(&format!(
            " (and {} more failed)",
            failures.len() - QUOTED_FAILURES
        ));
    }
    text
}

fn common_conditions(
    conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    tally: &Tally,
    failures: &[(String, String)],
    stale_nodes: &[String],
    clock: &Clock,
    generation: Option<i64>,
    what: &str,
) {
    let phase = tally.phase();
    let ready = match phase {
        Phase::Ready => ConditionUpdate { type_: READY, status: true, reason: "AllNodesReady", message: format!("{what} is ready on all {} node(s)", tally.desired) },
        Phase::Pending if tally.desired == 0 => ConditionUpdate {
            type_: READY,
            status: false,
            reason: "NoMatchingNodes",
            message: "no node with a Tidepool cache pool matches; check nodeSelector and that the node DaemonSet runs there".to_owned(),
        },
        other => ConditionUpdate {
            type_: READY,
            status: false,
            reason: other.as_str(),
            message: format!("{what} is ready on {} of {} node(s) ({} failed, {} not reporting){}", tally.ready, tally.desired, tally.failed, tally.stale, quote_failures(failures)),
        },
    };
    conditions::set(conditions, ready, generation, clock.now);
    let reporting = if stale_nodes.is_empty() {
        ConditionUpdate {
            type_: POOLS_REPORTING,
            status: true,
            reason: "HeartbeatsFresh",
            message: "every assigned node's agent is reporting".to_owned(),
        }
    } else {
        ConditionUpdate {
            type_: POOLS_REPORTING,
            status: false,
            reason: "StaleHeartbeat",
            message: format!(
                "no heartbeat within {}s from node(s) {}; they count as not ready (is the tidepool agent running there?)",
                clock.stale_after.as_secs(),
                list_nodes(stale_nodes)
            ),
        }
    };
    conditions::set(conditions, reporting, generation, clock.now);
}

/// Status of `d`, assigned to `pools`.
pub fn dataset_status(d: &DatasetCache, pools: &[&CachePool], clock: &Clock) -> DatasetCacheStatus {
    let uid = d.uid().unwrap_or_default();
    let mut tally = Tally {
        desired: pools.len(),
        ..Default::default()
    };
    let mut stale_nodes = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let (mut bytes_cached, mut bytes_from_lake, mut bytes_from_peers) = (0i64, 0i64, 0i64);
    let mut snapshots: BTreeMap<&str, (usize, &DatasetNodeStatus)> = BTreeMap::new();
    for pool in pools {
        let entry = pool
            .status
            .as_ref()
            .and_then(|s| s.datasets.iter().find(|e| e.uid == uid));
        if let Some(e) = entry {
            bytes_cached = bytes_cached.saturating_add(e.bytes_cached);
            bytes_from_lake = bytes_from_lake.saturating_add(e.bytes_from_lake);
            bytes_from_peers = bytes_from_peers.saturating_add(e.bytes_from_peers);
        }
        if !clock.fresh(pool) {
            tally.stale += 1;
            stale_nodes.push(pool.name_any());
            continue;
        }
        let Some(e) = entry else { continue };
        match e.phase {
            NodeDatasetPhase::Ready => tally.ready += 1,
            NodeDatasetPhase::Failed => {
                tally.failed += 1;
                if let Some(m) = &e.message {
                    failures.push((pool.name_any(), m.clone()));
                }
            }
            NodeDatasetPhase::Listing | NodeDatasetPhase::Warming => tally.progressing += 1,
            NodeDatasetPhase::Pending => {}
        }
        if let Some(id) = e.snapshot.as_deref() {
            snapshots.entry(id).or_insert((0, e)).0 += 1;
        }
    }
    // The snapshot most fresh nodes serve; ties go to the greatest id (ids sort by time).
    let snapshot = snapshots
        .iter()
        .max_by_key(|(id, (count, _))| (*count, *id))
        .map(|(id, (_, e))| SnapshotSummary {
            id: (*id).to_owned(),
            objects: e.objects,
            bytes: e.bytes_total,
        });
    let mut conditions = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    common_conditions(
        &mut conditions,
        &tally,
        &failures,
        &stale_nodes,
        clock,
        d.metadata.generation,
        "dataset",
    );
    DatasetCacheStatus {
        observed_generation: d.metadata.generation,
        phase: tally.phase(),
        nodes_desired: to_i32(tally.desired),
        nodes_ready: to_i32(tally.ready),
        bytes_cached,
        bytes_from_lake,
        bytes_from_peers,
        snapshot,
        claim_name: Some(d.claim()),
        volume_name: Some(volume_name(&uid)),
        conditions,
    }
}

/// The annotation that lets a `CheckpointSync` be deleted while its nodes still have
/// committed bytes to upload (those bytes are then never uploaded).
pub const DISCARD_PENDING: &str = "tidepool.dev/discard-pending";

/// Why the deletion of `c` waits: committed bytes its nodes have not uploaded yet (the
/// assignment is what they upload with), said in words; `None` when there are none,
/// or when `c` is annotated [`DISCARD_PENDING`] `"true"`.
pub fn uploads_pending(c: &CheckpointSync, pools: &[&CachePool]) -> Option<String> {
    if c.annotations()
        .get(DISCARD_PENDING)
        .is_some_and(|v| v == "true")
    {
        return None;
    }
    let uid = c.uid().unwrap_or_default();
    let mut nodes = Vec::new();
    let mut total = 0i64;
    for pool in pools {
        if let Some(e) = pool
            .status
            .as_ref()
            .and_then(|s| s.checkpoint_syncs.iter().find(|e| e.uid == uid))
            && e.pending_bytes > 0
        {
            total = total.saturating_add(e.pending_bytes);
            nodes.push(pool.name_any());
        }
    }
    (total > 0).then(|| {
        format!(
            "waiting for {total} bytes of committed checkpoints on node(s) {} to reach the lake before the volume's assignments go (they upload with them); to delete without waiting, and lose those bytes, annotate {DISCARD_PENDING}=true",
            list_nodes(&nodes)
        )
    })
}

/// Status of `c`, assigned to `pools`.
pub fn checkpoint_status(
    c: &CheckpointSync,
    pools: &[&CachePool],
    clock: &Clock,
) -> CheckpointSyncStatus {
    let uid = c.uid().unwrap_or_default();
    let mut tally = Tally {
        desired: pools.len(),
        ..Default::default()
    };
    let mut stale_nodes = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut pending_bytes = 0i64;
    let mut pending_nodes = Vec::new();
    let mut committed: Option<i64> = None;
    // Over nodes holding data: None until one holds data; Some(None) once a holder has
    // nothing durable yet.
    let mut durable: Option<Option<i64>> = None;
    for pool in pools {
        let entry: Option<&CheckpointNodeStatus> = pool
            .status
            .as_ref()
            .and_then(|s| s.checkpoint_syncs.iter().find(|e| e.uid == uid));
        if let Some(e) = entry {
            pending_bytes = pending_bytes.saturating_add(e.pending_bytes);
            if e.pending_bytes > 0 {
                pending_nodes.push(PendingNode {
                    node: pool.name_any(),
                    bytes: e.pending_bytes,
                });
            }
            if let Some(step) = e.latest_committed_step {
                committed = committed.max(Some(step));
                durable = Some(match durable {
                    None => e.latest_durable_step,
                    Some(so_far) => so_far.zip(e.latest_durable_step).map(|(a, b)| a.min(b)),
                });
            }
        }
        if !clock.fresh(pool) {
            tally.stale += 1;
            stale_nodes.push(pool.name_any());
            continue;
        }
        match entry {
            Some(e) if e.failed => {
                tally.failed += 1;
                if let Some(m) = &e.message {
                    failures.push((pool.name_any(), m.clone()));
                }
            }
            Some(_) => tally.ready += 1,
            None => {}
        }
    }
    let mut conditions = c
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    common_conditions(
        &mut conditions,
        &tally,
        &failures,
        &stale_nodes,
        clock,
        c.metadata.generation,
        "checkpoint sync",
    );
    CheckpointSyncStatus {
        observed_generation: c.metadata.generation,
        phase: tally.phase(),
        nodes_desired: to_i32(tally.desired),
        nodes_ready: to_i32(tally.ready),
        latest_committed_step: committed,
        latest_durable_step: durable.flatten(),
        pending_bytes,
        pending_nodes: {
            pending_nodes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.node.cmp(&b.node)));
            pending_nodes.truncate(256);
            pending_nodes
        },
        claim_name: Some(c.claim()),
        volume_name: Some(volume_name(&uid)),
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tidepool_api::{
        CachePoolSpec, CachePoolStatus, DatasetCacheSpec, checkpoint_sync::CheckpointSyncSpec,
        conditions::find,
    };

    use super::*;

    const NOW: i64 = 1_000_000;

    fn clock() -> Clock {
        Clock {
            now: Timestamp::from_second(NOW).unwrap(),
            stale_after: SignedDuration::from_secs(120),
        }
    }

    fn dataset() -> DatasetCache {
        let mut d = DatasetCache::new("imagenet", DatasetCacheSpec::default());
        d.metadata.namespace = Some("ml".into());
        d.metadata.uid = Some("u1".into());
        d.metadata.generation = Some(2);
        d
    }

    /// A pool that reported `age` seconds ago (None: never) with one dataset entry.
    fn pool(
        name: &str,
        age: Option<i64>,
        entry: Option<(NodeDatasetPhase, &str, i64)>,
    ) -> CachePool {
        let mut p = CachePool::new(name, CachePoolSpec::default());
        p.status = Some(CachePoolStatus {
            heartbeat_time: age.map(|a| Time(Timestamp::from_second(NOW - a).unwrap())),
            datasets: entry
                .map(|(phase, snap, bytes)| DatasetNodeStatus {
                    namespace: "ml".into(),
                    name: "imagenet".into(),
                    uid: "u1".into(),
                    phase,
                    snapshot: Some(snap.into()),
                    objects: 10,
                    bytes_cached: bytes,
                    bytes_total: 1000,
                    // One node's share from the lake, the rest from its peers.
                    bytes_from_lake: bytes / 4,
                    bytes_from_peers: bytes - bytes / 4,
                    message: None,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        });
        p
    }

    use NodeDatasetPhase::{Failed, Listing, Ready, Warming};

    #[test]
    fn phase_table() {
        let cases: Vec<(&str, Vec<CachePool>, Phase, i32, i32)> = vec![
            ("no nodes", vec![], Phase::Pending, 0, 0),
            (
                "assigned, nobody reported on it",
                vec![pool("a", Some(5), None)],
                Phase::Pending,
                1,
                0,
            ),
            (
                "listing",
                vec![pool("a", Some(5), Some((Listing, "s1", 0)))],
                Phase::Warming,
                1,
                0,
            ),
            (
                "half ready",
                vec![
                    pool("a", Some(5), Some((Ready, "s1", 1000))),
                    pool("b", Some(5), Some((Warming, "s1", 10))),
                ],
                Phase::Warming,
                2,
                1,
            ),
            (
                "all ready",
                vec![
                    pool("a", Some(5), Some((Ready, "s1", 1000))),
                    pool("b", Some(1), Some((Ready, "s1", 1000))),
                ],
                Phase::Ready,
                2,
                2,
            ),
            (
                "ready + failed",
                vec![
                    pool("a", Some(5), Some((Ready, "s1", 1000))),
                    pool("b", Some(5), Some((Failed, "s1", 0))),
                ],
                Phase::Degraded,
                2,
                1,
            ),
            (
                "ready + stale",
                vec![
                    pool("a", Some(5), Some((Ready, "s1", 1000))),
                    pool("b", Some(500), Some((Ready, "s1", 1000))),
                ],
                Phase::Degraded,
                2,
                1,
            ),
            (
                "only failed",
                vec![pool("a", Some(5), Some((Failed, "s1", 0)))],
                Phase::Failed,
                1,
                0,
            ),
            (
                "stale says ready: not ready",
                vec![pool("a", Some(121), Some((Ready, "s1", 1000)))],
                Phase::Pending,
                1,
                0,
            ),
            (
                "never reported",
                vec![pool("a", None, None)],
                Phase::Pending,
                1,
                0,
            ),
        ];
        for (name, pools, phase, desired, ready) in cases {
            let refs: Vec<_> = pools.iter().collect();
            let s = dataset_status(&dataset(), &refs, &clock());
            assert_eq!(
                (s.phase, s.nodes_desired, s.nodes_ready),
                (phase, desired, ready),
                "{name}"
            );
            assert_eq!(s.observed_generation, Some(2), "{name}");
        }
    }

    #[test]
    fn the_ready_condition_quotes_what_failing_nodes_say() {
        let why = [
            "lake endpoint https://evil.example.net is not allowed on this node (--lake-endpoint)",
            "Secret ml/lake not found",
            "forbidden: cannot get Secret ml/lake",
            "fourth",
        ];
        let mut pools = vec![pool("gpu-0", Some(5), Some((Ready, "s1", 1000)))];
        for (i, m) in why.iter().enumerate() {
            let mut p = pool(&format!("gpu-{}", i + 1), Some(5), Some((Failed, "s1", 0)));
            p.status.as_mut().unwrap().datasets[0].message = Some((*m).to_owned());
            pools.push(p);
        }
        // A long message is cut, on a character boundary.
        let long = "é".repeat(400);
        pools[2].status.as_mut().unwrap().datasets[0].message = Some(long);
        let refs: Vec<_> = pools.iter().collect();
        let s = dataset_status(&dataset(), &refs, &clock());
        let c = find(&s.conditions, READY).unwrap();
        assert!(
            c.message
                .starts_with("dataset is ready on 1 of 5 node(s) (4 failed"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains(&format!("; node gpu-1: {}", why[0])),
            "{}",
            c.message
        );
        assert!(
            c.message
                .contains("; node gpu-3: forbidden: cannot get Secret ml/lake"),
            "{}",
            c.message
        );
        assert!(!c.message.contains("fourth"), "{}", c.message);
        assert!(c.message.ends_with(" (and 1 more failed)"), "{}", c.message);
        let cut = c.message.split("; node gpu-2: ").nth(1).unwrap();
        let cut = cut.split(';').next().unwrap();
        assert!(cut.ends_with('…') && cut.chars().count() == 121, "{cut}");
    }

    #[test]
    fn stale_pools_are_named_in_a_condition() {
        let pools = [
            pool("gpu-1", Some(5), Some((Ready, "s1", 1000))),
            pool("gpu-2", Some(600), Some((Ready, "s1", 1000))),
            pool("gpu-3", None, None),
        ];
        let refs: Vec<_> = pools.iter().collect();
        let s = dataset_status(&dataset(), &refs, &clock());
        let c = find(&s.conditions, POOLS_REPORTING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "StaleHeartbeat")
        );
        assert!(
            c.message.contains("gpu-2, gpu-3") && !c.message.contains("gpu-1"),
            "{}",
            c.message
        );
        assert_eq!(
            s.bytes_cached, 2000,
            "cached bytes still count: the data is on disk"
        );
        let ready = find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Degraded")
        );
    }

    #[test]
    fn many_nodes_report_one_summary() {
        let pools: Vec<_> = (0..300)
            .map(|i| {
                let snap = if i < 200 { "snap-2" } else { "snap-1" };
                pool(&format!("n{i}"), Some(i % 60), Some((Ready, snap, 1000)))
            })
            .collect();
        let refs: Vec<_> = pools.iter().collect();
        let s = dataset_status(&dataset(), &refs, &clock());
        assert_eq!(
            (s.phase, s.nodes_ready, s.bytes_cached),
            (Phase::Ready, 300, 300_000)
        );
        // Lake bytes and the bytes peers saved, summed over the nodes.
        assert_eq!((s.bytes_from_lake, s.bytes_from_peers), (75_000, 225_000));
        assert_eq!(
            s.snapshot,
            Some(SnapshotSummary {
                id: "snap-2".into(),
                objects: 10,
                bytes: 1000
            })
        );
        assert_eq!(s.claim_name.as_deref(), Some("imagenet"));
        assert_eq!(s.volume_name.as_deref(), Some("tidepool-u1"));
        let again = dataset_status(
            &DatasetCache {
                status: Some(s.clone()),
                ..dataset()
            },
            &refs,
            &Clock {
                now: Timestamp::from_second(NOW + 30).unwrap(),
                ..clock()
            },
        );
        assert_eq!(
            again.conditions, s.conditions,
            "same status, same conditions: no churn"
        );
    }

    #[test]
    fn reports_about_another_incarnation_are_ignored() {
        let mut p = pool("a", Some(5), Some((Ready, "s1", 1000)));
        p.status.as_mut().unwrap().datasets[0].uid = "old-uid".into();
        let s = dataset_status(&dataset(), &[&p], &clock());
        assert_eq!(
            (s.phase, s.nodes_ready, s.bytes_cached),
            (Phase::Pending, 0, 0)
        );
    }

    fn ck_pool(
        name: &str,
        age: i64,
        committed: Option<i64>,
        durable: Option<i64>,
        pending: i64,
        failed: bool,
    ) -> CachePool {
        let mut p = CachePool::new(name, CachePoolSpec::default());
        p.status = Some(CachePoolStatus {
            heartbeat_time: Some(Time(Timestamp::from_second(NOW - age).unwrap())),
            checkpoint_syncs: vec![CheckpointNodeStatus {
                namespace: "ml".into(),
                name: "ckpt".into(),
                uid: "c1".into(),
                latest_committed_step: committed,
                latest_durable_step: durable,
                pending_bytes: pending,
                failed,
                message: None,
            }],
            ..Default::default()
        });
        p
    }

    #[test]
    fn checkpoint_durable_step_is_the_minimum_over_nodes_holding_data() {
        let mut c = CheckpointSync::new("ckpt", CheckpointSyncSpec::default());
        c.metadata.uid = Some("c1".into());
        type Case = (
            &'static str,
            Vec<CachePool>,
            Option<i64>,
            Option<i64>,
            i64,
            Phase,
        );
        let cases: Vec<Case> = vec![
            (
                "one node",
                vec![ck_pool("a", 1, Some(300), Some(200), 5, false)],
                Some(300),
                Some(200),
                5,
                Phase::Ready,
            ),
            (
                "two holders: the slower bounds it",
                vec![
                    ck_pool("a", 1, Some(300), Some(300), 0, false),
                    ck_pool("b", 1, Some(300), Some(100), 7, false),
                ],
                Some(300),
                Some(100),
                7,
                Phase::Ready,
            ),
            (
                "a node without data does not hold it back",
                vec![
                    ck_pool("a", 1, Some(300), Some(300), 0, false),
                    ck_pool("b", 1, None, None, 0, false),
                ],
                Some(300),
                Some(300),
                0,
                Phase::Ready,
            ),
            (
                "a holder with nothing durable yet",
                vec![
                    ck_pool("a", 1, Some(300), Some(300), 0, false),
                    ck_pool("b", 1, Some(100), None, 9, false),
                ],
                Some(300),
                None,
                9,
                Phase::Ready,
            ),
            (
                "upload failing on one node",
                vec![
                    ck_pool("a", 1, Some(300), Some(300), 0, false),
                    ck_pool("b", 1, Some(300), Some(200), 9, true),
                ],
                Some(300),
                Some(200),
                9,
                Phase::Degraded,
            ),
            (
                "stale node",
                vec![ck_pool("a", 999, Some(300), Some(300), 0, false)],
                Some(300),
                Some(300),
                0,
                Phase::Pending,
            ),
        ];
        for (name, pools, committed, durable, pending, phase) in cases {
            let refs: Vec<_> = pools.iter().collect();
            let s = checkpoint_status(&c, &refs, &clock());
            assert_eq!(
                (
                    s.latest_committed_step,
                    s.latest_durable_step,
                    s.pending_bytes,
                    s.phase
                ),
                (committed, durable, pending, phase),
                "{name}"
            );
        }
    }
}
