//! What a node says to the others, and how it follows them, apart from the passes (a
//! pass can be busy uploading for minutes; this runs every quarter second):
//!
//! - **Intents**: every step this node writes is announced (`intents/<step>/<node>`),
//!   so that, without a node count, other nodes wait for this node's part.
//! - **Versions**: a commit of this node's own (its rule fired: rank 0's node saw the
//!   marker, Orbax's primary renamed its temporary directory) is announced as a version
//!   of the step as soon as it is taken, before its upload (`versions/<step>/<node>.<seq>.json`:
//!   who, when, and the directory the save came from). This node's older versions of
//!   the step are removed then.
//! - **Following**: for each step this node writes and has no durable commit of, the
//!   newest version another node leads is followed: the mount is asked to commit this
//!   node's files as its part of it (an Orbax temporary directory of the same name as
//!   the leader's, or the step's directory). The mount decides whether its files can be
//!   that version's (see [`crate::checkpoint::commit`]). A version is followed promptly
//!   after it is taken, before the job can write the step again; a request the mount
//!   has not acted on is made again every 10 s (a mount restarted meanwhile).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{PutOptions, SyncError};
use crate::checkpoint::journal::{CommitHeader, CommitRequest, CommitState, Journal};
use crate::checkpoint::manifest::Layout;
use crate::checkpoint::store::{VolumeLayout, dir_for_version};
use crate::lake::{ETag, Lake, LakeError, Lister};

/// A version of a step, as its leading node announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub step: String,
    pub node: String,
    pub seq: u64,
    /// When the leader took the commit (its clock).
    pub committed_unix_ms: u64,
    /// The directory the save was in on the leader before it became the step.
    pub from_dir: String,
}

impl VersionRecord {
    pub fn version(&self) -> String {
        format!("{}:{}", self.node, self.seq)
    }
}

/// Lake names of version records.
pub fn versions_prefix(names: &Layout, step: &str) -> String {
    format!("{}_tidepool/versions/{step}/", names.prefix)
}

fn version_name(names: &Layout, step: &str, node: &str, seq: u64) -> String {
    format!("{}{node}.{seq:012}.json", versions_prefix(names, step))
}

/// The announcer's memory (lost with the process: everything is announced again).
#[derive(Default)]
pub struct Announcer {
    intents: HashSet<String>,
    versions: HashSet<u64>,
    headers: HashMap<u64, CommitHeader>,
    records: HashMap<String, (ETag, VersionRecord)>,
    /// (step, version) → when this node last asked its mount to follow it.
    requested: HashMap<(String, String), Instant>,
    last_follow: Option<Instant>,
}

/// What the announcer works on.
pub struct Ctx<'a> {
    pub lake: &'a dyn Lake,
    pub journal: &'a Journal,
    pub names: &'a Layout,
    pub node: &'a str,
    pub vol: &'a VolumeLayout,
}

impl Announcer {
    fn header(&mut self, journal: &Journal, seq: u64) -> Result<CommitHeader, SyncError> {
        if let Some(h) = self.headers.get(&seq) {
            return Ok(h.clone());
        }
        let h = journal.read_commit(seq)?.header().clone();
        self.headers.insert(seq, h.clone());
        Ok(h)
    }

