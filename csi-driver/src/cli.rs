//! The `tidepool` command line: argument types (parsed by the binary) and the commands
//! that run the library's pieces for a user without Kubernetes.
//!
//! Nothing here reads the environment or argv itself: `main.rs` parses [`Cli`] and
//! passes an environment lookup, so every command is testable in-process.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod agent;
pub mod checkpoint;
pub mod csi;
pub mod keeper;

use crate::cache::dataset::{Dataset, PrewarmProgress, include_set};
use crate::cache::{CacheConfig, CachePool};
use crate::fs::{DatasetFs, FsConfig, Mount, MountStats, mount_config};
use crate::lake::azure::{AzureLake, AzureOptions};
use crate::lake::credentials::EnvLookup;
use crate::lake::retry::{RetryConfig, RetryingLake};
use crate::lake::{Credentials, Lake, LakeUrl};
use crate::mounts::is_mounted;

#[derive(Parser, Debug)]
#[command(name = "tidepool", version, about = "GPU-adjacent storage: datasets from Azure Blob on local NVMe, mounted read-only with FUSE", long_about = None)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `tidepool_csi=debug`.
    #[arg(
        long,
        global = true,
        env = "TIDEPOOL_LOG",
        default_value = "warn,tidepool_csi=info"
    )]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a lake prefix read-only at MOUNTPOINT, backed by a local cache (or, with
    /// --checkpoint, a read-write checkpoint volume whose committed steps upload to the
    /// lake prefix). Mounted as soon as the listing's first page is in: the rest is
    /// served as it is listed (a name not listed yet waits for it). Runs in the
    /// foreground until SIGTERM/SIGINT or `umount MOUNTPOINT`, then exits with nothing
    /// left mounted. If files are still open at SIGTERM/SIGINT, the mount is detached
    /// (gone from the mount table at once) and they keep reading until closed; a
    /// second signal stops at once.
    Mount(MountArgs),
    /// Fill the cache with a lake prefix (or the files matching --include) ahead of a job.
    Prewarm(PrewarmArgs),
    /// Upload the committed checkpoint steps of every checkpoint volume in a pool until
    /// they are durable (the node's sidecar; `tidepool mount --checkpoint` runs the same
    /// in-process unless --no-sync). `tidepool sync status` shows where each volume is.
    Sync(checkpoint::SyncArgs),
    /// Download a durable checkpoint step from the lake into DIR/<step>/, every file
    /// verified against the step's manifest.
    Restore(checkpoint::RestoreArgs),
    /// The node agent (one per Kubernetes node): owns the node's cache pool, serves the
    /// volumes the CSI plugin stages, prewarms and reports the node's CachePool.
    Agent(agent::AgentArgs),
    /// The CSI node plugin (one per Kubernetes node, beside the agent): kubelet's
    /// NodeStage/Publish calls mount the node's volumes, served by the agent.
    Csi(csi::CsiArgs),
    /// Holds a copy of every staged volume's FUSE connection, in a pod of its own, so
    /// the volumes outlive a replaced node pod (the plugin feeds it and takes the
    /// connections back).
    Keeper(keeper::KeeperArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LakeArgs {
    /// SAS token (default: $AZURE_STORAGE_SAS_TOKEN). A SAS in the URL's query also works.
    /// Otherwise $AZURE_STORAGE_KEY (account key), then workload identity
    /// ($AZURE_FEDERATED_TOKEN_FILE, $AZURE_CLIENT_ID, $AZURE_TENANT_ID,
    /// $AZURE_AUTHORITY_HOST), else anonymous.
    #[arg(long, value_name = "TOKEN", hide_env_values = true)]
    pub sas_token: Option<String>,
    /// Use the machine's managed identity ($AZURE_CLIENT_ID picks a user-assigned one).
    #[arg(long)]
    pub managed_identity: bool,
    /// Extra trusted CA certificates (PEM) for private endpoints or proxies.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Attempts per lake request (transient errors: throttling, resets, timeouts).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub retries: u32,
    /// Timeout of one lake request attempt.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
    /// Longest a lake request may take, retries included; after that a read fails with EIO.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub deadline: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Cache pool directory on local NVMe (created if missing; shared by every mount).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// Pool capacity: files are evicted (least recently used first) above 90% of it, and
    /// whenever the pool's disk has less than an eighth of it (at most 1 GiB) free, until
    /// twice that is free.
    #[arg(long, default_value = "100GiB", value_parser = parse_size, value_name = "SIZE")]
    pub cache_size: u64,
    /// Files up to this size are fetched whole when opened; a reader that opens them in
    /// listing order (either direction) gets the next ones fetched ahead.
    #[arg(long, default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub small_file_threshold: u64,
    /// Memory for blocks fetched for readers, held until read (pool-wide); a block
    /// dropped from it early is read back from the cache file instead.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub read_buffer: u64,
    /// Write the cache files through the page cache instead of with direct I/O (which
    /// keeps a second copy of the dataset out of RAM; used automatically where the
    /// file system refuses it).
    #[arg(long)]
    pub no_direct_io: bool,
    /// Listing requests in flight while a dataset's listing is taken (its directories
    /// listed at once, small ones together); 1 lists it with one request at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256), value_name = "N")]
    pub list_parallelism: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Prefetch {
    /// Fetch blocks when they are first read.
    OnDemand,
    /// Fetch the whole dataset in the background as soon as it is mounted.
    Eager,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// e.g. https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX, or for Azurite
    /// http://127.0.0.1:10000/devstoreaccount1/CONTAINER/PREFIX
    #[arg(value_name = "LAKE_URL")]
    pub url: String,
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub lake: LakeArgs,
    #[arg(long, value_enum, default_value = "on-demand")]
    pub prefetch: Prefetch,
    /// `pinned` (list once; the mount never changes) or an interval such as `10m`
    /// (list again that often; new opens see the new snapshot, open files keep theirs).
    #[arg(long, default_value = "pinned", value_parser = parse_refresh, value_name = "pinned|INTERVAL")]
    pub refresh: Refresh,
    /// Let other users read the mount (default when running as root).
    #[arg(long)]
    pub allow_other: Option<bool>,
    /// Never use FUSE passthrough, even for fully cached files.
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub threads: usize,
    /// Serve only through /dev/fuse, even where the kernel offers FUSE over io_uring
    /// (Linux 6.14+ once an administrator has run
    /// `echo Y > /sys/module/fuse/parameters/enable_uring`). io_uring answers each
    /// request on the CPU that made it, which roughly halves the cost of opening a
    /// file (many small files).
    #[arg(long)]
    pub no_io_uring: bool,
    #[command(flatten)]
    pub checkpoint: checkpoint::CheckpointArgs,
}

#[derive(Args, Debug)]
pub struct PrewarmArgs {
    #[arg(value_name = "LAKE_URL")]
    pub url: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub lake: LakeArgs,
    /// Only files whose path inside the dataset matches this glob (repeatable), e.g.
    /// `train/**/*.parquet`.
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// Files fetched at the same time.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub parallel: usize,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    Pinned,
    Every(Duration),
}

fn parse_refresh(s: &str) -> Result<Refresh, String> {
    if s.eq_ignore_ascii_case("pinned") {
        return Ok(Refresh::Pinned);
    }
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(Refresh::Every(d)),
        Ok(_) => Err("the refresh interval must be at least 1s".into()),
        Err(e) => Err(format!("expected `pinned` or an interval like `10m` ({e})")),
    }
}

/// Sizes like `500GiB`, `2T`, `64MB`, `1048576`. K/M/G/T and KiB/MiB/GiB/TiB are powers
/// of 1024 (what `df -h` shows); KB/MB/GB/TB are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; try 100GiB or 500G"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use K, M, G, T (or KiB.., KB..)"
            ));
        }
    };
    Ok((n * mult as f64) as u64)
}

