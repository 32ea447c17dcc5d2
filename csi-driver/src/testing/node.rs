//! A node as tests and the bench run it: the real `tidepool agent` (without an API
//! server) and `tidepool csi` processes, and a CSI client over the plugin's socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::csi_proto as pb;
use crate::csi_proto::identity_client::IdentityClient;
use crate::csi_proto::node_client::NodeClient;

/// One of the node's processes, killed on drop.
pub struct NodeProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Paths of a test node under one work directory.
#[derive(Clone, Debug)]
pub struct NodePaths {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub pool: PathBuf,
    pub agent_socket: PathBuf,
    pub csi_socket: PathBuf,
    pub keeper_socket: PathBuf,
    pub state: PathBuf,
    /// The node's name (`--node-name`, `--node-id`); `test-node` unless set.
    pub node: String,
}

impl NodePaths {
    pub fn new(bin: &Path, work: &Path) -> Self {
        NodePaths {
            bin: bin.to_owned(),
            work: work.to_owned(),
            pool: work.join("pool"),
            agent_socket: work.join("agent.sock"),
            csi_socket: work.join("csi.sock"),
            keeper_socket: work.join("keeper/keeper.sock"),
            state: work.join("csi-state"),
            node: "test-node".to_owned(),
        }
    }

    /// Mounts left under the work directory (the pods' targets, the staging mounts).
    pub fn mounts_left(&self) -> Vec<PathBuf> {
        let Ok(work) = self.work.canonicalize() else {
            return Vec::new();
        };
        crate::mounts::mount_points()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.starts_with(&work))
            .collect()
    }

    /// Detaches every mount left under the work directory, deepest first, so a failed
    /// test leaves none behind (detached: its server may be gone).
    pub fn detach_mounts(&self) {
        let mut left = self.mounts_left();
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in left {
            let _ = crate::mounts::detach_path(&p);
        }
    }

    fn spawn(&self, name: &str, args: &[&std::ffi::OsStr]) -> NodeProcess {
        let log = self.work.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(&self.bin)
            .args(args)
            .env("TIDEPOOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        NodeProcess { child, log }
    }

    /// `tidepool agent --no-kube` on this node's pool; returns once its socket answers.
    pub fn start_agent(&self, cache_size: &str) -> NodeProcess {
        self.start_agent_with(cache_size, &[])
    }

    /// `tidepool agent --no-kube` with extra arguments. The test lakes (Azurite) are on
    /// 127.0.0.1 over HTTP, which the agent allows only when told
    /// (`--lake-endpoint http://127.0.0.1`); no other endpoint is allowed unless `extra`
    /// adds it.
    pub fn start_agent_with(&self, cache_size: &str, extra: &[&str]) -> NodeProcess {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "agent".as_ref(),
            "--no-kube".as_ref(),
            "--lake-endpoint".as_ref(),
            "http://127.0.0.1".as_ref(),
            "--node-name".as_ref(),
            self.node.as_ref(),
            "--cache-size".as_ref(),
            cache_size.as_ref(),
            "--cache-dir".as_ref(),
            self.pool.as_os_str(),
            "--socket".as_ref(),
            self.agent_socket.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let p = self.spawn("agent", &args);
        wait_socket(&self.agent_socket, &p);
        p
    }

    /// `tidepool csi`; returns once its socket answers.
    pub fn start_csi(&self) -> NodeProcess {
        self.start_csi_with(&[])
    }

    /// `tidepool csi` with extra arguments.
    pub fn start_csi_with(&self, extra: &[&std::ffi::OsStr]) -> NodeProcess {
        let endpoint = format!("unix://{}", self.csi_socket.display());
        let _ = std::fs::remove_file(&self.csi_socket);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "csi".as_ref(),
            "--endpoint".as_ref(),
            endpoint.as_ref(),
            "--node-id".as_ref(),
            self.node.as_ref(),
            "--agent-socket".as_ref(),
            self.agent_socket.as_os_str(),
            "--state-dir".as_ref(),
            self.state.as_os_str(),
        ];
        args.extend_from_slice(extra);
        let p = self.spawn("csi", &args);
        wait_socket(&self.csi_socket, &p);
        p
    }

    /// `tidepool csi --keeper-socket` pointing at this node's keeper.
    pub fn start_csi_kept(&self) -> NodeProcess {
        self.start_csi_with(&["--keeper-socket".as_ref(), self.keeper_socket.as_os_str()])
    }

    /// `tidepool keeper` on this node; returns once its socket answers.
    pub fn start_keeper(&self) -> NodeProcess {
        let p = self.spawn(
            "keeper",
            &[
                "keeper".as_ref(),
                "--socket".as_ref(),
                self.keeper_socket.as_os_str(),
            ],
        );
        wait_socket(&self.keeper_socket, &p);
        p
    }
}

fn wait_socket(path: &Path, p: &NodeProcess) {
    let end = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < end,
            "{} did not come up:\n{}",
            path.display(),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CSI clients over the plugin's Unix socket.
pub async fn csi_clients(
    socket: &Path,
) -> (
    IdentityClient<tonic::transport::Channel>,
    NodeClient<tonic::transport::Channel>,
) {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")
        .expect("static URI")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect to the CSI socket");
    (
        IdentityClient::new(channel.clone()),
        NodeClient::new(channel),
    )
}

/// A read-only mount capability, as kubelet sends it for a dataset PVC.
pub fn ro_capability() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly as i32,
        }),
    }
}

/// A read-write mount capability, as kubelet sends it for a checkpoint PVC.
pub fn rw_capability() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// `NodeGetVolumeStats` of `volume_id` at `path`; panics on an error (test support).
pub async fn volume_stats(
    node: &mut NodeClient<tonic::transport::Channel>,
    volume_id: &str,
    path: &Path,
) -> pb::NodeGetVolumeStatsResponse {
    node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeGetVolumeStats of {volume_id}: {e}"))
    .into_inner()
}

/// A free TCP address on 127.0.0.1 (for `--admin-addr`).
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` from the agent's admin server: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (with its labels, as exposed) in `metrics`.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
}