    /// Announces what is new, and follows other nodes at most once a second (`force`:
    /// now).
    pub async fn tick(&mut self, ctx: &Ctx<'_>, force: bool) -> Result<(), SyncError> {
        self.announce_intents(ctx).await?;
        self.announce_versions(ctx).await?;
        if force
            || self
                .last_follow
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_follow = Some(Instant::now());
            self.follow(ctx).await?;
        }
        Ok(())
    }

    async fn announce_intents(&mut self, ctx: &Ctx<'_>) -> Result<(), SyncError> {
        for step in ctx.journal.seen()? {
            if self.intents.contains(&step) {
                continue;
            }
            ctx.lake
                .put(
                    &ctx.names.intent(&step, ctx.node),
                    bytes::Bytes::new(),
                    &PutOptions::default(),
                )
                .await?;
            self.intents.insert(step);
        }
        Ok(())
    }

    async fn announce_versions(&mut self, ctx: &Ctx<'_>) -> Result<(), SyncError> {
        for seq in ctx.journal.seqs()? {
            if self.versions.contains(&seq) {
                continue;
            }
            let h = self.header(ctx.journal, seq)?;
            if h.follows.is_some() || ctx.journal.state(seq) != CommitState::Pending {
                self.versions.insert(seq);
                continue;
            }
            let rec = VersionRecord {
                step: h.step.clone(),
                node: ctx.node.to_owned(),
                seq,
                committed_unix_ms: h.committed_unix_ms,
                from_dir: h.renamed_from.clone().unwrap_or_else(|| h.dir().to_owned()),
            };
            let body = serde_json::to_vec(&rec).expect("serializable");
            ctx.lake
                .put(
                    &version_name(ctx.names, &h.step, ctx.node, seq),
                    body.into(),
                    &PutOptions::default(),
                )
                .await?;
            // This node's older versions of the step are of no use to anyone now.
            let mine = format!("{}{}.", versions_prefix(ctx.names, &h.step), ctx.node);
            let mut stale = Vec::new();
            let mut l = Lister::new(ctx.lake, &mine);
            while let Some(page) = l.next_page().await? {
                stale.extend(
                    page.into_iter()
                        .map(|o| o.name)
                        .filter(|n| *n != version_name(ctx.names, &h.step, ctx.node, seq)),
                );
            }
            for n in stale {
                ctx.lake.delete(&n).await?;
            }
            tracing::debug!(step = %h.step, seq, "version announced");
            self.versions.insert(seq);
        }
        Ok(())
    }

    /// The version records of `step` now (read once per ETag).
    async fn records(
        &mut self,
        ctx: &Ctx<'_>,
        step: &str,
    ) -> Result<Vec<VersionRecord>, SyncError> {
        let mut out = Vec::new();
        let mut l = Lister::new(ctx.lake, &versions_prefix(ctx.names, step));
        while let Some(page) = l.next_page().await? {
            for o in page {
                if let Some((etag, rec)) = self.records.get(&o.name)
                    && *etag == o.etag
                {
                    out.push(rec.clone());
                    continue;
                }
                let body = match ctx.lake.get_range(&o.name, 0..o.size, &o.etag).await {
                    Ok(b) => b,
                    Err(e)
                        if matches!(
                            e.root(),
                            LakeError::NotFound { .. } | LakeError::Changed { .. }
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                match serde_json::from_slice::<VersionRecord>(&body) {
                    Ok(rec) if rec.step == step => {
                        self.records
                            .insert(o.name.clone(), (o.etag.clone(), rec.clone()));
                        out.push(rec);
                    }
                    _ => {
                        tracing::warn!(name = %o.name, "ignoring a version record that cannot be read")
                    }
                }
            }
        }
        Ok(out)
    }

    async fn follow(&mut self, ctx: &Ctx<'_>) -> Result<(), SyncError> {
        // This node's newest commit of each step that is not dropped.
        let mut latest: HashMap<String, (CommitHeader, CommitState)> = HashMap::new();
        for seq in ctx.journal.seqs()? {
            let state = ctx.journal.state(seq);
            if matches!(state, CommitState::Dropped(_)) {
                continue;
            }
            let h = self.header(ctx.journal, seq)?;
            latest.insert(h.step.clone(), (h, state));
        }
        for step in ctx.journal.seen()? {
            let mine = latest.get(&step);
            if matches!(mine, Some((_, CommitState::Durable))) {
                continue;
            }
            let records = self.records(ctx, &step).await?;
            let Some(lead) = records
                .iter()
                .filter(|r| r.node != ctx.node)
                .max_by(|a, b| (a.committed_unix_ms, &a.node).cmp(&(b.committed_unix_ms, &b.node)))
            else {
                continue;
            };
            let lead_version = lead.version();
            let follow = match mine {
                None => true,
                Some((h, _)) if h.version(ctx.node) == lead_version => false,
                // This node leads a version of its own: the later commit wins.
                Some((h, _)) if h.follows.is_none() => {
                    (h.committed_unix_ms, ctx.node) < (lead.committed_unix_ms, lead.node.as_str())
                }
                // It follows another version: a newer one only.
                Some((h, _)) => lead.committed_unix_ms > h.follows_unix_ms.unwrap_or(0),
            };
            if !follow || dir_for_version(ctx.vol, &step, Some(&lead.from_dir)).is_none() {
                continue;
            }
            let key = (step.clone(), lead_version.clone());
            if self
                .requested
                .get(&key)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
            {
                continue;
            }
            tracing::info!(step = %step, leader = %lead.node, version = %lead_version, "another node leads a version of this step; committing this node's part of it");
            ctx.journal.request_commit(
                &step,
                &CommitRequest {
                    node: lead.node.clone(),
                    version: lead_version,
                    led_unix_ms: lead.committed_unix_ms,
                    from_dir: Some(lead.from_dir.clone()),
                },
            )?;
            self.requested.insert(key, Instant::now());
        }
        Ok(())
    }
}
