//! `tidepool agent`: the node agent as a process (see `crate::agent`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{parse_size, say};
use crate::agent::datasets::LakeSettings;
use crate::agent::{Agent, AgentConfig, bind_socket, serve_socket};
use crate::cache::{CacheConfig, CachePool};
use crate::lake::azure::AzureOptions;
use crate::lake::endpoints::{EndpointPolicy, EndpointRule};
use crate::lake::retry::RetryConfig;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's name (its CachePool is named after it).
    #[arg(long, env = "NODE_NAME", value_name = "NODE")]
    pub node_name: String,
    /// The node's cache pool directory on local NVMe (a hostPath in a cluster).
    #[arg(long, default_value = "/var/lib/tidepool", value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// Pool capacity: files are evicted (least recently used first) above 90% of it, and
    /// whenever the pool's disk has less than an eighth of it (at most 1 GiB) free, until
    /// twice that is free.
    #[arg(long, default_value = "100GiB", value_parser = parse_size, value_name = "SIZE")]
    pub cache_size: u64,
    /// Listing requests in flight while a dataset's listing is taken (its directories
    /// listed at once, small ones together); 1 lists it with one request at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256), value_name = "N")]
    pub list_parallelism: u16,
    /// Where the CSI plugin reaches the agent (default: <cache-dir>/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Kubeconfig (default: in-cluster, else $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Serve only what the CSI plugin stages (volume attributes and stage secrets), and
    /// never talk to the API server: no CachePool, no prewarm of assignments.
    #[arg(long)]
    pub no_kube: bool,
    /// How often the pool's status is written (at most 30 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub heartbeat: Duration,
    /// FUSE worker threads per volume.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub threads: usize,
    /// Never use FUSE passthrough, even for fully cached files.
    #[arg(long)]
    pub no_passthrough: bool,
    /// Extra trusted CA certificates (PEM) for private endpoints or proxies.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Attempts per lake request.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub retries: u32,
    /// Timeout of one lake request attempt.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
    /// Longest a lake request may take, retries included.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub deadline: Duration,
    /// Files each checkpoint volume uploads at the same time. The agent uploads the
    /// committed steps of every checkpoint volume in its pool, mounted or not, with
    /// the credentials of the volume's stage secrets or of its CheckpointSync.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub sync_parallel: usize,
    /// A lake endpoint this agent may open, and send credentials to (repeat for more).
    /// `*.<domain>` allows its hosts over HTTPS, `https://<host>[:<port>]` one host,
    /// `http://<host>[:<port>]` one host over plain HTTP (an emulator such as Azurite:
    /// credentials then travel in clear text). A DatasetCache, CheckpointSync or staged
    /// volume naming another endpoint is refused before any request, in words. Given
    /// once or more, the list replaces the default: Azure's blob endpoints
    /// (*.blob.core.windows.net, *.blob.storage.azure.net, *.blob.core.usgovcloudapi.net,
    /// *.blob.core.chinacloudapi.cn).
    #[arg(long = "lake-endpoint", value_name = "RULE")]
    pub lake_endpoints: Vec<EndpointRule>,
    /// A namespace whose DatasetCaches and CheckpointSyncs may use this node's managed
    /// identity (`credentials.managedIdentity`; repeat for more, `*` for every
    /// namespace). By default none may: the node's identity belongs to the platform,
    /// and an object elsewhere that asks for it is refused, in words.
    #[arg(long = "managed-identity-namespace", value_name = "NAMESPACE")]
    pub managed_identity_namespaces: Vec<String>,
    /// Serve `/livez`, `/readyz` and `/metrics` (Prometheus: the pool's bytes, bytes
    /// fetched from the lake and evicted, each volume's reads, opens and errors, each
    /// checkpoint volume's upload backlog) over plain HTTP on this address, e.g.
    /// `0.0.0.0:9090`. Off when not given.
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Share this node's cache with the cluster's other agents, serving them on this
    /// address (e.g. `0.0.0.0:7446`): a block of a dataset is fetched from the lake by
    /// one node (its owner) and from that node by the others. Members are the agents
    /// whose CachePool status names a peer endpoint (needs the API server). Off when
    /// not given.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers reach this agent at, published in its CachePool status:
    /// `IP:PORT`, or an IP alone (the port of --peer-listen). Default: the address of
    /// --peer-listen, which must then name an IP.
    #[arg(long, value_name = "IP[:PORT]", requires = "peer_listen")]
    pub peer_advertise: Option<String>,
    /// The cluster's peer secret (at least 16 bytes; surrounding whitespace ignored):
    /// agents prove to each other that they hold it, and it never crosses the network.
    /// Required with --peer-listen.
    #[arg(long, value_name = "FILE", requires = "peer_listen")]
    pub peer_secret_file: Option<PathBuf>,
    /// The longest wait for a peer's answer, and for each block after it, before the
    /// rest is fetched from the lake; a peer that fails is passed over for 10 s.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub peer_timeout: Duration,
    /// Take blocks from peers but serve none (a node about to go away): no block is
    /// placed on this node.
    #[arg(long, requires = "peer_listen")]
    pub peer_no_serve: bool,
}

/// Where peers reach an agent listening on `listen`: `advertise` (`IP:PORT` or an IP
/// with the listen port), else the listen address if it names an IP.
pub fn peer_advertise(
    listen: std::net::SocketAddr,
    advertise: Option<&str>,
) -> anyhow::Result<std::net::SocketAddr> {
    match advertise {
        Some(a) => a
            .parse::<std::net::SocketAddr>()
            .or_else(|_| {
                a.trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .map(|ip| std::net::SocketAddr::new(ip, listen.port()))
            })
            .map_err(|_| {
                anyhow::anyhow!("--peer-advertise {a:?} is neither IP:PORT nor an IP address")
            }),
        None if listen.ip().is_unspecified() => anyhow::bail!(
            "--peer-listen {listen} does not say where peers reach this node: give --peer-advertise (the node's or pod's IP)"
        ),
        None => Ok(listen),
    }
}

