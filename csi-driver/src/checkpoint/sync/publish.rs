//! Parts, versions and manifests: what makes a step durable across nodes.
//!
//! **Versions.** A step written by several nodes is one version of it only when every
//! node's files belong to the same save. A node whose own commit rule fired (rank 0's
//! node saw DCP's `.metadata`, Orbax's primary renamed its temporary directory, or a
//! quiescent step) leads a version named `<node>:<seq>`; every other node that writes
//! the step follows it: its sync sees the leader's version in the lake and asks its
//! mount to commit this node's files as its part of that version.
//! Of two versions led by different nodes, the later commit wins (both nodes end up in
//! it). A manifest merges the parts of one version only: a node that has not committed
//! its part of a rewrite keeps the step from being published with its old files, and
//! no manifest mixes a rewrite's old and new files. Versions are announced and followed
//! in [`super::follow`].
//!
//! **Who is in.** With a node count (`--nodes N`, `spec.commit.nodes`) the manifest
//! waits for N nodes' parts of the version, whether or not those nodes are running: a
//! node whose sync is down, crash-looping or partitioned keeps the step not durable
//! (and says so) instead of being left out. Without one, it waits for every node that
//! announced the step (an intent) and then for a settle window in which no other node
//! announces it; a node whose sync never ran can then be missed, and the status says
//! that the count is not set.
//!
//! **Publishing** is a compare-and-swap on the manifest's name (the protocol is in
//! [`super::super::manifest`]): withdrawing deletes this node's part first, then writes
//! an empty blob over the manifest; publishing reads the manifest's ETag before it lists
//! the parts and writes only over that ETag.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};

use super::{
    PutOptions, SyncError, Syncer, Waiting, fetch_to, io_err, list_nodes, path_hash,
    tokio_stream_from, upload_file_if,
};
use crate::checkpoint::commit::step_number;
use crate::checkpoint::journal::CommitState;
use crate::checkpoint::manifest::{self, ManifestHead, ObjectRecord, PartHeader};
use crate::checkpoint::store::now_ms;
use crate::checkpoint::upload::{FileIdentity, UploadError, hex};
use crate::lake::{ETag, Lake, LakeError, Lister, ObjectMeta};

/// Longest part-record header line read (a header is a few hundred bytes).
const MAX_HEADER: u64 = 64 << 10;

/// What publishing a step came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// The manifest of this commit's version is in the lake, as this ETag.
    Durable(ETag),
    /// Not yet, and why.
    Waiting(Waiting),
}

/// Reads the header line of the part record `name` (not the objects after it). `None`
/// when the record is gone or changing as it is read (a node replacing it).
pub async fn read_part_header(
    lake: &dyn Lake,
    name: &str,
) -> Result<Option<PartHeader>, LakeError> {
    let meta = match lake.head(name).await {
        Ok(m) => m,
        Err(e) if matches!(e.root(), LakeError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut body = match lake
        .get_stream(name, 0..meta.size.min(MAX_HEADER), &meta.etag)
        .await
    {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.root(),
                LakeError::NotFound { .. } | LakeError::Changed { .. }
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut line = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.root(),
                    LakeError::NotFound { .. } | LakeError::Changed { .. }
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&chunk[..i]);
                break;
            }
            None => line.extend_from_slice(&chunk),
        }
    }
    match serde_json::from_slice::<PartHeader>(&line) {
        Ok(h) => Ok(Some(h)),
        Err(e) => {
            tracing::warn!(part = %name, error = %e, "ignoring a part record whose header cannot be read");
            Ok(None)
        }
    }
}

impl Syncer {
    /// Every node's part header of `step`, as the lake holds them now.
    pub(super) async fn part_headers(&self, step: &str) -> Result<Vec<PartHeader>, SyncError> {
        let mut out = Vec::new();
        for node in list_nodes(&*self.lake, &self.names.parts(step)).await? {
            if let Some(h) = read_part_header(&*self.lake, &self.names.part(step, &node)).await?
                && h.node == node
                && h.step == step
            {
                out.push(h);
            }
        }
        Ok(out)
    }

