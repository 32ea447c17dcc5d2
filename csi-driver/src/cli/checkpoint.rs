//! `tidepool mount --checkpoint`, `tidepool sync`, `tidepool sync status` and
//! `tidepool restore`: the checkpoint half for a user without Kubernetes.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::{LakeArgs, MountArgs, human, open_lake, say};
use crate::checkpoint::commit::CommitRule;
use crate::checkpoint::restore::{StepChoice, restore as restore_step};
use crate::checkpoint::service;
use crate::checkpoint::store::{Store, VolumeConfig, VolumeLayout};
use crate::checkpoint::sync::{SyncConfig, SyncStatus, Syncer};
use crate::checkpoint::tree::{CheckpointTree, LakeSteps, OpenWriters, TreeConfig};
use crate::fs::{Mount, MountStats};
use crate::fuse::{MountOptions, SessionConfig};
use crate::lake::Credentials;
use crate::lake::LakeUrl;
use crate::lake::credentials::EnvLookup;
use crate::mounts::is_mounted;

/// Checkpoint options of `tidepool mount --checkpoint`.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Mount a read-write checkpoint volume instead of a read-only dataset: files live
    /// on local disk under --cache-dir; each committed step (a top-level directory) is
    /// uploaded to LAKE_URL, one blob per file under the same name.
    #[arg(long)]
    pub checkpoint: bool,
    /// This node's name in the lake's records (multi-node jobs: one name per node).
    /// Default: the host name.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// A file whose appearance at a step's root commits the step (repeatable; replaces
    /// the defaults `.metadata` (PyTorch DCP) and `commit_success.txt` (Orbax)).
    #[arg(long = "commit-marker", value_name = "NAME", requires = "checkpoint")]
    pub commit_markers: Vec<String>,
    /// Also commit a step nothing changed in for this long (e.g. `5m`). Off by default:
    /// it cannot tell a finished step from one whose writer died.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION", requires = "checkpoint")]
    pub quiescence: Option<Duration>,
    /// Durable steps kept on local disk; older ones leave it (they stay in the lake,
    /// `tidepool restore` fetches them). Default: all.
    #[arg(long, value_name = "N", requires = "checkpoint")]
    pub keep_local: Option<u32>,
    /// Durable steps kept in the lake; older ones are deleted, manifest first (no reader
    /// trusts a step from the moment its deletion starts). Default: all.
    #[arg(long, value_name = "M", requires = "checkpoint")]
    pub keep_remote: Option<u32>,
    /// Do not upload from this process; a separate `tidepool sync --cache-dir` does.
    #[arg(long, requires = "checkpoint")]
    pub no_sync: bool,
    /// The number of nodes (machines, each with its own volume) that write each step.
    /// A step is durable only once that many nodes have their part of it in the lake,
    /// whether or not their syncs are running: give it for every multi-node job, and 1
    /// on a single machine. Without it a step waits for the nodes that announced it and
    /// a settle window of 10 s, and a node whose sync never ran can be left out.
    #[arg(long, value_name = "N", requires = "checkpoint", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub nodes: Option<u32>,
    /// How long the node's lease in the lake lasts (15 to 60 s): a sync that cannot
    /// renew it for two thirds of this stops uploading (another node may have taken its
    /// name) and starts again.
    #[arg(long, default_value_t = 60, value_name = "SECS", requires = "checkpoint", value_parser = clap::value_parser!(u32).range(15..=60))]
    pub lease_secs: u32,
}

impl CheckpointArgs {
    fn rule(&self) -> anyhow::Result<CommitRule> {
        let mut rule = CommitRule {
            quiescence: self.quiescence,
            ..CommitRule::default()
        };
        if !self.commit_markers.is_empty() {
            for m in &self.commit_markers {
                if m.is_empty() || m.contains('/') || m == "." || m == ".." {
                    bail!(
                        "--commit-marker {m:?} is not a file name; give a name such as .metadata"
                    );
                }
            }
            rule.markers = self.commit_markers.iter().map(OsString::from).collect();
        }
        Ok(rule)
    }
}

