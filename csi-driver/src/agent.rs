//! The node agent (`tidepool agent`): owns the node's cache pool and serves every
//! Tidepool volume of the node from it (one copy of each blob, one page cache).
//!
//! - **Volumes** come from the CSI plugin over the agent socket ([`protocol`]): the
//!   plugin mounts FUSE at the staging path and hands over the /dev/fuse descriptor;
//!   the agent serves it with a [`DatasetFs`]. The plugin keeps a duplicate of every
//!   descriptor, so a connection outlives an agent restart; the restarted agent gets
//!   the descriptors again and resumes each session from the parameters it saved at
//!   INIT (`v1/volumes/<id>.json`; see `fuse/session.rs` for how a live connection is
//!   taken over). File handles and inode numbers derive from persistent state, so the
//!   kernel's open files stay valid across the restart.
//! - **Assignments** come from the node's `CachePool` (when the agent talks to the API
//!   server, `kube.rs`): each dataset assigned is snapshotted, prewarmed per policy,
//!   refreshed per policy, and reported in the pool's status.
//! - **Failures stay local**: a missing Secret, a bad URL, an unreachable lake or a full
//!   disk fails that volume's call (with the matching code) or that assignment's
//!   status (in words); every other volume keeps being served.

pub mod admin;
pub mod checkpoints;
pub mod datasets;
pub mod kube;
pub mod peers;
pub mod protocol;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tidepool_api::volume::{VolumeAttributes, VolumeKind};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cache::{CacheError, CachePool};
use crate::checkpoint::store::{Store, VolumeConfig, VolumeLayout};
use crate::checkpoint::tree::{CheckpointTree, LakeSteps, OpenWriters, TreeConfig};
use crate::fs::{DatasetFs, FsConfig, MountStats, SnapshotReleaser};
use crate::fuse::{ConnParams, Device, Session, SessionConfig};
use crate::lake::{Credentials, LakeError, LakeUrl, Secret};
use datasets::{LakeSettings, Registry};
use protocol::{ErrorCode, Request, Response, StageSecrets, VolumeStats};

/// Settings of a node agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// Where the CSI plugin connects (`<cache-dir>/agent.sock` by default).
    pub socket: PathBuf,
    pub lake: LakeSettings,
    /// FUSE worker threads per volume.
    pub fuse_threads: usize,
    pub passthrough: bool,
    /// Namespaces whose DatasetCaches and CheckpointSyncs may use this node's managed
    /// identity (`--managed-identity-namespace`; `*`: every namespace). Elsewhere
    /// `credentials.managedIdentity` is refused: the node's identity is the platform's,
    /// and may reach lakes that no tenant's own credentials do.
    pub managed_identity_namespaces: Vec<String>,
}

impl AgentConfig {
    /// Whether objects in `namespace` may use the node's managed identity.
    pub fn managed_identity_allowed(&self, namespace: &str) -> bool {
        self.managed_identity_namespaces
            .iter()
            .any(|n| n == "*" || n == namespace)
    }
}

/// Why a volume or an assignment cannot be served; each maps to one CSI code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Lake(LakeError),
    #[error("the cache disk is full: {0}")]
    DiskFull(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn from_cache(e: CacheError) -> Self {
        match e {
            CacheError::Lake(l) => AgentError::Lake(l),
            CacheError::Snapshot(crate::cache::snapshot::SnapshotError::Lake(l)) => {
                AgentError::Lake(l)
            }
            CacheError::Io { ref cause, .. } if cause.raw_os_error() == Some(libc::ENOSPC) => {
                AgentError::DiskFull(e.to_string())
            }
            other => AgentError::Internal(other.to_string()),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::BadRequest(_) => ErrorCode::InvalidArgument,
            AgentError::Credentials(_) | AgentError::Unsupported(_) => {
                ErrorCode::FailedPrecondition
            }
            AgentError::NotFound(_) => ErrorCode::NotFound,
            AgentError::DiskFull(_) => ErrorCode::ResourceExhausted,
            AgentError::Internal(_) => ErrorCode::Internal,
            AgentError::Lake(l) => match l.root() {
                LakeError::Denied { .. } => ErrorCode::PermissionDenied,
                LakeError::NotFound { .. } => ErrorCode::NotFound,
                LakeError::Throttled { .. }
                | LakeError::Timeout { .. }
                | LakeError::Connection { .. }
                | LakeError::Truncated { .. } => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            },
        }
    }
}

