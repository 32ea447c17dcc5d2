//! The checkpoint store: one volume's directory in the pool, the commit rules applied
//! to what the tree reports, and commits written to the journal.
//!
//! Layout of a volume, `<cache-dir>/checkpoints/<volume-id>/`:
//! - `volume.json`: where its steps go ([`VolumeConfig`]; never a credential), so that
//!   `tidepool sync --cache-dir` finds every volume of a pool on its own;
//! - `tree/`: the files as the training job sees them (served by [`CheckpointTree`]);
//!   created with mode 0777, so a job of any uid can create its steps;
//! - `staged/<seq>/`: hard links to the files of commit `seq`, taken at commit. The
//!   sync uploads from here, so a step the job deletes (frameworks rotate old
//!   checkpoints) before it is durable still uploads; the links go when the commit is
//!   durable or dropped. A file rewritten in place after commit changes its identity
//!   (size, mtime), which the upload checks: it is never uploaded as that commit.
//! - `journal/`: see [`super::journal`];
//! - `trash/`: steps retention removed from `tree/`, deleted in the background.
//!
//! Invariant: a commit's journal record is written only after every one of its files
//! has a staged link, and a staged link is removed only after the commit is durable or
//! dropped. So every pending commit can be uploaded from `staged/` alone, after any crash.
//!
//! [`CheckpointTree`]: super::tree::CheckpointTree

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::commit::{CommitRule, Committer, Due, Reason, is_temporary, orbax_final_name};
use super::journal::{CommitHeader, CommitState, FileRecord, Journal, JournalError};
use super::tree::{OpenWriters, StepEvents, TreeEvent};

/// What a volume is, as `volume.json` records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// The destination, as the user gave it, without any credential (a SAS query
    /// string is never stored).
    pub url: String,
    /// This node's name in part records and leases.
    pub node: String,
    /// Durable steps kept on local disk (older ones leave it); `None` keeps all.
    pub keep_local: Option<u32>,
    /// Durable steps kept in the lake (older ones are deleted, manifest first);
    /// `None` keeps all.
    pub keep_remote: Option<u32>,
    /// The number of nodes that write each step (`--nodes`, `spec.commit.nodes`): a
    /// manifest waits for that many nodes' parts of one version, whether or not they
    /// are running. `None`: it waits for the nodes that announced the step, after a
    /// settle window (a node whose sync never ran can be missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// The uid of the `CheckpointSync` this volume belongs to, once the node agent has
    /// served or synced it for one (`None` on a VM). Only such a volume is removed from
    /// the pool when its `CheckpointSync`'s assignment goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<String>,
}

/// Paths of one volume's directory.
#[derive(Clone, Debug)]
pub struct VolumeLayout {
    pub dir: PathBuf,
}

impl VolumeLayout {
    /// The volume for destination `url` in pool `cache_dir`: the directory name is a
    /// readable slug of the URL plus a short hash, so two destinations never share one.
    pub fn for_url(cache_dir: &Path, url: &str) -> VolumeLayout {
        use sha2::Digest;
        let h = sha2::Sha256::digest(url.as_bytes());
        let slug: String = url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        VolumeLayout {
            dir: cache_dir.join("checkpoints").join(format!(
                "{slug}-{:02x}{:02x}{:02x}{:02x}",
                h[0], h[1], h[2], h[3]
            )),
        }
    }

