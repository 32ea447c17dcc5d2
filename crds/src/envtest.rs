//! A real Kubernetes control plane for tests, the way controller-runtime's envtest does
//! it: `etcd` and `kube-apiserver` (and `kube-controller-manager` when present, for PV
//! binding and garbage collection) run as processes on 127.0.0.1, on free ports, with
//! throwaway certificates and a kubeconfig for a `system:masters` client.
//!
//! Binaries are found as envtest finds them: `$KUBEBUILDER_ASSETS`, else the newest
//! `<version>-linux-amd64` under setup-envtest's directory
//! (`$XDG_DATA_HOME/kubebuilder-envtest/k8s/`, by default
//! `~/.local/share/kubebuilder-envtest/k8s/`). Where they are missing, a test skips
//! (`control_plane_or_skip!`, [`skip`]: one line on the terminal saying what was
//! skipped and why, a failure where `$TIDEPOOL_REQUIRE` names `envtest`; see
//! [`crate::skip`]). Binaries that are there and fail to start fail the test.
//!
//! One control plane serves every test of a test binary ([`shared`]); tests keep apart
//! by namespace and by unique names for cluster-scoped objects. The processes end with
//! the test binary: an exit handler stops them and removes their files, and each is
//! started with `PR_SET_PDEATHSIG` from a thread that lives as long as the process, so
//! even a test binary killed with SIGKILL leaves nothing running.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The environment variable naming the directory of the binaries.
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";

/// Why a control plane is not available or did not start.
#[derive(Debug, thiserror::Error)]
pub enum EnvtestError {
    #[error(
        "no envtest binaries: set {ASSETS_ENV} to a directory holding etcd and kube-apiserver, or install them with `setup-envtest use -p path` (see the README, \"Tests against a real API server\")"
    )]
    NoAssets,
    #[error("{path} is missing (expected etcd and kube-apiserver in {dir})")]
    Missing { path: PathBuf, dir: PathBuf },
    #[error("{what}: {detail}")]
    Start { what: String, detail: String },
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    /// Kubeconfig of a `system:masters` client.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// Kubernetes version of the binaries (from their directory name, e.g. `1.32.13`).
    pub version: String,
    assets: PathBuf,
    controller_manager: bool,
}

/// Children to stop and the directory to remove when the process exits.
static CLEANUP: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

extern "C" fn cleanup_at_exit() {
    let Ok(mut c) = CLEANUP.lock() else { return };
    for pid in c.0.drain(..) {
        // SAFETY: kill(2) on a child this process started; no memory is involved.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    for dir in c.1.drain(..) {
        // The processes may hold files for a moment; what is left is in the temp dir.
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(dir);
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns children from one thread that lives as long as the process, so that
/// `PR_SET_PDEATHSIG` (which fires when the *thread* that forked ends) fires only when
/// the test binary itself dies.
fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("envtest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The senders live in a static: never reached while the process runs.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawner thread");
        // SAFETY: registers a plain `extern "C"` function with no arguments.
        unsafe { libc::atexit(cleanup_at_exit) };
        Mutex::new(tx)
    });
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    tx.lock()
        .map_err(|_| std::io::Error::other("spawner poisoned"))?
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("spawner gone"))?;
    let child = answer
        .recv()
        .map_err(|_| std::io::Error::other("spawner gone"))??;
    CLEANUP.lock().expect("cleanup list").0.push(child.id());
    Ok(child)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The directory holding the binaries, as envtest looks for it.
pub fn assets_dir() -> Result<PathBuf, EnvtestError> {
    if let Some(dir) = std::env::var_os(ASSETS_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").ok_or(EnvtestError::NoAssets)?)
            .join(".local/share"),
    };
    let k8s = data.join("kubebuilder-envtest/k8s");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let suffix = format!("-linux-{arch}");
    let newest = std::fs::read_dir(&k8s)
        .map_err(|_| EnvtestError::NoAssets)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_suffix(&suffix)?.to_owned();
            e.path().join("kube-apiserver").exists().then_some(version)
        })
        .max_by_key(|v| version_key(v))
        .ok_or(EnvtestError::NoAssets)?;
    Ok(k8s.join(format!("{newest}{suffix}")))
}

