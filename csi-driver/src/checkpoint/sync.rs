//! The sync: takes committed steps from a volume's journal into the lake until they are
//! durable.
//!
//! One pass ([`Syncer::pass`]), repeated:
//! 1. check that every commit the journal calls durable still has its manifest in the
//!    lake, as this node saw it published (a commit whose manifest was withdrawn,
//!    replaced or deleted since is durable no more: it is dropped, and nothing reports
//!    it durable again);
//! 2. announce every step this node writes (`intents/<step>/<node>`: without a node
//!    count, other nodes wait for this node's part) and every version this node leads,
//!    and follow other nodes: for a step this node writes whose newest version another
//!    node leads (its own commit rule fired there: rank 0's node saw the marker), ask
//!    the mount to commit this node's files as its part of that version
//!    ([`follow`](self::follow); also done in the background between passes);
//! 3. for each step, one pending commit: the one whose upload is under way, else the
//!    newest (older pending ones are superseded and dropped before they start). An
//!    upload under way finishes first, so a step rewritten faster than it uploads still
//!    becomes durable version after version on one node; one whose files are all in
//!    and that only waits for other nodes' parts gives way to this node's newer save of
//!    the step (the others follow the newest version). Its files not yet in the
//!    journal's `uploaded` log are uploaded from the commit's staged links
//!    ([`upload_file`]: blocks resumed from what the lake already has), each logged
//!    once it is in. Before the first object of a commit is replaced, the step's
//!    manifest is withdrawn;
//! 4. with every file in, this node's part record; then the manifest, if every node of
//!    the step has its part of the same version in: the configured number of nodes
//!    (`--nodes`, `spec.commit.nodes`), or, when none is configured, every node that
//!    announced the step, after a settle window in which no other node announced it.
//!    The commit is durable once the manifest is written (or found written by another
//!    node of the same version), and only then are its staged links released;
//! 5. retention ([`retention`](self::retention)).
//!
//! Crash safety: every step is idempotent and ordered so that a kill at any point
//! leaves the lake and the journal in a state the next pass continues from. No
//! manifest is written before every object it names is committed in the lake, with the
//! MD5 the manifest records, and no manifest is written over a withdrawal that came
//! after the publisher looked at the parts (a compare-and-swap; see
//! [`super::manifest`]). A file whose identity changed after commit is never uploaded
//! under that commit (the commit is dropped, and the step commits again when its rule
//! fires again); a file rewritten in place while its commit is pending keeps its
//! committed version for the upload ([`Store::keep_committed`]).
//!
//! Single writer: a sync holds a lock file on the volume (one sync per pool volume on
//! this machine) and a lease on `_tidepool/nodes/<node>.lock` in the lake (one per node
//! name and destination anywhere), renewed in the background; a lost lease stops the
//! sync before its next upload. The lease id is kept in the volume's journal, so a sync
//! restarted after `kill -9` takes over its predecessor's lease at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::journal::{
    CommitHeader, CommitState, Journal, JournalError, Trailer, UploadedRecord, write_atomic,
};
use super::manifest::Layout;
use super::store::{Store, VolumeConfig, VolumeLayout, now_ms};
use super::upload::{
    FileIdentity, MemoryBudget, UploadConfig, UploadError, hex, upload_file, upload_file_if,
};
use crate::lake::{Lake, LakeError, LeaseId, Lister, PutOptions};

pub mod follow;
pub mod publish;
pub mod retention;

/// How the sync runs.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Files uploaded at the same time (each large file also sends its blocks in
    /// parallel; see [`UploadConfig`]).
    pub parallel_files: usize,
    /// Longest wait between passes when nothing wakes the sync.
    pub poll: Duration,
    /// The node lease's duration (15..=60 s); renewed at a third of it.
    pub lease_secs: u32,
    pub upload: UploadConfig,
    /// File data held by all uploads of the volume together (blocks being sent, small
    /// files being put). 128 MiB: 16 blocks of 8 MiB in flight, enough to fill a
    /// multi-gigabit link to a far region, whatever the number or size of the files.
    pub memory: u64,
    /// Without a configured node count: how long every node that announced a step must
    /// have had its part in before the manifest is written (time for a node that
    /// writes the step and has not announced it yet, a sync starting late, to do so).
    /// 10 s: a few of the sidecar's 2 s passes and its announcements every 250 ms.
    pub settle: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            parallel_files: 8,
            poll: Duration::from_secs(2),
            lease_secs: 60,
            upload: UploadConfig::default(),
            memory: 128 << 20,
            settle: Duration::from_secs(10),
        }
    }
}

