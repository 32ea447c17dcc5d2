//! The checkpoint fault harness: the write path's stress test, with the read path's
//! rule (real binaries, real FUSE, Azurite, every byte checked), and a checker that
//! reads the lake itself, never the project's status.
//!
//! Three nodes (each its own cache directory, mount and node name; one destination,
//! `--nodes 3`, retention on) write steps the way multi-node jobs do: the PyTorch DCP
//! pattern (each node its rank's shard, rank 0's node the `.metadata` last) and Orbax's
//! multi-host pattern (each host its part under a temporary directory, the primary's
//! renamed to the step when every host is done; the others' never are). Node n0's mount
//! uploads in-process; n1 and n2 run `tidepool sync` beside `--no-sync` mounts. Round
//! after round, drawn from a seed: lake faults through a proxy (503s, resets, answers
//! lost after the lake acted, latency), a lost lease (the proxy refuses lease requests
//! for longer than two thirds of the lease), `kill -9` of syncs and of mounts in the
//! middle of a save (the job then saves the step again, in place), one node's sync down
//! for several rounds, rewrites of earlier steps, one of them torn by a `kill -9` of
//! rank 0's mount before its new marker, and a run that restarts its step numbering.
//!
//! Checked while it runs: every manifest in the lake names objects with exactly its
//! sizes and MD5s (or was withdrawn while they were being replaced), and every durable
//! step holds exactly one completed save of it, every node's files, never a torn save or
//! a mix of two. Checked once the faults stop and the uploads are done: every durable
//! step holds its latest save; the step saved last is durable and is what `tidepool
//! restore` returns; retention kept exactly `keep_remote` numbered steps; every node
//! has nothing pending and its status names as latest durable only a step whose
//! manifest is in the lake.
//!
//! `make test` runs 10 rounds; `make soak` runs for `SOAK_SECS` (env
//! `TIDEPOOL_FAULT_SECS`). `TIDEPOOL_FAULT_SEED` replays a seed (printed at the start).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::restore::{StepChoice, durable_steps_detailed, restore};
use tidepool_csi::checkpoint::store::VolumeLayout;
use tidepool_csi::checkpoint::sync::SyncStatus;
use tidepool_csi::lake::Lake;
use tidepool_csi::mounts::detach_path;
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::fault_proxy::{FaultProxy, Faults};
use tidepool_csi::testing::lake_check::{md5_hex, md5_of, try_get_all};
use tidepool_csi::testing::{Azurite, MountProcess, pattern};

const NODES: usize = 3;
const KEEP_REMOTE: usize = 3;
const PREFIX: &str = "job/";

/// The binary under test: `$TIDEPOOL_BIN` (a copy a long soak can keep while the tree
/// is rebuilt), else the one Cargo built.
fn bin() -> PathBuf {
    std::env::var_os("TIDEPOOL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tidepool")))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A save's files: path in the step → content MD5.
type Files = BTreeMap<String, String>;

struct Node {
    name: String,
    cache: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
    mount: Option<MountProcess>,
    /// `tidepool sync` (n1, n2); n0 uploads from its mount.
    sync: Option<Child>,
    /// The round until which this node's sync stays down.
    down_until: usize,
    restarts: u32,
}

impl Node {
    fn in_process(&self) -> bool {
        self.name == "n0"
    }

    fn start_mount(&mut self, url: &str) {
        let _ = detach_path(&self.mnt);
        let mut extra = vec![
            "--checkpoint",
            "--node-name",
            &self.name,
            "--nodes",
            "3",
            "--keep-local",
            "2",
            "--keep-remote",
            "3",
            "--lease-secs",
            "15",
        ];
        if !self.in_process() {
            extra.push("--no-sync");
        }
        self.restarts += 1;
        let log = self
            .log
            .with_extension(format!("mount.{}.log", self.restarts));
        self.mount = Some(MountProcess::start_logged(
            &bin(),
            url,
            &self.mnt,
            &self.cache,
            &extra,
            Some(&log),
        ));
    }

    fn kill_mount(&mut self) {
        if let Some(mut m) = self.mount.take() {
            m.signal(libc::SIGKILL);
            m.wait();
        }
        let _ = detach_path(&self.mnt);
    }