    /// Withdraws `step` before this node replaces any of its objects: this node's part
    /// record goes first (no publisher can count it from now on), then an empty blob
    /// is written over the manifest (no reader trusts the step, and a publisher that
    /// looked at the parts before this fails its write).
    pub(super) async fn withdraw(&self, step: &str) -> Result<(), SyncError> {
        self.lake
            .delete(&self.names.part(step, &self.cfg.node))
            .await?;
        self.lake
            .put(
                &self.names.manifest(step),
                bytes::Bytes::new(),
                &PutOptions::default(),
            )
            .await?;
        Ok(())
    }

    /// Durable means the manifest is there now: each commit the journal calls durable
    /// is checked against one listing of the manifests. A manifest withdrawn (empty),
    /// deleted (retention, by any node; by hand) or published again since as another
    /// version makes the commit durable no more: it is dropped, with why.
    pub(super) async fn revalidate_durable(
        &self,
        report: &mut super::PassReport,
    ) -> Result<(), SyncError> {
        let mut mine: HashMap<String, Vec<(u64, Option<ETag>)>> = HashMap::new();
        for seq in self.journal.seqs()? {
            if self.journal.state(seq) == CommitState::Durable {
                let step = self.commit_header(seq)?.0.step;
                mine.entry(step)
                    .or_default()
                    .push((seq, self.journal.durable_etag(seq)));
            }
        }
        if mine.is_empty() {
            return Ok(());
        }
        let mut found: HashMap<String, ObjectMeta> = HashMap::new();
        let mut l = Lister::new(&*self.lake, &self.names.manifests());
        while let Some(page) = l.next_page().await? {
            for o in page {
                if let Some(step) = self.names.step_of_manifest(&o.name)
                    && mine.contains_key(step)
                {
                    found.insert(step.to_owned(), o);
                }
            }
        }
        for (step, seqs) in mine {
            for (seq, etag) in seqs {
                let why = match found.get(&step) {
                    Some(m) if m.size > 0 && etag.as_ref().is_none_or(|e| *e == m.etag) => {
                        continue;
                    }
                    Some(m) if m.size > 0 => {
                        "the step was published again since, as another version"
                    }
                    Some(_) => {
                        "its manifest was withdrawn (a node is uploading a new version of the step)"
                    }
                    None => "its manifest is gone from the lake (retention, or deleted by hand)",
                };
                let why = format!("was durable; {why}");
                tracing::info!(step = %step, seq, "{why}");
                self.journal.mark_dropped(seq, &why)?;
                report.dropped.push((seq, why));
            }
        }
        Ok(())
    }

