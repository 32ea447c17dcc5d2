//! The node agent opens only the lake endpoints its administrator allowed
//! (`--lake-endpoint`), and never sends credentials over plain HTTP unless an
//! `http://` rule names that host. Real `tidepool agent` and `tidepool csi` processes,
//! kubelet's calls over the CSI socket, and a stub "lake" that records every byte sent
//! to it: a volume naming an endpoint that is not allowed is refused in words, nothing
//! stays mounted, and the stub never sees a connection, let alone a key or a token.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool_csi::csi_proto as pb;
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::node::{NodePaths, csi_clients, ro_capability, rw_capability};

/// A TCP listener on a loopback address that records whatever anyone sends to it.
struct Stub {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<u32>>,
    stop: Arc<AtomicBool>,
}

impl Stub {
    fn start(ip: &str) -> Stub {
        let l = TcpListener::bind((ip, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (seen.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut conn, _)) => {
                        *c.lock().unwrap() += 1;
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            s.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Stub {
            port,
            seen,
            connections,
            stop,
        }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn context(kind: &str, url: &str) -> HashMap<String, String> {
    HashMap::from([
        ("tidepool.dev/kind".into(), kind.into()),
        ("tidepool.dev/namespace".into(), "tenant".into()),
        ("tidepool.dev/name".into(), "exfil".into()),
        ("tidepool.dev/uid".into(), format!("uid-{kind}")),
        ("tidepool.dev/url".into(), url.into()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_naming_an_endpoint_that_is_not_allowed_is_refused_before_any_request() {
    // 127.0.0.2 (loopback, not the 127.0.0.1 the test agent allows over HTTP): allowed
    // over HTTPS only, so plain HTTP to it must be refused too.
    let stub = Stub::start("127.0.0.2");
    let other = Stub::start("127.0.0.3");
    let work = tempfile::tempdir().unwrap();
    let paths = NodePaths::new(Path::new(env!("CARGO_BIN_EXE_tidepool")), work.path());
    let _agent = paths.start_agent_with("1GiB", &["--lake-endpoint", "https://127.0.0.2"]);
    let _csi = paths.start_csi();
    let (_, mut node) = csi_clients(&paths.csi_socket).await;

    let cases = [
        (
            "DatasetCache",
            format!("http://127.0.0.2:{}/acct/data/ds", stub.port),
            ro_capability(),
            "this host is allowed over https:// only",
        ),
        (
            "CheckpointSync",
            format!("http://127.0.0.2:{}/acct/ckpt/job", stub.port),
            rw_capability(),
            "this host is allowed over https:// only",
        ),
        (
            "DatasetCache",
            format!("http://127.0.0.3:{}/acct/data/ds", other.port),
            ro_capability(),
            "",
        ),
    ];
    for (i, (kind, url, cap, hint)) in cases.into_iter().enumerate() {
        let e = node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: format!("v{i}"),
                publish_context: Default::default(),
                staging_target_path: work
                    .path()
                    .join(format!("kubelet/staging/v{i}"))
                    .display()
                    .to_string(),
                volume_capability: Some(cap),
                secrets: HashMap::from([("accountKey".into(), ACCOUNT_KEY.into())]),
                volume_context: context(kind, &url),
            })
            .await
            .expect_err("staging a volume on an endpoint that is not allowed");
        let m = e.message();
        assert!(
            m.contains("is not allowed on this node"),
            "{kind} {url}: {m}"
        );
        assert!(
            m.contains("https://127.0.0.2") && m.contains("http://127.0.0.1"),
            "the refusal names what is allowed: {m}"
        );
        assert!(
            m.contains("node.lake.allowedEndpoints"),
            "and how to change it: {m}"
        );
        assert!(m.contains(hint), "{m}");
        assert!(
            !m.contains(ACCOUNT_KEY),
            "no credential in the message: {m}"
        );
    }
    assert_eq!(paths.mounts_left(), Vec::<std::path::PathBuf>::new());
    // Give a request that should not exist time to arrive, then look.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in [&stub, &other] {
        assert_eq!(
            *s.connections.lock().unwrap(),
            0,
            "no connection to a host that is not allowed; it received {:?}",
            String::from_utf8_lossy(&s.seen.lock().unwrap())
        );
    }
}
