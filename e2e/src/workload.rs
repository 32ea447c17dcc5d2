//! The suite's own pods: Jobs (seeding, reading, writing) and a long-lived Pod, built as
//! JSON and parsed into their `k8s-openapi` types before they are sent.
//!
//! Readers and writers run the scripts of `scripts/` (mounted from a ConfigMap at
//! `/scripts`) on the node image the chart runs (Debian with bash and coreutils, already
//! on every node): no other image to pull or pin. Each workload is pinned to one node by
//! `kubernetes.io/hostname`, since which node serves a volume is what the scenarios test.

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use serde_json::{Value, json};

/// Name of the ConfigMap holding the scripts (and the seeding program), in every
/// scenario namespace.
pub const SCRIPTS: &str = "e2e-scripts";
/// Where the scripts are mounted.
pub const SCRIPTS_DIR: &str = "/scripts";
/// The one container of every workload.
pub const CONTAINER: &str = "main";
/// Label put on every workload's pods: the workload's name.
pub const LABEL: &str = "tidepool-e2e/workload";

/// A volume of a workload.
#[derive(Clone, Debug)]
pub enum Mount {
    /// A PVC (a Tidepool volume) at `path`.
    Claim {
        claim: String,
        path: String,
        read_only: bool,
    },
    /// A ConfigMap's keys as files under `path`.
    ConfigMap { name: String, path: String },
}

/// A container to run: image, command, environment, volumes, and where.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    /// EnvVar objects (`{"name": …, "value": …}` or with `valueFrom`).
    pub env: Vec<Value>,
    pub mounts: Vec<Mount>,
    /// Pin to this node (`kubernetes.io/hostname`); `None` lets the scheduler choose.
    pub node: Option<String>,
    /// Run as this non-root uid/gid (a training pod usually does); `None`: the image's.
    pub run_as: Option<i64>,
}

/// An environment variable with a literal value.
pub fn env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

/// An environment variable from a Secret's key.
pub fn env_from_secret(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
}

impl Workload {
    /// A workload running `bash /scripts/<script> <args>` on `image` (the node image).
    pub fn script(name: &str, image: &str, script: &str, args: &[&str]) -> Workload {
        let mut command = vec!["bash".to_owned(), format!("{SCRIPTS_DIR}/{script}")];
        command.extend(args.iter().map(|a| (*a).to_owned()));
        Workload {
            name: name.to_owned(),
            image: image.to_owned(),
            command,
            env: Vec::new(),
            mounts: Vec::new(),
            node: None,
            run_as: None,
        }
    }

    pub fn on(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    pub fn mount(mut self, m: Mount) -> Self {
        self.mounts.push(m);
        self
    }

    pub fn env(mut self, e: Value) -> Self {
        self.env.push(e);
        self
    }

    pub fn run_as(mut self, uid: i64) -> Self {
        self.run_as = Some(uid);
        self
    }

    fn pod_spec(&self, restart_policy: &str) -> Value {
        let mut volumes = vec![json!({
            "name": "scripts",
            "configMap": {"name": SCRIPTS, "defaultMode": 0o555},
        })];
        let mut mounts =
            vec![json!({"name": "scripts", "mountPath": SCRIPTS_DIR, "readOnly": true})];
        for (i, m) in self.mounts.iter().enumerate() {
            let vol = format!("v{i}");
            match m {
                Mount::Claim {
                    claim,
                    path,
                    read_only,
                } => {
                    volumes.push(json!({
                        "name": vol,
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
                    }));
                    mounts.push(json!({"name": vol, "mountPath": path, "readOnly": read_only}));
                }
                Mount::ConfigMap { name, path } => {
                    volumes.push(json!({"name": vol, "configMap": {"name": name}}));
                    mounts.push(json!({"name": vol, "mountPath": path, "readOnly": true}));
                }
            }
        }
        let mut spec = json!({
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": CONTAINER,
                "image": self.image,
                "imagePullPolicy": "IfNotPresent",
                "command": self.command,
                "env": self.env,
                "volumeMounts": mounts,
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
            }],
            "volumes": volumes,
        });
        if let Some(node) = &self.node {
            spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
        }
        if let Some(uid) = self.run_as {
            spec["securityContext"] =
                json!({"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": true});
        }
        spec
    }

    /// A Job of this workload. `restart_policy` `Never` makes any failure final (with
    /// `backoff_limit` 0); `OnFailure` restarts the container in the same pod, which is
    /// how a Job rides out a broken volume that comes back.
    pub fn job(&self, restart_policy: &str, backoff_limit: i32) -> Job {
        serde_json::from_value(self.job_json(restart_policy, backoff_limit)).expect("a valid Job")
    }

    fn job_json(&self, restart_policy: &str, backoff_limit: i32) -> Value {
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": self.name, "labels": {LABEL: self.name}},
            "spec": {
                "backoffLimit": backoff_limit,
                "activeDeadlineSeconds": crate::wait::JOB.as_secs(),
                "template": {
                    "metadata": {"labels": {LABEL: self.name}},
                    "spec": self.pod_spec(restart_policy),
                },
            },
        })
    }

    /// A bare Pod of this workload that is never restarted: a container that exits ends it.
    pub fn pod(&self) -> Pod {
        serde_json::from_value(self.pod_json()).expect("a valid Pod")
    }

    fn pod_json(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "labels": {LABEL: self.name}},
            "spec": self.pod_spec("Never"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_option() -> Workload {
        Workload::script("read", "example/tidepool:1", "read-all.sh", &["/data"])
            .on("worker-1")
            .run_as(65532)
            .env(env("PAUSE", "1"))
            .env(env_from_secret("KEY", "lake", "accountKey"))
            .mount(Mount::Claim {
                claim: "train".into(),
                path: "/data".into(),
                read_only: true,
            })
            .mount(Mount::ConfigMap {
                name: "expected".into(),
                path: "/expected".into(),
            })
    }

    /// k8s-openapi ignores fields it does not know when parsing: a misspelled field would
    /// vanish silently. Serialising the parsed object back must give the JSON we wrote.
    #[test]
    fn every_field_written_is_a_field_of_the_kubernetes_type() {
        let w = every_option();
        for (restart, backoff) in [("Never", 0), ("OnFailure", 6)] {
            let parsed = serde_json::to_value(w.job(restart, backoff)).unwrap();
            assert_eq!(parsed, w.job_json(restart, backoff), "Job");
        }
        assert_eq!(serde_json::to_value(w.pod()).unwrap(), w.pod_json(), "Pod");
    }
}
