//! The checkpoint syncs assigned to this node (the `CachePool`'s
//! `spec.checkpointSyncs`): the settings and credentials their volumes are served
//! with, and the progress the agent reports for each in the pool's status.
//!
//! - **Settings** are converted once per assignment change: markers as file names,
//!   `quiescence` parsed as a duration, a retention of 0 as "keep all". An assignment
//!   whose settings cannot be read gives no settings (its volume uses the defaults,
//!   which never delete anything) and reports failed, saying which field to fix.
//! - **Progress** is read from the volume's directory in the pool
//!   (`<cache-dir>/checkpoints/<slug>/`, see [`VolumeLayout`]): the sync's last report
//!   (`journal/status.json`) and the mount's (`journal/mount.json`). Two small files per
//!   assignment and no journal walk, because [`node_status`] runs on every heartbeat.
//!   Nothing here writes to the volume: the mount and the sync, possibly other
//!   processes, own every file in it. A volume without a directory has written nothing
//!   on this node yet: no steps, nothing pending, not failed.
//! - **Steps** are reported by number, parsed from their names as the sync and restore
//!   order them ([`step_number`]); a step named without a number is not counted, and
//!   the message says so.

use std::path::Path;
use std::time::Duration;

use tidepool_api::cache_pool::{CheckpointAssignment, CheckpointNodeStatus};

use super::CheckpointSettings;
use crate::checkpoint::commit::{CommitRule, step_number};
use crate::checkpoint::store::{MountStatus, VolumeLayout};
use crate::checkpoint::sync::SyncStatus;
use crate::lake::url::LakeUrlError;
use crate::lake::{Credentials, LakeUrl};

/// Longest status message, in characters: the `CachePool` schema's bound (a longer one
/// would make the API server refuse the whole status).
const MAX_MESSAGE: usize = 4096;

/// A checkpoint assignment as this node acts on it.
#[derive(Clone)]
pub(super) struct Assigned {
    pub(super) assignment: CheckpointAssignment,
    /// The commit rule and retention, or why they cannot be read.
    pub(super) settings: Result<CheckpointSettings, String>,
    /// The destination's credentials, or why they cannot be resolved (never the secret).
    pub(super) credentials: Result<Credentials, String>,
}

impl Assigned {
    pub(super) fn new(
        assignment: CheckpointAssignment,
        credentials: Result<Credentials, String>,
    ) -> Self {
        Assigned {
            settings: settings(&assignment),
            assignment,
            credentials,
        }
    }
}

/// The settings of a checkpoint assignment, or what to fix in its `CheckpointSync`.
pub fn settings(a: &CheckpointAssignment) -> Result<CheckpointSettings, String> {
    let quiescence = match a.commit.quiescence.as_deref() {
        None => None,
        Some(q) => match humantime::parse_duration(q) {
            Ok(d) if d > Duration::ZERO => Some(d),
            Ok(_) => {
                return Err(format!(
                    "spec.commit.quiescence {q:?} of CheckpointSync {}/{} is zero; give a positive duration (e.g. 5m) or remove it",
                    a.owner.namespace, a.owner.name
                ));
            }
            Err(e) => {
                return Err(format!(
                    "spec.commit.quiescence {q:?} of CheckpointSync {}/{} cannot be read ({e}); write a duration such as 5m or 1h30m",
                    a.owner.namespace, a.owner.name
                ));
            }
        },
    };
    // 0 keeps all (as does a negative count, which the CheckpointSync schema refuses).
    let keep = |n: i32| u32::try_from(n).ok().filter(|&n| n > 0);
    Ok(CheckpointSettings {
        rule: CommitRule {
            markers: a.commit.markers.iter().map(Into::into).collect(),
            quiescence,
        },
        keep_local: keep(a.retention.keep_local),
        keep_remote: keep(a.retention.keep_remote),
        // The schema keeps it at 1 or more.
        nodes: a
            .commit
            .nodes
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0),
        owner_uid: Some(a.owner.uid.clone()).filter(|u| !u.is_empty()),
    })
}

/// The directory of the checkpoint volume writing to `url` in the pool at `cache_dir`.
/// Named after the URL as [`LakeUrl`] spells it (no query string, so never a SAS), as
/// `tidepool mount --checkpoint` names it: both find the same volume.
pub fn volume_layout(cache_dir: &Path, url: &str) -> Result<VolumeLayout, LakeUrlError> {
    let url = LakeUrl::parse(url)?;
    Ok(VolumeLayout::for_url(cache_dir, &url.to_string()))
}

