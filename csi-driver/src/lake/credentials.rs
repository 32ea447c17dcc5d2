//! How Tidepool authenticates to the lake.
//!
//! The choice is explicit ([`Credentials`]), with Azure's usual environment variable
//! names as defaults (see [`Credentials::from_env`]), in this order: SAS token, account
//! key, workload identity, managed identity (only when asked for: probing IMDS on a
//! machine without one costs seconds), else anonymous.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` print `<redacted>`: a
//! credential can be carried through config structs, logs and errors without leaking.

use std::fmt;
use std::path::PathBuf;

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Workload identity (federated credential): a Kubernetes service account token,
/// exchanged for an Entra ID token. The token file is re-read on every exchange
/// because the kubelet rotates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub token_file: PathBuf,
    pub client_id: String,
    pub tenant_id: String,
    /// e.g. `https://login.microsoftonline.com/`; tests point it at a local endpoint.
    pub authority_host: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// No authentication (public containers, or a SAS given in the URL).
    Anonymous,
    /// A shared access signature (query string, with or without the leading `?`).
    Sas(Secret),
    /// The storage account key. Tidepool signs short-lived SAS tokens with it and
    /// renews them, since the SDK has no shared-key authentication.
    AccountKey(Secret),
    WorkloadIdentity(WorkloadIdentity),
    /// The VM's or node's managed identity; `client_id` picks a user-assigned one.
    ManagedIdentity {
        client_id: Option<String>,
    },
}

/// The process environment as a lookup, so that libraries never read `std::env`
/// themselves (the binary passes `|k| std::env::var(k).ok()`).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Credentials {
    pub const ENV_SAS: &'static str = "AZURE_STORAGE_SAS_TOKEN";
    pub const ENV_KEY: &'static str = "AZURE_STORAGE_KEY";
    pub const ENV_TOKEN_FILE: &'static str = "AZURE_FEDERATED_TOKEN_FILE";
    pub const ENV_CLIENT_ID: &'static str = "AZURE_CLIENT_ID";
    pub const ENV_TENANT_ID: &'static str = "AZURE_TENANT_ID";
    pub const ENV_AUTHORITY: &'static str = "AZURE_AUTHORITY_HOST";

    /// Credentials from explicit choices first, then Azure's usual environment names.
    pub fn resolve(
        sas_flag: Option<String>,
        managed_identity: bool,
        env: EnvLookup<'_>,
    ) -> Result<Self, CredentialsError> {
        let nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        if let Some(sas) = sas_flag.filter(|s| !s.trim().is_empty()) {
            return Ok(Credentials::Sas(Secret::new(
                sas.trim().trim_start_matches('?').to_owned(),
            )));
        }
        if managed_identity {
            return Ok(Credentials::ManagedIdentity {
                client_id: nonempty(Self::ENV_CLIENT_ID),
            });
        }
        if let Some(sas) = nonempty(Self::ENV_SAS) {
            return Ok(Credentials::Sas(Secret::new(
                sas.trim().trim_start_matches('?').to_owned(),
            )));
        }
        if let Some(key) = nonempty(Self::ENV_KEY) {
            return Ok(Credentials::AccountKey(Secret::new(key.trim().to_owned())));
        }
        if let Some(file) = nonempty(Self::ENV_TOKEN_FILE) {
            let client_id = nonempty(Self::ENV_CLIENT_ID).ok_or(CredentialsError::Missing {
                var: Self::ENV_CLIENT_ID,
                because: Self::ENV_TOKEN_FILE,
            })?;
            let tenant_id = nonempty(Self::ENV_TENANT_ID).ok_or(CredentialsError::Missing {
                var: Self::ENV_TENANT_ID,
                because: Self::ENV_TOKEN_FILE,
            })?;
            return Ok(Credentials::WorkloadIdentity(WorkloadIdentity {
                token_file: PathBuf::from(file),
                client_id,
                tenant_id,
                authority_host: nonempty(Self::ENV_AUTHORITY),
            }));
        }
        Ok(Credentials::Anonymous)
    }

    /// Short name for logs: which kind, never the value.
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::Anonymous => "anonymous",
            Credentials::Sas(_) => "sas",
            Credentials::AccountKey(_) => "account-key",
            Credentials::WorkloadIdentity(_) => "workload-identity",
            Credentials::ManagedIdentity { .. } => "managed-identity",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error(
        "{because} is set, so workload identity is used, but {var} is not; set {var} (the workload identity's {var})"
    )]
    Missing {
        var: &'static str,
        because: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn precedence_flag_then_env_sas_key_workload_anonymous() {
        let e = env(&[
            ("AZURE_STORAGE_SAS_TOKEN", "?sv=1&sig=a"),
            ("AZURE_STORAGE_KEY", "k"),
        ]);
        let look = |k: &str| e.get(k).cloned();
        assert_eq!(
            Credentials::resolve(Some("sig=flag".into()), false, &look).unwrap(),
            Credentials::Sas(Secret::new("sig=flag"))
        );
        assert_eq!(
            Credentials::resolve(None, false, &look).unwrap(),
            Credentials::Sas(Secret::new("sv=1&sig=a"))
        );
        let e = env(&[
            ("AZURE_STORAGE_KEY", "k"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
        ]);
        let look = |k: &str| e.get(k).cloned();
        assert_eq!(
            Credentials::resolve(None, false, &look).unwrap().kind(),
            "account-key"
        );
        assert_eq!(
            Credentials::resolve(None, true, &look).unwrap().kind(),
            "managed-identity"
        );
        let none = |_: &str| None;
        assert_eq!(
            Credentials::resolve(None, false, &none).unwrap(),
            Credentials::Anonymous
        );
    }

    #[test]
    fn workload_identity_needs_client_and_tenant() {
        let e = env(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_CLIENT_ID", "cid"),
        ]);
        let look = |k: &str| e.get(k).cloned();
        let err = Credentials::resolve(None, false, &look).unwrap_err();
        assert!(err.to_string().contains("AZURE_TENANT_ID"), "{err}");
        let e = env(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
        ]);
        let look = |k: &str| e.get(k).cloned();
        match Credentials::resolve(None, false, &look).unwrap() {
            Credentials::WorkloadIdentity(w) => {
                assert_eq!(w.token_file, PathBuf::from("/t"));
                assert_eq!(w.authority_host, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials::AccountKey(Secret::new("SUPERSECRETKEY"));
        assert!(!format!("{c:?}").contains("SUPERSECRET"));
        assert_eq!(Secret::new("x").to_string(), "<redacted>");
    }
}
