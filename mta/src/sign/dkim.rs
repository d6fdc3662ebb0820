//! Building DKIM signatures (RFC 6376 §3.5, §3.7, §5): which header fields
//! are signed, the `DKIM-Signature` field, and the data handed to the key.
//!
//! All keys of a message share one body hash and one set of canonical
//! header fields; only the signature field and the signing differ.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dkim_keys::RingKey;

use super::SignatureInfo;
use super::canon::{relaxed_body_hash, relaxed_header};

/// Headers signed when present, by their lower-case names; `true` marks
/// the over-signed ones (listed once more than they occur, or once when
/// absent, so none can be added).
pub const SIGNED_HEADERS: &[(&str, bool)] = &[
    ("from", true),
    ("to", true),
    ("cc", false),
    ("subject", true),
    ("date", true),
    ("message-id", true),
    ("reply-to", false),
    ("in-reply-to", false),
    ("references", false),
    ("mime-version", false),
    ("content-type", false),
    ("content-transfer-encoding", false),
    ("list-unsubscribe", true),
    ("list-unsubscribe-post", false),
    ("feedback-id", false),
];

/// One header field as it stands in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    /// Everything after the colon, folding included, without the final CRLF.
    pub value: &'a [u8],
}

/// Splits a message into its header fields and its body.
pub fn split(message: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let (head, body) = if message.starts_with(b"\r\n") {
        (&message[..0], &message[2..])
    } else {
        match memchr::memmem::find(message, b"\r\n\r\n") {
            Some(i) => (&message[..i + 2], &message[i + 4..]),
            None => (message, &message[message.len()..]),
        }
    };
    let mut fields: Vec<Field<'_>> = Vec::with_capacity(16);
    let mut start = 0;
    let mut pos = 0;
    while pos < head.len() {
        let (end, next) = match memchr::memchr(b'\n', &head[pos..]) {
            Some(i) if pos + i > 0 && head[pos + i - 1] == b'\r' => (pos + i - 1, pos + i + 1),
            Some(i) => (pos + i, pos + i + 1),
            None => (head.len(), head.len()),
        };
        // A field ends where the next line does not start with white space.
        let continued = head.get(next).is_some_and(|&b| b == b' ' || b == b'\t');
        if !continued {
            let raw = &head[start..end];
            if let Some(colon) = memchr::memchr(b':', raw) {
                fields.push(Field {
                    name: &raw[..colon],
                    value: &raw[colon + 1..],
                });
            }
            start = next;
        }
        pos = next;
    }
    (fields, body)
}

