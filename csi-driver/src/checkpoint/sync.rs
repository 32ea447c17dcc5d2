//! The sync: takes committed steps from a volume's journal into the lake until they are
//! durable, and restores durable steps from it.
//!
//! One pass ([`Syncer::pass`]), repeated:
//! 1. announce every step this node writes (`intents/<step>/<node>`), so that a node
//!    publishing the step's manifest waits for this node's part; and for a step this
//!    node writes but has not committed, ask the mount to commit it if another node
//!    already put its part in (only rank 0's node sees the marker);
//! 2. for the newest pending commit of each step (older pending ones are superseded
//!    and dropped), upload each file not yet in the journal's `uploaded` log from the
//!    commit's staged links ([`upload_file`]: blocks resumed from what the lake already
//!    has), appending each to the log once it is in;
//! 3. with every file in, write this node's part record, then publish the manifest if
//!    every node with an intent has its part in; the commit is durable once the
//!    manifest is written, and only then are its staged links released;
//! 4. retention: steps beyond `keep_local` durable ones leave local disk; steps
//!    beyond `keep_remote` durable ones are deleted from the lake, manifest first (a
//!    tombstone records the deletion until it is complete).
//!
//! Crash safety: every step is idempotent and ordered so that a kill at any point
//! leaves the lake and the journal in a state the next pass continues from. No
//! manifest is written before every object it names is committed in the lake, with the
//! MD5 the manifest records; a file whose identity changed after commit is never
//! uploaded under that commit (the commit is dropped, and the step commits again when
//! its rule fires again).
//!
//! Single writer: a sync holds a lock file on the volume (one sync per pool volume on
//! this machine) and a lease on `_tidepool/nodes/<node>.lock` in the lake (one per node
//! name and destination anywhere), renewed in the background; a lost lease stops the
//! sync before its next upload. The lease id is kept in the volume's journal, so a sync
//! restarted after `kill -9` takes over its predecessor's lease at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::commit::step_number;
use super::journal::{CommitState, Journal, JournalError, UploadedRecord, write_atomic};
use super::manifest::{self, Layout, ManifestHead, ObjectRecord, PartHeader};
use super::store::{Store, VolumeConfig, VolumeLayout};
use super::upload::{
    FileIdentity, MemoryBudget, UploadConfig, UploadError, download_verified, upload_file,
};
use crate::lake::{Lake, LakeError, LeaseId, Lister, PutOptions};

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
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            parallel_files: 8,
            poll: Duration::from_secs(2),
            lease_secs: 60,
            upload: UploadConfig::default(),
            memory: 128 << 20,
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

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SyncError {
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

/// A step waiting for other nodes' parts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub step: String,
    pub nodes: Vec<String>,
}

/// What `tidepool sync status` shows (written to the journal after every pass).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub node: String,
    pub destination: String,
    pub latest_committed: Option<StepInfo>,
    pub latest_durable: Option<StepInfo>,
    /// Bytes and files committed and not yet in the lake.
    pub pending_bytes: u64,
    pub pending_files: u64,
    /// Upload rate over the last pass that sent anything.
    pub upload_bytes_per_sec: u64,
    pub waiting: Vec<Waiting>,
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