/// Credentials from a Secret's data (`sasToken` or `accountKey`).
pub fn credentials_from_secret(data: &StageSecrets) -> Result<Credentials, AgentError> {
    if let Some(sas) = data.0.get("sasToken").filter(|s| !s.trim().is_empty()) {
        return Ok(Credentials::Sas(Secret::new(
            sas.trim().trim_start_matches('?').to_owned(),
        )));
    }
    if let Some(key) = data.0.get("accountKey").filter(|s| !s.trim().is_empty()) {
        return Ok(Credentials::AccountKey(Secret::new(key.trim().to_owned())));
    }
    let mut keys: Vec<&String> = data.0.keys().collect();
    keys.sort();
    Err(AgentError::Credentials(format!(
        "the Secret has neither key sasToken nor key accountKey (it has: {keys:?}); add one of them"
    )))
}

/// What a restarted agent needs to take a volume's connection over.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct SavedVolume {
    volume_id: String,
    staging_path: PathBuf,
    attributes: VolumeAttributes,
    params: ConnParams,
}

/// Finds the credentials of a volume from its pool assignment.
pub type CredentialResolver = Arc<dyn Fn(&VolumeAttributes) -> Option<Credentials> + Send + Sync>;

/// How a checkpoint volume commits and what it keeps, from its `CheckpointSync` (the
/// node's `CachePool` assignment). A volume staged before its assignment is known uses
/// the defaults (DCP and Orbax markers, keep everything) until it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointSettings {
    pub rule: crate::checkpoint::commit::CommitRule,
    pub keep_local: Option<u32>,
    pub keep_remote: Option<u32>,
    /// The nodes that write each step (`spec.commit.nodes`).
    pub nodes: Option<u32>,
    /// The `CheckpointSync`'s uid (recorded in the volume).
    pub owner_uid: Option<String>,
}

/// Finds the settings of a checkpoint volume (by its owner's uid) from the pool's
/// assignments.
pub type CheckpointSettingsResolver =
    Arc<dyn Fn(&VolumeAttributes) -> Option<CheckpointSettings> + Send + Sync>;

/// Finds the credentials of a checkpoint destination (by the URL `volume.json`
/// records) among the pool's assignments: `None` when none writes there, `Some(Err)`
/// when they cannot be resolved (said in words, never the secret).
pub type DestinationCredentialsResolver =
    Arc<dyn Fn(&str) -> Option<Result<Credentials, String>> + Send + Sync>;

/// Finds the settings of a checkpoint destination (by URL) among the pool's
/// assignments.
pub type DestinationSettingsResolver =
    Arc<dyn Fn(&str) -> Option<CheckpointSettings> + Send + Sync>;

/// What a volume serves.
enum Content {
    /// A dataset's snapshot, read-only, from the cache.
    Dataset(Arc<datasets::Served>),
    /// A read-write checkpoint tree in the pool.
    Checkpoint(ServedCheckpoint),
}

/// A checkpoint volume being served: its step tree and the commit ticker (the node's
/// `tidepool sync` sidecar uploads from its journal).
struct ServedCheckpoint {
    layout: VolumeLayout,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServedCheckpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        // Steps whose rule fired while stopping commit now.
        self.store.tick();
    }
}

impl Content {
    fn detach(&self, volume_id: &str) {
        if let Content::Dataset(served) = self {
            served.detach(volume_id);
        }
    }
}

/// A volume being served.
struct Volume {
    attributes: VolumeAttributes,
    content: Content,
    session: Session,
    /// Our duplicate of the connection's descriptor (handed back to a restarted plugin).
    fd: OwnedFd,
    stats: Arc<MountStats>,
    /// The stage secrets it was served with (memory only; never written to disk).
    secrets: StageSecrets,
}

/// The running agent.
pub struct Agent {
    pub config: AgentConfig,
    pub pool: CachePool,
    pub registry: Registry,
    rt: tokio::runtime::Handle,
    volumes: Mutex<HashMap<String, Volume>>,
    state_dir: PathBuf,
    /// Resolves the credentials of a volume without stage secrets (from its pool
    /// assignment); set when the agent talks to the API server.
    pub assignment_credentials: Mutex<Option<CredentialResolver>>,
    /// Resolves the commit rule and retention of a checkpoint volume from its pool
    /// assignment; set when the agent talks to the API server.
    pub checkpoint_settings: Mutex<Option<CheckpointSettingsResolver>>,
    /// Checkpoint destinations served since this agent started (by URL, as
    /// `volume.json` records it), with what their credentials come from: a volume's
    /// sync goes on after it is unstaged.
    destinations: Mutex<HashMap<String, (VolumeAttributes, StageSecrets)>>,
    /// The credentials of a checkpoint destination (by URL) from the pool's
    /// assignments; set when the agent talks to the API server.
    pub destination_credentials: Mutex<Option<DestinationCredentialsResolver>>,
    /// The settings of a checkpoint destination (by URL) from the pool's assignments.
    pub destination_settings: Mutex<Option<DestinationSettingsResolver>>,
    /// Sharing the cache with the cluster's other agents (`--peer-listen`).
    pub peers: std::sync::OnceLock<peers::AgentPeers>,
}

