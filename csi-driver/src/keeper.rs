//! `tidepool keeper`: holds a duplicate of every staged volume's /dev/fuse descriptor,
//! in a pod of its own, so that the volumes' FUSE connections outlive the node pod.
//!
//! Why: a FUSE connection ends when the last descriptor of its /dev/fuse file closes.
//! The plugin and the agent each hold one and hand them to each other when one of them
//! restarts (see `csi/node.rs`), but they share the node pod: replacing that pod (a
//! `helm upgrade`, a deleted pod) used to close both at once, and every pod reading a
//! volume on that node got `ENOTCONN` (its mount namespace keeps the dead mount; a new
//! mount on the host does not reach it). The keeper is a third holder with nothing to
//! upgrade often: it only stores descriptors and gives them back. When a new plugin
//! starts it takes the descriptors back from the keeper, finds the connections alive
//! and hands them to the new agent, which resumes serving them (requests the old agent
//! had read and not answered are resent by the kernel).
//!
//! The plugin keeps the keeper in step every second (`NodeCore::keep_keeper_fed`):
//! volumes it holds that the keeper does not are sent (`Keep`, with the descriptor), and
//! so are volumes whose stage secrets changed since (kubelet staged the volume again
//! with a rotated SAS); volumes the keeper holds that are no longer staged are dropped
//! (`Drop`). A keeper that restarts has lost nothing the plugin or agent still holds
//! and is fed again.
//!
//! With each descriptor it holds the volume's stage secrets (kubelet's
//! `nodeStageSecretRef`), in memory only, as the plugin and the agent do: after both
//! died, they are what lets the new agent fetch what is not cached yet. Never printed.
//!
//! The protocol is the agent's framing (`agent/protocol.rs`: length and JSON, the
//! descriptor as `SCM_RIGHTS`, one request and one answer in lockstep) on a socket of
//! mode 0600. Holding a descriptor costs the keeper one table entry.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::agent::protocol::{FrameClient, Peer, StageSecrets, read_frame, write_frame};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KeeperRequest {
    /// Hold the descriptor attached to this frame as volume `volume_id`, with its stage
    /// secrets (replacing whatever was held for it).
    Keep {
        volume_id: String,
        #[serde(default)]
        secrets: StageSecrets,
    },
    /// Close the descriptor of `volume_id` (the volume was unstaged).
    Drop { volume_id: String },
    /// Which volumes are held.
    Held,
    /// Duplicates of the held descriptors, in the order of the answer's `volumes`: at
    /// most `fdpass::MAX_FDS` per answer, the volumes after `after` in id order; the
    /// answer says whether more follow.
    Descriptors {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum KeeperResponse {
    Ok,
    Held {
        volumes: Vec<String>,
    },
    /// The volumes, their stage secrets (in the same order) and, attached, their
    /// descriptors.
    Descriptors {
        volumes: Vec<String>,
        secrets: Vec<StageSecrets>,
        /// More volumes follow the last one here: ask again with it as `after`.
        #[serde(default)]
        more: bool,
    },
    Error {
        message: String,
    },
}

/// The descriptors held (and the volumes' stage secrets), by volume id.
#[derive(Default)]
pub struct Keeper {
    held: Mutex<BTreeMap<String, (OwnedFd, StageSecrets)>>,
}

impl Keeper {
    /// Answers one request (with the descriptors that came with it); returns the
    /// answer and the descriptors to send with it.
    pub fn handle(
        &self,
        req: KeeperRequest,
        mut fds: Vec<OwnedFd>,
    ) -> (KeeperResponse, Vec<OwnedFd>) {
        match req {
            KeeperRequest::Keep { volume_id, secrets } => {
                if fds.len() != 1 {
                    return (
                        KeeperResponse::Error {
                            message: format!(
                                "keep {volume_id}: expected one descriptor with the request, got {}",
                                fds.len()
                            ),
                        },
                        Vec::new(),
                    );
                }
                let fd = fds.pop().expect("one descriptor");
                tracing::info!(volume = %volume_id, "holding the volume's FUSE connection");
                self.held.lock().insert(volume_id, (fd, secrets));
                (KeeperResponse::Ok, Vec::new())
            }
            KeeperRequest::Drop { volume_id } => {
                if self.held.lock().remove(&volume_id).is_some() {
                    tracing::info!(volume = %volume_id, "released the volume's FUSE connection");
                }
                (KeeperResponse::Ok, Vec::new())
            }
            KeeperRequest::Held => (
                KeeperResponse::Held {
                    volumes: self.live().keys().cloned().collect(),
                },
                Vec::new(),
            ),
            KeeperRequest::Descriptors { after } => {
                let held = self.live();
                let mut volumes = Vec::new();
                let mut secrets = Vec::new();
                let mut out = Vec::new();
                let mut more = false;
                let from = match &after {
                    Some(a) => held.range::<String, _>((
                        std::ops::Bound::Excluded(a),
                        std::ops::Bound::Unbounded,
                    )),
                    None => held.range::<String, _>(..),
                };
                for (id, (fd, s)) in from {
                    if out.len() == crate::fdpass::MAX_FDS {
                        more = true;
                        break;
                    }
                    if let Ok(d) = fd.try_clone() {
                        volumes.push(id.clone());
                        secrets.push(s.clone());
                        out.push(d);
                    }
                }
                (
                    KeeperResponse::Descriptors {
                        volumes,
                        secrets,
                        more,
                    },
                    out,
                )
            }
        }
    }

    /// The table, without the connections that ended (unmounted or aborted): a volume
    /// unstaged and staged again within a second is held anew, with its new connection.
    fn live(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, (OwnedFd, StageSecrets)>> {
        let mut held = self.held.lock();
        held.retain(|id, (fd, _)| {
            let alive = crate::csi::node::connection_alive(fd);
            if !alive {
                tracing::info!(volume = %id, "released the volume's FUSE connection (it ended)");
            }
            alive
        });
        held
    }

    fn serve_connection(&self, sock: UnixStream) {
        loop {
            let (req, fds) = match read_frame::<KeeperRequest>(&sock) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "a keeper client sent a bad frame; closing it");
                    return;
                }
            };
            let (resp, out) = self.handle(req, fds);
            let raw: Vec<RawFd> = out.iter().map(|f| f.as_raw_fd()).collect();
            if write_frame(&sock, &resp, &raw).is_err() {
                return;
            }
        }
    }
}

