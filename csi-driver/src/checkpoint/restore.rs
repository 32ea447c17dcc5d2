//! Reading durable steps back out of the lake: which steps are durable, in what order,
//! and `tidepool restore` of one of them.
//!
//! A step is durable exactly when its manifest (`_tidepool/steps/<step>.json`) is in
//! the lake and not empty (an empty blob is a withdrawn manifest; see
//! [`super::manifest`]). Steps are ordered by when their save completed (the leading
//! node's commit, which the manifest records first), not by the number in their name
//! and not by when they became durable: a run that restarts its numbering into the same
//! destination (`step-100` after `step-5000`) has its newest step last, an old step
//! that became durable late (a node's sync was down) stays old, and "latest" is the
//! step saved last. Manifests written without that time are ordered by when the lake
//! wrote them; within one instant, by step number.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use futures::{StreamExt, TryStreamExt};

use super::commit::step_number;
use std::collections::HashMap;

use super::manifest::{self, Layout, ManifestHead, ObjectRecord, parse_md5_hex, valid_step_name};
use super::sync::{SyncError, fetch_to, io_err, tokio_stream_from};
use super::upload::download_verified;
use crate::lake::{ETag, Lake, LakeError, Lister};

/// A durable step in the lake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableStep {
    pub step: String,
    /// The number in its name ([`step_number`]), if any.
    pub number: Option<u64>,
    /// When its save completed (the leading node's commit, from the manifest's first
    /// bytes); for a manifest written without it, when the lake wrote the manifest.
    pub saved: SystemTime,
    pub manifest_etag: ETag,
}

/// Remembers the save time of each manifest version read (manifests never change under
/// one ETag), so that a sync listing its steps every pass reads each once.
pub type SavedTimes = parking_lot::Mutex<HashMap<String, Option<u64>>>;

/// Every durable step under a destination, saved first to saved last (the last is the
/// latest). Streams the listing; reads the first bytes of each manifest (16 at a time,
/// once per version with `cache`); holds one entry per durable step.
pub async fn durable_steps_detailed(
    lake: &dyn Lake,
    names: &Layout,
    cache: Option<&SavedTimes>,
) -> Result<Vec<DurableStep>, LakeError> {
    let mut listed = Vec::new();
    let mut l = Lister::new(lake, &names.manifests());
    while let Some(page) = l.next_page().await? {
        for o in page {
            match names.step_of_manifest(&o.name) {
                // Empty: withdrawn (a node is uploading a new version of the step).
                Some(_) if o.size == 0 => {}
                Some(s) if valid_step_name(s) => listed.push((s.to_owned(), o)),
                Some(_) | None => {
                    tracing::warn!(name = %o.name, "ignoring a manifest whose step name is not a single directory name")
                }
            }
        }
    }
    let mut out: Vec<DurableStep> = futures::stream::iter(listed)
        .map(|(step, o)| async move {
            let known = cache.and_then(|c| c.lock().get(&o.etag.0).copied());
            let saved_ms = match known {
                Some(t) => t,
                None => {
                    let first = lake
                        .get_range(&o.name, 0..o.size.min(manifest::SAVED_PREFIX), &o.etag)
                        .await;
                    let t = match first {
                        Ok(b) => manifest::saved_unix_ms_of(&b),
                        // Changed or gone since it was listed: ordered by the listing.
                        Err(e)
                            if matches!(
                                e.root(),
                                LakeError::NotFound { .. } | LakeError::Changed { .. }
                            ) =>
                        {
                            None
                        }
                        Err(e) => return Err(e),
                    };
                    if let Some(c) = cache {
                        c.lock().insert(o.etag.0.clone(), t);
                    }
                    t
                }
            };
            Ok(DurableStep {
                number: step_number(&step),
                saved: saved_ms.map_or(o.last_modified, |t| {
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(t)
                }),
                step,
                manifest_etag: o.etag,
            })
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    // Within one instant (Azure's stamps are whole seconds), by number, then name.
    out.sort_by(|a, b| (a.saved, a.number, &a.step).cmp(&(b.saved, b.number, &b.step)));
    Ok(out)
}

/// The durable steps under a destination: (step, step number), oldest manifest first.
pub async fn durable_steps(
    lake: &dyn Lake,
    names: &Layout,
) -> Result<Vec<(String, Option<u64>)>, LakeError> {
    Ok(durable_steps_detailed(lake, names, None)
        .await?
        .into_iter()
        .map(|d| (d.step, d.number))
        .collect())
}

/// Which step `tidepool restore` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepChoice {
    /// The step made durable last.
    Latest,
    /// A step by name (`step-1000`) or number (`1000`; of several steps with that
    /// number, the one made durable last).
    Named(String),
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
pub(crate) fn safe_rel(step: &str, p: &str) -> Result<PathBuf, SyncError> {
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
    let steps = durable_steps(lake, &names).await?;
    let step = match choice {
        StepChoice::Latest => {
            steps
                .last()
                .map(|(s, _)| s.clone())
                .ok_or_else(|| SyncError::NoSteps {
                    destination: destination.to_owned(),
                })?
        }
        StepChoice::Named(s) => {
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
                let md5 = parse_md5_hex(&o.md5).ok_or_else(|| SyncError::BadManifest {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::PutOptions;
    use crate::lake::memory::MemoryLake;

    #[test]
    fn manifest_paths_never_leave_the_step() {
        assert!(safe_rel("s", "a/b.pt").is_ok());
        assert!(safe_rel("s", "../etc/passwd").is_err());
        assert!(safe_rel("s", "/etc/passwd").is_err());
        assert_eq!(safe_rel("s", "a/./b").unwrap(), PathBuf::from("a/b"));
        assert!(safe_rel("s", "").is_err());
    }

    #[tokio::test]
    async fn steps_are_ordered_by_when_they_became_durable_and_withdrawn_ones_are_not_durable() {
        let lake = MemoryLake::new();
        let names = Layout::new("r/");
        for step in ["step-5000", "step-5001", "step-100", "final"] {
            lake.put(&names.manifest(step), "{}".into(), &PutOptions::default())
                .await
                .unwrap();
        }
        // Withdrawn: an empty blob under the manifest's name.
        lake.put(
            &names.manifest("step-7000"),
            bytes::Bytes::new(),
            &PutOptions::default(),
        )
        .await
        .unwrap();
        let steps: Vec<String> = durable_steps(&lake, &names)
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, ["step-5000", "step-5001", "step-100", "final"]);
    }
}