fn run_openssl(dir: &Path, args: &[&str]) -> Result<(), EnvtestError> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EnvtestError::Start {
            what: "running openssl (install it: apt-get install openssl)".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(EnvtestError::Start {
            what: format!("openssl {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A CA, a `system:masters` client certificate signed by it, and a service-account
/// signing key pair, in `dir/pki`.
fn make_pki(dir: &Path) -> Result<PathBuf, EnvtestError> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| EnvtestError::Start {
        what: format!("creating {}", pki.display()),
        detail: e.to_string(),
    })?;
    std::fs::write(
        pki.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .map_err(|e| EnvtestError::Start {
        what: "writing client.ext".into(),
        detail: e.to_string(),
    })?;
    for args in [
        &["genrsa", "-out", "sa.key", "2048"][..],
        &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=tidepool-envtest-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "admin.key",
            "-out",
            "admin.csr",
            "-subj",
            "/O=system:masters/CN=envtest-admin",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "admin.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "admin.crt",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ],
    ] {
        run_openssl(&pki, args)?;
    }
    Ok(pki)
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, EnvtestError> {
    std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| EnvtestError::Start {
        what: format!("creating the {name} log"),
        detail: e.to_string(),
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl ControlPlane {
    /// Starts a control plane from the binaries in [`assets_dir`].
    pub fn start() -> Result<ControlPlane, EnvtestError> {
        let assets = assets_dir()?;
        for bin in ["etcd", "kube-apiserver"] {
            if !assets.join(bin).exists() {
                return Err(EnvtestError::Missing {
                    path: assets.join(bin),
                    dir: assets.clone(),
                });
            }
        }
        let version = assets
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').next())
            .unwrap_or("unknown")
            .to_owned();
        let dir = std::env::temp_dir().join(format!(
            "tidepool-envtest-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: std::io::Error| EnvtestError::Start {
                what,
                detail: e.to_string(),
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating the control plane's directory"))?;
        CLEANUP.lock().expect("cleanup list").1.push(dir.clone());
        let pki = make_pki(&dir)?;

        // etcd: one member, no fsync (throwaway data), loopback only.
        let (client_port, peer_port) = (
            free_port().map_err(io("a port for etcd"))?,
            free_port().map_err(io("a port for etcd"))?,
        );
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(assets.join("etcd"));
        etcd.arg("--name=envtest")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=envtest={peer_url}"))
            .arg("--unsafe-no-fsync=true")
            .stdin(Stdio::null())
            .stdout(log_file(&dir, "etcd")?)
            .stderr(log_file(&dir, "etcd")?);
        spawn(etcd).map_err(io("starting etcd"))?;

        let port = free_port().map_err(io("a port for kube-apiserver"))?;
        let certs = dir.join("certs");
        let mut apiserver = Command::new(assets.join("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--cert-dir={}", certs.display()))
            .arg(format!("--secure-port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                // On loopback there is no endpoint for the `kubernetes` Service to
                // reconcile; without this the apiserver keeps failing at it.
                "--endpoint-reconciler-type=none",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc",
                // Pods are never run here (no kubelet); their service-account admission
                // would only wait for tokens.
                "--disable-admission-plugins=ServiceAccount",
            ])
            .arg(format!(
                "--service-account-key-file={}",
                pki.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.join("sa.key").display()
            ))
            .arg(format!("--client-ca-file={}", pki.join("ca.crt").display()))
            .stdin(Stdio::null())
            .stdout(log_file(&dir, "kube-apiserver")?)
            .stderr(log_file(&dir, "kube-apiserver")?);
        spawn(apiserver).map_err(io("starting kube-apiserver"))?;

        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        // The apiserver writes its self-signed serving certificate at start.
        let serving = certs.join("apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !serving.exists() {
            if Instant::now() > deadline {
                return Err(EnvtestError::Start {
                    what: "kube-apiserver did not write its serving certificate".into(),
                    detail: tail(&dir.join("kube-apiserver.log")),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: envtest-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: envtest-admin
    namespace: default
current-context: envtest
",
                ca = serving.display(),
                cert = pki.join("admin.crt").display(),
                key = pki.join("admin.key").display(),
            ),
        )
        .map_err(io("writing the kubeconfig"))?;
        let mut cp = ControlPlane {
            dir,
            kubeconfig,
            server,
            version,
            assets,
            controller_manager: false,
        };
        cp.wait_ready()?;
        cp.start_controller_manager(&pki)?;
        Ok(cp)
    }

    /// Polls `/readyz` until the apiserver answers ok.
    fn wait_ready(&self) -> Result<(), EnvtestError> {
        let kubeconfig = self.kubeconfig.clone();
        let deadline = Instant::now() + Duration::from_secs(90);
        // A thread of its own: the caller may be inside an async runtime.
        let ready = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut last = String::new();
                while Instant::now() < deadline {
                    match client_from(&kubeconfig).await {
                        Ok(client) => {
                            let req = http::Request::get("/readyz")
                                .body(Vec::new())
                                .expect("request");
                            match client.request_text(req).await {
                                Ok(body) if body.trim() == "ok" => return Ok(()),
                                Ok(body) => last = body,
                                Err(e) => last = e.to_string(),
                            }
                        }
                        Err(e) => last = e,
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(last)
            })
        })
        .join()
        .map_err(|_| EnvtestError::Start {
            what: "waiting for kube-apiserver".into(),
            detail: "the readiness check panicked".into(),
        })?;
        ready.map_err(|last| EnvtestError::Start {
            what: "kube-apiserver did not become ready within 90 s".into(),
            detail: format!(
                "last answer: {last}\n{}",
                tail(&self.dir.join("kube-apiserver.log"))
            ),
        })
    }

    /// Starts kube-controller-manager if its binary is among the assets (setup-envtest
    /// does not ship it; PV binding and garbage collection need it).
    fn start_controller_manager(&mut self, pki: &Path) -> Result<(), EnvtestError> {
        let bin = self.assets.join("kube-controller-manager");
        if !bin.exists() {
            return Ok(());
        }
        let io = |e: std::io::Error| EnvtestError::Start {
            what: "starting kube-controller-manager".into(),
            detail: e.to_string(),
        };
        let port = free_port().map_err(io)?;
        let mut kcm = Command::new(bin);
        kcm.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args([
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
            ])
            .arg(format!("--secure-port={port}"))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("kcm-certs").display()
            ))
            // Without it the controller manager creates a directory under /usr/libexec.
            .arg(format!(
                "--flex-volume-plugin-dir={}",
                self.dir.join("flexvolume").display()
            ))
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ))
            .arg(format!(
                "--root-ca-file={}",
                self.dir.join("certs/apiserver.crt").display()
            ))
            .arg(format!(
                "--cluster-signing-cert-file={}",
                pki.join("ca.crt").display()
            ))
            .arg(format!(
                "--cluster-signing-key-file={}",
                pki.join("ca.key").display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file(&self.dir, "kube-controller-manager")?)
            .stderr(log_file(&self.dir, "kube-controller-manager")?);
        spawn(kcm).map_err(io)?;
        self.controller_manager = true;
        Ok(())
    }

    /// Whether kube-controller-manager runs (PV binding, garbage collection).
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager
    }

    /// The directory of the binaries in use.
    pub fn assets(&self) -> &Path {
        &self.assets
    }

    /// `kubectl` among the assets, if there.
    pub fn kubectl(&self) -> Option<PathBuf> {
        let p = self.assets.join("kubectl");
        p.exists().then_some(p)
    }

    /// A log of one component (`etcd`, `kube-apiserver`, `kube-controller-manager`),
    /// its last lines, for failure messages.
    pub fn log_tail(&self, component: &str) -> String {
        tail(&self.dir.join(format!("{component}.log")))
    }

    /// A client with the `system:masters` identity.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("client for {}: {e}", self.server))
    }

    /// Installs Tidepool's CRDs (server-side apply of the generated types: the content
    /// of `crds/`) and waits until each is Established. Idempotent.
    pub async fn install_crds(&self, client: &kube::Client) -> Result<(), String> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, Patch, PatchParams};
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crate::generate::crds() {
            let name = kube::ResourceExt::name_any(&crd);
            api.patch(
                &name,
                &PatchParams::apply("tidepool-envtest").force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| format!("the API server refused CRD {name}: {e}"))?;
            wait_established(&api, &name).await?;
        }
        Ok(())
    }
}

/// Waits until the CRD `name` is Established (its API is served).
pub async fn wait_established(
    api: &kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    >,
    name: &str,
) -> Result<(), String> {
    for _ in 0..200 {
        let crd = api.get(name).await.map_err(|e| e.to_string())?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("CRD {name} was not Established within 10 s"))
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// The control plane of this test binary, started on first use; `None` (with the reason
/// in [`unavailable`]) where the binaries are missing or it did not start.
pub fn shared() -> Option<&'static ControlPlane> {
    shared_result().as_ref().ok()
}

/// Why [`shared`] gave `None`.
pub fn unavailable() -> Option<&'static EnvtestError> {
    shared_result().as_ref().err()
}

