//! Mapping of SDK errors onto [`LakeError`], and scrubbing of secrets from text.
//!
//! The mapping is by HTTP status and Azure error code, never by message text:
//! - 404 → `NotFound`; 412 on a conditional read (`If-Match`) → `Changed`;
//! - 409/412 with a `Lease*` error code → `LeaseConflict`;
//! - 409 `BlobAlreadyExists` (a create-only write) → `Exists`;
//! - 401/403 → `Denied`; 429, 503 and 500 `ServerBusy`/`OperationTimedOut` → `Throttled`;
//! - connection and I/O failures → `Connection`; a failed token exchange is classified
//!   by the error it wraps (an unreachable token endpoint is a connection failure, a
//!   rejected identity is `Denied`).
//!
//! Invariant: text taken from the SDK (which may include request URLs, hence a SAS)
//! passes through [`Scrubber::scrub`], which removes every URL query string and every
//! known secret, before it reaches a `LakeError`.

use std::error::Error as _;

use azure_core::error::ErrorKind;

use crate::lake::{ETag, LakeError, Op, Secret};

/// Removes query strings and known secrets from text.
#[derive(Clone, Default)]
pub struct Scrubber {
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} secrets)", self.secrets.len())
    }
}

impl Scrubber {
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Self {
        Scrubber {
            secrets: secrets
                .into_iter()
                .filter(|s| !s.expose().is_empty())
                .collect(),
        }
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.expose(), "<redacted>");
        }
        // Drop every query string: from '?' to the next space, quote or bracket.
        let mut clean = String::with_capacity(out.len());
        let mut in_query = false;
        for c in out.chars() {
            if in_query {
                if c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ']') {
                    in_query = false;
                    clean.push(c);
                }
                continue;
            }
            if c == '?' {
                in_query = true;
                clean.push_str("?<redacted>");
                continue;
            }
            clean.push(c);
        }
        // A signature or key may also appear outside a URL (`sig=...`).
        if let Some(i) = clean.find("sig=") {
            clean.truncate(i);
            clean.push_str("sig=<redacted>");
        }
        clean
    }
}

/// What the failing request was, for precise mapping.
pub struct Ctx<'a> {
    pub op: Op,
    pub name: &'a str,
    /// The ETag of a conditional read: a 412 then means the blob changed.
    pub if_match: Option<&'a ETag>,
}

pub fn map(err: &azure_core::Error, ctx: &Ctx<'_>, scrub: &Scrubber) -> LakeError {
    let name = ctx.name.to_owned();
    let op = ctx.op;
    match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => map_status(u16::from(*status), error_code.as_deref(), ctx),
        ErrorKind::Connection | ErrorKind::Io => LakeError::Connection {
            op,
            name,
            detail: scrub.scrub(&chain(err)),
        },
        ErrorKind::Credential => {
            // Find what the token exchange itself ran into.
            let mut src = err.source();
            while let Some(e) = src {
                if let Some(inner) = e.downcast_ref::<azure_core::Error>() {
                    match inner.kind() {
                        ErrorKind::HttpResponse {
                            status, error_code, ..
                        } => {
                            let s = u16::from(*status);
                            if s == 429 || s >= 500 {
                                return map_status(s, error_code.as_deref(), ctx);
                            }
                            return LakeError::Denied {
                                op,
                                name,
                                status: s,
                            };
                        }
                        ErrorKind::Connection | ErrorKind::Io => {
                            return LakeError::Connection {
                                op,
                                name,
                                detail: format!("getting a token: {}", scrub.scrub(&chain(inner))),
                            };
                        }
                        _ => {}
                    }
                }
                src = e.source();
            }
            let text = chain(err);
            if text.contains("error sending request") || text.contains("onnect") {
                return LakeError::Connection {
                    op,
                    name,
                    detail: format!("getting a token: {}", scrub.scrub(&text)),
                };
            }
            LakeError::Denied {
                op,
                name,
                status: 401,
            }
        }
        _ => LakeError::Other {
            op,
            name,
            status: 0,
            detail: scrub.scrub(&chain(err)),
        },
    }
}

pub fn map_status(status: u16, code: Option<&str>, ctx: &Ctx<'_>) -> LakeError {
    let name = ctx.name.to_owned();
    let op = ctx.op;
    let code_str = code.unwrap_or("");
    match status {
        404 => LakeError::NotFound { name },
        409 | 412 if code_str.starts_with("Lease") => LakeError::LeaseConflict { name },
        409 if code_str == "BlobAlreadyExists" => LakeError::Exists { name },
        412 if ctx.if_match.is_some() => LakeError::Changed {
            name,
            expected: ctx.if_match.cloned().expect("checked"),
        },
        401 | 403 => LakeError::Denied { op, name, status },
        429 | 503 => LakeError::Throttled { op, name, status },
        500 if matches!(code_str, "ServerBusy" | "OperationTimedOut") => {
            LakeError::Throttled { op, name, status }
        }
        _ => LakeError::Other {
            op,
            name,
            status,
            detail: code_str.to_owned(),
        },
    }
}

/// The Azure error code of an HTTP error answer (`BlobNotFound`, ...).
pub fn code(err: &azure_core::Error) -> Option<&str> {
    match err.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.as_deref(),
        _ => None,
    }
}

/// The error and its sources, one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        let t = e.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_queries_and_secrets() {
        let s = Scrubber::new([Secret::new("KEYKEY")]);
        let t = s.scrub("error sending request for url (http://h/c/b?sv=1&sig=ABC%2B) key KEYKEY");
        assert_eq!(
            t,
            "error sending request for url (http://h/c/b?<redacted>) key <redacted>"
        );
        assert_eq!(s.scrub("bad sig=XYZ tail"), "bad sig=<redacted>");
    }

    #[test]
    fn statuses_map_to_kinds() {
        let e = ETag("\"0x1\"".into());
        let get = Ctx {
            op: Op::Get,
            name: "a",
            if_match: Some(&e),
        };
        let put = Ctx {
            op: Op::Put,
            name: "a",
            if_match: None,
        };
        assert!(matches!(
            map_status(404, Some("BlobNotFound"), &get),
            LakeError::NotFound { .. }
        ));
        assert!(matches!(
            map_status(412, Some("ConditionNotMet"), &get),
            LakeError::Changed { .. }
        ));
        assert!(matches!(
            map_status(412, Some("LeaseIdMissing"), &put),
            LakeError::LeaseConflict { .. }
        ));
        assert!(matches!(
            map_status(409, Some("LeaseAlreadyPresent"), &put),
            LakeError::LeaseConflict { .. }
        ));
        assert!(matches!(
            map_status(409, Some("BlobAlreadyExists"), &put),
            LakeError::Exists { .. }
        ));
        assert!(matches!(
            map_status(403, Some("AuthenticationFailed"), &put),
            LakeError::Denied { status: 403, .. }
        ));
        assert!(matches!(
            map_status(503, Some("ServerBusy"), &put),
            LakeError::Throttled { .. }
        ));
        assert!(matches!(
            map_status(500, Some("ServerBusy"), &put),
            LakeError::Throttled { .. }
        ));
        assert!(matches!(
            map_status(429, None, &put),
            LakeError::Throttled { .. }
        ));
        assert!(matches!(
            map_status(500, Some("InternalError"), &put),
            LakeError::Other { status: 500, .. }
        ));
    }
}
