//! Retention: which durable steps leave local disk (`keep_local`) and which leave the
//! lake (`keep_remote`).
//!
//! "Newest" is by when a step's save completed (see [`crate::checkpoint::restore`]),
//! never by the number in its name nor by when it became durable: a run that restarts
//! its numbering into the same destination keeps its new steps, and an old step that
//! became durable late does not push out newer ones. Only
//! steps whose name has a number are candidates (`final` or `best` never leave
//! automatically), and the newest durable step in the lake is never deleted, whatever
//! `keep_remote` says.
//!
//! Locally, a step is moved out of the tree only while nothing is writing it: not while
//! a commit of it is pending, not while the mount reports it changed since its commit,
//! and the tree refuses changes to it from the moment the sync marks it as retiring
//! (`journal/retiring/<dir>`; see [`crate::checkpoint::tree::StepEvents::read_only`]).
//!
//! In the lake a step is deleted manifest first (from then on no reader trusts it): a
//! tombstone (a copy of the manifest) is written, then the manifest deleted, then the
//! objects, parts and intents, then the tombstone. A deletion a crash interrupted is
//! finished by the next pass of any node.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader};

use super::{SyncError, Syncer, fetch_to, io_err};
use crate::checkpoint::commit::step_number;
use crate::checkpoint::journal::CommitState;
use crate::checkpoint::manifest::{self, ObjectRecord};
use crate::checkpoint::restore::durable_steps_detailed;
use crate::checkpoint::store::{MountStatus, Store, now_ms};
use crate::lake::Lister;

impl Syncer {
    /// Moves durable steps beyond `keep_local` out of the tree, oldest save first.
    pub(super) fn retain_local(&self) -> Result<Vec<String>, SyncError> {
        let Some(keep) = self.cfg.keep_local else {
            return Ok(Vec::new());
        };
        // Per step: its newest durable commit (by when its save completed, then
        // commit order), and the directory it came from.
        let mut durable: BTreeMap<String, ((u64, u64), String)> = BTreeMap::new();
        let mut pending: BTreeSet<String> = BTreeSet::new();
        let mut seqs_of: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for seq in self.journal.seqs()? {
            let h = self.commit_header(seq)?.0;
            seqs_of.entry(h.step.clone()).or_default().push(seq);
            match self.journal.state(seq) {
                CommitState::Durable => {
                    durable.insert(
                        h.step.clone(),
                        ((h.saved_unix_ms(), seq), h.dir().to_owned()),
                    );
                }
                CommitState::Pending => {
                    pending.insert(h.step);
                }
                CommitState::Dropped(_) => {}
            }
        }
        // Written since its commit, as the running mount reports it.
        let changed: BTreeSet<String> = MountStatus::read(&self.vol)
            .map(|m| m.uncommitted.into_iter().collect())
            .unwrap_or_default();
        let mut order: Vec<((u64, u64), String, String)> = durable
            .into_iter()
            .filter(|(s, _)| step_number(s).is_some())
            .map(|(s, (seq, dir))| (seq, s, dir))
            .collect();
        order.sort();
        let n = order.len().saturating_sub(keep as usize);
        let mut removed = Vec::new();
        for (_, step, dir) in order.into_iter().take(n) {
            if pending.contains(&step) || changed.contains(&dir) {
                continue;
            }
            let src = self.vol.tree().join(&dir);
            if src.exists() {
                let mark = self.vol.retiring(dir.as_ref());
                fs::create_dir_all(mark.parent().expect("in the journal"))
                    .map_err(io_err("creating the retiring marks' directory"))?;
                crate::checkpoint::journal::write_atomic(&mark, b"")
                    .map_err(io_err(format!("writing {}", mark.display())))?;
                let moved = (|| {
                    let dst = self.vol.trash().join(format!("{dir}-{}", now_ms()));
                    fs::create_dir_all(self.vol.trash())
                        .map_err(io_err("creating the trash directory"))?;
                    fs::rename(&src, &dst).map_err(io_err(format!(
                        "moving {} out of the volume",
                        src.display()
                    )))?;
                    fs::remove_dir_all(&dst).map_err(io_err(format!("removing {}", dst.display())))
                })();
                let _ = fs::remove_file(&mark);
                moved?;
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

    /// Deletes durable steps beyond `keep_remote` from the lake, oldest save first,
    /// never the newest. Deletions a crash interrupted are finished first.
    pub(super) async fn retain_remote(&self) -> Result<Vec<String>, SyncError> {
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
        let steps =
            durable_steps_detailed(&*self.lake, &self.names, Some(&self.saved_times)).await?;
        let newest = steps.last().map(|d| d.step.clone());
        let numbered: Vec<String> = steps
            .into_iter()
            .filter(|d| d.number.is_some())
            .map(|d| d.step)
            .collect();
        let n = numbered.len().saturating_sub(keep as usize);
        for step in numbered.into_iter().take(n) {
            if Some(&step) == newest.as_ref() {
                continue;
            }
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
            tokio::task::spawn_blocking(move || -> io::Result<manifest::ManifestHead> {
                let f = File::open(&local)?;
                manifest::read_manifest(BufReader::new(f), |o| {
                    tx.blocking_send(o).map_err(|_| io::Error::other("stopped"))
                })
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
        let head = parsed.map_err(|e| SyncError::BadManifest {
            step: step.to_owned(),
            detail: e.to_string(),
        })?;
        // Remembered: a node whose part of this version was still on its way drops it.
        let retired = manifest::Retired {
            step: step.to_owned(),
            version: head.version,
            retired_unix_ms: now_ms(),
        };
        self.lake
            .put(
                &self.names.retired(step),
                serde_json::to_vec(&retired).expect("serializable").into(),
                &crate::lake::PutOptions::default(),
            )
            .await?;
        for prefix in [
            self.names.parts(step),
            self.names.intents(step),
            super::follow::versions_prefix(&self.names, step),
        ] {
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
}
