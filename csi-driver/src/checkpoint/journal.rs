//! The checkpoint journal: what was committed, what of it is in the lake, what is
//! durable. A directory of small files, so that the mount (which commits) and the sync
//! (which uploads) can be two processes, either killed at any moment.
//!
//! Layout of `<volume>/journal/`:
//! - `<seq>.commit`: one committed step. JSON lines: a [`CommitHeader`], one
//!   [`FileRecord`] per file (path inside the step, size, mtime, inode: the file's
//!   identity at commit), and a [`Trailer`] with the count. Written to `.tmp`, synced,
//!   renamed into place and the directory synced: a commit file exists whole or not
//!   at all, and a reader that finds no trailer treats the file as corrupt.
//! - `<seq>.uploaded`: append-only, one [`UploadedRecord`] line per file in the lake,
//!   each appended with one `write` and synced before the next. A crash can tear only
//!   the line being written; readers skip a line that does not parse (that file is
//!   uploaded again, and its blocks still staged in the lake are not sent twice), and
//!   the next append starts on a fresh line.
//! - `<seq>.relinked`: append-only, one [`Relinked`] line per staged link replaced by a
//!   copy (the file was rewritten in place while the commit was pending);
//! - `<seq>.durable`: the step's manifest is in the lake (written after the manifest).
//! - `<seq>.dropped`: this commit will never be uploaded, and why (a newer commit of the
//!   same step superseded it, or a file changed after commit).
//! - `seen/<step>`: this node wrote into `step` (the sync announces that in the lake
//!   so that other nodes wait for its part).
//! - `requests/<step>`: the sync asks the mount to commit `step`, because another node
//!   committed its part (the file holds that node's name);
//! - `status.json`: the sync's last report (what `tidepool sync status` prints).
//!
//! `seq` is a 12-digit, increasing commit number, never reused (`last-seq` keeps the
//! highest one given); the staged copies of a commit's files
//! (hard links taken at commit) are under `<volume>/staged/<seq>/`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first line of a commit file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitHeader {
    pub seq: u64,
    pub step: String,
    /// Why it committed, in words (the rule that fired).
    pub reason: String,
    pub committed_unix_ms: u64,
    /// The version of the step this commit belongs to when another node leads it (a
    /// multi-node step: this node followed that node's commit); absent when this commit
    /// is a version of its own, named `<node>:<seq>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// When the leading node took the commit this one follows (its clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows_unix_ms: Option<u64>,
    /// The directory the step was renamed from when a rename committed it (an Orbax
    /// temporary directory, whose name every host of the save shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
    /// The directory of the tree the files were taken from, when it is not named like
    /// the step (an Orbax temporary directory on a host that never renames it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

impl CommitHeader {
    /// The version of the step this commit is a part of, on node `node`.
    pub fn version(&self, node: &str) -> String {
        self.follows
            .clone()
            .unwrap_or_else(|| format!("{node}:{}", self.seq))
    }

    /// When the save this commit is part of completed: the leading node's commit (this
    /// one's, or the one it follows). "Latest" and retention order by it.
    pub fn saved_unix_ms(&self) -> u64 {
        self.follows_unix_ms.unwrap_or(self.committed_unix_ms)
    }

    /// The tree directory the commit's files came from.
    pub fn dir(&self) -> &str {
        self.dir.as_deref().unwrap_or(&self.step)
    }
}

/// The sync asks the mount to commit a step as this node's part of another node's
/// version of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    /// The node whose commit leads the version.
    pub node: String,
    pub version: String,
    /// When that node took its commit (its clock).
    #[serde(default)]
    pub led_unix_ms: u64,
    /// The directory the save is in on the leading node before it becomes the step (an
    /// Orbax temporary directory: this node's part of the save is in the directory of
    /// the same name), or the step itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_dir: Option<String>,
}

/// One file of a committed step: its identity at commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path inside the step, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

/// The last line of a commit file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub files: u64,
    pub bytes: u64,
}

