//! SHA-256 listings in `sha256sum`'s format (`<64 hex>  <path>`), as the seeding Job and
//! the scripts in `scripts/` print them, and their comparison.
//!
//! The scripts frame a listing between a `BEGIN` line and an `END <count>` line; a block
//! counts only if its `END` is there and its count matches, so a reader cut off halfway
//! (or a container restarted mid-listing) never passes for a complete one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Path (relative to the dataset or volume root) → SHA-256 in lowercase hex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sums(pub BTreeMap<String, String>);

fn parse_line(line: &str) -> Option<(String, String)> {
    let (hash, path) = line.split_once("  ")?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = path
        .trim_end()
        .strip_prefix("./")
        .unwrap_or(path.trim_end());
    Some((path.to_owned(), hash.to_ascii_lowercase()))
}

impl Sums {
    /// Every checksum line anywhere in `text`.
    pub fn from_lines(text: &str) -> Sums {
        Sums(text.lines().filter_map(parse_line).collect())
    }

    /// Every complete `BEGIN` … `END <n>` block of `text`, in order.
    pub fn blocks(text: &str) -> Vec<Sums> {
        let mut blocks = Vec::new();
        let mut open: Option<Sums> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if line == "BEGIN" {
                open = Some(Sums::default());
            } else if let Some(n) = line.strip_prefix("END ") {
                if let (Some(block), Ok(n)) = (open.take(), n.trim().parse::<usize>())
                    && block.0.len() == n
                {
                    blocks.push(block);
                }
            } else if let (Some(block), Some((path, hash))) = (open.as_mut(), parse_line(line)) {
                block.0.insert(path, hash);
            }
        }
        blocks
    }

    /// The last complete block of `text`; panics (showing the text's tail) if there is none.
    pub fn last_block(text: &str, what: &str) -> Sums {
        Sums::blocks(text).pop().unwrap_or_else(|| {
            panic!(
                "{what}: no complete BEGIN..END checksum listing in its output; its end:\n{}",
                tail(text, 40)
            )
        })
    }

    /// The entries whose path starts with `prefix`.
    pub fn under(&self, prefix: &str) -> Sums {
        Sums(
            self.0
                .iter()
                .filter(|(p, _)| p.starts_with(prefix))
                .map(|(p, h)| (p.clone(), h.clone()))
                .collect(),
        )
    }

    /// `sha256sum -c` input for these entries.
    pub fn to_sha256sum(&self) -> String {
        self.0.iter().map(|(p, h)| format!("{h}  {p}\n")).collect()
    }

    /// Panics unless `seen` lists exactly these paths with exactly these checksums; the
    /// message names what is missing, extra or different.
    pub fn assert_same(&self, seen: &Sums, what: &str) {
        if self == seen {
            return;
        }
        let mut report = String::new();
        for (path, hash) in &self.0 {
            match seen.0.get(path) {
                None => writeln!(report, "  missing:   {path}").unwrap(),
                Some(h) if h != hash => {
                    writeln!(report, "  different: {path} (expected {hash}, read {h})").unwrap()
                }
                Some(_) => {}
            }
        }
        for path in seen.0.keys().filter(|p| !self.0.contains_key(*p)) {
            writeln!(report, "  extra:     {path}").unwrap();
        }
        panic!(
            "{what}: {} files expected, {} read, and they differ:\n{report}",
            self.0.len(),
            seen.0.len()
        );
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn only_complete_blocks_count() {
        let text = format!(
            "BEGIN\n{A}  ./x\nPROGRESS x 1\nBEGIN\n{A}  ./x\n{B}  y/z\nEND 2\nBEGIN\n{A}  x\nEND 2\n"
        );
        let blocks = Sums::blocks(&text);
        assert_eq!(
            blocks.len(),
            1,
            "the first is cut off, the last has a wrong count"
        );
        assert_eq!(blocks[0].0.get("x").map(String::as_str), Some(A));
        assert_eq!(blocks[0].0.get("y/z").map(String::as_str), Some(B));
    }

    #[test]
    #[should_panic(expected = "missing:   y")]
    fn a_missing_file_fails() {
        let want = Sums::from_lines(&format!("{A}  x\n{B}  y\n"));
        let seen = Sums::from_lines(&format!("{A}  x\n"));
        want.assert_same(&seen, "read");
    }

    #[test]
    #[should_panic(expected = "different: x")]
    fn a_different_byte_fails() {
        let want = Sums::from_lines(&format!("{A}  x\n"));
        let seen = Sums::from_lines(&format!("{B}  x\n"));
        want.assert_same(&seen, "read");
    }

    #[test]
    #[should_panic(expected = "extra:     z")]
    fn an_extra_file_fails() {
        let want = Sums::from_lines(&format!("{A}  x\n"));
        let seen = Sums::from_lines(&format!("{A}  x\n{B}  z\n"));
        want.assert_same(&seen, "read");
    }
}
