//! [`Reconciled`] for the two kinds: which pools they go to and how status is planned.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use tidepool_api::{
    CachePool, CheckpointSync, CheckpointSyncStatus, DatasetCache, DatasetCacheStatus, Phase,
};

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
}