/// The lake at `url`, the cache pool and a fresh snapshot of the dataset: complete,
/// or (`early`) as soon as it serves, its listing going on in the background.
async fn open_dataset(
    url: &LakeUrl,
    lake: &LakeArgs,
    cache: &CacheArgs,
    env: EnvLookup<'_>,
    early: bool,
) -> anyhow::Result<Arc<Dataset>> {
    let lake = open_lake(url, lake, env)?;
    let pool = CachePool::open(cache_config(cache))
        .await
        .context("opening the cache pool")?;
    let ds = if early {
        Dataset::start(pool, url.clone(), lake, false).await
    } else {
        Dataset::open(pool, url.clone(), lake, false, |_| {}).await
    };
    Ok(Arc::new(ds.with_context(|| format!("listing {url}"))?))
}

fn open_lake(url: &LakeUrl, args: &LakeArgs, env: EnvLookup<'_>) -> anyhow::Result<Arc<dyn Lake>> {
    let creds = Credentials::resolve(args.sas_token.clone(), args.managed_identity, env)?;
    open_lake_with(url, &creds, args)
}

/// The lake at `url` with `creds`, with the retry settings of `args`.
fn open_lake_with(
    url: &LakeUrl,
    creds: &Credentials,
    args: &LakeArgs,
) -> anyhow::Result<Arc<dyn Lake>> {
    let creds = creds.clone();
    let options = AzureOptions {
        ca_file: args.ca_file.clone(),
        ..AzureOptions::default()
    };
    let azure = AzureLake::connect(url, &creds, &options)
        .with_context(|| format!("connecting to {url}"))?;
    tracing::info!(lake = %url, credentials = creds.kind(), "lake client ready");
    let retry = RetryConfig {
        max_attempts: args.retries.max(1),
        attempt_timeout: args.request_timeout,
        deadline: args.deadline,
        ..RetryConfig::default()
    };
    Ok(Arc::new(RetryingLake::new(Arc::new(azure), retry)))
}

