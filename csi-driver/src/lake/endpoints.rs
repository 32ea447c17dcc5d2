//! Which lake endpoints a node agent may talk to.
//!
//! A node agent holds credentials for many teams' lakes: the node's managed identity,
//! service account tokens, account keys from Secrets. The URL of a `DatasetCache` or
//! `CheckpointSync` is chosen by whoever may create one, so without a limit a tenant
//! could point the node at a host of their own and receive those credentials (a
//! confused deputy), or use the node to reach hosts inside the cluster. The agent only
//! opens lakes whose endpoint an administrator allowed (`tidepool agent
//! --lake-endpoint`, the chart's `node.lake.allowedEndpoints`); everything else is
//! refused before any request is sent.
//!
//! A rule is one of:
//! - `*.blob.core.windows.net`: any host ending in `.blob.core.windows.net`, over
//!   HTTPS, on any port;
//! - `https://<host>[:<port>]` or `https://*.<suffix>[:<port>]`: that host (or suffix),
//!   over HTTPS, on that port (any port when none is given);
//! - `http://<host>[:<port>]`: plain HTTP to exactly that host, for an emulator such as
//!   Azurite in a test cluster. Credentials then cross the network in clear text, so
//!   nothing but an explicit rule ever allows HTTP.
//!
//! The default is Azure's blob endpoints in the public and sovereign clouds, over HTTPS.

use std::fmt;

use super::url::LakeUrl;

/// Azure Storage blob endpoints: the public cloud (with private endpoints, which are
/// `<account>.privatelink.blob.core.windows.net`, and Azure DNS zone endpoints), US
/// Government and China.
pub const AZURE_BLOB_ENDPOINTS: &[&str] = &[
    "*.blob.core.windows.net",
    "*.blob.storage.azure.net",
    "*.blob.core.usgovcloudapi.net",
    "*.blob.core.chinacloudapi.cn",
];

/// One allowed endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRule {
    /// `false`: HTTPS only; `true`: plain HTTP only.
    http: bool,
    /// The host, lower case; for a suffix rule what follows `*.` (with its dot).
    host: String,
    suffix: bool,
    port: Option<u16>,
    /// As written, for messages.
    text: String,
}

/// A rule that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "lake endpoint rule {text:?}: {why}; write *.blob.core.windows.net, https://<host>[:<port>] or, for an emulator, http://<host>:<port>"
)]
pub struct RuleError {
    text: String,
    why: &'static str,
}

impl std::str::FromStr for EndpointRule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let bad = |why| RuleError {
            text: text.to_owned(),
            why,
        };
        let t = text.trim();
        let (http, rest) = if let Some(r) = t.strip_prefix("https://") {
            (false, r)
        } else if let Some(r) = t.strip_prefix("http://") {
            (true, r)
        } else if t.contains("://") {
            return Err(bad("only https:// and http:// endpoints exist"));
        } else {
            (false, t)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad(
                "a rule names a host and a port, no path, query or user",
            ));
        }
        // `host`, `host:port`, `[v6]` or `[v6]:port`.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("an IPv6 address needs its closing ]"))?;
                match after.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if after.is_empty() => (h, None),
                    None => return Err(bad("only a port may follow the host")),
                }
            }
            None => match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))
            })
            .transpose()?;
        let (suffix, host) = match host.strip_prefix("*.") {
            Some(h) => (true, h),
            None => (false, host),
        };
        if host.is_empty() || host.contains('*') {
            return Err(bad("a host, or *. and a domain, is needed"));
        }
        if suffix && http {
            return Err(bad(
                "plain HTTP is allowed to one named host only, never to a whole domain",
            ));
        }
        if suffix && !host.contains('.') {
            return Err(bad("*. needs a domain with at least two labels"));
        }
        Ok(EndpointRule {
            http,
            host: host.to_ascii_lowercase(),
            suffix,
            port,
            text: t.to_owned(),
        })
    }
}

impl fmt::Display for EndpointRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl EndpointRule {
    fn allows(&self, url: &url::Url) -> bool {
        let scheme_ok = match url.scheme() {
            "https" => !self.http,
            "http" => self.http,
            _ => false,
        };
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = if self.suffix {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        };
        let port_ok = self
            .port
            .is_none_or(|p| url.port_or_known_default() == Some(p));
        scheme_ok && host_ok && port_ok
    }
}

/// The endpoints an agent may open.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum EndpointPolicy {
    /// Any endpoint: `tidepool mount` and `tidepool sync` on a VM, where the user who
    /// runs them picks the URL and owns the credentials.
    #[default]
    Any,
    /// Only these.
    Only(Vec<EndpointRule>),
}

/// A lake URL whose endpoint is not allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "lake endpoint {endpoint} is not allowed on this node (allowed: {allowed}); no request was sent to it. Use a storage account endpoint the cluster's administrator allows, or ask them to add this one (chart value node.lake.allowedEndpoints, tidepool agent --lake-endpoint){http}"
)]
pub struct EndpointRefused {
    pub endpoint: String,
    allowed: String,
    http: &'static str,
}

