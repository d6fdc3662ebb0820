//! A DMARC policy record (RFC 7489 §6.3, grammar §6.4): `v=DMARC1` first,
//! then `tag=value` pairs separated by `;`, with optional whitespace
//! around each.
//!
//! What is read, and how strictly:
//! - `v` must be the first tag, its value exactly `DMARC1` (§6.4 spells it
//!   with case-sensitive `%x` octets); a text that does not start so is not
//!   a DMARC record at all ([`is_dmarc_record`]), and discovery discards it
//!   (§6.6.3 steps 2 and 4).
//! - `p` is required, `sp` optional: `none`, `quarantine` or `reject`, in
//!   any case (ABNF literals are case-insensitive, as are tag names). A
//!   missing or invalid `p`, or an invalid `sp`, makes the record unusable
//!   unless it has a `rua` tag with at least one syntactically valid URI,
//!   in which case it is taken as `p=none` (§6.6.3 step 6).
//! - `adkim`, `aspf` (`r` or `s`) and `pct` (0 to 100): a value out of the
//!   grammar is replaced by the default (`r`, `r`, 100), as §6.3 says of
//!   syntax errors in the remainder of the record.
//! - Unknown tags (and `rf`, `ri`, `ruf`, `fo`, which concern reports)
//!   are ignored; of a repeated tag the first one counts.

use super::{DmarcError, Mode, Policy};

/// A parsed DMARC record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `p=`: the policy for the domain itself (and its subdomains without
    /// `sp=`). [`Policy::None`] when the record was taken as `p=none`
    /// (see [`Record::substituted`]).
    pub policy: Policy,
    /// `sp=`: the policy for subdomains, when given.
    pub subdomain_policy: Option<Policy>,
    /// `adkim=`: DKIM identifier alignment (default relaxed).
    pub adkim: Mode,
    /// `aspf=`: SPF identifier alignment (default relaxed).
    pub aspf: Mode,
    /// `pct=`: the percentage of failing messages the policy is to be
    /// applied to (default 100).
    pub pct: u8,
    /// The record as published (its strings joined).
    pub text: String,
    /// Why `p=`/`sp=` could not be used, when the record is nevertheless
    /// taken as `p=none` because it has a valid `rua=` (§6.6.3 step 6).
    pub substituted: Option<DmarcError>,
}

/// Whether a TXT record is a DMARC record: its first tag is `v=DMARC1`
/// (§6.6.3: other records are discarded).
pub fn is_dmarc_record(txt: &str) -> bool {
    let first = txt.split(';').next().unwrap_or("");
    match first.split_once('=') {
        Some((name, value)) => {
            name.trim_matches(is_wsp).eq_ignore_ascii_case("v")
                && value.trim_matches(is_wsp) == "DMARC1"
        }
        None => false,
    }
}

/// Whitespace allowed around tags and values: §6.4's `*WSP`, and the
/// folding (CR, LF) some publishers leave in.
fn is_wsp(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn policy(value: &str) -> Option<Policy> {
    if value.eq_ignore_ascii_case("none") {
        Some(Policy::None)
    } else if value.eq_ignore_ascii_case("quarantine") {
        Some(Policy::Quarantine)
    } else if value.eq_ignore_ascii_case("reject") {
        Some(Policy::Reject)
    } else {
        None
    }
}

fn mode(value: &str) -> Option<Mode> {
    if value.eq_ignore_ascii_case("r") {
        Some(Mode::Relaxed)
    } else if value.eq_ignore_ascii_case("s") {
        Some(Mode::Strict)
    } else {
        None
    }
}

fn pct(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 3 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u8>().ok().filter(|p| *p <= 100)
}

/// `dmarc-uri` (§6.4): a URI, optionally followed by `!` and a size. Only
/// its shape is checked: a scheme (RFC 3986 §3.1), a colon, something.
fn valid_uri(uri: &str) -> bool {
    let uri = uri.trim_matches(is_wsp);
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
}

/// Parses a DMARC record (see the module documentation for the rules).
pub fn parse_record(txt: &str) -> Result<Record, DmarcError> {
    if !is_dmarc_record(txt) {
        return Err(DmarcError::NotDmarc);
    }
    let mut p: Option<&str> = None;
    let mut sp: Option<&str> = None;
    let mut adkim: Option<&str> = None;
    let mut aspf: Option<&str> = None;
    let mut percent: Option<&str> = None;
    let mut rua: Option<&str> = None;
    for tag in txt.split(';').skip(1) {
        let Some((name, value)) = tag.split_once('=') else {
            // An empty tag (a final `;`) or a syntax error: ignored.
            continue;
        };
        let value = value.trim_matches(is_wsp);
        let slot = match name.trim_matches(is_wsp).to_ascii_lowercase().as_str() {
            "p" => &mut p,
            "sp" => &mut sp,
            "adkim" => &mut adkim,
            "aspf" => &mut aspf,
            "pct" => &mut percent,
            "rua" => &mut rua,
            _ => continue,
        };
        slot.get_or_insert(value);
    }
    let mut record = Record {
        policy: Policy::None,
        subdomain_policy: None,
        adkim: adkim.and_then(mode).unwrap_or(Mode::Relaxed),
        aspf: aspf.and_then(mode).unwrap_or(Mode::Relaxed),
        pct: percent.and_then(pct).unwrap_or(100),
        text: txt.to_string(),
        substituted: None,
    };
    let problem = match (p, p.and_then(policy), sp, sp.and_then(policy)) {
        (None, _, _, _) => Some(DmarcError::MissingPolicy),
        (Some(value), None, _, _) => Some(DmarcError::InvalidPolicy {
            value: value.to_string(),
        }),
        (_, _, Some(value), None) => Some(DmarcError::InvalidSubdomainPolicy {
            value: value.to_string(),
        }),
        (_, Some(p), _, sp) => {
            record.policy = p;
            record.subdomain_policy = sp;
            None
        }
    };
    if let Some(problem) = problem {
        if !rua.is_some_and(|r| r.split(',').any(valid_uri)) {
            return Err(problem);
        }
        record.substituted = Some(problem);
    }
    Ok(record)
}