/// Errors of the sync, in words a user acts on.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "another tidepool sync is running for node {node:?} and {destination} (the lake lease {lock} is held); stop it first, or give this node another --node-name"
    )]
    AnotherSync {
        node: String,
        destination: String,
        lock: String,
    },
    #[error(
        "another tidepool sync is running on {dir} on this machine; stop it first (one sync per volume)"
    )]
    LocalLock { dir: PathBuf },
    #[error(
        "the node lease on {lock} was lost (the lake was unreachable for longer than the lease); stopping uploads"
    )]
    LeaseLost { lock: String },
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Upload(#[from] UploadError),
    #[error("{0}")]
    Lake(#[from] LakeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "step {step:?} has no manifest in {destination}: it is not durable (still uploading, or a node never finished its part); pick a durable step (`tidepool sync status` lists them) or wait"
    )]
    NotDurable { step: String, destination: String },
    #[error("{destination} holds no durable step (no manifest under _tidepool/steps/)")]
    NoSteps { destination: String },
    #[error("manifest of {step}: {detail}")]
    BadManifest { step: String, detail: String },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SyncError {
    let what = what.into();
    move |source| SyncError::Io { what, source }
}

/// One step as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInfo {
    pub step: String,
    pub seq: u64,
    pub files: u64,
    pub bytes: u64,
}

/// A step whose part is in on this node and that is not durable yet, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub step: String,
    /// Nodes known to write the step whose part of this version is not in the lake.
    pub nodes: Vec<String>,
    /// What it waits for, in words.
    #[serde(default)]
    pub detail: String,
    /// Every node that announced the step has its part in: it is published once this
    /// many more milliseconds of the settle window have passed (no node count set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settles_in_ms: Option<u64>,
}

/// What `tidepool sync status` shows (written to the journal after every pass).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub node: String,
    pub destination: String,
    /// The commit of the step saved last (not by step number; see
    /// [`CommitHeader::saved_unix_ms`]) that is not dropped.
    pub latest_committed: Option<StepInfo>,
    /// The commit of the step saved last whose manifest the last pass found in the lake.
    pub latest_durable: Option<StepInfo>,
    /// Bytes and files committed and not yet in the lake.
    pub pending_bytes: u64,
    pub pending_files: u64,
    /// When the oldest commit not yet durable was taken (`None`: nothing pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_unix_ms: Option<u64>,
    /// Upload rate over the last pass that sent anything.
    pub upload_bytes_per_sec: u64,
    pub waiting: Vec<Waiting>,
    /// The nodes a step waits for (`--nodes`, `spec.commit.nodes`); `None`: the nodes
    /// that announced it, after a settle window (a node that never announced a step,
    /// its sync down from the start, can be left out of its manifest).
    #[serde(default)]
    pub expected_nodes: Option<u32>,
    /// The last error in words; cleared by a pass that completes.
    pub last_error: Option<String>,
    /// Process id of the sync that wrote this (it may have stopped since).
    pub pid: u32,
    pub updated_unix_ms: u64,
}

