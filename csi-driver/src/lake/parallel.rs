//! A listing of a whole prefix, in name order, taken by many requests at once.
//!
//! One flat listing is one request at a time: 5,000 names a round trip, so a far
//! region's latency sets the pace (Azure answers a page in tens to hundreds of
//! milliseconds). [`ParallelLister`] splits the prefix along its directories: the top
//! levels are read with one-level listings ([`Lake::list_level`], delimiter `/`) down to
//! [`ListOptions::split_depth`], and each directory found there is listed flat on its
//! own, up to [`ListOptions::parallelism`] of them at once. Pages come out in exactly
//! the order of the one flat listing of the prefix: a directory's names are contiguous
//! in name order and sort where its prefix sorts among the level's objects, so putting
//! each directory's listing in its prefix's place gives the flat order back.
//!
//! Small directories are listed together: one request per directory would cost more
//! round trips than the flat listing when directories hold fewer names than a page.
//! Consecutive entries of a level that share a string prefix no other entry has
//! (`dir001` for `dir00100/` to `dir00199/`) are listed by one flat listing of that
//! prefix, which gives exactly their names, in order. How many go together follows the
//! names per directory seen so far, aiming at up to four pages a piece.
//!
//! Memory stays bounded: at most `parallelism` pieces are in flight, each with at most
//! one page waiting and one arriving, plus at most two pages of entries per level
//! being split.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};

use super::{Lake, LakeResult, Lister, ObjectMeta};

/// How a [`ParallelLister`] splits its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListOptions {
    /// Directories listed at once. 1 with `split_depth` 0 is one flat listing.
    pub parallelism: usize,
    /// Levels read with one-level listings before directories are listed flat: 0
    /// lists the prefix flat; 2 (the default) splits at the second level, so
    /// `train/<class>/...` lists every class on its own. Only the first
    /// `parallelism` directories of a level are split further; a level with more
    /// has parallelism enough.
    pub split_depth: usize,
    /// Names asked for per request.
    pub page_size: u32,
}

impl Default for ListOptions {
    fn default() -> Self {
        ListOptions {
            // 16 requests at once: enough to hide a far region's round trip behind
            // the others; Azure allows thousands per second per account.
            parallelism: 16,
            split_depth: 2,
            page_size: Lister::DEFAULT_PAGE,
        }
    }
}

impl ListOptions {
    /// One flat listing, one request at a time.
    pub fn sequential() -> Self {
        ListOptions {
            parallelism: 1,
            split_depth: 0,
            ..Default::default()
        }
    }
}

/// A piece of the listing, in order: objects ready to give out, or a prefix to list flat
/// that covers this many entries (directories and objects) of its level.
enum Unit {
    Objects(Vec<ObjectMeta>),
    Prefix(String, u64),
}

/// A piece being listed: pages that arrived and are not yet given out.
struct Live<'a> {
    pages: Option<BoxStream<'a, LakeResult<Vec<ObjectMeta>>>>,
    ready: VecDeque<Vec<ObjectMeta>>,
    /// Level entries the piece covers, and the names it gave so far.
    entries: u64,
    names: u64,
}

/// Names per level entry over the pieces finished so far: how many entries to group.
#[derive(Debug, Default)]
struct Density {
    entries: AtomicU64,
    names: AtomicU64,
}

impl Density {
    /// Entries to list together so that a piece holds about `target` names (1 until a
    /// piece has finished).
    fn group(&self, target: u64) -> usize {
        let (e, n) = (
            self.entries.load(Ordering::Relaxed),
            self.names.load(Ordering::Relaxed),
        );
        if e == 0 {
            return 1;
        }
        (target * e / n.max(1)).clamp(1, 4096) as usize
    }
}

/// A listing of a whole prefix in name order, page by page, with up to
/// [`ListOptions::parallelism`] requests at once (see the module docs).
pub struct ParallelLister<'a> {
    lake: &'a dyn Lake,
    opts: ListOptions,
    units: BoxStream<'a, LakeResult<Unit>>,
    units_done: bool,
    window: VecDeque<Live<'a>>,
    density: Arc<Density>,
    /// Pieces wholly at or before this name are not listed (see [`ParallelLister::after`]).
    after: Option<String>,
}

/// Pages a live directory may hold ahead of the one given out.
const AHEAD: usize = 1;

