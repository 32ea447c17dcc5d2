//! Process wiring: client, CRD check, reflectors, leader election, controllers,
//! admin server, graceful shutdown.
//!
//! Order matters:
//! 1. Fail fast, with the command that fixes it, when the CRDs are not installed.
//! 2. Start the admin server (probes answer while waiting for leadership).
//! 3. Sync reflector stores of nodes, pools, datasets and checkpoint syncs. Pool specs
//!    are computed from all of them, so no controller may run on a partial view
//!    (an empty dataset store would unassign every dataset).
//! 4. Acquire the Lease; only then run the controllers (only the leader writes).
//! 5. On SIGTERM/SIGINT, controllers finish in-flight reconciles and stop; on lost
//!    leadership the process exits with an error.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::{
    api::core::v1::{Node, PersistentVolumeClaim},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        Controller, WatchStreamExt,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store, reflector},
        watcher::{self, watcher},
    },
};
use serde::de::DeserializeOwned;
use tidepool_api::{CachePool, CheckpointSync, DatasetCache};
use tracing::{error, info};

use crate::{
    admin::{self, AdminState},
    leader::{LeaderElectionConfig, LeaderError, LeaseLock},
    metrics::Metrics,
    reconcile::{self, Context, Reconciled, Stores},
};

/// Command that installs the CRDs, named in the startup error.
pub const INSTALL_CRDS: &str = "kubectl apply -f crds/ (or install the Helm chart charts/tidepool)";

/// Operator settings (built by `main` from flags).
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Kubeconfig file; None: in-cluster config, else kube's default discovery.
    pub kubeconfig: Option<PathBuf>,
    /// Admin server address (`/livez`, `/readyz`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// Pools whose heartbeat is older than this count as not ready.
    pub stale_after: Duration,
    /// Leader election; None runs unconditionally (single replica, local runs).
    pub leader_election: Option<LeaderElectionConfig>,
    /// Name reported on Events.
    pub reporter: String,
    /// Grant the node agent, per namespace and by name, the Secrets and service account
    /// tokens the objects there name (`reconcile::grants`); None: not managed.
    pub node_grants: Option<crate::reconcile::grants::GrantsConfig>,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable cluster configuration.
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
    /// Leader election settings that could leave two leaders.
    #[error("invalid leader election settings: {0}")]
    LeaderConfig(String),
    /// A CRD is missing.
    #[error(
        "the {crd} CustomResourceDefinition is not installed; install Tidepool's CRDs with: {INSTALL_CRDS}"
    )]
    CrdsMissing { crd: &'static str },
    /// The API server could not be reached or refused.
    #[error("Kubernetes API: {0}")]
    Kube(kube::Error),
    /// Leader election failed or leadership was lost.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// The admin address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Admin {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    /// A reflector stopped before syncing.
    #[error("a watch stopped before its cache synced")]
    StoreNeverSynced,
}

/// Installs ring as the process's rustls crypto provider (idempotent). rustls picks a
/// provider from its features only when exactly one is compiled in, else the first
/// connection panics; the workspace compiles only ring, and every entry point installs
/// it explicitly so that no build combination leaves the choice open.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Build a client from the config.
pub async fn client(config: &OperatorConfig) -> Result<Client, RunError> {
    install_crypto_provider();
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| RunError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| RunError::Config(e.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| RunError::Config(e.to_string()))?,
    };
    Client::try_from(kube_config).map_err(RunError::Kube)
}

async fn check_crd<K>(client: &Client, crd: &'static str) -> Result<(), RunError>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match Api::<K>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        // A group the API server does not serve answers a plain-text 404, not a Status.
        Err(kube::Error::Api(status)) if status.code == 404 => Err(RunError::CrdsMissing { crd }),
        Err(e) => Err(RunError::Kube(e)),
    }
}

/// Fail with [`RunError::CrdsMissing`] (naming [`INSTALL_CRDS`]) unless every CRD is served.
pub async fn ensure_crds_installed(client: &Client) -> Result<(), RunError> {
    check_crd::<DatasetCache>(client, "datasetcaches.tidepool.dev").await?;
    check_crd::<CheckpointSync>(client, "checkpointsyncs.tidepool.dev").await?;
    check_crd::<CachePool>(client, "cachepools.tidepool.dev").await
}

fn reflect<K>(api: Api<K>) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .touched_objects();
    let drive = stream.for_each(|r| {
        if let Err(error) = r {
            tracing::warn!(%error, "watch error");
        }
        futures::future::ready(())
    });
    (store, drive.boxed())
}

