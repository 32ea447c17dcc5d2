//! The checker of a checkpoint destination as the lake itself holds it, for the tests
//! and the checkpoint fault harness: it trusts no status and no journal, only what a
//! reader of the lake would find.
//!
//! For every durable step (a manifest that is there and not empty): every object the
//! manifest names exists with exactly the size, the Content-MD5 and (unless asked not
//! to) the bytes the manifest records. A violation panics with the step and object
//! named.

use std::collections::BTreeMap;

use futures::StreamExt;
use md5::{Digest, Md5};

use crate::checkpoint::manifest::{Layout, ManifestHead, read_manifest};
use crate::checkpoint::restore::durable_steps;
use crate::checkpoint::upload::hex;
use crate::lake::Lake;

/// A blob's whole content (test sizes).
pub async fn get_all(lake: &dyn Lake, name: &str) -> Vec<u8> {
    let m = lake
        .head(name)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut body = lake
        .get_stream(name, 0..m.size, &m.etag)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut v = Vec::new();
    while let Some(c) = body.next().await {
        v.extend_from_slice(&c.unwrap_or_else(|e| panic!("{name}: {e}")));
    }
    v
}

/// A blob's whole content, or `None` if it is gone or changes while it is read.
pub async fn try_get_all(lake: &dyn Lake, name: &str) -> Option<Vec<u8>> {
    let m = lake.head(name).await.ok()?;
    let mut body = lake.get_stream(name, 0..m.size, &m.etag).await.ok()?;
    let mut v = Vec::new();
    while let Some(c) = body.next().await {
        v.extend_from_slice(&c.ok()?);
    }
    Some(v)
}

/// One durable step as its manifest describes it, checked against the lake.
#[derive(Clone, Debug)]
pub struct CheckedStep {
    pub head: ManifestHead,
    /// Path → MD5 (hex) of every object.
    pub files: BTreeMap<String, String>,
    /// Path → the node that wrote it.
    pub nodes: BTreeMap<String, String>,
}

/// Checks every durable step under `prefix` (see the module docs); `bytes: false`
/// checks size and Content-MD5 only (no download).
pub async fn check_destination(
    lake: &dyn Lake,
    prefix: &str,
    bytes: bool,
) -> BTreeMap<String, CheckedStep> {
    let names = Layout::new(prefix);
    let mut out = BTreeMap::new();
    for (step, _) in durable_steps(lake, &names).await.unwrap() {
        let doc = get_all(lake, &names.manifest(&step)).await;
        let mut objs = Vec::new();
        let head = read_manifest(&doc[..], |o| {
            objs.push(o);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("manifest of {step}: {e}"));
        assert_eq!(
            head.files as usize,
            objs.len(),
            "manifest of {step}: file count"
        );
        assert_eq!(head.step, step, "manifest of {step} names another step");
        let mut files = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for o in objs {
            let name = names.object(&step, &o.path);
            let meta = lake.head(&name).await.unwrap_or_else(|e| {
                panic!("manifest of {step} names {name}, which is missing: {e}")
            });
            assert_eq!(meta.size, o.size, "{name}: size differs from the manifest");
            assert_eq!(
                meta.content_md5.map(|m| hex(&m)),
                Some(o.md5.clone()),
                "{name}: Content-MD5 differs from the manifest"
            );
            if bytes {
                let data = get_all(lake, &name).await;
                assert_eq!(
                    hex(&Md5::digest(&data)),
                    o.md5,
                    "{name}: bytes differ from the manifest's MD5"
                );
            }
            nodes.insert(o.path.clone(), o.node.clone());
            files.insert(o.path, o.md5);
        }
        out.insert(step, CheckedStep { head, files, nodes });
    }
    out
}

/// [`check_destination`], as step → (path → MD5).
pub async fn check_manifests_with(
    lake: &dyn Lake,
    prefix: &str,
    bytes: bool,
) -> BTreeMap<String, BTreeMap<String, String>> {
    check_destination(lake, prefix, bytes)
        .await
        .into_iter()
        .map(|(s, c)| (s, c.files))
        .collect()
}

/// [`check_manifests_with`], bytes included.
pub async fn check_manifests(
    lake: &dyn Lake,
    prefix: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    check_manifests_with(lake, prefix, true).await
}

/// Hex MD5 of `b`.
pub fn md5_of(b: &[u8]) -> String {
    hex(&Md5::digest(b))
}

/// An MD5 as manifests write it.
pub fn md5_hex(md5: &[u8; 16]) -> String {
    hex(md5)
}
