//! The datasets a node agent serves, one [`Dataset`] per lake location, shared by the
//! volumes that mount it and the `CachePool` assignment that prewarms it.
//!
//! Opening is single-flight per location (a second caller waits for the first's
//! listing), so two volumes of one dataset never build two snapshots in one directory.
//! A dataset with an `Interval` refresh policy is refreshed in the background, and
//! every volume serving it is told to let the kernel drop the replaced snapshot.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidepool_api::dataset_cache::{Prefetch, PrefetchPolicy, Refresh, RefreshPolicy};

use super::AgentError;
use crate::cache::CachePool;
use crate::cache::dataset::{Dataset, PrewarmProgress, include_set};
use crate::fs::SnapshotReleaser;
use crate::lake::azure::{AzureLake, AzureOptions};
use crate::lake::endpoints::EndpointPolicy;
use crate::lake::retry::{RetryConfig, RetryingLake};
use crate::lake::{Credentials, Lake, LakeUrl};

/// How the agent reaches lakes.
#[derive(Clone, Debug, Default)]
pub struct LakeSettings {
    pub azure: AzureOptions,
    pub retry: RetryConfig,
    /// The endpoints this agent may open (`--lake-endpoint`); any, unless set.
    pub endpoints: EndpointPolicy,
}

impl LakeSettings {
    /// Whether the lake at `url` may be opened here: checked before its credentials
    /// are resolved and before any request (see [`EndpointPolicy`]).
    pub fn allowed(&self, url: &LakeUrl) -> Result<(), AgentError> {
        self.endpoints
            .check(url)
            .map_err(|e| AgentError::BadRequest(e.to_string()))
    }

    /// A client of the lake at `url` with `credentials`, retrying as configured;
    /// refused for an endpoint that is not allowed.
    pub fn connect(
        &self,
        url: &LakeUrl,
        credentials: &Credentials,
    ) -> Result<Arc<dyn Lake>, AgentError> {
        self.allowed(url)?;
        let azure = AzureLake::connect(url, credentials, &self.azure)
            .map_err(|e| AgentError::Credentials(format!("connecting to {url}: {e}")))?;
        Ok(Arc::new(RetryingLake::new(
            Arc::new(azure),
            self.retry.clone(),
        )))
    }
}

/// What a dataset is doing on this node, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Listing done: the snapshot is complete (it is served from its first names on).
    pub listed: bool,
    /// An `Eager` prewarm is running.
    pub warming: bool,
    /// The last prewarm finished with every file.
    pub warmed: bool,
    pub bytes_total: u64,
    pub bytes_cached: u64,
    pub objects: u64,
    pub snapshot: Option<u32>,
    /// The last failure, in words.
    pub error: Option<String>,
}

/// One dataset on this node.
pub struct Served {
    pub url: LakeUrl,
    pub dataset: Arc<Dataset>,
    pub progress: Mutex<Progress>,
    /// Volumes mounting it: their kernel connections, told about replaced snapshots.
    releasers: Mutex<HashMap<String, SnapshotReleaser>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    prewarm: Mutex<Option<(Prefetch, Arc<PrewarmProgress>)>>,
    /// The refresh loop running, with its interval: one at most, replaced when the
    /// interval changes and stopped when the policy stops asking for it.
    refresh: Mutex<Option<(Duration, tokio::task::JoinHandle<()>)>>,
    pinned: Arc<std::sync::atomic::AtomicBool>,
    /// The recount of cached bytes (see [`Served::recount_cached`]).
    recount: Mutex<Recount>,
}

/// The background recount of a dataset's cached bytes.
#[derive(Default)]
struct Recount {
    running: bool,
    /// A forced recount was asked while one ran: it runs again when that one ends.
    again: bool,
    /// When the last recount ended and how long it took.
    last: Option<(Instant, Duration)>,
}

/// A periodic recount waits this many times as long as the last one took: the walk is
/// O(objects) (a 10-million-object dataset takes many seconds), so it costs at most a
/// twentieth of one CPU whatever the dataset's size.
const RECOUNT_SPACING: u32 = 20;