fn node_name(given: Option<&str>) -> anyhow::Result<String> {
    let name = match given {
        Some(n) => n.to_owned(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (give --node-name)")?
            .trim()
            .to_owned(),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("node name {name:?} must be letters, digits, '-', '_' or '.'; give --node-name");
    }
    Ok(name)
}

/// `tidepool mount --checkpoint`.
pub async fn mount(args: MountArgs, env: EnvLookup<'_>) -> anyhow::Result<()> {
    let url = LakeUrl::parse(&args.url)?;
    let ck = &args.checkpoint;
    super::check_mountpoint(&args.mountpoint)?;
    if args.prefetch != super::Prefetch::OnDemand || args.refresh != super::Refresh::Pinned {
        bail!(
            "--prefetch and --refresh apply to dataset mounts; a --checkpoint volume holds what the job writes (drop them)"
        );
    }
    let rule = ck.rule()?;
    let node = node_name(ck.node_name.as_deref())?;
    // Every file or directory the kernel knows holds a descriptor here.
    let nofile = crate::cache::raise_nofile_limit();
    tracing::debug!(nofile, "open-file limit");
    let layout = VolumeLayout::for_url(&args.cache.cache_dir, &url.to_string());
    layout
        .create(&VolumeConfig {
            url: url.to_string(),
            node: node.clone(),
            keep_local: ck.keep_local,
            keep_remote: ck.keep_remote,
            nodes: ck.nodes,
            // Not a CheckpointSync's: the agent never removes it.
            owner_uid: None,
        })
        .with_context(|| format!("preparing {}", layout.dir.display()))?;
    let sync_config = SyncConfig {
        lease_secs: ck.lease_secs,
        ..SyncConfig::default()
    };
    // The lake (and the node lease) first: a second uploader is refused before anything
    // is mounted.
    let (stop_sync, stop_rx) = tokio::sync::watch::channel(false);
    let syncer = if ck.no_sync {
        None
    } else {
        let lake = open_lake(&url, &args.lake, env)?;
        let first = Syncer::start(
            lake.clone(),
            layout.clone(),
            &url.prefix,
            sync_config.clone(),
        )
        .await?;
        Some((first, lake))
    };
    let lake_steps = lake_steps(&url, &args, env, syncer.as_ref().map(|(_, l)| l.clone())).await;
    let store = Arc::new(Store::open(layout.clone(), rule)?);
    let tree = Arc::new(
        CheckpointTree::new(
            &layout.tree(),
            TreeConfig {
                lake: lake_steps,
                ..TreeConfig::default()
            },
            store.clone(),
        )
        .with_context(|| format!("opening {}", layout.tree().display()))?,
    );
    store.attach(Arc::downgrade(&tree) as std::sync::Weak<dyn OpenWriters>);
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let options = MountOptions {
        fsname: url.to_string(),
        subtype: "tidepool".into(),
        read_only: false,
        allow_other: args.allow_other.unwrap_or(root),
        default_permissions: true,
    };
    let session = SessionConfig::read_write(args.threads, !args.no_passthrough);
    let mountpoint = args.mountpoint.clone();
    let mount = tokio::task::spawn_blocking(move || {
        Mount::serve(
            tree,
            Arc::new(MountStats::default()),
            &mountpoint,
            &options,
            session,
        )
    })
    .await?
    .with_context(|| {
        format!(
            "mounting at {} (needs /dev/fuse, and root or fusermount3 from the fuse3 package)",
            args.mountpoint.display()
        )
    })?;
    let stop_ticker = Arc::new(AtomicBool::new(false));
    let ticker = store.spawn_ticker(Duration::from_millis(200), stop_ticker.clone());
    let sync_task = syncer.map(|(first, lake)| {
        let source = move |_: &VolumeLayout, _: &VolumeConfig| Ok(lake.clone());
        tokio::spawn(service::keep_syncing(
            Some(first),
            Arc::new(source),
            layout.clone(),
            sync_config,
            Some(store.clone()),
            stop_rx,
        ))
    });
    // Signals are caught from before the "mounted" line: whoever waits for that line
    // may signal at once, and a signal before the handler is in place would kill the
    // process and leave the mount behind.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    say(format_args!(
        "tidepool: checkpoint volume for {url} mounted at {} (node {node}, files in {}); {}; stop with Ctrl-C or umount",
        args.mountpoint.display(),
        layout.tree().display(),
        if ck.no_sync {
            "uploads left to `tidepool sync`"
        } else {
            "committed steps upload from this process"
        }
    ));
    let handle = mount.unmount_handle();
    let mp = mount.mountpoint.clone();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = poll.tick() => match is_mounted(&mp) {
                Ok(true) => {}
                Ok(false) => { tracing::info!("unmounted from outside"); break }
                Err(e) => tracing::warn!(error = %e, "cannot check the mount table"),
            },
        }
    }
    let unmounted = handle.unmount();
    if let Err(e) = &unmounted
        && crate::mounts::is_busy(e)
    {
        handle.detach().context("detaching the busy mount")?;
    }
    stop_ticker.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || ticker.join()).await;
    // Steps whose rule fired while stopping commit now.
    store.tick();
    if let Some(t) = sync_task {
        let _ = stop_sync.send(true);
        if let Err(e) = t.await {
            tracing::warn!(error = %e, "the sync task ended abnormally");
        }
    }
    let _ = tokio::task::spawn_blocking(move || mount.join()).await;
    let st = SyncStatus::read(&layout).ok();
    say(format_args!(
        "tidepool: unmounted {}{}",
        mp.display(),
        match st {
            Some(s) if s.pending_files > 0 => format!(
                "; {} files ({}) committed and not yet durable: run `tidepool sync --cache-dir {}` to finish",
                s.pending_files,
                human(s.pending_bytes),
                args.cache.cache_dir.display()
            ),
            _ => String::new(),
        }
    ));
    Ok(())
}

