//! Parsing an SPF record (RFC 7208 §4.5, §4.6, §5, §6, §7.1).
//!
//! The whole record is parsed before anything is evaluated, so a syntax
//! error anywhere is a permerror even when an earlier mechanism would
//! match (§4.6). Each directive keeps its text as published, which is what
//! an evaluation reports as the directive that matched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::macros::{MacroError, MacroString};

/// A parsed `v=spf1` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The mechanisms, in order.
    pub directives: Vec<Directive>,
    /// `redirect=`, used only when no mechanism matched (§6.1).
    pub redirect: Option<DomainSpec>,
    /// `exp=`, the explanation for a fail (§6.2).
    pub explanation: Option<DomainSpec>,
    /// Modifiers we do not know, which are ignored (§6): `(name, value)`.
    pub unknown_modifiers: Vec<(String, String)>,
}

/// A qualifier and a mechanism, with the text it was written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub qualifier: Qualifier,
    pub mechanism: Mechanism,
    /// The term as published, e.g. `-ip4:192.0.2.0/24`.
    pub text: String,
}

/// What a matching mechanism makes the result (§4.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

/// The mechanisms of §5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include(DomainSpec),
    A {
        domain: Option<DomainSpec>,
        cidr4: u8,
        cidr6: u8,
    },
    Mx {
        domain: Option<DomainSpec>,
        cidr4: u8,
        cidr6: u8,
    },
    Ptr(Option<DomainSpec>),
    Ip4 {
        network: Ipv4Addr,
        prefix: u8,
    },
    Ip6 {
        network: Ipv6Addr,
        prefix: u8,
    },
    Exists(DomainSpec),
}

impl Mechanism {
    /// Whether the mechanism counts against the limit of 10 DNS-querying
    /// terms (§4.6.4).
    pub fn queries_dns(&self) -> bool {
        !matches!(
            self,
            Mechanism::All | Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. }
        )
    }

    /// Whether `ip4:`/`ip6:` covers the address (`false` for the others).
    pub fn covers(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Mechanism::Ip4 { network, prefix }, IpAddr::V4(ip)) => {
                in_prefix_v4(ip, *network, *prefix)
            }
            (Mechanism::Ip6 { network, prefix }, IpAddr::V6(ip)) => {
                in_prefix_v6(ip, *network, *prefix)
            }
            _ => false,
        }
    }
}

/// Whether `ip` is in `network/prefix`.
pub fn in_prefix_v4(ip: Ipv4Addr, network: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(network) & mask
}

/// Whether `ip` is in `network/prefix`.
pub fn in_prefix_v6(ip: Ipv6Addr, network: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(network) & mask
}

/// A `domain-spec` (§7.1): a macro string whose end is a macro or a
/// top label; expanded at evaluation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub text: String,
    pub macros: MacroString,
}

