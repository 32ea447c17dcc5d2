//! The cluster-wide cache: the node agents of one cluster share their cache pools, so a
//! block of a dataset crosses the WAN once per cluster, not once per node.
//!
//! - **Placement.** Every block belongs to a chunk (the blocks of one ranged GET,
//!   `get_size`), and every chunk of a blob version has an owner: of the members that
//!   hold the dataset and serve peers, the one with the highest rendezvous score
//!   (SHA-256 of member id, blob, ETag and chunk). A member joining or leaving moves
//!   only the chunks it wins or held; members passed over after a failure move only
//!   theirs, to the next-highest score.
//! - **Fetch.** A node missing a block asks the chunk's owner (see
//!   `cache::blob::CachedBlob::fetch_from_peer`); the owner makes the blocks resident
//!   from the lake (one fetch however many ask, never from another peer) and streams
//!   them back. The answer and each block must come within the peer timeout; a peer
//!   that fails is passed over for a while and the rest comes from the lake.
//! - **Integrity.** Each block travels with the CRC32C its owner recorded when it
//!   fetched it from the lake, and the asker checks it (and a one-block blob's
//!   `Content-MD5`) before the block is stored: a peer serving wrong bytes is caught,
//!   passed over for ten minutes and logged, and the block comes from the lake. A blob
//!   with a `Content-MD5` over several blocks (up to 64 blocks) is taken whole from the
//!   owner of its first chunk and served only once that MD5 matches; larger ones come
//!   from the lake.
//! - **Security.** Both ends prove they hold the cluster's peer secret; frames are
//!   authenticated (wire.rs). An owner serves only blob versions its own snapshots list,
//!   of datasets it holds, to members the membership says hold that dataset too. No
//!   lake credential is ever sent: an owner fetches with its own.
//! - **Membership** is a list of [`Member`]s handed in by the agent (from the
//!   CachePools' statuses) or by a test; a node that does not serve is never an owner.

pub mod server;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tokio::io::BufStream;
use tokio::net::TcpStream;

use crate::cache::peers::{BlockPeers, PeerAsk, PeerBlock, PeerBlocks, PeerFailure, PeerFault};
pub use wire::PeerSecret;

/// How long a peer that failed to answer (unreachable or slow) is passed over.
pub const DOWN_FOR: Duration = Duration::from_secs(10);
/// How long a peer that served bytes failing their check is passed over.
pub const CORRUPT_FOR: Duration = Duration::from_secs(600);

/// Another node of the cluster that serves its cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The node's name.
    pub id: String,
    /// Where it serves peers.
    pub addr: SocketAddr,
    /// Ids of the datasets it holds (see `cache::dataset::Dataset::id`).
    pub datasets: BTreeSet<String>,
    /// Whether it serves peers: one that does not (`--peer-no-serve`) owns nothing,
    /// but is still served the datasets it holds.
    pub serves: bool,
}

/// This node's side of peer sharing (`tidepool agent --peer-*`).
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// This node's member id (its node name).
    pub me: String,
    pub secret: PeerSecret,
    /// The longest wait for a peer's answer, and for each block after it, before the
    /// rest comes from the lake.
    pub timeout: Duration,
    /// Serve other nodes (be an owner). A node that only takes (one about to go away)
    /// turns it off, and no chunk is placed on it.
    pub serve: bool,
    /// Members come from published statuses (the agent's CachePools): a prewarm waits
    /// until this node has published that it holds the dataset, and [`SETTLE_GRACE`]
    /// more for the others to publish theirs and be seen (at most [`SETTLE_MAX`]).
    pub await_publication: bool,
}

/// After this node published that it holds a dataset, the time given to nodes that
/// got it at the same time to publish theirs (a status write follows a change within a
/// second) and to be seen here, before a prewarm starts.
pub const SETTLE_GRACE: Duration = Duration::from_secs(3);
/// The longest a prewarm waits for this node's publication.
pub const SETTLE_MAX: Duration = Duration::from_secs(20);