fn shared_result() -> &'static Result<ControlPlane, EnvtestError> {
    static CP: OnceLock<Result<ControlPlane, EnvtestError>> = OnceLock::new();
    CP.get_or_init(ControlPlane::start)
}

/// Reports a test skipped for want of a real API server (see [`crate::skip`]: loud,
/// logged, and a failure where `$TIDEPOOL_REQUIRE` names `envtest`).
pub fn skip(test: &str, why: &dyn std::fmt::Display) {
    crate::skip::skip(crate::skip::Need::Envtest, test, why);
}

/// The shared control plane for test `test`: `None` only where no envtest binaries
/// are installed (reported with [`skip`]). Binaries that are there and fail to start
/// are a failure, never a skip.
pub fn control_plane_for(test: &str) -> Option<&'static ControlPlane> {
    match shared_result() {
        Ok(cp) => Some(cp),
        Err(EnvtestError::NoAssets) => {
            skip(test, &EnvtestError::NoAssets);
            None
        }
        Err(e) => panic!("{test}: the envtest control plane did not start: {e}"),
    }
}

/// The shared control plane, or a skip line and `return` from the calling test.
#[macro_export]
macro_rules! control_plane_or_skip {
    ($test:expr) => {
        match $crate::envtest::control_plane_for($test) {
            Some(cp) => cp,
            None => return,
        }
    };
}
