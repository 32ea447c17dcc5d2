//! The lake side of checkpoints: where everything goes, and the records nodes write.
//!
//! Under the destination prefix `P`:
//! - `P<step>/<path>`: the files, one blob per file with the same name, in their native
//!   format (a job or a person reads them without Tidepool);
//! - `P_tidepool/intents/<step>/<node>`: node `node` writes part of `step` (empty blob,
//!   written as soon as the node sees the step);
//! - `P_tidepool/parts/<step>/<node>.jsonl`: node `node` has uploaded its part of
//!   `step`: a [`PartHeader`] line, then one [`ObjectRecord`] line per file;
//! - `P_tidepool/steps/<step>.json`: the **manifest**, written last, when every node
//!   writing the step has its part of one version in (the configured number of nodes,
//!   or every node with an intent after a settle window). A step is durable exactly
//!   when its manifest exists and is not empty; readers
//!   ([`restore`](super::restore::restore), lake-backed steps) trust nothing else. It
//!   lists every object with size and MD5 (see [`Manifest`]). An **empty** blob under
//!   that name is a withdrawn manifest (see below);
//! - `P_tidepool/nodes/<node>.lock`: leased by the node's running sync (one uploader
//!   per node and destination);
//! - `P_tidepool/deleting/<step>.json`: retention (`keep_remote`) is deleting `step`: a
//!   copy of its manifest, written before the manifest is deleted (so no reader trusts
//!   the step from then on) and removed after the last of its objects; a sync that
//!   finds one finishes the deletion;
//! - `P_tidepool/retired/<step>.json`: the version of `step` retention deleted (a
//!   [`Retired`]); a node whose part of that version was still uploading drops it;
//! - `P_tidepool/versions/<step>/<node>.<seq>.json`: node `node` leads a version of
//!   `step` (see `sync::follow`).
//!
//!
//! Withdrawing and publishing are a compare-and-swap on the manifest's name. A node
//! about to replace objects of a step (a new commit of it) first deletes its own part
//! record, then writes an empty blob over the manifest, then uploads. A publisher reads
//! the manifest's ETag (or its absence) before it lists the parts, and writes the
//! manifest only if that ETag is still there (`If-Match`, or `If-None-Match: *`). So a
//! manifest is written only if no node began replacing objects of the step between the
//! publisher's look at the parts and its write: it never vouches for objects being
//! replaced (the withdrawal's new ETag fails the publisher's write, and a part deleted
//! before the withdrawal is not among those it merged).
//!
//! Manifests and part records are written and read one object at a time (a step of a
//! million files never sits in memory): the manifest is JSON whose `objects` array is
//! streamed by [`write_manifest`] and visited element by element by [`read_manifest`].

use std::fmt;
use std::io::{self, BufRead, Read, Write};

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The `format` of manifests this version writes.
pub const FORMAT: &str = "tidepool.dev/checkpoint-manifest/v1";