/// Serves the keeper on `listener` until the process ends: a thread per client, at
/// most `MAX_CLIENTS` at once, root peers only.
pub fn serve(keeper: Arc<Keeper>, listener: UnixListener) -> io::Result<()> {
    use crate::agent::protocol::{IDLE_CLIENT, MAX_CLIENTS, serve_clients};
    serve_clients(listener, "keeper", MAX_CLIENTS, IDLE_CLIENT, move |conn| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        keeper.serve_connection(conn)
    });
    Ok(())
}

/// A connection to the keeper, as the plugin holds it.
pub type KeeperClient = FrameClient<KeeperRequest>;

impl Peer for KeeperRequest {
    const NAME: &'static str = "keeper";
    type Response = KeeperResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// More volumes than one message carries: every one comes back, page by page, over
    /// the socket, each page within the limit (a node with 65+ volumes once lost the
    /// rest silently).
    #[test]
    fn more_descriptors_than_one_message_carries_come_back_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let keeper = Arc::new(Keeper::default());
        std::thread::spawn({
            let k = keeper.clone();
            move || serve(k, listener)
        });
        let total = 2 * crate::fdpass::MAX_FDS + 22;
        let mut ends = Vec::new();
        let client = KeeperClient::connect(&socket, Duration::from_secs(5)).unwrap();
        for i in 0..total {
            let (a, b) = UnixStream::pair().unwrap();
            let keep = KeeperRequest::Keep {
                volume_id: format!("v{i:03}"),
                secrets: StageSecrets::default(),
            };
            let (resp, _) = client.call(&keep, &[b.as_raw_fd()]).unwrap();
            assert_eq!(resp, KeeperResponse::Ok);
            ends.push(a);
        }
        let mut after = None;
        let mut got = Vec::new();
        let mut pages = Vec::new();
        loop {
            let (resp, fds) = client
                .call(
                    &KeeperRequest::Descriptors {
                        after: after.take(),
                    },
                    &[],
                )
                .unwrap();
            let KeeperResponse::Descriptors { volumes, more, .. } = resp else {
                panic!("{resp:?}");
            };
            assert_eq!(fds.len(), volumes.len());
            pages.push(volumes.len());
            after = volumes.last().cloned();
            got.extend(volumes.into_iter().zip(fds));
            if !more {
                break;
            }
        }
        assert_eq!(pages, [crate::fdpass::MAX_FDS, crate::fdpass::MAX_FDS, 22]);
        let want: Vec<String> = (0..total).map(|i| format!("v{i:03}")).collect();
        let ids: Vec<&String> = got.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, want.iter().collect::<Vec<_>>());
        // Each descriptor is its own volume's: what its peer writes, it reads.
        for (i, (_, fd)) in got.into_iter().enumerate() {
            ends[i].write_all(&[i as u8]).unwrap();
            let mut back = UnixStream::from(fd);
            let mut b = [0u8; 1];
            back.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
    }

    #[test]
    fn a_kept_descriptor_comes_back_as_the_same_open_file_and_drop_closes_it() {
        let keeper = Keeper::default();
        let (mut a, b) = UnixStream::pair().unwrap();
        let secrets = StageSecrets(
            [("sasToken".to_owned(), "sig=SECRET".to_owned())]
                .into_iter()
                .collect(),
        );
        let keep = KeeperRequest::Keep {
            volume_id: "v1".into(),
            secrets: secrets.clone(),
        };
        assert!(!format!("{keep:?}").contains("SECRET"), "never printed");
        let (resp, _) = keeper.handle(keep, vec![OwnedFd::from(b)]);
        assert_eq!(resp, KeeperResponse::Ok);
        let (resp, fds) = keeper.handle(KeeperRequest::Descriptors { after: None }, Vec::new());
        assert_eq!(
            resp,
            KeeperResponse::Descriptors {
                volumes: vec!["v1".into()],
                secrets: vec![secrets],
                more: false,
            }
        );
        // The duplicate is the same socket: what `a` writes, it reads.
        let mut back = UnixStream::from(fds.into_iter().next().unwrap());
        a.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        back.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        drop(back);
        let (resp, _) = keeper.handle(
            KeeperRequest::Drop {
                volume_id: "v1".into(),
            },
            Vec::new(),
        );
        assert_eq!(resp, KeeperResponse::Ok);
        // The keeper's copy was the last one: the peer sees the end.
        let mut rest = Vec::new();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(a.read_to_end(&mut rest).unwrap(), 0);
        let (resp, _) = keeper.handle(KeeperRequest::Held, Vec::new());
        assert_eq!(resp, KeeperResponse::Held { volumes: vec![] });
    }

    #[test]
    fn keep_without_a_descriptor_is_refused_in_words() {
        let keeper = Keeper::default();
        let (resp, _) = keeper.handle(
            KeeperRequest::Keep {
                volume_id: "v1".into(),
                secrets: StageSecrets::default(),
            },
            Vec::new(),
        );
        match resp {
            KeeperResponse::Error { message } => {
                assert!(message.contains("expected one descriptor"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