/// The cluster's other nodes, for the cache ([`BlockPeers`]) and for the server.
#[derive(Debug)]
pub struct Peers {
    config: PeerConfig,
    members: RwLock<Arc<HashMap<String, Member>>>,
    /// Members passed over until the given time.
    down: Mutex<HashMap<String, Instant>>,
    /// Bytes served to peers, per dataset id.
    served: Mutex<HashMap<String, u64>>,
    /// Failed fetches by [`PeerFault`] (in its declaration order).
    faults: [AtomicU64; 4],
    /// The datasets this node's last published status says it holds.
    published: tokio::sync::watch::Sender<BTreeSet<String>>,
}

/// A member's rendezvous score for one chunk of one blob version.
fn score(member: &str, ask: &PeerAsk) -> u64 {
    let mut h = Sha256::new();
    for part in [
        member.as_bytes(),
        ask.blob.as_bytes(),
        ask.etag.0.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(ask.chunk().to_be_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

fn fault_index(f: PeerFault) -> usize {
    match f {
        PeerFault::Unreachable => 0,
        PeerFault::Slow => 1,
        PeerFault::Refused => 2,
        PeerFault::Corrupt => 3,
    }
}

impl Peers {
    pub fn new(config: PeerConfig) -> Arc<Self> {
        Arc::new(Peers {
            config,
            members: RwLock::new(Arc::new(HashMap::new())),
            down: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            faults: Default::default(),
            published: tokio::sync::watch::Sender::new(BTreeSet::new()),
        })
    }

    /// This node's status naming `datasets` as held was published.
    pub fn published(&self, datasets: &[String]) {
        let set: BTreeSet<String> = datasets.iter().cloned().collect();
        self.published.send_if_modified(|cur| {
            let changed = *cur != set;
            *cur = set;
            changed
        });
    }

    pub fn config(&self) -> &PeerConfig {
        &self.config
    }

    /// Replaces the membership (this node's own entry, if listed, is ignored).
    pub fn set_members(&self, members: impl IntoIterator<Item = Member>) {
        let m: HashMap<String, Member> = members
            .into_iter()
            .filter(|m| m.id != self.config.me)
            .map(|m| (m.id.clone(), m))
            .collect();
        *self.members.write() = Arc::new(m);
    }

    pub fn members(&self) -> Arc<HashMap<String, Member>> {
        self.members.read().clone()
    }

    /// Whether member `id` holds `dataset` (so may be served its blocks).
    pub fn holds(&self, id: &str, dataset: &str) -> bool {
        self.members
            .read()
            .get(id)
            .is_some_and(|m| m.datasets.contains(dataset))
    }

    /// Bytes served to peers, per dataset id.
    pub fn served_bytes(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .served
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    /// Bytes of dataset `id` served to peers.
    pub fn served_of(&self, id: &str) -> u64 {
        self.served.lock().get(id).copied().unwrap_or(0)
    }

    /// Failed peer fetches, by kind.
    pub fn faults(&self) -> Vec<(PeerFault, u64)> {
        [
            PeerFault::Unreachable,
            PeerFault::Slow,
            PeerFault::Refused,
            PeerFault::Corrupt,
        ]
        .into_iter()
        .map(|f| (f, self.faults[fault_index(f)].load(Ordering::Relaxed)))
        .collect()
    }

    pub(crate) fn served(&self, dataset: &str, n: u64) {
        *self.served.lock().entry(dataset.to_owned()).or_default() += n;
    }

    async fn open(
        &self,
        owner: &str,
        addr: SocketAddr,
        ask: &PeerAsk,
    ) -> Result<(BufStream<TcpStream>, wire::Session), PeerFailure> {
        let unreachable = |detail: String| PeerFailure {
            fault: PeerFault::Unreachable,
            detail,
        };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(format!("connecting to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut s = BufStream::new(tcp);
        let mut session = wire::connect(&mut s, &self.config.secret, &self.config.me, owner)
            .await
            .map_err(|e| unreachable(format!("handshake with {addr}: {e}")))?;
        let body = serde_json::to_vec(ask).expect("an ask serialises");
        session
            .send(&mut s, wire::ASK, &[&body])
            .await
            .map_err(|e| unreachable(format!("asking {addr}: {e}")))?;
        Ok((s, session))
    }
}

/// A block frame's payload: index, CRC32C, bytes.
pub(crate) fn block_header(index: u64, crc: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..8].copy_from_slice(&index.to_be_bytes());
    h[8..].copy_from_slice(&crc.to_be_bytes());
    h
}

fn parse_block(payload: bytes::Bytes) -> Option<PeerBlock> {
    if payload.len() < 12 {
        return None;
    }
    let index = u64::from_be_bytes(payload[..8].try_into().ok()?);
    let crc = u32::from_be_bytes(payload[8..12].try_into().ok()?);
    Some(PeerBlock {
        index,
        crc,
        bytes: payload.slice(12..),
    })
}

#[async_trait]
impl BlockPeers for Peers {
    fn owner(&self, ask: &PeerAsk) -> Option<String> {
        let members = self.members.read().clone();
        let now = Instant::now();
        let mut down = self.down.lock();
        down.retain(|_, until| *until > now);
        let me = self.config.me.as_str();
        let mut best = self.config.serve.then(|| (score(me, ask), me));
        for m in members.values() {
            if !m.serves || !m.datasets.contains(&ask.dataset) || down.contains_key(&m.id) {
                continue;
            }
            let s = score(&m.id, ask);
            if best.is_none_or(|(b, id)| (s, m.id.as_str()) > (b, id)) {
                best = Some((s, &m.id));
            }
        }
        best.filter(|(_, id)| *id != me)
            .map(|(_, id)| id.to_owned())
    }

    async fn fetch(&self, owner: &str, ask: &PeerAsk) -> Result<PeerBlocks, PeerFailure> {
        let Some(addr) = self.members.read().get(owner).map(|m| m.addr) else {
            return Err(PeerFailure {
                fault: PeerFault::Unreachable,
                detail: format!("{owner} is no longer a member"),
            });
        };
        let timeout = self.config.timeout;
        let slow = move |what: &str| PeerFailure {
            fault: PeerFault::Slow,
            detail: format!("{what} took more than the peer timeout ({timeout:?})"),
        };
        let (s, session) = tokio::time::timeout(timeout, self.open(owner, addr, ask))
            .await
            .map_err(|_| slow("connecting and asking"))??;
        let left = ask.n;
        let stream = futures::stream::unfold(Some((s, session, left)), move |state| async move {
            let (mut s, mut session, left) = state?;
            if left == 0 {
                return None;
            }
            let frame = match tokio::time::timeout(timeout, session.recv(&mut s)).await {
                Err(_) => Err(slow("a block")),
                Ok(Err(e)) => Err(PeerFailure {
                    fault: match e {
                        wire::WireError::BadFrame | wire::WireError::TooLarge(_) => {
                            PeerFault::Corrupt
                        }
                        _ => PeerFault::Unreachable,
                    },
                    detail: e.to_string(),
                }),
                Ok(Ok(None)) => Err(PeerFailure {
                    fault: PeerFault::Unreachable,
                    detail: "the connection closed before the last block".into(),
                }),
                Ok(Ok(Some((wire::BLOCK, p)))) => parse_block(p).ok_or(PeerFailure {
                    fault: PeerFault::Corrupt,
                    detail: "a block frame too short for its header".into(),
                }),
                Ok(Ok(Some((wire::REFUSE, p)))) => Err(PeerFailure {
                    fault: PeerFault::Refused,
                    detail: String::from_utf8_lossy(&p).into_owned(),
                }),
                Ok(Ok(Some((k, _)))) => Err(PeerFailure {
                    fault: PeerFault::Corrupt,
                    detail: format!("a frame of unknown kind {k}"),
                }),
            };
            match frame {
                Ok(b) => Some((Ok(b), Some((s, session, left - 1)))),
                Err(f) => Some((Err(f), None)),
            }
        });
        Ok(stream.boxed())
    }

    async fn settled(&self, dataset: &str) {
        if !self.config.await_publication {
            return;
        }
        let mut rx = self.published.subscribe();
        let shown = tokio::time::timeout(SETTLE_MAX, async {
            rx.wait_for(|d| d.contains(dataset)).await.is_ok()
        })
        .await;
        if shown == Ok(true) {
            tokio::time::sleep(SETTLE_GRACE).await;
        }
    }

    fn report(&self, owner: &str, failure: &PeerFailure) {
        self.faults[fault_index(failure.fault)].fetch_add(1, Ordering::Relaxed);
        let pass_over = match failure.fault {
            PeerFault::Refused => return,
            PeerFault::Unreachable | PeerFault::Slow => DOWN_FOR,
            PeerFault::Corrupt => {
                tracing::error!(peer = %owner, failure = %failure, "a peer served bytes that failed their check; they were not used (fetched from the lake instead), and the peer is passed over for {:?}", CORRUPT_FOR);
                CORRUPT_FOR
            }
        };
        let mut down = self.down.lock();
        let was = down.insert(owner.to_owned(), Instant::now() + pass_over);
        if was.is_none() && failure.fault != PeerFault::Corrupt {
            tracing::warn!(peer = %owner, failure = %failure, "peer passed over for {:?}; its blocks come from the next owner or the lake", pass_over);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::ETag;

    fn peers(me: &str, serve: bool) -> Arc<Peers> {
        Peers::new(PeerConfig {
            me: me.into(),
            secret: PeerSecret::new(vec![1; 32]).unwrap(),
            timeout: Duration::from_secs(1),
            serve,
            await_publication: false,
        })
    }

    fn member(id: &str, datasets: &[&str]) -> Member {
        Member {
            id: id.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            serves: true,
        }
    }

    fn ask(blob: usize, chunk: u64) -> PeerAsk {
        PeerAsk {
            dataset: "d".into(),
            blob: format!("data/file-{blob}"),
            etag: ETag("\"0x1\"".into()),
            size: 1 << 30,
            block_size: 4 << 20,
            chunk_blocks: 2,
            first: chunk * 2,
            n: 2,
        }
    }

    /// The owner of each of `n` chunks as `p` sees it (`me` where it owns it).
    fn owners(p: &Peers, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                p.owner(&ask(i / 8, (i % 8) as u64))
                    .unwrap_or_else(|| p.config.me.clone())
            })
            .collect()
    }

    #[test]
    fn chunks_spread_over_members_and_a_leaving_member_moves_only_its_own() {
        let p = peers("n0", true);
        p.set_members((1..4).map(|i| member(&format!("n{i}"), &["d"])));
        let before = owners(&p, 4000);
        for i in 0..4 {
            let share = before.iter().filter(|o| **o == format!("n{i}")).count();
            assert!((800..1200).contains(&share), "n{i} owns {share} of 4000");
        }
        // Every node computes the same owner: n1's view of the same members agrees.
        let p1 = peers("n1", true);
        p1.set_members((0..4).map(|i| member(&format!("n{i}"), &["d"])));
        assert_eq!(owners(&p1, 4000), before);
        // n3 leaves: only its chunks move.
        p.set_members((1..3).map(|i| member(&format!("n{i}"), &["d"])));
        let after = owners(&p, 4000);
        for (b, a) in before.iter().zip(&after) {
            if b != "n3" {
                assert_eq!(a, b, "a chunk n3 did not own moved");
            }
        }
        assert!(!after.contains(&"n3".to_string()));
    }

    #[test]
    fn members_without_the_dataset_or_passed_over_or_not_serving_own_nothing() {
        let p = peers("n0", false);
        let taker = Member {
            serves: false,
            ..member("n3", &["d"])
        };
        p.set_members([member("n1", &["d"]), member("n2", &["other"]), taker]);
        // n0 and n3 do not serve and n2 lacks the dataset: n1 owns every chunk; n3 is
        // still a member holding the dataset (it may be served).
        assert!(p.holds("n3", "d"));
        assert!(owners(&p, 200).iter().all(|o| o == "n1"));
        // n1 fails: passed over, nobody is left but the lake.
        p.report(
            "n1",
            &PeerFailure {
                fault: PeerFault::Unreachable,
                detail: "test".into(),
            },
        );
        assert!(p.owner(&ask(0, 0)).is_none());
        // A refusal does not pass a member over.
        let q = peers("n0", false);
        q.set_members([member("n1", &["d"])]);
        q.report(
            "n1",
            &PeerFailure {
                fault: PeerFault::Refused,
                detail: "not held".into(),
            },
        );
        assert_eq!(q.owner(&ask(0, 0)).as_deref(), Some("n1"));
        assert_eq!(q.faults()[2], (PeerFault::Refused, 1));
    }
}
