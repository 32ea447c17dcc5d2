//! A fault-injecting HTTP proxy between real `tidepool` processes and Azurite, on
//! 127.0.0.1: what a far, unwell lake does to a client that cannot be given an
//! in-process fault wrapper (the binaries under test).
//!
//! Each request is read (head and `Content-Length` body), then, by the current
//! [`Faults`], answered `503 Server Busy` without reaching the lake, dropped before it
//! is forwarded (a reset), forwarded and its answer dropped (the request took effect,
//! the client never heard: the hardest case for idempotency), delayed, refused as a
//! lease held by another (lease requests only), or forwarded.
//! Every forwarded request gets its own upstream connection and `Connection: close`,
//! so the proxy never parses an answer: it copies the lake's bytes back until the lake
//! closes. Faults are drawn from a seeded generator, so a failing seed can be replayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How often each fault strikes, per request (0.0..=1.0), and the added latency.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Answered 503 Server Busy.
    pub busy: f64,
    /// Dropped before it reaches the lake.
    pub reset: f64,
    /// Reaches the lake; the answer is dropped.
    pub lost_reply: f64,
    /// Every request waits this long first.
    pub delay: Duration,
    /// Lease requests (acquire, renew, release) are refused `409 LeaseAlreadyPresent`:
    /// as if another writer held the lease, so a sync cannot renew its own and declares
    /// it lost.
    pub lease_conflict: bool,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        busy: 0.0,
        reset: 0.0,
        lost_reply: 0.0,
        delay: Duration::ZERO,
        lease_conflict: false,
    };
}

/// What the proxy did, for the test's report.
#[derive(Debug, Default)]
pub struct Counts {
    pub forwarded: AtomicU64,
    pub busy: AtomicU64,
    pub reset: AtomicU64,
    pub lost_reply: AtomicU64,
    pub lease_conflict: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    faults: Arc<Mutex<Faults>>,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`, on the current
    /// tokio runtime.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let faults = Arc::new(Mutex::new(Faults::NONE));
        let counts = Arc::new(Counts::default());
        let rng = Arc::new(Mutex::new(seed | 1));
        let task = {
            let (faults, counts) = (faults.clone(), counts.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (faults, counts, rng) = (faults.clone(), counts.clone(), rng.clone());
                    tokio::spawn(async move {
                        let _ = serve(client, upstream, faults, counts, rng).await;
                    });
                }
            })
        };
        Ok(FaultProxy {
            port,
            faults,
            counts,
            task,
        })
    }

    /// Sets the faults from now on.
    pub fn set(&self, f: Faults) {
        *self.faults.lock() = f;
    }

    /// `http://127.0.0.1:<port>/<account>/`: Azurite's endpoint, through the proxy.
    pub fn endpoint(&self, account: &str) -> String {
        format!("http://127.0.0.1:{}/{account}/", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// xorshift64*: a uniform draw in 0.0..1.0.
fn draw(rng: &Mutex<u64>) -> f64 {
    let mut s = rng.lock();
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    let v = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (v >> 11) as f64 / (1u64 << 53) as f64
}

const LEASE_CONFLICT: &[u8] = b"HTTP/1.1 409 There is already a lease present.\r\nx-ms-error-code: LeaseAlreadyPresent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

const BUSY: &[u8] = b"HTTP/1.1 503 Server Busy\r\nx-ms-error-code: ServerBusy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
    rng: Arc<Mutex<u64>>,
) -> std::io::Result<()> {
    // One request per connection (the answer closes it).
    let mut head = Vec::with_capacity(4096);
    let mut buf = [0u8; 8192];
    let end = loop {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 1 << 20 {
            return Ok(());
        }
    };
    let (head_bytes, already) = head.split_at(end);
    let text = String::from_utf8_lossy(head_bytes).into_owned();
    let length: u64 = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    // The head again with `Connection: close` in place of whatever it said.
    let mut out = String::new();
    for l in text.trim_end_matches("\r\n").split("\r\n") {
        if l.split_once(':').is_some_and(|(k, _)| {
            k.trim().eq_ignore_ascii_case("connection")
                || k.trim().eq_ignore_ascii_case("keep-alive")
        }) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let f = *faults.lock();
    if !f.delay.is_zero() {
        tokio::time::sleep(f.delay).await;
    }
    let lease_op = text
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("x-ms-lease-action:"));
    if f.lease_conflict && lease_op {
        counts.lease_conflict.fetch_add(1, Ordering::Relaxed);
        client.write_all(LEASE_CONFLICT).await?;
        return Ok(());
    }
    let roll = draw(&rng);
    if roll < f.busy {
        counts.busy.fetch_add(1, Ordering::Relaxed);
        // The body is left unread: the connection closes.
        client.write_all(BUSY).await?;
        return Ok(());
    }
    if roll < f.busy + f.reset {
        counts.reset.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let chunked = text.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let lose = roll < f.busy + f.reset + f.lost_reply;
    if lose && chunked {
        // Where a chunked body ends is not tracked here: dropped before the lake.
        counts.reset.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(out.as_bytes()).await?;
    up.write_all(already).await?;
    if chunked {
        counts.forwarded.fetch_add(1, Ordering::Relaxed);
        tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        return Ok(());
    }
    let mut left = length.saturating_sub(already.len() as u64);
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = client.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(());
        }
        up.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    if lose {
        counts.lost_reply.fetch_add(1, Ordering::Relaxed);
        // Wait for the lake to act (its answer starts), then drop both sides.
        let _ = up.read(&mut buf).await;
        return Ok(());
    }
    counts.forwarded.fetch_add(1, Ordering::Relaxed);
    let (mut ur, _uw) = up.split();
    let (_cr, mut cw) = client.split();
    tokio::io::copy(&mut ur, &mut cw).await?;
    cw.shutdown().await
}
