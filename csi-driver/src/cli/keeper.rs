//! `tidepool keeper`: holds the node's FUSE connections in a pod of its own (see
//! `crate::keeper`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::say;
use crate::keeper::{Keeper, KeeperClient, KeeperRequest, KeeperResponse};

#[derive(Args, Debug)]
pub struct KeeperArgs {
    /// Where the CSI plugin reaches the keeper (mode 0600, in a directory made 0700:
    /// give the keeper a directory of its own; give the plugin the same path with
    /// `tidepool csi --keeper-socket`). Only root may connect.
    #[arg(
        long,
        default_value = "/var/lib/tidepool/keeper/keeper.sock",
        value_name = "PATH"
    )]
    pub socket: PathBuf,
    /// Ask the running keeper at --socket what it holds and exit (0 if it answered):
    /// the liveness probe of its pod.
    #[arg(long)]
    pub check: bool,
}

/// `tidepool keeper`.
pub async fn run(args: KeeperArgs) -> anyhow::Result<()> {
    if args.check {
        let client = KeeperClient::connect(&args.socket, Duration::from_secs(5))?;
        return match client.call(&KeeperRequest::Held, &[])? {
            (KeeperResponse::Held { volumes }, _) => {
                say(format_args!(
                    "tidepool keeper at {}: holding {} volume connection(s)",
                    args.socket.display(),
                    volumes.len()
                ));
                Ok(())
            }
            (other, _) => bail!("the keeper at {} answered {other:?}", args.socket.display()),
        };
    }
    let sock = args.socket.clone();
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Root only: the socket hands out every volume's connection.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} 0700", dir.display()))?;
    }
    // A keeper still answering there holds connections: starting a second one would
    // make the plugin feed two. A dead one's socket file is only a file.
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "a keeper is already running at {}; stop it first (its connections stay held while it runs)",
            sock.display()
        );
    }
    match std::fs::remove_file(&sock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale socket {}", sock.display()));
        }
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    say(format_args!(
        "tidepool keeper: listening on {}",
        sock.display()
    ));
    let keeper = Arc::new(Keeper::default());
    let server = std::thread::Builder::new()
        .name("keeper".into())
        .spawn(move || crate::keeper::serve(keeper, listener))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    // Exiting closes what we hold; the plugin and agent hold their own copies.
    drop(server);
    Ok(())
}
