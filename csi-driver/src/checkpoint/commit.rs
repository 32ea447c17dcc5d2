//! Commit rules: when a step (a top-level directory of the checkpoint volume) is
//! complete enough to upload. Pure: fed [`TreeEvent`]s and the clock, answers which
//! steps to commit now; the store does the committing.
//!
//! A step commits when one of its rules fires **and** no file in it is open for
//! writing (a file still being written is never uploaded half-written):
//! - **marker**: a file named like one of [`CommitRule::markers`] appears at the step's
//!   root, closed after writing or renamed into place (`.metadata` for PyTorch DCP,
//!   `commit_success.txt` for Orbax);
//! - **rename**: a top-level directory is renamed to a final name (the
//!   `step.orbax-checkpoint-tmp-… → step` and `tmp-… → step-N` patterns);
//! - **peer**: in a multi-node job, another node committed its part of the step
//!   (rank 0's node saw the marker); the sync learns it from the lake and asks;
//! - **quiescence** (only when configured): nothing in the step changed for the
//!   configured time. Off by default, because it cannot tell a finished step from one
//!   whose writer died; with it off, a half-written step never commits.
//!
//! Temporary names (containing `tmp` or `temp`, or starting with `.`) never commit:
//! their content commits under the name they are renamed to. After a commit, a change
//! in the step makes it uncommitted again; it commits again when a rule fires again.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::tree::TreeEvent;

/// The rules, as configured on the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRule {
    /// File names at a step's root that mark it complete.
    pub markers: Vec<OsString>,
    /// Commit a step nothing changed in for this long (off when `None`).
    pub quiescence: Option<Duration>,
}

impl Default for CommitRule {
    fn default() -> Self {
        CommitRule {
            markers: vec![".metadata".into(), "commit_success.txt".into()],
            quiescence: None,
        }
    }
}

/// Why a step committed (recorded in the journal, shown in status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Marker(OsString),
    Renamed {
        from: OsString,
    },
    Quiescent(Duration),
    /// Another node published its part of the step (multi-node jobs: only rank 0's
    /// node sees the marker; the others follow it once their files are closed). The
    /// commit belongs to that node's version of the step.
    Peer {
        node: String,
        version: String,
        /// When that node took its commit (its clock).
        led_unix_ms: u64,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Marker(m) => write!(f, "marker {}", m.to_string_lossy()),
            Reason::Renamed { from } => write!(f, "renamed from {}", from.to_string_lossy()),
            Reason::Quiescent(d) => write!(f, "quiet for {}", humantime::format_duration(*d)),
            Reason::Peer { node, version, .. } => {
                write!(f, "node {node} committed its part (version {version})")
            }
        }
    }
}

/// Whether `name` is a temporary directory name (never committed under that name).
///
/// Words, not substrings: the name is split at every character that is not a letter or
/// a digit, and it is temporary when it starts with a dot, when one of its words is
/// `tmp` or `temp`, or when its first word starts with `tmp` (Python's `mkdtemp` names,
/// `tmpk3j_x9a`). So `step.orbax-checkpoint-tmp-1712`, `tmp-checkpoint-500`,
/// `step-7.tmp` and `.partial` are temporary; `attempt-3`, `template_v2` and
/// `temperature-5` are steps.
pub fn is_temporary(name: &OsStr) -> bool {
    let s = name.to_string_lossy().to_ascii_lowercase();
    if s.starts_with('.') {
        return true;
    }
    let mut words = s.split(|c: char| !c.is_ascii_alphanumeric());
    if words.clone().next().is_some_and(|w| w.starts_with("tmp")) {
        return true;
    }
    words.any(|w| w == "tmp" || w == "temp")
}

/// The step an Orbax temporary directory becomes: `<step>.orbax-checkpoint-tmp-<n>`
/// is renamed to `<step>` by the primary host when every host has written its part.
/// On a node-local volume the other hosts never see that rename, so their part of the
/// step is only ever under this name (see [`Committer::peer_committed`]).
pub fn orbax_final_name(name: &OsStr) -> Option<&str> {
    let s = name.to_str()?;
    let (step, n) = s.rsplit_once(".orbax-checkpoint-tmp-")?;
    (!step.is_empty()
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && !is_temporary(OsStr::new(step)))
    .then_some(step)
}