impl EndpointPolicy {
    /// Azure's blob endpoints over HTTPS ([`AZURE_BLOB_ENDPOINTS`]).
    pub fn azure() -> Self {
        EndpointPolicy::Only(
            AZURE_BLOB_ENDPOINTS
                .iter()
                .map(|r| r.parse().expect("the built-in rules parse"))
                .collect(),
        )
    }

    /// Whether `url`'s endpoint may be opened; the refusal says why and what to do.
    pub fn check(&self, url: &LakeUrl) -> Result<(), EndpointRefused> {
        let EndpointPolicy::Only(rules) = self else {
            return Ok(());
        };
        let e = &url.endpoint;
        if rules.iter().any(|r| r.allows(e)) {
            return Ok(());
        }
        let https_would = e.scheme() == "http" && {
            let mut s = e.clone();
            s.set_scheme("https").is_ok() && rules.iter().any(|r| r.allows(&s))
        };
        Err(EndpointRefused {
            endpoint: format!(
                "{}://{}",
                e.scheme(),
                e.host_str().unwrap_or_default().to_owned()
                    + &e.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
            allowed: if rules.is_empty() {
                "none".to_owned()
            } else {
                rules
                    .iter()
                    .map(|r| r.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            http: if https_would {
                "; this host is allowed over https:// only: credentials never go over plain HTTP"
            } else {
                ""
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> LakeUrl {
        LakeUrl::parse(s).unwrap()
    }

    fn only(rules: &[&str]) -> EndpointPolicy {
        EndpointPolicy::Only(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn azure_endpoints_are_allowed_over_https_and_nothing_else_is() {
        let p = EndpointPolicy::azure();
        for ok in [
            "https://acct.blob.core.windows.net/data/p",
            "https://ACCT.Blob.Core.Windows.Net/data",
            "https://acct.privatelink.blob.core.windows.net/data",
            "https://acct.z12.blob.storage.azure.net/data",
            "https://acct.blob.core.usgovcloudapi.net/data",
            "https://acct.blob.core.chinacloudapi.cn/data",
        ] {
            assert_eq!(p.check(&url(ok)), Ok(()), "{ok}");
        }
        for refused in [
            "https://evil.example.com/data",
            // A look-alike: the suffix must follow a dot.
            "https://evilblob.core.windows.net/data",
            "https://blob.core.windows.net.evil.example/data",
            "https://127.0.0.1:10000/devstoreaccount1/data",
            "http://azurite.tidepool-e2e.svc.cluster.local:10000/data",
        ] {
            let e = p.check(&url(refused)).unwrap_err().to_string();
            assert!(e.contains("is not allowed on this node"), "{e}");
            assert!(e.contains("*.blob.core.windows.net"), "{e}");
            assert!(e.contains("node.lake.allowedEndpoints"), "{e}");
        }
        // Plain HTTP to an Azure host: refused, and the message says why.
        let e = p
            .check(&url("http://acct.blob.core.windows.net/data"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("never go over plain HTTP"), "{e}");
    }

    #[test]
    fn http_is_allowed_only_to_a_host_named_with_http() {
        let p = only(&[
            "http://azurite.tidepool-e2e.svc.cluster.local:10000",
            "https://lake.internal",
        ]);
        assert_eq!(
            p.check(&url(
                "http://azurite.tidepool-e2e.svc.cluster.local:10000/data"
            )),
            Ok(())
        );
        // Another port, or HTTPS where HTTP was named, or HTTP where HTTPS was.
        for refused in [
            "http://azurite.tidepool-e2e.svc.cluster.local:10001/data",
            "http://lake.internal/data",
            "http://lake.internal:443/data",
        ] {
            assert!(p.check(&url(refused)).is_err(), "{refused}");
        }
        assert_eq!(p.check(&url("https://lake.internal:8443/data")), Ok(()));
        let p = only(&["http://127.0.0.1"]);
        assert_eq!(
            p.check(&url("http://127.0.0.1:38211/devstoreaccount1/data")),
            Ok(())
        );
        assert!(p.check(&url("http://127.0.0.2:38211/acct/data")).is_err());
        assert!(p.check(&url("https://127.0.0.1:38211/acct/data")).is_err());
    }

    #[test]
    fn rules_that_cannot_be_meant_are_refused_in_words() {
        for (bad, why) in [
            ("ftp://host", "only https:// and http://"),
            ("http://*.example.com", "one named host only"),
            ("*.com", "at least two labels"),
            ("https://host/path", "no path"),
            ("https://host:port", "not a number"),
            ("*.", "a host"),
            ("", "a host"),
        ] {
            let e = bad.parse::<EndpointRule>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(EndpointPolicy::default(), EndpointPolicy::Any);
        assert_eq!(
            EndpointPolicy::default().check(&url("http://127.0.0.1:1/acct/data")),
            Ok(())
        );
    }
}
