//! One scenario's world: its namespace (with the lake credentials and the scripts), its
//! lake prefix, and the operations every scenario uses: seed the lake, create Tidepool
//! objects and wait for their status, run Jobs and read their output, look at the pools.
//!
//! Failures go through [`Scenario::fail`], which appends what the namespace looks like
//! (pods, container states, events, Tidepool statuses, the node pods), so a red run
//! explains itself without a second look at the cluster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, Event, Namespace, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy},
};
use serde_json::json;
use tidepool_api::{
    CachePool, CheckpointSync, CheckpointSyncSpec, DatasetCache, DatasetCacheSpec,
    DatasetCacheStatus, Phase,
    cache_pool::{CheckpointNodeStatus, DatasetNodeStatus},
    checkpoint_sync::CheckpointSyncStatus,
    dataset_cache::{Prefetch, PrefetchPolicy},
    lake::{LakeCredentials, LakeLocation, SecretRef},
};

use crate::env::Env;
use crate::sums::{Sums, tail};
use crate::wait::{self, Check};
use crate::workload::{self, CONTAINER, LABEL, SCRIPTS, Workload, env, env_from_secret};

/// The Secret, in every scenario namespace, that Tidepool objects name as their lake
/// credentials (`secretRef`): key `accountKey`, from which the nodes sign SAS tokens.
pub const LAKE_SECRET: &str = "lake";

/// The scripts and the seeding program, as the ConfigMap [`SCRIPTS`] serves them.
const SCRIPT_FILES: [(&str, &str); 5] = [
    ("read-all.sh", include_str!("../scripts/read-all.sh")),
    ("write-steps.sh", include_str!("../scripts/write-steps.sh")),
    ("resume.sh", include_str!("../scripts/resume.sh")),
    ("verify-loop.sh", include_str!("../scripts/verify-loop.sh")),
    ("seed.js", include_str!("../manifests/seed.js")),
];

/// A file to put into the lake: random bytes of this size.
#[derive(Clone, Debug)]
pub struct SeedFile {
    pub name: String,
    pub size: u64,
}

impl SeedFile {
    pub fn new(name: impl Into<String>, size: u64) -> SeedFile {
        SeedFile {
            name: name.into(),
            size,
        }
    }
}

/// What the seeding Job put into the lake.
#[derive(Clone, Debug)]
pub struct Seeded {
    /// The prefix's URL, as a `DatasetCache` names it.
    pub url: String,
    /// Checksums of the bytes uploaded, by path relative to the prefix.
    pub sums: Sums,
    /// Total bytes.
    pub bytes: i64,
}

/// One scenario: its namespace, run id and the cluster.
pub struct Scenario {
    pub env: Env,
    /// Short name of the scenario (namespace and lake prefix).
    pub name: String,
    /// This run's id: part of every name, so runs never collide.
    pub run: String,
    pub ns: String,
    keep: bool,
}

