//! [`Reconciled`] for the two kinds: which pools they go to and how status is planned.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use tidepool_api::{
    CachePool, CheckpointSync, CheckpointSyncStatus, DatasetCache, DatasetCacheStatus, Phase,
};

use std::sync::Arc;

use kube::ResourceExt;

use super::Reconciled;
use crate::plan::{
    pool::{Observed, checkpoint_nodes, dataset_nodes},
    status::{Clock, checkpoint_status, dataset_status},
};

impl Reconciled for DatasetCache {
    type Status = DatasetCacheStatus;
    fn assigned_pools<'a>(&self, observed: &Observed<'a>) -> Vec<&'a CachePool> {
        dataset_nodes(self, observed)
    }
    fn plan_status(&self, pools: &[&CachePool], clock: &Clock) -> Self::Status {
        dataset_status(self, pools, clock)
    }
    fn current_status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn phase(status: &Self::Status) -> Phase {
        status.phase
    }
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition> {
        &mut status.conditions
    }
    fn set_phase(status: &mut Self::Status, phase: Phase) {
        status.phase = phase;
    }
    fn put_into(&self, datasets: &mut Vec<Arc<DatasetCache>>, _: &mut Vec<Arc<CheckpointSync>>) {
        put(self, datasets);
    }
    fn named_in(pool: &CachePool) -> Vec<(String, String)> {
        let assigned = pool
            .spec
            .datasets
            .iter()
            .map(|a| (&a.owner.namespace, &a.owner.name));
        let reported = pool
            .status
            .iter()
            .flat_map(|s| &s.datasets)
            .map(|d| (&d.namespace, &d.name));
        assigned
            .chain(reported)
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect()
    }
}

impl Reconciled for CheckpointSync {
    type Status = CheckpointSyncStatus;
    fn assigned_pools<'a>(&self, observed: &Observed<'a>) -> Vec<&'a CachePool> {
        checkpoint_nodes(observed)
    }
    fn plan_status(&self, pools: &[&CachePool], clock: &Clock) -> Self::Status {
        checkpoint_status(self, pools, clock)
    }
    fn current_status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn phase(status: &Self::Status) -> Phase {
        status.phase
    }
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition> {
        &mut status.conditions
    }
    fn set_phase(status: &mut Self::Status, phase: Phase) {
        status.phase = phase;
    }
    fn put_into(&self, _: &mut Vec<Arc<DatasetCache>>, checkpoints: &mut Vec<Arc<CheckpointSync>>) {
        put(self, checkpoints);
    }
    fn waits_before_release(&self, pools: &[&CachePool]) -> Option<String> {
        crate::plan::status::uploads_pending(self, pools)
    }
    fn named_in(pool: &CachePool) -> Vec<(String, String)> {
        let assigned = pool
            .spec
            .checkpoint_syncs
            .iter()
            .map(|a| (&a.owner.namespace, &a.owner.name));
        let reported = pool
            .status
            .iter()
            .flat_map(|s| &s.checkpoint_syncs)
            .map(|c| (&c.namespace, &c.name));
        assigned
            .chain(reported)
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect()
    }
}

/// Puts `obj` into `all`: added if absent, replacing the copy there if `obj` is newer.
/// resourceVersions are opaque, but etcd's are increasing integers; one that does not
/// parse leaves the copy in `all` (the stores' own view) in place.
fn put<K: kube::Resource + Clone>(obj: &K, all: &mut Vec<Arc<K>>) {
    let rv = |o: &K| o.resource_version().and_then(|v| v.parse::<u64>().ok());
    match all.iter_mut().find(|o| o.uid() == obj.uid()) {
        Some(there) => {
            if let (Some(new), Some(old)) = (rv(obj), rv(there))
                && new > old
            {
                *there = Arc::new(obj.clone());
            }
        }
        None => all.push(Arc::new(obj.clone())),
    }
}
