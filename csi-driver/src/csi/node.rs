//! The CSI node logic, kernel- and gRPC-free: staging mounts FUSE and hands the
//! connection to the agent, publishing bind-mounts the staged volume into a pod.
//!
//! What kubelet relies on (the CSI spec's semantics): every call may be repeated and
//! then succeeds without changing anything; a missing field is `InvalidArgument`
//! naming it; an unknown volume is `NotFound`; a second call on a volume while one runs
//! is `Aborted`; unstaging a volume still published is `FailedPrecondition`.
//!
//! What survives what: the plugin records each staged volume (`<state-dir>/*.json`:
//! staging path, attributes, published targets) and keeps a duplicate of its FUSE
//! descriptor, so the connection outlives an agent restart ([`NodeCore::keep_agent_fed`]
//! hands the descriptors to the new agent). A restarted plugin gets the duplicates back
//! from the agent ([`NodeCore::recover`]); a volume whose connection died with both
//! processes is mounted anew and its targets bound again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tidepool_api::volume::{VolumeAttributes, VolumeKind};

use super::mounter::Mounter;
use crate::agent::protocol::{
    AgentClient, ErrorCode, Request, Response, StageSecrets, VolumeStats,
};
use crate::fuse::MountOptions;

/// A gRPC status class, as the CSI spec assigns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Aborted,
    Unavailable,
    PermissionDenied,
    ResourceExhausted,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CsiError {
    pub code: Code,
    pub message: String,
}

fn fail(code: Code, message: impl Into<String>) -> CsiError {
    CsiError {
        code,
        message: message.into(),
    }
}

fn missing(field: &str) -> CsiError {
    fail(Code::InvalidArgument, format!("{field} is required"))
}

fn internal(what: &str, e: io::Error) -> CsiError {
    fail(Code::Internal, format!("{what}: {e}"))
}

impl From<ErrorCode> for Code {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Internal => Code::Internal,
        }
    }
}

/// How the plugin reaches the agent.
pub trait AgentLink: Send + Sync + 'static {
    fn call(&self, req: &Request, fds: &[RawFd]) -> io::Result<(Response, Vec<OwnedFd>)>;
}

/// The agent's Unix socket (one connection per call: calls are rare).
pub struct SocketLink {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl AgentLink for SocketLink {
    fn call(&self, req: &Request, fds: &[RawFd]) -> io::Result<(Response, Vec<OwnedFd>)> {
        AgentClient::connect(&self.path, self.timeout)?.call(req, fds)
    }
}

/// The access the volume capability asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A volume capability as the node logic needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// `false`: a raw block volume (refused).
    pub mount: bool,
    pub access: Access,
}

/// One staged volume, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub attributes: VolumeAttributes,
    pub targets: BTreeSet<PathBuf>,
    /// The targets published read-only (`readonly` or a reader-only access mode), so that
    /// binding them again after a restart keeps them read-only. A DatasetCache's are all
    /// read-only and not listed.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub read_only_targets: BTreeSet<PathBuf>,
}

impl Staged {
    /// Whether `target` is (to be) bound read-only.
    fn read_only(&self, target: &Path) -> bool {
        self.attributes.kind == VolumeKind::DatasetCache || self.read_only_targets.contains(target)
    }
}

/// The records of staged volumes, one file each.
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// Opens (creating) the records in `dir`, a directory only root may open.
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        crate::durable::private_dir(&dir)?;
        Ok(Records { dir })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(volume_id.as_bytes());
        let name: String = h[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.json"))
    }

    pub fn get(&self, volume_id: &str) -> Option<Staged> {
        let bytes = std::fs::read(self.path(volume_id)).ok()?;
        serde_json::from_slice::<Staged>(&bytes)
            .ok()
            .filter(|s| s.volume_id == volume_id)
    }

    /// Records `s` durably (synced, renamed into place, the directory synced) before
    /// the call that staged or published it answers: after a power loss the record is
    /// there, whole, so its targets are bound again.
    pub fn put(&self, s: &Staged) -> io::Result<()> {
        let p = self.path(&s.volume_id);
        crate::durable::write_atomic_private(&p, &serde_json::to_vec(s).map_err(io::Error::other)?)
    }

    pub fn remove(&self, volume_id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(volume_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => crate::durable::sync_dir(&self.dir),
        }
    }

    pub fn all(&self) -> Vec<Staged> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }
}

/// Who holds a volume's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// A CSI call (kubelet's): a second call meanwhile is `Aborted`, as the spec says.
    Call,
    /// The plugin's own upkeep (handing connections to a restarted agent, mounting a
    /// dead volume again): a CSI call waits for it rather than failing.
    Upkeep,
}

/// The volumes with an operation in progress.
#[derive(Default)]
struct Busy {
    held: Mutex<HashMap<String, Holder>>,
    released: parking_lot::Condvar,
}

/// Held while an operation on one volume runs.
struct VolumeLock<'a> {
    busy: &'a Busy,
    id: String,
}

impl Drop for VolumeLock<'_> {
    fn drop(&mut self) {
        self.busy.held.lock().remove(&self.id);
        self.busy.released.notify_all();
    }
}

/// The longest a CSI call waits for the plugin's upkeep of the same volume.
const UPKEEP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The node plugin's state and logic.
pub struct NodeCore {
    pub node_id: String,
    mounter: Arc<dyn Mounter>,
    agent: Arc<dyn AgentLink>,
    records: Records,
    busy: Busy,
    /// Our duplicates of staged volumes' FUSE descriptors.
    fds: Mutex<HashMap<String, OwnedFd>>,
    /// The stage secrets of staged volumes, in memory only (never on disk): handed to
    /// a restarted agent with the volume's connection. The agent keeps a copy too, so
    /// either process may restart; after both did, the agent falls back to the
    /// credentials of the volume's pool assignment.
    secrets: Mutex<HashMap<String, StageSecrets>>,
    /// The last reason each volume could not be mounted again (logged once).
    repair_failures: Mutex<HashMap<String, String>>,
    /// The keeper's socket (`crate::keeper`): a third holder of the descriptors, in a
    /// pod of its own, so the connections outlive the node pod.
    /// Where a keeper may listen, in order of preference.
    keeper: Vec<PathBuf>,
    /// A fingerprint of the stage secrets the keeper was last given for each volume:
    /// secrets rotated by a repeated `NodeStageVolume` are given to it again.
    keeper_secrets: Mutex<HashMap<String, u64>>,
}

