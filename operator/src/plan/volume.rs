//! The PersistentVolume and pre-bound PVC of one `DatasetCache` or `CheckpointSync`.
//!
//! Design:
//! - The PV is named `tidepool-<uid>` and its CSI volume handle is the same string:
//!   unique per object incarnation, bounded in length (CSI ids should stay short),
//!   and stable across operator restarts. Labels and volume attributes name the owner.
//! - The PV is pre-bound (`claimRef`) to the PVC and the PVC names the PV
//!   (`volumeName`), both with an empty storage class, so no provisioner and no
//!   default StorageClass gets involved.
//! - Reclaim policy `Retain`: there is no CSI controller service to delete a volume;
//!   the operator deletes the PV itself once the PVC is gone.
//! - The PVC is owned (controller reference) by the object, so it is garbage collected
//!   with it; the PV is cluster-scoped and cannot be, hence the finalizer.
//! - `nodeStageSecretRef` is set only for Secret credentials: kubelet then hands the
//!   Secret to `NodeStageVolume`. The operator never reads it.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
        PersistentVolumeClaimSpec, PersistentVolumeSpec, SecretReference,
        VolumeResourceRequirements,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::ResourceExt;
use tidepool_api::volume::{CSI_DRIVER, LABEL_KIND, LABEL_NAME, LABEL_NAMESPACE};

use super::Workload;

/// Nominal capacity of every Tidepool volume. A FUSE-backed volume has no provisioned
/// size (`df` inside the pod reports the pool), but Kubernetes requires a PV capacity
/// and binds only when it is at least the PVC request: both use this one value.
pub const NOMINAL_CAPACITY: &str = "1Ti";

/// PV name and CSI volume handle of an object: `tidepool-<uid>`.
pub fn volume_name(uid: &str) -> String {
    format!("tidepool-{uid}")
}

fn owner_labels<W: Workload>(obj: &W) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_KIND.to_owned(), W::KIND.to_owned()),
        (
            LABEL_NAMESPACE.to_owned(),
            obj.namespace().unwrap_or_default(),
        ),
        (LABEL_NAME.to_owned(), obj.name_any()),
    ])
}