/// The step number parsed from a name, for ordering: the last run of digits
/// (`step-1000` → 1000, `checkpoint-00042` → 42); `None` when there is none.
pub fn step_number(name: &str) -> Option<u64> {
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

#[derive(Clone, Debug)]
struct Track {
    last_change: Instant,
    /// Events seen for the step; a commit is kept only if none arrived while it was
    /// being taken.
    changes: u64,
    pending: Option<Reason>,
    committed: bool,
    /// Found due and not settled yet: its commit is being taken.
    in_flight: bool,
    /// Completed writes (closes after writing, truncations, renames into place) of
    /// each file since the step's last commit; `None` when unknown (the step was on
    /// disk when the volume opened).
    writes: Option<HashMap<PathBuf, u32>>,
    /// Wall clock (ms) of the last change seen, or the newest modification time found
    /// on disk.
    last_write_ms: u64,
}

impl Track {
    fn new(now: Instant) -> Self {
        Track {
            last_change: now,
            changes: 0,
            pending: None,
            committed: false,
            in_flight: false,
            writes: Some(HashMap::new()),
            last_write_ms: 0,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.last_change = now;
        self.changes += 1;
        self.committed = false;
        self.last_write_ms = crate::checkpoint::store::now_ms();
    }

    fn wrote(&mut self, rel: &Path) {
        if let Some(w) = &mut self.writes {
            *w.entry(rel.to_owned()).or_default() += 1;
        }
    }

    /// Whether this node's files of the step can be taken as its part of a version
    /// another node led at `led_unix_ms` (that node's clock). Its files must all be
    /// from one save, the one before that node's commit: no file written twice since
    /// this node's last commit of the step (a second write is the next save, begun
    /// before this node took its part; by induction over commits, once is the save
    /// being followed). Where that count is not known (the volume was opened since),
    /// or shows a second write, the files are taken only if they have not changed since
    /// before that commit, by the two nodes' clocks with [`CLOCK_MARGIN`] between them.
    fn follows_safely(&self, led_unix_ms: u64) -> Result<(), String> {
        if let Some(w) = &self.writes
            && w.values().all(|&n| n <= 1)
        {
            return Ok(());
        }
        if self.last_write_ms <= led_unix_ms.saturating_add(CLOCK_MARGIN.as_millis() as u64) {
            return Ok(());
        }
        let again: Vec<String> = self
            .writes
            .iter()
            .flatten()
            .filter(|(_, n)| **n > 1)
            .map(|(p, _)| p.display().to_string())
            .collect();
        Err(if again.is_empty() {
            "its files changed after that version was led (this node cannot tell which save they belong to)".to_owned()
        } else {
            format!(
                "{} were written again after that version was led, before this node took its part",
                again.join(", ")
            )
        })
    }
}

/// How far two nodes' clocks may disagree, for the one decision taken by clocks (see
/// [`Track::follows_safely`]): NTP keeps nodes within milliseconds; a save is never
/// followed by the next one's writes within this.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// A version of a step this node refused to take its part of, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub step: OsString,
    pub version: String,
    pub why: String,
}

/// A step whose rule fired, to commit now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub step: OsString,
    pub reason: Reason,
    /// The step's change count when it was found due (see [`Committer::settle`]).
    pub changes: u64,
}

/// The rules' state for every step of one volume.
#[derive(Debug)]
pub struct Committer {
    rule: CommitRule,
    steps: HashMap<OsString, Track>,
    /// Versions refused since the last look (see [`Committer::take_refusals`]).
    refused: Vec<Refusal>,
}

impl Committer {
    pub fn new(rule: CommitRule) -> Self {
        Committer {
            rule,
            steps: HashMap::new(),
            refused: Vec::new(),
        }
    }

