//! Serving this node's cache to the cluster's other nodes.
//!
//! One ask per connection: the asker proves it holds the peer secret, asks for blocks of
//! one blob version, and gets them one frame each, in order, or a refusal that says why.
//! What is served is bounded: [`MAX_CONNECTIONS`] connections at once (more are refused
//! as busy, after the handshake), at most [`MAX_ASK_BLOCKS`] blocks per ask, one block
//! in memory per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{Peers, block_header, wire};
use crate::cache::CacheError;
use crate::cache::blob::CachedBlob;
use crate::cache::peers::PeerAsk;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Blocks one ask may ask for.
pub const MAX_ASK_BLOCKS: u64 = crate::cache::peers::MAX_WHOLE_BLOCKS;
/// The longest a connection may take to prove itself and ask.
const ASK_WITHIN: Duration = Duration::from_secs(10);

/// The blob versions this node can serve: of the datasets it holds, what their
/// snapshots list.
pub trait Catalog: Send + Sync {
    /// The cached blob `ask` names, if a dataset held here with id `ask.dataset` lists
    /// that blob at that ETag; else why not.
    fn blob(&self, ask: &PeerAsk) -> Result<Arc<CachedBlob>, String>;
}

/// The datasets of this process, as a [`Catalog`] (the standalone CLI and tests; the
/// agent serves its registry's).
#[derive(Default)]
pub struct Datasets(pub parking_lot::RwLock<Vec<Arc<crate::cache::dataset::Dataset>>>);

impl Catalog for Datasets {
    fn blob(&self, ask: &PeerAsk) -> Result<Arc<CachedBlob>, String> {
        let ds = self
            .0
            .read()
            .iter()
            .find(|d| d.id() == ask.dataset)
            .cloned()
            .ok_or_else(|| format!("dataset {} is not held here", ask.dataset))?;
        serve_from(&ds, ask)
    }
}

/// The blob of `ask` from dataset `ds`, if one of its open snapshots lists that version.
pub fn serve_from(
    ds: &crate::cache::dataset::Dataset,
    ask: &PeerAsk,
) -> Result<Arc<CachedBlob>, String> {
    let entry = ds
        .entry_for(&ask.blob, &ask.etag)
        .ok_or_else(|| format!("{} at {} is not in a snapshot here", ask.blob, ask.etag))?;
    ds.blob(&entry).map_err(|e| e.to_string())
}

/// A running peer server.
pub struct Server {
    peers: Arc<Peers>,
    catalog: Arc<dyn Catalog>,
    block_size: u64,
    slots: Semaphore,
    /// Testing: serve every block with one byte flipped: 1, with the block's true
    /// CRC32C (a failing disk); 2, with the CRC32C of the flipped bytes (a lying peer).
    #[cfg(any(test, feature = "testing"))]
    pub flip_bytes: std::sync::atomic::AtomicU8,
    /// Testing: after this many more blocks served, die as a killed process would:
    /// every connection drops where it is and nothing more is accepted.
    #[cfg(any(test, feature = "testing"))]
    pub die_after: std::sync::atomic::AtomicU64,
}