/// One file of a commit that is in the lake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedRecord {
    pub path: String,
    pub size: u64,
    /// Hex MD5 of the content (also the blob's Content-MD5).
    pub md5: String,
    pub etag: String,
    /// This file is no longer in the lake as uploaded (its object was found replaced
    /// behind the commit's back): it is uploaded again. The last record of a path says
    /// what is true of it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retracted: bool,
}

/// A staged link of a pending commit replaced by a copy of the same bytes (same size
/// and modification time, another inode), because the file in the tree was about to be
/// rewritten in place: the commit uploads from the copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relinked {
    pub path: String,
    pub ino: u64,
}

/// What `<seq>.durable` holds.
#[derive(Serialize, Deserialize)]
struct DurableMark {
    manifest: String,
    etag: String,
}

/// The state of one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitState {
    Pending,
    Durable,
    Dropped(String),
}

/// Errors reading the journal: they name the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt journal record at line {line}: {detail}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The journal directory of one checkpoint volume.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

use crate::durable::sync_dir;
pub use crate::durable::{private_dir, write_atomic, write_atomic_private};

impl Journal {
    /// Opens (creating) the journal in `dir`. Removes nothing: the volume's server
    /// and its sync open it side by side, each while the other may be writing.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        fs::create_dir_all(dir.join("seen")).map_err(io_at(dir))?;
        Ok(Journal {
            dir: dir.to_owned(),
        })
    }

    /// Removes commits left half-written by a server that died (`<seq>.tmp`). Only the
    /// one process that writes commits calls this, when it starts.
    pub fn remove_partial_commits(&self) -> Result<(), JournalError> {
        for e in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let e = e.map_err(io_at(&self.dir))?;
            let p = e.path();
            let commit_temp = p.extension() == Some(OsStr::new("tmp"))
                && p.file_stem()
                    .and_then(OsStr::to_str)
                    .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
            if commit_temp {
                let _ = fs::remove_file(&p);
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, seq: u64, ext: &str) -> PathBuf {
        self.dir.join(format!("{seq:012}.{ext}"))
    }

    /// Every commit's number, in order. One entry per commit (retention removes old
    /// ones), so this stays small.
    pub fn seqs(&self) -> Result<Vec<u64>, JournalError> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let e = e.map_err(io_at(&self.dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".commit")
                && let Ok(seq) = n.parse()
            {
                v.push(seq);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    /// The number the next commit gets: above every commit that exists and every one
    /// that ever existed (retention forgets old commits; their numbers are never
    /// reused, so a number names one commit for the life of the volume).
    pub fn next_seq(&self) -> Result<u64, JournalError> {
        let noted = fs::read_to_string(self.dir.join("last-seq"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let highest = self.seqs()?.last().copied().unwrap_or(0);
        Ok(noted.max(highest) + 1)
    }

    /// Records `seq` as used (after its commit file is in place).
    pub fn note_seq(&self, seq: u64) -> Result<(), JournalError> {
        let p = self.dir.join("last-seq");
        write_atomic(&p, seq.to_string().as_bytes()).map_err(io_at(&p))
    }

    /// Starts writing commit `header.seq`; nothing is visible until
    /// [`CommitWriter::finish`].
    pub fn begin_commit(&self, header: &CommitHeader) -> Result<CommitWriter, JournalError> {
        let path = self.path(header.seq, "commit");
        let tmp = path.with_extension("tmp");
        let f = File::create(&tmp).map_err(io_at(&tmp))?;
        let mut w = CommitWriter {
            out: BufWriter::new(f),
            tmp,
            path,
            trailer: Trailer { files: 0, bytes: 0 },
        };
        w.line(header)?;
        Ok(w)
    }

    /// The state of commit `seq`. A dropped mark wins over a durable one: a durable
    /// commit is dropped when its manifest is withdrawn (the step commits again and its
    /// objects are about to be replaced), and from then on nothing may call it durable.
    pub fn state(&self, seq: u64) -> CommitState {
        match fs::read_to_string(self.path(seq, "dropped")) {
            Ok(why) => CommitState::Dropped(why),
            Err(_) if self.path(seq, "durable").exists() => CommitState::Durable,
            Err(_) => CommitState::Pending,
        }
    }

    /// Reads commit `seq`: its header, then its files one by one.
    pub fn read_commit(&self, seq: u64) -> Result<CommitReader, JournalError> {
        let path = self.path(seq, "commit");
        let f = File::open(&path).map_err(io_at(&path))?;
        let mut r = CommitReader {
            lines: BufReader::new(f),
            path,
            line: 0,
            header: None,
            seen: 0,
            done: false,
        };
        let first = r.next_line()?.ok_or_else(|| r.corrupt("empty"))?;
        let header: CommitHeader =
            serde_json::from_str(&first).map_err(|e| r.corrupt(&e.to_string()))?;
        r.header = Some(header);
        Ok(r)
    }

    /// The paths of commit `seq` already in the lake, with their records. A torn last
    /// line (a crash while appending) is dropped.
    pub fn uploaded(&self, seq: u64) -> Result<Vec<UploadedRecord>, JournalError> {
        let mut out = Vec::new();
        self.for_each_uploaded(seq, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` for each file of commit `seq` that is in the lake: the last record of
    /// each path, unless it retracts it; in log order, one line in memory at a time
    /// (torn lines skipped). Two reads of the log; memory: 16 bytes and an index per
    /// path.
    pub fn for_each_uploaded(
        &self,
        seq: u64,
        mut f: impl FnMut(UploadedRecord) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        let path = self.path(seq, "uploaded");
        let lines = || -> Result<Option<std::io::Lines<BufReader<File>>>, JournalError> {
            match File::open(&path) {
                Ok(f) => Ok(Some(BufReader::new(f).lines())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_at(&path)(e)),
            }
        };
        let key = |p: &str| -> u128 {
            use md5::Digest;
            u128::from_le_bytes(md5::Md5::digest(p.as_bytes()).into())
        };
        // Pass 1: the last record of each path.
        let mut last: std::collections::HashMap<u128, usize> = Default::default();
        let Some(first) = lines()? else {
            return Ok(());
        };
        for (i, l) in first.enumerate() {
            let l = l.map_err(io_at(&path))?;
            // A line that does not parse was torn by a crash: that file is uploaded
            // again (its blocks are still staged in the lake).
            if let Ok(r) = serde_json::from_str::<UploadedRecord>(&l) {
                last.insert(key(&r.path), i);
            }
        }
        let Some(second) = lines()? else {
            return Ok(());
        };
        for (i, l) in second.enumerate() {
            let l = l.map_err(io_at(&path))?;
            if let Ok(r) = serde_json::from_str::<UploadedRecord>(&l)
                && last.get(&key(&r.path)) == Some(&i)
                && !r.retracted
            {
                f(r)?;
            }
        }
        Ok(())
    }

    /// Records that file `path` of commit `seq` is no longer in the lake as uploaded:
    /// the next pass uploads it again from the commit's staged copy.
    pub fn retract_uploaded(&self, seq: u64, path: &str) -> Result<(), JournalError> {
        self.append_uploaded(
            seq,
            &UploadedRecord {
                path: path.to_owned(),
                size: 0,
                md5: String::new(),
                etag: String::new(),
                retracted: true,
            },
        )
    }

    /// Whether any file of commit `seq` is in the lake already (its upload is under way).
    pub fn upload_started(&self, seq: u64) -> bool {
        fs::metadata(self.path(seq, "uploaded")).is_ok_and(|m| m.len() > 0)
    }

    /// The set of paths of commit `seq` already in the lake.
    pub fn uploaded_paths(&self, seq: u64) -> Result<HashSet<String>, JournalError> {
        Ok(self.uploaded(seq)?.into_iter().map(|r| r.path).collect())
    }

    /// Records one more file of commit `seq` as in the lake (synced before returning).
    pub fn append_uploaded(&self, seq: u64, rec: &UploadedRecord) -> Result<(), JournalError> {
        self.append_line(&self.path(seq, "uploaded"), rec)
    }

    /// Records that the staged link of `rec.path` in commit `seq` is about to be
    /// replaced by a copy, inode `rec.ino` (synced before returning; see [`Relinked`]).
    pub fn append_relinked(&self, seq: u64, rec: &Relinked) -> Result<(), JournalError> {
        self.append_line(&self.path(seq, "relinked"), rec)
    }

    /// The copies that replaced staged links of commit `seq`: path → inode. Only files
    /// rewritten while the commit was pending are here, so this stays small.
    pub fn relinked(
        &self,
        seq: u64,
    ) -> Result<std::collections::HashMap<String, u64>, JournalError> {
        let path = self.path(seq, "relinked");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let mut out = std::collections::HashMap::new();
        for l in BufReader::new(file).lines() {
            let l = l.map_err(io_at(&path))?;
            // A torn line: its copy was never renamed into place.
            if let Ok(r) = serde_json::from_str::<Relinked>(&l) {
                out.insert(r.path, r.ino);
            }
        }
        Ok(out)
    }

    /// Appends one JSON line to `path`, synced, starting on a fresh line after a torn one.
    fn append_line<T: Serialize>(&self, path: &Path, rec: &T) -> Result<(), JournalError> {
        let path = path.to_owned();
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        // A torn previous line must not swallow this one: start on a fresh line.
        let len = f.metadata().map_err(io_at(&path))?.len();
        let mut line = Vec::with_capacity(256);
        if len > 0 {
            let mut last = [0u8; 1];
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut last, len - 1).map_err(io_at(&path))?;
            if last[0] != b'\n' {
                line.push(b'\n');
            }
        }
        serde_json::to_writer(&mut line, rec).expect("serializable");
        line.push(b'\n');
        f.write_all(&line).map_err(io_at(&path))?;
        f.sync_data().map_err(io_at(&path))?;
        if len == 0 {
            // A new file: its directory entry too.
            sync_dir(&self.dir).map_err(io_at(&self.dir))?;
        }
        Ok(())
    }

    /// Marks commit `seq` durable: its step's manifest `manifest` was found (or
    /// written) in the lake as version `etag`, vouching for this commit's files.
    pub fn mark_durable(
        &self,
        seq: u64,
        manifest: &str,
        etag: &crate::lake::ETag,
    ) -> Result<(), JournalError> {
        let p = self.path(seq, "durable");
        let body = serde_json::to_vec(&DurableMark {
            manifest: manifest.to_owned(),
            etag: etag.0.clone(),
        })
        .expect("serializable");
        write_atomic(&p, &body).map_err(io_at(&p))
    }

    /// The manifest version commit `seq` was marked durable with (`None` for a mark
    /// written by an older Tidepool, which recorded the manifest's name only).
    pub fn durable_etag(&self, seq: u64) -> Option<crate::lake::ETag> {
        let b = fs::read(self.path(seq, "durable")).ok()?;
        serde_json::from_slice::<DurableMark>(&b)
            .ok()
            .map(|m| crate::lake::ETag(m.etag))
    }

    /// Marks commit `seq` as never to be uploaded (again), and forgets that it was
    /// durable if it was: the dropped mark is written first, so that no moment exists
    /// in which the commit reads as durable after this is called.
    pub fn mark_dropped(&self, seq: u64, why: &str) -> Result<(), JournalError> {
        let p = self.path(seq, "dropped");
        write_atomic(&p, why.as_bytes()).map_err(io_at(&p))?;
        let d = self.path(seq, "durable");
        match fs::remove_file(&d) {
            Ok(()) => sync_dir(&self.dir).map_err(io_at(&self.dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&d)(e)),
        }
    }

    /// Removes every file of commit `seq` (retention, after it is durable or dropped).
    pub fn forget(&self, seq: u64) -> Result<(), JournalError> {
        // The commit file first: a crash in between leaves state files of a commit that
        // no longer exists (ignored: only commit files are listed), never a commit whose
        // durable or dropped mark is gone (it would be uploaded again).
        for ext in ["commit", "uploaded", "durable", "dropped", "relinked"] {
            let p = self.path(seq, ext);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&p)(e)),
            }
        }
        Ok(())
    }

    /// Notes that this node writes into `step`.
    pub fn mark_seen(&self, step: &str) -> Result<(), JournalError> {
        let p = self.dir.join("seen").join(step);
        if p.exists() {
            return Ok(());
        }
        write_atomic(&p, b"").map_err(io_at(&p))
    }

    pub fn unmark_seen(&self, step: &str) {
        let _ = fs::remove_file(self.dir.join("seen").join(step));
        let _ = fs::remove_file(self.dir.join("renamed").join(step));
    }

    /// Records that directory `from` was renamed to step `to` (the rename that commits
    /// it), so that a mount restarted before the commit still commits it as renamed
    /// from `from` (other nodes find their part of the save by that name).
    pub fn note_rename(&self, to: &str, from: &str) -> Result<(), JournalError> {
        let d = self.dir.join("renamed");
        fs::create_dir_all(&d).map_err(io_at(&d))?;
        let p = d.join(to);
        write_atomic(&p, from.as_bytes()).map_err(io_at(&p))
    }

    /// The directory step `step` was last renamed from, if a rename made it, and when
    /// (ms since the epoch).
    pub fn renamed_from(&self, step: &str) -> Option<(String, u64)> {
        let p = self.dir.join("renamed").join(step);
        let at = fs::metadata(&p)
            .ok()?
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as u64;
        Some((fs::read_to_string(&p).ok()?, at))
    }

    /// Steps this node wrote into.
    pub fn seen(&self) -> Result<Vec<String>, JournalError> {
        let d = self.dir.join("seen");
        let mut v = Vec::new();
        for e in fs::read_dir(&d).map_err(io_at(&d))? {
            let e = e.map_err(io_at(&d))?;
            // Temporary files of `write_atomic` start with a dot; a step name never
            // does (dot names are temporary, and never committed).
            if let Some(s) = e.file_name().to_str()
                && !s.starts_with('.')
                && !s.ends_with(".tmp")
            {
                v.push(s.to_owned());
            }
        }
        v.sort();
        Ok(v)
    }

    /// Asks the mount to commit `step` because node `req.node` committed its part of
    /// version `req.version` there (written by the sync, taken by the store). A request
    /// already waiting is replaced (a newer version).
    pub fn request_commit(&self, step: &str, req: &CommitRequest) -> Result<(), JournalError> {
        let d = self.dir.join("requests");
        fs::create_dir_all(&d).map_err(io_at(&d))?;
        let p = d.join(step);
        let body = serde_json::to_vec(req).expect("serializable");
        if fs::read(&p).is_ok_and(|b| b == body) {
            return Ok(());
        }
        write_atomic(&p, &body).map_err(io_at(&p))
    }

    /// Takes the pending commit requests: (step, request).
    pub fn take_requests(&self) -> Vec<(String, CommitRequest)> {
        let d = self.dir.join("requests");
        let mut v = Vec::new();
        let Ok(rd) = fs::read_dir(&d) else {
            return v;
        };
        for e in rd.flatten() {
            let Some(step) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if step.starts_with('.') || step.ends_with(".tmp") {
                continue;
            }
            let body = fs::read(e.path()).unwrap_or_default();
            let _ = fs::remove_file(e.path());
            // One written by an older sync (the node name alone) is asked again by this
            // one's next pass, with the version.
            if let Ok(r) = serde_json::from_slice::<CommitRequest>(&body) {
                v.push((step, r));
            }
        }
        v
    }

    pub fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }
}

/// A commit being written.
pub struct CommitWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    trailer: Trailer,
}

impl CommitWriter {
    fn line<T: Serialize>(&mut self, v: &T) -> Result<(), JournalError> {
        serde_json::to_writer(&mut self.out, v).expect("serializable");
        self.out.write_all(b"\n").map_err(io_at(&self.tmp))
    }

    pub fn add(&mut self, rec: &FileRecord) -> Result<(), JournalError> {
        self.trailer.files += 1;
        self.trailer.bytes += rec.size;
        self.line(rec)
    }

    /// Makes the commit visible, durably; returns its totals.
    pub fn finish(mut self) -> Result<Trailer, JournalError> {
        let t = self.trailer.clone();
        self.line(&t)?;
        let f = self
            .out
            .into_inner()
            .map_err(|e| io_at(&self.tmp)(e.into_error()))?;
        f.sync_all().map_err(io_at(&self.tmp))?;
        fs::rename(&self.tmp, &self.path).map_err(io_at(&self.path))?;
        sync_dir(self.path.parent().unwrap_or(Path::new("."))).map_err(io_at(&self.path))?;
        Ok(t)
    }

    /// Abandons the commit (nothing becomes visible).
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Reads one commit file, streaming.
pub struct CommitReader {
    lines: BufReader<File>,
    path: PathBuf,
    line: usize,
    header: Option<CommitHeader>,
    seen: u64,
    done: bool,
}

impl CommitReader {
    fn corrupt(&self, detail: &str) -> JournalError {
        JournalError::Corrupt {
            path: self.path.clone(),
            line: self.line,
            detail: detail.to_owned(),
        }
    }

    fn next_line(&mut self) -> Result<Option<String>, JournalError> {
        let mut s = String::new();
        let n = self.lines.read_line(&mut s).map_err(io_at(&self.path))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(s))
    }

    pub fn header(&self) -> &CommitHeader {
        self.header.as_ref().expect("read at open")
    }

    /// The next file, or `None` after the last one (the trailer is checked).
    pub fn next_file(&mut self) -> Result<Option<FileRecord>, JournalError> {
        if self.done {
            return Ok(None);
        }
        let Some(l) = self.next_line()? else {
            return Err(self.corrupt("no trailer (the commit file is incomplete)"));
        };
        if let Ok(f) = serde_json::from_str::<FileRecord>(&l) {
            self.seen += 1;
            return Ok(Some(f));
        }
        let t: Trailer = serde_json::from_str(&l).map_err(|e| self.corrupt(&e.to_string()))?;
        if t.files != self.seen {
            return Err(self.corrupt(&format!(
                "trailer counts {} files, {} read",
                t.files, self.seen
            )));
        }
        self.done = true;
        Ok(None)
    }

    /// Reads to the end and returns the totals (checking the trailer).
    pub fn totals(mut self) -> Result<Trailer, JournalError> {
        let (mut files, mut bytes) = (0, 0);
        while let Some(f) = self.next_file()? {
            files += 1;
            bytes += f.size;
        }
        Ok(Trailer { files, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64) -> CommitHeader {
        CommitHeader {
            seq,
            step: "step-1".into(),
            reason: "marker .metadata".into(),
            committed_unix_ms: 1,
            follows: None,
            follows_unix_ms: None,
            renamed_from: None,
            dir: None,
        }
    }

    fn rec(p: &str, size: u64) -> FileRecord {
        FileRecord {
            path: p.into(),
            size,
            mtime_ns: 5,
            ino: 7,
        }
    }

    #[test]
    fn a_commit_is_invisible_until_finished_and_reads_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.next_seq().unwrap(), 1);
        let mut w = j.begin_commit(&header(1)).unwrap();
        w.add(&rec("a", 10)).unwrap();
        w.add(&rec("b/c", 20)).unwrap();
        assert!(j.seqs().unwrap().is_empty(), "not visible before finish");
        assert_eq!(
            w.finish().unwrap(),
            Trailer {
                files: 2,
                bytes: 30
            }
        );
        assert_eq!(j.seqs().unwrap(), vec![1]);
        assert_eq!(j.next_seq().unwrap(), 2);
        let mut r = j.read_commit(1).unwrap();
        assert_eq!(r.header().step, "step-1");
        assert_eq!(r.next_file().unwrap(), Some(rec("a", 10)));
        assert_eq!(r.next_file().unwrap(), Some(rec("b/c", 20)));
        assert_eq!(r.next_file().unwrap(), None);
        assert_eq!(j.state(1), CommitState::Pending);
        j.mark_durable(1, "m", &crate::lake::ETag("\"e\"".into()))
            .unwrap();
        assert_eq!(j.state(1), CommitState::Durable);
    }

    #[test]
    fn secrets_are_written_owner_only_in_a_directory_only_the_owner_opens() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tokens");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "an existing directory is closed too");
        let token = dir.join("ml.trainer.jwt");
        write_atomic_private(&token, b"first").unwrap();
        assert_eq!(mode(&token), 0o600);
        // Renewals replace it, still owner-only.
        write_atomic_private(&token, b"second").unwrap();
        assert_eq!(mode(&token), 0o600);
        assert_eq!(fs::read(&token).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ml.trainer.jwt"], "no temporary file stays");
    }

    #[test]
    fn marks_of_two_steps_written_at_the_same_moment_are_both_kept() {
        // `seen/ckpt.1` and `seen/ckpt.2` once shared the temporary `seen/ckpt.tmp`: one
        // mark was lost (or its rename failed) in most rounds.
        for round in 0..200 {
            let d = tempfile::tempdir().unwrap();
            let j = Journal::open(d.path()).unwrap();
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                for step in ["ckpt.1", "ckpt.2"] {
                    let (j, start) = (&j, &start);
                    s.spawn(move || {
                        start.wait();
                        j.mark_seen(step).unwrap();
                    });
                }
            });
            assert_eq!(j.seen().unwrap(), vec!["ckpt.1", "ckpt.2"], "round {round}");
            let left: Vec<_> = fs::read_dir(d.path().join("seen"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left.len(), 2, "no temporary file left: {left:?}");
        }
    }

    #[test]
    fn a_durable_commit_that_is_dropped_is_no_longer_durable() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let mut w = j.begin_commit(&header(1)).unwrap();
        w.add(&rec("a", 10)).unwrap();
        w.finish().unwrap();
        j.mark_durable(1, "m", &crate::lake::ETag("\"e\"".into()))
            .unwrap();
        assert_eq!(j.state(1), CommitState::Durable);
        // The step commits again and its manifest is withdrawn.
        j.mark_dropped(1, "superseded").unwrap();
        assert_eq!(j.state(1), CommitState::Dropped("superseded".into()));
        assert!(
            !d.path().join("000000000001.durable").exists(),
            "the durable mark is gone"
        );
    }

    #[test]
    fn a_truncated_commit_file_is_corrupt_not_short() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let mut w = j.begin_commit(&header(3)).unwrap();
        w.add(&rec("a", 10)).unwrap();
        w.finish().unwrap();
        let p = d.path().join("000000000003.commit");
        let s = fs::read_to_string(&p).unwrap();
        let cut: Vec<&str> = s.lines().collect();
        fs::write(&p, format!("{}\n{}\n", cut[0], cut[1])).unwrap();
        let mut r = j.read_commit(3).unwrap();
        r.next_file().unwrap();
        assert!(matches!(r.next_file(), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn a_torn_upload_line_is_dropped_and_the_next_append_starts_clean() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let u = |p: &str| UploadedRecord {
            path: p.into(),
            size: 1,
            md5: "00".into(),
            etag: "e".into(),
            retracted: false,
        };
        j.append_uploaded(1, &u("a")).unwrap();
        // A crash in the middle of the second append.
        let p = d.path().join("000000000001.uploaded");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"path":"b","si"#).unwrap();
        assert_eq!(j.uploaded(1).unwrap(), vec![u("a")]);
        j.append_uploaded(1, &u("c")).unwrap();
        assert_eq!(j.uploaded(1).unwrap(), vec![u("a"), u("c")]);
        // A file found replaced in the lake is retracted, then uploaded again: its last
        // record counts.
        j.retract_uploaded(1, "a").unwrap();
        assert_eq!(j.uploaded(1).unwrap(), vec![u("c")]);
        assert!(!j.uploaded_paths(1).unwrap().contains("a"));
        j.append_uploaded(1, &u("a")).unwrap();
        assert_eq!(j.uploaded(1).unwrap(), vec![u("c"), u("a")]);
    }
}