impl<'a> ParallelLister<'a> {
    pub fn new(lake: &'a dyn Lake, prefix: &str, opts: ListOptions) -> Self {
        let opts = ListOptions {
            parallelism: opts.parallelism.max(1),
            page_size: opts.page_size.max(1),
            ..opts
        };
        let density = Arc::new(Density::default());
        let split = Split {
            lake,
            opts,
            stack: vec![],
            root: Some(prefix.to_owned()),
            density: density.clone(),
        };
        ParallelLister {
            lake,
            opts,
            units: futures::stream::unfold(split, |mut s| async move {
                let next = s.next_unit().await.transpose()?;
                Some((next, s))
            })
            .boxed(),
            units_done: false,
            window: VecDeque::new(),
            density,
            after: None,
        }
    }

    /// Skips the directories whose every name sorts at or before `name` (a listing
    /// resumed after a restart). Pages may still hold names at or before it (the piece
    /// that holds `name`, and objects of the split levels): the caller drops those.
    pub fn after(mut self, name: &str) -> Self {
        self.after = Some(name.to_owned());
        self
    }

    /// The next page in name order, or `None` at the end. An error ends the listing.
    /// Cancel-safe: a wait dropped before a page came loses nothing (the state is here).
    pub async fn next_page(&mut self) -> LakeResult<Option<Vec<ObjectMeta>>> {
        std::future::poll_fn(|cx| self.poll_page(cx)).await
    }

    fn poll_page(&mut self, cx: &mut Context<'_>) -> Poll<LakeResult<Option<Vec<ObjectMeta>>>> {
        loop {
            // Start pieces in order while the window has room.
            while !self.units_done && self.window.len() < self.opts.parallelism {
                match self.units.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(Unit::Objects(v)))) => self.window.push_back(Live {
                        pages: None,
                        ready: VecDeque::from([v]),
                        entries: 0,
                        names: 0,
                    }),
                    Poll::Ready(Some(Ok(Unit::Prefix(p, _))))
                        if self
                            .after
                            .as_deref()
                            .is_some_and(|a| p.as_str() < a && !a.starts_with(&p)) =>
                    {
                        // Every name under `p` sorts before `after`: listed already.
                    }
                    Poll::Ready(Some(Ok(Unit::Prefix(p, entries)))) => {
                        let lister = Lister::new(self.lake, &p).page_size(self.opts.page_size);
                        let pages = futures::stream::unfold(lister, |mut l| async move {
                            let page = l.next_page().await.transpose()?;
                            Some((page, l))
                        });
                        self.window.push_back(Live {
                            pages: Some(pages.boxed()),
                            ready: VecDeque::new(),
                            entries,
                            names: 0,
                        });
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => self.units_done = true,
                    Poll::Pending => break,
                }
            }
            // Drive every piece that has room for a page.
            for live in &mut self.window {
                while live.ready.len() <= AHEAD {
                    let Some(pages) = live.pages.as_mut() else {
                        break;
                    };
                    match Pin::new(pages).poll_next(cx) {
                        Poll::Ready(Some(Ok(page))) => {
                            live.names += page.len() as u64;
                            if !page.is_empty() {
                                live.ready.push_back(page);
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => {
                            live.pages = None;
                            let d = &self.density;
                            d.entries.fetch_add(live.entries, Ordering::Relaxed);
                            d.names.fetch_add(live.names, Ordering::Relaxed);
                        }
                        Poll::Pending => break,
                    }
                }
            }
            // Give out the first piece's next page, in order.
            let Some(front) = self.window.front_mut() else {
                return if self.units_done {
                    Poll::Ready(Ok(None))
                } else {
                    Poll::Pending
                };
            };
            if let Some(page) = front.ready.pop_front() {
                return Poll::Ready(Ok(Some(page)));
            }
            if front.pages.is_some() {
                return Poll::Pending;
            }
            self.window.pop_front();
        }
    }
}

/// One level being split: its entries not yet given out.
struct Level {
    prefix: String,
    depth: usize,
    marker: Option<String>,
    done: bool,
    entries: VecDeque<Entry>,
    /// The greatest name or prefix taken from this level so far: a lake that repeats
    /// a prefix on the next page does not get it listed twice.
    last: Option<String>,
    /// The last entry given out (a group's prefix must not cover it).
    given: Option<String>,
    split: usize,
}

enum Entry {
    Object(ObjectMeta),
    Dir(String),
}

impl Entry {
    fn key(&self) -> &str {
        match self {
            Entry::Object(o) => &o.name,
            Entry::Dir(p) => p,
        }
    }
}

