//! A throwaway Azurite (blob service only) on 127.0.0.1.
//!
//! [`Azurite::start`] spawns `<repo>/node_modules/.bin/azurite-blob` (or
//! `$TIDEPOOL_AZURITE_BIN`) on a free port with its data in a fresh temporary
//! directory, always with `--disableTelemetry --skipApiVersionCheck`, and waits until
//! the port accepts connections. [`Azurite::start_https_oauth`] adds TLS with a
//! certificate chain generated for this run (a CA and a leaf for 127.0.0.1, made with
//! the `openssl` command) and `--oauth basic`, so bearer tokens can be tested; pass
//! [`Azurite::options`] (which carries the CA file) to `AzureLake::connect`.
//!
//! Invariants: binds and talks to 127.0.0.1 only; dropping the value kills the process
//! and removes its directory (data, certificates, log).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use azure_core::http::Url;
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};

use crate::lake::azure::sas::AccountKey;
use crate::lake::azure::{AzureLake, AzureOptions, client_options};
use crate::lake::{Credentials, LakeUrl, Secret};

/// Azurite's built-in account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known key for [`ACCOUNT`] (public, documented by Microsoft).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Environment override for the Azurite executable.
pub const ENV_BIN: &str = "TIDEPOOL_AZURITE_BIN";

