//! The peer protocol on a TCP connection: a mutual handshake proving that both ends
//! hold the cluster's peer secret (it never crosses the wire), then frames, each
//! authenticated with a key derived for this connection.
//!
//! ```text
//! server → client  "TPPEER1\n" nonce_s[32]
//! client → server  "TPPEER1\n" nonce_c[32] len[1] client_id tag_c[32]
//! server → client  len[1] server_id tag_s[32]
//!   tag_c = HMAC(secret, "client", nonce_s, nonce_c, client_id)
//!   tag_s = HMAC(secret, "server", nonce_s, nonce_c, client_id, server_id)
//!   key   = HMAC(secret, "session", nonce_s, nonce_c, client_id, server_id)
//! frame            kind[1] len[4, big-endian] payload tag[32]
//!   tag   = HMAC(key, direction, frame number, kind, payload)
//! ```
//!
//! HMAC is HMAC-SHA256; each input is length-prefixed. Fresh nonces on both sides make
//! every connection's key new, so a recorded handshake or frame replays nowhere; the
//! frame number and direction in every tag stop frames from being dropped, reordered or
//! reflected unnoticed. A frame is at most [`MAX_FRAME`] bytes (one block and a
//! header), so a connection holds one frame in memory at a time. Bytes are
//! authenticated, not encrypted: a dataset's blocks are visible on the wire (as they
//! are from the lake over plain HTTP); no credential is ever sent.

use std::fmt;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"TPPEER1\n";
const NONCE: usize = 32;
const TAG: usize = 32;
/// Largest frame payload: a block of 64 MiB with its header.
pub const MAX_FRAME: usize = (64 << 20) + 64;
/// Longest member id (a Kubernetes node name is at most 253 bytes).
pub const MAX_ID: usize = 253;

/// The cluster's shared peer secret (never printed).
#[derive(Clone)]
pub struct PeerSecret(Vec<u8>);

impl PeerSecret {
    /// At least 16 bytes (the chart generates 32 random ones).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < 16 {
            return Err(format!(
                "the peer secret has {} bytes; it needs at least 16 (the chart generates 32 random bytes)",
                bytes.len()
            ));
        }
        Ok(PeerSecret(bytes))
    }

    /// Read from a file, surrounding whitespace trimmed (a Secret mounted as a file).
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cannot read the peer secret {}: {e}", path.display()))?;
        let trimmed = raw.trim_ascii().to_vec();
        Self::new(trimmed).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerSecret(<redacted>)")
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
    mac(key, parts).finalize().into_bytes().into()
}

/// Compares in constant time.
fn check(key: &[u8], parts: &[&[u8]], got: &[u8]) -> bool {
    mac(key, parts).verify_slice(got).is_ok()
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other end is not a Tidepool peer (bad greeting)")]
    NotAPeer,
    #[error("the other end does not hold this cluster's peer secret")]
    BadSecret,
    #[error("expected peer {expected:?}, the other end is {got:?}")]
    WrongPeer { expected: String, got: String },
    #[error("a frame failed its authentication (altered or out of order)")]
    BadFrame,
    #[error("a frame of {0} bytes is larger than any the protocol sends")]
    TooLarge(usize),
    #[error("bad id: {0}")]
    BadId(String),
}

