//! Skipped tests, said out loud. A test that cannot run here (no API server binaries, a
//! kernel without FUSE over io_uring, no `csi-sanity`, no Helm engine, no grpcio, no real node)
//! calls [`skip`]: it prints one `SKIPPED <test>: <what it needs>: <why>` line to the
//! terminal, past the test harness's output capture, and appends the same to the file
//! `$TIDEPOOL_SKIP_LOG` names (`.ci/run` prints them all in its summary). Where
//! `$TIDEPOOL_REQUIRE` names the need (`envtest,node,uring,sanity,helm,grpcio`, or `all`), the
//! skip is a failure instead: a run that is meant to have everything cannot pass by
//! skipping.

use std::io::Write;

/// What a skipped test needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A real kube-apiserver and etcd (the envtest binaries).
    Envtest,
    /// A real node: kubelet, containerd, the images (`make node-up`).
    Node,
    /// FUSE over io_uring (Linux 6.14+, the fuse module's `enable_uring`).
    Uring,
    /// kubernetes-csi's `csi-sanity`.
    Sanity,
    /// Helm 4's engine (`make deps`).
    Helm,
    /// Python's grpcio (`make deps`), for the interop test.
    Grpcio,
}

impl Need {
    /// The name `$TIDEPOOL_REQUIRE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Need::Envtest => "envtest",
            Need::Node => "node",
            Need::Uring => "uring",
            Need::Sanity => "sanity",
            Need::Helm => "helm",
            Need::Grpcio => "grpcio",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Need::Envtest => "needs a real Kubernetes API server",
            Need::Node => "needs a real node (kubelet, containerd and the images)",
            Need::Uring => "needs FUSE over io_uring",
            Need::Sanity => "needs csi-sanity",
            Need::Helm => "needs the Helm engine",
            Need::Grpcio => "needs Python's grpcio",
        }
    }

    /// Whether `$TIDEPOOL_REQUIRE` (a comma-separated list) makes a skip of this a
    /// failure.
    pub fn required(self) -> bool {
        std::env::var("TIDEPOOL_REQUIRE").is_ok_and(|r| {
            r.split(',')
                .map(str::trim)
                .any(|n| n == "all" || n == self.name())
        })
    }
}

/// Skips `test` loudly (see the module docs), or fails it when `$TIDEPOOL_REQUIRE`
/// names `need`.
pub fn skip(need: Need, test: &str, why: &dyn std::fmt::Display) {
    let line = format!("SKIPPED {test}: {}: {why}", need.what());
    if need.required() {
        panic!(
            "{line} (TIDEPOOL_REQUIRE names {}, so this is a failure)",
            need.name()
        );
    }
    // Straight to the terminal: `eprintln!` would be captured and shown only on a
    // failure.
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Some(path) = std::env::var_os("TIDEPOOL_SKIP_LOG") {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
    }
}
