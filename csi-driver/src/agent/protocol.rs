//! The node-local protocol between the CSI plugin and the node agent, over a Unix
//! socket (mode 0600, root only).
//!
//! One request, one response, in lockstep on a connection. A frame is a little-endian
//! u32 length and that many bytes of JSON; descriptors (the /dev/fuse file of a staged
//! volume) travel with a frame's first byte as `SCM_RIGHTS`. Lockstep means a reader
//! never has more than one frame in flight, so descriptors can never be attributed to
//! the wrong frame.
//!
//! Secrets from `NodeStageVolume` cross this socket inside [`StageSecrets`], whose
//! `Debug` never shows them; nothing here logs a request's body.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidepool_api::volume::VolumeAttributes;

use crate::fdpass;

/// Largest frame accepted (a request is a few KiB; this bounds a bad peer's cost).
const MAX_FRAME: usize = 1 << 20;

/// `NodeStageVolume` secrets (the DatasetCache's Secret): never printed.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageSecrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for StageSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageSecrets({} keys, redacted)", self.0.len())
    }
}

// A message read once per call and dropped: boxing the large variant saves nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up (CSI `Probe`)?
    Ping,
    /// Serve the FUSE connection attached to this frame as volume `volume_id`, mounted
    /// at `staging_path`. `fresh`: the plugin has just mounted it (INIT is pending);
    /// otherwise it is a live connection another agent process served (resume).
    Serve {
        volume_id: String,
        staging_path: PathBuf,
        attributes: VolumeAttributes,
        secrets: StageSecrets,
        fresh: bool,
    },
    /// The volume was unstaged: forget it.
    Release { volume_id: String },
    /// Usage and health of a served volume (CSI `NodeGetVolumeStats`).
    Stats { volume_id: String },
    /// Which volumes are served now.
    Served,
    /// Duplicates of the descriptors of the served volumes (for a restarted plugin),
    /// in volume id order: at most `fdpass::MAX_FDS` per answer, those after `after`;
    /// the answer says whether more follow. (A request without `after` is the first
    /// page, which is all that a plugin of before paging asked for.)
    Descriptors {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
}

/// A failure, classified for the CSI side's gRPC status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    PermissionDenied,
    Unavailable,
    ResourceExhausted,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeStats {
    /// Bytes of the dataset's current snapshot.
    pub bytes_total: u64,
    /// Of those, bytes cached on this node.
    pub bytes_cached: u64,
    /// Files and directories in the snapshot.
    pub objects: u64,
    /// Set when the volume cannot serve reads right now, with why.
    pub abnormal: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Pong {
        node: String,
        version: String,
    },
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    Stats(VolumeStats),
    Served {
        volumes: Vec<String>,
    },
    /// Descriptors attached in this order, with each volume's stage secrets (held in
    /// memory only, so a restarted plugin can hand them to a later agent).
    Descriptors {
        volumes: Vec<String>,
        #[serde(default)]
        secrets: Vec<StageSecrets>,
        /// More volumes follow the last one here: ask again with it as `after`.
        #[serde(default)]
        more: bool,
    },
}

/// Writes one frame with `fds` attached.
pub fn write_frame(sock: &UnixStream, body: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let json = serde_json::to_vec(body).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&json);
    if fds.is_empty() {
        (&*sock).write_all(&frame)
    } else {
        fdpass::send(sock, &frame, fds)
    }
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut len = [0u8; 4];
    let (n, fds) = fdpass::recv(sock, &mut len)?;
    if n == 0 {
        return Ok(None);
    }
    if n < 4 {
        (&*sock).read_exact(&mut len[n..])?;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes refused"),
        ));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let value =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((value, fds)))
}

/// What a lockstep client talks to: its request type names the peer in errors.
/// Most connections a node socket (the agent's, the keeper's) serves at once: the
/// plugin connects once per call, so this is how many of its calls run together. More
/// wait in the socket's backlog until one ends, rather than each taking a thread.
pub const MAX_CLIENTS: usize = 128;

/// A connection that sends nothing for this long is closed (the plugin sends its
/// request at once; a client that stalls would hold a slot).
pub const IDLE_CLIENT: std::time::Duration = std::time::Duration::from_secs(120);

/// Serves the connections of `listener`, each on a thread of its own, at most `max` at
/// once, refusing peers that are not root ([`fdpass::peer_allowed`]); a read that
/// waits longer than `idle` fails, so a client that sends nothing gives its slot back
/// ([`IDLE_CLIENT`] in the agent and the keeper). Runs until the listener fails.
pub fn serve_clients(
    listener: std::os::unix::net::UnixListener,
    socket: &'static str,
    max: usize,
    idle: std::time::Duration,
    serve: impl Fn(UnixStream) + Send + Sync + 'static,
) {
    let serve = std::sync::Arc::new(serve);
    let slots = std::sync::Arc::new((parking_lot::Mutex::new(0usize), parking_lot::Condvar::new()));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if !fdpass::peer_allowed(&conn, socket) {
            continue; // dropped: closed unanswered
        }
        let _ = conn.set_read_timeout(Some(idle));
        {
            let (busy, freed) = &*slots;
            let mut busy = busy.lock();
            while *busy >= max {
                freed.wait(&mut busy);
            }
            *busy += 1;
        }
        let (serve, slot) = (serve.clone(), slots.clone());
        let release = move || {
            let (busy, freed) = &*slot;
            *busy.lock() -= 1;
            freed.notify_one();
        };
        let release2 = release.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{socket}-client"))
            .spawn(move || {
                serve(conn);
                release();
            });
        if let Err(e) = spawned {
            tracing::warn!(socket, error = %e, "cannot start a thread for a connection; closed it");
            release2();
        }
    }
}

