//! The syncs kept running: one supervised [`Syncer`] per checkpoint volume of a pool,
//! for as long as the host process lives. `tidepool mount --checkpoint` keeps its one
//! volume's sync with [`keep_syncing`]; `tidepool sync --cache-dir` and the node agent
//! keep every volume of their pool with [`run_pool`], picking up new volumes as they
//! appear. A volume's sync is a volume's business, not a mount's: the agent keeps
//! syncing a volume after it is unstaged and after the agent restarts, with the
//! credentials its [`LakeSource`] finds for it then, so nothing committed waits for a
//! pod to mount the volume again.
//!
//! A sync that stops (a lost lease, a lake that refused it) or cannot start (no
//! credentials yet, a lake that does not answer) is started again with backoff, each
//! time with the lake asked of the source anew (rotated credentials are picked up). Why
//! it cannot run is written to the volume's status, unless there is nothing to say
//! (nothing pending on a volume nobody uses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::store::{Store, VolumeConfig, VolumeLayout};
use super::sync::{SyncConfig, SyncStatus, Syncer, record_error};
use crate::lake::{Lake, LakeUrl};

/// Why a volume's lake cannot be opened right now.
#[derive(Clone, Debug)]
pub struct LakeUnavailable {
    pub message: String,
    /// Nothing to report: the volume has nothing left to upload, and the reason is that
    /// nobody uses it (its credentials are unknown until it is staged again).
    pub quiet: bool,
}

impl LakeUnavailable {
    /// A reason worth saying.
    pub fn loud(message: impl Into<String>) -> Self {
        LakeUnavailable {
            message: message.into(),
            quiet: false,
        }
    }

    /// A reason that is only worth saying if the volume has uploads left.
    pub fn unless_pending(vol: &VolumeLayout, message: impl Into<String>) -> Self {
        let pending = SyncStatus::read(vol).map_or(true, |s| s.pending_files > 0);
        LakeUnavailable {
            message: message.into(),
            quiet: !pending,
        }
    }
}

/// Where a volume's lake, with its credentials, comes from; asked each time the
/// volume's sync (re)starts.
pub trait LakeSource: Send + Sync + 'static {
    fn lake(
        &self,
        vol: &VolumeLayout,
        cfg: &VolumeConfig,
    ) -> Result<Arc<dyn Lake>, LakeUnavailable>;
}

impl<F> LakeSource for F
where
    F: Fn(&VolumeLayout, &VolumeConfig) -> Result<Arc<dyn Lake>, LakeUnavailable>
        + Send
        + Sync
        + 'static,
{
    fn lake(
        &self,
        vol: &VolumeLayout,
        cfg: &VolumeConfig,
    ) -> Result<Arc<dyn Lake>, LakeUnavailable> {
        self(vol, cfg)
    }
}

/// Runs volume `layout`'s sync until `stop`, starting it again with backoff whenever it
/// stops or cannot start. `first` is a sync already started (the mount starts its own
/// first, so that a second uploader is refused before anything is mounted); `wake`
/// wakes it at each commit of an in-process store.
pub async fn keep_syncing(
    first: Option<Syncer>,
    source: Arc<dyn LakeSource>,
    layout: VolumeLayout,
    config: SyncConfig,
    wake: Option<Arc<Store>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = first;
    let mut backoff = Duration::from_secs(1);
    loop {
        if next.is_none() && !layout.config_path().exists() {
            // The volume was removed from the pool (its CheckpointSync deleted).
            tracing::info!(volume = %layout.dir.display(), "the volume is gone; its sync ends");
            return;
        }
        // A volume waiting quietly (for a pod to mount it again) is looked at often.
        let mut cap = Duration::from_secs(60);
        let syncer = match next.take() {
            Some(s) => Some(s),
            None => match start(&*source, &layout, &config).await {
                Ok(s) => Some(s),
                Err(e) => {
                    if e.quiet {
                        cap = Duration::from_secs(5);
                    } else {
                        tracing::warn!(volume = %layout.dir.display(), error = %e.message, "the volume's sync cannot start; trying again");
                        record_error(&layout, &e.message);
                    }
                    None
                }
            },
        };
        if let Some(s) = syncer {
            backoff = Duration::from_secs(1);
            match s.run(wake.clone(), stop.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(volume = %layout.dir.display(), error = %e, "the sync stopped; starting it again");
                }
            }
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff.min(cap)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

async fn start(
    source: &dyn LakeSource,
    layout: &VolumeLayout,
    config: &SyncConfig,
) -> Result<Syncer, LakeUnavailable> {
    let cfg = layout.read_config().map_err(|e| {
        LakeUnavailable::loud(format!("reading {}: {e}", layout.config_path().display()))
    })?;
    let url = LakeUrl::parse(&cfg.url).map_err(|e| LakeUnavailable::loud(e.to_string()))?;
    let lake = source.lake(layout, &cfg)?;
    Syncer::start(lake, layout.clone(), &url.prefix, config.clone())
        .await
        .map_err(|e| LakeUnavailable::loud(e.to_string()))
}

/// Keeps a sync running for every checkpoint volume of the pool at `cache_dir` until
/// `stop`; volumes that appear later are picked up within `scan`. `started` are syncs
/// the caller already started (they are kept, not started twice).
pub async fn run_pool(
    cache_dir: PathBuf,
    source: Arc<dyn LakeSource>,
    config: SyncConfig,
    scan: Duration,
    started: Vec<(VolumeLayout, Syncer)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut running: HashMap<PathBuf, tokio::task::JoinHandle<()>> = HashMap::new();
    for (vol, s) in started {
        running.insert(
            vol.dir.clone(),
            tokio::spawn(keep_syncing(
                Some(s),
                source.clone(),
                vol,
                config.clone(),
                None,
                stop.clone(),
            )),
        );
    }
    loop {
        for vol in volumes(&cache_dir) {
            if running.get(&vol.dir).is_some_and(|t| !t.is_finished()) {
                continue;
            }
            tracing::info!(volume = %vol.dir.display(), "syncing checkpoint volume");
            running.insert(
                vol.dir.clone(),
                tokio::spawn(keep_syncing(
                    None,
                    source.clone(),
                    vol,
                    config.clone(),
                    None,
                    stop.clone(),
                )),
            );
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(scan) => {}
        }
        if *stop.borrow() {
            break;
        }
    }
    for (_, t) in running {
        let _ = t.await;
    }
}

fn volumes(cache_dir: &Path) -> Vec<VolumeLayout> {
    match VolumeLayout::all(cache_dir) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, dir = %cache_dir.display(), "cannot list the checkpoint volumes");
            Vec::new()
        }
    }
}