/// Why a record does not parse; any of these is a permerror.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record is not v=spf1")]
    NotSpf,
    #[error("{0:?} contains a character that is not printable ASCII (RFC 7208 §3.1, §4.6.1)")]
    BadCharacter(String),
    #[error("unknown mechanism `{0}` (RFC 7208 §4.6.1)")]
    UnknownMechanism(String),
    #[error("`{term}`: {reason}")]
    Malformed { term: String, reason: &'static str },
    #[error("`{term}`: {error}")]
    Macro { term: String, error: MacroError },
    #[error("`{0}=` appears more than once (RFC 7208 §6)")]
    DuplicateModifier(&'static str),
}

/// Whether TXT record data is an SPF record: `v=spf1` (any case) followed
/// by a space or the end (§4.5).
pub fn is_spf_record(txt: &[u8]) -> bool {
    txt.len() >= 6 && txt[..6].eq_ignore_ascii_case(b"v=spf1") && (txt.len() == 6 || txt[6] == b' ')
}

impl Record {
    /// Parses TXT record data (the strings already joined).
    pub fn parse(txt: &[u8]) -> Result<Record, RecordError> {
        if !is_spf_record(txt) {
            return Err(RecordError::NotSpf);
        }
        let mut record = Record {
            directives: Vec::new(),
            redirect: None,
            explanation: None,
            unknown_modifiers: Vec::new(),
        };
        // Terms are separated by spaces only (§4.6.1): any other byte
        // outside visible ASCII, control characters and 8-bit alike, makes
        // the term it sits in malformed.
        for term in txt[6..].split(|&b| b == b' ').filter(|t| !t.is_empty()) {
            if !term.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(RecordError::BadCharacter(
                    String::from_utf8_lossy(term).into_owned(),
                ));
            }
            let term = std::str::from_utf8(term).expect("ASCII");
            record.add_term(term)?;
        }
        Ok(record)
    }

    fn add_term(&mut self, term: &str) -> Result<(), RecordError> {
        if let Some((name, value)) = term.split_once('=')
            && is_modifier_name(name)
        {
            if name.eq_ignore_ascii_case("redirect") {
                if self.redirect.is_some() {
                    return Err(RecordError::DuplicateModifier("redirect"));
                }
                self.redirect = Some(domain_spec(term, value)?);
            } else if name.eq_ignore_ascii_case("exp") {
                if self.explanation.is_some() {
                    return Err(RecordError::DuplicateModifier("exp"));
                }
                self.explanation = Some(domain_spec(term, value)?);
            } else {
                // unknown-modifier = name "=" macro-string (§A).
                MacroString::parse(value).map_err(|error| RecordError::Macro {
                    term: term.to_string(),
                    error,
                })?;
                self.unknown_modifiers
                    .push((name.to_string(), value.to_string()));
            }
            return Ok(());
        }
        self.directives.push(directive(term)?);
        Ok(())
    }
}

/// `name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )` (§6).
fn is_modifier_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn malformed(term: &str, reason: &'static str) -> RecordError {
    RecordError::Malformed {
        term: term.to_string(),
        reason,
    }
}

fn directive(term: &str) -> Result<Directive, RecordError> {
    let (qualifier, rest) = match term.as_bytes()[0] {
        b'+' => (Qualifier::Pass, &term[1..]),
        b'-' => (Qualifier::Fail, &term[1..]),
        b'~' => (Qualifier::SoftFail, &term[1..]),
        b'?' => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let name_end = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, args) = rest.split_at(name_end);
    let name = name.to_ascii_lowercase();
    let mechanism = match name.as_str() {
        "all" => {
            if !args.is_empty() {
                return Err(malformed(term, "`all` takes no argument (RFC 7208 §5.1)"));
            }
            Mechanism::All
        }
        "include" | "exists" => {
            let Some(spec) = args.strip_prefix(':') else {
                return Err(malformed(
                    term,
                    "needs `:` and a domain (RFC 7208 §5.2, §5.7)",
                ));
            };
            let spec = domain_spec(term, spec)?;
            if name == "include" {
                Mechanism::Include(spec)
            } else {
                Mechanism::Exists(spec)
            }
        }
        "a" | "mx" => {
            let (domain, cidr4, cidr6) = if let Some(spec) = args.strip_prefix(':') {
                let (spec, cidr4, cidr6) = split_dual_cidr(spec);
                (
                    Some(domain_spec(term, spec)?),
                    cidr_length(term, cidr4, 32)?,
                    cidr_length(term, cidr6, 128)?,
                )
            } else {
                let (cidr4, cidr6) = dual_cidr(term, args)?;
                (None, cidr4, cidr6)
            };
            if name == "a" {
                Mechanism::A {
                    domain,
                    cidr4,
                    cidr6,
                }
            } else {
                Mechanism::Mx {
                    domain,
                    cidr4,
                    cidr6,
                }
            }
        }
        "ptr" => {
            if args.is_empty() {
                Mechanism::Ptr(None)
            } else if let Some(spec) = args.strip_prefix(':') {
                Mechanism::Ptr(Some(domain_spec(term, spec)?))
            } else {
                return Err(malformed(
                    term,
                    "`ptr` takes no CIDR length (RFC 7208 §5.5)",
                ));
            }
        }
        "ip4" | "ip6" => {
            let Some(arg) = args.strip_prefix(':') else {
                return Err(malformed(term, "needs `:` and a network (RFC 7208 §5.6)"));
            };
            let (addr, cidr) = match arg.split_once('/') {
                Some((addr, cidr)) => (addr, Some(cidr)),
                None => (arg, None),
            };
            if name == "ip4" {
                let network: Ipv4Addr = addr.parse().map_err(|_| {
                    malformed(
                        term,
                        "not an IPv4 address in dotted-quad form (RFC 7208 §5.6)",
                    )
                })?;
                Mechanism::Ip4 {
                    network,
                    prefix: cidr_length(term, cidr, 32)?,
                }
            } else {
                let network: Ipv6Addr = addr
                    .parse()
                    .map_err(|_| malformed(term, "not an IPv6 address (RFC 7208 §5.6)"))?;
                Mechanism::Ip6 {
                    network,
                    prefix: cidr_length(term, cidr, 128)?,
                }
            }
        }
        _ => return Err(RecordError::UnknownMechanism(term.to_string())),
    };
    Ok(Directive {
        qualifier,
        mechanism,
        text: term.to_string(),
    })
}

