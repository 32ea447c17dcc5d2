//! Leader election on a `coordination.k8s.io/v1` `Lease`.
//!
//! Only the leader writes: controllers start after [`LeaseLock::acquire`] returns and
//! the process stops when renewal has not succeeded for `renew_deadline` (a standby
//! replica then takes over; restarting is simpler and safer than demoting a running
//! controller).
//!
//! Invariants:
//! - A lease is taken over only when it has no holder or its `renewTime +
//!   leaseDurationSeconds` is in the past. Writes are optimistic (`resourceVersion`
//!   on replace, create-if-absent): of two candidates racing, the API server lets
//!   exactly one win (the other gets 409 Conflict and keeps waiting).
//! - The decision is the pure [`decide`], table-tested without a server.
//! - A leader stops leading before anyone else may start: every renewal attempt is
//!   cut off at the renew deadline, and the deadline is shorter than the lease (the
//!   client-go rule). A renewal that hangs (a partitioned API server, a stuck
//!   connection) therefore ends leadership while the lease is still ours, never after
//!   another replica has taken it over.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::info;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Lease name.
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews (well under `renew_deadline`).
    pub renew_every: Duration,
    /// How long the leader keeps leading without a successful renewal; shorter than
    /// `lease_duration`, so that it has stopped before its lease can expire.
    pub renew_deadline: Duration,
}

impl LeaderElectionConfig {
    /// Checks `renew_every < renew_deadline < lease_duration`.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew deadline {:?} must be shorter than the lease duration {:?} (a leader must stop before its lease can be taken over)",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.renew_every >= self.renew_deadline {
            return Err(format!(
                "renewal period {:?} must be shorter than the renew deadline {:?}",
                self.renew_every, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// Leader election errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// A Lease request failed.
    #[error("Lease {namespace}/{name}: {cause}")]
    Kube {
        namespace: String,
        name: String,
        cause: kube::Error,
    },
    /// Renewal failed for a whole lease duration: another replica may lead now.
    #[error("lost leadership of Lease {namespace}/{name}; exiting so that one leader remains")]
    Lost { namespace: String, name: String },
}

/// What to do with the Lease as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Unheld or expired: take it over.
    TakeOver,
    /// Someone else holds a valid lease: wait.
    Wait,
}

/// Decide from the observed Lease spec.
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .map(|s| SignedDuration::from_secs(i64::from(s)))
                .unwrap_or_else(|| {
                    SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::MAX)
                });
            match spec.renew_time.as_ref() {
                Some(renewed)
                    if renewed
                        .0
                        .checked_add(duration)
                        .is_ok_and(|expiry| expiry > now) =>
                {
                    Decision::Wait
                }
                _ => Decision::TakeOver,
            }
        }
    }
}

/// A Lease-based lock.
pub struct LeaseLock {
    api: Api<Lease>,
    config: LeaderElectionConfig,
}