impl Server {
    pub fn new(peers: Arc<Peers>, catalog: Arc<dyn Catalog>, block_size: u64) -> Arc<Self> {
        Arc::new(Server {
            peers,
            catalog,
            block_size,
            slots: Semaphore::new(MAX_CONNECTIONS),
            #[cfg(any(test, feature = "testing"))]
            flip_bytes: Default::default(),
            #[cfg(any(test, feature = "testing"))]
            die_after: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    #[cfg(any(test, feature = "testing"))]
    fn dead(&self) -> bool {
        self.die_after.load(std::sync::atomic::Ordering::Relaxed) == 0
    }

    #[cfg(not(any(test, feature = "testing")))]
    fn dead(&self) -> bool {
        false
    }

    /// Accepts connections on `listener` until the task is dropped.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            if self.dead() {
                return;
            }
            let (conn, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.handle(conn).await {
                    tracing::debug!(from = %from, error = %e, "peer connection ended");
                }
            });
        }
    }

    async fn handle(&self, conn: TcpStream) -> Result<(), wire::WireError> {
        let _ = conn.set_nodelay(true);
        let mut s = BufStream::new(conn);
        let slot = self.slots.try_acquire();
        let me = &self.peers.config().me;
        let asked = tokio::time::timeout(ASK_WITHIN, async {
            let mut session = wire::accept(&mut s, &self.peers.config().secret, me).await?;
            let ask = session.recv(&mut s).await?;
            Ok::<_, wire::WireError>((session, ask))
        })
        .await;
        let (mut session, frame) = match asked {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let ask = match frame {
            Some((wire::ASK, body)) => serde_json::from_slice::<PeerAsk>(&body)
                .map_err(|e| format!("a malformed ask: {e}")),
            _ => Err("expected an ask".to_owned()),
        };
        let checked = ask.and_then(|ask| {
            if slot.is_err() {
                return Err(format!("{me} is busy ({MAX_CONNECTIONS} peer connections)"));
            }
            self.authorize(&session.peer, &ask).map(|blob| (ask, blob))
        });
        let (ask, blob) = match checked {
            Ok(x) => x,
            Err(why) => {
                tracing::debug!(peer = %session.peer, why = %why, "peer ask refused");
                return session.send(&mut s, wire::REFUSE, &[why.as_bytes()]).await;
            }
        };
        let blocks = ask.first..ask.first + ask.n;
        // Start every missing block now (one ranged GET per chunk), then send each as it lands.
        let start = blob.clone();
        let all = blocks.clone();
        tokio::spawn(async move { drop(start.ensure_from_lake(all).await) });
        for i in blocks {
            match self.block(&blob, i).await {
                Ok((bytes, crc)) => {
                    if self.dead() {
                        return Err(wire::WireError::Io(
                            std::io::ErrorKind::ConnectionAborted.into(),
                        ));
                    }
                    #[cfg(any(test, feature = "testing"))]
                    let _ = self.die_after.fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| (n != u64::MAX).then(|| n.saturating_sub(1)),
                    );
                    #[cfg(any(test, feature = "testing"))]
                    let (bytes, crc) =
                        match self.flip_bytes.load(std::sync::atomic::Ordering::Relaxed) {
                            0 => (bytes, crc),
                            mode => {
                                let mut v = bytes.to_vec();
                                v[0] ^= 0x40;
                                let c = if mode == 2 { crc32c::crc32c(&v) } else { crc };
                                (bytes::Bytes::from(v), c)
                            }
                        };
                    session
                        .send(&mut s, wire::BLOCK, &[&block_header(i, crc), &bytes])
                        .await?;
                    self.peers.served(&ask.dataset, bytes.len() as u64);
                }
                Err(e) => {
                    let why = format!("block {i} of {}: {e}", ask.blob);
                    return session.send(&mut s, wire::REFUSE, &[why.as_bytes()]).await;
                }
            }
        }
        Ok(())
    }

    /// Whether `peer` may have the blocks of `ask`, and the blob to serve them from.
    fn authorize(&self, peer: &str, ask: &PeerAsk) -> Result<Arc<CachedBlob>, String> {
        let me = &self.peers.config().me;
        if !self.peers.config().serve {
            return Err(format!("{me} does not serve peers"));
        }
        if !self.peers.holds(peer, &ask.dataset) {
            return Err(format!(
                "{peer} is not a member holding dataset {}",
                ask.dataset
            ));
        }
        if ask.block_size != self.block_size {
            return Err(format!(
                "block size {} asked, {me} uses {}",
                ask.block_size, self.block_size
            ));
        }
        if ask.n == 0 || ask.n > MAX_ASK_BLOCKS {
            return Err(format!(
                "asks are for 1 to {MAX_ASK_BLOCKS} blocks, not {}",
                ask.n
            ));
        }
        let blob = self.catalog.blob(ask)?;
        if blob.size != ask.size || ask.first + ask.n > blob.residency().blocks() {
            return Err(format!(
                "{} is {} bytes here, blocks {}..{} asked of a {}-byte blob",
                ask.blob,
                blob.size,
                ask.first,
                ask.first + ask.n,
                ask.size
            ));
        }
        Ok(blob)
    }

    /// Block `i`, resident (fetched from the lake if it is not) and read.
    async fn block(&self, blob: &Arc<CachedBlob>, i: u64) -> Result<(bytes::Bytes, u32), String> {
        for _ in 0..3 {
            blob.ensure_from_lake(i..i + 1)
                .await
                .map_err(|e| e.to_string())?;
            let b = blob.clone();
            match tokio::task::spawn_blocking(move || b.peer_block(i))
                .await
                .map_err(|e| e.to_string())?
            {
                Err(CacheError::Refetch) => continue,
                r => return r.map_err(|e| e.to_string()),
            }
        }
        Err("dropped from the cache as soon as it was fetched, three times".into())
    }
}