    /// Every volume in a pool.
    pub fn all(cache_dir: &Path) -> io::Result<Vec<VolumeLayout>> {
        let d = cache_dir.join("checkpoints");
        let mut v = Vec::new();
        match fs::read_dir(&d) {
            Ok(entries) => {
                for e in entries {
                    let e = e?;
                    // A dot name is a volume being removed (see the agent).
                    if e.file_name().as_encoded_bytes().starts_with(b".") {
                        continue;
                    }
                    if e.path().join("volume.json").exists() {
                        v.push(VolumeLayout { dir: e.path() });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        v.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(v)
    }

    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }
    pub fn staged(&self, seq: u64) -> PathBuf {
        self.dir.join("staged").join(format!("{seq:012}"))
    }
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }
    pub fn trash(&self) -> PathBuf {
        self.dir.join("trash")
    }
    /// Marks a step directory retention is removing (see [`StepEvents::read_only`]).
    pub fn retiring(&self, dir: &OsStr) -> PathBuf {
        self.journal_dir().join("retiring").join(dir)
    }
    pub fn mount_status_path(&self) -> PathBuf {
        self.journal_dir().join("mount.json")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("volume.json")
    }

    pub fn read_config(&self) -> io::Result<VolumeConfig> {
        let b = fs::read(self.config_path())?;
        serde_json::from_slice(&b).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.config_path().display()),
            )
        })
    }

    /// Creates the directories and writes `volume.json`. A volume already bound to
    /// another node name is refused (its journal belongs to that node).
    pub fn create(&self, cfg: &VolumeConfig) -> io::Result<()> {
        let fresh = !self.tree().exists();
        for d in [
            self.tree(),
            self.dir.join("staged"),
            self.journal_dir(),
            self.trash(),
        ] {
            fs::create_dir_all(d)?;
        }
        use std::os::unix::fs::PermissionsExt;
        if fresh {
            // The volume's root is open to every user, like a fresh scratch disk: pods
            // run as arbitrary uids, and each file and directory they create is theirs
            // (owner and mode as they ask). They reach it through the mount only.
            fs::set_permissions(self.tree(), fs::Permissions::from_mode(0o777))?;
        }
        // On the host, only the server's user (root on a node) may enter the volume's
        // directory: nobody else can read a checkpoint, or swap a file or a symbolic
        // link into the tree or the staged commits while they are uploaded.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        if let Ok(old) = self.read_config()
            && old.node != cfg.node
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} holds checkpoints of node {:?}, not {:?}: use that --node-name, or another --cache-dir",
                    self.dir.display(),
                    old.node,
                    cfg.node
                ),
            ));
        }
        let b = serde_json::to_vec_pretty(cfg).expect("serializable");
        super::journal::write_atomic(&self.config_path(), &b)
    }
}

/// What a running mount reports about its volume (`journal/mount.json`; removed when
/// the mount stops).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStatus {
    pub pid: u32,
    /// Steps written and not committed (no rule fired yet, or a file still open).
    pub uncommitted: Vec<String>,
    /// Versions of steps led by other nodes that this node would not take its part of,
    /// in words (the latest few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    pub updated_unix_ms: u64,
}

impl MountStatus {
    /// The status of the mount running now (a file left by a killed mount is ignored).
    pub fn read(vol: &VolumeLayout) -> Option<MountStatus> {
        let st: MountStatus =
            serde_json::from_slice(&fs::read(vol.mount_status_path()).ok()?).ok()?;
        Path::new(&format!("/proc/{}", st.pid))
            .exists()
            .then_some(st)
    }
}

/// Errors of the store; they name the step and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("committing {step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "committing {step}: {path:?} is not a UTF-8 name, which the lake cannot hold; rename it"
    )]
    NotUtf8 { step: String, path: PathBuf },
}

/// One commit made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    pub step: String,
    pub reason: String,
    pub files: u64,
    pub bytes: u64,
}

/// How long a removal from a finished step waits for the step's files to be
/// released before it goes ahead without committing it (see `Store::before_remove`).
pub const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The store of one mounted volume.
pub struct Store {
    layout: VolumeLayout,
    journal: Journal,
    committer: Mutex<Committer>,
    seen: Mutex<HashSet<OsString>>,
    /// Serialises commits (the ticker, and `commit_now` from tests and shutdown).
    committing: Mutex<()>,
    /// Serialises [`Store::keep_committed`].
    keeping: Mutex<()>,
    /// The latest versions this node refused to follow, in words (for status).
    refused: Mutex<std::collections::VecDeque<String>>,
    /// Woken after each commit (the in-process sync waits on it).
    pub on_commit: tokio::sync::Notify,
    /// Woken when a step is first written (the in-process sync announces it at once).
    pub on_seen: tokio::sync::Notify,
    writers: OnceLock<Weak<dyn OpenWriters>>,
    /// [`StepEvents::durable_version`]'s answers, with when they were found.
    durable_versions: Mutex<HashMap<OsString, (Instant, Option<crate::lake::ETag>)>>,
}