    fn start_sync(&mut self) {
        if self.in_process() || self.sync.is_some() {
            return;
        }
        self.restarts += 1;
        let log = std::fs::File::create(
            self.log
                .with_extension(format!("sync.{}.log", self.restarts)),
        )
        .unwrap();
        self.sync = Some(
            Command::new(bin())
                .args(["sync", "--lease-secs", "15", "--cache-dir"])
                .arg(&self.cache)
                .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill_sync(&mut self) {
        if let Some(mut c) = self.sync.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A sync that exited by itself (a lost lease ends `tidepool sync` only through its
    /// supervisor; anything else is a crash the run must not hide) is restarted, as a
    /// process supervisor would; it is counted.
    fn reap_sync(&mut self) -> bool {
        if let Some(c) = &mut self.sync
            && let Ok(Some(status)) = c.try_wait()
        {
            eprintln!(
                "fault harness: {}'s sync exited ({status}); restarting it",
                self.name
            );
            self.sync = None;
            return true;
        }
        false
    }

    fn volume(&self) -> Option<VolumeLayout> {
        VolumeLayout::all(&self.cache).ok()?.into_iter().next()
    }

    fn status(&self) -> Option<SyncStatus> {
        SyncStatus::read(&self.volume()?).ok()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_sync();
        self.kill_mount();
        if std::thread::panicking() {
            // What the node's processes said that matters, for the failure report.
            let dir = self.log.parent().unwrap().to_owned();
            let mut logs: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.contains("WARN")
                            || l.contains("ERROR")
                            || l.contains("durable")
                            || l.contains("committed")
                            || l.contains("leads a version")
                    })
                    .collect();
                eprintln!(
                    "--- {} ({} lines of note) ---\n{}",
                    log.display(),
                    lines.len(),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                );
            }
        }
    }
}

/// What the writers wrote: for each step, every save that completed (a marker or the
/// primary's rename after every node's files), in order.
#[derive(Default)]
struct Model {
    saves: BTreeMap<String, Vec<Files>>,
    /// Steps in the order their latest save completed.
    order: Vec<String>,
    /// Saves cut short by a `kill -9` (never to be seen durable).
    torn: Vec<(String, Files)>,
}

impl Model {
    fn completed(&mut self, step: &str, files: Files) {
        self.saves.entry(step.to_owned()).or_default().push(files);
        self.order.retain(|s| s != step);
        self.order.push(step.to_owned());
    }
}

struct Harness {
    rng: Rng,
    url: String,
    proxy: FaultProxy,
    direct: Arc<dyn Lake>,
    nodes: Vec<Node>,
    model: Model,
    attempt: u64,
    _work: tempfile::TempDir,
    _az: Azurite,
}

fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // As frameworks write: create or truncate in place, write, fsync.
    let mut f = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut f, data)?;
    f.sync_all()
}

impl Harness {
    fn content(&mut self, tag: &str) -> Vec<u8> {
        self.attempt += 1;
        let len = 1 + self.rng.below(600_000) as usize;
        let seed = self.attempt * 1000 + tag.len() as u64;
        pattern(seed, len)
    }

    /// A DCP save of `step`: every node's rank shard, then rank 0's `.metadata`. With
    /// `kill` = Some(node), that node's mount is killed after the shards before it
    /// (and, for rank 0, after its own shard, before the marker): the save is torn.
    fn save_dcp(&mut self, step: &str, kill: Option<usize>) -> bool {
        let mut files = Files::new();
        for i in 0..NODES {
            if kill == Some(i) && i != 0 {
                self.nodes[i].kill_mount();
                self.model.torn.push((step.to_owned(), files));
                return false;
            }
            let rel = format!("__{i}_0.distcp");
            let data = self.content(&rel);
            if let Err(e) = write(&self.nodes[i].p(&format!("{step}/{rel}")), &data) {
                panic!("{}: writing {step}/{rel}: {e}", self.nodes[i].name);
            }
            files.insert(rel, md5_of(&data));
        }
        if kill == Some(0) {
            self.nodes[0].kill_mount();
            self.model.torn.push((step.to_owned(), files));
            return false;
        }
        let meta = self.content(".metadata");
        let tmp = self.nodes[0].p(&format!("{step}/.metadata.tmp"));
        write(&tmp, &meta).unwrap();
        std::fs::rename(&tmp, self.nodes[0].p(&format!("{step}/.metadata"))).unwrap();
        files.insert(".metadata".into(), md5_of(&meta));
        self.model.completed(step, files);
        true
    }