/// For each field, its index in [`SIGNED_HEADERS`], if it is signed.
fn signed_index(fields: &[Field<'_>]) -> Vec<Option<usize>> {
    fields
        .iter()
        .map(|f| {
            let name = f.name.trim_ascii();
            SIGNED_HEADERS
                .iter()
                .position(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
        })
        .collect()
}

/// The `h=` list for a message: every present instance of the signed
/// headers, plus one more name for each over-signed header.
pub fn header_list(fields: &[Field<'_>]) -> Vec<&'static str> {
    list_from_index(&signed_index(fields))
}

fn list_from_index(index: &[Option<usize>]) -> Vec<&'static str> {
    let mut counts = [0usize; SIGNED_HEADERS.len()];
    for &i in index.iter().flatten() {
        counts[i] += 1;
    }
    let mut h = Vec::with_capacity(32);
    for (i, &(name, oversign)) in SIGNED_HEADERS.iter().enumerate() {
        h.extend(std::iter::repeat_n(name, counts[i] + usize::from(oversign)));
    }
    h
}

/// The canonical signed header fields, chosen as RFC 6376 §5.4.2 says:
/// for each name in `h`, the last instance not chosen yet; none when there
/// is none left.
pub fn canonical_headers(fields: &[Field<'_>], h: &[&str]) -> Vec<u8> {
    canonical_from_index(fields, &signed_index(fields), h)
}

fn canonical_from_index(fields: &[Field<'_>], index: &[Option<usize>], h: &[&str]) -> Vec<u8> {
    let mut used = vec![false; fields.len()];
    let mut out = Vec::with_capacity(1024);
    for name in h {
        let want = SIGNED_HEADERS.iter().position(|(n, _)| n == name);
        let pick = (0..fields.len())
            .rev()
            .find(|&i| !used[i] && want.is_some() && index[i] == want);
        if let Some(i) = pick {
            used[i] = true;
            relaxed_header(fields[i].name, fields[i].value, &mut out);
        }
    }
    out
}

/// Appends ` tag=value;` to a field being folded at 78 columns.
fn push_tag(out: &mut String, line_len: &mut usize, tag: &str, value: &str) {
    let len = tag.len() + value.len() + 1;
    if *line_len + 1 + len > 78 {
        out.push_str("\r\n\t");
        *line_len = 8;
    } else {
        out.push(' ');
        *line_len += 1;
    }
    out.push_str(tag);
    out.push_str(value);
    out.push(';');
    *line_len += len;
}

/// Signs a message with each key (RFC 6376 §5): relaxed/relaxed, `t=` from
/// `now`, `x=` when an expiration is given. Returns the `DKIM-Signature`
/// fields (CRLF-terminated, to go on top of the message) and what signed.
pub fn sign_message(
    keys: &[Arc<RingKey>],
    domain: &str,
    message: &[u8],
    now: SystemTime,
    expiration: Option<std::time::Duration>,
) -> Result<(Vec<u8>, Vec<SignatureInfo>), String> {
    sign_message_below(keys, domain, b"", message, now, expiration)
}

/// [`sign_message`] of `on_top` (whole header fields, CRLF-terminated)
/// followed by `message`, without joining them: reception adds its
/// Received field on top and copies the content once, when the signature
/// goes on top of both.
pub fn sign_message_below(
    keys: &[Arc<RingKey>],
    domain: &str,
    on_top: &[u8],
    message: &[u8],
    now: SystemTime,
    expiration: Option<std::time::Duration>,
) -> Result<(Vec<u8>, Vec<SignatureInfo>), String> {
    let (mut fields, body) = split(on_top);
    debug_assert!(body.is_empty(), "only header fields go on top");
    let (below, body) = split(message);
    fields.extend(below);
    let index = signed_index(&fields);
    let h = list_from_index(&index);
    let headers = canonical_from_index(&fields, &index, &h);
    let bh = B64.encode(relaxed_body_hash(body));
    let t = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out = Vec::with_capacity(keys.len() * 700);
    let mut info = Vec::with_capacity(keys.len());
    for key in keys {
        // The field without the b= value, folded as it will be sent.
        let mut field = String::with_capacity(600);
        field.push_str("DKIM-Signature:");
        let mut line = field.len();
        let t_text = t.to_string();
        let x_text = expiration.map(|x| (t + x.as_secs()).to_string());
        let tags: [(&str, &str); 7] = [
            ("v=", "1"),
            ("a=", key.spec.algorithm.name()),
            ("c=", "relaxed/relaxed"),
            ("d=", domain),
            ("s=", &key.spec.selector),
            ("t=", &t_text),
            ("x=", x_text.as_deref().unwrap_or("")),
        ];
        for (tag, value) in tags {
            if tag == "x=" && x_text.is_none() {
                continue;
            }
            push_tag(&mut field, &mut line, tag, value);
        }
        // h= may be longer than a line: FWS is allowed around its colons.
        for (i, name) in h.iter().enumerate() {
            let sep = if i + 1 == h.len() { ";" } else { ":" };
            let first = i == 0;
            let len = name.len() + 1 + if first { 2 } else { 0 };
            if line + len + usize::from(first) > 78 {
                field.push_str("\r\n\t");
                line = 8;
            } else if first {
                field.push(' ');
                line += 1;
            }
            if first {
                field.push_str("h=");
            }
            field.push_str(name);
            field.push_str(sep);
            line += len;
        }
        push_tag(&mut field, &mut line, "bh=", &bh);
        if line + 3 > 78 {
            field.push_str("\r\n\tb=");
            line = 10;
        } else {
            field.push_str(" b=");
            line += 3;
        }

        // The data: canonical headers, then this field (b= empty), in
        // relaxed form, without its CRLF (RFC 6376 §3.7).
        let mut data = Vec::with_capacity(headers.len() + field.len());
        data.extend_from_slice(&headers);
        let (name, value) = field.split_once(':').expect("the field has a colon");
        relaxed_header(name.as_bytes(), value.as_bytes(), &mut data);
        data.truncate(data.len() - 2);
        let signature = key
            .key
            .sign(&data)
            .map_err(|e| format!("signing with {domain}/{}: {e}", key.spec.selector))?;

        // The b= value, folded; FWS inside it is ignored by verifiers.
        let b = B64.encode(signature);
        let mut rest = b.as_str();
        let room = 78usize.saturating_sub(line).max(8);
        let (head, tail) = rest.split_at(room.min(rest.len()));
        field.push_str(head);
        rest = tail;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(70.min(rest.len()));
            field.push_str("\r\n\t");
            field.push_str(chunk);
            rest = tail;
        }
        field.push_str("\r\n");
        out.extend_from_slice(field.as_bytes());
        info.push(SignatureInfo {
            domain: domain.to_string(),
            selector: key.spec.selector.clone(),
            algorithm: key.spec.algorithm.name().to_string(),
        });
    }
    Ok((out, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_fields_with_their_folding_and_the_body() {
        let m = b"From: a@b\r\nSubject: one\r\n two\r\n\tthree\r\nTo: c@d\r\n\r\nbody\r\n";
        let (f, body) = split(m);
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].name, b"Subject");
        assert_eq!(f[1].value, b" one\r\n two\r\n\tthree");
        assert_eq!(body, b"body\r\n");
        let (f, body) = split(b"\r\nonly body\r\n");
        assert!(f.is_empty());
        assert_eq!(body, b"only body\r\n");
        let (f, body) = split(b"X: only headers\r\n");
        assert_eq!(f.len(), 1);
        assert!(body.is_empty());
    }

    #[test]
    fn the_header_list_oversigns_and_skips_absent_optional_headers() {
        let (f, _) = split(
            b"From: a@b\r\nSubject: s\r\nCc: x@y\r\nCc: z@y\r\nContent-Type: text/plain\r\n\r\n",
        );
        assert_eq!(
            header_list(&f),
            [
                "from",
                "from",
                "to",
                "cc",
                "cc",
                "subject",
                "subject",
                "date",
                "message-id",
                "content-type",
                "list-unsubscribe"
            ]
        );
    }

    #[test]
    fn instances_are_chosen_bottom_up() {
        // RFC 6376 §5.4.2: repeated names take the instances from the bottom.
        let (f, _) = split(b"Received: first\r\n\r\n");
        let (f2, _) = split(b"Received: first\r\nTo: top\r\nTo: bottom\r\n\r\n");
        let h = ["to", "to", "to"];
        assert_eq!(canonical_headers(&f2, &h), b"to:bottom\r\nto:top\r\n");
        let _ = f;
    }
}
