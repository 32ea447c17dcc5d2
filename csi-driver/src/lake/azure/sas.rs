//! Shared access signatures signed with the account key.
//!
//! Microsoft's Rust SDK has no shared-key authentication, so with an account key
//! Tidepool signs its own short-lived SAS tokens and renews them before they expire
//! ([`SasSource::Signed`]). A SAS given by the user is used as is ([`SasSource::Static`]).
//! Either way the token is added to every request's query string by [`SasPolicy`], a
//! per-call policy of the SDK pipeline, so that a renewed token is picked up by the
//! next request without rebuilding clients.
//!
//! The string-to-sign follows Azure's "Create a service SAS" and "Create an account
//! SAS" specifications for signed version [`SAS_VERSION`] (2020-12-06 layout: the
//! service SAS has 16 newline-separated fields, the account SAS ends with a newline).
//!
//! Invariants: the key and every produced token are kept in [`Secret`]s; no `Debug`
//! output, error or log line of this module contains them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::http::{
    Context, Request,
    policies::{Policy, PolicyResult},
};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use time::OffsetDateTime;

use crate::lake::Secret;

/// Signed version of the SAS tokens we produce. 2022-11-02 uses the 2020-12-06
/// string-to-sign layout and is accepted by every current Azure region and Azurite.
pub const SAS_VERSION: &str = "2022-11-02";

/// Start times are back-dated by this much: clocks of a node and of Azure differ
/// by a few seconds to minutes, and a token "not yet valid" fails every request.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The storage account key, decoded, ready to sign.
#[derive(Clone)]
pub struct AccountKey {
    account: String,
    key: Secret,
    decoded: Arc<Vec<u8>>,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccountKey({}, <redacted>)", self.account)
    }
}

/// The account key is not base64 (the message never repeats it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the account key of {account} is not valid base64; copy key1 or key2 from the storage account's Access keys"
)]
pub struct BadAccountKey {
    pub account: String,
}

