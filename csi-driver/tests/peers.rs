//! The cluster-wide cache with real TCP between nodes on 127.0.0.1: three node caches
//! (each its own pool, dataset and peer server, as three agents have) over one lake
//! that counts the bytes it serves. What a user would notice: the lake serves a
//! dataset warmed on every node about once, every byte read on every node is the
//! lake's, and a peer that dies or lies makes reads slower, never wrong.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use md5::{Digest, Md5};
use tidepool_csi::cache::dataset::{Dataset, PrewarmProgress};
use tidepool_csi::cache::peers::{BlockPeers, PeerFault};
use tidepool_csi::cache::snapshot::Kind;
use tidepool_csi::cache::{CacheConfig, CachePool};
use tidepool_csi::lake::memory::MemoryLake;
use tidepool_csi::lake::{Lake, LakeUrl};
use tidepool_csi::peer::server::{Datasets, Server};
use tidepool_csi::peer::{Member, PeerConfig, PeerSecret, Peers};

const BLOCK: u64 = 64 << 10;

struct Node {
    name: String,
    _dir: tempfile::TempDir,
    pool: CachePool,
    ds: Arc<Dataset>,
    peers: Arc<Peers>,
    server: Arc<Server>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

fn body(i: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|j| (j.wrapping_mul(131) ^ (i as u64 * 7 + (j >> 9))) as u8)
        .collect()
}

/// A dataset of files of every kind the peer path treats differently.
fn fill(lake: &MemoryLake) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..12usize {
        // Multi-block, no Content-MD5 (staged uploads): shared, checked by CRC32C.
        let b = body(i, 5 * BLOCK + 77 * i as u64);
        lake.insert_with_md5(&format!("d/shards/s-{i:02}"), b.clone(), None);
        files.push((format!("shards/s-{i:02}"), b));
    }
    for i in 0..20usize {
        // One block with Content-MD5: shared, checked by MD5 too.
        let b = body(100 + i, 1000 + 997 * i as u64);
        lake.insert(&format!("d/small/f-{i:02}"), b.clone());
        files.push((format!("small/f-{i:02}"), b));
    }
    files
}

/// Files with a Content-MD5 over several blocks: taken whole from a peer and checked
/// against the MD5 before any block is served.
fn fill_md5_multi(lake: &MemoryLake) -> Vec<(String, Vec<u8>)> {
    fill_md5_multi_n(lake, 2)
}

fn fill_md5_multi_n(lake: &MemoryLake, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let b = body(200 + i, 3 * BLOCK + 5);
            let md5: [u8; 16] = Md5::digest(&b).into();
            lake.insert_with_md5(&format!("d/whole/w-{i}"), b.clone(), Some(md5));
            (format!("whole/w-{i}"), b)
        })
        .collect()
}

async fn node(name: &str, lake: &Arc<MemoryLake>, secret: &[u8], timeout: Duration) -> Node {
    node_serving(name, lake, secret, timeout, true).await
}

async fn node_serving(
    name: &str,
    lake: &Arc<MemoryLake>,
    secret: &[u8],
    timeout: Duration,
    serve: bool,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CacheConfig::new(dir.path(), 1 << 30);
    cfg.block_size = BLOCK;
    cfg.get_size = 2 * BLOCK;
    cfg.small_file_threshold = 0;
    let pool = CachePool::open(cfg).await.unwrap();
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/d/").unwrap();
    let l: Arc<dyn Lake> = lake.clone();
    let ds = Arc::new(
        Dataset::open(pool.clone(), url, l, false, |_| {})
            .await
            .unwrap(),
    );
    let peers = Peers::new(PeerConfig {
        me: name.into(),
        secret: PeerSecret::new(secret.to_vec()).unwrap(),
        timeout,
        serve,
        await_publication: false,
    });
    pool.set_peers(Some(peers.clone() as Arc<dyn BlockPeers>));
    let catalog = Arc::new(Datasets::default());
    catalog.0.write().push(ds.clone());
    let server = Server::new(peers.clone(), catalog, BLOCK);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server.clone().run(listener));
    Node {
        name: name.into(),
        _dir: dir,
        pool,
        ds,
        peers,
        server,
        addr,
        task,
    }
}

/// Every node learns every other, holding the dataset.
fn join(nodes: &[&Node]) {
    for n in nodes {
        n.peers.set_members(nodes.iter().map(|m| Member {
            id: m.name.clone(),
            addr: m.addr,
            datasets: BTreeSet::from([m.ds.id().to_owned()]),
            serves: m.peers.config().serve,
        }));
    }
}

