//! The DNS TXT record of a key (RFC 6376 §3.6.1, RFC 8463): rendering it,
//! splitting it for zone files, parsing a published one, and comparing the
//! two.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::algorithm::Algorithm;
use crate::key::PrivateKey;

/// The TXT value publishing a key: `v=DKIM1; k=rsa; p=...`.
pub fn record_value(key: &PrivateKey) -> String {
    format!(
        "v=DKIM1; k={}; p={}",
        key.algorithm.key_type(),
        B64.encode(&key.public_key)
    )
}

/// The owner name of a selector's record.
pub fn record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// Splits a TXT value into character-strings of at most 255 octets
/// (RFC 1035 §3.3), as zone files and DNS providers need them.
pub fn split_strings(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = value;
    while rest.len() > 255 {
        // The value is ASCII (tags and base64), so any byte index is a boundary.
        let (head, tail) = rest.split_at(255);
        out.push(head);
        rest = tail;
    }
    out.push(rest);
    out
}

/// The record in zone-file syntax, long values split into quoted strings.
pub fn zone_entry(selector: &str, domain: &str, key: &PrivateKey) -> String {
    let value = record_value(key);
    let strings: Vec<String> = split_strings(&value)
        .into_iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    let name = format!("{}.", record_name(selector, domain));
    if strings.len() == 1 {
        format!("{name} IN TXT {}", strings[0])
    } else {
        format!("{name} IN TXT ( {} )", strings.join("\n\t"))
    }
}

/// A published key record, as far as we need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    /// `k=`, `rsa` when absent.
    pub key_type: String,
    /// `p=`, decoded; empty means the key was revoked.
    pub public_key: Vec<u8>,
    /// `t=` flags (`y` testing, `s` strict).
    pub flags: Vec<String>,
}

/// Parses a DKIM key record (the TXT strings already joined).
pub fn parse_record(txt: &str) -> Result<PublishedKey, String> {
    let mut tags: Vec<(String, String)> = Vec::new();
    for (i, part) in txt.split(';').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue; // a trailing ';' is allowed (RFC 6376 §3.2)
        }
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not a tag=value pair"))?;
        let name = name.trim().to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("'{name}' is not a tag name"));
        }
        if tags.iter().any(|(n, _)| *n == name) {
            return Err(format!("tag {name}= appears twice"));
        }
        if name == "v" && i != 0 {
            return Err("v= must be the first tag".into());
        }
        // Folding white space inside values is ignored (RFC 6376 §3.2).
        let value: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        tags.push((name, value));
    }
    let get = |n: &str| tags.iter().find(|(t, _)| t == n).map(|(_, v)| v.as_str());
    if let Some(v) = get("v")
        && v != "DKIM1"
    {
        return Err(format!("v={v}: only DKIM1 is defined"));
    }
    let p = get("p").ok_or("p= (the public key) is missing")?;
    let public_key = B64
        .decode(p)
        .map_err(|e| format!("p= is not base64: {e}"))?;
    let key_type = get("k").unwrap_or("rsa").to_string();
    if key_type != "rsa" && key_type != "ed25519" {
        return Err(format!("k={key_type}: unknown key type"));
    }
    let flags = get("t")
        .map(|t| t.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(PublishedKey {
        key_type,
        public_key,
        flags,
    })
}

/// How a selector's DNS compares with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publication {
    /// Published, and the key is ours.
    Matching,
    /// Published, but with another key.
    DifferentKey,
    /// No TXT record at the name.
    Missing,
    /// A record is there but cannot be read as a DKIM key record.
    SyntaxError(String),
    /// `p=` is empty: the key was revoked (RFC 6376 §3.6.1).
    Revoked,
    /// The lookup itself failed (SERVFAIL, timeout).
    LookupFailed(String),
}

impl Publication {
    /// Publishable as-is: signatures with this key will verify.
    pub fn is_ok(&self) -> bool {
        matches!(self, Publication::Matching)
    }

    pub fn describe(&self) -> String {
        match self {
            Publication::Matching => "published and matching".into(),
            Publication::DifferentKey => "published, but with a different key".into(),
            Publication::Missing => "missing: publish the record shown by `mta dkim dns`".into(),
            Publication::SyntaxError(e) => format!("syntax error: {e}"),
            Publication::Revoked => "revoked (empty p=)".into(),
            Publication::LookupFailed(e) => format!("lookup failed: {e}"),
        }
    }
}

