//! `mta log redact --recipient ADDR`: an erasure request for the
//! transaction log. Every occurrence of the address in past records is
//! replaced by a keyed hash, `redacted:<24 hex digits>`, the same for every
//! occurrence, so records and counts survive but the address does not.
//!
//! The hash is HMAC-SHA256 of the address in ASCII lower case, keyed with a
//! key derived from the queue's current encryption key (see
//! `queue::QueueKeys::derive`): without that key no one can test guesses
//! against the hashes. After a key rotation the same address hashes
//! differently.
//!
//! Files are rewritten whole (a temporary file, synced, renamed over the
//! old one) by the log writer's own thread, so no record is appended to a
//! file being replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The label the redaction key is derived under.
pub const KEY_LABEL: &str = "mta transaction log redaction v1";

/// What a redaction changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedactReport {
    /// What the address became.
    pub token: String,
    /// The queue key the hash key was derived from.
    pub key_id: String,
    /// Files rewritten.
    pub files: Vec<PathBuf>,
    /// Records that held the address.
    pub records: u64,
    /// Occurrences replaced.
    pub occurrences: u64,
}

/// The keyed hash `address` is replaced with.
pub fn token(key: &[u8; 32], address: &str) -> String {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&k, address.to_ascii_lowercase().as_bytes());
    let hex: String = tag.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("redacted:{hex}")
}

/// Whether a match at `i..end` of `b` is the whole address, not part of a
/// longer one: no letter, digit, `.`, `_` or `-` just before it, and no
/// letter, digit or `-` just after it, nor a `.` that goes on into a longer
/// domain. Anything else around it (`=`, `<`, `+`, quotes) still matches:
/// for an erasure, hiding a little too much beats leaving the address.
fn whole(b: &[u8], i: usize, end: usize) -> bool {
    let before_ok = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b"._-".contains(&b[i - 1]));
    let after_ok = match b.get(end) {
        None => true,
        Some(c) if c.is_ascii_alphanumeric() || *c == b'-' => false,
        Some(b'.') => !b.get(end + 1).is_some_and(|c| c.is_ascii_alphanumeric()),
        Some(_) => true,
    };
    before_ok && after_ok
}

/// `s` with every whole occurrence of `address` (ASCII case-insensitive)
/// replaced by `token`; the number replaced.
pub fn replace_in(s: &str, address: &str, token: &str) -> (String, u64) {
    let hay = s.to_ascii_lowercase();
    let needle = address.to_ascii_lowercase();
    if needle.is_empty() {
        return (s.to_string(), 0);
    }
    let (mut out, mut last, mut n) = (String::with_capacity(s.len()), 0, 0);
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(i) = hay[from..].find(&needle).map(|i| i + from) {
        let end = i + needle.len();
        if whole(bytes, i, end) {
            out.push_str(&s[last..i]);
            out.push_str(token);
            last = end;
            n += 1;
        }
        from = end;
    }
    out.push_str(&s[last..]);
    (out, n)
}

fn redact_value(v: &mut serde_json::Value, address: &str, token: &str) -> u64 {
    match v {
        serde_json::Value::String(s) => {
            let (new, n) = replace_in(s, address, token);
            if n > 0 {
                *s = new;
            }
            n
        }
        serde_json::Value::Array(a) => a.iter_mut().map(|x| redact_value(x, address, token)).sum(),
        serde_json::Value::Object(o) => o
            .values_mut()
            .map(|x| redact_value(x, address, token))
            .sum(),
        _ => 0,
    }
}

/// Replaces `address` with `token` in every `.jsonl` file of `dir`.
pub fn redact_dir(dir: &Path, address: &str, token: &str) -> std::io::Result<RedactReport> {
    let mut report = RedactReport {
        token: token.to_string(),
        ..Default::default()
    };
    let needle = address.to_ascii_lowercase();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        if !text.to_ascii_lowercase().contains(&needle) {
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut changed = false;
        for line in text.split_inclusive('\n') {
            let body = line.trim_end_matches('\n');
            if body.to_ascii_lowercase().contains(&needle)
                && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(body)
            {
                let n = redact_value(&mut v, address, token);
                if n > 0 {
                    report.records += 1;
                    report.occurrences += n;
                    changed = true;
                    out.push_str(&serde_json::to_string(&v).expect("a JSON value serializes"));
                    out.push('\n');
                    continue;
                }
            }
            out.push_str(line);
        }
        if changed {
            replace_file(&path, out.as_bytes())?;
            report.files.push(path);
        }
    }
    Ok(report)
}

fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.redacting");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_addresses_are_replaced_in_any_case() {
        let t = "redacted:x";
        assert_eq!(
            replace_in("<Erase.Me@Dest.example> said", "erase.me@dest.example", t),
            ("<redacted:x> said".to_string(), 1)
        );
        assert_eq!(
            replace_in("xerase.me@dest.example.org", "erase.me@dest.example", t).1,
            0
        );
        assert_eq!(
            replace_in("a@b.example, A@B.example", "a@b.example", t).1,
            2
        );
    }

    #[test]
    fn the_token_is_keyed_and_stable() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        assert_eq!(token(&k1, "A@b.example"), token(&k1, "a@B.EXAMPLE"));
        assert_ne!(token(&k1, "a@b.example"), token(&k2, "a@b.example"));
        assert_eq!(token(&k1, "a@b.example").len(), "redacted:".len() + 24);
    }

    #[test]
    fn files_are_rewritten_and_lines_without_the_address_kept_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("transactions-2026-11-30.jsonl");
        let b = dir.path().join("transactions-2026-12-01.jsonl");
        let keep = "{\"type\":\"Reception\",\"recipients\":[\"keep@d.example\"]}\n";
        std::fs::write(
            &a,
            format!("{keep}{{\"type\":\"Reception\",\"recipients\":[\"gone@d.example\",\"keep@d.example\"]}}\n"),
        )
        .unwrap();
        std::fs::write(&b, keep).unwrap();
        let r = redact_dir(dir.path(), "GONE@d.example", "redacted:t").unwrap();
        assert_eq!((r.files, r.records, r.occurrences), (vec![a.clone()], 1, 1));
        let text = std::fs::read_to_string(&a).unwrap();
        assert!(text.starts_with(keep), "{text}");
        assert!(
            text.contains("\"redacted:t\"") && !text.contains("gone@"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&b).unwrap(), keep);
    }
}
