//! `tidepool-operator`: parse flags, build [`OperatorConfig`], call [`run`].
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use tidepool_operator::{OperatorConfig, leader::LeaderElectionConfig, run};

/// Tidepool operator: DatasetCache/CheckpointSync → PVs, PVCs, CachePool assignments.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Kubeconfig file (default: in-cluster config, else ~/.kube/config).
    #[arg(long)]
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
    };
    run(config).await?;
    Ok(())
}