    /// An Orbax multi-host save of `step`: each host its part under
    /// `<step>.orbax-checkpoint-tmp-<n>/`, the primary (n0) its metadata and the rename.
    fn save_orbax(&mut self, step: &str) {
        let tmp = format!(
            "{step}.orbax-checkpoint-tmp-{}",
            1_700_000_000_000 + self.attempt
        );
        let mut files = Files::new();
        for i in 0..NODES {
            let rel = format!("default/params/{i}.0");
            let data = self.content(&rel);
            write(&self.nodes[i].p(&format!("{tmp}/{rel}")), &data).unwrap();
            files.insert(rel, md5_of(&data));
        }
        for rel in ["_CHECKPOINT_METADATA", "commit_success.txt"] {
            let data = self.content(rel);
            write(&self.nodes[0].p(&format!("{tmp}/{rel}")), &data).unwrap();
            files.insert(rel.to_owned(), md5_of(&data));
        }
        std::fs::rename(self.nodes[0].p(&tmp), self.nodes[0].p(step)).unwrap();
        self.model.completed(step, files);
    }

    /// Brings every process that should run back up.
    fn supervise(&mut self, round: usize) {
        for i in 0..NODES {
            if self.nodes[i].mount.as_mut().is_none_or(|m| !m.is_running()) {
                self.nodes[i].kill_mount();
                let url = self.url.clone();
                self.nodes[i].start_mount(&url);
            }
            self.nodes[i].reap_sync();
            if round >= self.nodes[i].down_until {
                self.nodes[i].start_sync();
            }
        }
    }

    /// The lake as a reader finds it: every manifest names objects with exactly its
    /// sizes and MD5s, unless it was withdrawn while they were being replaced (a reader
    /// then fails its MD5 check: never a wrong byte); and every durable step is exactly
    /// one completed save of it, with every node's files. Returns step → files.
    async fn check_lake(&self) -> BTreeMap<String, Files> {
        let names = Layout::new(PREFIX);
        let mut out = BTreeMap::new();
        for d in durable_steps_detailed(&*self.direct, &names, None)
            .await
            .unwrap()
        {
            let doc = try_get_all(&*self.direct, &names.manifest(&d.step))
                .await
                .unwrap_or_default();
            if doc.is_empty() {
                continue; // withdrawn or deleted since it was listed
            }
            let mut objs = Vec::new();
            tidepool_csi::checkpoint::manifest::read_manifest(&doc[..], |o| {
                objs.push(o);
                Ok(())
            })
            .unwrap();
            let mut files = Files::new();
            let mut bad = Vec::new();
            for o in &objs {
                let name = names.object(&d.step, &o.path);
                let ok = match self.direct.head(&name).await {
                    Ok(m) => {
                        m.size == o.size
                            && m.content_md5.map(|x| md5_hex(&x)) == Some(o.md5.clone())
                            && try_get_all(&*self.direct, &name)
                                .await
                                .is_some_and(|b| md5_of(&b) == o.md5)
                    }
                    Err(_) => false,
                };
                if !ok {
                    bad.push(name);
                }
                files.insert(o.path.clone(), o.md5.clone());
            }
            if !bad.is_empty() {
                // Only acceptable if the manifest is no longer there as it was read.
                let now = self.direct.head(&names.manifest(&d.step)).await;
                assert!(
                    now.is_err()
                        || now.as_ref().unwrap().size == 0
                        || now.as_ref().unwrap().etag != d.manifest_etag,
                    "the manifest of {} vouches for objects that differ from it: {bad:?}",
                    d.step
                );
                continue;
            }
            let saves = self.model.saves.get(&d.step).unwrap_or_else(|| {
                panic!(
                    "{} is durable and was never saved whole (torn saves: {:?})",
                    d.step,
                    self.model.torn.iter().map(|t| &t.0).collect::<Vec<_>>()
                )
            });
            assert!(
                saves.contains(&files),
                "{} is durable with files that are no completed save of it (a mix, a torn save, or a node missing): {files:?}\nsaves: {saves:?}",
                d.step
            );
            out.insert(d.step.clone(), files);
        }
        out
    }
}