/// The lake-only steps of the volume (shown read-only, fetched through the pool at
/// --cache-dir). Without them the volume still serves its local steps: a lake that
/// cannot be opened, or a pool another process holds, is said in words and skipped.
async fn lake_steps(
    url: &LakeUrl,
    args: &MountArgs,
    env: EnvLookup<'_>,
    lake: Option<Arc<dyn crate::lake::Lake>>,
) -> Option<LakeSteps> {
    let lake = match lake
        .map(Ok)
        .unwrap_or_else(|| open_lake(url, &args.lake, env))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot open the lake: steps that are only in the lake are not shown in this volume (`tidepool restore` fetches them)");
            return None;
        }
    };
    match crate::cache::CachePool::open(super::cache_config(&args.cache)).await {
        Ok(pool) => Some(LakeSteps::new(
            lake,
            url,
            pool,
            tokio::runtime::Handle::current(),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the cache pool: steps that are only in the lake are not shown in this volume (`tidepool restore` fetches them)");
            None
        }
    }
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SyncArgs {
    #[command(subcommand)]
    pub command: Option<SyncCommand>,
    /// The pool directory the checkpoint volumes are in (as given to `tidepool mount
    /// --checkpoint`); every volume in it is synced.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub lake: LakeArgs,
    /// Files uploaded at the same time per volume.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub parallel: usize,
    /// Upload what is committed and exit (default: keep running, picking up volumes as
    /// they appear in the pool).
    #[arg(long)]
    pub once: bool,
    /// The number of nodes that write each step (as `tidepool mount --checkpoint
    /// --nodes`): recorded in each volume, which must not say otherwise.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub nodes: Option<u32>,
    /// How long the node's lease in the lake lasts (15 to 60 s); see `tidepool mount
    /// --checkpoint --lease-secs`.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u32).range(15..=60))]
    pub lease_secs: u32,
}

#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Latest committed and durable step, pending bytes, upload rate, last error, per
    /// volume in the pool.
    Status {
        #[arg(long, value_name = "DIR")]
        cache_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `tidepool sync` and `tidepool sync status`.
pub async fn sync(args: SyncArgs, env: EnvLookup<'_>) -> anyhow::Result<()> {
    if let Some(SyncCommand::Status { cache_dir, json }) = args.command {
        return status(&cache_dir, json);
    }
    let Some(cache_dir) = args.cache_dir.clone() else {
        bail!("tidepool sync needs --cache-dir DIR (the pool of the checkpoint volumes)");
    };
    let vols = VolumeLayout::all(&cache_dir)?;
    if vols.is_empty() {
        bail!(
            "{} has no checkpoint volume; mount one with `tidepool mount --checkpoint LAKE_URL MOUNTPOINT --cache-dir {}` first",
            cache_dir.display(),
            cache_dir.display()
        );
    }
    let creds = Credentials::resolve(args.lake.sas_token.clone(), args.lake.managed_identity, env)?;
    let sync_cfg = SyncConfig {
        parallel_files: args.parallel.max(1),
        lease_secs: args.lease_secs,
        ..SyncConfig::default()
    };
    // Caught from the start: a stop during the first pass ends it cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut first = Vec::new();
    for vol in vols {
        let mut cfg = vol.read_config()?;
        if let Some(n) = args.nodes {
            match cfg.nodes {
                Some(m) if m != n => bail!(
                    "{}: its steps wait for {m} nodes (set by `tidepool mount --checkpoint --nodes {m}`), and this sync was given --nodes {n}; give both the same number",
                    cfg.url
                ),
                Some(_) => {}
                None => {
                    cfg.nodes = Some(n);
                    vol.create(&cfg)
                        .with_context(|| format!("recording --nodes in {}", vol.dir.display()))?;
                }
            }
        }
        let url = LakeUrl::parse(&cfg.url)?;
        let lake = super::open_lake_with(&url, &creds, &args.lake)?;
        // Started here, for each volume there is now: another sync already running is
        // refused in words, before anything else.
        let mut s = Syncer::start(lake, vol.clone(), &url.prefix, sync_cfg.clone()).await?;
        if !args.once {
            say(format_args!(
                "tidepool: syncing {} (node {})",
                cfg.url, cfg.node
            ));
            first.push((vol, s));
            continue;
        }
        // Passes until nothing is left that this node can finish: steps that only wait
        // for their settle window are waited for; steps waiting for other nodes are
        // reported.
        let mut r = s.pass().await;
        let mut durable = Vec::new();
        while let Ok(report) = &r {
            let Some(wait) = report.waiting.iter().filter_map(|w| w.settles_in_ms).max() else {
                break;
            };
            durable.extend(report.durable.iter().cloned());
            tokio::time::sleep(Duration::from_millis(wait + 100)).await;
            r = s.pass().await;
        }
        let st = s.status(r.as_ref().err().map(|e| e.to_string()), &[]);
        s.stop().await;
        let mut report = r?;
        durable.append(&mut report.durable);
        report.durable = durable;
        say(format_args!(
            "tidepool: {}: uploaded {} files ({}); durable: {}{}",
            cfg.url,
            report.uploaded_files,
            human(report.uploaded_bytes),
            if report.durable.is_empty() {
                "-".to_owned()
            } else {
                report.durable.join(", ")
            },
            match st {
                Ok(st) if st.pending_files > 0 =>
                    format!("; {} files still pending", st.pending_files),
                _ => String::new(),
            }
        ));
        for w in report.waiting {
            say(format_args!(
                "tidepool: {} is not durable yet: {}",
                w.step, w.detail
            ));
        }
    }
    if args.once {
        return Ok(());
    }
    // Every volume kept syncing (started again whenever it stops), and volumes that
    // appear in the pool later picked up.
    let source = {
        let lake_args = args.lake.clone();
        move |_: &VolumeLayout, cfg: &VolumeConfig| {
            let url = LakeUrl::parse(&cfg.url)
                .map_err(|e| service::LakeUnavailable::loud(e.to_string()))?;
            super::open_lake_with(&url, &creds, &lake_args)
                .map_err(|e| service::LakeUnavailable::loud(format!("{e:#}")))
        }
    };
    let pool = tokio::spawn(service::run_pool(
        cache_dir,
        Arc::new(source),
        sync_cfg,
        Duration::from_secs(2),
        first,
        stop_rx,
    ));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    let _ = stop.send(true);
    let _ = pool.await;
    Ok(())
}

fn status(cache_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let vols = VolumeLayout::all(cache_dir)?;
    if vols.is_empty() {
        bail!("{} has no checkpoint volume", cache_dir.display());
    }
    for vol in vols {
        let cfg = vol.read_config()?;
        let st = SyncStatus::read(&vol).ok();
        let mount = crate::checkpoint::store::MountStatus::read(&vol);
        if json {
            let mut v = match &st {
                Some(st) => serde_json::to_value(st)?,
                None => serde_json::json!({}),
            };
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "uncommitted".into(),
                    serde_json::to_value(mount.as_ref().map(|m| &m.uncommitted))?,
                );
            }
            println!("{}", serde_json::to_string(&v)?);
            continue;
        }
        let uncommitted = match &mount {
            Some(m) if !m.uncommitted.is_empty() => m.uncommitted.join(", "),
            Some(_) => "none".into(),
            None => "- (no mount running)".into(),
        };
        let Some(st) = st else {
            println!("{} (node {}): no sync has run yet", cfg.url, cfg.node);
            println!("  uncommitted:      {uncommitted}");
            continue;
        };
        let age = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64)
            .saturating_sub(st.updated_unix_ms);
        println!("{} (node {})", st.destination, st.node);
        let show = |s: &Option<crate::checkpoint::sync::StepInfo>| match s {
            Some(s) => format!("{} ({} files, {})", s.step, s.files, human(s.bytes)),
            None => "-".into(),
        };
        println!("  uncommitted:      {uncommitted}");
        println!("  latest committed: {}", show(&st.latest_committed));
        println!("  latest durable:   {}", show(&st.latest_durable));
        println!(
            "  pending:          {} files, {}",
            st.pending_files,
            human(st.pending_bytes)
        );
        println!("  upload rate:      {}/s", human(st.upload_bytes_per_sec));
        println!(
            "  nodes per step:   {}",
            match st.expected_nodes {
                Some(n) => n.to_string(),
                None => "not set (a step waits for the nodes that announced it, then 10 s; give --nodes)".into(),
            }
        );
        for w in &st.waiting {
            println!("  not durable yet:  {}: {}", w.step, w.detail);
        }
        for r in mount.iter().flat_map(|m| &m.refused) {
            println!("  refused:          {r}");
        }
        println!(
            "  last error:       {}",
            st.last_error.as_deref().unwrap_or("none")
        );
        println!(
            "  updated:          {:.0}s ago by pid {}",
            age as f64 / 1000.0,
            st.pid
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint destination (as given to `tidepool mount --checkpoint`).
    #[arg(value_name = "LAKE_URL")]
    pub url: String,
    /// Where to put the step: its files land in DIR/<step>/.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// `latest`, a step name (`step-1000`) or a step number (`1000`). Only durable
    /// steps (with a manifest) are restored.
    #[arg(long, default_value = "latest", value_name = "latest|STEP")]
    pub step: String,
    #[command(flatten)]
    pub lake: LakeArgs,
    /// Files downloaded at the same time.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub parallel: usize,
}

/// `tidepool restore`.
pub async fn restore(args: RestoreArgs, env: EnvLookup<'_>) -> anyhow::Result<()> {
    let url = LakeUrl::parse(&args.url)?;
    let lake = open_lake(&url, &args.lake, env)?;
    let choice = if args.step == "latest" {
        StepChoice::Latest
    } else {
        StepChoice::Named(args.step.clone())
    };
    let started = std::time::Instant::now();
    let r = restore_step(
        &*lake,
        &url.prefix,
        &url.to_string(),
        &args.dir,
        &choice,
        args.parallel,
    )
    .await?;
    say(format_args!(
        "tidepool: restored {} ({} files, {}, every file checked against its MD5) into {} in {:.1}s",
        r.step,
        r.files,
        human(r.bytes),
        r.dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