    /// Writes this node's part record of commit `seq` (everything its upload log says
    /// is in the lake), then puts it under `_tidepool/parts/<step>/<node>.jsonl`.
    pub(super) async fn write_part(&self, seq: u64, step: &str) -> Result<(), SyncError> {
        let header = self.commit_header(seq)?.0;
        let tmp = self.vol.journal_dir().join(format!("{seq:012}.part"));
        let what = || format!("writing the part record {}", tmp.display());
        {
            let mut out = BufWriter::new(File::create(&tmp).map_err(io_err(what()))?);
            // Two passes over the upload log (the header carries the totals); a path
            // logged twice (uploaded again after a torn line) counts once. Memory: one
            // 16-byte hash per file.
            let (mut files, mut bytes, mut seen) = (0u64, 0u64, std::collections::HashSet::new());
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
                version: header.version(&self.cfg.node),
                committed_unix_ms: header.committed_unix_ms,
            };
            serde_json::to_writer(&mut out, &head).expect("serializable");
            out.write_all(b"\n").map_err(io_err(what()))?;
            let mut seen = std::collections::HashSet::new();
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

    /// The version a manifest in the lake vouches for (read whole, one object at a
    /// time). A manifest of an older Tidepool names none: `None`.
    async fn manifest_version(&self, step: &str) -> Result<Option<String>, SyncError> {
        let local = self
            .vol
            .journal_dir()
            .join(format!("manifest-{step}.json.check"));
        fetch_to(&*self.lake, &self.names.manifest(step), &local).await?;
        let head =
            File::open(&local).and_then(|f| manifest::read_manifest(BufReader::new(f), |_| Ok(())));
        let _ = fs::remove_file(&local);
        let head = head.map_err(|e| SyncError::BadManifest {
            step: step.to_owned(),
            detail: e.to_string(),
        })?;
        Ok((!head.version.is_empty()).then_some(head.version))
    }

    /// The manifest's metadata now (`None`: there is none, not even a withdrawn one).
    async fn manifest_meta(&self, step: &str) -> Result<Option<ObjectMeta>, SyncError> {
        match self.lake.head(&self.names.manifest(step)).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if matches!(e.root(), LakeError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The version of `step` retention deleted, if it did (see
    /// [`crate::checkpoint::manifest::Retired`]).
    pub(super) async fn retired_version(&self, step: &str) -> Result<Option<String>, SyncError> {
        let name = self.names.retired(step);
        let meta = match self.lake.head(&name).await {
            Ok(m) => m,
            Err(e) if matches!(e.root(), LakeError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let body = match self.lake.get_range(&name, 0..meta.size, &meta.etag).await {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.root(),
                    LakeError::NotFound { .. } | LakeError::Changed { .. }
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(
            serde_json::from_slice::<crate::checkpoint::manifest::Retired>(&body)
                .ok()
                .map(|r| r.version),
        )
    }

    /// Publishes the manifest of commit `seq`'s version of `step` if every node's part of
    /// that version is in (see the module docs); otherwise says what it waits for.
    pub(super) async fn publish(&mut self, seq: u64, step: &str) -> Result<Published, SyncError> {
        let me = self.cfg.node.clone();
        let version = self.commit_header(seq)?.0.version(&me);
        // 1. The manifest as it is now: the condition of the write below.
        let current = self.manifest_meta(step).await?;
        if let Some(m) = &current
            && m.size > 0
        {
            match self.manifest_version(step).await? {
                // Published already: by another node of this version, or by this one
                // before a crash.
                Some(v) if v == version => return Ok(Published::Durable(m.etag.clone())),
                None => return Ok(Published::Durable(m.etag.clone())),
                Some(other) => {
                    return Ok(Published::Waiting(Waiting {
                        step: step.to_owned(),
                        nodes: Vec::new(),
                        settles_in_ms: None,
                        detail: format!(
                            "the lake holds version {other} of {step}, published by other nodes; this node's part belongs to version {version} (it commits its part of the newer version when one is led)"
                        ),
                    }));
                }
            }
        }
        // 2. Whose parts of this version are in. This node's own is written again if it
        // is missing (a node's withdrawal, or a person, removed it).
        let mut parts = self.part_headers(step).await?;
        if !parts.iter().any(|p| p.node == me && p.version() == version) {
            self.write_part(seq, step).await?;
            parts = self.part_headers(step).await?;
        }
        let of_version: Vec<&PartHeader> =
            parts.iter().filter(|p| p.version() == version).collect();
        let have: BTreeSet<String> = of_version.iter().map(|p| p.node.clone()).collect();
        let intents = list_nodes(&*self.lake, &self.names.intents(step)).await?;
        let waiting = |nodes: Vec<String>, detail: String| {
            Ok(Published::Waiting(Waiting {
                step: step.to_owned(),
                nodes,
                detail,
                settles_in_ms: None,
            }))
        };
        match self.cfg.nodes {
            Some(n) if (have.len() as u64) < u64::from(n) => {
                let known: Vec<String> = intents
                    .iter()
                    .chain(parts.iter().map(|p| &p.node))
                    .filter(|x| !have.contains(*x))
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                return waiting(
                    known.clone(),
                    format!(
                        "{} of the {n} nodes that write {step} have their part of it in the lake ({}); it waits for {} more{}",
                        have.len(),
                        have.iter().cloned().collect::<Vec<_>>().join(", "),
                        u64::from(n) - have.len() as u64,
                        if known.is_empty() {
                            String::new()
                        } else {
                            format!(" (known to write it: {})", known.join(", "))
                        }
                    ),
                );
            }
            Some(_) => {}
            None => {
                let missing: Vec<String> = intents.difference(&have).cloned().collect();
                if !missing.is_empty() {
                    return waiting(
                        missing.clone(),
                        format!(
                            "node(s) {} announced {step} and their part of it is not in the lake yet",
                            missing.join(", ")
                        ),
                    );
                }
                let since = *self
                    .complete_since
                    .entry((step.to_owned(), version.clone()))
                    .or_insert_with(Instant::now);
                let left = self.sync.settle.saturating_sub(since.elapsed());
                if !left.is_zero() {
                    return Ok(Published::Waiting(Waiting {
                        step: step.to_owned(),
                        nodes: Vec::new(),
                        detail: format!(
                            "every node that announced {step} has its part in; it is published in {}s unless another node announces it (the number of nodes is not set: set --nodes or spec.commit.nodes so that a node whose sync is down is waited for)",
                            left.as_secs().max(1)
                        ),
                        settles_in_ms: Some(left.as_millis() as u64),
                    }));
                }
            }
        }
        // 3. Merge those parts, check every object in the lake, write over `current`.
        let tmp = self
            .vol
            .journal_dir()
            .join(format!("manifest-{step}.json.part"));
        let merged = self.merge_parts(step, &version, &of_version, &tmp).await;
        match merged {
            Ok(true) => {}
            Ok(false) => {
                let _ = fs::remove_file(&tmp);
                return waiting(
                    Vec::new(),
                    format!("a node replaced its part of {step} while it was merged; trying again"),
                );
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        // Every object as the manifest names it, in the lake now: a writer that
        // replaced one meanwhile stops this manifest instead of making it vouch for
        // other bytes (and the write below fails if it withdrew the step).
        if let Err(e) = self.verify_in_lake(seq, step, &tmp).await {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.check_lease()?;
        let when = match &current {
            None => PutOptions::create_only(),
            Some(m) => PutOptions::replacing(m.etag.clone()),
        };
        let written = self
            .put_file_if(&self.names.manifest(step), &tmp, &when)
            .await;
        let _ = fs::remove_file(&tmp);
        match written {
            Ok(etag) => {
                self.complete_since.remove(&(step.to_owned(), version));
                Ok(Published::Durable(etag))
            }
            Err(SyncError::Upload(UploadError::Lake(e)))
                if matches!(
                    e.root(),
                    LakeError::Exists { .. }
                        | LakeError::Changed { .. }
                        | LakeError::NotFound { .. }
                ) =>
            {
                // Another node wrote the manifest's name since step 1: the same version
                // (published by it, or by our own write whose answer was lost), or a
                // withdrawal. Only the first is durable.
                if let Some(m) = self.manifest_meta(step).await?
                    && m.size > 0
                    && self.manifest_version(step).await?.as_deref() == Some(version.as_str())
                {
                    return Ok(Published::Durable(m.etag));
                }
                waiting(
                    Vec::new(),
                    format!(
                        "another node changed the manifest of {step} while this one published it (a node is uploading a new version); trying again"
                    ),
                )
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches the parts of `version` and merges their objects into the manifest file
    /// `tmp`. `Ok(false)`: a part changed version while it was fetched.
    async fn merge_parts(
        &self,
        step: &str,
        version: &str,
        parts: &[&PartHeader],
        tmp: &Path,
    ) -> Result<bool, SyncError> {
        // Each part is fetched to a local file and read back line by line, so a step of
        // any size is merged with one line of each in memory.
        let mut part_files: Vec<(String, PathBuf)> = Vec::new();
        let cleanup = |files: &[(String, PathBuf)]| {
            for (_, p) in files {
                let _ = fs::remove_file(p);
            }
        };
        for p in parts {
            let local = self
                .vol
                .journal_dir()
                .join(format!("part-{}.jsonl.part", p.node));
            if let Err(e) = fetch_to(&*self.lake, &self.names.part(step, &p.node), &local).await {
                cleanup(&part_files);
                let _ = fs::remove_file(&local);
                return Err(e);
            }
            part_files.push((p.node.clone(), local));
        }
        let head = ManifestHead {
            format: manifest::FORMAT.into(),
            step: step.to_owned(),
            step_number: step_number(step),
            created_unix_ms: now_ms(),
            nodes: parts.iter().map(|p| p.node.clone()).collect(),
            files: 0,
            bytes: 0,
            version: version.to_owned(),
            expected_nodes: self.cfg.nodes,
            // The save completed when the leading node committed it.
            saved_unix_ms: parts
                .iter()
                .find(|p| p.leads())
                .or_else(|| parts.iter().max_by_key(|p| p.committed_unix_ms))
                .map(|p| p.committed_unix_ms),
        };
        let what = || format!("writing the manifest {}", tmp.display());
        let written = (|| -> Result<bool, SyncError> {
            let mut merge =
                PartMerge::open(&part_files).map_err(io_err("reading the part records"))?;
            if merge.versions().any(|v| v != version) {
                return Ok(false);
            }
            let mut out = BufWriter::new(File::create(tmp).map_err(io_err(what()))?);
            manifest::write_manifest(&mut out, &head, || merge.next_object()).map_err(|e| {
                SyncError::BadManifest {
                    step: step.to_owned(),
                    detail: e.to_string(),
                }
            })?;
            out.into_inner()
                .map_err(|e| io_err(what())(e.into_error()))?
                .sync_all()
                .map_err(io_err(what()))?;
            Ok(true)
        })();
        cleanup(&part_files);
        written
    }

    /// Checks each object of the manifest file `local` against the lake's size and
    /// Content-MD5 (8 requests at a time, one manifest entry in memory per request). An
    /// object of this node's found replaced is retracted from commit `seq`'s upload log,
    /// so the next pass uploads it again (another node's is that node's to mend).
    async fn verify_in_lake(&self, seq: u64, step: &str, local: &Path) -> Result<(), SyncError> {
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
                let found = match self.lake.head(&name).await {
                    Ok(meta) => {
                        let md5 = meta.content_md5.map(|m| hex(&m));
                        if meta.size == o.size && md5.as_deref() == Some(o.md5.as_str()) {
                            return Ok(());
                        }
                        format!(
                            "is {} bytes with MD5 {}",
                            meta.size,
                            md5.as_deref().unwrap_or("none")
                        )
                    }
                    Err(e) if matches!(e.root(), LakeError::NotFound { .. }) => "is gone".to_owned(),
                    Err(e) => return Err(e.into()),
                };
                let mend = if o.node == self.cfg.node {
                    self.journal.retract_uploaded(seq, &o.path)?;
                    "this node uploads it again"
                } else {
                    "node {node} uploads it again when it publishes"
                };
                Err(SyncError::BadManifest {
                    step: step.to_owned(),
                    detail: format!(
                        "{name} in the lake {found}, the part record of node {} says {} bytes with MD5 {}: it was replaced or deleted since it was uploaded; {}",
                        o.node,
                        o.size,
                        o.md5,
                        mend.replace("{node}", &o.node)
                    ),
                })
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

    /// Uploads a local file we wrote ourselves (manifests) under `when`'s conditions.
    async fn put_file_if(
        &self,
        name: &str,
        path: &Path,
        when: &PutOptions,
    ) -> Result<ETag, SyncError> {
        let m = fs::metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
        use std::os::unix::fs::MetadataExt;
        let up = upload_file_if(
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
            when,
        )
        .await?;
        Ok(up.etag)
    }
}

/// The objects of several part records (local files), one after another, each listed
/// once: a path two nodes both logged is listed once if its content is the same, and
/// refused if not. Memory: one line of one record, and two 16-byte hashes and a node
/// name per object (for the duplicate check).
pub struct PartMerge {
    parts: Vec<(String, std::io::Lines<BufReader<File>>, PartHeader)>,
    current: usize,
    seen: HashMap<u128, (u128, String)>,
}

impl PartMerge {
    /// Opens the records (node, file) and reads their headers.
    pub fn open(files: &[(String, PathBuf)]) -> io::Result<PartMerge> {
        let mut parts = Vec::new();
        for (node, path) in files {
            let mut lines = BufReader::new(File::open(path)?).lines();
            let first = lines.next().transpose()?.unwrap_or_default();
            let header: PartHeader = serde_json::from_str(&first)
                .map_err(|e| io::Error::other(format!("part record of {node}: {e}")))?;
            parts.push((node.clone(), lines, header));
        }
        Ok(PartMerge {
            parts,
            current: 0,
            seen: HashMap::new(),
        })
    }

    /// The version each record says it belongs to.
    pub fn versions(&self) -> impl Iterator<Item = String> + '_ {
        self.parts.iter().map(|(_, _, h)| h.version())
    }

    /// The next object, its node set; `None` after the last record's last line.
    pub fn next_object(&mut self) -> io::Result<Option<ObjectRecord>> {
        while let Some((node, lines, _)) = self.parts.get_mut(self.current) {
            let Some(l) = lines.next() else {
                self.current += 1;
                continue;
            };
            let l = l?;
            if l.is_empty() {
                continue;
            }
            let mut o: ObjectRecord = serde_json::from_str(&l).map_err(io::Error::other)?;
            o.node = node.clone();
            let md5h = path_hash(&o.md5);
            match self.seen.get(&path_hash(&o.path)) {
                Some((m, _)) if *m == md5h => continue,
                Some((_, other)) => {
                    return Err(io::Error::other(format!(
                        "nodes {other} and {node} both wrote {} with different content; give each rank its own file names",
                        o.path
                    )));
                }
                None => {
                    self.seen.insert(path_hash(&o.path), (md5h, node.clone()));
                }
            }
            return Ok(Some(o));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        dir: &Path,
        node: &str,
        version: &str,
        objects: &[(&str, &str)],
    ) -> (String, PathBuf) {
        let p = dir.join(format!("{node}.jsonl"));
        let mut s = serde_json::to_string(&PartHeader {
            step: "s".into(),
            node: node.into(),
            seq: 1,
            reason: "r".into(),
            files: objects.len() as u64,
            bytes: 0,
            version: version.into(),
            committed_unix_ms: 0,
        })
        .unwrap();
        s.push('\n');
        for (path, md5) in objects {
            s.push_str(&format!(
                "{{\"path\":\"{path}\",\"size\":1,\"md5\":\"{md5}\"}}\n"
            ));
        }
        fs::write(&p, s).unwrap();
        (node.to_owned(), p)
    }

    #[test]
    fn parts_merge_into_one_list_with_each_object_once_and_its_node() {
        let d = tempfile::tempdir().unwrap();
        let files = [
            record(
                d.path(),
                "a",
                "a:1",
                &[("__0_0.distcp", "aa"), (".metadata", "mm")],
            ),
            record(
                d.path(),
                "b",
                "a:1",
                &[("__1_0.distcp", "bb"), (".metadata", "mm")],
            ),
        ];
        let mut m = PartMerge::open(&files).unwrap();
        assert!(m.versions().all(|v| v == "a:1"));
        let mut got = Vec::new();
        while let Some(o) = m.next_object().unwrap() {
            got.push((o.path, o.node));
        }
        assert_eq!(
            got,
            [
                ("__0_0.distcp".to_string(), "a".to_string()),
                (".metadata".into(), "a".into()),
                ("__1_0.distcp".into(), "b".into()),
            ],
            "the same file with the same content from two nodes is listed once"
        );
    }

    #[test]
    fn two_nodes_writing_one_name_with_different_bytes_is_refused_in_words() {
        let d = tempfile::tempdir().unwrap();
        let files = [
            record(d.path(), "a", "a:1", &[("model.pt", "aa")]),
            record(d.path(), "b", "a:1", &[("model.pt", "bb")]),
        ];
        let mut m = PartMerge::open(&files).unwrap();
        m.next_object().unwrap();
        let e = m.next_object().unwrap_err().to_string();
        assert!(e.contains("nodes a and b both wrote model.pt"), "{e}");
    }

    #[test]
    fn a_part_of_another_version_is_seen_before_merging() {
        let d = tempfile::tempdir().unwrap();
        let files = [
            record(d.path(), "a", "a:9", &[]),
            // An older record: no version field, so its own (`b:1`).
            record(d.path(), "b", "", &[]),
        ];
        let m = PartMerge::open(&files).unwrap();
        assert_eq!(m.versions().collect::<Vec<_>>(), ["a:9", "b:1"]);
    }
}