/// Whether a periodic (not forced) recount is due at `now` after `last`.
fn recount_due(last: Option<(Instant, Duration)>, now: Instant) -> bool {
    last.is_none_or(|(ended, took)| now.saturating_duration_since(ended) >= took * RECOUNT_SPACING)
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        if let Some((_, t)) = self.refresh.lock().take() {
            t.abort();
        }
    }
}

impl Served {
    fn new(url: LakeUrl, dataset: Dataset) -> Arc<Self> {
        Arc::new(Served {
            url,
            dataset: Arc::new(dataset),
            progress: Mutex::new(Progress::default()),
            releasers: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            prewarm: Mutex::new(None),
            refresh: Mutex::new(None),
            pinned: Arc::default(),
            recount: Mutex::new(Recount::default()),
        })
    }

    /// Keeps the dataset's files out of eviction, or makes them evictable again (in
    /// the background: a pin walks the whole listing).
    pub fn set_pinned(self: &Arc<Self>, pinned: bool) {
        if self.pinned.swap(pinned, Ordering::AcqRel) == pinned {
            return;
        }
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let r = if pinned {
                s.dataset.pin().map(|_| ())
            } else {
                s.dataset.unpin().map(|_| ())
            };
            if let Err(e) = r {
                tracing::warn!(dataset = %s.url, error = %e, "changing the dataset's pin failed");
            }
        });
    }

    /// Records `releaser` (the kernel connection of volume `volume_id`).
    pub fn attach(&self, volume_id: &str, releaser: SnapshotReleaser) {
        self.releasers.lock().insert(volume_id.to_owned(), releaser);
    }

    pub fn detach(&self, volume_id: &str) {
        self.releasers.lock().remove(volume_id);
    }

    /// The counts for status: the snapshot's totals now, and the bytes cached by a
    /// recount in the background (see [`Served::recount_cached`]; `forced` after an
    /// event that changed them: a new snapshot, a finished prewarm). Never blocks on
    /// the walk: a stage of a dataset of any size does not wait for it.
    pub fn refresh_counts(self: &Arc<Self>, forced: bool) {
        let (seq, snap) = self.dataset.current();
        let sum = snap.summary();
        {
            let mut p = self.progress.lock();
            p.listed = snap.complete();
            p.snapshot = Some(seq);
            p.objects = sum.objects;
            p.bytes_total = sum.bytes;
            self.apply_prewarm(&mut p);
        }
        self.recount_cached(forced);
    }

    /// While the current snapshot is being listed: its counts in status as they grow,
    /// a failing listing's error, and once it is complete the final counts (and the pin
    /// extended to the files listed since it was set).
    fn follow_listing(self: &Arc<Self>) {
        let (_, snap) = self.dataset.current();
        if snap.complete() {
            return;
        }
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let done = tokio::select! {
                    r = snap.wait_complete() => Some(r),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => None,
                };
                let Some(s) = weak.upgrade() else { return };
                match done {
                    Some(Ok(())) => {
                        if s.pinned.load(Ordering::Acquire) {
                            let d = s.dataset.clone();
                            let _ = tokio::task::spawn_blocking(move || d.pin()).await;
                        }
                        s.progress.lock().error = None;
                        s.refresh_counts(true);
                        return;
                    }
                    Some(Err(e)) => {
                        // The listing cannot go on (its state is lost): a restage or
                        // an agent restart lists anew.
                        s.progress.lock().error = Some(e.to_string());
                        return;
                    }
                    None => {
                        // A failing attempt is retried by the snapshot's builder; status
                        // says why it waits meanwhile.
                        let listed = snap.listed();
                        let mut p = s.progress.lock();
                        p.objects = listed.summary.objects;
                        p.bytes_total = listed.summary.bytes;
                        p.error = listed.error.map(|e| format!("listing: {e} (retrying)"));
                    }
                }
            }
        });
        self.tasks.lock().push(task);
    }

    /// The prewarm's bytes count as cached as they land (the recount catches up).
    fn apply_prewarm(&self, p: &mut Progress) {
        if let Some((_, prog)) = &*self.prewarm.lock() {
            p.bytes_cached = p.bytes_cached.max(prog.bytes_done.load(Ordering::Relaxed));
        }
    }

    /// Recounts the bytes of the dataset resident in the pool on a blocking thread: a
    /// walk of the snapshot's files against the pool's index, a chunk at a time. One
    /// at a time per dataset; a periodic one (not `forced`) waits [`RECOUNT_SPACING`]
    /// times as long as the last took; a forced one asked during a recount runs again
    /// after it.
    pub fn recount_cached(self: &Arc<Self>, forced: bool) {
        {
            let mut r = self.recount.lock();
            if r.running {
                r.again |= forced;
                return;
            }
            if !forced && !recount_due(r.last, Instant::now()) {
                return;
            }
            r.running = true;
        }
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                let started = Instant::now();
                let counted = s.dataset.cached_bytes();
                let took = started.elapsed();
                match counted {
                    Ok(cached) => {
                        let mut p = s.progress.lock();
                        p.bytes_cached = cached;
                        s.apply_prewarm(&mut p);
                    }
                    Err(e) => {
                        tracing::warn!(dataset = %s.url, error = %e, "cannot count the dataset's cached bytes")
                    }
                }
                if took > Duration::from_secs(1) {
                    tracing::debug!(dataset = %s.url, took = ?took, "counted the dataset's cached bytes");
                }
                let mut r = s.recount.lock();
                r.last = Some((Instant::now(), took));
                if std::mem::take(&mut r.again) {
                    continue;
                }
                r.running = false;
                return;
            }
        });
    }
}