impl AgentArgs {
    /// The endpoint policy of `--lake-endpoint` (Azure's blob endpoints when not given).
    pub fn endpoint_policy(&self) -> EndpointPolicy {
        if self.lake_endpoints.is_empty() {
            EndpointPolicy::azure()
        } else {
            EndpointPolicy::Only(self.lake_endpoints.clone())
        }
    }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig; pass --kubeconfig, or --no-kube to serve staged volumes only")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// `tidepool agent`.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.cache_dir.join("agent.sock"));
    let mut cache = CacheConfig::new(&args.cache_dir, args.cache_size);
    cache.listing = super::listing(args.list_parallelism);
    let pool = CachePool::open(cache)
        .await
        .context("opening the cache pool")?;
    let config = AgentConfig {
        node_name: args.node_name.clone(),
        socket: socket.clone(),
        lake: LakeSettings {
            azure: AzureOptions {
                ca_file: args.ca_file.clone(),
                ..AzureOptions::default()
            },
            retry: RetryConfig {
                max_attempts: args.retries.max(1),
                attempt_timeout: args.request_timeout,
                deadline: args.deadline,
                ..RetryConfig::default()
            },
            endpoints: args.endpoint_policy(),
        },
        fuse_threads: args.threads,
        passthrough: !args.no_passthrough,
        managed_identity_namespaces: args.managed_identity_namespaces.clone(),
    };
    let agent = Agent::new(config, pool.clone(), tokio::runtime::Handle::current())
        .context("preparing the agent's state directory")?;
    if let Some(listen) = args.peer_listen {
        let advertise = peer_advertise(listen, args.peer_advertise.as_deref())?;
        let Some(file) = &args.peer_secret_file else {
            anyhow::bail!(
                "--peer-listen needs --peer-secret-file: the cluster's peer secret, which every agent holds"
            );
        };
        let secret = crate::peer::PeerSecret::from_file(file).map_err(|e| anyhow::anyhow!(e))?;
        let peers = crate::peer::Peers::new(crate::peer::PeerConfig {
            me: args.node_name.clone(),
            secret,
            timeout: args.peer_timeout,
            serve: !args.peer_no_serve,
            await_publication: !args.no_kube,
        });
        if args.no_kube {
            tracing::warn!(
                "--peer-listen with --no-kube: peers are found in the CachePools' statuses, so this agent serves but has no peers to ask"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("the peer address {listen} (--peer-listen)"))?;
        let server = crate::peer::server::Server::new(
            peers.clone(),
            Arc::new(crate::agent::peers::AgentCatalog(Arc::downgrade(&agent))),
            pool.config().block_size,
        );
        tracing::info!(listen = %listener.local_addr()?, advertise = %advertise, serving = !args.peer_no_serve, "sharing the cache with peers");
        tokio::spawn(server.run(listener));
        pool.set_peers(Some(
            peers.clone() as Arc<dyn crate::cache::peers::BlockPeers>
        ));
        let _ = agent
            .peers
            .set(crate::agent::peers::AgentPeers { peers, advertise });
    }
    let listener =
        bind_socket(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    {
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("agent-socket".into())
            .spawn(move || serve_socket(agent, listener))?;
    }
    if let Some(addr) = args.admin_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("the admin address {addr} (--admin-addr)"))?;
        tracing::info!(addr = %listener.local_addr()?, "admin server listening (/livez, /readyz, /metrics)");
        tokio::spawn(crate::agent::admin::serve(listener, Arc::downgrade(&agent)));
    }
    // Every checkpoint volume's committed steps, uploaded from here.
    let (stop_syncs, stop_rx) = tokio::sync::watch::channel(false);
    let syncs = tokio::spawn(crate::checkpoint::service::run_pool(
        args.cache_dir.clone(),
        agent.sync_source(),
        crate::checkpoint::sync::SyncConfig {
            parallel_files: args.sync_parallel.max(1),
            ..Default::default()
        },
        Duration::from_secs(2),
        Vec::new(),
        stop_rx,
    ));
    let reaper = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                agent.reap();
            }
        })
    };
    let kube_task = if args.no_kube {
        None
    } else {
        let client = kube_client(args.kubeconfig.as_ref()).await?;
        let heartbeat = args.heartbeat.min(Duration::from_secs(30));
        let a: Arc<Agent> = agent.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = crate::agent::kube::run(a, client, heartbeat).await {
                tracing::error!(error = %e, "the agent cannot manage its CachePool; volumes staged by the CSI plugin are still served");
            }
        }))
    };
    say(format_args!(
        "tidepool agent: node {} serving on {} (pool {}, checkpoint volumes synced from here, {})",
        args.node_name,
        socket.display(),
        args.cache_dir.display(),
        if args.no_kube {
            "no API server"
        } else {
            "CachePool watched"
        }
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    // Mounts are not ours to undo: the CSI plugin holds every connection, and the next
    // agent takes them over.
    reaper.abort();
    if let Some(t) = kube_task {
        t.abort();
    }
    // A pass under way ends where it is (the journal keeps what is done).
    let _ = stop_syncs.send(true);
    let _ = syncs.await;
    pool.flush()?;
    tracing::info!(
        volumes = agent.served().len(),
        "agent stopping; its volumes wait for the next agent"
    );
    Ok(())
}