/// Compares the TXT records found at a selector's name with a key.
pub fn compare(records: &[String], key: &PrivateKey) -> Publication {
    if records.is_empty() {
        return Publication::Missing;
    }
    let mut first_problem = None;
    for txt in records {
        match parse_record(txt) {
            Ok(p) if p.public_key.is_empty() => {
                first_problem.get_or_insert(Publication::Revoked);
            }
            Ok(p) => {
                let same_type = p.key_type == key.algorithm.key_type();
                let same_key = p.public_key == key.public_key
                    || key.public_key_pkcs1.as_deref() == Some(p.public_key.as_slice());
                if same_type && same_key {
                    return Publication::Matching;
                }
                first_problem.get_or_insert(Publication::DifferentKey);
            }
            Err(e) => {
                first_problem.get_or_insert(Publication::SyntaxError(e));
            }
        }
    }
    first_problem.unwrap_or(Publication::Missing)
}

/// The algorithm a published record is for.
pub fn algorithm_of(p: &PublishedKey) -> Option<Algorithm> {
    match p.key_type.as_str() {
        "rsa" => Some(Algorithm::RsaSha256),
        "ed25519" => Some(Algorithm::Ed25519Sha256),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_render_split_and_parse_back() {
        let key = PrivateKey::generate(Algorithm::RsaSha256, 2048).unwrap();
        let value = record_value(&key);
        assert!(value.starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"), "{value}");
        let parts = split_strings(&value);
        assert!(parts.len() >= 2 && parts.iter().all(|p| p.len() <= 255));
        assert_eq!(parts.concat(), value);
        let zone = zone_entry("s1", "acme.example", &key);
        assert!(
            zone.starts_with("s1._domainkey.acme.example. IN TXT ( \""),
            "{zone}"
        );
        assert_eq!(
            compare(std::slice::from_ref(&value), &key),
            Publication::Matching
        );

        let ed = PrivateKey::generate(Algorithm::Ed25519Sha256, 256).unwrap();
        let v = record_value(&ed);
        assert!(v.starts_with("v=DKIM1; k=ed25519; p="));
        assert_eq!(split_strings(&v).len(), 1);
        assert_eq!(compare(&[v], &ed), Publication::Matching);
    }

    #[test]
    fn comparison_outcomes() {
        let key = PrivateKey::generate(Algorithm::Ed25519Sha256, 256).unwrap();
        let other = PrivateKey::generate(Algorithm::Ed25519Sha256, 256).unwrap();
        assert_eq!(compare(&[], &key), Publication::Missing);
        assert_eq!(
            compare(&[record_value(&other)], &key),
            Publication::DifferentKey
        );
        assert_eq!(
            compare(&["v=DKIM1; k=ed25519; p=".into()], &key),
            Publication::Revoked
        );
        assert!(matches!(
            compare(&["v=DKIM1; k=ed25519; p=!!!".into()], &key),
            Publication::SyntaxError(_)
        ));
        // An unrelated TXT record beside ours does not hide it.
        let mine = record_value(&key);
        assert_eq!(
            compare(&["google-site-verification=x".into(), mine], &key),
            Publication::Matching
        );
        // The key published as the right bytes but the wrong type.
        use base64::Engine as _;
        let wrong_type = format!("v=DKIM1; k=rsa; p={}", B64.encode(&key.public_key));
        assert_eq!(compare(&[wrong_type], &key), Publication::DifferentKey);
    }

    #[test]
    fn rsa_keys_published_as_pkcs1_also_match() {
        let key = PrivateKey::generate(Algorithm::RsaSha256, 2048).unwrap();
        let pkcs1 = format!(
            "v=DKIM1; p={}",
            B64.encode(key.public_key_pkcs1.as_ref().unwrap())
        );
        assert_eq!(compare(&[pkcs1], &key), Publication::Matching);
    }

    #[test]
    fn record_syntax() {
        let p = parse_record("v=DKIM1; k=rsa; t=y:s; p=AAAA;").unwrap();
        assert_eq!(p.flags, ["y", "s"]);
        assert_eq!(p.public_key, vec![0, 0, 0]);
        // Folding white space inside p= is allowed.
        assert_eq!(parse_record("p=AA AA").unwrap().public_key, vec![0, 0, 0]);
        assert!(
            parse_record("k=rsa; v=DKIM1; p=AAAA")
                .unwrap_err()
                .contains("first")
        );
        assert!(parse_record("v=DKIM2; p=AAAA").is_err());
        assert!(parse_record("v=DKIM1; k=rsa").unwrap_err().contains("p="));
        assert!(
            parse_record("v=DKIM1; p=AAAA; p=AAAA")
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse_record("v=DKIM1; k=dsa; p=AAAA").is_err());
        assert!(parse_record("just text").is_err());
    }
}