/// Splits a trailing `dual-cidr-length` off `domain-spec dual-cidr-length`:
/// `(domain, ip4 digits, ip6 digits)`.
fn split_dual_cidr(s: &str) -> (&str, Option<&str>, Option<&str>) {
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mut rest = s;
    let mut cidr6 = None;
    if let Some(pos) = rest.rfind("//")
        && all_digits(&rest[pos + 2..])
    {
        cidr6 = Some(&rest[pos + 2..]);
        rest = &rest[..pos];
    }
    let mut cidr4 = None;
    if let Some(pos) = rest.rfind('/')
        && all_digits(&rest[pos + 1..])
    {
        cidr4 = Some(&rest[pos + 1..]);
        rest = &rest[..pos];
    }
    (rest, cidr4, cidr6)
}

/// A `dual-cidr-length` and nothing else (after a bare `a` or `mx`).
fn dual_cidr(term: &str, s: &str) -> Result<(u8, u8), RecordError> {
    if s.is_empty() {
        return Ok((32, 128));
    }
    let (rest, cidr4, cidr6) = split_dual_cidr(s);
    if !rest.is_empty() {
        return Err(malformed(
            term,
            "expected a CIDR length such as /24 or //64 (RFC 7208 §5.3, §5.4)",
        ));
    }
    Ok((
        cidr_length(term, cidr4, 32)?,
        cidr_length(term, cidr6, 128)?,
    ))
}

/// A CIDR length: decimal without leading zeros, at most `max` (§5.6).
fn cidr_length(term: &str, digits: Option<&str>, max: u8) -> Result<u8, RecordError> {
    let Some(digits) = digits else {
        return Ok(max);
    };
    let valid = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    match digits.parse::<u8>() {
        Ok(n) if valid && n <= max => Ok(n),
        _ => Err(malformed(
            term,
            "invalid CIDR length (RFC 7208 §5.6: /0 to /32 for IPv4, /0 to /128 for IPv6)",
        )),
    }
}

/// `domain-spec = macro-string domain-end` (§7.1), where
/// `domain-end = ( "." toplabel [ "." ] ) / macro-expand`.
fn domain_spec(term: &str, text: &str) -> Result<DomainSpec, RecordError> {
    if text.is_empty() {
        return Err(malformed(term, "the domain is empty (RFC 7208 §7.1)"));
    }
    let macros = MacroString::parse(text).map_err(|error| RecordError::Macro {
        term: term.to_string(),
        error,
    })?;
    if !macros.ends_with_expand() {
        let tail = macros.literal_tail();
        let tail = tail.strip_suffix('.').unwrap_or(tail);
        let valid = match tail.rsplit_once('.') {
            Some((_, top)) => is_toplabel(top),
            None => false,
        };
        if !valid {
            return Err(malformed(
                term,
                "the domain must end in a macro or a top-level label that is not all digits (RFC 7208 §7.1)",
            ));
        }
    }
    Ok(DomainSpec {
        text: text.to_string(),
        macros,
    })
}