    /// Versions of steps this node refused to follow since the last call.
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refused)
    }

    pub fn rule(&self) -> &CommitRule {
        &self.rule
    }

    fn track(&mut self, step: &OsStr, now: Instant) -> &mut Track {
        self.steps
            .entry(step.to_owned())
            .or_insert_with(|| Track::new(now))
    }

    fn marker_at_root(&self, rel: &Path) -> Option<OsString> {
        let mut c = rel.components();
        let first = c.next()?;
        if c.next().is_some() {
            return None;
        }
        let name = first.as_os_str();
        self.rule
            .markers
            .iter()
            .any(|m| m == name)
            .then(|| name.to_owned())
    }

    /// Takes one event from the tree.
    pub fn on_event(&mut self, e: &TreeEvent, now: Instant) {
        match e {
            TreeEvent::WriteOpened { step } | TreeEvent::Removed { step, .. } => {
                self.track(step, now).touch(now)
            }
            TreeEvent::WriteClosed { step, rel } | TreeEvent::Changed { step, rel } => {
                let marker = self.marker_at_root(rel);
                let t = self.track(step, now);
                t.touch(now);
                if !rel.as_os_str().is_empty() {
                    t.wrote(rel);
                }
                if let Some(m) = marker {
                    t.pending = Some(Reason::Marker(m));
                }
            }
            TreeEvent::StepRenamed { from, to } => {
                let mut t = self.steps.remove(from).unwrap_or_else(|| Track::new(now));
                // A directory renamed over an existing step replaces it: its count
                // continues, so a commit of the old one in flight is not kept.
                t.changes += self.steps.get(to).map_or(0, |o| o.changes) + 1;
                t.last_change = now;
                t.committed = false;
                // A commit in flight under the old name is given up (its name is gone).
                t.in_flight = false;
                if !is_temporary(to) {
                    t.pending = Some(Reason::Renamed { from: from.clone() });
                }
                self.steps.insert(to.clone(), t);
            }
            TreeEvent::StepRemoved { step } => {
                self.steps.remove(step);
            }
        }
    }

    /// A step found on disk when the volume starts (its writers are gone): it commits
    /// for `reason` (a marker present at its root, or the rename that made it: the
    /// commit may have been lost in a crash after either), or by quiescence.
    pub fn found_on_disk(
        &mut self,
        step: &OsStr,
        reason: Option<Reason>,
        committed: bool,
        newest_mtime_ms: u64,
        now: Instant,
    ) {
        let t = self.track(step, now);
        t.committed = committed;
        // What was written before the volume opened is not counted: only clocks can
        // tell when (see Track::follows_safely).
        t.writes = if committed {
            Some(HashMap::new())
        } else {
            None
        };
        t.last_write_ms = newest_mtime_ms;
        if !committed && let Some(r) = reason {
            t.pending = Some(r);
        }
    }

    /// Commits `step` (a directory of the tree) as soon as its files are closed, because
    /// node `node` committed its part of `version` of the step: this node's files
    /// become its part of that version. Committed even if nothing changed here since the
    /// last commit (the files then belong to one more version; their upload is not
    /// repeated). `step` may be an Orbax temporary directory (see
    /// [`orbax_final_name`]): on a node-local volume that is where the other hosts'
    /// parts stay.
    pub fn peer_committed(
        &mut self,
        step: &OsStr,
        req: &crate::checkpoint::journal::CommitRequest,
        now: Instant,
    ) {
        let t = self.track(step, now);
        t.pending = Some(Reason::Peer {
            node: req.node.clone(),
            version: req.version.clone(),
            led_unix_ms: req.led_unix_ms,
        });
    }

    /// Steps to commit now. `busy` are the steps with a file open for writing (asked of
    /// the tree at this moment): they wait. Each firing is returned once; the caller
    /// reports the outcome with [`Committer::settle`].
    pub fn due(&mut self, now: Instant, busy: &HashSet<OsString>) -> Vec<Due> {
        let quiet = self.rule.quiescence;
        let mut out = Vec::new();
        for (name, t) in &mut self.steps {
            out.extend(fire(name, t, quiet, now, busy, &mut self.refused));
        }
        // Steps due together commit in the order of their numbers (a volume opened
        // with several finished steps on disk commits step-9 before step-10), so that
        // commit order, which "latest" follows, is the order they were written in.
        out.sort_by(|a, b| {
            let key = |d: &Due| (step_number(&d.step.to_string_lossy()), d.step.clone());
            key(a).cmp(&key(b))
        });
        out
    }

    /// `step` alone, when it is due now (as [`Committer::due`] would find it): a step
    /// whose files are about to be removed commits first.
    pub fn due_step(
        &mut self,
        step: &OsStr,
        now: Instant,
        busy: &HashSet<OsString>,
    ) -> Option<Due> {
        let quiet = self.rule.quiescence;
        let t = self.steps.get_mut(step)?;
        fire(step, t, quiet, now, busy, &mut self.refused)
    }

    /// Whether `step`'s rule fired and its commit is not taken yet, or is being taken
    /// right now (cheap: no walk).
    pub fn fired(&self, step: &OsStr) -> bool {
        self.steps.get(step).is_some_and(|t| {
            t.pending.is_some() || t.in_flight || (self.rule.quiescence.is_some() && !t.committed)
        })
    }

    /// Forgets that `step`'s rule fired: it lost a file before its commit could be
    /// taken, so what is left is not the finished step. It commits when its rule fires
    /// again (or by quiescence, when that is on).
    pub fn unfire(&mut self, step: &OsStr) {
        if let Some(t) = self.steps.get_mut(step) {
            t.pending = None;
        }
    }

    /// Whether `step` changed since it was found due with `changes`.
    pub fn changed_since(&self, step: &OsStr, changes: u64) -> bool {
        self.steps.get(step).is_none_or(|t| t.changes != changes)
    }

    /// Reports a due step's outcome: `kept` (its commit is in the journal) or not (it
    /// was abandoned: the rule fires again at the next tick).
    pub fn settle(&mut self, due: &Due, kept: bool) {
        if let Some(t) = self.steps.get_mut(&due.step) {
            t.in_flight = false;
            if kept {
                // A change after the walk leaves the step uncommitted (quiescence, or
                // the next marker, commits it again).
                t.committed = t.changes == due.changes;
                if t.committed {
                    t.writes = Some(HashMap::new());
                }
            } else {
                t.committed = false;
                if t.pending.is_none() {
                    t.pending = Some(due.reason.clone());
                }
            }
        }
    }

    /// Steps known and not committed (for status).
    pub fn uncommitted(&self) -> Vec<OsString> {
        let mut v: Vec<_> = self
            .steps
            .iter()
            .filter(|(n, t)| !t.committed && !is_temporary(n))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }
}