fn state_file(dir: &Path, volume_id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(volume_id.as_bytes());
    let name: String = h[..12].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{name}.json"))
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        pool: CachePool,
        rt: tokio::runtime::Handle,
    ) -> io::Result<Arc<Agent>> {
        let state_dir = pool.root().join("volumes");
        std::fs::create_dir_all(&state_dir)?;
        let agent = Arc::new(Agent {
            config,
            pool,
            registry: Registry::default(),
            rt,
            volumes: Mutex::new(HashMap::new()),
            state_dir,
            assignment_credentials: Mutex::new(None),
            checkpoint_settings: Mutex::new(None),
            destinations: Mutex::new(HashMap::new()),
            destination_credentials: Mutex::new(None),
            destination_settings: Mutex::new(None),
            peers: std::sync::OnceLock::new(),
        });
        agent.spawn_checkpoint_accounting();
        Ok(agent)
    }

    /// Every 10 s while the agent lives: the checkpoint volumes' bytes count against
    /// the pool's capacity (the cache evicts to make room for them; they are never
    /// evicted themselves).
    fn spawn_checkpoint_accounting(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("checkpoint-bytes".into())
            .spawn(move || {
                loop {
                    let Some(agent) = weak.upgrade() else { return };
                    let dir = agent.pool.config().dir.clone();
                    match crate::checkpoint::store::checkpoint_bytes(&dir) {
                        Ok(n) => agent.pool.set_external(n),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot count the checkpoint volumes' bytes")
                        }
                    }
                    drop(agent);
                    std::thread::sleep(Duration::from_secs(10));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start counting the checkpoint volumes' bytes");
        }
    }

    /// Volumes served now.
    pub fn served(&self) -> Vec<String> {
        let mut v: Vec<String> = self.volumes.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn credentials_for(
        &self,
        attrs: &VolumeAttributes,
        secrets: &StageSecrets,
    ) -> Result<Credentials, AgentError> {
        if !secrets.0.is_empty() {
            return credentials_from_secret(secrets);
        }
        let resolver = self.assignment_credentials.lock().clone();
        Ok(resolver
            .and_then(|r| r(attrs))
            .unwrap_or(Credentials::Anonymous))
    }

    /// Serves the connection `fd` as volume `volume_id` (see [`Request::Serve`]).
    pub fn serve(
        self: &Arc<Self>,
        volume_id: &str,
        staging_path: &Path,
        attributes: VolumeAttributes,
        secrets: &StageSecrets,
        fresh: bool,
        fd: OwnedFd,
    ) -> Result<(), AgentError> {
        let live = self
            .volumes
            .lock()
            .get(volume_id)
            .filter(|v| !v.session.is_finished())
            .map(|v| v.attributes.kind);
        match live {
            // The same connection handed again (a restarted plugin): already served.
            Some(_) if !fresh => return Ok(()),
            // A new connection while the old one lives: its staging mount was taken away
            // with files open on it (a lazy unmount), and the plugin mounted anew. The new
            // one must be served (answering OK without it left every request on the new
            // mount waiting forever). A dataset's old session goes on serving what is
            // open on it until that is closed. A checkpoint tree must have one server:
            // the old one gets a moment to end (its connection was just unmounted, so
            // it ends at once unless files are open on it), else the stage is refused,
            // to be retried (the plugin's recovery retries every few seconds: the wait
            // is short so as not to hold it up).
            Some(VolumeKind::CheckpointSync) => {
                let ended = (0..50).any(|_| {
                    std::thread::sleep(Duration::from_millis(20));
                    self.volumes
                        .lock()
                        .get(volume_id)
                        .is_none_or(|v| v.session.is_finished())
                });
                if !ended {
                    return Err(AgentError::Unsupported(format!(
                        "checkpoint volume {volume_id} is still served on its previous connection (its staging mount was taken away with files open on it); it can be staged again once they are closed"
                    )));
                }
            }
            Some(VolumeKind::DatasetCache) | None => {}
        }
        if attributes.kind == VolumeKind::CheckpointSync {
            // One commit store per journal: the volume's previous server (its connection
            // ended, the reaper has not dropped it yet) stops its commit ticker, and
            // makes its last commits, before a new store opens the journal. Dropped
            // outside the lock (it joins the ticker).
            let previous = self.volumes.lock().remove(volume_id);
            drop(previous);
        }
        let url =
            LakeUrl::parse(&attributes.url).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        // Before anything else, for both kinds: a checkpoint volume serves its local
        // tree without the lake, but its sync would send the credentials there.
        self.config.lake.allowed(&url)?;
        let saved_path = state_file(&self.state_dir, volume_id);
        let resume = if fresh {
            None
        } else {
            let saved: SavedVolume = std::fs::read(&saved_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    AgentError::Unsupported(format!(
                        "volume {volume_id} is mounted, but this agent has no record of its connection to take it over; unstage and stage it again"
                    ))
                })?;
            Some(saved.params)
        };
        let credentials = self.credentials_for(&attributes, secrets)?;
        if attributes.kind == VolumeKind::CheckpointSync {
            return self.serve_checkpoint(
                volume_id,
                staging_path,
                attributes,
                secrets,
                &url,
                resume,
                fd,
            );
        }
        let served = self.rt.block_on(self.registry.open(
            &self.pool,
            &url,
            &credentials,
            &self.config.lake,
        ))?;
        datasets::apply_policies_in(
            &self.rt,
            &served,
            &attributes.prefetch,
            &attributes.refresh,
            attributes.pinned,
        );
        let ttl = match attributes
            .refresh
            .interval
            .as_deref()
            .map(humantime::parse_duration)
        {
            Some(Ok(d)) => d.min(Duration::from_secs(60)),
            _ => Duration::from_secs(24 * 3600),
        };
        let stats = Arc::new(MountStats::default());
        let fs = DatasetFs::new(
            served.dataset.clone(),
            self.rt.clone(),
            FsConfig {
                ttl,
                passthrough: self.config.passthrough,
                uid: 0,
                gid: 0,
            },
            stats.clone(),
        );
        let dup = fd
            .try_clone()
            .map_err(|e| AgentError::Internal(format!("duplicating the FUSE descriptor: {e}")))?;
        let config = SessionConfig::read_only(self.config.fuse_threads, self.config.passthrough);
        let device = Device::new(fd);
        let session = match resume {
            Some(params) => Session::resume(device, Arc::new(fs), config, params),
            None => Session::start(device, Arc::new(fs), config),
        }
        .map_err(|e| AgentError::Internal(format!("starting the FUSE session: {e}")))?;
        self.record_session(volume_id, staging_path, &attributes, &session, resume)?;
        served.attach(
            volume_id,
            SnapshotReleaser::new(session.connection().clone()),
        );
        tracing::info!(volume = volume_id, dataset = %url, staging = %staging_path.display(), resumed = resume.is_some(), "serving volume");
        self.volumes.lock().insert(
            volume_id.to_owned(),
            Volume {
                attributes,
                content: Content::Dataset(served),
                session,
                fd: dup,
                stats,
                secrets: secrets.clone(),
            },
        );
        Ok(())
    }

    /// Where a session's parameters are recorded once the kernel initialised it.
    fn record_session(
        &self,
        volume_id: &str,
        staging_path: &Path,
        attributes: &VolumeAttributes,
        session: &Session,
        resume: Option<ConnParams>,
    ) -> Result<(), AgentError> {
        let params = match resume {
            Some(p) => p,
            None => session
                .wait_initialized(Duration::from_secs(30))
                .ok_or_else(|| {
                    AgentError::Internal(format!(
                        "the kernel did not initialise the FUSE connection of {} within 30 s",
                        staging_path.display()
                    ))
                })?,
        };
        let saved = SavedVolume {
            volume_id: volume_id.to_owned(),
            staging_path: staging_path.to_owned(),
            attributes: attributes.clone(),
            params,
        };
        let saved_path = state_file(&self.state_dir, volume_id);
        let tmp = saved_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serialisable"))
            .and_then(|()| std::fs::rename(&tmp, &saved_path))
            .map_err(|e| AgentError::Internal(format!("recording volume {volume_id}: {e}")))
    }

    /// The steps of a checkpoint destination that are durable in the lake but not on
    /// this node, shown read-only in its volume and fetched through the pool. Without
    /// credentials that open the lake the volume still serves its local steps (said in
    /// a warning).
    fn lake_steps(
        &self,
        url: &LakeUrl,
        attributes: &VolumeAttributes,
        secrets: &StageSecrets,
    ) -> Option<LakeSteps> {
        let opened = self
            .credentials_for(attributes, secrets)
            .and_then(|c| self.config.lake.connect(url, &c));
        match opened {
            Ok(lake) => Some(LakeSteps::new(
                lake,
                url,
                self.pool.clone(),
                self.rt.clone(),
            )),
            Err(e) => {
                tracing::warn!(%url, error = %e, "cannot open the lake: steps durable only in the lake are not shown in this checkpoint volume");
                None
            }
        }
    }

    /// Serves a `CheckpointSync` volume: a read-write tree in the pool
    /// (`<pool>/checkpoints/<destination>/tree`), its commit rules, and the journal the
    /// node's `tidepool sync` uploads from. The tree records its node ids and open files
    /// so that a restarted agent takes the connection over (see `checkpoint/tree/resume.rs`).
    #[allow(clippy::too_many_arguments)]
    fn serve_checkpoint(
        &self,
        volume_id: &str,
        staging_path: &Path,
        attributes: VolumeAttributes,
        secrets: &StageSecrets,
        url: &LakeUrl,
        resume: Option<ConnParams>,
        fd: OwnedFd,
    ) -> Result<(), AgentError> {
        let layout = VolumeLayout::for_url(&self.pool.config().dir, &url.to_string());
        // One tree, one journal: a second volume for the same destination on this node
        // would commit and upload the same steps twice.
        if let Some((other, _)) = self.volumes.lock().iter().find(|(id, v)| {
            id.as_str() != volume_id
                && !v.session.is_finished()
                && matches!(&v.content, Content::Checkpoint(c) if c.layout.dir == layout.dir)
        }) {
            return Err(AgentError::Unsupported(format!(
                "volume {other} already serves checkpoints for {url} on this node; two CheckpointSyncs with one destination cannot run on one node (give each its own destination prefix)"
            )));
        }
        let settings = self
            .checkpoint_settings
            .lock()
            .clone()
            .and_then(|r| r(&attributes))
            .unwrap_or_default();
        layout
            .create(&VolumeConfig {
                url: url.to_string(),
                node: self.config.node_name.clone(),
                keep_local: settings.keep_local,
                keep_remote: settings.keep_remote,
                nodes: settings.nodes,
                owner_uid: (attributes.kind == VolumeKind::CheckpointSync)
                    .then(|| attributes.uid.clone())
                    .filter(|u| !u.is_empty()),
            })
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => {
                    AgentError::DiskFull(format!("preparing {}: {e}", layout.dir.display()))
                }
                _ => AgentError::Internal(format!("preparing {}: {e}", layout.dir.display())),
            })?;
        let store =
            Arc::new(Store::open(layout.clone(), settings.rule).map_err(|e| {
                AgentError::Internal(format!("opening {}: {e}", layout.dir.display()))
            })?);
        let tree = Arc::new(
            CheckpointTree::new(
                &layout.tree(),
                TreeConfig {
                    state: Some(layout.dir.join("fuse-state")),
                    resume: resume.is_some(),
                    lake: self.lake_steps(url, &attributes, secrets),
                    ..TreeConfig::default()
                },
                store.clone(),
            )
            .map_err(|e| {
                AgentError::Internal(format!("opening {}: {e}", layout.tree().display()))
            })?,
        );
        store.attach(Arc::downgrade(&tree) as std::sync::Weak<dyn OpenWriters>);
        let dup = fd
            .try_clone()
            .map_err(|e| AgentError::Internal(format!("duplicating the FUSE descriptor: {e}")))?;
        let config = SessionConfig::read_write(self.config.fuse_threads, self.config.passthrough);
        let device = Device::new(fd);
        let stats = Arc::new(MountStats::default());
        let session = match resume {
            Some(params) => Session::resume(device, tree, config, params),
            None => Session::start(device, tree, config),
        }
        .map_err(|e| AgentError::Internal(format!("starting the FUSE session: {e}")))?;
        self.record_session(volume_id, staging_path, &attributes, &session, resume)?;
        self.destinations
            .lock()
            .insert(url.to_string(), (attributes.clone(), secrets.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = store.spawn_ticker(Duration::from_millis(200), stop.clone());
        tracing::info!(volume = volume_id, destination = %url, staging = %staging_path.display(), resumed = resume.is_some(), "serving checkpoint volume");
        self.volumes.lock().insert(
            volume_id.to_owned(),
            Volume {
                attributes,
                content: Content::Checkpoint(ServedCheckpoint {
                    layout,
                    store,
                    stop,
                    ticker: Some(ticker),
                }),
                session,
                fd: dup,
                stats,
                secrets: secrets.clone(),
            },
        );
        Ok(())
    }

    /// Forgets volume `volume_id` (unstaged). Idempotent.
    pub fn release(&self, volume_id: &str) {
        if let Some(v) = self.volumes.lock().remove(volume_id) {
            v.content.detach(volume_id);
            tracing::info!(volume = volume_id, "volume released");
        }
        let _ = std::fs::remove_file(state_file(&self.state_dir, volume_id));
    }

    /// Every served volume's numbers, for `/metrics` (see [`admin`]).
    pub fn volume_metrics(&self) -> Vec<admin::VolumeMetrics> {
        let volumes = self.volumes.lock();
        let mut out: Vec<admin::VolumeMetrics> = volumes
            .iter()
            .map(|(id, v)| {
                let s = &v.stats;
                let mut m = admin::VolumeMetrics {
                    id: id.clone(),
                    connected: !v.session.is_finished(),
                    reads: s.reads.load(Ordering::Relaxed),
                    read_bytes: s.bytes_read.load(Ordering::Relaxed),
                    read_errors: s.read_errors.load(Ordering::Relaxed),
                    opens: s.opens.load(Ordering::Relaxed),
                    passthrough_opens: s.passthrough_opens.load(Ordering::Relaxed),
                    requests: v.session.connection().request_totals(),
                    read_seconds: Some((
                        s.resident_read_seconds.clone(),
                        s.waited_read_seconds.clone(),
                    )),
                    ..Default::default()
                };
                match &v.content {
                    Content::Dataset(served) => {
                        let sum = served.dataset.current().1.summary();
                        m.dataset = Some((sum.objects, sum.bytes));
                    }
                    Content::Checkpoint(c) => {
                        m.checkpoint = true;
                        m.uncommitted_steps = Some(c.store.uncommitted().len() as u64);
                        // What the volume's sync last wrote (absent before its first pass).
                        m.sync = crate::checkpoint::sync::SyncStatus::read(&c.layout).ok();
                    }
                }
                m
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn stats(&self, volume_id: &str) -> Result<VolumeStats, AgentError> {
        let volumes = self.volumes.lock();
        let v = volumes.get(volume_id).ok_or_else(|| {
            AgentError::NotFound(format!("volume {volume_id} is not served on this node"))
        })?;
        let ended = v.session.is_finished().then(|| {
            "the FUSE connection of this volume has ended (unmounted or aborted); unstage and stage it again".to_owned()
        });
        let _ = &v.stats;
        let _ = &v.attributes;
        match &v.content {
            Content::Dataset(served) => {
                let p = served.progress.lock().clone();
                Ok(VolumeStats {
                    bytes_total: p.bytes_total,
                    bytes_cached: p.bytes_cached,
                    objects: p.objects,
                    abnormal: ended.or(p.error),
                })
            }
            // A checkpoint volume holds what the job writes, in the pool's file system:
            // its size is that file system's.
            Content::Checkpoint(c) => {
                let (total, used) = fs_usage(&c.layout.tree()).unwrap_or((0, 0));
                Ok(VolumeStats {
                    bytes_total: total,
                    bytes_cached: used,
                    objects: 0,
                    abnormal: ended,
                })
            }
        }
    }

    /// The credentials the checkpoint volume of destination `url` uploads with: the
    /// stage secrets it was served with since this agent started, else its
    /// `CheckpointSync`'s assignment in the node's pool (found by destination, so a
    /// volume nobody mounts since the agent restarted still uploads).
    pub fn sync_credentials(&self, url: &str) -> Result<Credentials, AgentError> {
        let parsed = LakeUrl::parse(url).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        self.config.lake.allowed(&parsed)?;
        let known = self.destinations.lock().get(url).cloned();
        if let Some((attributes, secrets)) = &known
            && let c = self.credentials_for(attributes, secrets)?
            && c != Credentials::Anonymous
        {
            return Ok(c);
        }
        let assigned = self
            .destination_credentials
            .lock()
            .clone()
            .and_then(|r| r(url));
        match (assigned, known) {
            (Some(Ok(c)), _) if c != Credentials::Anonymous => Ok(c),
            (Some(Err(e)), _) => Err(AgentError::Credentials(e)),
            // Nobody uploads anonymously.
            (Some(Ok(_)), _) => Err(AgentError::Credentials(format!(
                "the CheckpointSync writing to {url} names no credentials; give its destination credentials (a Secret or workload identity)"
            ))),
            (None, Some((attributes, _))) => Err(AgentError::Credentials(format!(
                "the volume for {url} was staged without a Secret and this agent knows no CachePool assignment for {}/{} to take credentials from; give the CheckpointSync destination credentials (a Secret or workload identity)",
                attributes.namespace, attributes.name
            ))),
            (None, None) => Err(AgentError::NotFound(format!(
                "no CheckpointSync assigned to this node writes to {url}, and no volume for it was staged since this agent started, so it has no credentials for it; its committed steps upload once the CheckpointSync is assigned here again or its volume is mounted here"
            ))),
        }
    }

    /// Removes the local files of checkpoint volumes no assignment writes to any more
    /// (their `CheckpointSync` was deleted: the operator waits for their committed
    /// bytes to be uploaded first), so the pool gets their space back. A volume that is
    /// still served, or that has commits pending that this agent can still upload (it
    /// served the volume with stage secrets since it started), is kept. Called with the
    /// pool's assignments (by destination URL as volumes record it); returns the
    /// directories removed.
    pub fn remove_unassigned_checkpoints(&self, assigned: &HashSet<String>) -> Vec<PathBuf> {
        let pool = self.pool.config().dir.clone();
        let mut removed = Vec::new();
        // What an earlier removal left half done.
        if let Ok(entries) = std::fs::read_dir(pool.join("checkpoints")) {
            for e in entries.flatten() {
                if e.file_name().as_encoded_bytes().starts_with(b".removing-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for vol in VolumeLayout::all(&pool).unwrap_or_default() {
            let Ok(cfg) = vol.read_config() else { continue };
            // Only a volume this node's agent served or synced for a CheckpointSync: a
            // volume of unknown origin is never the agent's to remove.
            if assigned.contains(&cfg.url) || cfg.owner_uid.is_none() {
                continue;
            }
            let served = self.volumes.lock().values().any(|v| {
                !v.session.is_finished()
                    && matches!(&v.content, Content::Checkpoint(c) if c.layout.dir == vol.dir)
            });
            if served {
                continue;
            }
            // Committed bytes not uploaded are never removed here (the operator waits for
            // them before it takes the assignment away; annotated discard-pending it does
            // not, and they stay, said in the log).
            let pending = crate::checkpoint::journal::Journal::open(&vol.journal_dir())
                .and_then(|j| {
                    Ok(j.seqs()?
                        .into_iter()
                        .any(|s| j.state(s) == crate::checkpoint::journal::CommitState::Pending))
                })
                .unwrap_or(true);
            if pending {
                tracing::warn!(volume = %vol.dir.display(), destination = %cfg.url, "no CheckpointSync writes to this checkpoint volume's destination any more, and it has commits not uploaded: its files are kept (remove the directory by hand once they are not needed)");
                continue;
            }
            // Out of the pool's listing first (its sync stops when its settings are
            // gone), then deleted.
            let aside = pool.join("checkpoints").join(format!(
                ".removing-{}",
                vol.dir.file_name().unwrap_or_default().to_string_lossy()
            ));
            let gone =
                std::fs::rename(&vol.dir, &aside).and_then(|()| std::fs::remove_dir_all(&aside));
            match gone {
                Ok(()) => {
                    tracing::info!(volume = %vol.dir.display(), destination = %cfg.url, "checkpoint volume removed from the pool: no CheckpointSync writes to its destination any more");
                    removed.push(vol.dir);
                }
                Err(e) => {
                    tracing::warn!(volume = %vol.dir.display(), error = %e, "cannot remove the files of a checkpoint volume no CheckpointSync writes to")
                }
            }
        }
        removed
    }

    /// Where the node's checkpoint syncs get their lake: the credentials of
    /// [`Agent::sync_credentials`], with the agent's lake settings; the volume's
    /// settings (node count, retention) are brought up to date from its assignment
    /// first.
    pub fn sync_source(self: &Arc<Self>) -> Arc<dyn crate::checkpoint::service::LakeSource> {
        use crate::checkpoint::service::LakeUnavailable;
        let weak = Arc::downgrade(self);
        Arc::new(move |vol: &VolumeLayout, cfg: &VolumeConfig| {
            let agent = weak
                .upgrade()
                .ok_or_else(|| LakeUnavailable::loud("the agent is stopping"))?;
            let url = LakeUrl::parse(&cfg.url).map_err(|e| LakeUnavailable::loud(e.to_string()))?;
            if let Some(settings) = agent
                .destination_settings
                .lock()
                .clone()
                .and_then(|r| r(&cfg.url))
            {
                let wanted = VolumeConfig {
                    keep_local: settings.keep_local,
                    keep_remote: settings.keep_remote,
                    nodes: settings.nodes,
                    owner_uid: settings.owner_uid.clone().or(cfg.owner_uid.clone()),
                    ..cfg.clone()
                };
                if &wanted != cfg
                    && let Err(e) = vol.create(&wanted)
                {
                    tracing::warn!(volume = %vol.dir.display(), error = %e, "cannot update the volume's settings from its assignment");
                }
            }
            let creds = agent.sync_credentials(&cfg.url).map_err(|e| match e {
                AgentError::NotFound(m) => LakeUnavailable::unless_pending(vol, m),
                e => LakeUnavailable::loud(e.to_string()),
            })?;
            agent
                .config
                .lake
                .connect(&url, &creds)
                .map_err(|e| LakeUnavailable::loud(e.to_string()))
        })
    }

    /// Duplicates of every served volume's descriptor, with its stage secrets.
    /// One page of [`Request::Descriptors`]: the served volumes after `after`, in id
    /// order, at most [`crate::fdpass::MAX_FDS`]; and whether more follow.
    fn descriptors(
        &self,
        after: Option<&str>,
    ) -> (Vec<String>, Vec<StageSecrets>, Vec<OwnedFd>, bool) {
        let volumes = self.volumes.lock();
        let mut order: Vec<&String> = volumes
            .keys()
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
            .collect();
        order.sort();
        let mut ids = Vec::new();
        let mut secrets = Vec::new();
        let mut fds = Vec::new();
        let mut more = false;
        for id in order {
            if fds.len() == crate::fdpass::MAX_FDS {
                more = true;
                break;
            }
            let v = &volumes[id];
            if let Ok(fd) = v.fd.try_clone() {
                ids.push(id.clone());
                secrets.push(v.secrets.clone());
                fds.push(fd);
            }
        }
        (ids, secrets, fds, more)
    }

    /// Drops volumes whose connection ended (unmounted without a release).
    pub fn reap(&self) {
        let mut volumes = self.volumes.lock();
        let ended: Vec<String> = volumes
            .iter()
            .filter(|(_, v)| v.session.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for id in ended {
            if let Some(v) = volumes.remove(&id) {
                v.content.detach(&id);
                tracing::info!(volume = %id, "volume's connection ended");
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Request, mut fds: Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) {
        let err = |e: AgentError| Response::Error {
            code: e.code(),
            message: e.to_string(),
        };
        let r = match req {
            Request::Ping => Response::Pong {
                node: self.config.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            Request::Serve {
                volume_id,
                staging_path,
                attributes,
                secrets,
                fresh,
            } => match fds.pop() {
                None => err(AgentError::BadRequest(
                    "Serve carries no FUSE descriptor".into(),
                )),
                Some(fd) => {
                    match self.serve(&volume_id, &staging_path, attributes, &secrets, fresh, fd) {
                        Ok(()) => Response::Ok,
                        Err(e) => {
                            tracing::warn!(volume = %volume_id, error = %e, "cannot serve volume");
                            err(e)
                        }
                    }
                }
            },
            Request::Release { volume_id } => {
                self.release(&volume_id);
                Response::Ok
            }
            Request::Stats { volume_id } => match self.stats(&volume_id) {
                Ok(s) => Response::Stats(s),
                Err(e) => err(e),
            },
            Request::Served => Response::Served {
                volumes: self.served(),
            },
            Request::Descriptors { after } => {
                let (volumes, secrets, fds, more) = self.descriptors(after.as_deref());
                return (
                    Response::Descriptors {
                        volumes,
                        secrets,
                        more,
                    },
                    fds,
                );
            }
        };
        (r, Vec::new())
    }
}

/// Total and used bytes of the file system holding `path`.
fn fs_usage(path: &Path) -> io::Result<(u64, u64)> {
    let s = crate::cache::fs_space(path)?;
    Ok((s.total, s.total.saturating_sub(s.free)))
}

/// Binds the agent socket (0600), replacing a stale one; refuses if another agent
/// answers on it.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another node agent serves {}; one agent per node",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the socket until the listener fails: a thread per connection, at most
/// [`protocol::MAX_CLIENTS`] at once, root peers only.
pub fn serve_socket(agent: Arc<Agent>, listener: UnixListener) {
    protocol::serve_clients(
        listener,
        "agent",
        protocol::MAX_CLIENTS,
        protocol::IDLE_CLIENT,
        move |conn| {
            loop {
                let (req, fds) = match protocol::read_frame::<Request>(&conn) {
                    Ok(Some(x)) => x,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "agent socket connection ended");
                        return;
                    }
                };
                let (resp, out) = agent.handle(req, fds);
                let raw: Vec<i32> = out.iter().map(|f| f.as_raw_fd()).collect();
                if protocol::write_frame(&conn, &resp, &raw).is_err() {
                    return;
                }
            }
        },
    );
}
