//! Generated CRD YAML: what `make generate` writes and what the freshness test checks.
//!
//! One file per CRD, named `<plural>.<group>.yaml`, written identically to `crds/`
//! (so `kubectl apply -f crds/` installs the API) and to `charts/tidepool/crds/`
//! (Helm installs CRDs from there before anything else). Output is deterministic:
//! same types, same bytes.

use std::{
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{CachePool, CheckpointSync, DatasetCache};

/// Directories (relative to the repository root) that receive the generated YAML.
pub const TARGET_DIRS: [&str; 2] = ["crds", "charts/tidepool/crds"];

/// The command that regenerates the files; named in the header and in errors.
pub const GENERATE_COMMAND: &str = "make generate (cargo run -p tidepool-api --bin crdgen)";

/// Errors of rendering or writing the generated files.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A CRD could not be serialised (a bug in the types).
    #[error("cannot render CRD {name} as YAML: {source}")]
    Render {
        name: String,
        source: serde_yaml::Error,
    },
    /// Writing or reading a file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Every Tidepool CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![DatasetCache::crd(), CheckpointSync::crd(), CachePool::crd()]
}

/// `(file name, YAML)` of every CRD, in a stable order.
pub fn render() -> Result<Vec<(String, String)>, GenerateError> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = kube::ResourceExt::name_any(&crd);
            let body = serde_yaml::to_string(&crd).map_err(|source| GenerateError::Render {
                name: name.clone(),
                source,
            })?;
            let text =
                format!("# Generated from crds/src by `{GENERATE_COMMAND}`. Do not edit.\n{body}");
            Ok((format!("{name}.yaml"), text))
        })
        .collect()
}

/// Write every CRD into every [`TARGET_DIRS`] entry under `root`. Returns the paths written.
pub fn write_all(root: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    let files = render()?;
    let mut written = Vec::new();
    for dir in TARGET_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|source| GenerateError::Io {
            path: dir.clone(),
            source,
        })?;
        for (name, text) in &files {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| GenerateError::Io {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Paths under `root` whose content differs from (or is missing compared to) what the
/// types produce. Empty means fresh.
pub fn stale_files(root: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    let files = render()?;
    let mut stale = Vec::new();
    for dir in TARGET_DIRS {
        for (name, text) in &files {
            let path = root.join(dir).join(name);
            match std::fs::read_to_string(&path) {
                Ok(current) if current == *text => {}
                Ok(_) => stale.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => stale.push(path),
                Err(source) => return Err(GenerateError::Io { path, source }),
            }
        }
    }
    Ok(stale)
}
