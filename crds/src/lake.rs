//! Where data lives in the lake and how a node authenticates to it.
//!
//! Invariants, enforced by the API server through CEL rules generated here:
//! - `url` is `http(s)://<host>/<container>[/<prefix>]`: a container is required,
//!   because a node never lists a whole account.
//! - At most one credential kind is set; none means anonymous access.
//! - Credentials are references only. A Secret is read by kubelet (as the PV's
//!   `nodeStageSecretRef`) and by the node agent, never by the operator.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A location in the lake and the credentials to reach it.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LakeLocation {
    /// URL of a container and optional prefix, e.g.
    /// `https://account.blob.core.windows.net/container/datasets/imagenet`.
    /// Any endpoint works (Azurite, private endpoints, sovereign clouds).
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+/[^/?#]+')").message("url must be http(s)://<host>/<container>[/<prefix>]"))]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// How nodes authenticate. Leave empty for anonymous (public) containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<LakeCredentials>,
}

/// Exactly one way to authenticate, or none of them for anonymous access.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.secretRef) ? 1 : 0) + (has(self.workloadIdentity) ? 1 : 0) + (has(self.managedIdentity) ? 1 : 0) <= 1").message("set exactly one of secretRef, workloadIdentity, managedIdentity (or omit credentials for anonymous access)"))]
pub struct LakeCredentials {
    /// A Secret in the object's namespace holding key `sasToken` (a SAS token) or
    /// `accountKey` (a storage account key; nodes sign short-lived SAS tokens from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Azure workload identity: a federated token of a Kubernetes service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
    /// The node's Azure managed identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_identity: Option<ManagedIdentity>,
}

/// A Secret in the same namespace as the object that references it.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret. It must hold key `sasToken` or key `accountKey`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Azure workload identity federation.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// Service account (in the object's namespace) whose projected token is exchanged.
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,
    /// Client id of the Entra application or user-assigned identity.
    #[schemars(length(min = 1, max = 64))]
    pub client_id: String,
    /// Entra tenant id.
    #[schemars(length(min = 1, max = 64))]
    pub tenant_id: String,
}

/// An Azure managed identity attached to the node.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ManagedIdentity {
    /// Client id of a user-assigned identity; empty for the system-assigned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub client_id: Option<String>,
}