use super::store::now_ms;
use super::upload::hex;

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
    /// Announces the steps this node writes as soon as the mount notes them, apart from
    /// the passes (which may be busy uploading for minutes).
    announcer: tokio::task::JoinHandle<()>,
    intents: Arc<parking_lot::Mutex<HashSet<String>>>,
    /// Parts this process already wrote, by commit.
    parts_written: HashSet<u64>,
    /// Step and totals of each commit read so far (commit files never change).
    totals: parking_lot::Mutex<std::collections::HashMap<u64, (String, super::journal::Trailer)>>,
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
        let intents = Arc::new(parking_lot::Mutex::new(HashSet::new()));
        let announcer = {
            let (lake, journal, names, node, intents) = (
                lake.clone(),
                journal.clone(),
                names.clone(),
                cfg.node.clone(),
                intents.clone(),
            );
            tokio::spawn(async move {
                loop {
                    if let Err(e) = announce(&*lake, &journal, &names, &node, &intents).await {
                        tracing::debug!(error = %e, "announcing steps failed; trying again");
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
            intents,
            parts_written: HashSet::new(),
            totals: Default::default(),
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
        self.announcer.abort();
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

    /// One pass over the journal (see the module docs).
    pub async fn pass(&mut self) -> Result<PassReport, SyncError> {
        self.check_lease()?;
        let mut report = PassReport::default();
        let started = Instant::now();
        // 1. Intents (also announced in the background as soon as they appear).
        announce(
            &*self.lake,
            &self.journal,
            &self.names,
            &self.cfg.node,
            &self.intents,
        )
        .await?;
        // 1b. Steps this node writes and has not committed: if another node committed
        // its part, ask the mount to commit ours as soon as its files are closed.
        self.follow_peers().await?;
        // 2. The newest pending commit of each step; older pending ones are superseded.
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        let mut pending = Vec::new();
        for seq in self.journal.seqs()? {
            let step = self.commit_totals(seq)?.0;
            if self.journal.state(seq) == CommitState::Pending {
                pending.push((seq, step.clone()));
            }
            let e = newest.entry(step).or_default();
            *e = (*e).max(seq);
        }
        for (seq, step) in pending {
            self.check_lease()?;
            if newest[&step] != seq {
                let why = format!("superseded by commit {} of {step}", newest[&step]);
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
            // 3. Part record, then the manifest if every node is in.
            if !self.parts_written.contains(&seq) {
                self.write_part(seq, &step).await?;
                self.parts_written.insert(seq);
            }
            let published = match self.publish(&step).await {
                Err(e @ SyncError::BadManifest { .. }) => {
                    // This step cannot be published as it stands; the others go on.
                    tracing::warn!(step = %step, error = %e, "step not published");
                    report.failed.push((step, e.to_string()));
                    continue;
                }
                r => r?,
            };
            match published {
                None => {
                    self.journal
                        .mark_durable(seq, &self.names.manifest(&step))?;
                    Store::release_staged(&self.vol, seq);
                    tracing::info!(step = %step, seq, "step durable");
                    report.durable.push(step);
                }
                Some(missing) => report.waiting.push(Waiting {
                    step,
                    nodes: missing,
                }),
            }
        }
        // 4. Retention.
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

    async fn follow_peers(&self) -> Result<(), SyncError> {
        let mut committed: HashSet<String> = HashSet::new();
        for seq in self.journal.seqs()? {
            if !matches!(self.journal.state(seq), CommitState::Dropped(_)) {
                committed.insert(self.commit_totals(seq)?.0);
            }
        }
        for step in self.journal.seen()? {
            if committed.contains(&step) {
                continue;
            }
            let parts = list_nodes(&*self.lake, &self.names.parts(&step)).await?;
            if let Some(peer) = parts.iter().find(|n| **n != self.cfg.node) {
                self.journal.request_commit(&step, peer)?;
            }
        }
        Ok(())
    }

    async fn upload_commit(
        &self,
        seq: u64,
        step: &str,
        report: &mut PassReport,
    ) -> Result<(), SyncError> {
        let done = self.journal.uploaded_paths(seq)?;
        let total = self.commit_totals(seq)?.1.files;
        if (done.len() as u64) < total {
            // The objects are about to be replaced under their native names: a manifest
            // of an earlier commit of this step (on any node) must not vouch for them
            // meanwhile. The step is not durable again until this commit's manifest.
            self.lake.delete(&self.names.manifest(step)).await?;
            for older in self.journal.seqs()? {
                if older < seq
                    && self.journal.state(older) == CommitState::Durable
                    && self.commit_totals(older)?.0 == step
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
                    let up = upload_file(
                        &*self.lake,
                        &name,
                        &staged.join(&rec.path),
                        FileIdentity {
                            size: rec.size,
                            mtime_ns: rec.mtime_ns,
                            ino: rec.ino,
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

    async fn write_part(&self, seq: u64, step: &str) -> Result<(), SyncError> {
        let header = self.journal.read_commit(seq)?.header().clone();
        let tmp = self.vol.journal_dir().join(format!("{seq:012}.part"));
        let what = || format!("writing the part record {}", tmp.display());
        {
            let mut out = BufWriter::new(File::create(&tmp).map_err(io_err(what()))?);
            // Two passes over the upload log (the header carries the totals); a path
            // logged twice (uploaded again after a torn line) counts once. Memory: one
            // 16-byte hash per file.
            let (mut files, mut bytes, mut seen) = (0u64, 0u64, HashSet::new());
            self.journal.for_each_uploaded(seq, |u| {
                if seen.insert(path_hash(&u.path)) {
                    files += 1;
                    bytes += u.size;
                }
                Ok(())
            })?;
            let head = PartHeader {
                step: step.to_owned(),
                node: self.cfg.node.clone(),
                seq,
                reason: header.reason.clone(),
                files,
                bytes,
            };
            serde_json::to_writer(&mut out, &head).expect("serializable");
            out.write_all(b"\n").map_err(io_err(what()))?;
            let mut seen = HashSet::new();
            let mut write_err = None;
            self.journal.for_each_uploaded(seq, |u| {
                if seen.insert(path_hash(&u.path)) && write_err.is_none() {
                    let rec = ObjectRecord {
                        path: u.path,
                        size: u.size,
                        md5: u.md5,
                        node: String::new(),
                    };
                    serde_json::to_writer(&mut out, &rec).expect("serializable");
                    if let Err(e) = out.write_all(b"\n") {
                        write_err = Some(e);
                    }
                }
                Ok(())
            })?;
            if let Some(e) = write_err {
                return Err(io_err(what())(e));
            }
            out.into_inner()
                .map_err(|e| io_err(what())(e.into_error()))?
                .sync_all()
                .map_err(io_err(what()))?;
        }
        self.put_file(&self.names.part(step, &self.cfg.node), &tmp)
            .await?;
        let _ = fs::remove_file(&tmp);
        Ok(())
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

    /// Publishes the manifest of `step` if every node with an intent has its part in;
    /// otherwise returns the nodes still missing.
    async fn publish(&self, step: &str) -> Result<Option<Vec<String>>, SyncError> {
        let intents = list_nodes(&*self.lake, &self.names.intents(step)).await?;
        let parts = list_nodes(&*self.lake, &self.names.parts(step)).await?;
        let missing: Vec<String> = intents.difference(&parts).cloned().collect();
        if !missing.is_empty() {
            return Ok(Some(missing));
        }
        let tmp = self
            .vol
            .journal_dir()
            .join(format!("manifest-{step}.json.part"));
        let what = || format!("writing the manifest {}", tmp.display());
        {
            let mut out = BufWriter::new(File::create(&tmp).map_err(io_err(what()))?);
            // Each part is fetched to a local file and read back line by line, so a
            // step of any size is merged with one line in memory.
            let mut part_files = Vec::new();
            for node in &parts {
                let local = self
                    .vol
                    .journal_dir()
                    .join(format!("part-{node}.jsonl.part"));
                fetch_to(&*self.lake, &self.names.part(step, node), &local).await?;
                part_files.push((node.clone(), local));
            }
            let mut readers = part_files.iter();
            let mut current: Option<(String, std::io::Lines<BufReader<File>>)> = None;
            // Path hash → (MD5 hash, node): two nodes may both log a file only if it is
            // the same content (then it is listed once).
            let mut seen: std::collections::HashMap<u128, (u128, String)> = Default::default();
            let mut next = || -> io::Result<Option<ObjectRecord>> {
                loop {
                    if let Some((node, lines)) = &mut current {
                        match lines.next() {
                            Some(l) => {
                                let l = l?;
                                if l.is_empty() {
                                    continue;
                                }
                                let mut o: ObjectRecord =
                                    serde_json::from_str(&l).map_err(io::Error::other)?;
                                o.node = node.clone();
                                let md5h = path_hash(&o.md5);
                                match seen.get(&path_hash(&o.path)) {
                                    Some((m, _)) if *m == md5h => continue,
                                    Some((_, other)) => {
                                        return Err(io::Error::other(format!(
                                            "nodes {other} and {node} both wrote {} with different content; give each rank its own file names",
                                            o.path
                                        )));
                                    }
                                    None => {
                                        seen.insert(path_hash(&o.path), (md5h, node.clone()));
                                    }
                                }
                                return Ok(Some(o));
                            }
                            None => current = None,
                        }
                    }
                    let Some((node, path)) = readers.next() else {
                        return Ok(None);
                    };
                    let mut lines = BufReader::new(File::open(path)?).lines();
                    // The header line.
                    let _: PartHeader =
                        serde_json::from_str(&lines.next().transpose()?.unwrap_or_default())
                            .map_err(|e| io::Error::other(format!("part record of {node}: {e}")))?;
                    current = Some((node.clone(), lines));
                }
            };
            use std::io::BufRead;
            let head = ManifestHead {
                format: manifest::FORMAT.into(),
                step: step.to_owned(),
                step_number: step_number(step),
                created_unix_ms: now_ms(),
                nodes: parts.iter().cloned().collect(),
                files: 0,
                bytes: 0,
            };
            manifest::write_manifest(&mut out, &head, &mut next).map_err(|e| {
                SyncError::BadManifest {
                    step: step.to_owned(),
                    detail: e.to_string(),
                }
            })?;
            out.into_inner()
                .map_err(|e| io_err(what())(e.into_error()))?
                .sync_all()
                .map_err(io_err(what()))?;
            for (_, p) in &part_files {
                let _ = fs::remove_file(p);
            }
        }
        // Every object as the manifest names it, in the lake now: a writer that
        // replaced one meanwhile (a later commit of the step, elsewhere) stops this
        // manifest instead of making it vouch for other bytes.
        self.verify_in_lake(step, &tmp).await?;
        self.check_lease()?;
        self.put_file(&self.names.manifest(step), &tmp).await?;
        let _ = fs::remove_file(&tmp);
        Ok(None)
    }

    /// Checks each object of the manifest file `local` against the lake's size and
    /// Content-MD5 (8 requests at a time, one manifest entry in memory per request).
    async fn verify_in_lake(&self, step: &str, local: &Path) -> Result<(), SyncError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<ObjectRecord>(16);
        let parse = {
            let local = local.to_owned();
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                let f = File::open(&local)?;
                manifest::read_manifest(BufReader::new(f), |o| {
                    tx.blocking_send(o).map_err(|_| io::Error::other("stopped"))
                })
                .map(|_| ())
            })
        };
        let checked = tokio_stream_from(rx)
            .map(|o| async move {
                let name = self.names.object(step, &o.path);
                let meta = self.lake.head(&name).await?;
                let md5 = meta.content_md5.map(|m| hex(&m));
                if meta.size != o.size || md5.as_deref() != Some(o.md5.as_str()) {
                    return Err(SyncError::BadManifest {
                        step: step.to_owned(),
                        detail: format!(
                            "{name} in the lake is {} bytes with MD5 {}, the part record says {} bytes with MD5 {}: it was replaced since it was uploaded; the step is published when it commits again",
                            meta.size,
                            md5.as_deref().unwrap_or("none"),
                            o.size,
                            o.md5
                        ),
                    });
                }
                Ok(())
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await;
        let parsed = parse
            .await
            .map_err(|e| io_err("reading the manifest")(io::Error::other(e)))?;
        checked?;
        parsed.map_err(|e| SyncError::BadManifest {
            step: step.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Moves durable steps beyond `keep_local` out of the tree (newest kept by step
    /// number, then commit order; steps without a number are never moved). A step with
    /// a pending commit is never removed.
    fn retain_local(&self) -> Result<Vec<String>, SyncError> {
        let Some(keep) = self.cfg.keep_local else {
            return Ok(Vec::new());
        };
        let mut durable: BTreeMap<String, u64> = BTreeMap::new();
        let mut pending: BTreeSet<String> = BTreeSet::new();
        let mut seqs_of: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for seq in self.journal.seqs()? {
            let step = self.commit_totals(seq)?.0;
            seqs_of.entry(step.clone()).or_default().push(seq);
            match self.journal.state(seq) {
                CommitState::Durable => {
                    let e = durable.entry(step).or_default();
                    *e = (*e).max(seq);
                }
                CommitState::Pending => {
                    pending.insert(step);
                }
                CommitState::Dropped(_) => {}
            }
        }
        // Numbered steps only, by number: `final` or `best` never leave automatically.
        let mut order: Vec<(Option<u64>, u64, String)> = durable
            .into_iter()
            .filter(|(s, _)| !pending.contains(s) && step_number(s).is_some())
            .map(|(s, seq)| (step_number(&s), seq, s))
            .collect();
        order.sort();
        let n = order.len().saturating_sub(keep as usize);
        let mut removed = Vec::new();
        for (_, _, step) in order.into_iter().take(n) {
            let src = self.vol.tree().join(&step);
            if src.exists() {
                let dst = self.vol.trash().join(format!("{step}-{}", now_ms()));
                fs::create_dir_all(self.vol.trash())
                    .map_err(io_err("creating the trash directory"))?;
                fs::rename(&src, &dst).map_err(io_err(format!(
                    "moving {} out of the volume",
                    src.display()
                )))?;
                fs::remove_dir_all(&dst).map_err(io_err(format!("removing {}", dst.display())))?;
                tracing::info!(step = %step, "durable step left local disk (retention); it stays in the lake");
            }
            for seq in seqs_of.remove(&step).unwrap_or_default() {
                Store::release_staged(&self.vol, seq);
                self.journal.forget(seq)?;
            }
            self.journal.unmark_seen(&step);
            removed.push(step);
        }
        Ok(removed)
    }

    /// Deletes durable steps beyond `keep_remote` from the lake (oldest by step
    /// number): tombstone, then the manifest, then the objects, parts and intents, then
    /// the tombstone. Deletions a crash interrupted are finished first.
    async fn retain_remote(&self) -> Result<Vec<String>, SyncError> {
        let mut removed = Vec::new();
        let tombstones: Vec<String> = {
            let mut v = Vec::new();
            let mut l = Lister::new(&*self.lake, &self.names.tombstones());
            while let Some(page) = l.next_page().await? {
                for o in page {
                    if let Some(step) = o
                        .name
                        .strip_prefix(&self.names.tombstones())
                        .and_then(|n| n.strip_suffix(".json"))
                    {
                        v.push(step.to_owned());
                    }
                }
            }
            v
        };
        for step in tombstones {
            self.finish_deletion(&step).await?;
            removed.push(step);
        }
        let Some(keep) = self.cfg.keep_remote else {
            return Ok(removed);
        };
        // Only numbered steps are ordered for retention; a step named without a number
        // (`final`, `best`) is never deleted automatically.
        let steps: Vec<String> = durable_steps(&*self.lake, &self.names)
            .await?
            .into_iter()
            .filter(|(_, n)| n.is_some())
            .map(|(s, _)| s)
            .collect();
        let n = steps.len().saturating_sub(keep as usize);
        for step in steps.into_iter().take(n) {
            self.check_lease()?;
            let local = self
                .vol
                .journal_dir()
                .join(format!("tombstone-{step}.json.part"));
            fetch_to(&*self.lake, &self.names.manifest(&step), &local).await?;
            self.put_file(&self.names.tombstone(&step), &local).await?;
            let _ = fs::remove_file(&local);
            // From here on no reader trusts the step.
            self.lake.delete(&self.names.manifest(&step)).await?;
            self.finish_deletion(&step).await?;
            tracing::info!(step = %step, "durable step deleted from the lake (keep_remote)");
            removed.push(step);
        }
        Ok(removed)
    }

    /// Deletes what the tombstone of `step` lists, its records, then the tombstone.
    async fn finish_deletion(&self, step: &str) -> Result<(), SyncError> {
        let local = self
            .vol
            .journal_dir()
            .join(format!("tombstone-{step}.json.part"));
        fetch_to(&*self.lake, &self.names.tombstone(step), &local).await?;
        // The manifest goes first (a crash may have come before it did).
        self.lake.delete(&self.names.manifest(step)).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ObjectRecord>(64);
        let parse = {
            let local = local.clone();
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                let f = File::open(&local)?;
                manifest::read_manifest(BufReader::new(f), |o| {
                    tx.blocking_send(o).map_err(|_| io::Error::other("stopped"))
                })
                .map(|_| ())
            })
        };
        let mut failed = None;
        while let Some(o) = rx.recv().await {
            if failed.is_none()
                && let Err(e) = self.lake.delete(&self.names.object(step, &o.path)).await
            {
                failed = Some(e);
            }
        }
        let parsed = parse
            .await
            .map_err(|e| io_err("reading a tombstone")(io::Error::other(e)))?;
        let _ = fs::remove_file(&local);
        if let Some(e) = failed {
            return Err(e.into());
        }
        parsed.map_err(|e| SyncError::BadManifest {
            step: step.to_owned(),
            detail: e.to_string(),
        })?;
        for prefix in [self.names.parts(step), self.names.intents(step)] {
            let mut names = Vec::new();
            let mut l = Lister::new(&*self.lake, &prefix);
            while let Some(page) = l.next_page().await? {
                names.extend(page.into_iter().map(|o| o.name));
            }
            for n in names {
                self.lake.delete(&n).await?;
            }
        }
        self.lake.delete(&self.names.tombstone(step)).await?;
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

    /// The step and totals of commit `seq`, read once.
    fn commit_totals(&self, seq: u64) -> Result<(String, super::journal::Trailer), SyncError> {
        if let Some(v) = self.totals.lock().get(&seq) {
            return Ok(v.clone());
        }
        let r = self.journal.read_commit(seq)?;
        let step = r.header().step.clone();
        let t = r.totals()?;
        self.totals.lock().insert(seq, (step.clone(), t.clone()));
        Ok((step, t))
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
            last_error: error,
            pid: std::process::id(),
            updated_unix_ms: now_ms(),
            ..Default::default()
        };
        for seq in self.journal.seqs()? {
            let (step, t) = self.commit_totals(seq)?;
            let info = StepInfo {
                step,
                seq,
                files: t.files,
                bytes: t.bytes,
            };
            // "Latest" is by step number (then commit order), as restore picks it.
            let later = |cur: &Option<StepInfo>| {
                cur.as_ref().is_none_or(|c| {
                    (step_number(&info.step), info.seq) >= (step_number(&c.step), c.seq)
                })
            };
            match self.journal.state(seq) {
                CommitState::Durable if later(&st.latest_durable) => {
                    st.latest_durable = Some(info.clone())
                }
                CommitState::Durable => {}
                CommitState::Pending => {
                    let done = self.journal.uploaded(seq)?;
                    let done_bytes: u64 = done.iter().map(|u| u.size).sum();
                    st.pending_bytes += t.bytes.saturating_sub(done_bytes);
                    st.pending_files += t.files.saturating_sub(done.len() as u64);
                }
                CommitState::Dropped(_) => {}
            }
            if !matches!(self.journal.state(seq), CommitState::Dropped(_))
                && later(&st.latest_committed)
            {
                st.latest_committed = Some(info);
            }
        }
        Ok(st)
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

/// Puts an intent record for every step this node wrote into and has not announced.
async fn announce(
    lake: &dyn Lake,
    journal: &Journal,
    names: &Layout,
    node: &str,
    done: &parking_lot::Mutex<HashSet<String>>,
) -> Result<(), SyncError> {
    for step in journal.seen()? {
        if done.lock().contains(&step) {
            continue;
        }
        lake.put(
            &names.intent(&step, node),
            bytes::Bytes::new(),
            &PutOptions::default(),
        )
        .await?;
        done.lock().insert(step);
    }
    Ok(())
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
async fn list_nodes(lake: &dyn Lake, prefix: &str) -> Result<BTreeSet<String>, LakeError> {
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
async fn fetch_to(lake: &dyn Lake, name: &str, dest: &Path) -> Result<(), SyncError> {
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

/// Which step `tidepool restore` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepChoice {
    Latest,
    /// A step by name (`step-1000`) or number (`1000`).
    Named(String),
}

/// The durable steps under a destination: (step, step number), in order.
pub async fn durable_steps(
    lake: &dyn Lake,
    names: &Layout,
) -> Result<Vec<(String, Option<u64>)>, LakeError> {
    let mut out = Vec::new();
    let mut l = Lister::new(lake, &names.manifests());
    while let Some(page) = l.next_page().await? {
        for o in page {
            match names.step_of_manifest(&o.name) {
                Some(s) if valid_step_name(s) => {
                    out.push((s.to_owned(), step_number(s), o.last_modified))
                }
                Some(_) | None => {
                    tracing::warn!(name = %o.name, "ignoring a manifest whose step name is not a single directory name")
                }
            }
        }
    }
    // Unnumbered steps first, oldest manifest first; then numbered ones by number: the
    // last is the latest (the highest number, or the newest step if none has one).
    out.sort_by(|a, b| (a.1.is_some(), a.1, a.2, &a.0).cmp(&(b.1.is_some(), b.1, b.2, &b.0)));
    Ok(out.into_iter().map(|(s, n, _)| (s, n)).collect())
}

/// A step name must be one plain directory name (it becomes a local path on restore).
fn valid_step_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub step: String,
    pub files: u64,
    pub bytes: u64,
    pub dir: PathBuf,
}

/// A path from a manifest, checked to stay inside the step directory.
fn safe_rel(step: &str, p: &str) -> Result<PathBuf, SyncError> {
    let path = Path::new(p);
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(SyncError::BadManifest {
            step: step.to_owned(),
            detail: format!("object path {p:?} leaves the step directory; refusing it"),
        });
    }
    Ok(path.to_path_buf())
}

/// Downloads durable step `choice` into `dir/<step>/`, every file verified against the
/// manifest's size and MD5. Refuses a step without a manifest.
pub async fn restore(
    lake: &dyn Lake,
    prefix: &str,
    destination: &str,
    dir: &Path,
    choice: &StepChoice,
    parallel: usize,
) -> Result<Restored, SyncError> {
    let names = Layout::new(prefix);
    let step = match choice {
        StepChoice::Latest => durable_steps(lake, &names)
            .await?
            .pop()
            .map(|(s, _)| s)
            .ok_or_else(|| SyncError::NoSteps {
                destination: destination.to_owned(),
            })?,
        StepChoice::Named(s) => {
            let steps = durable_steps(lake, &names).await?;
            if let Some((found, _)) = steps.iter().find(|(n, _)| n == s) {
                found.clone()
            } else if let Ok(n) = s.parse::<u64>()
                && let Some((found, _)) = steps.iter().rev().find(|(_, num)| *num == Some(n))
            {
                found.clone()
            } else {
                return Err(SyncError::NotDurable {
                    step: s.clone(),
                    destination: destination.to_owned(),
                });
            }
        }
    };
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let local = dir.join(format!(".tidepool-manifest-{step}.json"));
    fetch_to(lake, &names.manifest(&step), &local).await?;
    let target = dir.join(&step);
    // The objects, read from the manifest one at a time and downloaded `parallel` at
    // a time: a channel of bounded depth between the parser and the downloads.
    let (tx, rx) = tokio::sync::mpsc::channel::<ObjectRecord>(parallel.max(1) * 2);
    let parse = {
        let local = local.clone();
        let step = step.clone();
        tokio::task::spawn_blocking(move || -> Result<ManifestHead, SyncError> {
            let f = File::open(&local).map_err(io_err(format!("reading {}", local.display())))?;
            manifest::read_manifest(BufReader::new(f), |o| {
                tx.blocking_send(o)
                    .map_err(|_| io::Error::other("restore stopped"))
            })
            .map_err(|e| SyncError::BadManifest {
                step: step.clone(),
                detail: e.to_string(),
            })
        })
    };
    let files = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let downloads = tokio_stream_from(rx)
        .map(|o| {
            let (target, step, names, files, bytes) = (&target, &step, &names, &files, &bytes);
            async move {
                let rel = safe_rel(step, &o.path)?;
                let dest = target.join(&rel);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)
                        .map_err(io_err(format!("creating {}", parent.display())))?;
                }
                let md5 = parse_hex_md5(&o.md5).ok_or_else(|| SyncError::BadManifest {
                    step: step.clone(),
                    detail: format!("{}: MD5 {:?} is not 32 hex digits", o.path, o.md5),
                })?;
                download_verified(lake, &names.object(step, &o.path), &dest, o.size, md5).await?;
                files.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(o.size, Ordering::Relaxed);
                Ok::<(), SyncError>(())
            }
        })
        .buffer_unordered(parallel.max(1))
        .try_collect::<Vec<()>>()
        .await;
    let head = parse.await.map_err(|e| SyncError::Io {
        what: "reading the manifest".into(),
        source: io::Error::other(e),
    });
    let _ = fs::remove_file(&local);
    downloads?;
    let head = head??;
    if head.step != step {
        return Err(SyncError::BadManifest {
            detail: format!("it names step {:?}, not {step:?}", head.step),
            step,
        });
    }
    let (files, bytes) = (files.into_inner(), bytes.into_inner());
    if files != head.files || bytes != head.bytes {
        return Err(SyncError::BadManifest {
            step,
            detail: format!(
                "it lists {} files / {} bytes in total, its objects {files} / {bytes}",
                head.files, head.bytes
            ),
        });
    }
    Ok(Restored {
        step,
        files,
        bytes,
        dir: target,
    })
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn parse_hex_md5(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_never_leave_the_step() {
        assert!(safe_rel("s", "a/b.pt").is_ok());
        assert!(safe_rel("s", "../etc/passwd").is_err());
        assert!(safe_rel("s", "/etc/passwd").is_err());
        assert_eq!(safe_rel("s", "a/./b").unwrap(), PathBuf::from("a/b"));
        assert!(safe_rel("s", "").is_err());
    }

    #[test]
    fn md5_hex_round_trips() {
        let m = [
            0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
            0x42, 0x7e,
        ];
        assert_eq!(parse_hex_md5(&hex(&m)), Some(m));
        assert_eq!(parse_hex_md5("xyz"), None);
    }
}