/// Mapper sending any event to every object of the controller's own store.
fn every<K, O>(own: Store<K>) -> impl Fn(O) -> Vec<ObjectRef<K>> + Send + Sync + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    move |_| {
        own.state()
            .into_iter()
            .map(|o| ObjectRef::from_obj(&*o))
            .collect()
    }
}

/// Mapper of pool events: the objects of kind `K` the pool names (its assignments and
/// its agent's reports); a pool that names none (a new node's) goes to every object,
/// so that the ones selecting it get assigned. An event that changes nothing relevant
/// ([`pool_relevance`]) goes nowhere.
fn named_in_pool<K>(
    own: Store<K>,
    bucket: Duration,
) -> impl Fn(CachePool) -> Vec<ObjectRef<K>> + Send + Sync + 'static
where
    K: Reconciled + kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let seen = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
    move |pool| {
        let hash = pool_relevance(&pool, bucket);
        let name = kube::ResourceExt::name_any(&pool);
        if let Ok(mut seen) = seen.lock()
            && seen.insert(name, hash) == Some(hash)
        {
            return Vec::new();
        }
        let named = K::named_in(&pool);
        if named.is_empty() {
            return every::<K, CachePool>(own.clone())(pool);
        }
        named
            .into_iter()
            .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
            .collect()
    }
}

/// What of a pool its objects' status depends on, as a hash: its spec, and its status
/// except the heartbeat's exact time and the pool-wide byte counts. The heartbeat
/// counts by `bucket` (half the staleness bound), so an agent reporting every few
/// seconds triggers its objects at most once a bucket, while a pool that falls silent
/// or comes back is noticed within one. Without this, every heartbeat of every node
/// reconciled every object (and with a debounce, heartbeats faster than it starved
/// reconciles altogether).
fn pool_relevance(pool: &CachePool, bucket: Duration) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&pool.spec)
        .unwrap_or_default()
        .hash(&mut h);
    if let Some(st) = &pool.status {
        let mut st = st.clone();
        let beat = st
            .heartbeat_time
            .take()
            .map(|t| t.0.as_second() / bucket.as_secs().max(1) as i64);
        beat.hash(&mut h);
        st.used_bytes = 0;
        st.capacity_bytes = 0;
        serde_json::to_string(&st).unwrap_or_default().hash(&mut h);
    }
    pool.metadata.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

fn controller<K>(
    client: &Client,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> BoxFuture<'static, ()>
where
    K: Reconciled + kube::Resource<DynamicType = ()> + Clone + DeserializeOwned,
{
    let wc = watcher::Config::default();
    let ctl = Controller::new(Api::<K>::all(client.clone()), wc.clone());
    let own = ctl.store();
    let bucket = ctx.stale_after.unsigned_abs() / 2;
    // No debounce: it postpones a reconcile for as long as triggers keep coming, which
    // on a busy cluster can be forever. Requests for one object still merge while one
    // is pending.
    ctl.owns(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        wc.clone(),
    )
    .watches(
        Api::<CachePool>::all(client.clone()),
        wc.clone(),
        named_in_pool(own.clone(), bucket),
    )
    .watches(Api::<Node>::all(client.clone()), wc, every(own))
    .graceful_shutdown_on(shutdown)
    .run(reconcile::reconcile::<K>, reconcile::error_policy::<K>, ctx)
    .for_each(|r| {
        if let Err(error) = r {
            tracing::debug!(%error, "reconcile failed");
        }
        futures::future::ready(())
    })
    .boxed()
}

/// Node protection (see `reconcile::protection`): one reconcile per Node, and per Node
/// again whenever its pool's status changes.
fn protection_controller(
    client: &Client,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> BoxFuture<'static, ()> {
    let wc = watcher::Config::default();
    Controller::new(Api::<Node>::all(client.clone()), wc.clone())
        .watches(
            Api::<CachePool>::all(client.clone()),
            wc,
            |pool: CachePool| Some(ObjectRef::<Node>::new(&kube::ResourceExt::name_any(&pool))),
        )
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile::protection::reconcile,
            reconcile::protection::error_policy,
            ctx,
        )
        .for_each(|r| {
            if let Err(error) = r {
                tracing::debug!(%error, "node protection reconcile failed");
            }
            futures::future::ready(())
        })
        .boxed()
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    info!("shutdown signal received");
}