/// A fingerprint of `s` (to tell whether the keeper holds these secrets; the secrets
/// themselves are never kept twice). No secrets and empty ones are the same.
fn fingerprint(s: Option<&StageSecrets>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.filter(|s| !s.0.is_empty()).map(|s| &s.0).hash(&mut h);
    h.finish()
}

/// One answer of a descriptors exchange (with the agent or the keeper).
struct Page {
    volumes: Vec<String>,
    secrets: Vec<StageSecrets>,
    fds: Vec<OwnedFd>,
    more: bool,
}

impl Page {
    /// The agent's answer to `Descriptors`, if it is one.
    fn from_agent<E>(r: Result<(Response, Vec<OwnedFd>), E>) -> Option<Page> {
        match r {
            Ok((
                Response::Descriptors {
                    volumes,
                    secrets,
                    more,
                },
                fds,
            )) => Some(Page {
                volumes,
                secrets,
                fds,
                more,
            }),
            _ => None,
        }
    }

    /// The keeper's answer to `Descriptors`, if it is one.
    fn from_keeper<E>(r: Result<(crate::keeper::KeeperResponse, Vec<OwnedFd>), E>) -> Option<Page> {
        match r {
            Ok((
                crate::keeper::KeeperResponse::Descriptors {
                    volumes,
                    secrets,
                    more,
                },
                fds,
            )) => Some(Page {
                volumes,
                secrets,
                fds,
                more,
            }),
            _ => None,
        }
    }
}

/// Asks page after page (`ask(after)`, `after` the last volume of the page before) until
/// the answer says no more follow, and returns every volume with its secrets and
/// descriptor. A failed or empty answer ends it with what came so far: a node with more
/// volumes than one message carries (`fdpass::MAX_FDS`) gets them all, and a peer that
/// does not page (an older one) answers its one page without `more`.
fn every_page(
    mut ask: impl FnMut(Option<String>) -> Option<Page>,
) -> Vec<(String, StageSecrets, OwnedFd)> {
    let mut all = Vec::new();
    let mut after = None;
    while let Some(page) = ask(after.take()) {
        let last = page.volumes.last().cloned();
        let mut secrets = page.secrets.into_iter();
        for (id, fd) in page.volumes.into_iter().zip(page.fds) {
            all.push((id, secrets.next().unwrap_or_default(), fd));
        }
        match last {
            Some(last) if page.more => after = Some(last),
            _ => break,
        }
    }
    all
}

/// Whether the FUSE connection behind `fd` (a /dev/fuse descriptor) is still up: the
/// kernel reports `POLLERR` on it once the connection was aborted or unmounted. Never
/// blocks, unlike a `stat` of the mount while its server is away.
pub fn connection_alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n >= 0 && p.revents & (libc::POLLERR | libc::POLLNVAL) == 0
}

/// The usage and health of a volume.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub stats: Option<VolumeStats>,
    /// Set when the volume cannot serve reads, with why.
    pub abnormal: Option<String>,
}

impl NodeCore {
    pub fn new(
        node_id: String,
        mounter: Arc<dyn Mounter>,
        agent: Arc<dyn AgentLink>,
        records: Records,
    ) -> Self {
        NodeCore {
            node_id,
            mounter,
            agent,
            records,
            busy: Busy::default(),
            fds: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
            repair_failures: Mutex::new(HashMap::new()),
            keeper: Vec::new(),
            keeper_secrets: Mutex::new(HashMap::new()),
        }
    }

    /// Also keeps the descriptors with the keeper at `socket` (see [`Self::keep_keeper_fed`]).
    /// Adds a place where a keeper may listen (the first that answers is used).
    pub fn with_keeper(mut self, socket: PathBuf) -> Self {
        self.keeper.push(socket);
        self
    }

    fn keeper(&self) -> Option<crate::keeper::KeeperClient> {
        for path in &self.keeper {
            match crate::keeper::KeeperClient::connect(path, Duration::from_secs(10)) {
                Ok(k) => return Some(k),
                Err(e) => {
                    tracing::debug!(socket = %path.display(), error = %e, "keeper not reachable")
                }
            }
        }
        None
    }

    /// Every second: the keeper holds a descriptor of every volume we hold one of, with
    /// its current stage secrets, and none of volumes no longer staged. A restarted
    /// keeper is fed again this way.
    pub fn keep_keeper_fed(&self) {
        use crate::keeper::{KeeperRequest, KeeperResponse};
        let Some(k) = self.keeper() else {
            return;
        };
        let Ok((KeeperResponse::Held { volumes }, _)) = k.call(&KeeperRequest::Held, &[]) else {
            return;
        };
        let held: HashSet<String> = volumes.into_iter().collect();
        let ours: Vec<(String, OwnedFd, StageSecrets)> = {
            // Lock order, as everywhere: descriptors, secrets, the keeper's.
            let fds = self.fds.lock();
            let secrets = self.secrets.lock();
            let given = self.keeper_secrets.lock();
            fds.iter()
                .filter(|(id, fd)| {
                    // Not held, or held with other secrets than ours (rotated since).
                    let current = fingerprint(secrets.get(*id));
                    (!held.contains(*id) || given.get(*id) != Some(&current))
                        && connection_alive(fd)
                })
                .filter_map(|(id, fd)| {
                    let s = secrets.get(id).cloned().unwrap_or_default();
                    Some((id.clone(), fd.try_clone().ok()?, s))
                })
                .collect()
        };
        for (id, fd, secrets) in ours {
            let print = fingerprint(Some(&secrets));
            let req = KeeperRequest::Keep {
                volume_id: id.clone(),
                secrets,
            };
            match k.call(&req, &[fd.as_raw_fd()]) {
                Ok((KeeperResponse::Ok, _)) => {
                    self.keeper_secrets.lock().insert(id.clone(), print);
                    tracing::info!(volume = %id, "the keeper holds the volume's connection and its current stage secrets")
                }
                Ok((other, _)) => {
                    tracing::warn!(volume = %id, answer = ?other, "the keeper refused the volume")
                }
                Err(e) => tracing::debug!(volume = %id, error = %e, "keeper not reachable"),
            }
        }
        for id in held {
            if self.records.get(&id).is_none() {
                self.keeper_secrets.lock().remove(&id);
                let _ = k.call(&KeeperRequest::Drop { volume_id: id }, &[]);
            }
        }
    }

