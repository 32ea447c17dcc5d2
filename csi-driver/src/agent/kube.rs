//! The agent's side of the API server: its node's `CachePool`.
//!
//! - The pool is created when missing (named after the node, owned by the Node so it
//!   goes with it) and watched; its spec is the operator's, never written here.
//! - Each dataset assignment is opened with its credentials (a Secret in the owner's
//!   namespace, a workload identity token requested for the named service account, the
//!   node's managed identity, or none), prewarmed and refreshed per policy.
//! - Each checkpoint sync assignment has its destination's credentials resolved the
//!   same way and its commit rule and retention converted ([`checkpoints`]); the
//!   agent's resolvers hand both to the volume served for it (found by owner uid).
//! - Status is written with server-side apply under [`FIELD_MANAGER`], on a heartbeat
//!   (every `heartbeat`, at most 30 s) and when anything changes; it owns only the
//!   status, so it never conflicts with the operator's spec writes. A checkpoint sync's
//!   entry is read from its volume's files on each heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use parking_lot::Mutex;
use tidepool_api::cache_pool::{
    CachePool, CachePoolSpec, CachePoolStatus, CheckpointAssignment, CheckpointNodeStatus,
    DatasetAssignment, DatasetNodeStatus, NodeDatasetPhase,
};
use tidepool_api::conditions::{self, ConditionUpdate, READY};
use tidepool_api::dataset_cache::PrefetchPolicy;
use tidepool_api::lake::LakeCredentials;
use tidepool_api::volume::{VolumeAttributes, VolumeKind};

use super::protocol::StageSecrets;
use super::{Agent, AgentError, checkpoints, credentials_from_secret, datasets};
use crate::durable::{private_dir, write_atomic_private};
use crate::lake::credentials::WorkloadIdentity;
use crate::lake::{Credentials, LakeUrl};

/// The field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "tidepool-agent";
/// Condition type: the pool's disk is above its high watermark.
pub const DISK_PRESSURE: &str = "DiskPressure";
/// Audience of tokens exchanged for Entra ID tokens (workload identity).
const TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";

/// An assignment as this node acts on it.
#[derive(Clone)]
struct Assigned {
    assignment: DatasetAssignment,
    credentials: Option<Credentials>,
    error: Option<String>,
    served: Option<Arc<datasets::Served>>,
}

/// The agent's view of its pool.
pub struct PoolSync {
    agent: Arc<Agent>,
    client: Client,
    assigned: Mutex<HashMap<String, Assigned>>,
    /// Checkpoint sync assignments, by owner uid.
    checkpoints: Mutex<HashMap<String, checkpoints::Assigned>>,
    generation: Mutex<Option<i64>>,
    changed: tokio::sync::Notify,
    /// Workload identity token files with a renewal task running (one task per file,
    /// however often the credentials are resolved).
    renewing: Mutex<std::collections::HashSet<std::path::PathBuf>>,
}

/// Whether an assignment's destination URL is the one a volume records (the volume
/// records it as [`LakeUrl`] spells it).
fn same_destination(assigned: &str, recorded: &str) -> bool {
    LakeUrl::parse(assigned).is_ok_and(|u| u.to_string() == recorded)
}

impl PoolSync {
    pub fn new(agent: Arc<Agent>, client: Client) -> Arc<Self> {
        let sync = Arc::new(PoolSync {
            agent: agent.clone(),
            client,
            assigned: Mutex::new(HashMap::new()),
            checkpoints: Mutex::new(HashMap::new()),
            generation: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            renewing: Mutex::new(std::collections::HashSet::new()),
        });
        // Volumes staged without secrets use their assignment's credentials.
        let weak = Arc::downgrade(&sync);
        *agent.assignment_credentials.lock() = Some(Arc::new(move |attrs: &VolumeAttributes| {
            let sync = weak.upgrade()?;
            match attrs.kind {
                VolumeKind::DatasetCache => sync
                    .assigned
                    .lock()
                    .get(&attrs.uid)
                    .and_then(|a| a.credentials.clone()),
                VolumeKind::CheckpointSync => sync
                    .checkpoints
                    .lock()
                    .get(&attrs.uid)
                    .and_then(|a| a.credentials.clone().ok()),
            }
        }));
        // Checkpoint volumes' syncs take credentials and settings from the assignment
        // that writes to their destination, whether or not a pod mounts them.
        let weak = Arc::downgrade(&sync);
        *agent.destination_credentials.lock() = Some(Arc::new(move |url: &str| {
            let sync = weak.upgrade()?;
            let checkpoints = sync.checkpoints.lock();
            checkpoints
                .values()
                .find(|a| same_destination(&a.assignment.destination.url, url))
                .map(|a| a.credentials.clone())
        }));
        let weak = Arc::downgrade(&sync);
        *agent.destination_settings.lock() = Some(Arc::new(move |url: &str| {
            let sync = weak.upgrade()?;
            let checkpoints = sync.checkpoints.lock();
            checkpoints
                .values()
                .find(|a| same_destination(&a.assignment.destination.url, url))
                .and_then(|a| a.settings.clone().ok())
        }));
        // Checkpoint volumes commit and keep steps as their assignment says.
        let weak = Arc::downgrade(&sync);
        *agent.checkpoint_settings.lock() = Some(Arc::new(move |attrs: &VolumeAttributes| {
            if attrs.kind != VolumeKind::CheckpointSync {
                return None;
            }
            weak.upgrade()?
                .checkpoints
                .lock()
                .get(&attrs.uid)
                .and_then(|a| a.settings.clone().ok())
        }));
        sync
    }