/// The progress of `assigned` on this node, from its volume's files in the pool at
/// `cache_dir` (see the module docs).
pub(super) fn node_status(assigned: &Assigned, cache_dir: &Path) -> CheckpointNodeStatus {
    let a = &assigned.assignment;
    let mut s = CheckpointNodeStatus {
        namespace: a.owner.namespace.clone(),
        name: a.owner.name.clone(),
        uid: a.owner.uid.clone(),
        ..Default::default()
    };
    // Failures first: they are what the user must act on.
    let mut failures: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    if let Err(e) = &assigned.credentials {
        failures.push(format!(
            "cannot resolve the credentials of the destination, so nothing uploads from this node: {e}"
        ));
    }
    if let Err(e) = &assigned.settings {
        failures.push(e.clone());
    }
    match volume_layout(cache_dir, &a.destination.url) {
        Err(e) => failures.push(format!(
            "{e}; fix spec.destination.url of CheckpointSync {}/{}",
            a.owner.namespace, a.owner.name
        )),
        // Nothing written on this node yet.
        Ok(layout) if !layout.dir.is_dir() => {}
        Ok(layout) => {
            match SyncStatus::read(&layout) {
                Ok(st) => {
                    let number = |step: &str| step_number(step).and_then(|n| i64::try_from(n).ok());
                    s.latest_committed_step =
                        st.latest_committed.as_ref().and_then(|i| number(&i.step));
                    s.latest_durable_step =
                        st.latest_durable.as_ref().and_then(|i| number(&i.step));
                    // "Latest" sorts a step without a number below every numbered one:
                    // only a volume whose steps all lack one shows this.
                    let mut unnumbered: Vec<&str> = [&st.latest_committed, &st.latest_durable]
                        .into_iter()
                        .flatten()
                        .map(|i| i.step.as_str())
                        .filter(|step| number(step).is_none())
                        .collect();
                    unnumbered.dedup();
                    for step in unnumbered {
                        notes.push(format!(
                            "step {step:?} has no number in its name, so it is not counted; name steps with their number (e.g. step-1000)"
                        ));
                    }
                    s.pending_bytes = i64::try_from(st.pending_bytes).unwrap_or(i64::MAX);
                    if let Some(e) = st.last_error {
                        failures.push(format!("the last upload pass failed (it is retried): {e}"));
                    }
                    for w in &st.waiting {
                        let nodes = w.nodes.join(", ");
                        let (noun, verb) = if w.nodes.len() == 1 {
                            ("node", "its part is")
                        } else {
                            ("nodes", "their parts are")
                        };
                        if w.nodes.is_empty() {
                            notes.push(format!("{} is not durable yet: {}", w.step, w.detail));
                        } else {
                            notes.push(format!(
                                "{} waits for {noun} {nodes}: {verb} not in the lake yet (still uploading there, or the tidepool agent there is not running){}",
                                w.step,
                                if w.detail.is_empty() {
                                    String::new()
                                } else {
                                    format!("; {}", w.detail)
                                }
                            ));
                        }
                    }
                    if st.expected_nodes.is_none() {
                        notes.push(format!(
                            "spec.commit.nodes of CheckpointSync {}/{} is not set: a step waits for the nodes that announced it, so a node whose agent was down from the start can be left out of it; set it to the number of nodes the job writes from",
                            a.owner.namespace, a.owner.name
                        ));
                    }
                }
                // The sync has not reported yet.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => notes.push(format!(
                    "cannot read the sync's report in {}: {e}",
                    layout.dir.display()
                )),
            }
            if let Some(m) = MountStatus::read(&layout) {
                if !m.uncommitted.is_empty() {
                    notes.push(format!(
                        "written and not committed yet: {} (no commit rule fired, or a file is still open)",
                        m.uncommitted.join(", ")
                    ));
                }
                notes.extend(m.refused);
            }
        }
    }
    s.failed = !failures.is_empty();
    failures.append(&mut notes);
    if !failures.is_empty() {
        s.message = Some(bounded(failures.join("; ")));
    }
    s
}