fn kubectl() -> String {
    std::env::var("KUBECTL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "kubectl".to_owned())
}

/// Runs a command (kubectl, helm) to the end; returns (success, stdout, stderr). A command
/// that cannot start is an error naming it.
pub async fn command(program: &str, args: &[&str]) -> Result<(bool, String, String), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {program}: {e} (is it installed and on PATH?)"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

impl Scenario {
    /// Connects ([`Env::connect`], which refuses clusters the suite cannot run on) and
    /// creates the scenario's namespace with the lake Secret and the scripts.
    pub async fn start(name: &str) -> Scenario {
        let env = Env::connect().await;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_millis();
        let run = format!("{:08x}", millis as u32);
        let ns = format!("e2e-{name}-{run}");
        let s = Scenario {
            env,
            name: name.to_owned(),
            run,
            ns,
            keep: std::env::var_os("TIDEPOOL_E2E_KEEP").is_some_and(|v| !v.is_empty()),
        };
        let labels = BTreeMap::from([
            (
                "app.kubernetes.io/part-of".to_owned(),
                "tidepool-e2e".to_owned(),
            ),
            ("tidepool-e2e/run".to_owned(), s.run.clone()),
        ]);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(s.ns.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(s.env.client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {}: {e}", s.ns));
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(LAKE_SECRET.to_owned()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([(
                "accountKey".to_owned(),
                s.env.lake.key.clone(),
            )])),
            ..Default::default()
        };
        s.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap_or_else(|e| panic!("creating the lake Secret: {e}"));
        let scripts = ConfigMap {
            metadata: ObjectMeta {
                name: Some(SCRIPTS.to_owned()),
                ..Default::default()
            },
            data: Some(
                SCRIPT_FILES
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        };
        s.api::<ConfigMap>()
            .create(&PostParams::default(), &scripts)
            .await
            .unwrap_or_else(|e| panic!("creating the scripts ConfigMap: {e}"));
        eprintln!(
            "e2e {name}: namespace {}, gpu node {}, other node {}, lake {}, node image {}",
            s.ns, s.env.gpu_node, s.env.other_node, s.env.lake.endpoint, s.env.node_image
        );
        s
    }

    /// An API of a namespaced kind in this scenario's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.env.client.clone(), &self.ns)
    }

    /// Panics with `message` and a description of the namespace.
    pub async fn fail(&self, message: impl std::fmt::Display) -> ! {
        let state = self.diagnose().await;
        panic!("{message}\n\n--- state of {} ---\n{state}", self.ns)
    }

    /// [`wait::until`], failing the scenario (with [`Scenario::diagnose`]) on a timeout.
    pub async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Check<T>>,
    {
        match wait::until(what, timeout, probe).await {
            Ok(v) => v,
            Err(e) => self.fail(e).await,
        }
    }

    /// The URL of `<container>/<run>/<dir>` in the lake.
    pub fn lake_url(&self, container: &str, dir: &str) -> String {
        format!("{}/{container}/{}/{dir}", self.env.lake.endpoint, self.run)
    }

    /// Puts `files` (random bytes) under `<container>/<run>/<dir>/` in the lake, creating
    /// the container if needed, with a Job on the lake's image; returns their checksums as
    /// the Job computed them from the bytes it sent.
    pub async fn seed(&self, container: &str, dir: &str, files: &[SeedFile]) -> Seeded {
        let spec: Vec<_> = files
            .iter()
            .map(|f| json!({"name": f.name, "size": f.size}))
            .collect();
        let job = Workload {
            name: format!("seed-{dir}"),
            image: self.env.lake.image.clone(),
            command: vec!["node".into(), format!("{}/seed.js", workload::SCRIPTS_DIR)],
            env: vec![
                env("LAKE_ENDPOINT", &self.env.lake.endpoint),
                env("LAKE_ACCOUNT", &self.env.lake.account),
                env_from_secret("LAKE_KEY", LAKE_SECRET, "accountKey"),
                env("LAKE_CONTAINER", container),
                env("LAKE_PREFIX", &format!("{}/{dir}/", self.run)),
                env("SEED_FILES", &serde_json::Value::from(spec).to_string()),
            ],
            mounts: Vec::new(),
            node: None,
            run_as: None,
        };
        let out = self.run_job(&job, "Never", 0).await;
        let sums = Sums::from_lines(&out);
        let seeded = out
            .lines()
            .find_map(|l| l.strip_prefix("SEEDED "))
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(n, b)| Some((n.parse::<usize>().ok()?, b.trim().parse::<i64>().ok()?)));
        let total: u64 = files.iter().map(|f| f.size).sum();
        match seeded {
            Some((n, bytes)) if n == files.len() && sums.0.len() == n && bytes as u64 == total => {
                Seeded {
                    url: self.lake_url(container, dir),
                    sums,
                    bytes,
                }
            }
            _ => {
                self.fail(format!(
                    "seeding {dir}: expected {} files and {total} bytes; its output ends:\n{}",
                    files.len(),
                    tail(&out, 20)
                ))
                .await
            }
        }
    }

    fn credentials() -> Option<LakeCredentials> {
        Some(LakeCredentials {
            secret_ref: Some(SecretRef {
                name: LAKE_SECRET.to_owned(),
            }),
            ..Default::default()
        })
    }

    /// Creates a `DatasetCache` of `url`; `gpu_only` selects the gpu node by its label.
    pub async fn create_dataset(
        &self,
        name: &str,
        url: &str,
        policy: PrefetchPolicy,
        gpu_only: bool,
    ) -> DatasetCache {
        let (k, v) = &self.env.gpu_label;
        let spec = DatasetCacheSpec {
            source: LakeLocation {
                url: url.to_owned(),
                credentials: Self::credentials(),
            },
            node_selector: gpu_only.then(|| LabelSelector {
                match_labels: Some(BTreeMap::from([(k.clone(), v.clone())])),
                ..Default::default()
            }),
            prefetch: Prefetch {
                policy,
                include: Vec::new(),
            },
            ..Default::default()
        };
        self.api::<DatasetCache>()
            .create(&PostParams::default(), &DatasetCache::new(name, spec))
            .await
            .unwrap_or_else(|e| panic!("creating DatasetCache {name}: {e}"))
    }

    /// Creates a `CheckpointSync` whose destination is `url` (default commit rule: the
    /// `.metadata` marker; retention: keep everything).
    pub async fn create_checkpoint_sync(&self, name: &str, url: &str) -> CheckpointSync {
        let spec = CheckpointSyncSpec {
            destination: LakeLocation {
                url: url.to_owned(),
                credentials: Self::credentials(),
            },
            ..Default::default()
        };
        self.api::<CheckpointSync>()
            .create(&PostParams::default(), &CheckpointSync::new(name, spec))
            .await
            .unwrap_or_else(|e| panic!("creating CheckpointSync {name}: {e}"))
    }

    /// Waits until the `DatasetCache`'s status satisfies `pred`; a `Failed` phase ends the
    /// wait at once.
    pub async fn wait_dataset(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&DatasetCacheStatus) -> bool,
    ) -> DatasetCache {
        let api = self.api::<DatasetCache>();
        let (api, pred) = (&api, &pred);
        self.wait(
            &format!("DatasetCache {name}: {what}"),
            wait::SETTLE,
            move || async move {
                match api.get(name).await {
                    Ok(d) => {
                        let status = d.status.clone().unwrap_or_default();
                        if pred(&status) {
                            Check::Done(d)
                        } else if status.phase == Phase::Failed {
                            Check::Failed(format!("phase Failed: {}", compact(&status)))
                        } else {
                            Check::Waiting(compact(&status))
                        }
                    }
                    Err(e) => Check::Waiting(e.to_string()),
                }
            },
        )
        .await
    }

    /// Waits until the `CheckpointSync`'s status satisfies `pred`.
    pub async fn wait_checkpoint_sync(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&CheckpointSyncStatus) -> bool,
    ) -> CheckpointSync {
        let api = self.api::<CheckpointSync>();
        let (api, pred) = (&api, &pred);
        self.wait(
            &format!("CheckpointSync {name}: {what}"),
            wait::SETTLE,
            move || async move {
                match api.get(name).await {
                    Ok(c) => {
                        let status = c.status.clone().unwrap_or_default();
                        if pred(&status) {
                            Check::Done(c)
                        } else if status.phase == Phase::Failed {
                            Check::Failed(format!("phase Failed: {}", compact(&status)))
                        } else {
                            Check::Waiting(compact(&status))
                        }
                    }
                    Err(e) => Check::Waiting(e.to_string()),
                }
            },
        )
        .await
    }

    /// Creates the Job of `w`.
    pub async fn start_job(&self, w: &Workload, restart_policy: &str, backoff_limit: i32) {
        self.api::<Job>()
            .create(
                &PostParams::default(),
                &w.job(restart_policy, backoff_limit),
            )
            .await
            .unwrap_or_else(|e| panic!("creating Job {}: {e}", w.name));
    }

    /// Runs the Job of `w` to completion and returns its output (the last pod's logs).
    pub async fn run_job(&self, w: &Workload, restart_policy: &str, backoff_limit: i32) -> String {
        self.start_job(w, restart_policy, backoff_limit).await;
        self.wait_job(&w.name).await
    }

    /// Waits for Job `name` to complete and returns its output; a failed Job fails the
    /// scenario with its output.
    pub async fn wait_job(&self, name: &str) -> String {
        let api = self.api::<Job>();
        let api = &api;
        let outcome = wait::until(
            &format!("Job {name} complete"),
            wait::JOB,
            move || async move {
                let job = match api.get_opt(name).await {
                    Ok(Some(j)) => j,
                    Ok(None) => return Check::Failed(format!("Job {name} is gone")),
                    Err(e) => return Check::Waiting(e.to_string()),
                };
                let conditions = job
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                let holds = |t: &str| {
                    conditions
                        .iter()
                        .find(|c| c.type_ == t && c.status == "True")
                };
                if holds("Complete").is_some() {
                    return Check::Done(());
                }
                if let Some(c) = holds("Failed") {
                    return Check::Failed(format!(
                        "Job {name} failed: {} {}",
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default()
                    ));
                }
                Check::Waiting(self.describe_pods(Some(name)).await)
            },
        )
        .await;
        let output = self.output(name).await;
        if let Err(e) = outcome {
            self.fail(format!(
                "{e}\noutput of {name} (last 60 lines):\n{}",
                tail(&output, 60)
            ))
            .await;
        }
        output
    }

    /// The newest pod of workload `name` (a Job's or the bare Pod).
    pub async fn workload_pod(&self, name: &str) -> Option<Pod> {
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("{LABEL}={name}")))
            .await
            .ok()?
            .items;
        pods.into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0))
    }

    /// The logs of the current container of workload `name`'s newest pod ("" if none yet).
    pub async fn output(&self, name: &str) -> String {
        let Some(pod) = self.workload_pod(name).await else {
            return String::new();
        };
        let params = LogParams {
            container: Some(CONTAINER.to_owned()),
            ..Default::default()
        };
        self.api::<Pod>()
            .logs(&pod.name_any(), &params)
            .await
            .unwrap_or_default()
    }

    /// Deletes Job `name` and its pods, and waits until the pods are gone.
    pub async fn delete_job(&self, name: &str) {
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..Default::default()
        };
        let _ = self.api::<Job>().delete(name, &dp).await;
        let this = self;
        self.wait(
            &format!("Job {name} and its pods deleted"),
            wait::SETTLE,
            move || async move {
                match this.workload_pod(name).await {
                    None => Check::Done(()),
                    Some(p) => Check::Waiting(format!("pod {} still there", p.name_any())),
                }
            },
        )
        .await
    }

    /// Names of the pools whose spec assigns the `DatasetCache` with this uid.
    pub async fn pools_assigning_dataset(&self, uid: &str) -> Vec<String> {
        self.pools()
            .await
            .iter()
            .filter(|p| p.spec.datasets.iter().any(|d| d.owner.uid == uid))
            .map(|p| p.name_any())
            .collect()
    }

    /// Names of the pools whose status still reports the `DatasetCache` with this uid.
    pub async fn pools_reporting_dataset(&self, uid: &str) -> Vec<String> {
        self.pools()
            .await
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.datasets.iter().any(|d| d.uid == uid))
            })
            .map(|p| p.name_any())
            .collect()
    }

    /// What `node`'s agent reports about the `DatasetCache` with this uid.
    pub async fn node_dataset_status(&self, node: &str, uid: &str) -> Option<DatasetNodeStatus> {
        let pool = Api::<CachePool>::all(self.env.client.clone())
            .get_opt(node)
            .await
            .ok()??;
        pool.status?.datasets.into_iter().find(|d| d.uid == uid)
    }

    /// What `node`'s agent reports about the `CheckpointSync` with this uid.
    pub async fn node_checkpoint_status(
        &self,
        node: &str,
        uid: &str,
    ) -> Option<CheckpointNodeStatus> {
        let pool = Api::<CachePool>::all(self.env.client.clone())
            .get_opt(node)
            .await
            .ok()??;
        pool.status?
            .checkpoint_syncs
            .into_iter()
            .find(|c| c.uid == uid)
    }

    async fn pools(&self) -> Vec<CachePool> {
        Api::<CachePool>::all(self.env.client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_else(|e| panic!("listing CachePools: {e}"))
    }

    /// One line per pod of the namespace (or of workload `name`): node, phase, container
    /// state, restarts.
    pub async fn describe_pods(&self, name: Option<&str>) -> String {
        let lp = match name {
            Some(n) => ListParams::default().labels(&format!("{LABEL}={n}")),
            None => ListParams::default(),
        };
        match self.api::<Pod>().list(&lp).await {
            Ok(list) if list.items.is_empty() => "no pods yet".to_owned(),
            Ok(list) => list
                .items
                .iter()
                .map(describe_pod)
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("listing pods: {e}"),
        }
    }

    /// The namespace at a glance: pods, the latest events, Tidepool objects' status, and
    /// the node pods of the release.
    pub async fn diagnose(&self) -> String {
        let mut out = String::new();
        if let Ok(pods) = self.api::<Pod>().list(&ListParams::default()).await {
            for p in &pods.items {
                writeln!(out, "pod {}", describe_pod(p)).unwrap();
            }
        }
        if let Ok(events) = self.api::<Event>().list(&ListParams::default()).await {
            let mut events = events.items;
            events.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
            for e in events.iter().rev().take(25).rev() {
                writeln!(
                    out,
                    "event {} {}/{}: {} {}",
                    e.type_.clone().unwrap_or_default(),
                    e.involved_object.kind.clone().unwrap_or_default(),
                    e.involved_object.name.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                )
                .unwrap();
            }
        }
        if let Ok(list) = self
            .api::<DatasetCache>()
            .list(&ListParams::default())
            .await
        {
            for d in &list.items {
                writeln!(out, "DatasetCache {}: {}", d.name_any(), compact(&d.status)).unwrap();
            }
        }
        if let Ok(list) = self
            .api::<CheckpointSync>()
            .list(&ListParams::default())
            .await
        {
            for c in &list.items {
                writeln!(
                    out,
                    "CheckpointSync {}: {}",
                    c.name_any(),
                    compact(&c.status)
                )
                .unwrap();
            }
        }
        if let Ok(pods) =
            Api::<Pod>::namespaced(self.env.client.clone(), &self.env.release_namespace)
                .list(&ListParams::default().labels(&self.env.selector("node")))
                .await
        {
            for p in &pods.items {
                writeln!(out, "node pod {}", describe_pod(p)).unwrap();
            }
        }
        out
    }
}

