//! Lake URLs: where a dataset or a checkpoint destination lives.
//!
//! Two forms are accepted:
//! - virtual-host style, as Azure serves it and as private endpoints, sovereign clouds
//!   and proxies keep it: `https://<account>.<host>/<container>/<prefix>`;
//! - path style, as Azurite (and other emulators) serve it:
//!   `http://127.0.0.1:10000/<account>/<container>/<prefix>`. Path style is chosen when
//!   the host is an IP address or `localhost`, where no account can be in the name.
//!
//! A query string on the URL is taken as a SAS token (what the portal's "Generate SAS"
//! copies), kept as a [`Secret`] and never shown again: [`LakeUrl`]'s `Display` prints the
//! URL without it.

use std::fmt;
use std::net::IpAddr;

use super::Secret;

/// A parsed lake location. The prefix is normalised: no leading `/`, and either empty
/// or ending in `/` (a dataset is a directory of the lake).
#[derive(Clone, PartialEq, Eq)]
pub struct LakeUrl {
    /// Account endpoint, e.g. `https://acct.blob.core.windows.net/` or
    /// `http://127.0.0.1:10000/devstoreaccount1/`, always ending in `/`.
    pub endpoint: url::Url,
    pub account: String,
    pub container: String,
    pub prefix: String,
    /// SAS token found in the URL's query string, if any.
    pub sas: Option<Secret>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LakeUrlError {
    #[error(
        "lake URL {0:?} is not a URL; expected https://<account>.blob.core.windows.net/<container>/<prefix>"
    )]
    Syntax(String),
    #[error("lake URL {0:?} must use http or https")]
    Scheme(String),
    #[error(
        "lake URL {0:?} names no container; expected https://<account>.<host>/<container>/<prefix>"
    )]
    NoContainer(String),
    #[error(
        "lake URL {0:?} names no account; for an emulator use http://127.0.0.1:10000/<account>/<container>/<prefix>"
    )]
    NoAccount(String),
    #[error(
        "lake URL {url:?}: container name {container:?} is invalid (3-63 characters of a-z, 0-9 and single '-', starting with a letter or digit)"
    )]
    BadContainer { url: String, container: String },
}

impl LakeUrl {
    pub fn parse(input: &str) -> Result<Self, LakeUrlError> {
        let redacted = redact(input);
        let parsed = url::Url::parse(input).map_err(|_| LakeUrlError::Syntax(redacted.clone()))?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(LakeUrlError::Scheme(redacted));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| LakeUrlError::Syntax(redacted.clone()))?;
        let path_style =
            host == "localhost" || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
        let mut segments: Vec<String> = parsed
            .path_segments()
            .map(|s| s.map(percent_decode).collect())
            .unwrap_or_default();
        let mut endpoint = parsed.clone();
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        let account = if path_style {
            if segments.first().is_none_or(|s| s.is_empty()) {
                return Err(LakeUrlError::NoAccount(redacted));
            }
            let account = segments.remove(0);
            endpoint.set_path(&format!("/{account}/"));
            account
        } else {
            endpoint.set_path("/");
            host.split('.').next().unwrap_or_default().to_owned()
        };
        if account.is_empty() {
            return Err(LakeUrlError::NoAccount(redacted));
        }
        let container = match segments.first() {
            Some(c) if !c.is_empty() => segments.remove(0),
            _ => return Err(LakeUrlError::NoContainer(redacted)),
        };
        if !valid_container(&container) {
            return Err(LakeUrlError::BadContainer {
                url: redacted,
                container,
            });
        }
        let mut prefix = segments.join("/");
        prefix = prefix.trim_start_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let sas = parsed
            .query()
            .filter(|q| !q.is_empty())
            .map(|q| Secret::new(q.to_owned()));
        Ok(LakeUrl {
            endpoint,
            account,
            container,
            prefix,
            sas,
        })
    }

    /// The container's URL (no prefix, no query).
    pub fn container_url(&self) -> url::Url {
        self.endpoint
            .join(&format!("{}/", self.container))
            .expect("container names are URL-safe")
    }
}

impl fmt::Display for LakeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/{}", self.endpoint, self.container, self.prefix)
    }
}

impl fmt::Debug for LakeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LakeUrl({self})")
    }
}

impl std::str::FromStr for LakeUrl {
    type Err = LakeUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LakeUrl::parse(s)
    }
}

/// The input with any query string removed, for error messages.
fn redact(input: &str) -> String {
    match input.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => input.to_owned(),
    }
}

fn valid_container(c: &str) -> bool {
    // `$root` and `$web` are Azure's special containers.
    if c == "$root" || c == "$web" {
        return true;
    }
    (3..=63).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && c.as_bytes()[0] != b'-'
        && !c.ends_with('-')
        && !c.contains("--")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_virtual_host_style() {
        let u = LakeUrl::parse("https://acct.blob.core.windows.net/data/imagenet/train").unwrap();
        assert_eq!(u.account, "acct");
        assert_eq!(u.container, "data");
        assert_eq!(u.prefix, "imagenet/train/");
        assert_eq!(u.endpoint.as_str(), "https://acct.blob.core.windows.net/");
        assert_eq!(
            u.container_url().as_str(),
            "https://acct.blob.core.windows.net/data/"
        );
        assert!(u.sas.is_none());
    }

    #[test]
    fn azurite_path_style_and_whole_container() {
        let u = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/dsets").unwrap();
        assert_eq!(u.account, "devstoreaccount1");
        assert_eq!(u.container, "dsets");
        assert_eq!(u.prefix, "");
        assert_eq!(
            u.endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/"
        );
        assert_eq!(
            u.to_string(),
            "http://127.0.0.1:10000/devstoreaccount1/dsets/"
        );
    }

    #[test]
    fn sas_in_query_is_kept_secret_and_never_displayed() {
        let u =
            LakeUrl::parse("https://a.blob.core.windows.net/c1c/p?sv=2022&sig=SECRETSIG").unwrap();
        assert_eq!(u.sas.as_ref().unwrap().expose(), "sv=2022&sig=SECRETSIG");
        assert!(!u.to_string().contains("SECRETSIG"));
        assert!(!format!("{u:?}").contains("SECRETSIG"));
        let err = LakeUrl::parse("https://a.blob.core.windows.net/?sig=SECRETSIG").unwrap_err();
        assert!(!err.to_string().contains("SECRETSIG"), "{err}");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        assert!(matches!(
            LakeUrl::parse("not a url"),
            Err(LakeUrlError::Syntax(_))
        ));
        assert!(matches!(
            LakeUrl::parse("ftp://a.b/c"),
            Err(LakeUrlError::Scheme(_))
        ));
        assert!(matches!(
            LakeUrl::parse("https://a.blob.core.windows.net/"),
            Err(LakeUrlError::NoContainer(_))
        ));
        assert!(matches!(
            LakeUrl::parse("http://127.0.0.1:10000/"),
            Err(LakeUrlError::NoAccount(_))
        ));
        let e = LakeUrl::parse("https://a.blob.core.windows.net/Bad_Name/x").unwrap_err();
        assert!(e.to_string().contains("Bad_Name"), "{e}");
    }

    #[test]
    fn percent_encoded_prefix_is_decoded() {
        let u = LakeUrl::parse("https://a.blob.core.windows.net/cont/my%20data/").unwrap();
        assert_eq!(u.prefix, "my data/");
    }
}