/// Names in the lake for a destination prefix (`""` or ending in `/`).
#[derive(Clone, Debug)]
pub struct Layout {
    pub prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.to_owned(),
        }
    }
    pub fn object(&self, step: &str, path: &str) -> String {
        format!("{}{step}/{path}", self.prefix)
    }
    pub fn step_prefix(&self, step: &str) -> String {
        format!("{}{step}/", self.prefix)
    }
    pub fn intent(&self, step: &str, node: &str) -> String {
        format!("{}_tidepool/intents/{step}/{node}", self.prefix)
    }
    pub fn intents(&self, step: &str) -> String {
        format!("{}_tidepool/intents/{step}/", self.prefix)
    }
    pub fn part(&self, step: &str, node: &str) -> String {
        format!("{}_tidepool/parts/{step}/{node}.jsonl", self.prefix)
    }
    pub fn parts(&self, step: &str) -> String {
        format!("{}_tidepool/parts/{step}/", self.prefix)
    }
    pub fn manifest(&self, step: &str) -> String {
        format!("{}_tidepool/steps/{step}.json", self.prefix)
    }
    pub fn manifests(&self) -> String {
        format!("{}_tidepool/steps/", self.prefix)
    }
    /// A step being deleted by retention: a copy of its manifest, written before the
    /// manifest is deleted, removed after the last object is.
    pub fn tombstone(&self, step: &str) -> String {
        format!("{}_tidepool/deleting/{step}.json", self.prefix)
    }
    pub fn tombstones(&self) -> String {
        format!("{}_tidepool/deleting/", self.prefix)
    }
    /// A step retention deleted: the version it deleted (see [`Retired`]), kept so that
    /// a node whose part of that version was still on its way drops it instead of
    /// waiting for nodes whose parts are gone.
    pub fn retired(&self, step: &str) -> String {
        format!("{}_tidepool/retired/{step}.json", self.prefix)
    }
    pub fn lock(&self, node: &str) -> String {
        format!("{}_tidepool/nodes/{node}.lock", self.prefix)
    }
    /// The step a manifest name belongs to.
    pub fn step_of_manifest<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(&self.manifests())?.strip_suffix(".json")
    }
    /// The node of a part or intent name under `list_prefix`.
    pub fn node_of<'a>(name: &'a str, list_prefix: &str) -> Option<&'a str> {
        let rest = name.strip_prefix(list_prefix)?;
        Some(rest.strip_suffix(".jsonl").unwrap_or(rest))
    }
}

/// A step name as it may appear in the lake: one plain directory name (it becomes a
/// local path on restore and a directory in the volume).
pub fn valid_step_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// An MD5 written as 32 hex digits (as manifests, part records and the journal write
/// them); `None` for anything else, whatever its bytes (a non-ASCII or signed value is
/// refused, never sliced or half-parsed).
pub fn parse_md5_hex(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    };
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i]) << 4 | digit(b[2 * i + 1]);
    }
    Some(out)
}

/// What `_tidepool/retired/<step>.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub step: String,
    /// The version of the step that was durable and deleted.
    pub version: String,
    pub retired_unix_ms: u64,
}

/// The first line of a part record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartHeader {
    pub step: String,
    pub node: String,
    /// The node's commit number it came from.
    pub seq: u64,
    pub reason: String,
    pub files: u64,
    pub bytes: u64,
    /// The version of the step this part belongs to: `<node>:<seq>` when this node's
    /// own commit rule fired (it leads the version), else the version of the node it
    /// followed. A manifest merges the parts of one version only. Absent in records of
    /// older Tidepool versions: then `<node>:<seq>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// When the commit was taken (the committing node's clock): of two versions led by
    /// different nodes, the later one is followed.
    #[serde(default)]
    pub committed_unix_ms: u64,
}

impl PartHeader {
    /// The version this part belongs to.
    pub fn version(&self) -> String {
        if self.version.is_empty() {
            format!("{}:{}", self.node, self.seq)
        } else {
            self.version.clone()
        }
    }

    /// Whether this part's node leads its version (its own rule fired).
    pub fn leads(&self) -> bool {
        self.version() == format!("{}:{}", self.node, self.seq)
    }
}

/// One object of a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// Path inside the step, `/`-separated; the blob is `<prefix><step>/<path>`.
    pub path: String,
    pub size: u64,
    /// Hex MD5 of the content (the blob carries the same as Content-MD5).
    pub md5: String,
    /// The node that wrote it (set in manifests).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// What a manifest says besides its objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHead {
    pub format: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_number: Option<u64>,
    pub created_unix_ms: u64,
    pub nodes: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    /// The version of the step every part merged here belongs to (see
    /// [`PartHeader::version`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The number of nodes the step was configured to wait for (`--nodes`,
    /// `spec.commit.nodes`); absent when it waited for the nodes that announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_nodes: Option<u32>,
    /// When the save completed: the leading node's commit of the version (its clock).
    /// Steps are ordered by it ("latest" is the step saved last, whenever it became
    /// durable). Written as the manifest's first field by [`write_manifest`], so that
    /// [`saved_unix_ms_of`] finds it in the first bytes.
    #[serde(default, skip_serializing)]
    pub saved_unix_ms: Option<u64>,
}