impl Store {
    /// Opens the volume's store and looks at what is already on disk: a step with a
    /// marker at its root and no commit since its last change commits at once (the
    /// marker may have been written just before a crash).
    pub fn open(layout: VolumeLayout, rule: CommitRule) -> Result<Store, StoreError> {
        let journal = Journal::open(&layout.journal_dir())?;
        journal.remove_partial_commits()?;
        let mut committer = Committer::new(rule.clone());
        let now = Instant::now();
        // The newest commit of each step: (time, seq).
        let mut last_commit: std::collections::HashMap<String, (u64, u64)> = Default::default();
        for seq in journal.seqs()? {
            let r = journal.read_commit(seq)?;
            let h = r.header();
            let e = last_commit.entry(h.step.clone()).or_default();
            *e = (*e).max((h.committed_unix_ms, seq));
        }
        let tree = layout.tree();
        if let Ok(entries) = fs::read_dir(&tree) {
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                let newest = newest_mtime_ms(&e.path()).unwrap_or(u64::MAX);
                let last = name.to_str().and_then(|n| last_commit.get(n)).copied();
                let committed = last.is_some_and(|(t, _)| t >= newest);
                // A marker the step's last commit already holds is that version's: the
                // step changed since (rewritten in place, and the writer died before
                // its new marker), so it is not complete, whatever the old marker says.
                let marker = rule
                    .markers
                    .iter()
                    .find(|m| {
                        let path = e.path().join(m);
                        path.is_file()
                            && !last.is_some_and(|(_, seq)| {
                                in_commit(&journal, seq, m, &path).unwrap_or(false)
                            })
                    })
                    .cloned();
                // A step a rename made, not committed since: it commits as renamed (the
                // rename's commit was lost with the process).
                let renamed = name
                    .to_str()
                    .and_then(|n| journal.renamed_from(n))
                    .filter(|(_, at)| !committed && last.is_none_or(|(t, _)| t < *at));
                let reason = match renamed {
                    Some((from, _)) => Some(Reason::Renamed { from: from.into() }),
                    None => marker.map(Reason::Marker),
                };
                committer.found_on_disk(&name, reason, committed, newest, now);
            }
        }
        Ok(Store {
            layout,
            journal,
            committer: Mutex::new(committer),
            seen: Mutex::new(HashSet::new()),
            committing: Mutex::new(()),
            keeping: Mutex::new(()),
            refused: Mutex::new(Default::default()),
            on_commit: tokio::sync::Notify::new(),
            on_seen: tokio::sync::Notify::new(),
            writers: OnceLock::new(),
            durable_versions: Mutex::new(HashMap::new()),
        })
    }

    pub fn layout(&self) -> &VolumeLayout {
        &self.layout
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Steps written and not committed, for status.
    pub fn uncommitted(&self) -> Vec<String> {
        self.committer
            .lock()
            .uncommitted()
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    /// Commits every step whose rule fired and whose files are all closed.
    pub fn tick(&self) -> Vec<Result<Committed, StoreError>> {
        let _one = self.committing.lock();
        let now = Instant::now();
        for (step, req) in self.journal.take_requests() {
            if let Some(dir) = dir_for_version(&self.layout, &step, req.from_dir.as_deref()) {
                self.committer.lock().peer_committed(&dir, &req, now);
            }
        }
        let due = self.committer.lock().due(now, &self.busy());
        for r in self.committer.lock().take_refusals() {
            let line = format!(
                "{}: this node does not take its part of version {}: {}; it takes its part of the next version",
                r.step.to_string_lossy(),
                r.version,
                r.why
            );
            let mut refused = self.refused.lock();
            if !refused.contains(&line) {
                tracing::warn!("{line}");
                if refused.len() == 8 {
                    refused.pop_front();
                }
                refused.push_back(line);
            }
        }
        due.iter().filter_map(|d| self.take(d)).collect()
    }

    /// Takes the commit of a due step and settles it: `None` when the step changed
    /// while it was walked (its rule fires again at the next tick).
    fn take(&self, d: &Due) -> Option<Result<Committed, StoreError>> {
        let r = self.commit(d);
        match &r {
            Ok(Some(c)) => {
                tracing::info!(step = %c.step, seq = c.seq, files = c.files, bytes = c.bytes, reason = %c.reason, "step committed");
                self.committer.lock().settle(d, true);
                self.on_commit.notify_waiters();
            }
            Ok(None) => {
                tracing::debug!(step = %d.step.to_string_lossy(), "the step changed while it was being committed; trying again");
                self.committer.lock().settle(d, false);
            }
            Err(e) => {
                self.committer.lock().settle(d, true);
                tracing::error!(step = %d.step.to_string_lossy(), error = %e, "commit failed; it is tried again when the rule fires again")
            }
        }
        r.transpose()
    }

    /// Lets the store ask the tree which steps have files open for writing.
    pub fn attach(&self, writers: Weak<dyn OpenWriters>) {
        let _ = self.writers.set(writers);
    }

    fn busy(&self) -> HashSet<OsString> {
        self.writers
            .get()
            .and_then(Weak::upgrade)
            .map(|w| w.steps_being_written())
            .unwrap_or_default()
    }

    /// Runs [`Store::tick`] every `every` until `stop` is set.
    pub fn spawn_ticker(
        self: &Arc<Self>,
        every: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("checkpoint-commit".into())
            .spawn(move || {
                let mut reported = Instant::now() - Duration::from_secs(60);
                let mut last: Option<(Vec<String>, Vec<String>)> = None;
                while !stop.load(Ordering::Relaxed) {
                    me.tick();
                    // What the mount knows and the sync cannot: steps written and not
                    // committed (for `tidepool sync status`), when it changes or every 10 s.
                    let now = (
                        me.uncommitted(),
                        me.refused.lock().iter().cloned().collect(),
                    );
                    if last.as_ref() != Some(&now) || reported.elapsed() > Duration::from_secs(10) {
                        me.write_mount_status(&now.0, &now.1);
                        reported = Instant::now();
                        last = Some(now);
                    }
                    std::thread::sleep(every);
                }
                let _ = fs::remove_file(me.layout.mount_status_path());
            })
            .expect("spawn a thread")
    }

    fn write_mount_status(&self, uncommitted: &[String], refused: &[String]) {
        let st = MountStatus {
            pid: std::process::id(),
            uncommitted: uncommitted.to_vec(),
            refused: refused.to_vec(),
            updated_unix_ms: now_ms(),
        };
        let b = serde_json::to_vec(&st).expect("serializable");
        if let Err(e) = super::journal::write_atomic(&self.layout.mount_status_path(), &b) {
            tracing::debug!(error = %e, "cannot write the mount status");
        }
    }

    /// Takes the commit of a due step; `None` when the step changed (or a file in it
    /// was opened for writing) while it was being walked: nothing is recorded then.
    fn commit(&self, due: &Due) -> Result<Option<Committed>, StoreError> {
        let (step, reason) = (due.step.as_os_str(), &due.reason);
        let dir_name = step.to_str().ok_or_else(|| StoreError::NotUtf8 {
            step: step.to_string_lossy().into_owned(),
            path: PathBuf::from(step),
        })?;
        // Another node's version of a step, followed from an Orbax temporary directory,
        // commits under the step's name.
        let (follows, follows_unix_ms) = match reason {
            Reason::Peer {
                version,
                led_unix_ms,
                ..
            } => (Some(version.clone()), Some(*led_unix_ms)),
            _ => (None, None),
        };
        let name = match (&follows, orbax_final_name(step)) {
            (Some(_), Some(final_name)) => final_name,
            _ => dir_name,
        };
        let io_err = |source| StoreError::Io {
            step: name.to_owned(),
            source,
        };
        let src = self.layout.tree().join(step);
        if !src.is_dir() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::NotFound,
                "the step directory is gone",
            )));
        }
        if let Reason::Marker(m) = reason
            && !src.join(m).exists()
        {
            return Err(io_err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the marker {} was removed", m.to_string_lossy()),
            )));
        }
        let seq = self.journal.next_seq()?;
        let staged = self.layout.staged(seq);
        // A leftover of a commit that crashed before its record: not referenced.
        let _ = fs::remove_dir_all(&staged);
        fs::create_dir_all(&staged).map_err(io_err)?;
        let mut w = self.journal.begin_commit(&CommitHeader {
            seq,
            step: name.to_owned(),
            reason: reason.to_string(),
            committed_unix_ms: now_ms(),
            follows,
            follows_unix_ms,
            renamed_from: match reason {
                Reason::Renamed { from } => Some(from.to_string_lossy().into_owned()),
                _ => None,
            },
            dir: (name != dir_name).then(|| dir_name.to_owned()),
        })?;
        let walked = (|| -> Result<(), StoreError> {
            // Depth-first with an explicit stack of directories: one directory's
            // entries at a time in memory.
            let mut stack = vec![PathBuf::new()];
            while let Some(rel_dir) = stack.pop() {
                let dir = src.join(&rel_dir);
                let mut entries: Vec<_> = fs::read_dir(&dir)
                    .map_err(io_err)?
                    .collect::<Result<_, _>>()
                    .map_err(io_err)?;
                entries.sort_by_key(|e| e.file_name());
                fs::create_dir_all(staged.join(&rel_dir)).map_err(io_err)?;
                for e in entries {
                    let rel = rel_dir.join(e.file_name());
                    let meta = e.metadata().map_err(io_err)?;
                    if meta.is_dir() {
                        stack.push(rel);
                        continue;
                    }
                    if !meta.is_file() {
                        continue;
                    }
                    let path = rel.to_str().ok_or_else(|| StoreError::NotUtf8 {
                        step: name.to_owned(),
                        path: rel.clone(),
                    })?;
                    fs::hard_link(e.path(), staged.join(&rel)).map_err(io_err)?;
                    // The identity after the link: the link and the record name the
                    // same inode.
                    let file = fs::File::open(staged.join(&rel)).map_err(io_err)?;
                    let meta = file.metadata().map_err(io_err)?;
                    // Start writing its data out now; the second walk below waits for it.
                    start_writeback(&file);
                    w.add(&FileRecord {
                        path: path.to_owned(),
                        size: meta.len(),
                        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                        ino: meta.ino(),
                    })?;
                }
            }
            Ok(())
        })();
        if let Err(e) = walked {
            w.abandon();
            let _ = fs::remove_dir_all(&staged);
            return Err(e);
        }
        if self.busy().contains(step) || self.committer.lock().changed_since(step, due.changes) {
            w.abandon();
            let _ = fs::remove_dir_all(&staged);
            return Ok(None);
        }
        // The data, sizes and times of every file, and the staged links, are on stable
        // storage before the commit record is: after a power loss a commit's files are
        // the ones it recorded (not empty or shorter ones, which the upload would refuse
        // and the commit be lost with them).
        if let Err(e) = sync_tree(&staged) {
            w.abandon();
            let _ = fs::remove_dir_all(&staged);
            return Err(io_err(e));
        }
        let t = w.finish()?;
        self.journal.note_seq(seq)?;
        Ok(Some(Committed {
            seq,
            step: name.to_owned(),
            reason: reason.to_string(),
            files: t.files,
            bytes: t.bytes,
        }))
    }

    /// Keeps the committed version of `file` before it changes in place (see
    /// [`StepEvents::before_change`]): for every pending commit whose staged link is
    /// this very inode, the link is replaced by a copy of the same bytes, with the same
    /// size and modification time (a reflink where the file system has them, otherwise a
    /// copy in the kernel), recorded in the journal first ([`Journal::append_relinked`]),
    /// so the commit still uploads exactly what it committed. A rewrite of a step whose
    /// upload is under way thus never destroys it.
    ///
    /// Costs a copy of each such file, in the `open` that changes it, and the disk space
    /// of the copy until the commit is durable or dropped.
    pub fn keep_committed(
        &self,
        file: &fs::File,
        at: Option<&(OsString, PathBuf)>,
    ) -> io::Result<()> {
        let m = file.metadata()?;
        if m.nlink() <= 1 {
            return Ok(());
        }
        // One at a time: a second open waiting here finds the link already replaced.
        let _one = self.keeping.lock();
        for seq in self.journal.seqs().map_err(io::Error::other)? {
            if self.journal.state(seq) != super::journal::CommitState::Pending {
                continue;
            }
            let Some(rel) = self.staged_link_of(seq, &m, at).map_err(io::Error::other)? else {
                continue;
            };
            match self.replace_staged_link(seq, &rel, file, &m) {
                Ok(()) => {
                    tracing::info!(seq, path = %rel, "a committed file is rewritten in place before its upload finished; its committed version is kept for the upload")
                }
                // The commit became durable or was dropped meanwhile (its links released).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The path in commit `seq` whose staged link is the inode `m` describes.
    fn staged_link_of(
        &self,
        seq: u64,
        m: &fs::Metadata,
        at: Option<&(OsString, PathBuf)>,
    ) -> Result<Option<String>, StoreError> {
        let is_it = |rel: &str| {
            fs::symlink_metadata(self.layout.staged(seq).join(rel))
                .is_ok_and(|s| s.ino() == m.ino() && s.dev() == m.dev())
        };
        let mut r = self.journal.read_commit(seq)?;
        // Where the file is now, if that is where the commit took it from.
        if let Some((step, rel)) = at
            && r.header().step.as_str() == step.to_string_lossy()
            && let Some(rel) = rel.to_str()
            && is_it(rel)
        {
            return Ok(Some(rel.to_owned()));
        }
        // Moved since: the commit's records, one at a time.
        while let Some(f) = r.next_file()? {
            if f.ino == m.ino() && is_it(&f.path) {
                return Ok(Some(f.path));
            }
        }
        Ok(None)
    }

    fn replace_staged_link(
        &self,
        seq: u64,
        rel: &str,
        file: &fs::File,
        m: &fs::Metadata,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let dst = self.layout.staged(seq).join(rel);
        let name = dst
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let tmp = dst.with_file_name(format!(".{name}.kept.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let copied = (|| {
            // SAFETY: both descriptors are live; FICLONE shares the source's extents.
            let cloned =
                unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, file.as_raw_fd()) } == 0;
            if !cloned {
                // copy_file_range(2) under the hood: the bytes stay in the kernel.
                io::copy(&mut &*file, &mut out)?;
            }
            let after = file.metadata()?;
            if after.len() != m.len()
                || after.mtime_nsec() != m.mtime_nsec()
                || after.mtime() != m.mtime()
            {
                return Err(io::Error::other(format!(
                    "{rel} changed while its committed version was being kept"
                )));
            }
            let times = [
                libc::timespec {
                    tv_sec: m.atime(),
                    tv_nsec: m.atime_nsec(),
                },
                libc::timespec {
                    tv_sec: m.mtime(),
                    tv_nsec: m.mtime_nsec(),
                },
            ];
            // SAFETY: the descriptor is live; `times` has two entries.
            if unsafe { libc::futimens(out.as_raw_fd(), times.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            out.sync_all()?;
            out.metadata()
        })();
        let kept = match copied {
            Ok(k) => k,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.journal
            .append_relinked(
                seq,
                &super::journal::Relinked {
                    path: rel.to_owned(),
                    ino: kept.ino(),
                },
            )
            .map_err(io::Error::other)?;
        fs::rename(&tmp, &dst)?;
        fs::File::open(dst.parent().unwrap_or(Path::new("/")))?.sync_all()
    }

    /// Removes the staged links of a commit that is durable or dropped.
    pub fn release_staged(layout: &VolumeLayout, seq: u64) {
        let _ = fs::remove_dir_all(layout.staged(seq));
    }
}

/// Whether commit `seq` recorded the file at `path` (the step's root entry `name`) as it
/// is now: same inode, size and modification time. Reads the commit one record at a time.
fn in_commit(journal: &Journal, seq: u64, name: &OsStr, path: &Path) -> Result<bool, StoreError> {
    let Some(name) = name.to_str() else {
        return Ok(false);
    };
    let Ok(m) = fs::metadata(path) else {
        return Ok(false);
    };
    let mut r = journal.read_commit(seq)?;
    while let Some(f) = r.next_file()? {
        if f.path == name {
            return Ok(f.ino == m.ino()
                && f.size == m.len()
                && f.mtime_ns == m.mtime() * 1_000_000_000 + m.mtime_nsec());
        }
    }
    Ok(false)
}

/// Asks the kernel to start writing `file`'s dirty pages (not waiting): a commit of many
/// files then waits for all of them together in [`sync_tree`], not for each in turn.
fn start_writeback(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is live; offset 0 and length 0 mean the whole file.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `fsync`s every file and directory under `dir`, and `dir`'s entry in its parent:
/// files as they are found, then the directories, deepest first (each after its
/// entries). Memory: the directories' paths, never the files'.
fn sync_tree(dir: &Path) -> io::Result<()> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut order = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            } else {
                fs::File::open(e.path())?.sync_all()?;
            }
        }
        order.push(d);
    }
    // Deepest first, so each directory's entry in its parent is synced after it.
    for d in order.iter().rev() {
        fs::File::open(d)?.sync_all()?;
    }
    if let Some(parent) = dir.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The directory of the tree that holds this node's part of the save of `step` that
/// another node's version came from (`from_dir`: the leader's directory before it
/// became the step). An Orbax temporary directory is matched by name, which every host
/// of one save shares: never another save's directory. Otherwise the step's own
/// directory.
pub fn dir_for_version(
    layout: &VolumeLayout,
    step: &str,
    from_dir: Option<&str>,
) -> Option<OsString> {
    match from_dir {
        Some(d) if d != step && orbax_final_name(OsStr::new(d)) == Some(step) => {
            layout.tree().join(d).is_dir().then(|| d.into())
        }
        _ => layout.tree().join(step).is_dir().then(|| step.into()),
    }
}

/// The directory of the tree that holds this node's files of `step`: the step's own
/// directory, else the newest Orbax temporary directory that becomes it (a host that is
/// not Orbax's primary never renames it; see [`orbax_final_name`]).
pub fn dir_of_step(layout: &VolumeLayout, step: &str) -> Option<OsString> {
    let tree = layout.tree();
    if tree.join(step).is_dir() {
        return Some(step.into());
    }
    fs::read_dir(&tree)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .filter(|n| orbax_final_name(n) == Some(step))
        // The suffix is Orbax's timestamp: the newest attempt.
        .max_by_key(|n| {
            n.to_str()
                .and_then(|s| s.rsplit('-').next())
                .and_then(|t| t.parse::<u64>().ok())
        })
}

/// Milliseconds since the Unix epoch (journal and status times).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The newest mtime (ms) of anything under `dir`, the directory included.
fn newest_mtime_ms(dir: &Path) -> io::Result<u64> {
    let mut newest = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = fs::symlink_metadata(&d)?;
        newest = newest.max((m.mtime().max(0) as u64) * 1000 + m.mtime_nsec() as u64 / 1_000_000);
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                newest = newest
                    .max((m.mtime().max(0) as u64) * 1000 + m.mtime_nsec() as u64 / 1_000_000);
            }
        }
    }
    Ok(newest)
}

