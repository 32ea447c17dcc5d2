//! `tidepool-operator`: parse flags, build [`OperatorConfig`], call [`run`].
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use tidepool_operator::{
    OperatorConfig, leader::LeaderElectionConfig, reconcile::grants::GrantsConfig, run, uninstall,
};

/// Tidepool operator: DatasetCache/CheckpointSync → PVs, PVCs, CachePool assignments.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Run this instead of the operator (the chart's uninstall hooks).
    #[command(subcommand)]
    command: Option<Command>,
    /// Kubeconfig file (default: in-cluster config, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// A pool whose heartbeat is older than this is not ready (e.g. 2m).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Disable leader election (single replica or local runs).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tidepool-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "tidepool-operator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "tidepool-operator")]
    identity: String,
    /// The node pods' service account, as NAMESPACE/NAME: in each namespace with
    /// DatasetCaches or CheckpointSyncs, the operator grants it `get` of exactly the
    /// Secrets they name and `create` of tokens for exactly the service accounts they
    /// name (a Role and RoleBinding called --node-grant-name), and nothing else.
    /// Unset: the operator grants nothing and the administrator must.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = namespaced_name)]
    node_service_account: Option<(String, String)>,
    /// Name of the Role and RoleBinding of --node-service-account in each namespace
    /// (the chart allows the operator `escalate` and `bind` for this name only).
    #[arg(long, default_value = "tidepool-node-credentials")]
    node_grant_name: String,
    /// Write each namespace's grant again after this long, changed or not, so that a
    /// Role or RoleBinding deleted or edited by hand comes back (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    node_grant_resync: Duration,
}

fn namespaced_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!(
            "{s:?} is not NAMESPACE/NAME (e.g. tidepool-system/tidepool-node)"
        )),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Before `helm uninstall` deletes anything (the chart's pre-delete hook): exits 1,
    /// saying what is in the way, while any DatasetCache or CheckpointSync exists or any
    /// pod uses a volume of the CSI driver; 0 when the uninstall can go on.
    UninstallCheck {
        /// The CSI driver's name.
        #[arg(long, default_value = tidepool_api::volume::CSI_DRIVER)]
        driver: String,
    },
    /// After `helm uninstall` (the chart's post-delete hook): once no node pod is left,
    /// deletes every CachePool (the agents made them), and the leader-election Lease.
    UninstallCleanup {
        /// The release namespace.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Label selector of the node pods, e.g.
        /// `app.kubernetes.io/instance=tidepool,app.kubernetes.io/component=node`.
        #[arg(long)]
        node_pods: String,
        /// The Lease to delete (none: leader election was off).
        #[arg(long)]
        lease: Option<String>,
        /// How long to wait for the node pods to go.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tidepool_operator::runtime::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours for a terminal only: a log file or a cluster's log store gets plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    if let Some(command) = args.command {
        return hook(command, args.kubeconfig).await;
    }
    let config = OperatorConfig {
        kubeconfig: args.kubeconfig,
        admin_addr: args.admin_addr,
        stale_after: args.stale_after,
        // client-go's defaults: a 15 s lease, renewed every 2 s, given up 10 s after
        // the last successful renewal (before the lease can expire).
        leader_election: (!args.no_leader_election).then(|| LeaderElectionConfig {
            namespace: args.lease_namespace,
            lease_name: args.lease_name,
            identity: args.identity.clone(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }),
        reporter: "tidepool-operator".to_owned(),
        node_grants: args
            .node_service_account
            .map(|(namespace, name)| GrantsConfig {
                node_namespace: namespace,
                node_service_account: name,
                name: args.node_grant_name,
                resync: args.node_grant_resync,
            }),
    };
    run(config).await?;
    Ok(())
}

/// The uninstall hooks: one line per outcome on stdout, the reason on failure.
async fn hook(command: Command, kubeconfig: Option<PathBuf>) -> anyhow::Result<()> {
    let config = OperatorConfig {
        kubeconfig,
        admin_addr: "127.0.0.1:0".parse()?,
        stale_after: Duration::ZERO,
        leader_election: None,
        reporter: "tidepool-operator".to_owned(),
        node_grants: None,
    };
    let client = tidepool_operator::runtime::client(&config).await?;
    match command {
        Command::UninstallCheck { driver } => {
            // The hook's RBAC is created just before it (Helm hooks by weight): the
            // API server's authorizer may take a moment to see it.
            let mut tries = 0;
            let in_use = loop {
                match uninstall::check(&client, &driver).await {
                    Err(kube::Error::Api(s)) if s.code == 403 && tries < 15 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    r => break r?,
                }
            };
            if in_use.is_empty() {
                println!(
                    "no DatasetCache, no CheckpointSync and no pod using a {driver} volume: the uninstall can go on"
                );
                Ok(())
            } else {
                anyhow::bail!("{in_use}")
            }
        }
        Command::UninstallCleanup {
            namespace,
            node_pods,
            lease,
            wait,
        } => {
            let done = uninstall::cleanup(
                &client,
                &uninstall::Cleanup {
                    namespace,
                    node_pods,
                    lease,
                    wait,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            println!(
                "deleted {} CachePool(s){}{}",
                done.cache_pools.len(),
                if done.cache_pools.is_empty() {
                    ""
                } else {
                    ": "
                },
                done.cache_pools.join(", ")
            );
            if done.lease {
                println!("deleted the operator's leader-election Lease");
            }
            Ok(())
        }
    }
}
