//! Azure's one-level listing (List Blobs with `delimiter=/`), read from the answer's
//! XML. The blob SDK sends the request (with our delimiter added by a policy) but has no
//! model for `BlobPrefix`, so the body is read here, event by event: `Blob` and
//! `BlobPrefix` elements may come in any order within `Blobs` (the REST reference shows
//! them grouped; nothing promises it), and each page is sorted before it is returned.
//!
//! A `Name` with `Encoded="true"` (a name holding characters XML cannot carry) is
//! percent-encoded, as Azure documents; it is decoded here.

use std::time::SystemTime;

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::lake::{LevelPage, ObjectMeta};

/// Reads one page of a delimiter listing. The error says what is wrong with the body.
pub fn parse(body: &[u8]) -> Result<LevelPage, String> {
    let mut reader = Reader::from_reader(body);
    let mut path: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut encoded = false;
    let mut page = LevelPage::default();
    let mut blob: Option<Fields> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("XML at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                encoded = e
                    .try_get_attribute("Encoded")
                    .ok()
                    .flatten()
                    .is_some_and(|a| a.value.as_ref() == b"true");
                if name == "Blob" {
                    blob = Some(Fields::default());
                }
                path.push(name);
                text.clear();
            }
            Event::Text(t) => {
                text.push_str(&t.decode().map_err(|e| format!("XML text: {e}"))?);
            }
            Event::CData(t) => {
                text.push_str(&t.decode().map_err(|e| format!("XML text: {e}"))?);
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(|e| format!("XML: {e}"))? {
                    Some(c) => c,
                    None => match r.decode().map_err(|e| format!("XML: {e}"))?.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => return Err(format!("unknown XML entity &{other};")),
                    },
                };
                text.push(c);
            }
            Event::End(_) => {
                let value = std::mem::take(&mut text);
                let names: Vec<&str> = path.iter().map(String::as_str).collect();
                match names.as_slice() {
                    ["EnumerationResults", "NextMarker"] => {
                        page.next = Some(value).filter(|m| !m.is_empty());
                    }
                    ["EnumerationResults", "Blobs", "BlobPrefix", "Name"] => {
                        page.prefixes.push(decode_name(value, encoded)?);
                    }
                    ["EnumerationResults", "Blobs", "Blob", rest @ ..] => {
                        let f = blob.as_mut().ok_or("Blob field outside a Blob")?;
                        match rest {
                            ["Name"] => f.name = Some(decode_name(value, encoded)?),
                            ["Properties", "Content-Length"] => {
                                f.size = Some(value.trim().parse().map_err(|_| {
                                    format!("Content-Length {value:?} is not a number")
                                })?);
                            }
                            ["Properties", "Etag"] => f.etag = Some(value),
                            ["Properties", "Last-Modified"] => {
                                f.modified = Some(
                                    azure_core::time::parse_rfc7231(value.trim())
                                        .map_err(|_| format!("Last-Modified {value:?}"))?
                                        .into(),
                                );
                            }
                            ["Properties", "Content-MD5"] if !value.is_empty() => {
                                f.md5 = md5(&value);
                            }
                            [] => {
                                let f = blob.take().ok_or("Blob ends twice")?;
                                page.objects.push(f.object()?);
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !path.is_empty() {
        return Err(format!("the XML ends inside <{}>", path.join("><")));
    }
    page.objects.sort_by(|a, b| a.name.cmp(&b.name));
    page.prefixes.sort();
    Ok(page)
}

#[derive(Default)]
struct Fields {
    name: Option<String>,
    size: Option<u64>,
    etag: Option<String>,
    modified: Option<SystemTime>,
    md5: Option<[u8; 16]>,
}

impl Fields {
    fn object(self) -> Result<ObjectMeta, String> {
        let name = self.name.ok_or("a listing entry without a name")?;
        let etag = self
            .etag
            .ok_or_else(|| format!("{name}: listing entry without an ETag"))?;
        Ok(ObjectMeta {
            size: self.size.unwrap_or(0),
            etag: super::quoted(etag),
            last_modified: self.modified.unwrap_or(SystemTime::UNIX_EPOCH),
            content_md5: self.md5,
            name,
        })
    }
}

fn md5(b64: &str) -> Option<[u8; 16]> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?
        .try_into()
        .ok()
}

/// A name as it was written: percent-decoded when the lake marked it encoded.
fn decode_name(value: String, encoded: bool) -> Result<String, String> {
    if !encoded {
        return Ok(value);
    }
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("encoded name {value:?} has a bad escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("encoded name {value:?} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::ETag;

    #[test]
    fn reads_blobs_and_prefixes_in_any_order_with_escapes_and_encoded_names() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="https://a.blob.core.windows.net/" ContainerName="c">
  <Prefix>ds/</Prefix><Delimiter>/</Delimiter>
  <Blobs>
    <BlobPrefix><Name>ds/b/</Name></BlobPrefix>
    <Blob><Name>ds/a&amp;b.txt</Name><Properties>
      <Last-Modified>Mon, 07 Dec 2026 12:00:00 GMT</Last-Modified>
      <Etag>0x8DDA</Etag><Content-Length>42</Content-Length>
      <Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5></Properties></Blob>
    <BlobPrefix><Name Encoded="true">ds/%EF%BF%BFx/</Name></BlobPrefix>
    <Blob><Name>ds/0</Name><Properties><Etag>"q"</Etag><Content-Length>0</Content-Length>
      <Content-MD5 /></Properties></Blob>
  </Blobs>
  <NextMarker>2!abc</NextMarker>
</EnumerationResults>"#;
        let page = parse(xml.as_bytes()).unwrap();
        let names: Vec<_> = page.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["ds/0", "ds/a&b.txt"]);
        assert_eq!(page.prefixes, ["ds/b/", "ds/\u{FFFF}x/"]);
        assert_eq!(page.next.as_deref(), Some("2!abc"));
        let a = &page.objects[1];
        assert_eq!(a.size, 42);
        assert_eq!(a.etag, ETag("\"0x8DDA\"".into()));
        assert_eq!(
            a.content_md5,
            Some([
                0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
                0x42, 0x7e
            ])
        );
        assert_eq!(
            a.last_modified,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_644_800)
        );
        assert_eq!(page.objects[0].etag, ETag("\"q\"".into()));
        assert_eq!(page.objects[0].content_md5, None);

        let last =
            parse(b"<EnumerationResults><Blobs/><NextMarker/></EnumerationResults>").unwrap();
        assert!(last.objects.is_empty() && last.prefixes.is_empty() && last.next.is_none());
        let cut = parse(b"<EnumerationResults><Blobs><Blob><Name>x</Name>").unwrap_err();
        assert!(cut.contains("ends inside"), "{cut}");
        let no_etag = parse(
            b"<EnumerationResults><Blobs><Blob><Name>x</Name></Blob></Blobs></EnumerationResults>",
        )
        .unwrap_err();
        assert!(
            no_etag.contains("x: listing entry without an ETag"),
            "{no_etag}"
        );
    }
}