impl StepEvents for Store {
    fn event(&self, e: TreeEvent) {
        if let TreeEvent::StepRenamed { from, to } = &e
            && !is_temporary(to)
            && let (Some(from), Some(to)) = (from.to_str(), to.to_str())
            && let Err(err) = self.journal.note_rename(to, from)
        {
            tracing::warn!(step = to, error = %err, "cannot note the rename in the journal");
        }
        let step = match &e {
            TreeEvent::WriteOpened { step } | TreeEvent::Changed { step, .. } => Some(step),
            TreeEvent::StepRenamed { to, .. } => Some(to),
            _ => None,
        };
        // The step a write belongs to: its directory, or the step an Orbax temporary
        // directory becomes (on a host that is not the primary, its part of the step is
        // written there and never renamed).
        let step = step.and_then(|s| match orbax_final_name(s) {
            Some(final_name) => Some(OsString::from(final_name)),
            None => (!is_temporary(s)).then(|| s.clone()),
        });
        if let Some(step) = &step
            && let Some(name) = step.to_str()
            && self.seen.lock().insert(step.clone())
        {
            match self.journal.mark_seen(name) {
                Ok(()) => self.on_seen.notify_one(),
                Err(err) => {
                    // Forgotten again, so that the next event of the step tries anew: a
                    // step never noted is never announced, and other nodes would not
                    // wait for this node's part.
                    self.seen.lock().remove(step);
                    tracing::warn!(step = name, error = %err, "cannot note the step in the journal; trying again at its next change")
                }
            }
        }
        self.committer.lock().on_event(&e, Instant::now());
    }

