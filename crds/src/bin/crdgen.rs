//! `crdgen`: writes the generated CRD YAML (`make generate`).
//!
//! Usage: `crdgen [REPO_ROOT]` (default: this workspace) or `crdgen --check [REPO_ROOT]`,
//! which exits 1 listing stale files.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.first().is_some_and(|a| a == "--check");
    if check {
        args.remove(0);
    }
    let root = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    if check {
        let stale = tidepool_api::generate::stale_files(&root)?;
        for path in &stale {
            eprintln!("stale: {}", path.display());
        }
        if !stale.is_empty() {
            anyhow::bail!(
                "generated CRDs are stale; run {}",
                tidepool_api::generate::GENERATE_COMMAND
            );
        }
        return Ok(());
    }
    for path in tidepool_api::generate::write_all(&root)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
