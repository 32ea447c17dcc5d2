//! Entra ID token credentials: workload identity and managed identity.
//!
//! Workload identity uses the SDK's `ClientAssertionCredential` with our own
//! [`FederatedTokenFile`] assertion, which reads the service account token file on
//! every exchange (the kubelet rotates it; the SDK's own workload credential caches it
//! for ten minutes). Exchanges are rare (access tokens live about an hour and the SDK
//! caches them), so the read costs nothing.
//!
//! The authority host is always set explicitly (Azure public cloud by default), so
//! the SDK never reads `AZURE_AUTHORITY_HOST` itself: libraries do not read the
//! environment.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::TokenCredential,
    error::ErrorKind,
    http::{ClientMethodOptions, ClientOptions},
};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
};

use crate::lake::credentials::WorkloadIdentity;

/// Public-cloud Entra ID, used when no authority host is configured.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com/";

/// The Kubernetes service account token, read afresh for every exchange.
#[derive(Debug)]
pub struct FederatedTokenFile(pub PathBuf);

#[async_trait]
impl ClientAssertion for FederatedTokenFile {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        let token = tokio::fs::read_to_string(&self.0).await.map_err(|e| {
            azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "cannot read the federated token file {}: {e}",
                    self.0.display()
                ),
            )
        })?;
        Ok(token.trim().to_owned())
    }
}

pub fn workload_identity(
    wi: &WorkloadIdentity,
    client_options: ClientOptions,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let mut client_options = client_options;
    let authority = wi
        .authority_host
        .clone()
        .unwrap_or_else(|| PUBLIC_AUTHORITY.to_owned());
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = authority;
    client_options.cloud = Some(Arc::new(CloudConfiguration::Custom(cloud)));
    let cred = ClientAssertionCredential::new(
        wi.tenant_id.clone(),
        wi.client_id.clone(),
        FederatedTokenFile(wi.token_file.clone()),
        Some(ClientAssertionCredentialOptions { client_options }),
    )?;
    Ok(cred)
}

pub fn managed_identity(
    client_id: Option<&str>,
    client_options: ClientOptions,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(|c| UserAssignedId::ClientId(c.to_owned())),
        client_options,
    };
    let cred = ManagedIdentityCredential::new(Some(options))?;
    Ok(cred)
}