    fn before_change(&self, file: &fs::File, at: Option<&(OsString, PathBuf)>) -> io::Result<()> {
        self.keep_committed(file, at)
    }

    /// A step whose rule fired and whose commit the ticker has not taken yet commits
    /// now, before the job removes anything from it: a framework that rotates its
    /// steps right after writing the next one never loses a finished step to the
    /// commit's timing. The removal waits for the commit (a walk of the step and an
    /// `fsync` of its files), and first for the step's files to be released (the
    /// kernel sends RELEASE after `close(2)` returns), up to [`RELEASE_WAIT`]. A step
    /// with a file still open for writing then is not finished: its rule is forgotten,
    /// so what the removal leaves is never committed as the step. A step not due
    /// costs a lookup.
    fn before_remove(&self, step: &OsStr) {
        if !self.committer.lock().fired(step) {
            return;
        }
        let _one = self.committing.lock();
        let waited = Instant::now();
        let mut busy = self.busy();
        while busy.contains(step) && waited.elapsed() < RELEASE_WAIT {
            std::thread::sleep(Duration::from_millis(5));
            busy = self.busy();
        }
        if busy.contains(step) {
            self.committer.lock().unfire(step);
            tracing::warn!(step = %step.to_string_lossy(), "a file was removed from a finished step while another of its files was still open for writing; the step is not committed as it stands, it commits when its rule fires again");
            return;
        }
        let due = self.committer.lock().due_step(step, Instant::now(), &busy);
        if let Some(d) = due {
            self.take(&d);
        }
    }