/// The `saved_unix_ms` of a manifest from its first bytes (see
/// [`ManifestHead::saved_unix_ms`]); `None` for a manifest written without it.
pub fn saved_unix_ms_of(first: &[u8]) -> Option<u64> {
    let rest = first.strip_prefix(b"{\"saved_unix_ms\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// How many first bytes of a manifest hold its `saved_unix_ms`.
pub const SAVED_PREFIX: u64 = 64;

/// A manifest: `{head fields…, "objects": [ObjectRecord…]}` (the head is flattened).
pub type Manifest = (ManifestHead, Vec<ObjectRecord>);

/// Writes a manifest: `objects` streamed from `next` until it returns `None`, then the
/// head's fields with the totals counted on the way (JSON objects are unordered; the
/// array comes first so that nothing has to be known before the objects are).
pub fn write_manifest<W: Write>(
    out: &mut W,
    head: &ManifestHead,
    mut next: impl FnMut() -> io::Result<Option<ObjectRecord>>,
) -> io::Result<ManifestHead> {
    match head.saved_unix_ms {
        Some(t) => writeln!(out, "{{\"saved_unix_ms\":{t},\"objects\":[")?,
        None => out.write_all(b"{\"objects\":[\n")?,
    }
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some(o) = next()? {
        if files > 0 {
            out.write_all(b",\n")?;
        }
        files += 1;
        bytes += o.size;
        serde_json::to_writer(&mut *out, &o)?;
    }
    let head = ManifestHead {
        files,
        bytes,
        ..head.clone()
    };
    let head_json = serde_json::to_string(&head).expect("serializable");
    out.write_all(b"\n],")?;
    // The head's fields without its opening brace.
    out.write_all(&head_json.as_bytes()[1..])?;
    out.write_all(b"\n")?;
    Ok(head)
}

/// Reads a manifest from `r`, calling `each` for every object as it is parsed; returns
/// the head. Fails on a format this version does not know.
pub fn read_manifest<R: Read>(
    r: R,
    mut each: impl FnMut(ObjectRecord) -> io::Result<()>,
) -> io::Result<ManifestHead> {
    let mut de = serde_json::Deserializer::from_reader(r);
    let head = ManifestSeed { each: &mut each }
        .deserialize(&mut de)
        .map_err(io::Error::other)?;
    de.end().map_err(io::Error::other)?;
    if head.format != FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "manifest format {:?} is not {FORMAT:?}; upgrade tidepool to read it",
                head.format
            ),
        ));
    }
    Ok(head)
}

struct ManifestSeed<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(ObjectRecord) -> io::Result<()>> DeserializeSeed<'de> for ManifestSeed<'_, F> {
    type Value = ManifestHead;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<ManifestHead, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(ObjectRecord) -> io::Result<()>> Visitor<'de> for ManifestSeed<'_, F> {
    type Value = ManifestHead;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a checkpoint manifest object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ManifestHead, A::Error> {
        let mut rest = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "objects" {
                map.next_value_seed(ObjectsSeed { each: self.each })?;
            } else {
                rest.insert(key, map.next_value()?);
            }
        }
        serde_json::from_value(serde_json::Value::Object(rest)).map_err(serde::de::Error::custom)
    }
}

