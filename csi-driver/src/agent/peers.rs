//! The agent's side of the cluster-wide cache (see `crate::peer`): its peer server over
//! the datasets it holds, its entry in its CachePool's status, and its members, read
//! from every CachePool's status.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tidepool_api::cache_pool::{CachePool, PeerStatus};

use super::Agent;
use crate::cache::blob::CachedBlob;
use crate::cache::peers::PeerAsk;
use crate::peer::server::{Catalog, serve_from};
use crate::peer::{Member, Peers};

/// A pool whose heartbeat is older than this is not a member (its node is gone or its
/// agent stopped): nothing is placed on it.
pub const MEMBER_STALE: Duration = Duration::from_secs(90);

/// This agent's peer sharing: the shared state, and where peers reach it.
#[derive(Debug)]
pub struct AgentPeers {
    pub peers: Arc<Peers>,
    pub advertise: SocketAddr,
}

impl AgentPeers {
    /// Its entry in the pool's status.
    pub fn status(&self, agent: &Agent) -> PeerStatus {
        let mut datasets = agent.registry.dataset_ids();
        datasets.truncate(tidepool_api::cache_pool::MAX_DATASETS);
        PeerStatus {
            endpoint: self.advertise.to_string(),
            serving: self.peers.config().serve,
            datasets,
        }
    }
}

/// The agent's datasets as the peer server sees them.
pub struct AgentCatalog(pub Weak<Agent>);

impl Catalog for AgentCatalog {
    fn blob(&self, ask: &PeerAsk) -> Result<Arc<CachedBlob>, String> {
        let agent = self.0.upgrade().ok_or("the agent is stopping")?;
        let served = agent
            .registry
            .all()
            .into_iter()
            .find(|s| s.dataset.id() == ask.dataset)
            .ok_or_else(|| format!("dataset {} is not held here", ask.dataset))?;
        serve_from(&served.dataset, ask)
    }
}

/// The members among `pools`: every other pool whose agent published a peer endpoint
/// and reported within [`MEMBER_STALE`] of `now` (one that does not serve is a member
/// that owns nothing). A pool with an endpoint that
/// does not parse is skipped with a warning (once per change, by the caller).
pub fn members_from<'a>(
    pools: impl IntoIterator<Item = &'a CachePool>,
    me: &str,
    now: Timestamp,
) -> Vec<Member> {
    let mut out = Vec::new();
    for pool in pools {
        let name = pool.name_any();
        let Some(status) = &pool.status else { continue };
        let Some(peer) = &status.peer else { continue };
        if name == me {
            continue;
        }
        let fresh = status.heartbeat_time.as_ref().is_some_and(|t| {
            now.duration_since(t.0)
                .as_secs()
                .clamp(0, i64::MAX)
                .unsigned_abs()
                < MEMBER_STALE.as_secs()
        });
        if !fresh {
            continue;
        }
        let Ok(addr) = peer.endpoint.parse::<SocketAddr>() else {
            tracing::warn!(pool = %name, endpoint = %peer.endpoint, "a CachePool's peer endpoint is not IP:port; that node is not used as a peer");
            continue;
        };
        out.push(Member {
            id: name,
            addr,
            datasets: peer.datasets.iter().cloned().collect::<BTreeSet<_>>(),
            serves: peer.serving,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Keeps `peers`' members equal to the CachePools' statuses: on every change, and every
/// 15 s (so members whose heartbeat went stale drop out). Runs until the task is dropped.
pub async fn follow_members(peers: Arc<Peers>, client: Client) {
    let pools: Api<CachePool> = Api::all(client);
    let mut stream = watcher::watcher(pools, watcher::Config::default()).boxed();
    let mut known: HashMap<String, CachePool> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    let mut last: Vec<Member> = Vec::new();
    let mut ready = false;
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                None => return,
                Some(Ok(watcher::Event::Apply(p))) | Some(Ok(watcher::Event::InitApply(p))) => {
                    known.insert(p.name_any(), p);
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    known.remove(&p.name_any());
                }
                Some(Ok(watcher::Event::Init)) => {
                    known.clear();
                    ready = false;
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => ready = true,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the CachePools for peers failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
            _ = tick.tick() => {}
        }
        if !ready {
            continue;
        }
        let members = members_from(known.values(), &peers.config().me, Timestamp::now());
        if members != last {
            tracing::info!(members = members.len(), ids = ?members.iter().map(|m| &m.id).collect::<Vec<_>>(), "peers changed");
            peers.set_members(members.clone());
            last = members;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tidepool_api::cache_pool::{CachePoolSpec, CachePoolStatus};

    fn pool(name: &str, age_s: i64, peer: Option<(&str, bool)>) -> CachePool {
        let mut p = CachePool::new(name, CachePoolSpec::default());
        p.status = Some(CachePoolStatus {
            heartbeat_time: Some(Time(Timestamp::from_second(1_000_000 - age_s).unwrap())),
            peer: peer.map(|(endpoint, serving)| PeerStatus {
                endpoint: endpoint.into(),
                serving,
                datasets: vec!["d1".into()],
            }),
            ..Default::default()
        });
        p
    }

    #[test]
    fn members_are_the_other_fresh_serving_pools_with_an_endpoint() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let pools = [
            pool("me", 1, Some(("10.0.0.1:7446", true))),
            pool("b", 5, Some(("10.0.0.2:7446", true))),
            pool("c", 5, Some(("10.0.0.3:7446", false))),
            pool("d", 5, None),
            pool("e", 500, Some(("10.0.0.5:7446", true))),
            pool("f", 5, Some(("not-an-address", true))),
            pool("g", 5, Some(("[fd00::7]:7446", true))),
        ];
        let m = members_from(&pools, "me", now);
        let ids: Vec<_> = m.iter().map(|m| m.id.as_str()).collect();
        // d does not share, e's agent stopped reporting, f's endpoint is not an address;
        // c takes only: a member that serves nothing.
        assert_eq!(ids, ["b", "c", "g"]);
        assert!(m[0].serves && !m[1].serves);
        assert_eq!(m[0].addr, "10.0.0.2:7446".parse().unwrap());
        assert!(m[0].datasets.contains("d1"));
    }
}
