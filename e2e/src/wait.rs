//! Bounded polling. Every wait in the suite goes through [`until`]: a probe says done,
//! still waiting (and what it sees), or failed for good; a timeout reports the last thing
//! seen, so a failure says where the cluster got stuck.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a probe runs. Status in this system moves at the agents' heartbeat (10 s by
/// default) and the operator's reconciles; two seconds is fine-grained enough for both.
pub const POLL: Duration = Duration::from_secs(2);

/// Time for an object to reach a steady state (Ready, durable, rolled out).
pub const SETTLE: Duration = Duration::from_secs(300);
/// Time for a Job to finish (reads and writes of tens of MiB through Azurite in-cluster).
pub const JOB: Duration = Duration::from_secs(600);

/// One look at the cluster.
pub enum Check<T> {
    /// The condition holds; the value is what the caller wanted.
    Done(T),
    /// Not yet; the text says what was seen.
    Waiting(String),
    /// It will not hold any more (a failed Job, a `Failed` phase): stop waiting.
    Failed(String),
}

/// Polls `probe` until it is done or failed, or `timeout` passes. The error says what
/// was awaited, for how long, and what was seen last.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check<T>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Check::Done(v) => return Ok(v),
            Check::Failed(why) => {
                return Err(format!(
                    "{what}: failed after {:.0?}: {why}",
                    start.elapsed()
                ));
            }
            Check::Waiting(seen) if start.elapsed() >= timeout => {
                return Err(format!(
                    "{what}: still not done after {timeout:?}; last seen: {seen}"
                ));
            }
            Check::Waiting(_) => tokio::time::sleep(POLL).await,
        }
    }
}