/// Every dataset of the node, by lake location.
#[derive(Default)]
pub struct Registry {
    served: Mutex<HashMap<String, Arc<Served>>>,
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn key(url: &LakeUrl) -> String {
    url.to_string()
}

impl Registry {
    pub fn get(&self, url: &LakeUrl) -> Option<Arc<Served>> {
        self.served.lock().get(&key(url)).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Served>> {
        self.served.lock().values().cloned().collect()
    }

    /// The ids of the datasets held, sorted, each once (see `Dataset::id`).
    pub fn dataset_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .served
            .lock()
            .values()
            .map(|s| s.dataset.id().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The dataset at `url`, opened (listed, or its stored snapshot reused) if needed
    /// with `credentials`. One opening per location at a time.
    pub async fn open(
        &self,
        pool: &CachePool,
        url: &LakeUrl,
        credentials: &Credentials,
        lake: &LakeSettings,
    ) -> Result<Arc<Served>, AgentError> {
        if let Some(s) = self.get(url) {
            return Ok(s);
        }
        let gate = self.opening.lock().entry(key(url)).or_default().clone();
        let _one = gate.lock().await;
        if let Some(s) = self.get(url) {
            return Ok(s);
        }
        let client = lake.connect(url, credentials)?;
        // Served at once: the listing goes on in the background (see Dataset::start).
        let dataset = Dataset::start(pool.clone(), url.clone(), client, true)
            .await
            .map_err(AgentError::from_cache)?;
        let served = Served::new(url.clone(), dataset);
        served.refresh_counts(true);
        served.follow_listing();
        self.served.lock().insert(key(url), served.clone());
        Ok(served)
    }

    /// Forgets a dataset nothing uses any more (its cached data stays, evictable).
    pub fn close(&self, url: &LakeUrl) {
        self.served.lock().remove(&key(url));
    }
}

/// [`apply_policies`] from a thread outside the runtime.
pub fn apply_policies_in(
    rt: &tokio::runtime::Handle,
    served: &Arc<Served>,
    prefetch: &Prefetch,
    refresh: &Refresh,
    pinned: bool,
) {
    let _guard = rt.enter();
    apply_policies(served, prefetch, refresh, pinned);
}

/// Applies the policies of an assignment or a volume to a served dataset: starts the
/// `Eager` prewarm (once per policy) and keeps one refresh loop at the asked interval
/// (replaced when the interval changes, stopped when the policy is `Pinned`).
pub fn apply_policies(served: &Arc<Served>, prefetch: &Prefetch, refresh: &Refresh, pinned: bool) {
    served.set_pinned(pinned);
    if prefetch.policy == PrefetchPolicy::Eager {
        let mut current = served.prewarm.lock();
        let same = current.as_ref().is_some_and(|(p, _)| p == prefetch);
        if !same {
            let progress = Arc::new(PrewarmProgress::default());
            *current = Some((prefetch.clone(), progress.clone()));
            drop(current);
            let s = served.clone();
            let include = prefetch.include.clone();
            let task = tokio::spawn(async move {
                let globs = match include_set(&include) {
                    Ok(g) => g,
                    Err(e) => {
                        s.progress.lock().error = Some(e.to_string());
                        return;
                    }
                };
                s.progress.lock().warming = true;
                let r = s.dataset.prewarm(globs.as_ref(), 16, &progress).await;
                let mut p = s.progress.lock();
                p.warming = false;
                match r {
                    Ok(sum) if sum.failed.is_empty() => {
                        p.warmed = true;
                        p.error = None;
                    }
                    Ok(sum) => {
                        p.error = Some(format!(
                            "{} files could not be fetched, e.g. {}: {}",
                            sum.failed.len(),
                            sum.failed[0].0,
                            sum.failed[0].1
                        ))
                    }
                    Err(e) => p.error = Some(format!("prewarm failed: {e}")),
                }
                drop(p);
                s.refresh_counts(true);
            });
            served.tasks.lock().push(task);
        }
    }
    let interval = match (&refresh.policy, &refresh.interval) {
        (RefreshPolicy::Interval, Some(i)) => humantime::parse_duration(i).ok(),
        _ => None,
    };
    let mut current = served.refresh.lock();
    if current.as_ref().map(|(d, _)| *d) == interval {
        return;
    }
    // Another interval, or none any more: the running loop stops first.
    if let Some((_, old)) = current.take() {
        old.abort();
    }
    let Some(every) = interval else {
        return;
    };
    // The loop holds the dataset weakly: it ends with the last user of the dataset
    // (a strong reference here would keep both alive forever).
    let weak = Arc::downgrade(served);
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(s) = weak.upgrade() else {
                return;
            };
            match s.dataset.refresh().await {
                Ok(Some(old)) => {
                    if s.pinned.load(Ordering::Acquire) {
                        let d = s.dataset.clone();
                        let _ = tokio::task::spawn_blocking(move || d.pin()).await;
                    }
                    let releasers: Vec<SnapshotReleaser> =
                        s.releasers.lock().values().cloned().collect();
                    let _ = tokio::task::spawn_blocking(move || {
                        for r in releasers {
                            r.forget_snapshot(&old);
                        }
                    })
                    .await;
                    s.refresh_counts(true);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(dataset = %s.url, error = %e, "refresh failed; keeping the current snapshot");
                    s.progress.lock().error = Some(format!("refresh failed: {e}"));
                }
            }
        }
    });
    *current = Some((every, task));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::lake::Op;
    use crate::lake::faults::FaultyLake;
    use crate::lake::memory::MemoryLake;