impl AccountKey {
    pub fn new(account: &str, key: &Secret) -> Result<Self, BadAccountKey> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| BadAccountKey {
                account: account.to_owned(),
            })?;
        if decoded.is_empty() {
            return Err(BadAccountKey {
                account: account.to_owned(),
            });
        }
        Ok(AccountKey {
            account: account.to_owned(),
            key: key.clone(),
            decoded: Arc::new(decoded),
        })
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The key as given, for redaction lists only.
    pub(crate) fn secret(&self) -> &Secret {
        &self.key
    }

    fn sign(&self, string_to_sign: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.decoded).expect("HMAC accepts any key length");
        mac.update(string_to_sign.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// A service SAS for one container (`sr=c`), valid from now (back-dated for clock
    /// skew) for `validity`. `permissions` in Azure's canonical order, e.g. `racwdl`.
    pub fn container_sas(
        &self,
        container: &str,
        permissions: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Secret {
        let start = iso8601(now - CLOCK_SKEW);
        let expiry = iso8601(now + validity);
        let canonical = format!("/blob/{}/{}", self.account, container);
        // Fields in the order of "Create a service SAS", version 2020-12-06 and later:
        // sp, st, se, canonicalizedResource, si, sip, spr, sv, sr, snapshot time,
        // encryption scope, rscc, rscd, rsce, rscl, rsct.
        let string_to_sign = [
            permissions,
            &start,
            &expiry,
            &canonical,
            "",
            "",
            "",
            SAS_VERSION,
            "c",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
        .join("\n");
        let sig = self.sign(&string_to_sign);
        Secret::new(format!(
            "sv={SAS_VERSION}&sr=c&sp={}&st={}&se={}&sig={}",
            permissions,
            encode(&start),
            encode(&expiry),
            encode(&sig)
        ))
    }

    /// An account SAS for the blob service (`ss=b`) on `resource_types` (`s`ervice,
    /// `c`ontainer, `o`bject), e.g. to create containers in tests and demos.
    pub fn account_sas(
        &self,
        resource_types: &str,
        permissions: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Secret {
        let start = iso8601(now - CLOCK_SKEW);
        let expiry = iso8601(now + validity);
        // "Create an account SAS", version 2020-12-06 and later: account, sp, ss, srt,
        // st, se, sip, spr, sv, encryption scope, and a trailing newline.
        let string_to_sign = [
            self.account.as_str(),
            permissions,
            "b",
            resource_types,
            &start,
            &expiry,
            "",
            "",
            SAS_VERSION,
            "",
            "",
        ]
        .join("\n");
        let sig = self.sign(&string_to_sign);
        Secret::new(format!(
            "sv={SAS_VERSION}&ss=b&srt={resource_types}&sp={permissions}&st={}&se={}&sig={}",
            encode(&start),
            encode(&expiry),
            encode(&sig)
        ))
    }
}

/// `YYYY-MM-DDThh:mm:ssZ`, the form Azure signs (no fraction).
fn iso8601(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Percent-encode a query value (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Where the SAS for each request comes from.
pub enum SasSource {
    /// A token given by the user (query string without `?`).
    Static(Secret),
    /// Signed by us for one container, renewed when half its validity has passed.
    Signed {
        key: AccountKey,
        container: String,
        validity: Duration,
        current: Mutex<Option<(Secret, OffsetDateTime)>>,
    },
}

impl std::fmt::Debug for SasSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SasSource::Static(_) => f.write_str("SasSource::Static(<redacted>)"),
            SasSource::Signed {
                key,
                container,
                validity,
                ..
            } => {
                write!(
                    f,
                    "SasSource::Signed({}/{container}, valid {validity:?}, <redacted>)",
                    key.account()
                )
            }
        }
    }
}

impl SasSource {
    /// Permissions Tidepool needs on a container: read, add, create, write, delete, list.
    pub const PERMISSIONS: &'static str = "racwdl";

    pub fn signed(key: AccountKey, container: &str, validity: Duration) -> Self {
        SasSource::Signed {
            key,
            container: container.to_owned(),
            validity,
            current: Mutex::new(None),
        }
    }

    /// The token to send now, signing a new one if the current one is past half-life.
    pub fn token(&self) -> Secret {
        self.token_at(OffsetDateTime::now_utc())
    }

    fn token_at(&self, now: OffsetDateTime) -> Secret {
        match self {
            SasSource::Static(s) => s.clone(),
            SasSource::Signed {
                key,
                container,
                validity,
                current,
            } => {
                let mut cur = current.lock();
                match &*cur {
                    Some((tok, renew_at)) if now < *renew_at => tok.clone(),
                    _ => {
                        let tok = key.container_sas(container, Self::PERMISSIONS, *validity, now);
                        *cur = Some((tok.clone(), now + *validity / 2));
                        tok
                    }
                }
            }
        }
    }
}

/// Appends the current SAS to every request's query string.
#[derive(Debug)]
pub struct SasPolicy(pub Arc<SasSource>);

#[async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let token = self.0.token();
        let sas = token.expose().trim_start_matches('?');
        let url = request.url_mut();
        let query = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{sas}"),
            _ => sas.to_owned(),
        };
        url.set_query(Some(&query));
        next[0].send(ctx, request, &next[1..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn container_sas_signs_the_spec_string() {
        let key = AccountKey::new("devstoreaccount1", &Secret::new(DEV_KEY)).unwrap();
        let sas = key.container_sas(
            "data",
            "racwdl",
            Duration::from_secs(3600),
            at("2026-01-02T03:04:05Z"),
        );
        let q = sas.expose();
        assert!(q.starts_with("sv=2022-11-02&sr=c&sp=racwdl&st=2026-01-02T02%3A59%3A05Z&se=2026-01-02T04%3A04%3A05Z&sig="), "{q}");
        // Independent recomputation of the documented string-to-sign.
        let sts = "racwdl\n2026-01-02T02:59:05Z\n2026-01-02T04:04:05Z\n/blob/devstoreaccount1/data\n\n\n\n2022-11-02\nc\n\n\n\n\n\n\n";
        let expect = key.sign(sts);
        let sig = q.rsplit_once("sig=").unwrap().1;
        let decoded: String = url::form_urlencoded::parse(format!("s={sig}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        assert_eq!(decoded, expect);
    }

    #[test]
    fn signed_source_renews_at_half_life() {
        let key = AccountKey::new("devstoreaccount1", &Secret::new(DEV_KEY)).unwrap();
        let src = SasSource::signed(key, "data", Duration::from_secs(3600));
        let t0 = at("2026-01-02T03:00:00Z");
        let a = src.token_at(t0);
        assert_eq!(a, src.token_at(t0 + Duration::from_secs(1700)));
        let b = src.token_at(t0 + Duration::from_secs(1801));
        assert_ne!(a, b, "token past half-life must be renewed");
    }

    #[test]
    fn bad_key_and_debug_never_show_the_key() {
        let err = AccountKey::new("acct", &Secret::new("not base64 !!SECRET")).unwrap_err();
        assert!(!err.to_string().contains("SECRET"));
        let key = AccountKey::new("acct", &Secret::new(DEV_KEY)).unwrap();
        assert!(!format!("{key:?}").contains("Eby8"));
        let src = SasSource::signed(key, "c", Duration::from_secs(60));
        let tok = src.token();
        assert!(!format!("{src:?}").contains(tok.expose()));
    }
}