/// Azurite answers within a second or two; a slow CI machine gets more.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// PEM files of a TLS chain made for one test run.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA to trust (`AzureOptions::ca_file`).
    pub ca: PathBuf,
    /// Leaf certificate for 127.0.0.1 and localhost, signed by `ca`.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Generates a CA and a 127.0.0.1 leaf in `dir` with the `openssl` command.
    pub fn generate(dir: &Path) -> std::io::Result<TlsFiles> {
        let f = |n: &str| dir.join(n);
        let ext = f("leaf.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_pem, key, csr, cert) = (
            p(f("ca.key")),
            p(f("ca.pem")),
            p(f("key.pem")),
            p(f("leaf.csr")),
            p(f("cert.pem")),
        );
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=tidepool test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        let mut leaf = vec!["req"];
        leaf.extend(ec);
        leaf.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
        let ext_s = p(ext);
        let sign = [
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext_s,
        ];
        for args in [ca.as_slice(), leaf.as_slice(), sign.as_slice()] {
            let out = Command::new("openssl")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot run openssl (needed for Azurite over HTTPS): {e}"),
                    )
                })?;
            if !out.status.success() {
                return Err(std::io::Error::other(format!(
                    "openssl {} failed: {}",
                    args[0],
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        Ok(TlsFiles {
            ca: f("ca.pem"),
            cert: f("cert.pem"),
            key: f("key.pem"),
        })
    }
}

/// Whether something at `addr` accepts a connection and, over plain HTTP, answers a
/// request with an HTTP response (any status).
fn answers(addr: &SocketAddr, tls: bool) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) else {
        return false;
    };
    if tls {
        return true;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let request =
        b"GET /devstoreaccount1?comp=list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut head = [0u8; 5];
    s.write_all(request).is_ok() && s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

/// A running Azurite; killed and cleaned up on drop.
pub struct Azurite {
    child: Child,
    port: u16,
    tls: Option<TlsFiles>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Azurite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Azurite({})", self.endpoint())
    }
}

impl Azurite {
    /// Plain HTTP Azurite (SAS and anonymous access). Panics with the reason and the
    /// Azurite log if it does not come up: this is test support.
    pub fn start() -> Azurite {
        Self::spawn(false).unwrap_or_else(|e| panic!("starting Azurite: {e}"))
    }

    /// HTTPS Azurite with `--oauth basic`: accepts SAS and bearer tokens. Trust
    /// [`Azurite::ca_file`] (or use [`Azurite::options`]).
    pub fn start_https_oauth() -> Azurite {
        Self::spawn(true).unwrap_or_else(|e| panic!("starting Azurite with HTTPS: {e}"))
    }

    /// The executable: `$TIDEPOOL_AZURITE_BIN`, else the repository's `node_modules`.
    pub fn bin() -> PathBuf {
        match std::env::var_os(ENV_BIN) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("node_modules/.bin/azurite-blob"),
        }
    }

    fn spawn(https: bool) -> std::io::Result<Azurite> {
        let dir = tempfile::Builder::new()
            .prefix("tidepool-azurite-")
            .tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let tls = if https {
            let certs = dir.path().join("tls");
            std::fs::create_dir(&certs)?;
            Some(TlsFiles::generate(&certs)?)
        } else {
            None
        };
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("azurite.log"))?;
        let bin = Self::bin();
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
        ])
        .arg(&data)
        .args(["--disableTelemetry", "--skipApiVersionCheck", "--silent"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        if let Some(t) = &tls {
            cmd.arg("--cert")
                .arg(&t.cert)
                .arg("--key")
                .arg(&t.key)
                .args(["--oauth", "basic"]);
        }
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot run {}: {e} (run `npm ci` at the repository root, or set {ENV_BIN})",
                    bin.display()
                ),
            )
        })?;
        let mut az = Azurite {
            child,
            port,
            tls,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            // Ready means answering HTTP, not only listening: a request sent the moment
            // the port opens can still be reset on a loaded machine.
            if answers(&addr, az.tls.is_some()) && az.child.try_wait()?.is_none() {
                return Ok(az);
            }
            if let Some(status) = az.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "azurite exited with {status}: {}",
                    az.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "azurite did not listen within {START_TIMEOUT:?}: {}",
                    az.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What Azurite wrote so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("azurite.log")).unwrap_or_default()
    }

    /// The Azurite process (CPU accounting in `make bench`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http(s)://127.0.0.1:<port>/devstoreaccount1/`
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{ACCOUNT}/", self.port)
    }

    /// Path-style lake URL of `container` and `prefix`.
    pub fn url(&self, container: &str, prefix: &str) -> String {
        format!(
            "{}{container}/{}",
            self.endpoint(),
            prefix.trim_start_matches('/')
        )
    }

    /// The CA that signed the HTTPS certificate (HTTPS instances only).
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// The TLS chain of an HTTPS instance, e.g. for a local token endpoint.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Client options that trust this instance.
    pub fn options(&self) -> AzureOptions {
        AzureOptions {
            ca_file: self.ca_file().map(Path::to_path_buf),
            ..AzureOptions::default()
        }
    }

    /// The account key as a credential.
    pub fn account_key() -> Secret {
        Secret::new(ACCOUNT_KEY)
    }

    /// Creates `name` (Ok if it exists), authenticated with an account SAS.
    pub async fn create_container(&self, name: &str) {
        let key = AccountKey::new(ACCOUNT, &Self::account_key()).expect("well-known key is base64");
        let sas = key.account_sas(
            "sco",
            "racwdl",
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc(),
        );
        let mut url = Url::parse(&format!("{}{name}", self.endpoint())).expect("valid URL");
        url.set_query(Some(sas.expose()));
        let options = client_options(&self.options()).expect("client options");
        let client = BlobContainerClient::new(
            url,
            None,
            Some(BlobContainerClientOptions {
                client_options: options,
                ..Default::default()
            }),
        )
        .expect("container client");
        match client.create(None).await {
            Ok(_) => {}
            Err(e) if e.http_status() == Some(azure_core::http::StatusCode::Conflict) => {}
            Err(e) => panic!(
                "creating container {name} in Azurite: {e:?}\n{}",
                self.log()
            ),
        }
    }
}

impl Azurite {
    /// Creates `container` and returns a lake on it authenticated with the account
    /// key (SAS signed by Tidepool), the usual setup of tests, demo and bench.
    pub async fn lake(&self, container: &str) -> AzureLake {
        self.create_container(container).await;
        let url = LakeUrl::parse(&self.url(container, "")).expect("harness URLs parse");
        AzureLake::connect(
            &url,
            &Credentials::AccountKey(Self::account_key()),
            &self.options(),
        )
        .expect("lake on Azurite")
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the OS considers free on 127.0.0.1 now.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}
