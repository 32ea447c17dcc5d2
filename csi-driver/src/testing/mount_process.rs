//! A `tidepool mount` child process for tests that drive the real binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::azurite::ACCOUNT_KEY;
use super::within;

/// A running `tidepool mount`, killed on drop if still running (a leaked mount process
/// would hold the test's output pipe open and hang the run).
pub struct MountProcess {
    child: Child,
}

impl MountProcess {
    /// Starts `bin mount URL MNT --cache-dir CACHE EXTRA...` with Azurite's account key
    /// and returns once it printed its "mounted" line. Panics with what it printed
    /// otherwise (test support).
    pub fn start(bin: &Path, url: &str, mnt: &Path, cache: &Path, extra: &[&str]) -> Self {
        Self::start_logged(bin, url, mnt, cache, extra, None)
    }

    /// [`Self::start`] with the process's log (stderr) written to `log`.
    pub fn start_logged(
        bin: &Path,
        url: &str,
        mnt: &Path,
        cache: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["mount", url])
            .arg(mnt)
            .arg("--cache-dir")
            .arg(cache)
            .args(extra)
            .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
            .stdout(Stdio::piped());
        if let Some(log) = log {
            let f = std::fs::File::create(log)
                .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
            cmd.stderr(f);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
        let mut running = MountProcess { child };
        if !(read.is_ok() && line.contains("mounted")) {
            let status = running.exit_within(Duration::from_secs(2));
            let said = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(20).collect();
            panic!(
                "tidepool mount did not come up ({status:?}): {line:?}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        running
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) sends a signal to our own child; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, if the process ends within `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        within(limit, || self.child.try_wait().ok().flatten())
    }

    /// Waits for the process to end.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("waiting for tidepool mount")
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