    fn every(interval: &str) -> Refresh {
        Refresh {
            policy: RefreshPolicy::Interval,
            interval: Some(interval.into()),
        }
    }

    #[test]
    fn a_periodic_recount_waits_twenty_times_as_long_as_the_last_took() {
        let t0 = Instant::now();
        assert!(recount_due(None, t0), "never counted: due");
        let last = Some((t0, Duration::from_secs(3)));
        assert!(!recount_due(last, t0 + Duration::from_secs(59)));
        assert!(recount_due(last, t0 + Duration::from_secs(60)));
    }

    /// The counts a stage and the status read: totals at once, bytes cached from a
    /// recount in the background; a periodic recount not due is skipped, a forced one
    /// runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn totals_at_once_and_cached_bytes_from_a_background_recount() {
        let mem = Arc::new(MemoryLake::new());
        mem.insert("d/a", "xx");
        mem.insert("d/b/c", "yyyy");
        let dir = tempfile::tempdir().unwrap();
        let pool = CachePool::open(CacheConfig::new(dir.path(), 1 << 30))
            .await
            .unwrap();
        let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/d").unwrap();
        let dataset = Dataset::open(pool, url.clone(), mem, false, |_| {})
            .await
            .unwrap();
        let s = Served::new(url, dataset);
        s.refresh_counts(true);
        {
            let p = s.progress.lock();
            assert!(p.listed);
            assert_eq!((p.objects, p.bytes_total), (2, 6));
        }
        let settled = || async {
            for _ in 0..500 {
                if !s.recount.lock().running {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the recount never ended");
        };
        settled().await;
        assert_eq!(s.progress.lock().bytes_cached, 0, "nothing read yet");
        // Cache every byte behind the served dataset's back.
        s.dataset
            .prewarm(None, 2, &Default::default())
            .await
            .unwrap();
        // The last recount "took an hour": a periodic one is not due for 20 hours.
        s.recount.lock().last = Some((Instant::now(), Duration::from_secs(3600)));
        s.refresh_counts(false);
        settled().await;
        assert_eq!(
            s.progress.lock().bytes_cached,
            0,
            "a recount not due is skipped"
        );
        s.refresh_counts(true);
        settled().await;
        assert_eq!(s.progress.lock().bytes_cached, 6, "a forced recount runs");
        // Asked while one runs: remembered, not started beside it.
        s.recount.lock().running = true;
        s.refresh_counts(true);
        assert!(s.recount.lock().again, "runs again after the running one");
        s.refresh_counts(false);
        assert!(s.recount.lock().running);
    }

    /// One refresh loop at a time, at the interval last asked; none once the policy is
    /// `Pinned`; none once the dataset is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_refresh_loop_follows_the_policy() {
        let mem = Arc::new(MemoryLake::new());
        mem.insert("d/a", "x");
        let lake = Arc::new(FaultyLake::new(mem));
        let dir = tempfile::tempdir().unwrap();
        let pool = CachePool::open(CacheConfig::new(dir.path(), 1 << 30))
            .await
            .unwrap();
        let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/d").unwrap();
        let dataset = Dataset::open(pool, url.clone(), lake.clone(), false, |_| {})
            .await
            .unwrap();
        let s = Served::new(url, dataset);
        let lists = || lake.calls(Op::List);
        let quiet = |ms| tokio::time::sleep(Duration::from_millis(ms));
        let none = Prefetch::default();

        apply_policies(&s, &none, &every("40ms"), false);
        quiet(400).await;
        assert!(lists() >= 4, "refreshed every 40 ms ({} listings)", lists());
        // A longer interval replaces the loop: the 40 ms one stops.
        apply_policies(&s, &none, &every("1h"), false);
        quiet(100).await;
        let before = lists();
        quiet(400).await;
        assert_eq!(
            lists(),
            before,
            "the old loop stopped with the new interval"
        );
        // The same policy again changes nothing; back to a short one, it refreshes.
        apply_policies(&s, &none, &every("1h"), false);
        apply_policies(&s, &none, &every("40ms"), false);
        quiet(300).await;
        assert!(lists() > before, "the new loop refreshes");
        // Pinned: no loop.
        apply_policies(&s, &none, &Refresh::default(), false);
        quiet(100).await;
        let pinned = lists();
        quiet(400).await;
        assert_eq!(lists(), pinned, "no refresh once pinned");
        // A running loop does not keep the dataset alive.
        apply_policies(&s, &none, &every("40ms"), false);
        let weak = Arc::downgrade(&s);
        drop(s);
        quiet(200).await;
        assert!(
            weak.upgrade().is_none(),
            "the dataset was dropped with its last user"
        );
    }
}