    /// A step retention is taking off local disk (the sync marks it in the journal
    /// before it moves the directory): changes to it are refused.
    fn read_only(&self, step: &OsStr) -> bool {
        self.layout.retiring(step).exists()
    }

    /// This node's latest commit of the step directory, when it is durable and nothing
    /// changed in the directory since (remembered for a second: the tree asks at every
    /// name it does not find in a step).
    fn durable_version(&self, step: &OsStr) -> Option<crate::lake::ETag> {
        if self
            .committer
            .lock()
            .uncommitted()
            .iter()
            .any(|s| s == step)
        {
            return None;
        }
        let now = Instant::now();
        if let Some((at, v)) = self.durable_versions.lock().get(step)
            && now.duration_since(*at) < Duration::from_secs(1)
        {
            return v.clone();
        }
        let dir = step.to_str()?;
        let mut found = None;
        for seq in self.journal.seqs().ok()?.into_iter().rev() {
            let Ok(r) = self.journal.read_commit(seq) else {
                continue;
            };
            if r.header().dir() != dir {
                continue;
            }
            if self.journal.state(seq) == CommitState::Durable {
                found = self.journal.durable_etag(seq);
            }
            break;
        }
        let mut cache = self.durable_versions.lock();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(step.to_owned(), (now, found.clone()));
        found
    }
}

/// Bytes on disk of every checkpoint volume in pool `cache_dir` (trees, staged
/// commits, trash; a file hard-linked into a staged commit counted once). A walk of
/// the volumes' directories: as many `stat`s as they hold files, no more memory than
/// the hard-linked files' identities.
pub fn checkpoint_bytes(cache_dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![cache_dir.join("checkpoints")];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // Gone since it was listed (a step removed meanwhile), or no volume yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let Ok(e) = e else { continue };
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
                continue;
            }
            if md.nlink() > 1 && !linked.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.blocks() * 512;
        }
    }
    Ok(total)
}