/// `message` cut to [`MAX_MESSAGE`] characters.
fn bounded(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE {
        return message;
    }
    let mut m: String = message.chars().take(MAX_MESSAGE - 1).collect();
    m.push('…');
    m
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Arc;

    use tidepool_api::cache_pool::AssignmentOwner;
    use tidepool_api::checkpoint_sync::{CommitRule as CommitSpec, Retention};
    use tidepool_api::lake::LakeLocation;

    use super::*;
    use crate::checkpoint::journal::{CommitHeader, FileRecord, Journal, write_atomic};
    use crate::checkpoint::manifest::Layout;
    use crate::checkpoint::store::{Store, VolumeConfig};
    use crate::checkpoint::sync::{SyncConfig, Syncer, record_error};
    use crate::lake::Lake;
    use crate::lake::memory::MemoryLake;

    const URL: &str = "https://acct.blob.core.windows.net/ckpt/runs/a";

    fn assignment(
        quiescence: Option<&str>,
        keep_local: i32,
        keep_remote: i32,
    ) -> CheckpointAssignment {
        CheckpointAssignment {
            owner: AssignmentOwner {
                namespace: "ml".into(),
                name: "llama".into(),
                uid: "u1".into(),
                generation: 1,
            },
            volume_handle: "tidepool-u1".into(),
            destination: LakeLocation {
                url: URL.into(),
                credentials: None,
            },
            commit: CommitSpec {
                markers: vec!["DONE".into(), ".metadata".into()],
                quiescence: quiescence.map(Into::into),
                nodes: None,
            },
            retention: Retention {
                keep_local,
                keep_remote,
            },
        }
    }

    fn assigned(a: CheckpointAssignment) -> Assigned {
        Assigned::new(a, Ok(Credentials::Anonymous))
    }

    /// A volume of [`URL`] in the pool `pool`, bound to node `gpu-a`.
    fn volume(pool: &Path) -> VolumeLayout {
        let layout = volume_layout(pool, URL).unwrap();
        layout
            .create(&VolumeConfig {
                url: LakeUrl::parse(URL).unwrap().to_string(),
                node: "gpu-a".into(),
                keep_local: None,
                keep_remote: None,
                nodes: None,
                owner_uid: None,
            })
            .unwrap();
        layout
    }

    /// Writes `step` with a file and its `.metadata` marker, and commits it (as the
    /// mount does).
    fn commit_step(layout: &VolumeLayout, step: &str) {
        let dir = layout.tree().join(step);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("model.bin"), vec![7u8; 1000]).unwrap();
        fs::write(dir.join(".metadata"), step).unwrap();
        let store = Store::open(layout.clone(), CommitRule::default()).unwrap();
        let done: Vec<_> = store.tick().into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(done.len(), 1, "{step} commits");
    }

    #[test]
    fn the_assignment_becomes_the_volume_settings() {
        let s = settings(&assignment(Some("5m"), 2, 0)).unwrap();
        assert_eq!(s.rule.markers, vec!["DONE", ".metadata"]);
        assert_eq!(s.rule.quiescence, Some(Duration::from_secs(300)));
        assert_eq!(
            (s.keep_local, s.keep_remote),
            (Some(2), None),
            "0 keeps all"
        );
        let s = settings(&assignment(None, 0, 7)).unwrap();
        assert_eq!(s.rule.quiescence, None, "markers and renames only");
        assert_eq!((s.keep_local, s.keep_remote), (None, Some(7)));
        // Fractions, as the CheckpointSync schema allows them.
        let s = settings(&assignment(Some("1.5h"), 0, 0)).unwrap();
        assert_eq!(s.rule.quiescence, Some(Duration::from_secs(5400)));
        // The pool carries no validation of its own: a value that cannot be read gives
        // no settings (the volume keeps everything), and the assignment says what to
        // write.
        let a = assignment(Some("soon"), 1, 1);
        let e = settings(&a).unwrap_err();
        assert!(
            e.contains("spec.commit.quiescence \"soon\"")
                && e.contains("ml/llama")
                && e.contains("5m or 1h30m"),
            "{e}"
        );
        assert!(settings(&assignment(Some("0s"), 1, 1)).is_err(), "zero");
        let st = node_status(&assigned(a), Path::new("/nonexistent"));
        assert!(st.failed);
        assert_eq!(st.message.as_deref(), Some(e.as_str()));
    }

    #[test]
    fn nothing_written_on_the_node_is_no_steps_and_not_failed() {
        let pool = tempfile::tempdir().unwrap();
        let st = node_status(&assigned(assignment(None, 0, 0)), pool.path());
        assert_eq!(
            st,
            CheckpointNodeStatus {
                namespace: "ml".into(),
                name: "llama".into(),
                uid: "u1".into(),
                ..Default::default()
            }
        );
        assert!(
            !pool.path().join("checkpoints").exists(),
            "reporting creates nothing"
        );
    }

    #[test]
    fn unresolved_credentials_fail_the_assignment_without_the_secret() {
        let pool = tempfile::tempdir().unwrap();
        let a = Assigned::new(
            assignment(None, 0, 0),
            Err(
                "Secret ml/lake not found; create it with key sasToken (a SAS token) or accountKey"
                    .into(),
            ),
        );
        let st = node_status(&a, pool.path());
        assert!(st.failed);
        let msg = st.message.unwrap();
        assert!(
            msg.contains("nothing uploads from this node")
                && msg.contains("Secret ml/lake not found"),
            "{msg}"
        );
    }

    /// A real volume: steps committed by the store, uploaded by the sync into a lake
    /// where another node announced step-2 and never put its part in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_durable_and_waiting_steps_come_from_the_volume() {
        let pool = tempfile::tempdir().unwrap();
        let layout = volume(pool.path());
        let lake: Arc<dyn Lake> = Arc::new(MemoryLake::new());
        lake.put(
            &Layout::new("runs/a/").intent("step-2", "gpu-b"),
            bytes::Bytes::new(),
            &Default::default(),
        )
        .await
        .unwrap();
        // No settle window: the intents alone decide here.
        let mut sync = Syncer::start(
            lake.clone(),
            layout.clone(),
            "runs/a/",
            SyncConfig {
                settle: Duration::ZERO,
                ..SyncConfig::default()
            },
        )
        .await
        .unwrap();
        commit_step(&layout, "step-1");
        commit_step(&layout, "step-2");
        let report = sync.pass().await.unwrap();
        assert_eq!(report.durable, vec!["step-1"]);

        let st = node_status(&assigned(assignment(None, 0, 0)), pool.path());
        assert_eq!(
            (
                st.latest_committed_step,
                st.latest_durable_step,
                st.pending_bytes,
                st.failed
            ),
            (Some(2), Some(1), 0, false),
            "{st:?}"
        );
        let msg = st.message.unwrap();
        assert!(msg.contains("step-2 waits for node gpu-b"), "{msg}");

        // A step committed while a pass runs is pending in that pass's report.
        commit_step(&layout, "step-3");
        let now = sync.status(None, &report.waiting).unwrap();
        write_atomic(
            &Journal::open(&layout.journal_dir()).unwrap().status_path(),
            &serde_json::to_vec(&now).unwrap(),
        )
        .unwrap();
        let st = node_status(&assigned(assignment(None, 0, 0)), pool.path());
        assert_eq!(st.latest_committed_step, Some(3));
        assert!(st.pending_bytes >= 1000, "{st:?}");

        // A sync that fails says so, in its words.
        sync.stop().await;
        record_error(
            &layout,
            "the lake refused the upload (403); give the identity write access",
        );
        let st = node_status(&assigned(assignment(None, 0, 0)), pool.path());
        assert!(st.failed);
        let msg = st.message.unwrap();
        assert!(
            msg.starts_with("the last upload pass failed")
                && msg.contains("(403); give the identity write access"),
            "{msg}"
        );
        assert_eq!(st.latest_committed_step, Some(3), "the steps stay reported");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steps_not_committed_yet_are_named() {
        let pool = tempfile::tempdir().unwrap();
        let layout = volume(pool.path());
        // A step without its marker: the mount's ticker reports it.
        fs::create_dir_all(layout.tree().join("step-9")).unwrap();
        fs::write(layout.tree().join("step-9/model.bin"), b"half").unwrap();
        let store = Arc::new(Store::open(layout.clone(), CommitRule::default()).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = store.spawn_ticker(Duration::from_millis(20), stop.clone());
        let mut msg = None;
        for _ in 0..250 {
            msg = node_status(&assigned(assignment(None, 0, 0)), pool.path()).message;
            if msg.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        ticker.join().unwrap();
        let msg = msg.expect("the uncommitted step is reported");
        assert!(
            msg.contains("written and not committed yet: step-9"),
            "{msg}"
        );
    }

    #[test]
    fn reporting_while_a_step_commits_does_not_break_the_commit() {
        let pool = tempfile::tempdir().unwrap();
        let layout = volume(pool.path());
        let journal = Journal::open(&layout.journal_dir()).unwrap();
        let mut w = journal
            .begin_commit(&CommitHeader {
                seq: 1,
                step: "step-1".into(),
                reason: "marker .metadata".into(),
                committed_unix_ms: 0,
                follows: None,
                follows_unix_ms: None,
                renamed_from: None,
                dir: None,
            })
            .unwrap();
        w.add(&FileRecord {
            path: "model.bin".into(),
            size: 10,
            mtime_ns: 0,
            ino: 1,
        })
        .unwrap();
        // A heartbeat in the middle of the commit's walk.
        node_status(&assigned(assignment(None, 0, 0)), pool.path());
        w.finish().expect("the commit is still written");
        assert_eq!(journal.seqs().unwrap(), vec![1]);
    }

    #[test]
    fn a_long_message_is_cut_to_the_schema_bound() {
        let m = bounded("é".repeat(5000));
        assert_eq!(m.chars().count(), MAX_MESSAGE);
        assert!(m.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }
}