/// An authenticated connection's framing state.
pub struct Session {
    key: [u8; TAG],
    /// This end's direction byte (0: client, 1: server) and the other's.
    me: u8,
    sent: u64,
    received: u64,
    /// The other end's member id, as its handshake proved it.
    pub peer: String,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

fn check_id(id: &str) -> Result<(), WireError> {
    if id.is_empty() || id.len() > MAX_ID {
        return Err(WireError::BadId(format!(
            "a member id has 1 to {MAX_ID} bytes, not {}",
            id.len()
        )));
    }
    Ok(())
}

async fn read_id<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, WireError> {
    let len = r.read_u8().await? as usize;
    let mut id = vec![0u8; len];
    r.read_exact(&mut id).await?;
    let id = String::from_utf8(id).map_err(|_| WireError::BadId("not UTF-8".into()))?;
    check_id(&id)?;
    Ok(id)
}

/// The server's half of the handshake: the client proves it holds the secret before
/// anything else is read, then the server proves it too.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &PeerSecret,
    me: &str,
) -> Result<Session, WireError> {
    check_id(me)?;
    let nonce_s: [u8; NONCE] = rand::random();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&nonce_s);
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(WireError::NotAPeer);
    }
    let mut nonce_c = [0u8; NONCE];
    s.read_exact(&mut nonce_c).await?;
    let client = read_id(s).await?;
    let mut t = [0u8; TAG];
    s.read_exact(&mut t).await?;
    if !check(
        &secret.0,
        &[b"client", &nonce_s, &nonce_c, client.as_bytes()],
        &t,
    ) {
        return Err(WireError::BadSecret);
    }
    let mut reply = vec![me.len() as u8];
    reply.extend_from_slice(me.as_bytes());
    reply.extend_from_slice(&tag(
        &secret.0,
        &[
            b"server",
            &nonce_s,
            &nonce_c,
            client.as_bytes(),
            me.as_bytes(),
        ],
    ));
    s.write_all(&reply).await?;
    s.flush().await?;
    Ok(Session {
        key: tag(
            &secret.0,
            &[
                b"session",
                &nonce_s,
                &nonce_c,
                client.as_bytes(),
                me.as_bytes(),
            ],
        ),
        me: 1,
        sent: 0,
        received: 0,
        peer: client,
    })
}

/// The client's half: proves it holds the secret and checks that the other end both
/// holds it and is `expect` (the member it meant to reach).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &PeerSecret,
    me: &str,
    expect: &str,
) -> Result<Session, WireError> {
    check_id(me)?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(WireError::NotAPeer);
    }
    let mut nonce_s = [0u8; NONCE];
    s.read_exact(&mut nonce_s).await?;
    let nonce_c: [u8; NONCE] = rand::random();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&nonce_c);
    hello.push(me.len() as u8);
    hello.extend_from_slice(me.as_bytes());
    hello.extend_from_slice(&tag(
        &secret.0,
        &[b"client", &nonce_s, &nonce_c, me.as_bytes()],
    ));
    s.write_all(&hello).await?;
    s.flush().await?;
    let server = read_id(s).await?;
    let mut t = [0u8; TAG];
    s.read_exact(&mut t).await?;
    if !check(
        &secret.0,
        &[
            b"server",
            &nonce_s,
            &nonce_c,
            me.as_bytes(),
            server.as_bytes(),
        ],
        &t,
    ) {
        return Err(WireError::BadSecret);
    }
    if server != expect {
        return Err(WireError::WrongPeer {
            expected: expect.to_owned(),
            got: server,
        });
    }
    Ok(Session {
        key: tag(
            &secret.0,
            &[
                b"session",
                &nonce_s,
                &nonce_c,
                me.as_bytes(),
                server.as_bytes(),
            ],
        ),
        me: 0,
        sent: 0,
        received: 0,
        peer: server,
    })
}

/// Frame kinds.
pub const ASK: u8 = 1;
pub const BLOCK: u8 = 2;
pub const REFUSE: u8 = 3;