fn seed() -> u64 {
    std::env::var("TIDEPOOL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_under_partial_failure_are_durable_exactly_when_the_lake_says_so() {
    let seed = seed();
    let soak = std::env::var("TIDEPOOL_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    eprintln!(
        "fault harness: seed {seed} (TIDEPOOL_FAULT_SEED={seed} replays it); {}",
        match soak {
            Some(s) => format!("{s} s"),
            None => "10 rounds".into(),
        }
    );
    let az = Azurite::start();
    az.create_container("ckpt").await;
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", az.port()).parse().unwrap();
    let proxy = FaultProxy::start(upstream, seed).await.unwrap();
    let url = format!(
        "{}ckpt/job",
        proxy.endpoint(tidepool_csi::testing::azurite::ACCOUNT)
    );
    let direct: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let work = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let d = work.path().join(format!("n{i}"));
        std::fs::create_dir_all(d.join("mnt")).unwrap();
        nodes.push(Node {
            name: format!("n{i}"),
            cache: d.join("pool"),
            mnt: d.join("mnt"),
            log: d.join("log"),
            mount: None,
            sync: None,
            down_until: 0,
            restarts: 0,
        });
    }
    let mut h = Harness {
        rng: Rng(seed | 1),
        url,
        proxy,
        direct,
        nodes,
        model: Model::default(),
        attempt: 0,
        _work: work,
        _az: az,
    };
    h.supervise(0);
    let started = Instant::now();
    let rounds = if soak.is_some() { usize::MAX } else { 10 };
    let mut step_no = 5000u64;
    let mut lease_fault_done = false;
    let mut round = 0;
    while round < rounds && soak.is_none_or(|s| started.elapsed() < Duration::from_secs(s)) {
        round += 1;
        // A run that restarts its numbering, half way.
        if round == rounds.min(1_000) / 2 || (soak.is_some() && round % 40 == 20) {
            step_no = 100 + round as u64;
        }
        // Lake faults, some rounds.
        let faults = if h.rng.chance(0.5) {
            Faults {
                busy: 0.05,
                reset: 0.03,
                lost_reply: 0.03,
                delay: Duration::from_millis(h.rng.below(20)),
                lease_conflict: false,
            }
        } else {
            Faults::NONE
        };
        h.proxy.set(faults);
        // One node's sync down for a few rounds.
        if h.rng.chance(0.2) {
            let i = 1 + h.rng.below(2) as usize;
            h.nodes[i].kill_sync();
            h.nodes[i].down_until = round + 1 + h.rng.below(3) as usize;
        }
        // A sync killed mid-whatever.
        if h.rng.chance(0.3) {
            let i = 1 + h.rng.below(2) as usize;
            h.nodes[i].kill_sync();
        }
        // The save of this round.
        let step = format!("step-{step_no}");
        step_no += 1;
        if h.rng.chance(0.3) {
            h.save_orbax(step.trim_start_matches("step-"));
        } else if h.rng.chance(0.25) {
            // Torn by a kill -9 of one node's mount; the job saves the step again.
            let victim = h.rng.below(NODES as u64) as usize;
            assert!(!h.save_dcp(&step, Some(victim)));
            h.supervise(round);
            assert!(h.save_dcp(&step, None));
        } else {
            assert!(h.save_dcp(&step, None));
        }
        // A rewrite of the previous DCP step, sometimes torn by a kill -9 of rank 0's
        // mount before its new marker (then completed after the restart).
        if h.rng.chance(0.3)
            && let Some(prev) = h
                .model
                .order
                .iter()
                .rev()
                .nth(1)
                .filter(|s| s.starts_with("step-"))
                .cloned()
            && h.nodes.iter().all(|n| {
                n.volume().is_some_and(|v| {
                    v.tree()
                        .join(&prev)
                        .join(format!("__{}_0.distcp", &n.name[1..]))
                        .exists()
                })
            })
        {
            if h.rng.chance(0.5) {
                assert!(!h.save_dcp(&prev, Some(0)));
                h.supervise(round);
            }
            assert!(h.save_dcp(&prev, None));
        }
        // A lost lease, once: the proxy refuses lease requests for longer than two
        // thirds of the 15 s lease.
        if !lease_fault_done && round == 3 {
            lease_fault_done = true;
            h.proxy.set(Faults {
                lease_conflict: true,
                ..faults
            });
            tokio::time::sleep(Duration::from_secs(12)).await;
            h.proxy.set(faults);
        }
        tokio::time::sleep(Duration::from_millis(200 + h.rng.below(800))).await;
        h.supervise(round);
        h.check_lake().await;
    }

    // Faults stop; everything comes back; one last step, then the uploads settle.
    h.proxy.set(Faults::NONE);
    for n in &mut h.nodes {
        n.down_until = 0;
    }
    h.supervise(round + 1);
    let last = format!("step-{step_no}");
    assert!(h.save_dcp(&last, None));
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        h.supervise(round + 1);
        let lake = h.check_lake().await;
        let settled = h.nodes.iter().all(|n| {
            n.status().is_some_and(|s| {
                s.pending_files == 0
                    && s.waiting.is_empty()
                    && s.latest_durable.as_ref().is_some_and(|d| d.step == last)
            })
        });
        if settled && lake.contains_key(&last) {
            break;
        }
        if Instant::now() > deadline {
            let statuses: Vec<_> = h
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.status()))
                .collect();
            panic!(
                "the uploads did not settle within 240 s after the faults stopped (seed {seed}):\n{statuses:#?}\nlake: {:?}",
                lake.keys().collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The lake, settled.
    let lake = h.check_lake().await;
    for (step, files) in &lake {
        assert_eq!(
            Some(files),
            h.model.saves[step].last(),
            "{step} is durable with an earlier save than its latest (seed {seed})"
        );
    }
    let numbered = lake
        .keys()
        .filter(|s| s.starts_with("step-") || s.parse::<u64>().is_ok())
        .count();
    assert_eq!(
        numbered,
        KEEP_REMOTE.min(h.model.order.len()),
        "retention keeps {KEEP_REMOTE} steps in the lake (seed {seed}): {:?}",
        lake.keys().collect::<Vec<_>>()
    );
    let out = tempfile::tempdir().unwrap();
    let r = restore(
        &*h.direct,
        PREFIX,
        "lake",
        out.path(),
        &StepChoice::Latest,
        4,
    )
    .await
    .unwrap();
    assert_eq!(
        r.step, last,
        "the step saved last is the latest (seed {seed})"
    );
    let mut restored = Files::new();
    for e in std::fs::read_dir(&r.dir).unwrap() {
        let e = e.unwrap();
        restored.insert(
            e.file_name().to_string_lossy().into_owned(),
            md5_of(&std::fs::read(e.path()).unwrap()),
        );
    }
    assert_eq!(
        Some(&restored),
        h.model.saves[&last].last(),
        "restored bytes (seed {seed})"
    );
    // No status names a durable step whose manifest is not in the lake.
    for n in &h.nodes {
        let st = n.status().unwrap();
        assert_eq!(st.pending_files, 0, "{}: {st:?}", n.name);
        if let Some(d) = &st.latest_durable {
            assert!(
                lake.contains_key(&d.step),
                "{} reports {} durable: {st:?}",
                n.name,
                d.step
            );
        }
    }
    let c = &h.proxy.counts;
    eprintln!(
        "fault harness: {round} rounds, {} steps saved ({} torn), proxy: {} forwarded, {} busy, {} reset, {} lost replies, {} lease refusals; seed {seed}",
        h.model.saves.len(),
        h.model.torn.len(),
        c.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        c.busy.load(std::sync::atomic::Ordering::Relaxed),
        c.reset.load(std::sync::atomic::Ordering::Relaxed),
        c.lost_reply.load(std::sync::atomic::Ordering::Relaxed),
        c.lease_conflict.load(std::sync::atomic::Ordering::Relaxed),
    );
}
