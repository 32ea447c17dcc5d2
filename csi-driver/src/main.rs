//! `tidepool`: parse arguments, set up logging and the runtime, run a library command.
use clap::Parser;
use tidepool_csi::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tidepool_csi::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or a cluster's log store gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if matches!(cli.command, Command::Sync(_))
        || matches!(&cli.command, Command::Mount(a) if a.checkpoint.checkpoint)
    {
        // Uploads allocate and free 8 MiB blocks all the time; glibc's adaptive mmap
        // threshold would soon serve them from the heap and keep the freed memory, so
        // the process's resident size grows past its budget. A fixed threshold keeps
        // every block buffer its own mapping, returned when freed.
        // SAFETY: mallopt(3) only sets a malloc parameter, before any thread starts.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    }
    let env = |k: &str| std::env::var(k).ok();
    let result = rt.block_on(async {
        match cli.command {
            Command::Mount(a) => tidepool_csi::cli::mount(a, &env).await,
            Command::Prewarm(a) => tidepool_csi::cli::prewarm(a, &env).await,
            Command::Sync(a) => tidepool_csi::cli::checkpoint::sync(a, &env).await,
            Command::Restore(a) => tidepool_csi::cli::checkpoint::restore(a, &env).await,
            Command::Agent(a) => tidepool_csi::cli::agent::run(a).await,
            Command::Csi(a) => tidepool_csi::cli::csi::run(a).await,
            Command::Keeper(a) => tidepool_csi::cli::keeper::run(a).await,
        }
    });
    // A FUSE session still serving a detached mount (stopped twice while files were
    // open) must not keep the process alive: exiting closes its connection.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidepool: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