impl Drop for Scenario {
    /// Deletes the namespace (its objects go with it; Tidepool's finalizers release the PVs
    /// and pool assignments), without waiting. Synchronous: it runs during a panic too.
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "e2e {}: TIDEPOOL_E2E_KEEP is set; namespace {} kept",
                self.name, self.ns
            );
            return;
        }
        let status = std::process::Command::new(kubectl())
            .args([
                "delete",
                "namespace",
                &self.ns,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "e2e {}: could not delete namespace {} ({status:?}); delete it by hand",
                self.name, self.ns
            );
        }
    }
}

/// `name on node: phase, main: state, restarts n`.
pub fn describe_pod(p: &Pod) -> String {
    let spec_node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "(unscheduled)".to_owned());
    let status = p.status.clone().unwrap_or_default();
    let mut text = format!(
        "{} on {spec_node}: {}",
        p.name_any(),
        status.phase.clone().unwrap_or_default()
    );
    for c in status.container_statuses.unwrap_or_default() {
        let state = c.state.clone().unwrap_or_default();
        let what = if let Some(w) = state.waiting {
            format!(
                "waiting ({}: {})",
                w.reason.unwrap_or_default(),
                w.message.unwrap_or_default()
            )
        } else if let Some(t) = state.terminated {
            format!(
                "terminated ({}, exit {})",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        } else if state.running.is_some() {
            "running".to_owned()
        } else {
            "unknown".to_owned()
        };
        write!(text, ", {}: {what}, restarts {}", c.name, c.restart_count).unwrap();
    }
    text
}

/// A value as one line of JSON.
pub fn compact<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("(unprintable: {e})"))
}