impl LeaseLock {
    /// A lock on `config.namespace/config.lease_name`.
    pub fn new(client: Client, config: LeaderElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn err(&self, cause: kube::Error) -> LeaderError {
        LeaderError::Kube {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
            cause,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt: `Ok(true)` if we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, LeaderError> {
        let name = &self.config.lease_name;
        let current = self.api.get_opt(name).await.map_err(|e| self.err(e))?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.config.identity,
            now,
            self.config.lease_duration,
        );
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew | Decision::TakeOver, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let takeover = decision == Decision::TakeOver;
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(takeover);
                let acquired = if takeover { None } else { old.acquire_time };
                lease.spec = Some(self.spec(now, acquired, transitions));
                // `lease` carries its resourceVersion: a concurrent writer makes this 409.
                self.api
                    .replace(name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew | Decision::TakeOver, None) => return Ok(false),
        };
        match result {
            Ok(()) => {
                if decision != Decision::Renew {
                    info!(lease = %name, identity = %self.config.identity, "acquired leadership");
                }
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Wait until we lead.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            if self.try_acquire_or_renew(Timestamp::now()).await? {
                return Ok(());
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renew forever; returns [`LeaderError::Lost`] once renewal has not succeeded for
    /// `renew_deadline` (or someone else holds the lease). Each attempt is cut off at
    /// the deadline, so this returns while the lease is still ours.
    pub async fn keep_renewing(&self) -> LeaderError {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            let left = self.config.renew_deadline.saturating_sub(last_ok.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, self.try_acquire_or_renew(Timestamp::now())).await {
                Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(false)) => break,
                Ok(Err(error)) => tracing::warn!(%error, "lease renewal failed"),
                Err(_) => {
                    tracing::warn!(deadline = ?self.config.renew_deadline, "lease renewal did not answer before the renew deadline");
                    break;
                }
            }
        }
        LeaderError::Lost {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_ago: Option<i64>, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: renewed_ago.map(|a| MicroTime(Timestamp::from_second(1000 - a).unwrap())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    use http::{Method, Request, Response};
    use kube::client::Body;

    fn config() -> LeaderElectionConfig {
        LeaderElectionConfig {
            namespace: "tidepool-system".into(),
            lease_name: "tidepool-operator".into(),
            identity: "pod-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_ends_leadership_before_the_lease_can_expire() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        // The API server takes every request and never answers (a stuck connection).
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(r) = handle.next_request().await {
                held.push(r);
            }
        });
        let lock = LeaseLock::new(Client::new(service, "default"), config());
        let start = tokio::time::Instant::now();
        let lost = tokio::time::timeout(config().lease_duration, lock.keep_renewing()).await;
        assert!(
            matches!(lost, Ok(LeaderError::Lost { .. })),
            "still leading when the lease may already be another replica's"
        );
        assert!(start.elapsed() <= config().renew_deadline + Duration::from_millis(1));
        drop(lock);
        server.abort();
    }

    #[test]
    fn the_renew_deadline_must_fall_inside_the_lease() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.renew_deadline = c.lease_duration;
        assert!(
            c.validate()
                .unwrap_err()
                .contains("shorter than the lease duration")
        );
        let mut c = config();
        c.renew_every = c.renew_deadline;
        assert!(c.validate().is_err());
    }

    /// Answer each request in turn with (expected method, status, body).
    async fn attempt(
        answers: Vec<(Method, u16, serde_json::Value)>,
    ) -> (Result<bool, LeaderError>, Vec<serde_json::Value>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server =
            tokio::spawn(async move {
                let mut bodies = Vec::new();
                for (method, status, answer) in answers {
                    let (request, send) = handle.next_request().await.expect("request");
                    assert_eq!(request.method(), method);
                    assert!(request.uri().path().starts_with(
                        "/apis/coordination.k8s.io/v1/namespaces/tidepool-system/leases"
                    ));
                    let bytes = request.into_body().collect_bytes().await.unwrap();
                    bodies.push(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null));
                    send.send_response(
                        Response::builder()
                            .status(status)
                            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                            .unwrap(),
                    );
                }
                assert!(handle.next_request().await.is_none(), "no further request");
                bodies
            });
        let lock = LeaseLock::new(Client::new(service, "default"), config());
        let result = lock
            .try_acquire_or_renew(Timestamp::from_second(1000).unwrap())
            .await;
        drop(lock);
        (result, server.await.unwrap())
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
    }

    #[tokio::test]
    async fn first_candidate_creates_the_lease_and_leads() {
        let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "tidepool-operator"}});
        let (result, bodies) = attempt(vec![
            (Method::GET, 404, not_found()),
            (Method::POST, 201, lease),
        ])
        .await;
        assert!(result.unwrap());
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "pod-a");
        assert_eq!(bodies[1]["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn losing_a_race_means_waiting_not_failing() {
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409});
        let (result, _) = attempt(vec![
            (Method::GET, 404, not_found()),
            (Method::POST, 409, conflict),
        ])
        .await;
        assert!(!result.unwrap());
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_with_its_resource_version() {
        let expired = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tidepool-operator", "resourceVersion": "42"},
            "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": "1970-01-01T00:16:00.000000Z", "leaseTransitions": 3}
        });
        let (result, bodies) = attempt(vec![
            (Method::GET, 200, expired.clone()),
            (Method::PUT, 200, expired),
        ])
        .await;
        assert!(result.unwrap());
        assert_eq!(
            bodies[1]["metadata"]["resourceVersion"], "42",
            "optimistic: a concurrent taker gets 409"
        );
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "pod-a");
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test]
    async fn valid_lease_of_another_replica_is_left_alone() {
        let held = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tidepool-operator", "resourceVersion": "42"},
            "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "renewTime": "1970-01-01T00:16:35.000000Z"}
        });
        let (result, _) = attempt(vec![(Method::GET, 200, held)]).await;
        assert!(!result.unwrap());
    }

    #[test]
    fn decision_table() {
        let now = Timestamp::from_second(1000).unwrap();
        let d = Duration::from_secs(15);
        let cases = [
            ("no lease", None, Decision::Create),
            ("ours", Some(spec(Some("me"), Some(5), 15)), Decision::Renew),
            (
                "ours even if expired",
                Some(spec(Some("me"), Some(500), 15)),
                Decision::Renew,
            ),
            (
                "other, fresh",
                Some(spec(Some("other"), Some(5), 15)),
                Decision::Wait,
            ),
            (
                "other, expired",
                Some(spec(Some("other"), Some(16), 15)),
                Decision::TakeOver,
            ),
            (
                "other, never renewed",
                Some(spec(Some("other"), None, 15)),
                Decision::TakeOver,
            ),
            (
                "released",
                Some(spec(None, Some(1), 15)),
                Decision::TakeOver,
            ),
        ];
        for (name, lease, want) in cases {
            assert_eq!(decide(lease.as_ref(), "me", now, d), want, "{name}");
        }
    }
}
