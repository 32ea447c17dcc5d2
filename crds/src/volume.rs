//! The contract between the operator's PersistentVolumes and the CSI driver.
//!
//! The operator writes [`VolumeAttributes`] into `spec.csi.volumeAttributes` of every PV
//! it creates ([`VolumeAttributes::to_map`]); kubelet hands them to the CSI driver as
//! `volume_context`, which parses them back ([`VolumeAttributes::parse`]). They say what
//! the volume is: its kind, the object it belongs to (so the node agent can find its
//! assignment in the node's `CachePool`), the lake location and the policies, so that a
//! node can serve the volume even before its agent has seen the assignment.
//!
//! Credentials are never here: a Secret reaches the node as the PV's
//! `nodeStageSecretRef` (kubelet passes it to `NodeStageVolume`), a workload identity
//! through the agent's token requests. A PV's attributes are fixed when it is created;
//! where the pool's assignment (the object's current spec) is known, it wins.

use std::collections::BTreeMap;

use crate::dataset_cache::{Prefetch, PrefetchPolicy, Refresh, RefreshPolicy};

/// CSI driver name (`CSIDriver` object and `spec.csi.driver` of every PV).
pub const CSI_DRIVER: &str = "csi.tidepool.dev";
/// Volume attribute: `DatasetCache` or `CheckpointSync`.
pub const ATTR_KIND: &str = "tidepool.dev/kind";
/// Volume attribute: namespace of the owning object.
pub const ATTR_NAMESPACE: &str = "tidepool.dev/namespace";
/// Volume attribute: name of the owning object.
pub const ATTR_NAME: &str = "tidepool.dev/name";
/// Volume attribute: uid of the owning object (a re-created object gets a new volume).
pub const ATTR_UID: &str = "tidepool.dev/uid";
/// Volume attribute: the lake URL (container and prefix; never a SAS).
pub const ATTR_URL: &str = "tidepool.dev/url";
/// Volume attribute: `OnDemand` or `Eager` (datasets).
pub const ATTR_PREFETCH: &str = "tidepool.dev/prefetch";
/// Volume attribute: JSON array of `Eager` path globs (datasets; absent: everything).
pub const ATTR_INCLUDE: &str = "tidepool.dev/include";
/// Volume attribute: `Pinned`, or a refresh interval such as `15m` (datasets).
pub const ATTR_REFRESH: &str = "tidepool.dev/refresh";
/// Volume attribute: `true` if the dataset is never evicted (datasets).
pub const ATTR_PINNED: &str = "tidepool.dev/pinned";
/// Keys kubelet adds itself (pod info, service account tokens); never ours to judge.
pub const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// Label on PVs and PVCs: the kind of the owning object.
pub const LABEL_KIND: &str = "tidepool.dev/kind";
/// Label on PVs and PVCs: namespace of the owning object (PVs are cluster-scoped).
pub const LABEL_NAMESPACE: &str = "tidepool.dev/namespace";
/// Label on PVs and PVCs: name of the owning object.
pub const LABEL_NAME: &str = "tidepool.dev/name";

/// What a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VolumeKind {
    /// A `DatasetCache`: read-only.
    DatasetCache,
    /// A `CheckpointSync`: read-write.
    CheckpointSync,
}

impl VolumeKind {
    /// The spelling in the attributes (the kind's name).
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::DatasetCache => "DatasetCache",
            VolumeKind::CheckpointSync => "CheckpointSync",
        }
    }
}

/// The typed volume attributes of a Tidepool PV.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeAttributes {
    pub kind: VolumeKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub url: String,
    /// Datasets only (defaults elsewhere).
    pub prefetch: Prefetch,
    pub refresh: Refresh,
    pub pinned: bool,
}

/// A volume context key that is missing, unknown or malformed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("volume_context key {key:?}: {problem}")]
pub struct VolumeAttributeError {
    pub key: String,
    pub problem: String,
}