/// Whether one step is due now, and why (see [`Committer::due`]); marks it taken.
fn fire(
    name: &OsStr,
    t: &mut Track,
    quiet: Option<Duration>,
    now: Instant,
    busy: &HashSet<OsString>,
    refused: &mut Vec<Refusal>,
) -> Option<Due> {
    // A temporary name commits only as another node's part of a step.
    let follows = matches!(t.pending, Some(Reason::Peer { .. }));
    if busy.contains(name) || (is_temporary(name) && !follows) {
        return None;
    }
    let reason = if let Some(r) = t.pending.take() {
        if let Reason::Peer {
            version,
            led_unix_ms,
            ..
        } = &r
            && let Err(why) = t.follows_safely(*led_unix_ms)
        {
            refused.push(Refusal {
                step: name.to_owned(),
                version: version.clone(),
                why,
            });
            return None;
        }
        r
    } else if let Some(q) = quiet
        && !t.committed
        && now.duration_since(t.last_change) >= q
    {
        Reason::Quiescent(q)
    } else {
        return None;
    };
    // Not again until something changes (or the commit is given back).
    t.committed = true;
    t.in_flight = true;
    Some(Due {
        step: name.to_owned(),
        reason,
        changes: t.changes,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn s(x: &str) -> OsString {
        OsString::from(x)
    }

    fn open(step: &str) -> TreeEvent {
        TreeEvent::WriteOpened { step: s(step) }
    }

    fn close(step: &str, rel: &str) -> TreeEvent {
        TreeEvent::WriteClosed {
            step: s(step),
            rel: PathBuf::from(rel),
        }
    }

    fn busy(steps: &[&str]) -> HashSet<OsString> {
        steps.iter().map(|x| s(x)).collect()
    }

    fn idle() -> HashSet<OsString> {
        HashSet::new()
    }

    /// (step, reason) of what is due.
    fn due(c: &mut Committer, now: Instant, b: &HashSet<OsString>) -> Vec<(OsString, Reason)> {
        let d = c.due(now, b);
        for x in &d {
            c.settle(x, true);
        }
        d.into_iter().map(|x| (x.step, x.reason)).collect()
    }

    #[test]
    fn a_removal_sees_a_step_as_fired_until_its_commit_is_settled() {
        // The store's removal hook asks `fired` without the commit lock: a commit the
        // ticker is taking must still count, or a removal would run during the walk.
        let mut c = Committer::new(CommitRule::default());
        let t0 = Instant::now();
        c.on_event(&close("step-1", "a.pt"), t0);
        assert!(!c.fired(&s("step-1")), "no marker yet");
        c.on_event(&close("step-1", ".metadata"), t0);
        assert!(c.fired(&s("step-1")));
        let d = c.due(t0, &idle());
        assert_eq!(d.len(), 1);
        assert!(c.fired(&s("step-1")), "being committed");
        assert!(
            c.due_step(&s("step-1"), t0, &idle()).is_none(),
            "taken once"
        );
        c.settle(&d[0], true);
        assert!(!c.fired(&s("step-1")), "committed");

        // Forgotten after a lost file: nothing due until the marker comes again.
        c.on_event(&close("step-2", ".metadata"), t0);
        c.unfire(&s("step-2"));
        assert!(!c.fired(&s("step-2")));
        assert!(c.due(t0, &idle()).is_empty());
        c.on_event(&close("step-2", ".metadata"), t0);
        assert_eq!(
            c.due_step(&s("step-2"), t0, &idle()).unwrap().step,
            s("step-2")
        );
    }

    #[test]
    fn a_marker_commits_only_when_no_file_of_the_step_is_open() {
        let t0 = Instant::now();
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&open("step-1"), t0);
        c.on_event(&close("step-1", ".metadata"), t0);
        assert!(
            due(&mut c, t0, &busy(&["step-1"])).is_empty(),
            "a rank still writes"
        );
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&close("step-1", ".metadata"), t0);
        assert!(due(&mut c, t0, &busy(&["step-1"])).is_empty());
        assert_eq!(
            due(&mut c, t0, &idle()),
            vec![(s("step-1"), Reason::Marker(s(".metadata")))],
            "the marker waits for the close, then fires"
        );
        assert!(due(&mut c, t0, &idle()).is_empty(), "fires once");
    }

    #[test]
    fn a_marker_below_the_step_root_is_not_a_commit() {
        let t0 = Instant::now();
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&open("step-1"), t0);
        c.on_event(&close("step-1", "state/commit_success.txt"), t0);
        assert!(due(&mut c, t0 + Duration::from_secs(3600), &idle()).is_empty());
    }

    #[test]
    fn renaming_a_temporary_directory_commits_the_final_name() {
        let t0 = Instant::now();
        let mut c = Committer::new(CommitRule::default());
        let tmp = "10.orbax-checkpoint-tmp-1712345";
        c.on_event(&open(tmp), t0);
        c.on_event(&close(tmp, "commit_success.txt"), t0);
        assert!(
            due(&mut c, t0, &idle()).is_empty(),
            "a temporary name never commits"
        );
        c.on_event(
            &TreeEvent::StepRenamed {
                from: s(tmp),
                to: s("10"),
            },
            t0,
        );
        assert_eq!(
            due(&mut c, t0, &idle()),
            vec![(s("10"), Reason::Renamed { from: s(tmp) })]
        );
    }

    #[test]
    fn a_commit_abandoned_because_the_step_changed_fires_again() {
        let t0 = Instant::now();
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&close("step-3", ".metadata"), t0);
        let d = c.due(t0, &idle());
        assert_eq!(d.len(), 1);
        // A writer touched the step while it was being walked.
        c.on_event(&open("step-3"), t0);
        assert!(c.changed_since(&d[0].step, d[0].changes));
        c.settle(&d[0], false);
        assert!(
            c.due(t0, &busy(&["step-3"])).is_empty(),
            "waits for the writer"
        );
        let again = c.due(t0, &idle());
        assert_eq!(
            again.len(),
            1,
            "given back: fires again once the writer is gone"
        );
        assert!(!c.changed_since(&again[0].step, again[0].changes));
    }

    #[test]
    fn a_change_during_a_kept_commit_leaves_the_step_uncommitted() {
        let t0 = Instant::now();
        let q = Duration::from_secs(60);
        let mut c = Committer::new(CommitRule {
            quiescence: Some(q),
            ..CommitRule::default()
        });
        c.on_event(&close("step-4", "a"), t0);
        let d = c.due(t0 + q, &idle());
        assert_eq!(d.len(), 1);
        c.on_event(&close("step-4", "b"), t0 + q);
        c.settle(&d[0], true);
        assert_eq!(c.uncommitted(), vec![s("step-4")]);
        assert_eq!(
            due(&mut c, t0 + q * 2, &idle()).len(),
            1,
            "quiet again: commits again"
        );
    }

    #[test]
    fn quiescence_is_off_by_default_and_fires_once_when_on() {
        let t0 = Instant::now();
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&open("step-2"), t0);
        c.on_event(&close("step-2", "model.pt"), t0);
        assert!(
            due(&mut c, t0 + Duration::from_secs(86400), &idle()).is_empty(),
            "off by default"
        );

        let q = Duration::from_secs(300);
        let mut c = Committer::new(CommitRule {
            quiescence: Some(q),
            ..CommitRule::default()
        });
        c.on_event(&open("step-2"), t0);
        assert!(
            due(&mut c, t0 + q * 2, &busy(&["step-2"])).is_empty(),
            "an open file is never quiet"
        );
        c.on_event(&close("step-2", "model.pt"), t0 + q);
        assert!(due(&mut c, t0 + q + q / 2, &idle()).is_empty());
        assert_eq!(
            due(&mut c, t0 + q * 2, &idle()),
            vec![(s("step-2"), Reason::Quiescent(q))]
        );
        assert!(due(&mut c, t0 + q * 3, &idle()).is_empty(), "once");
        c.on_event(
            &TreeEvent::Changed {
                step: s("step-2"),
                rel: PathBuf::from("extra"),
            },
            t0 + q * 3,
        );
        assert_eq!(
            due(&mut c, t0 + q * 4, &idle()).len(),
            1,
            "a change after the commit commits again"
        );
    }

    fn peer(version: &str, led_unix_ms: u64) -> crate::checkpoint::journal::CommitRequest {
        crate::checkpoint::journal::CommitRequest {
            node: "rank0".into(),
            version: version.into(),
            led_unix_ms,
            from_dir: None,
        }
    }

    #[test]
    fn a_follower_takes_its_files_as_a_version_only_if_they_are_one_save() {
        let t0 = Instant::now();
        let now = crate::checkpoint::store::now_ms();
        // Written once since the last commit: that save's files, whatever the clocks.
        let mut c = Committer::new(CommitRule::default());
        c.on_event(&close("step-1", "__1_0.distcp"), t0);
        c.peer_committed(OsStr::new("step-1"), &peer("rank0:7", 1), t0);
        assert_eq!(due(&mut c, t0, &idle()).len(), 1);
        assert!(c.take_refusals().is_empty());
        // Committed: the count starts again. Written twice since (the next save began
        // before this node took its part of the last one), and changed after the
        // version was led by the clocks: refused, never a mix.
        c.on_event(&close("step-1", "__1_0.distcp"), t0);
        c.on_event(&close("step-1", "__1_0.distcp"), t0);
        c.peer_committed(OsStr::new("step-1"), &peer("rank0:9", now - 10_000), t0);
        assert!(due(&mut c, t0, &idle()).is_empty(), "refused");
        let r = c.take_refusals();
        assert_eq!(r.len(), 1);
        assert!(
            r[0].why.contains("__1_0.distcp were written again"),
            "{r:?}"
        );
        // A version led after the files last changed (by the clocks): taken.
        c.peer_committed(OsStr::new("step-1"), &peer("rank0:11", now + 60_000), t0);
        assert_eq!(due(&mut c, t0, &idle()).len(), 1);
        // Unknown counts (found on disk when the volume opened): the clocks decide.
        let mut c = Committer::new(CommitRule::default());
        c.found_on_disk(OsStr::new("step-2"), None, false, now, t0);
        c.peer_committed(OsStr::new("step-2"), &peer("rank0:3", now - 60_000), t0);
        assert!(due(&mut c, t0, &idle()).is_empty());
        assert_eq!(c.take_refusals().len(), 1);
        c.peer_committed(OsStr::new("step-2"), &peer("rank0:4", now), t0);
        assert_eq!(due(&mut c, t0, &idle()).len(), 1);
    }

    #[test]
    fn step_numbers_come_from_the_last_run_of_digits() {
        assert_eq!(step_number("step-1000"), Some(1000));
        assert_eq!(step_number("checkpoint-00042"), Some(42));
        assert_eq!(step_number("42"), Some(42));
        assert_eq!(step_number("v2-step-7"), Some(7));
        assert_eq!(step_number("final"), None);
        for tmp in [
            "step.orbax-checkpoint-tmp-1",
            ".hidden",
            "tmp-checkpoint-500",
            "step-7.tmp",
            "TMP_step",
            "tmpk3j_x9a",
            "step_temp",
        ] {
            assert!(is_temporary(OsStr::new(tmp)), "{tmp} is temporary");
        }
        for step in [
            "step-10",
            "attempt-3",
            "template_v2",
            "temperature-5",
            "final",
            "10",
        ] {
            assert!(!is_temporary(OsStr::new(step)), "{step} is a step");
        }
        assert_eq!(
            orbax_final_name(OsStr::new("10.orbax-checkpoint-tmp-1712345")),
            Some("10")
        );
        assert_eq!(
            orbax_final_name(OsStr::new("10.orbax-checkpoint-tmp-")),
            None
        );
        assert_eq!(orbax_final_name(OsStr::new("step-10")), None);
    }
}