pub trait Peer: Serialize {
    /// The peer as errors name it ("node agent").
    const NAME: &'static str;
    type Response: for<'de> Deserialize<'de>;
}

impl Peer for Request {
    const NAME: &'static str = "node agent";
    type Response = Response;
}

/// A lockstep connection over a Unix socket (the plugin's to the agent, and to the
/// keeper): one request and its answer at a time, descriptors attached to either.
pub struct FrameClient<Req> {
    sock: UnixStream,
    _req: std::marker::PhantomData<fn(Req)>,
}

/// A connection to the agent, as the CSI plugin and the sync sidecar hold it.
pub type AgentClient = FrameClient<Request>;

impl<Req: Peer> FrameClient<Req> {
    pub fn connect(path: &std::path::Path, timeout: std::time::Duration) -> io::Result<Self> {
        let sock = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} not reachable at {}: {e}", Req::NAME, path.display()),
            )
        })?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(FrameClient {
            sock,
            _req: std::marker::PhantomData,
        })
    }

    /// One round trip; descriptors sent with the request, received with the answer.
    pub fn call(&self, req: &Req, fds: &[RawFd]) -> io::Result<(Req::Response, Vec<OwnedFd>)> {
        write_frame(&self.sock, req, fds)?;
        read_frame(&self.sock)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the {} closed the connection", Req::NAME),
            )
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_descriptors_and_never_print_secrets() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let req = Request::Serve {
            volume_id: "v1".into(),
            staging_path: "/staging".into(),
            attributes: tidepool_api::volume::VolumeAttributes::parse(&BTreeMap::from([
                ("tidepool.dev/kind".to_owned(), "DatasetCache".to_owned()),
                ("tidepool.dev/namespace".to_owned(), "ml".to_owned()),
                ("tidepool.dev/name".to_owned(), "d".to_owned()),
                ("tidepool.dev/uid".to_owned(), "u".to_owned()),
                (
                    "tidepool.dev/url".to_owned(),
                    "http://127.0.0.1:1/acct/c/p".to_owned(),
                ),
            ]))
            .unwrap(),
            secrets: StageSecrets(BTreeMap::from([(
                "sasToken".to_owned(),
                "sig=SECRET".to_owned(),
            )])),
            fresh: true,
        };
        assert!(!format!("{req:?}").contains("SECRET"));
        write_frame(&a, &req, &[f.as_raw_fd()]).unwrap();
        write_frame(&a, &Request::Ping, &[]).unwrap();
        let (got, fds) = read_frame::<Request>(&b).unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
        let (got, fds) = read_frame::<Request>(&b).unwrap().unwrap();
        assert_eq!((got, fds.len()), (Request::Ping, 0));
        drop(a);
        assert!(read_frame::<Request>(&b).unwrap().is_none());
    }

    /// A client that connects and sends nothing is closed after the idle time, and the
    /// slot it held serves the next client (with one slot: otherwise it would wait
    /// forever).
    #[test]
    fn an_idle_client_gives_its_slot_back() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            serve_clients(
                listener,
                "test",
                1,
                std::time::Duration::from_millis(300),
                |mut conn| {
                    let mut b = [0u8; 1];
                    if conn.read_exact(&mut b).is_ok() {
                        let _ = conn.write_all(&b);
                    }
                },
            )
        });
        let mut silent = UnixStream::connect(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut next = UnixStream::connect(&path).unwrap();
        next.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        next.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        next.read_exact(&mut b)
            .expect("served once the silent client was closed");
        assert_eq!(&b, b"x");
        // The silent one was closed: it reads the end of the stream.
        silent
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(silent.read(&mut b).unwrap(), 0);
    }

    /// No more than `max` connections are served at once; the others wait (none is
    /// refused or lost) and are served as slots free up.
    #[test]
    fn connections_beyond_the_limit_wait_for_a_slot() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, mpsc};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(parking_lot::Mutex::new(go_rx));
        {
            let (running, most, served) = (running.clone(), most.clone(), served.clone());
            std::thread::spawn(move || {
                serve_clients(listener, "test", 4, IDLE_CLIENT, move |_conn| {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    go_rx.lock().recv().unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                    served.fetch_add(1, Ordering::SeqCst);
                })
            });
        }
        let clients: Vec<UnixStream> = (0..10)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let wait_for = |what: &dyn Fn() -> bool| {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !what() {
                assert!(std::time::Instant::now() < end, "timed out");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        wait_for(&|| running.load(Ordering::SeqCst) == 4);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(running.load(Ordering::SeqCst), 4, "the fifth waits");
        for _ in 0..10 {
            go_tx.send(()).unwrap();
        }
        wait_for(&|| served.load(Ordering::SeqCst) == 10);
        assert_eq!(most.load(Ordering::SeqCst), 4);
        drop(clients);
    }
}