/// `toplabel = ( *alphanum ALPHA *alphanum ) /
///             ( 1*alphanum "-" *( alphanum / "-" ) alphanum )`
fn is_toplabel(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().any(|c| c.is_ascii_alphabetic() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Record, RecordError> {
        Record::parse(s.as_bytes())
    }

    fn mechanisms(s: &str) -> Vec<Mechanism> {
        parse(s)
            .unwrap()
            .directives
            .into_iter()
            .map(|d| d.mechanism)
            .collect()
    }

    #[test]
    fn version_selection() {
        assert!(is_spf_record(b"v=spf1"));
        assert!(is_spf_record(b"V=SpF1 -all"));
        assert!(!is_spf_record(b"v=spf10"));
        assert!(!is_spf_record(b"v=spf1mx"));
        assert!(!is_spf_record(b"v=spf1\t-all"));
        assert!(!is_spf_record(b"spf2.0/pra"));
        assert_eq!(parse("v=spf2"), Err(RecordError::NotSpf));
    }

    #[test]
    fn mechanisms_and_qualifiers() {
        let r = parse("v=spf1  +a mx/24 -ip4:192.0.2.0/24 ~ip6:2001:db8::/32 ?all ").unwrap();
        let q: Vec<_> = r.directives.iter().map(|d| d.qualifier).collect();
        assert_eq!(
            q,
            [
                Qualifier::Pass,
                Qualifier::Pass,
                Qualifier::Fail,
                Qualifier::SoftFail,
                Qualifier::Neutral
            ]
        );
        assert_eq!(r.directives[2].text, "-ip4:192.0.2.0/24");
        assert_eq!(
            r.directives[1].mechanism,
            Mechanism::Mx {
                domain: None,
                cidr4: 24,
                cidr6: 128
            }
        );
        assert!(
            r.directives[2]
                .mechanism
                .covers("192.0.2.77".parse().unwrap())
        );
        assert!(
            !r.directives[2]
                .mechanism
                .covers("192.0.3.1".parse().unwrap())
        );
        assert!(
            !r.directives[2]
                .mechanism
                .covers("2001:db8::1".parse().unwrap())
        );
        assert!(
            r.directives[3]
                .mechanism
                .covers("2001:db8:ff::1".parse().unwrap())
        );
    }

    #[test]
    fn dual_cidr_forms() {
        let m = mechanisms("v=spf1 a/24//64 a:foo.example.com//0 mx:foo:bar/baz.example.com a//33");
        assert!(matches!(
            m[0],
            Mechanism::A {
                domain: None,
                cidr4: 24,
                cidr6: 64
            }
        ));
        assert!(matches!(
            &m[1],
            Mechanism::A { domain: Some(d), cidr4: 32, cidr6: 0 } if d.text == "foo.example.com"
        ));
        assert!(matches!(
            &m[2],
            Mechanism::Mx { domain: Some(d), cidr4: 32, cidr6: 128 } if d.text == "foo:bar/baz.example.com"
        ));
        assert!(matches!(m[3], Mechanism::A { cidr6: 33, .. }));
        for bad in [
            "v=spf1 a/33",
            "v=spf1 a//129",
            "v=spf1 a/24/64",
            "v=spf1 ip4:1.2.3.4/032",
            "v=spf1 ip4:1.2.3.4//32",
            "v=spf1 ip6:::1/129",
            "v=spf1 ptr/0",
            "v=spf1 include:example.com/24",
            "v=spf1 exists:example.com/24",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_spec_grammar() {
        for good in [
            "v=spf1 a:foo.example.xn--zckzah",
            "v=spf1 a:foo:bar/baz.example.com",
            "v=spf1 include:_spf.example.com.",
            "v=spf1 exists:%{i}.%{l2r-}.user.%{d2}",
            "v=spf1 a:macro%%percent%_%_space%-url-space.example.com",
            "v=spf1 redirect=%{d}.d.spf.example.com.",
            "v=spf1 a:mail.example...com",
        ] {
            assert!(parse(good).is_ok(), "{good}: {:?}", parse(good));
        }
        for bad in [
            "v=spf1 a:foo-bar",
            "v=spf1 a:111.222.33.44",
            "v=spf1 a:abc.123",
            "v=spf1 a:museum",
            "v=spf1 a:museum.",
            "v=spf1 a:example.-com",
            "v=spf1 a:example.com:8080",
            "v=spf1 a:",
            "v=spf1 include:",
            "v=spf1 exists",
            "v=spf1 exp=",
            "v=spf1 exp=-all",
            "v=spf1 redirect=-all",
            "v=spf1 a:%{x}.example.com",
            "v=spf1 exists:%(ir).sbl.example.com",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modifiers() {
        let r =
            parse("v=spf1 moo.cow-far_out=man:dog/cat exp=explain.%{d} redirect=_spf.example.com")
                .unwrap();
        assert!(r.directives.is_empty());
        assert_eq!(r.redirect.unwrap().text, "_spf.example.com");
        assert_eq!(r.explanation.unwrap().text, "explain.%{d}");
        assert_eq!(r.unknown_modifiers.len(), 1);
        assert_eq!(
            parse("v=spf1 exp=a.example.com exp=b.example.com"),
            Err(RecordError::DuplicateModifier("exp"))
        );
        for bad in [
            "v=spf1 moo.cow/far_out=man:dog/cat",
            "v=spf1 1up=foo",
            "v=spf1 =all",
            "v=spf1 redirect:example.com",
            "v=spf1 foo=%abc",
            "v=spf1 -all moo",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("v=spf1 default=+").is_ok());
    }

    #[test]
    fn characters() {
        for bad in [
            &b"v=spf1 a:ctrl.example.com\rptr -all"[..],
            b"v=spf1 ip4:192.0.2.5\n include:example.com",
            b"v=spf1 a:example.net \x96all",
            b"v=spf1 a:foo.example.com\0",
        ] {
            assert!(
                matches!(Record::parse(bad), Err(RecordError::BadCharacter(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn all_and_ip_syntax() {
        for bad in [
            "v=spf1 -all.",
            "v=spf1 -all:foobar",
            "v=spf1 -all/8",
            "v=spf1 ip4",
            "v=spf1 ip4:1.2.3",
            "v=spf1 ip4:1.2.3.4:8080",
            "v=spf1 ip6",
            "v=spf1 ip6::CAFE::BABE",
            "v=spf1 ip4:01.2.3.4",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            mechanisms("v=spf1 ip6:::FFFF:1.2.3.4")[0],
            Mechanism::Ip6 { prefix: 128, .. }
        ));
    }

    #[test]
    fn prefixes() {
        let ip: Ipv4Addr = "1.2.3.4".parse().unwrap();
        assert!(in_prefix_v4(ip, "9.9.9.9".parse().unwrap(), 0));
        assert!(in_prefix_v4(ip, "1.2.3.4".parse().unwrap(), 32));
        assert!(!in_prefix_v4(ip, "1.2.3.5".parse().unwrap(), 32));
        assert!(in_prefix_v4(ip, "1.2.3.200".parse().unwrap(), 24));
        let ip6: Ipv6Addr = "cafe:babe:8000::".parse().unwrap();
        assert!(in_prefix_v6(ip6, "cafe:babe:8000::".parse().unwrap(), 33));
        assert!(!in_prefix_v6(ip6, "cafe:babe::".parse().unwrap(), 33));
        assert!(in_prefix_v6(ip6, "::".parse().unwrap(), 0));
    }
}