    /// Creates the node's pool if it does not exist (owned by the Node).
    pub async fn ensure_pool(&self) -> Result<(), kube::Error> {
        let node_name = &self.agent.config.node_name;
        let pools: Api<CachePool> = Api::all(self.client.clone());
        if pools.get_opt(node_name).await?.is_some() {
            return Ok(());
        }
        let node = Api::<Node>::all(self.client.clone()).get(node_name).await?;
        let pool = CachePool {
            metadata: ObjectMeta {
                name: Some(node_name.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node_name.clone(),
                    uid: node.uid().unwrap_or_default(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: CachePoolSpec::default(),
            status: None,
        };
        match pools.create(&PostParams::default(), &pool).await {
            Ok(_) => {
                tracing::info!(pool = %node_name, "created this node's CachePool");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Watches the pool and acts on its assignments until the stream ends.
    pub async fn watch(self: &Arc<Self>) {
        let pools: Api<CachePool> = Api::all(self.client.clone());
        let cfg = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.agent.config.node_name));
        let mut stream = watcher::watcher(pools, cfg).boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(pool)) | Ok(watcher::Event::InitApply(pool)) => {
                    *self.generation.lock() = pool.metadata.generation;
                    self.reconcile(&pool.spec).await;
                }
                Ok(watcher::Event::Delete(_)) => {
                    tracing::warn!("this node's CachePool was deleted; creating it again");
                    if let Err(e) = self.ensure_pool().await {
                        tracing::warn!(error = %e, "cannot create the CachePool");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "watching the CachePool failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Makes the datasets served and the checkpoint syncs known match the assignments.
    pub async fn reconcile(&self, spec: &CachePoolSpec) {
        self.reconcile_checkpoints(&spec.checkpoint_syncs).await;
        let assigned: std::collections::HashSet<String> = spec
            .checkpoint_syncs
            .iter()
            .filter_map(|a| LakeUrl::parse(&a.destination.url).ok())
            .map(|u| u.to_string())
            .collect();
        self.agent.remove_unassigned_checkpoints(&assigned);
        let wanted: HashMap<String, DatasetAssignment> = spec
            .datasets
            .iter()
            .map(|a| (a.owner.uid.clone(), a.clone()))
            .collect();
        // Gone: forget them (their data stays, evictable; a mounted volume keeps its
        // dataset open through the volume).
        let gone: Vec<Assigned> = {
            let mut assigned = self.assigned.lock();
            let gone: Vec<String> = assigned
                .keys()
                .filter(|uid| !wanted.contains_key(*uid))
                .cloned()
                .collect();
            gone.into_iter()
                .filter_map(|u| assigned.remove(&u))
                .collect()
        };
        for a in gone {
            tracing::info!(dataset = %a.assignment.source.url, owner = %a.assignment.owner.name, "assignment removed");
            if let Ok(url) = LakeUrl::parse(&a.assignment.source.url)
                && !self.still_wanted(&url, &wanted)
            {
                if let Some(s) = &a.served {
                    s.set_pinned(false);
                }
                self.agent.registry.close(&url);
            }
        }
        for (uid, assignment) in wanted {
            let unchanged = self
                .assigned
                .lock()
                .get(&uid)
                .is_some_and(|a| a.assignment == assignment && a.error.is_none());
            if unchanged {
                continue;
            }
            let result = self.open(&assignment).await;
            let entry = match result {
                Ok((creds, served)) => {
                    datasets::apply_policies(
                        &served,
                        &assignment.prefetch,
                        &assignment.refresh,
                        assignment.pinned,
                    );
                    Assigned {
                        assignment,
                        credentials: Some(creds),
                        error: None,
                        served: Some(served),
                    }
                }
                Err(e) => {
                    tracing::warn!(dataset = %assignment.source.url, owner = %assignment.owner.name, error = %e, "cannot serve the assigned dataset");
                    Assigned {
                        assignment,
                        credentials: None,
                        error: Some(e.to_string()),
                        served: None,
                    }
                }
            };
            self.assigned.lock().insert(uid, entry);
        }
        self.changed.notify_one();
    }

    /// Takes the checkpoint sync assignments: new or changed ones, and ones whose
    /// credentials could not be resolved, have them resolved (again); gone ones are
    /// forgotten (their volume's files stay, owned by the volume).
    async fn reconcile_checkpoints(&self, wanted: &[CheckpointAssignment]) {
        self.checkpoints
            .lock()
            .retain(|uid, _| wanted.iter().any(|a| &a.owner.uid == uid));
        for assignment in wanted {
            let unchanged = self
                .checkpoints
                .lock()
                .get(&assignment.owner.uid)
                .is_some_and(|a| &a.assignment == assignment && a.credentials.is_ok());
            if unchanged {
                continue;
            }
            // A destination this node may not open gets no credentials resolved at all.
            let allowed = LakeUrl::parse(&assignment.destination.url)
                .map_err(|e| AgentError::BadRequest(e.to_string()))
                .and_then(|u| self.agent.config.lake.allowed(&u));
            let credentials = match allowed {
                Err(e) => Err(e.to_string()),
                Ok(()) => self
                    .credentials(
                        &assignment.owner.namespace,
                        assignment.destination.credentials.as_ref(),
                    )
                    .await
                    .map_err(|e| e.to_string()),
            };
            let entry = checkpoints::Assigned::new(assignment.clone(), credentials);
            if let Err(e) = &entry.credentials {
                tracing::warn!(destination = %assignment.destination.url, owner = %assignment.owner.name, error = %e, "cannot resolve the checkpoint destination's credentials");
            }
            if let Err(e) = &entry.settings {
                tracing::warn!(owner = %assignment.owner.name, error = %e, "the checkpoint sync's settings cannot be read; its volume uses the defaults");
            }
            self.checkpoints
                .lock()
                .insert(assignment.owner.uid.clone(), entry);
        }
    }

    fn still_wanted(&self, url: &LakeUrl, wanted: &HashMap<String, DatasetAssignment>) -> bool {
        let s = url.to_string();
        wanted
            .values()
            .any(|a| LakeUrl::parse(&a.source.url).is_ok_and(|u| u.to_string() == s))
    }

    async fn open(
        &self,
        a: &DatasetAssignment,
    ) -> Result<(Credentials, Arc<datasets::Served>), AgentError> {
        let url =
            LakeUrl::parse(&a.source.url).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        self.agent.config.lake.allowed(&url)?;
        let creds = self
            .credentials(&a.owner.namespace, a.source.credentials.as_ref())
            .await?;
        let served = self
            .agent
            .registry
            .open(&self.agent.pool, &url, &creds, &self.agent.config.lake)
            .await?;
        Ok((creds, served))
    }

    /// The credentials of a lake location, resolved in `namespace`.
    async fn credentials(
        &self,
        namespace: &str,
        c: Option<&LakeCredentials>,
    ) -> Result<Credentials, AgentError> {
        let Some(c) = c else {
            return Ok(Credentials::Anonymous);
        };
        if let Some(s) = &c.secret_ref {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let secret = api.get_opt(&s.name).await.map_err(|e| {
                AgentError::Credentials(format!("reading Secret {namespace}/{}: {e}", s.name))
            })?;
            let Some(secret) = secret else {
                return Err(AgentError::Credentials(format!(
                    "Secret {namespace}/{} not found; create it with key sasToken (a SAS token) or accountKey",
                    s.name
                )));
            };
            let data: BTreeMap<String, String> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            return credentials_from_secret(&StageSecrets(data)).map_err(|e| {
                AgentError::Credentials(format!("Secret {namespace}/{}: {e}", s.name))
            });
        }
        if let Some(wi) = &c.workload_identity {
            let file = self.token_file(namespace, &wi.service_account_name).await?;
            return Ok(Credentials::WorkloadIdentity(WorkloadIdentity {
                token_file: file,
                client_id: wi.client_id.clone(),
                tenant_id: wi.tenant_id.clone(),
                authority_host: None,
            }));
        }
        if let Some(mi) = &c.managed_identity {
            if !self.agent.config.managed_identity_allowed(namespace) {
                return Err(AgentError::Credentials(format!(
                    "managed identity is not enabled for namespace {namespace}: the node's identity serves only the namespaces an administrator lists (tidepool agent --managed-identity-namespace, the chart's node.lake.managedIdentityNamespaces); use credentials.secretRef or credentials.workloadIdentity"
                )));
            }
            return Ok(Credentials::ManagedIdentity {
                client_id: mi.client_id.clone(),
            });
        }
        Ok(Credentials::Anonymous)
    }

    /// Requests a token of `namespace/sa` for the Entra ID exchange and keeps it fresh
    /// in a file that the lake client re-reads: 0600 from its first byte, every renewal
    /// too, in a directory only root may open (0700).
    async fn token_file(
        &self,
        namespace: &str,
        sa: &str,
    ) -> Result<std::path::PathBuf, AgentError> {
        let dir = self.agent.pool.root().join("tokens");
        private_dir(&dir).map_err(|e| AgentError::Internal(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{namespace}.{sa}.jwt"));
        let write = |token: &str| -> Result<(), AgentError> {
            write_atomic_private(&path, token.as_bytes())
                .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))
        };
        let request = || {
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
            let sa = sa.to_owned();
            async move {
                let tr = TokenRequest {
                    metadata: ObjectMeta::default(),
                    spec: TokenRequestSpec {
                        audiences: vec![TOKEN_AUDIENCE.to_owned()],
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    status: None,
                };
                api.create_token_request(&sa, &PostParams::default(), &tr)
                    .await
                    .map(|t| t.status.map(|s| s.token).unwrap_or_default())
            }
        };
        let token = request().await.map_err(|e| {
            AgentError::Credentials(format!(
                "requesting a workload identity token for service account {namespace}/{sa}: {e}"
            ))
        })?;
        write(&token)?;
        if !self.renewing.lock().insert(path.clone()) {
            return Ok(path);
        }
        // Renewed every 30 minutes for the hour-long tokens.
        let api_path = path.clone();
        let client = self.client.clone();
        let (ns, sa_name) = (namespace.to_owned(), sa.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1800)).await;
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
                let tr = TokenRequest {
                    metadata: ObjectMeta::default(),
                    spec: TokenRequestSpec {
                        audiences: vec![TOKEN_AUDIENCE.to_owned()],
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    status: None,
                };
                match api
                    .create_token_request(&sa_name, &PostParams::default(), &tr)
                    .await
                {
                    Ok(t) => {
                        let token = t.status.map(|s| s.token).unwrap_or_default();
                        if write_atomic_private(&api_path, token.as_bytes()).is_err() {
                            tracing::warn!(path = %api_path.display(), "cannot write the renewed token");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing a workload identity token failed")
                    }
                }
            }
        });
        Ok(path)
    }

    /// The pool status as it is now.
    pub fn status(&self) -> CachePoolStatus {
        let pool = &self.agent.pool;
        let cfg = pool.config();
        // Cache files and checkpoint volumes: both live on the pool's disk.
        let used = pool.used() + pool.external();
        let assigned: Vec<Assigned> = self.assigned.lock().values().cloned().collect();
        let mut datasets: Vec<DatasetNodeStatus> = assigned
            .iter()
            .map(|a| {
                let owner = &a.assignment.owner;
                let mut s = DatasetNodeStatus {
                    namespace: owner.namespace.clone(),
                    name: owner.name.clone(),
                    uid: owner.uid.clone(),
                    ..Default::default()
                };
                match (&a.served, &a.error) {
                    (None, Some(e)) => {
                        s.phase = NodeDatasetPhase::Failed;
                        s.message = Some(e.clone());
                    }
                    (None, None) => s.phase = NodeDatasetPhase::Listing,
                    (Some(served), _) => {
                        let p = served.progress.lock().clone();
                        s.snapshot = p.snapshot.map(|n| n.to_string());
                        s.objects = p.objects as i64;
                        s.bytes_total = p.bytes_total as i64;
                        s.bytes_cached = p.bytes_cached as i64;
                        let (lake, peers) = pool.dataset_bytes(served.dataset.id());
                        s.bytes_from_lake = lake as i64;
                        s.bytes_from_peers = peers as i64;
                        s.message = p.error.clone();
                        let eager = a.assignment.prefetch.policy == PrefetchPolicy::Eager;
                        s.phase = if !p.listed {
                            NodeDatasetPhase::Listing
                        } else if !eager || p.warmed {
                            NodeDatasetPhase::Ready
                        } else if p.error.is_some() && !p.warming {
                            NodeDatasetPhase::Failed
                        } else {
                            NodeDatasetPhase::Warming
                        };
                    }
                }
                s
            })
            .collect();
        datasets.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let checkpoint_assigned: Vec<checkpoints::Assigned> =
            self.checkpoints.lock().values().cloned().collect();
        let mut checkpoint_syncs: Vec<CheckpointNodeStatus> = checkpoint_assigned
            .iter()
            .map(|a| checkpoints::node_status(a, &cfg.dir))
            .collect();
        checkpoint_syncs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let now = Timestamp::now();
        let mut conds = Vec::new();
        let generation = *self.generation.lock();
        conditions::set(
            &mut conds,
            ConditionUpdate {
                type_: READY,
                status: true,
                reason: "Serving",
                message: format!(
                    "agent on node {} serves this pool",
                    self.agent.config.node_name
                ),
            },
            generation,
            now,
        );
        let pressure = used as f64 > cfg.capacity as f64 * cfg.high_watermark;
        conditions::set(
            &mut conds,
            ConditionUpdate {
                type_: DISK_PRESSURE,
                status: pressure,
                reason: if pressure {
                    "AboveHighWatermark"
                } else {
                    "BelowHighWatermark"
                },
                message: format!("{used} of {} bytes used", cfg.capacity),
            },
            generation,
            now,
        );
        CachePoolStatus {
            observed_generation: generation,
            capacity_bytes: cfg.capacity as i64,
            used_bytes: used as i64,
            heartbeat_time: Some(Time(now)),
            dataset_count: datasets.len() as i32,
            datasets,
            checkpoint_syncs,
            conditions: conds,
            peer: self.agent.peers.get().map(|p| p.status(&self.agent)),
        }
    }

    /// Writes status now and then every `heartbeat` (and soon after any change).
    pub async fn report(self: &Arc<Self>, heartbeat: Duration) {
        let pools: Api<CachePool> = Api::all(self.client.clone());
        let mut last_conditions: Vec<(String, String)> = Vec::new();
        loop {
            for a in self.assigned.lock().values() {
                if let Some(s) = &a.served {
                    s.refresh_counts(false);
                }
            }
            let mut status = self.status();
            // Keep transition times stable: a condition keeps its time while it holds.
            let now_conds: Vec<(String, String)> = status
                .conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect();
            if now_conds == last_conditions
                && let Ok(Some(p)) = pools.get_opt(&self.agent.config.node_name).await
                && let Some(old) = p.status
            {
                for c in &mut status.conditions {
                    if let Some(o) = old.conditions.iter().find(|o| o.type_ == c.type_) {
                        c.last_transition_time = o.last_transition_time.clone();
                    }
                }
            }
            last_conditions = now_conds;
            let body = serde_json::json!({
                "apiVersion": "tidepool.dev/v1alpha1",
                "kind": "CachePool",
                "status": status,
            });
            match pools
                .patch_status(
                    &self.agent.config.node_name,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    if let (Some(p), Some(s)) = (self.agent.peers.get(), &status.peer) {
                        p.peers.published(&s.datasets);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "writing the CachePool status failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(heartbeat) => {}
                _ = self.changed.notified() => {
                    // Let a burst of changes settle into one write.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// Runs the agent's API-server side until it fails to start.
pub async fn run(
    agent: Arc<Agent>,
    client: Client,
    heartbeat: Duration,
) -> Result<(), kube::Error> {
    let members = agent.peers.get().map(|p| {
        tokio::spawn(super::peers::follow_members(
            p.peers.clone(),
            client.clone(),
        ))
    });
    let sync = PoolSync::new(agent, client);
    sync.ensure_pool().await?;
    let reporter = {
        let s = sync.clone();
        tokio::spawn(async move { s.report(heartbeat).await })
    };
    // Progress (prewarm bytes) moves without events: report it on the heartbeat.
    sync.watch().await;
    reporter.abort();
    if let Some(m) = members {
        m.abort();
    }
    Ok(())
}