impl Session {
    /// Writes one frame (header, payload and tag; `payload` given in parts so a block
    /// is not copied to prepend its header).
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        kind: u8,
        payload: &[&[u8]],
    ) -> Result<(), WireError> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let mut m = mac(&self.key, &[&[self.me], &self.sent.to_be_bytes(), &[kind]]);
        m.update(&(len as u64).to_be_bytes());
        w.write_all(&[kind]).await?;
        w.write_all(&(len as u32).to_be_bytes()).await?;
        for p in payload {
            m.update(p);
            w.write_all(p).await?;
        }
        w.write_all(&m.finalize().into_bytes()).await?;
        w.flush().await?;
        self.sent += 1;
        Ok(())
    }

    /// Reads one frame and checks its tag; `None` at a clean end of the stream.
    pub async fn recv<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<(u8, Bytes)>, WireError> {
        let kind = match r.read_u8().await {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = r.read_u32().await? as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let mut t = [0u8; TAG];
        r.read_exact(&mut t).await?;
        let mut m = mac(
            &self.key,
            &[&[1 - self.me], &self.received.to_be_bytes(), &[kind]],
        );
        m.update(&(len as u64).to_be_bytes());
        m.update(&payload);
        m.verify_slice(&t).map_err(|_| WireError::BadFrame)?;
        self.received += 1;
        Ok(Some((kind, Bytes::from(payload))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> PeerSecret {
        PeerSecret::new(vec![b; 32]).unwrap()
    }

    #[tokio::test]
    async fn both_ends_prove_the_secret_and_frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut s = accept(&mut b, &secret(7), "node-b").await.unwrap();
            assert_eq!(s.peer, "node-a");
            let (kind, p) = s.recv(&mut b).await.unwrap().unwrap();
            s.send(&mut b, BLOCK, &[b"re: ", &p]).await.unwrap();
            kind
        });
        let mut c = connect(&mut a, &secret(7), "node-a", "node-b")
            .await
            .unwrap();
        c.send(&mut a, ASK, &[b"hello"]).await.unwrap();
        let (kind, p) = c.recv(&mut a).await.unwrap().unwrap();
        assert_eq!((kind, &p[..]), (BLOCK, &b"re: hello"[..]));
        assert_eq!(server.await.unwrap(), ASK);
    }

    #[tokio::test]
    async fn a_client_without_the_secret_is_refused_before_it_can_ask() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move { accept(&mut b, &secret(7), "node-b").await });
        let c = connect(&mut a, &secret(8), "node-a", "node-b").await;
        assert!(matches!(server.await.unwrap(), Err(WireError::BadSecret)));
        assert!(
            c.is_err(),
            "the client must not take a server that refused it"
        );
    }

    #[tokio::test]
    async fn a_server_without_the_secret_or_of_another_name_is_not_trusted() {
        // A server that does not hold the secret cannot produce its tag: the client
        // refuses it (it would otherwise take its bytes).
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&[0u8; NONCE]);
            b.write_all(&hello).await.unwrap();
            let mut skip = vec![0u8; 8 + NONCE + 1 + 6 + TAG];
            b.read_exact(&mut skip).await.unwrap();
            let mut reply = vec![6u8];
            reply.extend_from_slice(b"node-b");
            reply.extend_from_slice(&[0u8; TAG]);
            b.write_all(&reply).await.unwrap();
            std::future::pending::<()>().await;
        });
        let c = connect(&mut a, &secret(7), "node-a", "node-b").await;
        assert!(matches!(c, Err(WireError::BadSecret)), "{c:?}");

        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move { accept(&mut b, &secret(7), "node-c").await });
        let c = connect(&mut a, &secret(7), "node-a", "node-b").await;
        assert!(matches!(c, Err(WireError::WrongPeer { .. })), "{c:?}");
    }

    #[tokio::test]
    async fn an_altered_or_replayed_frame_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut s = accept(&mut b, &secret(7), "node-b").await.unwrap();
            // Capture the raw bytes of the client's two frames.
            let mut raw = vec![0u8; 2 * (1 + 4 + 5 + TAG)];
            b.read_exact(&mut raw).await.unwrap();
            let one = raw[..raw.len() / 2].to_vec();
            // A flipped payload byte fails the tag.
            let mut flipped = one.clone();
            flipped[6] ^= 1;
            let mut r = &flipped[..];
            assert!(matches!(s.recv(&mut r).await, Err(WireError::BadFrame)));
            // The first frame is accepted once; given again in place of the second
            // (a replay) it fails.
            let mut s2 = Session {
                key: s.key,
                me: 1,
                sent: 0,
                received: 0,
                peer: s.peer.clone(),
            };
            let mut r = &one[..];
            assert!(s2.recv(&mut r).await.unwrap().is_some());
            let mut r = &one[..];
            assert!(matches!(s2.recv(&mut r).await, Err(WireError::BadFrame)));
        });
        let mut c = connect(&mut a, &secret(7), "node-a", "node-b")
            .await
            .unwrap();
        c.send(&mut a, ASK, &[b"first"]).await.unwrap();
        c.send(&mut a, ASK, &[b"other"]).await.unwrap();
        server.await.unwrap();
    }

    #[test]
    fn a_short_secret_is_refused_and_a_secret_is_never_printed() {
        assert!(
            PeerSecret::new(vec![1; 8])
                .unwrap_err()
                .contains("at least 16")
        );
        let s = PeerSecret::new(b"0123456789abcdef-secret".to_vec()).unwrap();
        assert!(!format!("{s:?}").contains("0123"));
    }
}