/// Walks the top levels depth first and yields the listing's pieces in name order.
struct Split<'a> {
    lake: &'a dyn Lake,
    opts: ListOptions,
    stack: Vec<Level>,
    root: Option<String>,
    density: Arc<Density>,
}

impl Split<'_> {
    async fn next_unit(&mut self) -> LakeResult<Option<Unit>> {
        if let Some(root) = self.root.take() {
            if self.opts.split_depth == 0 {
                return Ok(Some(Unit::Prefix(root, 1)));
            }
            self.stack.push(Level::new(root, 0));
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            if top.entries.is_empty() {
                if top.done {
                    self.stack.pop();
                    continue;
                }
                top.fetch(self.lake, self.opts.page_size).await?;
                continue;
            }
            if let Some(Entry::Dir(p)) = top.entries.front() {
                let depth = top.depth + 1;
                if depth < self.opts.split_depth && top.split < self.opts.parallelism {
                    top.split += 1;
                    let p = p.clone();
                    top.given = Some(p.clone());
                    top.entries.pop_front();
                    self.stack.push(Level::new(p, depth));
                    continue;
                }
                // Up to four pages a piece: names group by digits, so a group
                // of ten times too few is often the next size down.
                let most = self.density.group(4 * u64::from(self.opts.page_size));
                if top.entries.len() <= most && !top.done {
                    // Look further, so a group is not cut at the page's edge.
                    top.fetch(self.lake, self.opts.page_size).await?;
                    continue;
                }
                let (q, n) = top.group(most);
                top.given = top
                    .entries
                    .drain(..n)
                    .next_back()
                    .map(|e| e.key().to_owned());
                return Ok(Some(Unit::Prefix(q, n as u64)));
            }
            let mut run = Vec::new();
            while run.len() < self.opts.page_size as usize
                && let Some(Entry::Object(_)) = top.entries.front()
            {
                let Some(Entry::Object(o)) = top.entries.pop_front() else {
                    unreachable!()
                };
                run.push(o);
            }
            top.given = run.last().map(|o| o.name.clone());
            return Ok(Some(Unit::Objects(run)));
        }
    }
}

/// The longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix<'s>(a: &'s str, b: &str) -> &'s str {
    let mut end = 0;
    for ((i, x), y) in a.char_indices().zip(b.chars()) {
        if x != y {
            break;
        }
        end = i + x.len_utf8();
    }
    &a[..end]
}

