//! `tidepool csi`: the CSI node plugin as a process (see `crate::csi`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::say;
use crate::csi::grpc;
use crate::csi::mounter::LinuxMounter;
use crate::csi::node::{NodeCore, Records, SocketLink};

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// Where kubelet reaches the plugin.
    #[arg(
        long,
        default_value = "unix:///csi/csi.sock",
        value_name = "unix:///PATH"
    )]
    pub endpoint: String,
    /// This node's name (as kubelet knows it).
    #[arg(long, env = "NODE_NAME", value_name = "NODE")]
    pub node_id: String,
    /// The node agent's socket.
    #[arg(
        long,
        default_value = "/var/lib/tidepool/agent.sock",
        value_name = "PATH"
    )]
    pub agent_socket: PathBuf,
    /// Where staged volumes are recorded (survives restarts of the plugin).
    #[arg(long, default_value = "/var/lib/tidepool/csi", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The `tidepool keeper` socket: the plugin keeps a copy of every volume's FUSE
    /// connection there and takes them back when it starts, so volumes survive the
    /// replacement of the node pod (the keeper runs in a pod of its own). Without it,
    /// a replaced node pod ends the connections of every volume on the node. Given
    /// more than once, the first that answers is used (e.g. the keeper's socket, then
    /// where a keeper of an earlier release listens until its pod is replaced).
    #[arg(long, value_name = "PATH")]
    pub keeper_socket: Vec<PathBuf>,
}

fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let Some(p) = endpoint.strip_prefix("unix://") else {
        bail!("--endpoint {endpoint:?} must be unix:///path/to/csi.sock");
    };
    if !p.starts_with('/') {
        bail!("--endpoint {endpoint:?}: the socket path must be absolute (unix:///path)");
    }
    Ok(PathBuf::from(p))
}

/// `tidepool csi`.
pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    let sock = socket_path(&args.endpoint)?;
    let records = Records::new(args.state_dir.clone())
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let mut core = NodeCore::new(
        args.node_id.clone(),
        Arc::new(LinuxMounter),
        Arc::new(SocketLink {
            path: args.agent_socket.clone(),
            timeout: Duration::from_secs(120),
        }),
        records,
    );
    for k in &args.keeper_socket {
        core = core.with_keeper(k.clone());
    }
    let core = Arc::new(core);
    // The socket first: kubelet's registration and the liveness probe get answers while
    // a node with many volumes is still taking their connections back.
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&sock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale socket {}", sock.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    say(format_args!(
        "tidepool csi: {} on node {} listening on {} (agent at {})",
        grpc::DRIVER_NAME,
        args.node_id,
        sock.display(),
        args.agent_socket.display()
    ));
    // Then the connections of staged volumes are taken back (from the agent, else the
    // keeper) and dead ones mounted anew; after that, a restarted agent gets the
    // connections again within a second, and volumes whose connection died (the agent
    // came up after us, or lacked credentials) are mounted again every few seconds
    // until they can be.
    let feeder = {
        let core = core.clone();
        tokio::spawn(async move {
            let c = core.clone();
            let repaired = tokio::task::spawn_blocking(move || c.recover())
                .await
                .unwrap_or(0);
            if repaired > 0 {
                tracing::info!(
                    repaired,
                    "volumes mounted again after both plugin and agent had stopped"
                );
            }
            for tick in 1u64.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let c = core.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    c.keep_agent_fed();
                    c.keep_keeper_fed();
                    if tick % 5 == 0 {
                        c.recover();
                    }
                })
                .await;
            }
        })
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    grpc::serve(core, listener, shutdown).await?;
    feeder.abort();
    // Staged volumes stay mounted: the agent keeps serving them, and the next plugin
    // takes their descriptors back from it.
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