impl SyncStatus {
    pub fn read(vol: &VolumeLayout) -> io::Result<SyncStatus> {
        let b = fs::read(
            Journal::open(&vol.journal_dir())
                .map_err(io::Error::other)?
                .status_path(),
        )?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Steps that became durable in this pass.
    pub durable: Vec<String>,
    pub dropped: Vec<(u64, String)>,
    pub waiting: Vec<Waiting>,
    pub removed_locally: Vec<String>,
    /// Steps deleted from the lake by `keep_remote`.
    pub removed_remotely: Vec<String>,
    /// Steps that could not be published, and why (they wait for a new commit).
    pub failed: Vec<(String, String)>,
}

/// A volume's sync: holds the local lock and the node lease while it lives.
pub struct Syncer {
    lake: Arc<dyn Lake>,
    vol: VolumeLayout,
    cfg: VolumeConfig,
    names: Layout,
    destination: String,
    journal: Journal,
    sync: SyncConfig,
    _lock: File,
    lease: LeaseId,
    lease_lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
    /// Announces steps and versions, and follows other nodes' versions, apart from the
    /// passes (which may be busy uploading for minutes): see [`follow`].
    announce_task: tokio::task::JoinHandle<()>,
    /// What this node announced and follows (shared with the background announcer).
    announcer: Arc<tokio::sync::Mutex<follow::Announcer>>,
    /// Parts this process already wrote, by commit.
    parts_written: HashSet<u64>,
    /// Header and totals of each commit read so far (commit files never change).
    headers: parking_lot::Mutex<HashMap<u64, (CommitHeader, Trailer)>>,
    /// Save times of the manifests retention has looked at (by ETag).
    saved_times: super::restore::SavedTimes,
    /// When each (step, version) was first found with every announced node's part in
    /// (the settle window starts there).
    complete_since: HashMap<(String, String), Instant>,
    last_rate: u64,
}

impl Syncer {
    /// Takes the volume's local lock and the node's lease in the lake. `prefix` is the
    /// destination's prefix inside the lake's container.
    pub async fn start(
        lake: Arc<dyn Lake>,
        vol: VolumeLayout,
        prefix: &str,
        sync: SyncConfig,
    ) -> Result<Syncer, SyncError> {
        let cfg = vol
            .read_config()
            .map_err(io_err(format!("reading {}", vol.config_path().display())))?;
        let journal = Journal::open(&vol.journal_dir())?;
        let lock_path = vol.journal_dir().join("sync.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        // SAFETY: the descriptor is live for the call.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(SyncError::LocalLock {
                dir: vol.dir.clone(),
            });
        }
        let names = Layout::new(prefix);
        let lock_blob = names.lock(&cfg.node);
        // The lease id belongs to the volume, not to the process: a sync restarted on
        // this volume (after a crash; the local lock makes it the only one) takes the
        // lease over at once instead of waiting for the dead one's to expire, while a
        // sync of another volume or machine under the same node name stays refused.
        let lease = volume_lease_id(&vol)?;
        acquire(&*lake, &lock_blob, sync.lease_secs, &lease)
            .await
            .map_err(|e| match e {
                LakeError::LeaseConflict { .. } => SyncError::AnotherSync {
                    node: cfg.node.clone(),
                    destination: cfg.url.clone(),
                    lock: lock_blob.clone(),
                },
                e => e.into(),
            })?;
        let lease_lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (lake, lease, lost, blob) = (
                lake.clone(),
                lease.clone(),
                lease_lost.clone(),
                lock_blob.clone(),
            );
            let every = Duration::from_secs((sync.lease_secs / 3).max(5) as u64);
            let secs = sync.lease_secs;
            tokio::spawn(async move {
                let mut last_ok = Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    match lake.renew_lease(&blob, &lease).await {
                        Ok(()) => last_ok = Instant::now(),
                        Err(e) => {
                            tracing::warn!(lock = %blob, error = %e, "renewing the node lease failed");
                            // Re-acquiring under our id works while nobody else took it.
                            if acquire(&*lake, &blob, secs, &lease).await.is_ok() {
                                last_ok = Instant::now();
                            } else if last_ok.elapsed() >= Duration::from_secs(secs as u64 * 2 / 3)
                            {
                                // Declared lost before it can expire under us.
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                }
            })
        };
        tracing::info!(node = %cfg.node, destination = %cfg.url, "sync started; node lease held");
        let announcer = Arc::new(tokio::sync::Mutex::new(follow::Announcer::default()));
        let announce_task = {
            let (lake, journal, names, node, vol, announcer) = (
                lake.clone(),
                journal.clone(),
                names.clone(),
                cfg.node.clone(),
                vol.clone(),
                announcer.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let ctx = follow::Ctx {
                        lake: &*lake,
                        journal: &journal,
                        names: &names,
                        node: &node,
                        vol: &vol,
                    };
                    if let Err(e) = announcer.lock().await.tick(&ctx, false).await {
                        tracing::debug!(error = %e, "announcing or following failed; trying again");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let mut sync = sync;
        sync.upload.budget = Some(MemoryBudget::new(sync.memory));
        Ok(Syncer {
            destination: cfg.url.clone(),
            lake,
            vol,
            cfg,
            names,
            journal,
            sync,
            _lock: lock,
            lease,
            lease_lost,
            renewer,
            announcer,
            announce_task,
            parts_written: HashSet::new(),
            headers: Default::default(),
            saved_times: Default::default(),
            complete_since: HashMap::new(),
            last_rate: 0,
        })
    }

    fn check_lease(&self) -> Result<(), SyncError> {
        if self.lease_lost.load(Ordering::SeqCst) {
            return Err(SyncError::LeaseLost {
                lock: self.names.lock(&self.cfg.node),
            });
        }
        Ok(())
    }

    /// Releases the lease (a clean stop; a killed sync's lease expires by itself).
    pub async fn stop(self) {
        self.renewer.abort();
        self.announce_task.abort();
        let _ = self
            .lake
            .release_lease(&self.names.lock(&self.cfg.node), &self.lease)
            .await;
    }

    /// Runs passes until `stop` is notified, waking early on `wake` (the in-process
    /// store's commits). Errors are recorded in the status and retried with backoff;
    /// a lost lease ends the run.
    pub async fn run(
        mut self,
        wake: Option<Arc<Store>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SyncError> {
        let mut backoff = Duration::from_secs(1);
        loop {
            if *stop.borrow() {
                break;
            }
            let r = tokio::select! {
                r = self.pass() => r,
                // A stop during a pass ends the pass (the journal keeps what is done).
                _ = stop.changed() => break,
            };
            let delay = match &r {
                Ok(_) => {
                    backoff = Duration::from_secs(1);
                    self.sync.poll
                }
                Err(SyncError::LeaseLost { .. }) => {
                    let e = r.unwrap_err();
                    self.write_status(Some(e.to_string()));
                    self.stop().await;
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sync pass failed; retrying");
                    self.write_status(Some(e.to_string()));
                    let d = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    d
                }
            };
            let woken = async {
                match &wake {
                    Some(s) => s.on_commit.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(delay) => {}
                _ = woken => {}
            }
        }
        self.write_status(None);
        self.stop().await;
        Ok(())
    }

    /// Announces steps and versions and follows other nodes' versions now (see
    /// [`follow`]).
    async fn announce(&self, follow_now: bool) -> Result<(), SyncError> {
        let ctx = follow::Ctx {
            lake: &*self.lake,
            journal: &self.journal,
            names: &self.names,
            node: &self.cfg.node,
            vol: &self.vol,
        };
        self.announcer.lock().await.tick(&ctx, follow_now).await
    }

    /// Re-reads `volume.json` (the node count and retention may change while the
    /// volume lives: a `CheckpointSync` edited, a volume staged anew).
    fn reload_config(&mut self) {
        match self.vol.read_config() {
            Ok(cfg) if cfg.node == self.cfg.node && cfg.url == self.cfg.url => self.cfg = cfg,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the volume's settings; keeping the last ones")
            }
        }
    }

    /// One pass over the journal (see the module docs).
    pub async fn pass(&mut self) -> Result<PassReport, SyncError> {
        self.check_lease()?;
        self.reload_config();
        let mut report = PassReport::default();
        let started = Instant::now();
        // 1. Durable means the manifest is there now.
        self.revalidate_durable(&mut report).await?;
        // 2. Intents, versions, and other nodes' versions followed (also in the
        // background, as soon as they appear).
        self.announce(true).await?;
        // 3. One pending commit of each step: the one whose upload is under way, else
        // the newest.
        let mut by_step: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for seq in self.journal.seqs()? {
            if self.journal.state(seq) == CommitState::Pending {
                let step = self.commit_header(seq)?.0.step;
                by_step.entry(step).or_default().push(seq);
            }
        }
        let mut chosen = Vec::new();
        for (step, seqs) in by_step {
            let newest = *seqs.last().expect("non-empty");
            let mut pick = seqs
                .iter()
                .copied()
                .find(|&seq| self.journal.upload_started(seq))
                .unwrap_or(newest);
            // An upload that is done and only waits for other nodes' parts does not hold
            // back this node's newer save of the step (those nodes may never take their
            // part of it: they follow the newest version).
            if pick != newest
                && self.journal.uploaded_paths(pick)?.len() as u64
                    >= self.commit_header(pick)?.1.files
            {
                let why = format!(
                    "superseded by commit {newest} of {step} (a newer save on this node) while it waited for other nodes' parts"
                );
                self.journal.mark_dropped(pick, &why)?;
                Store::release_staged(&self.vol, pick);
                report.dropped.push((pick, why));
                pick = newest;
            }
            for &older in seqs.iter().filter(|&&s| s < pick) {
                let why =
                    format!("superseded by commit {pick} of {step} before its upload started");
                self.journal.mark_dropped(older, &why)?;
                Store::release_staged(&self.vol, older);
                report.dropped.push((older, why));
            }
            chosen.push((pick, step));
        }
        // In commit order: steps become durable in the order they were committed, which
        // is what "latest" and retention follow.
        chosen.sort();
        for (seq, step) in chosen {
            self.check_lease()?;
            // A version retention already deleted (durable with every node's part, then
            // past keep_remote) while this node's part was on its way: nothing to add.
            let version = self.commit_header(seq)?.0.version(&self.cfg.node);
            if self.retired_version(&step).await?.as_deref() == Some(version.as_str()) {
                let why = format!(
                    "version {version} of {step} was durable and has been deleted by retention (keep_remote) since; nothing of it is uploaded again"
                );
                tracing::info!(step = %step, seq, "{why}");
                self.journal.mark_dropped(seq, &why)?;
                Store::release_staged(&self.vol, seq);
                report.dropped.push((seq, why));
                continue;
            }
            match self.upload_commit(seq, &step, &mut report).await {
                Ok(()) => {}
                Err(SyncError::Upload(UploadError::Changed { .. }))
                | Err(SyncError::Upload(UploadError::Missing { .. })) => {
                    let why = format!(
                        "a file of {step} changed or disappeared after commit {seq}; the step uploads when it commits again"
                    );
                    tracing::warn!(step = %step, seq, "{why}");
                    self.journal.mark_dropped(seq, &why)?;
                    Store::release_staged(&self.vol, seq);
                    report.dropped.push((seq, why));
                    continue;
                }
                Err(e) => return Err(e),
            }
            // 4. Part record, then the manifest if every node's part of this version is
            // in.
            if !self.parts_written.contains(&seq) {
                self.write_part(seq, &step).await?;
                self.parts_written.insert(seq);
            }
            match self.publish(seq, &step).await {
                Err(e @ SyncError::BadManifest { .. }) => {
                    // This step cannot be published as it stands; the others go on.
                    tracing::warn!(step = %step, error = %e, "step not published");
                    report.failed.push((step, e.to_string()));
                }
                Err(e) => return Err(e),
                Ok(publish::Published::Durable(etag)) => {
                    self.journal
                        .mark_durable(seq, &self.names.manifest(&step), &etag)?;
                    Store::release_staged(&self.vol, seq);
                    tracing::info!(step = %step, seq, "step durable");
                    report.durable.push(step);
                }
                Ok(publish::Published::Waiting(w)) => report.waiting.push(w),
            }
        }
        // 5. Retention.
        report.removed_locally = self.retain_local()?;
        report.removed_remotely = self.retain_remote().await?;
        let secs = started.elapsed().as_secs_f64();
        if report.uploaded_bytes > 0 {
            self.last_rate = (report.uploaded_bytes as f64 / secs.max(0.001)) as u64;
        }
        let error = report
            .failed
            .first()
            .map(|(step, e)| format!("{step}: {e}"));
        self.write_status_with(error, &report.waiting);
        Ok(report)
    }

    async fn upload_commit(
        &self,
        seq: u64,
        step: &str,
        report: &mut PassReport,
    ) -> Result<(), SyncError> {
        let done = self.journal.uploaded_paths(seq)?;
        let total = self.commit_header(seq)?.1.files;
        if (done.len() as u64) < total {
            // The objects are about to be replaced under their native names: a manifest
            // of an earlier version of this step (on any node) must not vouch for them
            // meanwhile. The step is not durable again until this commit's manifest.
            self.withdraw(step).await?;
            for older in self.journal.seqs()? {
                if older < seq
                    && self.journal.state(older) == CommitState::Durable
                    && self.commit_header(older)?.0.step == step
                {
                    self.journal.mark_dropped(
                        older,
                        &format!("superseded by commit {seq} of {step}; its manifest was withdrawn before the new upload"),
                    )?;
                }
            }
        }
        let mut reader = self.journal.read_commit(seq)?;
        let staged = self.vol.staged(seq);
        // Staged links replaced by copies (the file was rewritten in place meanwhile):
        // the copy is the committed version, under another inode.
        let relinked = self.journal.relinked(seq)?;
        let relinked = &relinked;
        let files = std::iter::from_fn(move || reader.next_file().transpose())
            .filter(|r| !matches!(r, Ok(f) if done.contains(&f.path)));
        let sent_files = AtomicU64::new(0);
        let sent_bytes = AtomicU64::new(0);
        let results = futures::stream::iter(files)
            .map(|rec| {
                let staged = &staged;
                let (sent_files, sent_bytes) = (&sent_files, &sent_bytes);
                async move {
                    let rec = rec?;
                    self.check_lease()?;
                    let name = self.names.object(step, &rec.path);
                    let local = staged.join(&rec.path);
                    let ino = match relinked.get(&rec.path) {
                        Some(&kept)
                            if fs::symlink_metadata(&local).is_ok_and(|m| {
                                use std::os::unix::fs::MetadataExt;
                                m.ino() == kept
                            }) =>
                        {
                            kept
                        }
                        _ => rec.ino,
                    };
                    let up = upload_file(
                        &*self.lake,
                        &name,
                        &local,
                        FileIdentity {
                            size: rec.size,
                            mtime_ns: rec.mtime_ns,
                            ino,
                        },
                        &self.sync.upload,
                        &|_| {},
                    )
                    .await?;
                    self.journal.append_uploaded(
                        seq,
                        &UploadedRecord {
                            path: rec.path.clone(),
                            size: up.size,
                            md5: hex(&up.md5),
                            etag: up.etag.0.clone(),
                            retracted: false,
                        },
                    )?;
                    sent_files.fetch_add(1, Ordering::Relaxed);
                    sent_bytes.fetch_add(up.size, Ordering::Relaxed);
                    Ok::<(), SyncError>(())
                }
            })
            .buffer_unordered(self.sync.parallel_files.max(1))
            .try_collect::<Vec<()>>()
            .await;
        report.uploaded_files += sent_files.load(Ordering::Relaxed);
        report.uploaded_bytes += sent_bytes.load(Ordering::Relaxed);
        results.map(|_| ())
    }

    /// Uploads a local file we wrote ourselves (part records, manifests).
    async fn put_file(&self, name: &str, path: &Path) -> Result<(), SyncError> {
        let m = fs::metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
        use std::os::unix::fs::MetadataExt;
        upload_file(
            &*self.lake,
            name,
            path,
            FileIdentity {
                size: m.len(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                ino: m.ino(),
            },
            &self.sync.upload,
            &|_| {},
        )
        .await?;
        Ok(())
    }

    fn write_status(&self, error: Option<String>) {
        self.write_status_with(error, &[]);
    }

    fn write_status_with(&self, error: Option<String>, waiting: &[Waiting]) {
        let st = self.status(error, waiting);
        match st {
            Ok(st) => {
                let b = serde_json::to_vec_pretty(&st).expect("serializable");
                if let Err(e) = write_atomic(&self.journal.status_path(), &b) {
                    tracing::warn!(error = %e, "cannot write the sync status");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot compute the sync status"),
        }
    }

    /// The header and totals of commit `seq`, read once.
    fn commit_header(&self, seq: u64) -> Result<(CommitHeader, Trailer), SyncError> {
        if let Some(v) = self.headers.lock().get(&seq) {
            return Ok(v.clone());
        }
        let r = self.journal.read_commit(seq)?;
        let header = r.header().clone();
        let t = r.totals()?;
        self.headers.lock().insert(seq, (header.clone(), t.clone()));
        Ok((header, t))
    }

    /// The status from the journal (plus what the caller knows).
    pub fn status(
        &self,
        error: Option<String>,
        waiting: &[Waiting],
    ) -> Result<SyncStatus, SyncError> {
        let mut st = SyncStatus {
            node: self.cfg.node.clone(),
            destination: self.destination.clone(),
            upload_bytes_per_sec: self.last_rate,
            waiting: waiting.to_vec(),
            expected_nodes: self.cfg.nodes,
            last_error: error,
            pid: std::process::id(),
            updated_unix_ms: now_ms(),
            ..Default::default()
        };
        // "Latest" is the step saved last (a run that restarts its step numbering has
        // its newest step latest; an old step that became durable late stays old).
        let (mut committed_at, mut durable_at) = (None, None);
        for seq in self.journal.seqs()? {
            let (h, t) = self.commit_header(seq)?;
            let key = (h.saved_unix_ms(), seq);
            let info = StepInfo {
                step: h.step.clone(),
                seq,
                files: t.files,
                bytes: t.bytes,
            };
            let latest = |slot: &mut Option<StepInfo>, at: &mut Option<(u64, u64)>| {
                if at.is_none_or(|a| a <= key) {
                    *slot = Some(info.clone());
                    *at = Some(key);
                }
            };
            match self.journal.state(seq) {
                CommitState::Durable => {
                    latest(&mut st.latest_durable, &mut durable_at);
                    latest(&mut st.latest_committed, &mut committed_at);
                }
                CommitState::Pending => {
                    let done = self.journal.uploaded(seq)?;
                    let done_bytes: u64 = done.iter().map(|u| u.size).sum();
                    st.pending_bytes += t.bytes.saturating_sub(done_bytes);
                    st.pending_files += t.files.saturating_sub(done.len() as u64);
                    st.oldest_pending_unix_ms = Some(
                        st.oldest_pending_unix_ms
                            .map_or(h.committed_unix_ms, |o| o.min(h.committed_unix_ms)),
                    );
                    latest(&mut st.latest_committed, &mut committed_at);
                }
                CommitState::Dropped(_) => {}
            }
        }
        Ok(st)
    }
}

/// A sync dropped without [`Syncer::stop`] (a task aborted, a volume forgotten) ends its
/// background tasks with it: no lease is renewed and no step announced for a sync that
/// no longer exists. Its lease expires by itself.
impl Drop for Syncer {
    fn drop(&mut self) {
        self.renewer.abort();
        self.announce_task.abort();
    }
}

/// A 128-bit hash of a path, for duplicate checks without keeping the paths.
fn path_hash(p: &str) -> u128 {
    use md5::Digest;
    u128::from_le_bytes(md5::Md5::digest(p.as_bytes()).into())
}

/// Records `error` as the volume's last error in its status (for a sync that could
/// not even start; the other fields stay as the last sync left them).
pub fn record_error(vol: &VolumeLayout, error: &str) {
    let mut st = SyncStatus::read(vol).unwrap_or_default();
    st.last_error = Some(error.to_owned());
    st.updated_unix_ms = now_ms();
    st.pid = std::process::id();
    if let Ok(j) = Journal::open(&vol.journal_dir()) {
        let _ = write_atomic(
            &j.status_path(),
            &serde_json::to_vec_pretty(&st).expect("serializable"),
        );
    }
}

/// The volume's lease id, created on first use.
fn volume_lease_id(vol: &VolumeLayout) -> Result<LeaseId, SyncError> {
    let p = vol.journal_dir().join("lease-id");
    match fs::read_to_string(&p) {
        Ok(s) if s.trim().len() == 36 => Ok(LeaseId(s.trim().to_owned())),
        _ => {
            let id = LeaseId::random();
            write_atomic(&p, id.0.as_bytes())
                .map_err(io_err(format!("writing {}", p.display())))?;
            Ok(id)
        }
    }
}

/// Acquires the lease on `blob`, creating the (empty) blob first if needed.
async fn acquire(lake: &dyn Lake, blob: &str, secs: u32, lease: &LeaseId) -> Result<(), LakeError> {
    match lake.acquire_lease(blob, Some(secs), lease).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.root(), LakeError::NotFound { .. }) => {
            match lake
                .put(
                    blob,
                    bytes::Bytes::new(),
                    &PutOptions {
                        if_none_match_any: true,
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(_) => {}
                Err(e) if matches!(e.root(), LakeError::Exists { .. }) => {}
                Err(e) => return Err(e),
            }
            lake.acquire_lease(blob, Some(secs), lease)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// The node names under a listing prefix (intents or parts of one step).
pub(crate) async fn list_nodes(
    lake: &dyn Lake,
    prefix: &str,
) -> Result<BTreeSet<String>, LakeError> {
    let mut out = BTreeSet::new();
    let mut l = Lister::new(lake, prefix);
    while let Some(page) = l.next_page().await? {
        for o in page {
            if let Some(n) = Layout::node_of(&o.name, prefix)
                && !n.contains('/')
            {
                out.insert(n.to_owned());
            }
        }
    }
    Ok(out)
}

/// Streams a whole blob into a local file (no verification: our own records).
pub(crate) async fn fetch_to(lake: &dyn Lake, name: &str, dest: &Path) -> Result<(), SyncError> {
    let meta = lake.head(name).await?;
    let mut body = lake.get_stream(name, 0..meta.size, &meta.etag).await?;
    let mut f =
        BufWriter::new(File::create(dest).map_err(io_err(format!("writing {}", dest.display())))?);
    while let Some(chunk) = body.next().await {
        f.write_all(&chunk?)
            .map_err(io_err(format!("writing {}", dest.display())))?;
    }
    f.flush()
        .map_err(io_err(format!("writing {}", dest.display())))?;
    Ok(())
}

pub(crate) fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_sync_stops_announcing_and_renewing() {
        use crate::lake::memory::MemoryLake;
        let pool = tempfile::tempdir().unwrap();
        let vol = VolumeLayout::for_url(pool.path(), "https://a.blob.core.windows.net/c/p");
        vol.create(&VolumeConfig {
            url: "https://a.blob.core.windows.net/c/p".into(),
            node: "n1".into(),
            keep_local: None,
            keep_remote: None,
            nodes: None,
            owner_uid: None,
        })
        .unwrap();
        let lake: Arc<dyn Lake> = Arc::new(MemoryLake::new());
        let s = Syncer::start(lake.clone(), vol.clone(), "p/", SyncConfig::default())
            .await
            .unwrap();
        drop(s);
        Journal::open(&vol.journal_dir())
            .unwrap()
            .mark_seen("step-1")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let names = Layout::new("p/");
        assert!(
            matches!(
                lake.head(&names.intent("step-1", "n1")).await,
                Err(e) if matches!(e.root(), LakeError::NotFound { .. })
            ),
            "a dropped sync announced a step"
        );
    }
}