impl Level {
    /// Reads the level's next page onto the end of its entries.
    async fn fetch(&mut self, lake: &dyn Lake, page_size: u32) -> LakeResult<()> {
        let page = lake
            .list_level(&self.prefix, self.marker.as_deref(), page_size)
            .await?;
        self.marker = page.next;
        self.done = self.marker.is_none();
        let mut objects = page.objects.into_iter().map(Entry::Object).peekable();
        let mut dirs = page.prefixes.into_iter().map(Entry::Dir).peekable();
        // Objects and prefixes each come in name order: merge them.
        loop {
            let take_object = match (objects.peek(), dirs.peek()) {
                (Some(o), Some(d)) => o.key() < d.key(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let e = if take_object {
                objects.next()
            } else {
                dirs.next()
            };
            let e = e.expect("peeked");
            if self.last.as_deref().is_some_and(|l| e.key() <= l) {
                continue;
            }
            self.last = Some(e.key().to_owned());
            self.entries.push_back(e);
        }
        Ok(())
    }

    /// The first entries (the first a directory), at most `most` of them, that one
    /// flat listing can cover: the widest prefix longer than the level's whose names
    /// are exactly those entries' (no entry given before, and one not covered after it
    /// or the level's end, known). Returns the prefix and how many entries it covers;
    /// at worst the directory alone.
    fn group(&self, most: usize) -> (String, usize) {
        let first = self.entries[0].key();
        let mut best = (first, 1);
        let n = self.entries.len();
        let mut k = 1;
        while k < n {
            let q = common_prefix(first, self.entries[k].key());
            if q.len() <= self.prefix.len()
                || self.given.as_deref().is_some_and(|g| g.starts_with(q))
            {
                break;
            }
            let mut j = k;
            while j + 1 < n && self.entries[j + 1].key().starts_with(q) {
                j += 1;
            }
            if j + 1 > most || (j + 1 == n && !self.done) {
                break;
            }
            best = (q, j + 1);
            k = j + 1;
        }
        (best.0.to_owned(), best.1)
    }

    fn new(prefix: String, depth: usize) -> Self {
        Level {
            prefix,
            depth,
            marker: None,
            done: false,
            entries: VecDeque::new(),
            last: None,
            given: None,
            split: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::memory::MemoryLake;
    use crate::lake::{LakeError, PutOptions};
    use bytes::Bytes;

    async fn all(lake: &dyn Lake, prefix: &str, opts: ListOptions) -> LakeResult<Vec<String>> {
        let mut l = ParallelLister::new(lake, prefix, opts);
        let mut names = Vec::new();
        while let Some(page) = l.next_page().await? {
            assert!(page.len() <= opts.page_size as usize);
            names.extend(page.into_iter().map(|o| o.name));
        }
        Ok(names)
    }

    async fn flat(lake: &dyn Lake, prefix: &str) -> Vec<String> {
        all(lake, prefix, ListOptions::sequential()).await.unwrap()
    }

    /// Names that sort around `/` in every way: a file beside a directory of the same
    /// name, names with `.`, `0` and `-` right after a shared stem (below and above
    /// `/`), directory markers, empty segments, deep trees, non-ASCII.
    fn awkward_names() -> Vec<String> {
        let mut v: Vec<String> = [
            "ds/a",
            "ds/a/b",
            "ds/a/b/c",
            "ds/a.txt",
            "ds/a-1/x",
            "ds/a0",
            "ds/a/",
            "ds/a//z",
            "ds/b/",
            "ds/b/1",
            "ds/ä/ö/ü",
            "ds/z",
            "ds/",
            "ds",
            "dsx/no",
            "ds/zz/y/x/w/v",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Directories whose names prefix each other's (`n1/`, `n10/`, `n100/`) and
        // objects beside them (`n2`, `n20.txt`), for grouping to get wrong.
        for i in 0..300 {
            for f in 0..(i % 4) {
                v.push(format!("ds/n{i}/f{f}"));
            }
            if i % 10 == 2 {
                v.push(format!("ds/n{i}"));
                v.push(format!("ds/n{i}0.txt"));
            }
        }
        for d in 0..7 {
            for s in 0..5 {
                for f in 0..(d * 3 % 7) {
                    v.push(format!("ds/d{d}/s{s}/f{f}"));
                }
                v.push(format!("ds/d{d}/s{s}.idx"));
            }
        }
        v
    }

    async fn lake_with(names: &[String]) -> MemoryLake {
        let lake = MemoryLake::new();
        for n in names {
            lake.put(n, Bytes::from_static(b"x"), &PutOptions::default())
                .await
                .unwrap();
        }
        lake
    }

    #[tokio::test]
    async fn gives_exactly_the_flat_listing_in_order_for_any_split() {
        let names = awkward_names();
        let lake = lake_with(&names).await;
        let mut want: Vec<String> = names.into_iter().filter(|n| n.starts_with("ds/")).collect();
        want.sort();
        assert_eq!(flat(&lake, "ds/").await, want);
        for parallelism in [1, 2, 3, 16] {
            for split_depth in [0, 1, 2, 3, 6] {
                for page_size in [1, 2, 3, 7, 5000] {
                    let opts = ListOptions {
                        parallelism,
                        split_depth,
                        page_size,
                    };
                    let got = all(&lake, "ds/", opts).await.unwrap();
                    assert_eq!(got, want, "{opts:?}");
                }
            }
        }
        // A prefix that is not a directory: names after it up to `/` are its level.
        let mut want: Vec<String> = awkward_names()
            .into_iter()
            .filter(|n| n.starts_with("ds"))
            .collect();
        want.sort();
        let got = all(&lake, "ds", ListOptions::default()).await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn lists_directories_at_once_and_holds_a_bounded_number_of_pages() {
        use crate::lake::faults::FaultyLake;
        use crate::testing::SyntheticLake;
        use std::time::Duration;

        let synthetic = SyntheticLake::new("d/", 20_000, 500, 1, 10);
        let lake = FaultyLake::new(std::sync::Arc::new(synthetic));
        // Every listing request takes 20 ms, as a far region's would.
        lake.set_latency(crate::lake::Op::List, Duration::from_millis(20));
        let opts = ListOptions {
            parallelism: 8,
            split_depth: 2,
            page_size: 100,
        };
        let mut l = ParallelLister::new(&lake, "d/", opts);
        let mut names = Vec::new();
        while let Some(page) = l.next_page().await.unwrap() {
            // In the window: 8 directories, each with at most AHEAD + 1 pages.
            let held: usize = l.window.iter().map(|w| w.ready.len()).sum();
            assert!(held <= 8 * (AHEAD + 1), "{held} pages held");
            names.extend(page.into_iter().map(|o| o.name));
        }
        assert_eq!(names.len(), 20_000);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "name order");
        let most = lake.most_listings_at_once();
        assert!(
            (8..=9).contains(&most),
            "{most} list requests at once; 8 directories (and the split) were wanted"
        );
    }

    #[tokio::test]
    async fn small_directories_are_listed_together_in_about_as_many_requests_as_flat() {
        use crate::lake::faults::FaultyLake;
        // 3,000 directories of 1 to 5 names.
        let mut names = Vec::new();
        for d in 0..3000 {
            for f in 0..(1 + d % 5) {
                names.push(format!("ds/dir{d:05}/f{f}"));
            }
        }
        let lake = FaultyLake::new(std::sync::Arc::new(lake_with(&names).await));
        let want = flat(&lake, "ds/").await;
        let page_size = 200;
        let flat_requests = (want.len() as u64).div_ceil(page_size as u64);
        let before = lake.calls(crate::lake::Op::List);
        let opts = ListOptions {
            page_size,
            ..Default::default()
        };
        assert_eq!(all(&lake, "ds/", opts).await.unwrap(), want);
        let requests = lake.calls(crate::lake::Op::List) - before;
        // One request per directory would be 3,000; grouped, a few times the flat
        // listing's (group edges fall where the names allow, not on page edges; the
        // first pieces go one directory each, before the density is known).
        assert!(
            requests <= 3 * flat_requests,
            "{requests} requests; the flat listing takes {flat_requests}"
        );
        // The same over the synthetic lake the bench lists (30,000 directories of 7).
        let lake = crate::testing::SyntheticLake::new("s/", 210_000, 7, 1, 10);
        let opts = ListOptions {
            page_size: 1000,
            ..Default::default()
        };
        let got = all(&lake, "s/", opts).await.unwrap();
        assert_eq!(got.len(), 210_000);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, n)| *n == lake.name(i as u64))
        );
    }

    #[tokio::test]
    async fn an_error_in_any_directory_ends_the_listing_with_that_error() {
        use crate::lake::faults::{Fault, FaultyLake};
        let names = awkward_names();
        let lake = FaultyLake::new(std::sync::Arc::new(lake_with(&names).await));
        let opts = ListOptions {
            page_size: 2,
            ..Default::default()
        };
        let requests = {
            let count = FaultyLake::new(std::sync::Arc::new(lake_with(&names).await));
            all(&count, "ds/", opts).await.unwrap();
            count.calls(crate::lake::Op::List) as u32
        };
        // Fail each request in turn: the listing ends with the error, never with a
        // listing that silently misses names.
        for skip in 0..requests {
            lake.heal();
            lake.fail_after(crate::lake::Op::List, skip, Fault::Reset, Some(1));
            let err = all(&lake, "ds/", opts).await.unwrap_err();
            assert!(matches!(err, LakeError::Connection { .. }), "{err}");
        }
        lake.heal();
        assert_eq!(
            all(&lake, "ds/", opts).await.unwrap().len(),
            flat(&lake, "ds/").await.len()
        );
    }

    #[tokio::test]
    async fn a_listing_resumed_after_a_name_skips_the_directories_before_it() {
        use crate::lake::faults::FaultyLake;
        use crate::testing::SyntheticLake;

        let synthetic = SyntheticLake::new("d/", 20_000, 500, 1, 10);
        let after = synthetic.name(15_100);
        let lake = FaultyLake::new(std::sync::Arc::new(synthetic));
        let opts = ListOptions {
            parallelism: 4,
            split_depth: 2,
            page_size: 100,
        };
        let whole = all(&lake, "d/", opts).await.unwrap();
        let whole_calls = lake.calls(crate::lake::Op::List);
        let mut l = ParallelLister::new(&lake, "d/", opts).after(&after);
        let mut rest = Vec::new();
        while let Some(page) = l.next_page().await.unwrap() {
            rest.extend(page.into_iter().map(|o| o.name));
        }
        let calls = lake.calls(crate::lake::Op::List) - whole_calls;
        let want: Vec<&String> = whole.iter().filter(|n| **n > after).collect();
        let got: Vec<&String> = rest.iter().filter(|n| **n > after).collect();
        assert_eq!(got, want, "every name after the cut, in order");
        assert!(
            calls * 2 < whole_calls,
            "directories wholly before the cut are not listed: {calls} requests against {whole_calls}"
        );
    }
}