/// Reads every file through node `n`'s cache and checks each byte against the lake's.
async fn read_all(n: &Node, files: &[(String, Vec<u8>)]) {
    let (_, snap) = n.ds.current();
    for (path, want) in files {
        let mut ino = 1;
        let mut entry = None;
        for part in path.split('/') {
            let e = snap.lookup(ino, part).unwrap().unwrap();
            ino = e.ino;
            entry = Some(e);
        }
        let e = entry.unwrap();
        assert_eq!(e.kind, Kind::File);
        let got =
            n.ds.blob(&e)
                .unwrap()
                .read(0, want.len() + 10)
                .await
                .unwrap();
        assert!(
            got[..] == want[..],
            "{}: {path} differs from the lake's bytes",
            n.name
        );
    }
}

fn total(files: &[(String, Vec<u8>)]) -> u64 {
    files.iter().map(|(_, b)| b.len() as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dataset_warmed_on_three_nodes_comes_from_the_lake_about_once() {
    let lake = Arc::new(MemoryLake::new());
    let shared = fill(&lake);
    let whole = fill_md5_multi(&lake);
    let secret = [9u8; 32];
    let t = Duration::from_secs(5);
    let (a, b, c) = tokio::join!(
        node("a", &lake, &secret, t),
        node("b", &lake, &secret, t),
        node("c", &lake, &secret, t)
    );
    join(&[&a, &b, &c]);
    let listed = lake.bytes_served.load(Ordering::Relaxed);
    let warm = |n: &Node| {
        let ds = n.ds.clone();
        async move {
            let p = PrewarmProgress::default();
            let s = ds.prewarm(None, 4, &p).await.unwrap();
            assert!(s.failed.is_empty(), "{:?}", s.failed);
        }
    };
    tokio::join!(warm(&a), warm(&b), warm(&c));
    let from_lake = lake.bytes_served.load(Ordering::Relaxed) - listed;
    // Every file once, those whose Content-MD5 spans blocks too.
    let want = total(&shared) + total(&whole);
    assert!(
        from_lake <= want + want / 20,
        "the lake served {from_lake} bytes for a dataset of {} warmed on three nodes (about {want} expected)",
        total(&shared) + total(&whole)
    );
    for n in [&a, &b, &c] {
        assert!(
            n.pool.fetched_from_peers() > 0,
            "{} took nothing from its peers",
            n.name
        );
        read_all(n, &shared).await;
        read_all(n, &whole).await;
    }
    // The counters add up: what the nodes fetched from the lake is what the lake served,
    // and what they took from peers is what peers served.
    let nodes = [&a, &b, &c];
    let id = a.ds.id();
    let lake_sum: u64 = nodes.iter().map(|n| n.pool.dataset_bytes(id).0).sum();
    let peer_sum: u64 = nodes.iter().map(|n| n.pool.dataset_bytes(id).1).sum();
    // (An owner counts a block once its send returned, which can be just after the
    // asker has it: wait for the count, a few seconds at most.)
    let served_now = || -> u64 { nodes.iter().map(|n| n.peers.served_of(id)).sum() };
    for _ in 0..500 {
        if served_now() >= peer_sum {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let served_sum = served_now();
    assert_eq!(lake_sum, from_lake);
    assert_eq!(peer_sum, served_sum);
    assert_eq!(
        peer_sum,
        nodes
            .iter()
            .map(|n| n.pool.fetched_from_peers())
            .sum::<u64>()
    );
    // Two of three nodes take each shared byte from its owner.
    assert!(
        peer_sum >= total(&shared) * 2 - total(&shared) / 20,
        "peers served {peer_sum} bytes"
    );
    // Reading again needs neither the lake nor a peer.
    let before = lake.bytes_served.load(Ordering::Relaxed);
    read_all(&a, &shared).await;
    assert_eq!(lake.bytes_served.load(Ordering::Relaxed), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_flips_bytes_is_caught_and_the_reader_gets_the_lakes_bytes() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill(&lake);
    let secret = [9u8; 32];
    let t = Duration::from_secs(5);
    let (a, b) = tokio::join!(node("a", &lake, &secret, t), node("b", &lake, &secret, t));
    join(&[&a, &b]);
    // b serves every block with one byte flipped (its CRC32C as recorded).
    b.server.flip_bytes.store(1, Ordering::Relaxed);
    read_all(&a, &files).await;
    let corrupt = a
        .peers
        .faults()
        .into_iter()
        .find(|(f, _)| *f == PeerFault::Corrupt)
        .unwrap()
        .1;
    assert!(corrupt >= 1, "the flipped bytes were not caught");
    // Not one of b's blocks was taken, and b is passed over: it owns nothing now.
    assert_eq!(a.pool.fetched_from_peers(), 0);
    let ask = |i: u64| tidepool_csi::cache::peers::PeerAsk {
        dataset: a.ds.id().into(),
        blob: format!("d/shards/s-{i:02}"),
        etag: tidepool_csi::lake::ETag("x".into()),
        size: 1,
        block_size: BLOCK,
        chunk_blocks: 2,
        first: 0,
        n: 1,
    };
    assert!((0..40).all(|i| a.peers.owner(&ask(i)).is_none()));
    // b's own reads are unaffected.
    read_all(&b, &files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_that_dies_mid_transfer_or_hangs_costs_time_not_bytes() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill(&lake);
    let secret = [9u8; 32];
    let t = Duration::from_millis(500);
    let (a, b, c) = tokio::join!(
        node("a", &lake, &secret, t),
        node("b", &lake, &secret, t),
        node("c", &lake, &secret, t)
    );
    join(&[&a, &b, &c]);
    // c dies after serving three blocks (its listener and every connection close);
    // b hangs: it accepts and never answers.
    c.server.die_after.store(3, Ordering::Relaxed);
    b.task.abort();
    // (The aborted task drops its listener when it is next polled: bind until it has.)
    let hang = loop {
        match tokio::net::TcpListener::bind(b.addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let hung = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = hang.accept().await.unwrap();
            held.push(s);
        }
    });
    read_all(&a, &files).await;
    let faults = a.peers.faults();
    assert!(
        faults.iter().any(|(f, n)| *f == PeerFault::Slow && *n >= 1),
        "{faults:?}"
    );
    assert!(
        faults
            .iter()
            .any(|(f, n)| *f == PeerFault::Unreachable && *n >= 1),
        "{faults:?}"
    );
    // Both are passed over: a owns everything now.
    let ask = tidepool_csi::cache::peers::PeerAsk {
        dataset: a.ds.id().into(),
        blob: "d/shards/s-00".into(),
        etag: tidepool_csi::lake::ETag("x".into()),
        size: 1,
        block_size: BLOCK,
        chunk_blocks: 2,
        first: 0,
        n: 1,
    };
    assert_eq!(a.peers.owner(&ask), None);
    hung.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_the_secret_or_the_dataset_gets_nothing() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill(&lake);
    let t = Duration::from_secs(5);
    let (a, b) = tokio::join!(
        node("a", &lake, &[9u8; 32], t),
        node("b", &lake, &[7u8; 32], t)
    );
    join(&[&a, &b]);
    // Different secrets: no connection is taken, both read from the lake.
    read_all(&a, &files).await;
    read_all(&b, &files).await;
    assert_eq!(a.pool.fetched_from_peers() + b.pool.fetched_from_peers(), 0);
    assert_eq!(b.peers.served_of(b.ds.id()), 0);

    // Same secret, but c's membership does not list d as holding the dataset: c
    // refuses d's asks (d falls back to the lake and counts refusals).
    let (c, d) = tokio::join!(
        node("c", &lake, &[9u8; 32], t),
        node("d", &lake, &[9u8; 32], t)
    );
    join(&[&c, &d]);
    c.peers.set_members([Member {
        id: "d".into(),
        addr: d.addr,
        datasets: BTreeSet::from(["another".to_string()]),
        serves: true,
    }]);
    read_all(&d, &files).await;
    assert_eq!(d.pool.fetched_from_peers(), 0);
    let refused = d
        .peers
        .faults()
        .into_iter()
        .find(|(f, _)| *f == PeerFault::Refused)
        .unwrap()
        .1;
    assert!(refused >= 1);
    assert_eq!(c.peers.served_of(c.ds.id()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_lying_about_a_blocks_crc_is_caught_by_the_lakes_content_md5() {
    let lake = Arc::new(MemoryLake::new());
    // Only one-block files with a Content-MD5: the lake vouches for every byte.
    let files: Vec<_> = fill(&lake)
        .into_iter()
        .filter(|(p, _)| p.starts_with("small/"))
        .collect();
    let secret = [9u8; 32];
    let t = Duration::from_secs(5);
    let (a, b) = tokio::join!(node("a", &lake, &secret, t), node("b", &lake, &secret, t));
    join(&[&a, &b]);
    // b flips a byte and sends the CRC32C of the flipped bytes: only the MD5 can tell.
    b.server.flip_bytes.store(2, Ordering::Relaxed);
    read_all(&a, &files).await;
    let corrupt = a
        .peers
        .faults()
        .into_iter()
        .find(|(f, _)| *f == PeerFault::Corrupt)
        .unwrap()
        .1;
    assert!(corrupt >= 1, "the lie was not caught");
    assert_eq!(a.pool.fetched_from_peers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_does_not_serve_takes_from_its_peers_and_owns_nothing() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill(&lake);
    let secret = [9u8; 32];
    let t = Duration::from_secs(5);
    let (a, b, c) = tokio::join!(
        node("a", &lake, &secret, t),
        node("b", &lake, &secret, t),
        node_serving("c", &lake, &secret, t, false)
    );
    join(&[&a, &b, &c]);
    let warm = |n: &Node| {
        let ds = n.ds.clone();
        async move {
            let s = ds
                .prewarm(None, 4, &PrewarmProgress::default())
                .await
                .unwrap();
            assert!(s.failed.is_empty(), "{:?}", s.failed);
        }
    };
    warm(&a).await;
    warm(&b).await;
    let lake_before = lake.bytes_served.load(Ordering::Relaxed);
    let served = |n: &Node| n.peers.served_of(n.ds.id());
    let served_before = served(&a) + served(&b);
    // c takes everything from a and b (every chunk is theirs), nothing from the lake.
    read_all(&c, &files).await;
    assert_eq!(lake.bytes_served.load(Ordering::Relaxed), lake_before);
    assert_eq!(c.pool.fetched_from_peers(), total(&files));
    // ... and never serves: no chunk is placed on it.
    assert_eq!(c.peers.served_of(c.ds.id()), 0);
    // (An owner counts a block once its send returned, which can be just after the
    // reader has it: wait for the count, a few seconds at most.)
    for _ in 0..500 {
        if served(&a) + served(&b) - served_before >= total(&files) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served(&a) + served(&b) - served_before, total(&files));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_joining_and_leaving_during_a_prewarm_change_no_byte_read() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill(&lake);
    let secret = [9u8; 32];
    let t = Duration::from_secs(2);
    let (a, b, c) = tokio::join!(
        node("a", &lake, &secret, t),
        node("b", &lake, &secret, t),
        node("c", &lake, &secret, t)
    );
    join(&[&a, &b, &c]);
    let warm = |n: &Node| {
        let ds = n.ds.clone();
        tokio::spawn(async move {
            let s = ds
                .prewarm(None, 2, &PrewarmProgress::default())
                .await
                .unwrap();
            assert!(s.failed.is_empty(), "{:?}", s.failed);
        })
    };
    let (wa, wb, wc) = (warm(&a), warm(&b), warm(&c));
    // Once blocks are moving, c leaves (its prewarm and its server stop, the others
    // forget it) and d joins.
    while a.pool.fetched() + a.pool.fetched_from_peers() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    wc.abort();
    c.task.abort();
    let d = node("d", &lake, &secret, t).await;
    join(&[&a, &b, &d]);
    let wd = warm(&d);
    for w in [wa, wb, wd] {
        w.await.unwrap();
    }
    for n in [&a, &b, &d] {
        read_all(n, &files).await;
    }
    assert!(
        d.pool.fetched_from_peers() > 0,
        "d took nothing from its peers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_whose_md5_spans_blocks_is_served_from_a_peer_only_once_it_matches() {
    let lake = Arc::new(MemoryLake::new());
    let files = fill_md5_multi_n(&lake, 8);
    let secret = [9u8; 32];
    let t = Duration::from_secs(5);
    let (a, b) = tokio::join!(node("a", &lake, &secret, t), node("b", &lake, &secret, t));
    join(&[&a, &b]);
    // An honest b: a takes the blobs b owns whole from it, checked against the MD5.
    read_all(&a, &files).await;
    assert!(a.pool.fetched_from_peers() > 0, "nothing taken from b");
    assert_eq!(
        a.pool.fetched_from_peers() % (3 * BLOCK + 5),
        0,
        "whole blobs only"
    );
    // A lying b (flipped byte, CRC32C recomputed over it): only the whole-blob MD5
    // can tell; c reads every byte right and takes nothing from b.
    let c = node("c", &lake, &secret, t).await;
    join(&[&b, &c]);
    b.server.flip_bytes.store(2, Ordering::Relaxed);
    read_all(&c, &files).await;
    let corrupt = c
        .peers
        .faults()
        .into_iter()
        .find(|(f, _)| *f == PeerFault::Corrupt)
        .unwrap()
        .1;
    assert!(corrupt >= 1, "the lie was not caught");
    assert_eq!(c.pool.fetched_from_peers(), 0);
}