/// Run the operator until a shutdown signal (Ok) or a fatal error.
pub async fn run(config: OperatorConfig) -> Result<(), RunError> {
    if let Some(le) = &config.leader_election {
        le.validate().map_err(RunError::LeaderConfig)?;
    }
    let client = client(&config).await?;
    ensure_crds_installed(&client).await?;

    let metrics = Metrics::shared();
    let (nodes, drive_nodes) = reflect(Api::<Node>::all(client.clone()));
    let (pools, drive_pools) = reflect(Api::<CachePool>::all(client.clone()));
    let (datasets, drive_datasets) = reflect(Api::<DatasetCache>::all(client.clone()));
    let (checkpoints, drive_checkpoints) = reflect(Api::<CheckpointSync>::all(client.clone()));
    let stores = Stores {
        nodes,
        pools,
        datasets,
        checkpoints,
    };
    tokio::spawn(futures::future::join4(
        drive_nodes,
        drive_pools,
        drive_datasets,
        drive_checkpoints,
    ));

    let admin_state = {
        let (d, c) = (stores.datasets.clone(), stores.checkpoints.clone());
        Arc::new(AdminState {
            ready: Default::default(),
            metrics: metrics.clone(),
            before_scrape: Box::new(move |m: &Metrics| {
                m.set_phases("DatasetCache", reconcile::phases(&d));
                m.set_phases("CheckpointSync", reconcile::phases(&c));
            }),
        })
    };
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .map_err(|cause| RunError::Admin {
            addr: config.admin_addr,
            cause,
        })?;
    tokio::spawn(admin::serve(listener, admin_state.clone()));
    info!(addr = %config.admin_addr, "admin server listening");

    for ready in [
        stores.nodes.wait_until_ready().boxed(),
        stores.pools.wait_until_ready().boxed(),
    ] {
        ready.await.map_err(|_| RunError::StoreNeverSynced)?;
    }
    stores
        .datasets
        .wait_until_ready()
        .await
        .map_err(|_| RunError::StoreNeverSynced)?;
    stores
        .checkpoints
        .wait_until_ready()
        .await
        .map_err(|_| RunError::StoreNeverSynced)?;
    admin_state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    info!("caches synced");

    let lock = match config.leader_election.clone() {
        Some(le) => {
            let lock = LeaseLock::new(client.clone(), le.clone());
            info!(lease = %le.lease_name, identity = %le.identity, "waiting for leadership");
            tokio::select! {
                r = lock.acquire() => r?,
                _ = shutdown_signal() => return Ok(()),
            }
            Some(lock)
        }
        None => None,
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        stores,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: config.reporter.clone(),
                instance: None,
            },
        ),
        metrics,
        stale_after: SignedDuration::try_from(config.stale_after)
            .unwrap_or(SignedDuration::from_secs(120)),
        now: Timestamp::now,
        pool_writes: Default::default(),
        grants: config.node_grants.clone(),
        grants_state: Default::default(),
    });
    let (stop_datasets, stopped_datasets) = futures::channel::oneshot::channel::<()>();
    let (stop_checkpoints, stopped_checkpoints) = futures::channel::oneshot::channel::<()>();
    let stop = move || {
        let _ = stop_datasets.send(());
        let _ = stop_checkpoints.send(());
    };
    let (stop_nodes, stopped_nodes) = futures::channel::oneshot::channel::<()>();
    let stop = move || {
        stop();
        let _ = stop_nodes.send(());
    };
    let controllers = futures::future::join3(
        controller::<DatasetCache>(&client, ctx.clone(), stopped_datasets.map(|_| ())),
        controller::<CheckpointSync>(&client, ctx.clone(), stopped_checkpoints.map(|_| ())),
        protection_controller(&client, ctx, stopped_nodes.map(|_| ())),
    );
    let lost = async {
        match &lock {
            Some(lock) => lock.keep_renewing().await,
            None => futures::future::pending().await,
        }
    };
    let mut controllers = std::pin::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {
            info!("controllers stopped");
            Ok(())
        }
        _ = shutdown_signal() => {
            stop();
            controllers.await;
            info!("controllers stopped");
            Ok(())
        }
        e = lost => {
            error!(error = %e, "stopping");
            stop();
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    #[tokio::test]
    async fn missing_crds_name_the_install_command() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.unwrap();
            assert_eq!(
                request.uri().path(),
                "/apis/tidepool.dev/v1alpha1/datasetcaches"
            );
            // What an API server without the CRD answers.
            send.send_response(
                Response::builder()
                    .status(404)
                    .body(Body::from(b"404 page not found\n".to_vec()))
                    .unwrap(),
            );
        });
        let err = ensure_crds_installed(&Client::new(service, "default"))
            .await
            .unwrap_err();
        server.await.unwrap();
        let message = err.to_string();
        assert!(message.contains("datasetcaches.tidepool.dev"), "{message}");
        assert!(message.contains("kubectl apply -f crds/"), "{message}");
    }
}