/// The PersistentVolume of `obj` (which must have a uid and namespace, i.e. come from
/// the API server).
pub fn desired_pv<W: Workload>(obj: &W) -> PersistentVolume {
    let uid = obj.uid().unwrap_or_default();
    let namespace = obj.namespace().unwrap_or_default();
    let name = volume_name(&uid);
    let read_only = W::ACCESS_MODE == "ReadOnlyMany";
    let node_stage_secret_ref = obj
        .location()
        .credentials
        .as_ref()
        .and_then(|c| c.secret_ref.as_ref())
        .map(|s| SecretReference {
            name: Some(s.name.clone()),
            namespace: Some(namespace.clone()),
        });
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(owner_labels(obj)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec![W::ACCESS_MODE.to_owned()]),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(NOMINAL_CAPACITY.to_owned()),
            )])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: Some(namespace.clone()),
                name: Some(obj.claim()),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.to_owned(),
                volume_handle: name,
                read_only: Some(read_only),
                node_stage_secret_ref,
                volume_attributes: Some(obj.volume_attributes().to_map()),
                ..Default::default()
            }),
            persistent_volume_reclaim_policy: Some("Retain".to_owned()),
            storage_class_name: Some(String::new()),
            volume_mode: Some("Filesystem".to_owned()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The PVC of `obj`, pre-bound to its PV and controlled by `obj`.
pub fn desired_pvc<W: Workload>(obj: &W) -> PersistentVolumeClaim {
    let uid = obj.uid().unwrap_or_default();
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(obj.claim()),
            namespace: obj.namespace(),
            labels: Some(owner_labels(obj)),
            owner_references: obj.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![W::ACCESS_MODE.to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(NOMINAL_CAPACITY.to_owned()),
                )])),
                ..Default::default()
            }),
            storage_class_name: Some(String::new()),
            volume_mode: Some("Filesystem".to_owned()),
            volume_name: Some(volume_name(&uid)),
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether an existing PVC is controlled by `obj` (an unrelated PVC of the same name
/// is never taken over).
pub fn controlled_by<W: Workload>(pvc: &PersistentVolumeClaim, obj: &W) -> bool {
    let uid = obj.uid();
    pvc.owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use tidepool_api::{
        CheckpointSync, DatasetCache, DatasetCacheSpec, LakeLocation,
        checkpoint_sync::CheckpointSyncSpec,
        lake::{LakeCredentials, ManagedIdentity, SecretRef},
    };

    use super::*;

    fn dataset(credentials: Option<LakeCredentials>, claim: Option<&str>) -> DatasetCache {
        let mut d = DatasetCache::new(
            "imagenet",
            DatasetCacheSpec {
                source: LakeLocation {
                    url: "https://a.blob.core.windows.net/c/imagenet".into(),
                    credentials,
                },
                claim_name: claim.map(str::to_owned),
                ..Default::default()
            },
        );
        d.metadata = ObjectMeta {
            namespace: Some("ml".into()),
            uid: Some("u1".into()),
            ..d.metadata
        };
        d
    }

    #[test]
    fn dataset_pv_is_read_only_prebound_and_names_the_dataset() {
        let secret = LakeCredentials {
            secret_ref: Some(SecretRef {
                name: "lake-sas".into(),
            }),
            ..Default::default()
        };
        let d = dataset(Some(secret), Some("train-data"));
        let pv = desired_pv(&d);
        let spec = pv.spec.unwrap();
        let csi = spec.csi.unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("tidepool-u1"));
        assert_eq!(csi.driver, "csi.tidepool.dev");
        assert_eq!(csi.volume_handle, "tidepool-u1");
        assert_eq!(csi.read_only, Some(true));
        assert_eq!(spec.access_modes, Some(vec!["ReadOnlyMany".to_owned()]));
        let attrs = csi.volume_attributes.unwrap();
        // What the node parses back: the object, the lake location, the policies;
        // never a credential.
        let parsed = tidepool_api::volume::VolumeAttributes::parse(&attrs).unwrap();
        assert_eq!(parsed.kind, tidepool_api::volume::VolumeKind::DatasetCache);
        assert_eq!(
            (
                parsed.namespace.as_str(),
                parsed.name.as_str(),
                parsed.uid.as_str()
            ),
            ("ml", "imagenet", "u1")
        );
        assert_eq!(parsed.url, d.spec.source.url);
        assert!(!attrs.values().any(|v| v.contains("lake-sas")), "{attrs:?}");
        let secret = csi
            .node_stage_secret_ref
            .expect("secret credentials reach NodeStageVolume");
        assert_eq!(
            (secret.name.as_deref(), secret.namespace.as_deref()),
            (Some("lake-sas"), Some("ml"))
        );
        let claim = spec.claim_ref.unwrap();
        assert_eq!(
            (claim.namespace.as_deref(), claim.name.as_deref()),
            (Some("ml"), Some("train-data"))
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
    }

    #[test]
    fn no_stage_secret_without_secret_credentials() {
        for creds in [
            None,
            Some(LakeCredentials {
                managed_identity: Some(ManagedIdentity::default()),
                ..Default::default()
            }),
        ] {
            let pv = desired_pv(&dataset(creds.clone(), None));
            assert!(
                pv.spec
                    .unwrap()
                    .csi
                    .unwrap()
                    .node_stage_secret_ref
                    .is_none(),
                "{creds:?}"
            );
        }
    }

    #[test]
    fn pvc_defaults_to_object_name_binds_the_pv_and_is_owned() {
        let d = dataset(None, None);
        let pvc = desired_pvc(&d);
        assert_eq!(pvc.metadata.name.as_deref(), Some("imagenet"));
        assert_eq!(pvc.metadata.namespace.as_deref(), Some("ml"));
        let spec = pvc.spec.as_ref().unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("tidepool-u1"));
        assert_eq!(
            spec.storage_class_name.as_deref(),
            Some(""),
            "no default StorageClass may capture the claim"
        );
        assert!(controlled_by(&pvc, &d));
        let mut other = d.clone();
        other.metadata.uid = Some("u2".into());
        assert!(
            !controlled_by(&pvc, &other),
            "a PVC of another incarnation is not ours"
        );
    }

    #[test]
    fn checkpoint_volume_is_read_write_many() {
        let mut c = CheckpointSync::new("ckpt", CheckpointSyncSpec::default());
        c.metadata.namespace = Some("ml".into());
        c.metadata.uid = Some("u9".into());
        let pv = desired_pv(&c);
        let spec = pv.spec.unwrap();
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".to_owned()]));
        assert_eq!(spec.csi.unwrap().read_only, Some(false));
        assert_eq!(
            desired_pvc(&c).spec.unwrap().access_modes,
            Some(vec!["ReadWriteMany".to_owned()])
        );
    }
}