    /// Takes back from the keeper the descriptors we lack (we restarted, with the agent
    /// perhaps: the node pod was replaced).
    fn take_back_from_keeper(&self) -> usize {
        use crate::keeper::KeeperRequest;
        let Some(k) = self.keeper() else {
            return 0;
        };
        let held = every_page(|after| {
            Page::from_keeper(k.call(&KeeperRequest::Descriptors { after }, &[]))
        });
        let mut ours = self.fds.lock();
        let mut kept = self.secrets.lock();
        let mut taken = 0;
        for (id, s, fd) in held {
            if self.records.get(&id).is_none() {
                continue;
            }
            self.keeper_secrets
                .lock()
                .insert(id.clone(), fingerprint(Some(&s)));
            if !s.0.is_empty() {
                kept.entry(id.clone()).or_insert(s);
            }
            if !ours.contains_key(&id) && connection_alive(&fd) {
                ours.insert(id, fd);
                taken += 1;
            }
        }
        taken
    }

    /// The lock of a CSI call on `volume_id`: `Aborted` while another call holds it;
    /// waits (up to [`UPKEEP_WAIT`]) while the plugin's upkeep does.
    fn lock(&self, volume_id: &str) -> Result<VolumeLock<'_>, CsiError> {
        let aborted = || {
            fail(
                Code::Aborted,
                format!("an operation on volume {volume_id} is already in progress; retry later"),
            )
        };
        let deadline = std::time::Instant::now() + UPKEEP_WAIT;
        let mut held = self.busy.held.lock();
        loop {
            match held.get(volume_id) {
                None => break,
                Some(Holder::Call) => return Err(aborted()),
                Some(Holder::Upkeep) => {
                    if self
                        .busy
                        .released
                        .wait_until(&mut held, deadline)
                        .timed_out()
                    {
                        return Err(aborted());
                    }
                }
            }
        }
        held.insert(volume_id.to_owned(), Holder::Call);
        Ok(VolumeLock {
            busy: &self.busy,
            id: volume_id.to_owned(),
        })
    }

    /// The lock of the plugin's upkeep: `None` if anything holds it now.
    fn upkeep_lock(&self, volume_id: &str) -> Option<VolumeLock<'_>> {
        let mut held = self.busy.held.lock();
        if held.contains_key(volume_id) {
            return None;
        }
        held.insert(volume_id.to_owned(), Holder::Upkeep);
        Some(VolumeLock {
            busy: &self.busy,
            id: volume_id.to_owned(),
        })
    }

    /// Whether the staged volume's connection is up. With our duplicate of its
    /// descriptor this never touches the mount (a `stat` would wait while the agent
    /// restarts); without one, a dead mount answers a `stat` at once with an error.
    fn live(&self, volume_id: &str, staging_path: &Path) -> bool {
        if !self.mounter.is_mounted(staging_path).unwrap_or(false) {
            return false;
        }
        match self.fds.lock().get(volume_id) {
            Some(fd) => connection_alive(fd),
            None => self.mounter.answers(staging_path),
        }
    }

    /// Binds every recorded target of `rec` to its (new) staging mount again, so pods
    /// that had the volume see it again.
    fn rebind_targets(&self, rec: &Staged) {
        for t in &rec.targets {
            let _ = self.mounter.unmount(t);
            if let Err(e) = self.mounter.bind(&rec.staging_path, t, rec.read_only(t)) {
                tracing::warn!(target = %t.display(), error = %e, "binding a published target again failed");
            }
        }
    }

    fn agent_call(
        &self,
        req: &Request,
        fds: &[RawFd],
    ) -> Result<(Response, Vec<OwnedFd>), CsiError> {
        self.agent.call(req, fds).map_err(|e| {
            fail(
                Code::Unavailable,
                format!("{e}; is `tidepool agent` running on this node?"),
            )
        })
    }

    /// Whether the agent answers (CSI `Probe`).
    pub fn agent_ready(&self) -> bool {
        matches!(
            self.agent.call(&Request::Ping, &[]),
            Ok((Response::Pong { .. }, _))
        )
    }

    fn check_capability(
        cap: Option<&Capability>,
        kind: Option<VolumeKind>,
    ) -> Result<(), CsiError> {
        let cap = cap.ok_or_else(|| missing("volume_capability"))?;
        if !cap.mount {
            return Err(fail(
                Code::InvalidArgument,
                "volume_capability: block access is not supported; Tidepool volumes are file systems (use a mount capability)",
            ));
        }
        if kind == Some(VolumeKind::DatasetCache) && cap.access == Access::ReadWrite {
            return Err(fail(
                Code::InvalidArgument,
                "volume_capability: a DatasetCache volume is read-only; use a reader access mode (ReadOnlyMany)",
            ));
        }
        Ok(())
    }

    /// `NodeStageVolume`.
    pub fn stage(
        &self,
        volume_id: &str,
        staging_path: &Path,
        capability: Option<&Capability>,
        context: &std::collections::BTreeMap<String, String>,
        secrets: StageSecrets,
    ) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if staging_path.as_os_str().is_empty() {
            return Err(missing("staging_target_path"));
        }
        Self::check_capability(capability, None)?;
        let attributes = VolumeAttributes::parse(context)
            .map_err(|e| fail(Code::InvalidArgument, e.to_string()))?;
        Self::check_capability(capability, Some(attributes.kind))?;
        let _busy = self.lock(volume_id)?;
        let previous = self.records.get(volume_id);
        if let Some(rec) = &previous {
            if rec.staging_path != staging_path {
                return Err(fail(
                    Code::FailedPrecondition,
                    format!(
                        "volume {volume_id} is already staged at {}; unstage it there first",
                        rec.staging_path.display()
                    ),
                ));
            }
            if self.live(volume_id, staging_path) {
                if rec.attributes != attributes {
                    return Err(fail(
                        Code::AlreadyExists,
                        format!("volume {volume_id} is staged with other attributes"),
                    ));
                }
                if !secrets.0.is_empty() {
                    // Rotated secrets reach the next agent that takes the volume over.
                    self.secrets.lock().insert(volume_id.to_owned(), secrets);
                }
                return Ok(());
            }
        }
        self.mount_and_serve(volume_id, staging_path, &attributes, &secrets)?;
        if !secrets.0.is_empty() {
            self.secrets.lock().insert(volume_id.to_owned(), secrets);
        }
        self.repair_failures.lock().remove(volume_id);
        let rec = Staged {
            volume_id: volume_id.to_owned(),
            staging_path: staging_path.to_owned(),
            attributes,
            targets: previous
                .as_ref()
                .map(|r| r.targets.clone())
                .unwrap_or_default(),
            read_only_targets: previous.map(|r| r.read_only_targets).unwrap_or_default(),
        };
        self.records
            .put(&rec)
            .map_err(|e| internal("recording the staged volume", e))?;
        // Staged again after its connection died: the pods' targets come back too.
        self.rebind_targets(&rec);
        Ok(())
    }

    /// Mounts a new connection at `staging_path` and has the agent serve it; undoes
    /// the mount if the agent cannot.
    fn mount_and_serve(
        &self,
        volume_id: &str,
        staging_path: &Path,
        attributes: &VolumeAttributes,
        secrets: &StageSecrets,
    ) -> Result<(), CsiError> {
        // Reachable before anything is mounted: a mount nobody serves would hang readers.
        if !self.agent_ready() {
            return Err(fail(
                Code::Unavailable,
                "the node agent does not answer on its socket; is `tidepool agent` running on this node?",
            ));
        }
        // What is left of a dead connection goes first.
        self.mounter
            .unmount(staging_path)
            .map_err(|e| internal("clearing the staging path", e))?;
        std::fs::create_dir_all(staging_path)
            .map_err(|e| internal(&format!("creating {}", staging_path.display()), e))?;
        let opts = MountOptions {
            fsname: format!("tidepool:{}/{}", attributes.namespace, attributes.name),
            subtype: "tidepool".into(),
            read_only: attributes.kind == VolumeKind::DatasetCache,
            allow_other: true,
            default_permissions: true,
        };
        let fd = self
            .mounter
            .mount_fuse(staging_path, &opts)
            .map_err(|e| internal("mounting FUSE at the staging path", e))?;
        let req = Request::Serve {
            volume_id: volume_id.to_owned(),
            staging_path: staging_path.to_owned(),
            attributes: attributes.clone(),
            secrets: secrets.clone(),
            fresh: true,
        };
        let answer = self.agent_call(&req, &[fd.as_raw_fd()]);
        match answer {
            Ok((Response::Ok, _)) => {
                self.fds.lock().insert(volume_id.to_owned(), fd);
                Ok(())
            }
            other => {
                drop(fd);
                let _ = self.mounter.unmount(staging_path);
                Err(match other {
                    Ok((Response::Error { code, message }, _)) => fail(code.into(), message),
                    Ok((r, _)) => fail(
                        Code::Internal,
                        format!("unexpected answer from the agent: {r:?}"),
                    ),
                    Err(e) => e,
                })
            }
        }
    }

    /// `NodeUnstageVolume`.
    pub fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if staging_path.as_os_str().is_empty() {
            return Err(missing("staging_target_path"));
        }
        let _busy = self.lock(volume_id)?;
        if let Some(rec) = self.records.get(volume_id) {
            // Another path is not this volume's: unmounting it could take away a mount
            // that belongs to something else.
            if rec.staging_path != staging_path {
                return Err(fail(
                    Code::InvalidArgument,
                    format!(
                        "volume {volume_id} is staged at {}, not at {}; nothing was unmounted",
                        rec.staging_path.display(),
                        staging_path.display()
                    ),
                ));
            }
            for t in &rec.targets {
                if self.mounter.is_mounted(t).unwrap_or(true) {
                    return Err(fail(
                        Code::FailedPrecondition,
                        format!(
                            "volume {volume_id} is still published at {}; unpublish it first",
                            t.display()
                        ),
                    ));
                }
            }
        }
        self.mounter
            .unmount(staging_path)
            .map_err(|e| internal("unmounting the staging path", e))?;
        self.fds.lock().remove(volume_id);
        self.secrets.lock().remove(volume_id);
        self.keeper_secrets.lock().remove(volume_id);
        // The agent may be down: the record goes anyway, and a restarted agent
        // forgets volumes no plugin hands it.
        let _ = self.agent.call(
            &Request::Release {
                volume_id: volume_id.to_owned(),
            },
            &[],
        );
        self.records
            .remove(volume_id)
            .map_err(|e| internal("removing the volume's record", e))?;
        Ok(())
    }

    /// `NodePublishVolume`.
    pub fn publish(
        &self,
        volume_id: &str,
        staging_path: &Path,
        target: &Path,
        capability: Option<&Capability>,
        read_only: bool,
    ) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if staging_path.as_os_str().is_empty() {
            return Err(missing("staging_target_path"));
        }
        if target.as_os_str().is_empty() {
            return Err(missing("target_path"));
        }
        Self::check_capability(capability, None)?;
        let _busy = self.lock(volume_id)?;
        let mut rec = self.records.get(volume_id).ok_or_else(|| {
            fail(
                Code::NotFound,
                format!("volume {volume_id} is not staged on this node (NodeStageVolume first)"),
            )
        })?;
        Self::check_capability(capability, Some(rec.attributes.kind))?;
        if rec.staging_path != staging_path {
            return Err(fail(
                Code::FailedPrecondition,
                format!(
                    "volume {volume_id} is staged at {}, not at {}",
                    rec.staging_path.display(),
                    staging_path.display()
                ),
            ));
        }
        let mounted = |p: &Path| {
            self.mounter
                .is_mounted(p)
                .map_err(|e| internal("reading the mount table", e))
        };
        if !mounted(staging_path)? {
            return Err(fail(
                Code::FailedPrecondition,
                format!("the staging mount of volume {volume_id} is gone; stage it again"),
            ));
        }
        // Read-only when the pod asks for it (`readonly`: a `readOnly` volume or PVC) or its
        // access mode only reads; a DatasetCache always (the CSI spec: the SP MUST publish
        // read-only then). Writes through the target fail with EROFS.
        let read_only = rec.attributes.kind == VolumeKind::DatasetCache
            || read_only
            || capability.is_some_and(|c| c.access == Access::ReadOnly);
        if mounted(target)? {
            if rec.targets.contains(target) {
                if rec.read_only(target) != read_only {
                    return Err(fail(
                        Code::AlreadyExists,
                        format!(
                            "{} is already published {}; unpublish it before publishing it {}",
                            target.display(),
                            if read_only { "read-write" } else { "read-only" },
                            if read_only { "read-only" } else { "read-write" },
                        ),
                    ));
                }
                return Ok(());
            }
            return Err(fail(
                Code::AlreadyExists,
                format!(
                    "{} is already a mount point of something else",
                    target.display()
                ),
            ));
        }
        std::fs::create_dir_all(target)
            .map_err(|e| internal(&format!("creating {}", target.display()), e))?;
        self.mounter
            .bind(staging_path, target, read_only)
            .map_err(|e| internal("bind-mounting the volume", e))?;
        rec.targets.insert(target.to_owned());
        if read_only && rec.attributes.kind != VolumeKind::DatasetCache {
            rec.read_only_targets.insert(target.to_owned());
        } else {
            rec.read_only_targets.remove(target);
        }
        self.records
            .put(&rec)
            .map_err(|e| internal("recording the published target", e))?;
        Ok(())
    }

    /// `NodeUnpublishVolume`.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if target.as_os_str().is_empty() {
            return Err(missing("target_path"));
        }
        let _busy = self.lock(volume_id)?;
        self.mounter
            .unmount(target)
            .map_err(|e| internal("unmounting the target path", e))?;
        // We created the directory at publish; kubelet expects it gone.
        let _ = std::fs::remove_dir(target);
        if let Some(mut rec) = self.records.get(volume_id)
            && rec.targets.remove(target)
        {
            rec.read_only_targets.remove(target);
            self.records
                .put(&rec)
                .map_err(|e| internal("recording the unpublished target", e))?;
        }
        Ok(())
    }

    /// `NodeGetVolumeStats`.
    pub fn stats(&self, volume_id: &str, path: &Path) -> Result<Stats, CsiError> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if path.as_os_str().is_empty() {
            return Err(missing("volume_path"));
        }
        let rec = self.records.get(volume_id).ok_or_else(|| {
            fail(
                Code::NotFound,
                format!("volume {volume_id} is not staged on this node"),
            )
        })?;
        if rec.staging_path != path && !rec.targets.contains(path) {
            return Err(fail(
                Code::NotFound,
                format!("{} is not a path of volume {volume_id}", path.display()),
            ));
        }
        if !self.mounter.is_mounted(path).unwrap_or(false) {
            return Err(fail(
                Code::NotFound,
                format!("{} is not mounted", path.display()),
            ));
        }
        let mut abnormal = (!self.live(volume_id, &rec.staging_path)).then(|| {
            "the volume's FUSE connection is gone (the agent and the plugin both stopped); the plugin mounts it again when it can, or NodeStageVolume does".to_owned()
        });
        let stats = match self.agent.call(
            &Request::Stats {
                volume_id: volume_id.to_owned(),
            },
            &[],
        ) {
            Ok((Response::Stats(s), _)) => {
                if abnormal.is_none() {
                    abnormal = s.abnormal.clone();
                }
                Some(s)
            }
            Ok((Response::Error { message, .. }, _)) => {
                abnormal.get_or_insert(message);
                None
            }
            Ok(_) => None,
            Err(e) => {
                abnormal.get_or_insert(format!(
                    "the node agent does not answer ({e}); reads wait until it is back"
                ));
                None
            }
        };
        Ok(Stats { stats, abnormal })
    }

    /// At the plugin's start and every few seconds after: takes the descriptors of
    /// live volumes back from the agent, and mounts anew (binding their targets again)
    /// the volumes whose connection ended. Returns how many volumes were repaired.
    pub fn recover(&self) -> usize {
        let served = every_page(|after| {
            Page::from_agent(self.agent.call(&Request::Descriptors { after }, &[]))
        });
        {
            let mut ours = self.fds.lock();
            let mut kept = self.secrets.lock();
            for (id, s, fd) in served {
                if !s.0.is_empty() {
                    kept.entry(id.clone()).or_insert(s);
                }
                ours.entry(id).or_insert(fd);
            }
        }
        let taken = self.take_back_from_keeper();
        if taken > 0 {
            tracing::info!(
                volumes = taken,
                "took the volumes' connections back from the keeper"
            );
        }
        let mut repaired = 0;
        for rec in self.records.all() {
            if self.live(&rec.volume_id, &rec.staging_path) {
                continue;
            }
            let Some(_busy) = self.upkeep_lock(&rec.volume_id) else {
                continue;
            };
            if self.live(&rec.volume_id, &rec.staging_path) {
                continue;
            }
            // Stage secrets live in memory only: when no process kept them, the
            // agent uses the credentials of the volume's pool assignment.
            let secrets = self
                .secrets
                .lock()
                .get(&rec.volume_id)
                .cloned()
                .unwrap_or_default();
            match self.mount_and_serve(&rec.volume_id, &rec.staging_path, &rec.attributes, &secrets)
            {
                Ok(()) => {
                    self.rebind_targets(&rec);
                    self.repair_failures.lock().remove(&rec.volume_id);
                    tracing::info!(volume = %rec.volume_id, staging = %rec.staging_path.display(), "volume's connection was gone; mounted it again");
                    repaired += 1;
                }
                Err(e) => {
                    let why = e.to_string();
                    let mut last = self.repair_failures.lock();
                    if last.get(&rec.volume_id) != Some(&why) {
                        tracing::warn!(volume = %rec.volume_id, error = %why, "the volume's connection is gone and it cannot be mounted again yet; retrying");
                        last.insert(rec.volume_id.clone(), why);
                    }
                }
            }
        }
        repaired
    }

    /// Hands the agent every staged connection it does not serve (it restarted):
    /// called every second by the plugin.
    pub fn keep_agent_fed(&self) {
        let Ok((Response::Served { volumes }, _)) = self.agent.call(&Request::Served, &[]) else {
            return;
        };
        let served: HashSet<String> = volumes.into_iter().collect();
        let missing: Vec<(String, OwnedFd)> = self
            .fds
            .lock()
            .iter()
            .filter(|(id, _)| !served.contains(*id))
            .filter_map(|(id, fd)| Some((id.clone(), fd.try_clone().ok()?)))
            .collect();
        for (id, fd) in missing {
            let Some(rec) = self.records.get(&id) else {
                continue;
            };
            let Some(_busy) = self.upkeep_lock(&id) else {
                continue;
            };
            let req = Request::Serve {
                volume_id: id.clone(),
                staging_path: rec.staging_path.clone(),
                attributes: rec.attributes.clone(),
                secrets: self.secrets.lock().get(&id).cloned().unwrap_or_default(),
                fresh: false,
            };
            match self.agent.call(&req, &[fd.as_raw_fd()]) {
                Ok((Response::Ok, _)) => {
                    tracing::info!(volume = %id, "handed the volume to the restarted agent")
                }
                Ok((Response::Error { message, .. }, _)) => {
                    tracing::warn!(volume = %id, error = %message, "the agent cannot take the volume over")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(volume = %id, error = %e, "agent not reachable"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::csi::mounter::{FakeMount, FakeMounter};

    /// An agent that records what it was asked and answers with `serve`.
    #[derive(Default)]
    struct FakeAgent {
        calls: Mutex<Vec<Request>>,
        served: Mutex<Vec<String>>,
        serve_error: Mutex<Option<(ErrorCode, String)>>,
        down: std::sync::atomic::AtomicBool,
        /// Block Serve until released (to hold a volume's operation in flight).
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl AgentLink for FakeAgent {
        fn call(&self, req: &Request, fds: &[RawFd]) -> io::Result<(Response, Vec<OwnedFd>)> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "agent down",
                ));
            }
            self.calls.lock().push(req.clone());
            Ok((
                match req {
                    Request::Ping => Response::Pong {
                        node: "n1".into(),
                        version: "t".into(),
                    },
                    Request::Serve { volume_id, .. } => {
                        assert_eq!(fds.len(), 1, "Serve carries the connection");
                        if let Some(rx) = self.gate.lock().take() {
                            let _ = rx.recv();
                        }
                        if let Some((code, message)) = self.serve_error.lock().clone() {
                            Response::Error { code, message }
                        } else {
                            self.served.lock().push(volume_id.clone());
                            Response::Ok
                        }
                    }
                    Request::Served => Response::Served {
                        volumes: self.served.lock().clone(),
                    },
                    Request::Stats { .. } => Response::Stats(VolumeStats {
                        bytes_total: 10,
                        bytes_cached: 5,
                        objects: 2,
                        abnormal: None,
                    }),
                    Request::Descriptors { .. } => Response::Descriptors {
                        volumes: vec![],
                        secrets: vec![],
                        more: false,
                    },
                    Request::Release { volume_id } => {
                        self.served.lock().retain(|v| v != volume_id);
                        Response::Ok
                    }
                },
                Vec::new(),
            ))
        }
    }

    struct Setup {
        core: Arc<NodeCore>,
        mounter: Arc<FakeMounter>,
        agent: Arc<FakeAgent>,
        dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(FakeMounter::default());
        let agent = Arc::new(FakeAgent::default());
        let core = Arc::new(NodeCore::new(
            "n1".into(),
            mounter.clone(),
            agent.clone(),
            Records::new(dir.path().join("state")).unwrap(),
        ));
        Setup {
            core,
            mounter,
            agent,
            dir,
        }
    }

    fn ctx() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("tidepool.dev/kind".into(), "DatasetCache".into()),
            ("tidepool.dev/namespace".into(), "ml".into()),
            ("tidepool.dev/name".into(), "imagenet".into()),
            ("tidepool.dev/uid".into(), "u1".into()),
            (
                "tidepool.dev/url".into(),
                "http://127.0.0.1:10000/devstoreaccount1/data/ds".into(),
            ),
        ])
    }

    fn ro() -> Capability {
        Capability {
            mount: true,
            access: Access::ReadOnly,
        }
    }

    impl Setup {
        /// Another plugin process on this node (a restarted one): the same mounts, agent
        /// and records.
        fn plugin_process(&self) -> NodeCore {
            NodeCore::new(
                "n1".into(),
                self.mounter.clone(),
                self.agent.clone(),
                Records::new(self.dir.path().join("state")).unwrap(),
            )
        }
        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging")
        }
        fn target(&self, n: u32) -> PathBuf {
            self.dir.path().join(format!("pod{n}/mount"))
        }
        fn stage(&self) -> Result<(), CsiError> {
            self.core.stage(
                "v1",
                &self.staging(),
                Some(&ro()),
                &ctx(),
                StageSecrets::default(),
            )
        }
        fn serves(&self) -> usize {
            self.agent
                .calls
                .lock()
                .iter()
                .filter(|r| matches!(r, Request::Serve { .. }))
                .count()
        }
    }

    #[test]
    fn every_call_twice_succeeds_and_changes_nothing() {
        let s = setup();
        s.stage().unwrap();
        s.stage().unwrap();
        assert_eq!(s.serves(), 1, "one connection per volume per node");
        for _ in 0..2 {
            s.core
                .publish("v1", &s.staging(), &s.target(1), Some(&ro()), false)
                .unwrap();
        }
        assert_eq!(
            s.mounter.table.lock().get(&s.target(1)),
            Some(&FakeMount::Bind {
                source: s.staging(),
                read_only: true
            }),
            "a dataset is bound read-only even when the pod asks for read-write"
        );
        for _ in 0..2 {
            s.core.unpublish("v1", &s.target(1)).unwrap();
        }
        for _ in 0..2 {
            s.core.unstage("v1", &s.staging()).unwrap();
        }
        assert!(s.mounter.table.lock().is_empty(), "nothing left mounted");
    }

    #[test]
    fn unstage_at_another_path_is_refused_and_unmounts_nothing() {
        let s = setup();
        s.stage().unwrap();
        let elsewhere = s.dir.path().join("elsewhere");
        s.mounter
            .table
            .lock()
            .insert(elsewhere.clone(), FakeMount::Fuse);
        let e = s.core.unstage("v1", &elsewhere).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{e}");
        assert!(e.message.contains("is staged at"), "{e}");
        let table = s.mounter.table.lock().clone();
        assert!(
            table.contains_key(&elsewhere),
            "the other mount is left alone"
        );
        assert!(table.contains_key(&s.staging()), "the volume stays staged");
        assert!(s.core.records.get("v1").is_some());
        // Its own path unstages it.
        s.core.unstage("v1", &s.staging()).unwrap();
        assert!(s.core.records.get("v1").is_none());
    }

    #[test]
    fn missing_fields_are_invalid_arguments_naming_the_field() {
        let s = setup();
        let e = s
            .core
            .stage(
                "",
                &s.staging(),
                Some(&ro()),
                &ctx(),
                StageSecrets::default(),
            )
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.contains("volume_id")),
            (Code::InvalidArgument, true)
        );
        let e = s
            .core
            .stage(
                "v1",
                Path::new(""),
                Some(&ro()),
                &ctx(),
                StageSecrets::default(),
            )
            .unwrap_err();
        assert!(e.message.contains("staging_target_path"), "{e}");
        let e = s
            .core
            .stage("v1", &s.staging(), None, &ctx(), StageSecrets::default())
            .unwrap_err();
        assert!(e.message.contains("volume_capability"), "{e}");
        let mut bad = ctx();
        bad.remove("tidepool.dev/url");
        let e = s
            .core
            .stage(
                "v1",
                &s.staging(),
                Some(&ro()),
                &bad,
                StageSecrets::default(),
            )
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("tidepool.dev/url"), "{e}");
        let e = s
            .core
            .publish("v1", &s.staging(), Path::new(""), Some(&ro()), true)
            .unwrap_err();
        assert!(e.message.contains("target_path"), "{e}");
        let e = s.core.stats("v1", Path::new("")).unwrap_err();
        assert!(e.message.contains("volume_path"), "{e}");
        let rw = Capability {
            mount: true,
            access: Access::ReadWrite,
        };
        let e = s
            .core
            .stage(
                "v1",
                &s.staging(),
                Some(&rw),
                &ctx(),
                StageSecrets::default(),
            )
            .unwrap_err();
        assert!(e.message.contains("read-only"), "{e}");
        assert!(s.mounter.table.lock().is_empty());
    }

    #[test]
    fn unknown_volumes_are_not_found_and_unpublished_ones_go_quietly() {
        let s = setup();
        assert_eq!(
            s.core.stats("nope", &s.staging()).unwrap_err().code,
            Code::NotFound
        );
        assert_eq!(
            s.core
                .publish("nope", &s.staging(), &s.target(1), Some(&ro()), true)
                .unwrap_err()
                .code,
            Code::NotFound
        );
        s.core.unpublish("nope", &s.target(1)).unwrap();
        s.core.unstage("nope", &s.staging()).unwrap();
    }

    #[test]
    fn unstaging_a_volume_still_published_is_refused() {
        let s = setup();
        s.stage().unwrap();
        s.core
            .publish("v1", &s.staging(), &s.target(1), Some(&ro()), true)
            .unwrap();
        let e = s.core.unstage("v1", &s.staging()).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.message.contains("pod1"), "{e}");
        assert!(s.mounter.is_mounted(&s.staging()).unwrap(), "still staged");
    }

    #[test]
    fn a_second_operation_while_one_is_in_flight_is_aborted() {
        let s = setup();
        let (tx, rx) = std::sync::mpsc::channel();
        *s.agent.gate.lock() = Some(rx);
        let core = s.core.clone();
        let staging = s.staging();
        let first = std::thread::spawn(move || {
            core.stage("v1", &staging, Some(&ro()), &ctx(), StageSecrets::default())
        });
        // Wait until the first stage is inside Serve.
        while s.serves() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = s.stage().unwrap_err();
        assert_eq!(e.code, Code::Aborted);
        assert_eq!(
            s.core.unstage("v1", &s.staging()).unwrap_err().code,
            Code::Aborted
        );
        tx.send(()).unwrap();
        first.join().unwrap().unwrap();
    }

    #[test]
    fn a_call_during_the_plugins_own_upkeep_waits_instead_of_failing() {
        let s = setup();
        s.stage().unwrap();
        // The agent restarted; handing it the connection is held up in Serve.
        s.agent.served.lock().clear();
        let (tx, rx) = std::sync::mpsc::channel();
        *s.agent.gate.lock() = Some(rx);
        let core = s.core.clone();
        let upkeep = std::thread::spawn(move || core.keep_agent_fed());
        while s.serves() < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let core = s.core.clone();
        let (staging, target) = (s.staging(), s.target(1));
        let call =
            std::thread::spawn(move || core.publish("v1", &staging, &target, Some(&ro()), true));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!call.is_finished(), "the call waits for the upkeep");
        tx.send(()).unwrap();
        upkeep.join().unwrap();
        call.join().unwrap().unwrap();
        assert!(s.mounter.is_mounted(&s.target(1)).unwrap());
    }

    #[test]
    fn the_agents_refusal_comes_back_with_its_code_and_nothing_stays_mounted() {
        let s = setup();
        *s.agent.serve_error.lock() = Some((
            ErrorCode::FailedPrecondition,
            "Secret ml/lake not found; create it with key sasToken".into(),
        ));
        let e = s.stage().unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.message.contains("Secret ml/lake"), "{e}");
        assert!(s.mounter.table.lock().is_empty(), "the mount was undone");
        s.agent
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.stage().unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
        assert!(e.message.contains("tidepool agent"), "{e}");
        assert!(!s.core.agent_ready());
    }

    #[test]
    fn checkpoint_volumes_stage_and_publish_read_write() {
        let s = setup();
        let mut c = ctx();
        c.insert("tidepool.dev/kind".into(), "CheckpointSync".into());
        let rw = Capability {
            mount: true,
            access: Access::ReadWrite,
        };
        s.core
            .stage("v2", &s.staging(), Some(&rw), &c, StageSecrets::default())
            .unwrap();
        let served = s.agent.calls.lock().iter().any(|r| {
            matches!(r, Request::Serve { volume_id, attributes, .. }
                if volume_id == "v2" && attributes.kind == VolumeKind::CheckpointSync)
        });
        assert!(served, "the agent was asked to serve the checkpoint volume");
        s.core
            .publish("v2", &s.staging(), &s.target(1), Some(&rw), false)
            .unwrap();
        assert_eq!(
            s.mounter.table.lock().get(&s.target(1)),
            Some(&FakeMount::Bind {
                source: s.staging(),
                read_only: false
            }),
            "the pod gets a writable bind mount"
        );
    }

    #[test]
    fn read_only_publishes_of_a_checkpoint_volume_stay_read_only_across_a_remount() {
        let s = setup();
        let mut c = ctx();
        c.insert("tidepool.dev/kind".into(), "CheckpointSync".into());
        let rw = Capability {
            mount: true,
            access: Access::ReadWrite,
        };
        s.core
            .stage("v2", &s.staging(), Some(&rw), &c, StageSecrets::default())
            .unwrap();
        // A writer, a pod that mounts the claim `readOnly` (kubelet: `readonly`), and a
        // reader-only access mode (ReadOnlyMany).
        s.core
            .publish("v2", &s.staging(), &s.target(1), Some(&rw), false)
            .unwrap();
        s.core
            .publish("v2", &s.staging(), &s.target(2), Some(&rw), true)
            .unwrap();
        s.core
            .publish("v2", &s.staging(), &s.target(3), Some(&ro()), false)
            .unwrap();
        let binds = |s: &Setup| -> Vec<Option<bool>> {
            let table = s.mounter.table.lock();
            (1..=3)
                .map(|n| match table.get(&s.target(n)) {
                    Some(FakeMount::Bind { read_only, .. }) => Some(*read_only),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(binds(&s), [Some(false), Some(true), Some(true)]);
        // The same target again the other way is refused; the same way is a no-op.
        let e = s
            .core
            .publish("v2", &s.staging(), &s.target(2), Some(&rw), false)
            .unwrap_err();
        assert_eq!(e.code, Code::AlreadyExists, "{e:?}");
        assert!(e.message.contains("already published read-only"), "{e:?}");
        s.core
            .publish("v2", &s.staging(), &s.target(2), Some(&rw), true)
            .unwrap();
        // Both the agent and the plugin die: a new plugin mounts the volume again and
        // binds every target again, each as it was published.
        let core2 = s.plugin_process();
        s.mounter.kill(&s.staging());
        assert_eq!(core2.recover(), 1);
        assert_eq!(binds(&s), [Some(false), Some(true), Some(true)]);
        // Unpublished and published again read-write, a target is writable again.
        core2.unpublish("v2", &s.target(2)).unwrap();
        core2
            .publish("v2", &s.staging(), &s.target(2), Some(&rw), false)
            .unwrap();
        assert_eq!(binds(&s), [Some(false), Some(false), Some(true)]);
    }

    #[test]
    fn a_restarted_agent_gets_the_connections_again_and_a_dead_one_is_remounted() {
        let s = setup();
        let key = StageSecrets(BTreeMap::from([("accountKey".into(), "K".into())]));
        s.core
            .stage("v1", &s.staging(), Some(&ro()), &ctx(), key.clone())
            .unwrap();
        s.core
            .publish("v1", &s.staging(), &s.target(1), Some(&ro()), true)
            .unwrap();
        // The agent restarts: it serves nothing until the plugin hands it the volume.
        s.agent.served.lock().clear();
        s.core.keep_agent_fed();
        let resumes: Vec<bool> = s
            .agent
            .calls
            .lock()
            .iter()
            .filter_map(|r| match r {
                Request::Serve { fresh, .. } => Some(*fresh),
                _ => None,
            })
            .collect();
        assert_eq!(resumes, [true, false], "handed over as a live connection");
        let handed: Vec<StageSecrets> = s
            .agent
            .calls
            .lock()
            .iter()
            .filter_map(|r| match r {
                Request::Serve { secrets, .. } => Some(secrets.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            handed,
            [key.clone(), key],
            "the restarted agent gets the stage secrets with the connection"
        );
        // A plugin restart after both died: the connection is dead; recover mounts it
        // again and binds the target again.
        let core2 = s.plugin_process();
        s.mounter.kill(&s.staging());
        assert_eq!(core2.recover(), 1);
        assert!(s.mounter.answers(&s.staging()));
        assert!(s.mounter.is_mounted(&s.target(1)).unwrap());
        let stats = core2.stats("v1", &s.target(1)).unwrap();
        assert_eq!(stats.abnormal, None);
        assert_eq!(stats.stats.unwrap().bytes_cached, 5);
    }

    #[test]
    fn the_keeper_is_given_rotated_stage_secrets_and_hands_them_back() {
        use crate::keeper::{Keeper, KeeperClient, KeeperRequest, KeeperResponse};
        let s = setup();
        let socket = s.dir.path().join("keeper.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || crate::keeper::serve(Arc::new(Keeper::default()), listener));
        let core = s.plugin_process().with_keeper(socket.clone());
        let held_secrets = || {
            let k = KeeperClient::connect(&socket, Duration::from_secs(5)).unwrap();
            match k
                .call(&KeeperRequest::Descriptors { after: None }, &[])
                .unwrap()
            {
                (
                    KeeperResponse::Descriptors {
                        volumes, secrets, ..
                    },
                    fds,
                ) => {
                    assert_eq!(volumes, ["v1"]);
                    assert_eq!(fds.len(), 1, "the connection comes back with its secrets");
                    secrets
                }
                other => panic!("{other:?}"),
            }
        };
        let key = |v: &str| StageSecrets(BTreeMap::from([("sasToken".into(), v.into())]));
        core.stage("v1", &s.staging(), Some(&ro()), &ctx(), key("sig=ONE"))
            .unwrap();
        core.keep_keeper_fed();
        assert_eq!(held_secrets(), [key("sig=ONE")]);
        // kubelet stages the live volume again with a rotated SAS: the keeper must hold
        // the new one, or an agent restarted after both node processes died would
        // fetch with the revoked token.
        core.stage("v1", &s.staging(), Some(&ro()), &ctx(), key("sig=TWO"))
            .unwrap();
        core.keep_keeper_fed();
        assert!(
            held_secrets() == [key("sig=TWO")],
            "the keeper still holds the first SAS after a restage with a rotated one"
        );
        // A plugin restarted beside the keeper takes the new secrets back.
        let core2 = s.plugin_process().with_keeper(socket.clone());
        assert_eq!(core2.take_back_from_keeper(), 1);
        assert!(
            core2.secrets.lock().get("v1") == Some(&key("sig=TWO")),
            "a restarted plugin takes the rotated SAS back from the keeper"
        );
    }

    #[test]
    fn a_dead_connection_is_reported_abnormal() {
        let s = setup();
        s.stage().unwrap();
        s.mounter.kill(&s.staging());
        let st = s.core.stats("v1", &s.staging()).unwrap();
        assert!(st.abnormal.unwrap().contains("connection is gone"));
    }
}