fn cache_config(args: &CacheArgs) -> CacheConfig {
    let mut c = CacheConfig::new(&args.cache_dir, args.cache_size);
    c.small_file_threshold = args.small_file_threshold;
    c.read_buffer = args.read_buffer;
    c.direct_io = !args.no_direct_io;
    c.listing = listing(args.list_parallelism);
    c
}

/// The listing options `--list-parallelism N` stands for.
pub(crate) fn listing(parallelism: u16) -> crate::lake::parallel::ListOptions {
    use crate::lake::parallel::ListOptions;
    match parallelism {
        1 => ListOptions::sequential(),
        n => ListOptions {
            parallelism: n.into(),
            ..Default::default()
        },
    }
}

pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A mount point must be an existing directory with nothing mounted on it yet.
fn check_mountpoint(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    if !mountpoint.is_dir() {
        bail!(
            "mount point {} is not a directory; create it first (mkdir -p {})",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    if is_mounted(&mountpoint.canonicalize()?)? {
        bail!(
            "{} is already a mount point; unmount it first (umount {})",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    Ok(())
}

/// `tidepool mount`.
pub async fn mount(args: MountArgs, env: EnvLookup<'_>) -> anyhow::Result<()> {
    if args.checkpoint.checkpoint {
        return checkpoint::mount(args, env).await;
    }
    let url = LakeUrl::parse(&args.url)?;
    check_mountpoint(&args.mountpoint)?;
    let ds = open_dataset(&url, &args.lake, &args.cache, env, true).await?;
    let pool = ds.pool().clone();
    // SAFETY: geteuid(2), getuid(2) and getgid(2) take no arguments and cannot fail.
    let (euid, uid, gid) = unsafe { (libc::geteuid(), libc::getuid(), libc::getgid()) };
    let root = euid == 0;
    let ttl = match args.refresh {
        Refresh::Pinned => Duration::from_secs(24 * 3600),
        Refresh::Every(d) => d.min(Duration::from_secs(60)),
    };
    let stats = Arc::new(MountStats::default());
    let fs = DatasetFs::new(
        ds.clone(),
        tokio::runtime::Handle::current(),
        FsConfig {
            ttl,
            passthrough: !args.no_passthrough,
            uid,
            gid,
        },
        stats,
    );
    let mut config = mount_config(
        args.allow_other.unwrap_or(root),
        args.threads,
        &url.to_string(),
    );
    config.io_uring = !args.no_io_uring;
    let mountpoint = args.mountpoint.clone();
    let mount = tokio::task::spawn_blocking(move || Mount::spawn(fs, &mountpoint, &config))
        .await?
        .with_context(|| {
            format!(
                "mounting at {} (needs /dev/fuse, and root or fusermount3 from the fuse3 package)",
                args.mountpoint.display()
            )
        })?;
    // Signals are caught from before the "mounted" line: whoever waits for that line
    // may signal at once, and a signal before the handler is in place would kill the
    // process and leave the mount behind.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (seq, snap) = ds.current();
    let sum = snap.summary();
    let mut background = Vec::new();
    // Status lines must not kill the mount if whoever started it closed our stdout.
    if snap.complete() {
        say(format_args!(
            "tidepool: mounted {url} at {} ({} files, {}, snapshot {seq}); stop with Ctrl-C or umount",
            args.mountpoint.display(),
            sum.objects,
            human(sum.bytes)
        ));
    } else {
        say(format_args!(
            "tidepool: mounted {url} at {} (snapshot {seq}, still listing: {} files so far, served as they are listed); stop with Ctrl-C or umount",
            args.mountpoint.display(),
            sum.objects,
        ));
        let snap = snap.clone();
        // Failed attempts are retried (and logged); only the end is said here.
        background.push(tokio::spawn(async move {
            match snap.wait_complete().await {
                Ok(()) => {
                    let sum = snap.summary();
                    say(format_args!(
                        "tidepool: listed {} files, {}",
                        sum.objects,
                        human(sum.bytes)
                    ));
                }
                Err(e) => say(format_args!(
                    "tidepool: {e}; names not listed yet fail with EIO until the next mount"
                )),
            }
        }));
    }
    if args.prefetch == Prefetch::Eager {
        let ds = ds.clone();
        background.push(tokio::spawn(async move {
            let progress = PrewarmProgress::default();
            match ds.prewarm(None, 16, &progress).await {
                Ok(s) => tracing::info!(
                    files = s.files,
                    bytes = s.bytes,
                    failed = s.failed.len(),
                    "eager prefetch done"
                ),
                Err(e) => tracing::warn!(error = %e, "eager prefetch failed"),
            }
        }));
    }
    if let Refresh::Every(every) = args.refresh {
        let ds = ds.clone();
        let releaser = mount.snapshot_releaser();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match ds.refresh().await {
                    Ok(Some(old)) => {
                        let releaser = releaser.clone();
                        // Notifications write to /dev/fuse: off the runtime.
                        let _ = tokio::task::spawn_blocking(move || releaser.forget_snapshot(&old))
                            .await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "refresh failed; keeping the current snapshot")
                    }
                }
            }
        }));
    }
    let handle = mount.unmount_handle();
    let mp = mount.mountpoint.clone();
    let conn = mount.connection().clone();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = poll.tick() => match is_mounted(&mp) {
                // Ended by us (a failed io_uring queue): unmount, and exit with why.
                Ok(true) if conn.aborted().is_some() => break,
                Ok(true) => {}
                Ok(false) => { tracing::info!("unmounted from outside"); break }
                Err(e) => tracing::warn!(error = %e, "cannot check the mount table"),
            },
        }
    }
    for b in background {
        b.abort();
    }
    let detached = match handle.unmount() {
        Ok(()) => false,
        Err(e) if crate::mounts::is_busy(&e) => {
            handle.detach().context("detaching the busy mount")?;
            say(format_args!(
                "tidepool: {} is busy (files open in it): detached it from the mount table; open files keep reading until they are closed, then tidepool exits (signal again to stop now)",
                mp.display()
            ));
            true
        }
        Err(e) => return Err(e).context("unmounting"),
    };
    let mut session = tokio::task::spawn_blocking(move || mount.join());
    let ended = if detached {
        tokio::select! {
            r = &mut session => Some(r),
            _ = int.recv() => None,
            _ = term.recv() => None,
        }
    } else {
        Some(session.await)
    };
    let Some(ended) = ended else {
        pool.flush()?;
        anyhow::bail!(
            "stopped with files still open on the detached mount of {}: their reads fail from now on",
            mp.display()
        );
    };
    ended?.context("stopping the FUSE session")?;
    pool.flush()?;
    say(format_args!("tidepool: unmounted {}", mp.display()));
    Ok(())
}

