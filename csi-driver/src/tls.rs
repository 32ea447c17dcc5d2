//! The process's TLS crypto provider.
//!
//! rustls needs one process-wide provider, and picks it from its crate features only
//! when exactly one is compiled in; otherwise the first TLS connection panics. The
//! workspace compiles only ring (see the workspace `Cargo.toml`), and every entry point
//! installs it explicitly anyway, so no build combination can leave the choice open.

/// Installs ring as the process's rustls crypto provider. Idempotent: a provider
/// already installed (by an earlier call) is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