struct ObjectsSeed<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(ObjectRecord) -> io::Result<()>> DeserializeSeed<'de> for ObjectsSeed<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(ObjectRecord) -> io::Result<()>> Visitor<'de> for ObjectsSeed<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(o) = seq.next_element::<ObjectRecord>()? {
            (self.each)(o).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

/// Reads a part record line by line: the header, then `each` object.
pub fn read_part<R: BufRead>(
    r: R,
    mut each: impl FnMut(ObjectRecord) -> io::Result<()>,
) -> io::Result<PartHeader> {
    let mut lines = r.lines();
    let first = lines
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty part record"))??;
    let head: PartHeader = serde_json::from_str(&first).map_err(io::Error::other)?;
    let mut n = 0;
    for l in lines {
        let l = l?;
        if l.is_empty() {
            continue;
        }
        each(serde_json::from_str(&l).map_err(io::Error::other)?)?;
        n += 1;
    }
    if n != head.files {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "part record of {} on {} lists {n} files, its header {}",
                head.step, head.node, head.files
            ),
        ));
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(p: &str, size: u64) -> ObjectRecord {
        ObjectRecord {
            path: p.into(),
            size,
            md5: "d41d8cd98f00b204e9800998ecf8427e".into(),
            node: "n1".into(),
        }
    }

    #[test]
    fn a_manifest_streams_out_and_back_object_by_object() {
        let objs = vec![obj("a", 1), obj("dir/b", 2), obj("c", 3)];
        let head = ManifestHead {
            format: FORMAT.into(),
            step: "step-7".into(),
            step_number: Some(7),
            created_unix_ms: 1,
            nodes: vec!["n1".into()],
            files: 3,
            bytes: 6,
            version: "n1:4".into(),
            expected_nodes: Some(1),
            saved_unix_ms: Some(1_700_000_000_123),
        };
        let mut out = Vec::new();
        let mut it = objs.clone().into_iter();
        let unset = ManifestHead {
            files: 0,
            bytes: 0,
            ..head.clone()
        };
        assert_eq!(
            write_manifest(&mut out, &unset, || Ok(it.next())).unwrap(),
            head,
            "totals counted"
        );
        // When it was saved, from its first bytes.
        assert_eq!(
            saved_unix_ms_of(&out[..SAVED_PREFIX as usize]),
            Some(1_700_000_000_123)
        );
        // It is plain JSON a user can read with any tool.
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["objects"][1]["path"], "dir/b");
        assert_eq!(v["step"], "step-7");
        let mut back = Vec::new();
        let h = read_manifest(&out[..], |o| {
            back.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(h, head);
        assert_eq!(back, objs);
    }

    #[test]
    fn an_unknown_format_is_refused_with_advice() {
        let doc = br#"{"format":"tidepool.dev/checkpoint-manifest/v9","step":"s","created_unix_ms":0,"nodes":[],"files":0,"bytes":0,"objects":[]}"#;
        let e = read_manifest(&doc[..], |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("upgrade tidepool"), "{e}");
    }

    #[test]
    fn md5_hex_parses_only_32_hex_digits() {
        let m = [
            0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
            0x42, 0x7e,
        ];
        assert_eq!(parse_md5_hex("d41d8cd98f00b204e9800998ecf8427e"), Some(m));
        assert_eq!(parse_md5_hex("D41D8CD98F00B204E9800998ECF8427E"), Some(m));
        for bad in [
            "xyz",
            "",
            "d41d8cd98f00b204e9800998ecf8427",
            // 32 bytes, not 32 digits: one copy of this parser panicked on it.
            "é41d8cd98f00b204e9800998ecf842",
            "+41d8cd98f00b204e9800998ecf8427e",
            "d41d8cd98f00b204e9800998ecf8427g",
        ] {
            assert_eq!(parse_md5_hex(bad), None, "{bad:?}");
        }
        assert!(valid_step_name("step-1") && !valid_step_name("a/b") && !valid_step_name(".."));
    }

    #[test]
    fn names_in_the_lake() {
        let l = Layout::new("runs/a/");
        assert_eq!(l.object("step-1", "x/y.pt"), "runs/a/step-1/x/y.pt");
        assert_eq!(l.manifest("step-1"), "runs/a/_tidepool/steps/step-1.json");
        assert_eq!(
            l.step_of_manifest("runs/a/_tidepool/steps/step-1.json"),
            Some("step-1")
        );
        assert_eq!(
            Layout::node_of("runs/a/_tidepool/parts/s/n2.jsonl", &l.parts("s")),
            Some("n2")
        );
    }
}