/// `tidepool prewarm`.
pub async fn prewarm(args: PrewarmArgs, env: EnvLookup<'_>) -> anyhow::Result<()> {
    let url = LakeUrl::parse(&args.url)?;
    let include = include_set(&args.include)?;
    let ds = open_dataset(&url, &args.lake, &args.cache, env, true).await?;
    let pool = ds.pool().clone();
    let progress = Arc::new(PrewarmProgress::default());
    let started = Instant::now();
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}")
                .expect("static template"),
        );
        b
    });
    let ticker = bar.clone().map(|b| {
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                b.set_length(p.bytes_total.load(Ordering::Relaxed));
                b.set_position(p.bytes_done.load(Ordering::Relaxed));
                b.set_message(format!(
                    "{}/{} files",
                    p.files_done.load(Ordering::Relaxed),
                    p.files_total.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let summary = ds
        .prewarm(include.as_ref(), args.parallel, &progress)
        .await?;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    let fetched = pool.fetched();
    println!(
        "tidepool: prewarmed {} files, {} in {:.1}s ({} fetched from the lake, {}/s); cache holds {} of {}",
        summary.files,
        human(summary.bytes),
        secs,
        human(fetched),
        human((fetched as f64 / secs.max(0.001)) as u64),
        human(pool.used()),
        human(pool.config().capacity)
    );
    if !summary.failed.is_empty() {
        for (blob, err) in summary.failed.iter().take(20) {
            eprintln!("  failed: {blob}: {err}");
        }
        bail!(
            "{} files could not be fetched (first errors above); run prewarm again to retry them",
            summary.failed.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100GiB").unwrap(), 100 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("64MB").unwrap(), 64_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("ten gigs").unwrap_err().contains("not a size"));
        assert!(parse_size("10Q").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn refresh_policies() {
        assert_eq!(parse_refresh("pinned").unwrap(), Refresh::Pinned);
        assert_eq!(
            parse_refresh("10m").unwrap(),
            Refresh::Every(Duration::from_secs(600))
        );
        assert!(parse_refresh("0s").is_err());
        assert!(parse_refresh("sometimes").unwrap_err().contains("pinned"));
    }

    #[test]
    fn help_documents_every_flag() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command()
            .find_subcommand_mut("mount")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in [
            "--cache-dir",
            "--cache-size",
            "--prefetch",
            "--refresh",
            "--sas-token",
            "--managed-identity",
            "--deadline",
            "--read-buffer",
            "--no-direct-io",
            "--list-parallelism",
            "--checkpoint",
            "--node-name",
            "--commit-marker",
            "--quiescence",
            "--keep-local",
            "--keep-remote",
            "--no-sync",
        ] {
            assert!(help.contains(flag), "mount --help lacks {flag}");
        }
        for (cmd, flags) in [
            (
                "sync",
                &["--cache-dir", "--once", "--parallel", "--sas-token"][..],
            ),
            ("restore", &["--step", "--parallel", "--sas-token"][..]),
            ("agent", &["--list-parallelism", "--admin-addr"][..]),
        ] {
            let help = Cli::command()
                .find_subcommand_mut(cmd)
                .unwrap()
                .render_long_help()
                .to_string();
            for flag in flags {
                assert!(help.contains(flag), "{cmd} --help lacks {flag}");
            }
        }
    }

    #[test]
    fn memory_and_write_flags_reach_the_pool() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tidepool", "prewarm", "http://127.0.0.1:1/a/c/p"];
            argv.extend_from_slice(&["--cache-dir", "/tmp/x"]);
            argv.extend_from_slice(extra);
            match Cli::parse_from(argv).command {
                Command::Prewarm(a) => cache_config(&a.cache),
                other => panic!("parsed as {other:?}"),
            }
        };
        let default = parse(&[]);
        assert_eq!(default.read_buffer, 256 << 20);
        assert!(default.direct_io);
        assert_eq!(default.listing, Default::default());
        assert_eq!(default.listing.parallelism, 16);
        let set = parse(&[
            "--read-buffer",
            "64MiB",
            "--no-direct-io",
            "--list-parallelism",
            "1",
        ]);
        assert_eq!(set.read_buffer, 64 << 20);
        assert!(!set.direct_io);
        assert_eq!(
            set.listing,
            crate::lake::parallel::ListOptions::sequential()
        );
    }
}