fn err(key: &str, problem: impl Into<String>) -> VolumeAttributeError {
    VolumeAttributeError {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

impl VolumeAttributes {
    /// The attributes as the PV carries them.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            (ATTR_KIND.to_owned(), self.kind.as_str().to_owned()),
            (ATTR_NAMESPACE.to_owned(), self.namespace.clone()),
            (ATTR_NAME.to_owned(), self.name.clone()),
            (ATTR_UID.to_owned(), self.uid.clone()),
            (ATTR_URL.to_owned(), self.url.clone()),
        ]);
        if self.kind == VolumeKind::DatasetCache {
            let prefetch = match self.prefetch.policy {
                PrefetchPolicy::OnDemand => "OnDemand",
                PrefetchPolicy::Eager => "Eager",
            };
            m.insert(ATTR_PREFETCH.to_owned(), prefetch.to_owned());
            if !self.prefetch.include.is_empty() {
                m.insert(
                    ATTR_INCLUDE.to_owned(),
                    serde_json::to_string(&self.prefetch.include).expect("strings serialise"),
                );
            }
            let refresh = match (&self.refresh.policy, &self.refresh.interval) {
                (RefreshPolicy::Interval, Some(i)) => i.clone(),
                _ => "Pinned".to_owned(),
            };
            m.insert(ATTR_REFRESH.to_owned(), refresh);
            m.insert(ATTR_PINNED.to_owned(), self.pinned.to_string());
        }
        m
    }

    /// Parses a `volume_context`: every `tidepool.dev/` key must be known and well
    /// formed, the required ones present; kubelet's own keys are ignored.
    pub fn parse<'a>(
        ctx: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, VolumeAttributeError> {
        let mut m: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, v) in ctx {
            if k.starts_with(KUBELET_PREFIX) {
                continue;
            }
            let known = [
                ATTR_KIND,
                ATTR_NAMESPACE,
                ATTR_NAME,
                ATTR_UID,
                ATTR_URL,
                ATTR_PREFETCH,
                ATTR_INCLUDE,
                ATTR_REFRESH,
                ATTR_PINNED,
            ];
            if !known.contains(&k.as_str()) {
                return Err(err(
                    k,
                    "unknown key (a PersistentVolume not made by the Tidepool operator, or by a newer one)",
                ));
            }
            m.insert(k, v);
        }
        let need = |key: &str| -> Result<String, VolumeAttributeError> {
            match m.get(key) {
                Some(v) if !v.is_empty() => Ok((*v).to_owned()),
                Some(_) => Err(err(key, "empty")),
                None => Err(err(key, "missing")),
            }
        };
        let kind = match need(ATTR_KIND)?.as_str() {
            "DatasetCache" => VolumeKind::DatasetCache,
            "CheckpointSync" => VolumeKind::CheckpointSync,
            other => {
                return Err(err(
                    ATTR_KIND,
                    format!("{other:?} is neither DatasetCache nor CheckpointSync"),
                ));
            }
        };
        let url = need(ATTR_URL)?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(err(ATTR_URL, "must be an http(s) URL of a container"));
        }
        let policy = match m.get(ATTR_PREFETCH).copied() {
            None | Some("OnDemand") => PrefetchPolicy::OnDemand,
            Some("Eager") => PrefetchPolicy::Eager,
            Some(other) => {
                return Err(err(
                    ATTR_PREFETCH,
                    format!("{other:?} is neither OnDemand nor Eager"),
                ));
            }
        };
        let include = match m.get(ATTR_INCLUDE) {
            None => Vec::new(),
            Some(v) => serde_json::from_str::<Vec<String>>(v)
                .map_err(|e| err(ATTR_INCLUDE, format!("not a JSON array of globs: {e}")))?,
        };
        let refresh = match m.get(ATTR_REFRESH).copied() {
            None | Some("Pinned") => Refresh::default(),
            Some(interval) => {
                if !interval.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                    return Err(err(
                        ATTR_REFRESH,
                        format!("{interval:?} is neither Pinned nor a duration such as 15m"),
                    ));
                }
                Refresh {
                    policy: RefreshPolicy::Interval,
                    interval: Some(interval.to_owned()),
                }
            }
        };
        let pinned = match m.get(ATTR_PINNED).copied() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(err(ATTR_PINNED, format!("{other:?} is not true or false"))),
        };
        Ok(VolumeAttributes {
            kind,
            namespace: need(ATTR_NAMESPACE)?,
            name: need(ATTR_NAME)?,
            uid: need(ATTR_UID)?,
            url,
            prefetch: Prefetch { policy, include },
            refresh,
            pinned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeAttributes {
        VolumeAttributes {
            kind: VolumeKind::DatasetCache,
            namespace: "ml".into(),
            name: "imagenet".into(),
            uid: "u1".into(),
            url: "https://acct.blob.core.windows.net/datasets/imagenet".into(),
            prefetch: Prefetch {
                policy: PrefetchPolicy::Eager,
                include: vec!["train/**".into()],
            },
            refresh: Refresh {
                policy: RefreshPolicy::Interval,
                interval: Some("15m".into()),
            },
            pinned: true,
        }
    }

    #[test]
    fn attributes_survive_the_round_trip_through_a_pv() {
        let a = sample();
        let mut map = a.to_map();
        // kubelet adds its own keys at publish time.
        map.insert("csi.storage.k8s.io/pod.name".into(), "trainer-0".into());
        assert_eq!(VolumeAttributes::parse(&map).unwrap(), a);
    }

    #[test]
    fn bad_contexts_name_the_key() {
        let mut m = sample().to_map();
        m.remove(ATTR_UID);
        assert_eq!(VolumeAttributes::parse(&m).unwrap_err().key, ATTR_UID);
        let mut m = sample().to_map();
        m.insert("tidepool.dev/colour".into(), "blue".into());
        assert_eq!(
            VolumeAttributes::parse(&m).unwrap_err().key,
            "tidepool.dev/colour"
        );
        let mut m = sample().to_map();
        m.insert(ATTR_PREFETCH.into(), "Lazy".into());
        let e = VolumeAttributes::parse(&m).unwrap_err();
        assert!(e.to_string().contains("Lazy"), "{e}");
        let mut m = sample().to_map();
        m.insert(ATTR_URL.into(), "s3://bucket".into());
        assert_eq!(VolumeAttributes::parse(&m).unwrap_err().key, ATTR_URL);
    }
}
