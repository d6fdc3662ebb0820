//! SPF macros (RFC 7208 §7): parsing macro strings and expanding them.
//!
//! A macro string is parsed once, with the record, so that a syntax error
//! anywhere in a record is a permerror before anything is evaluated
//! (§4.6); expansion then cannot fail. Expansion is pure: the one letter
//! that needs DNS (`p`, the validated domain name of the client) is
//! resolved by the evaluator beforehand and handed in.

use std::net::IpAddr;

/// A macro string that parsed (`macro-string` of §7.1, or an explanation
/// string of §6.2 when parsed with [`MacroString::parse_explanation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacroString {
    tokens: Vec<Token>,
    /// The last thing in the string was a `macro-expand` (which includes
    /// `%%`, `%_` and `%-`): a valid `domain-end` (§7.1).
    ends_with_expand: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Macro(Macro),
}

/// One `%{...}` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Macro {
    letter: Letter,
    /// Upper-case letter: the value is URL-escaped (§7.3).
    escape: bool,
    /// Keep this many right-hand parts (the DIGIT transformer).
    keep: Option<u32>,
    reverse: bool,
    /// Split on these; empty means the default, `.`.
    delimiters: Vec<char>,
}

/// The macro letters of §7.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Letter {
    /// `s`: the sender.
    Sender,
    /// `l`: its local part.
    Local,
    /// `o`: its domain.
    SenderDomain,
    /// `d`: the current domain.
    Domain,
    /// `i`: the client IP, dotted (nibbles for IPv6).
    Ip,
    /// `p`: the validated domain name of the client IP.
    Validated,
    /// `v`: `in-addr` or `ip6`.
    Version,
    /// `h`: the HELO/EHLO domain.
    Helo,
    /// `c`: the client IP, readable (explanations only).
    ClientIp,
    /// `r`: the receiving host (explanations only).
    Receiver,
    /// `t`: the current time (explanations only).
    Timestamp,
}

/// A macro string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacroError {
    #[error("`%` must be followed by `{{`, `%`, `_` or `-` (RFC 7208 §7.1)")]
    BadPercent,
    #[error("unknown macro letter `{0}` (RFC 7208 §7.2)")]
    UnknownLetter(char),
    #[error("macro letter `{0}` is allowed only in explanations (RFC 7208 §7.2)")]
    ExplanationOnly(char),
    #[error("a macro's number of parts must not be zero (RFC 7208 §7.3)")]
    ZeroParts,
    #[error("unterminated or malformed `%{{...}}` (RFC 7208 §7.1)")]
    Unterminated,
    #[error("character {0:?} is not allowed here (RFC 7208 §7.1)")]
    BadChar(char),
}

impl MacroString {
    /// Parses a `macro-string` as it appears in a term: visible ASCII
    /// only, no `c`, `r` or `t`.
    pub fn parse(text: &str) -> Result<MacroString, MacroError> {
        parse(text, false)
    }

    /// Parses the text of an explanation record (§6.2): spaces allowed,
    /// and the letters `c`, `r` and `t`.
    pub fn parse_explanation(text: &str) -> Result<MacroString, MacroError> {
        parse(text, true)
    }

    /// Whether the string ends in a `macro-expand` (then it is a valid
    /// `domain-end` whatever it expands to).
    pub fn ends_with_expand(&self) -> bool {
        self.ends_with_expand
    }

    /// The literal text after the last `macro-expand` (all of it when there
    /// is none).
    pub fn literal_tail(&self) -> &str {
        if self.ends_with_expand {
            return "";
        }
        match self.tokens.last() {
            Some(Token::Literal(s)) => s,
            _ => "",
        }
    }

    /// Whether expansion needs the validated domain name (`p`).
    pub fn uses_validated_name(&self) -> bool {
        self.tokens
            .iter()
            .any(|t| matches!(t, Token::Macro(m) if m.letter == Letter::Validated))
    }

    /// Expands the string with the given values (§7.3).
    pub fn expand(&self, vars: &Vars<'_>) -> String {
        let mut out = String::new();
        for token in &self.tokens {
            match token {
                Token::Literal(s) => out.push_str(s),
                Token::Macro(m) => {
                    let value = vars.value(m.letter);
                    let value = transform(&value, m);
                    if m.escape {
                        url_escape(&value, &mut out);
                    } else {
                        out.push_str(&value);
                    }
                }
            }
        }
        out
    }
}

/// The values macros expand to.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    /// `<sender>`, with `postmaster` as local part when it had none.
    pub sender: &'a str,
    pub local_part: &'a str,
    pub sender_domain: &'a str,
    /// The current `<domain>`.
    pub domain: &'a str,
    /// The client IP (an IPv4-mapped IPv6 address already turned into IPv4).
    pub ip: IpAddr,
    /// The validated domain name of the client, when expansion needs it.
    pub validated: Option<&'a str>,
    pub helo: &'a str,
    pub receiver: &'a str,
    pub timestamp: u64,
}

impl Vars<'_> {
    fn value(&self, letter: Letter) -> String {
        match letter {
            Letter::Sender => self.sender.to_string(),
            Letter::Local => self.local_part.to_string(),
            Letter::SenderDomain => self.sender_domain.to_string(),
            Letter::Domain => self.domain.to_string(),
            Letter::Ip => dotted_ip(self.ip),
            Letter::Validated => self.validated.unwrap_or("unknown").to_string(),
            Letter::Version => match self.ip {
                IpAddr::V4(_) => "in-addr".to_string(),
                IpAddr::V6(_) => "ip6".to_string(),
            },
            Letter::Helo => self.helo.to_string(),
            Letter::ClientIp => self.ip.to_string(),
            Letter::Receiver => self.receiver.to_string(),
            Letter::Timestamp => self.timestamp.to_string(),
        }
    }
}

/// `i` (§7.3): dotted quad for IPv4, dot-separated nibbles for IPv6 (upper
/// case, as in the RFC's examples and the OpenSPF suite).
fn dotted_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(63);
            for byte in v6.octets() {
                for nibble in [byte >> 4, byte & 0xf] {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                }
            }
            s.to_ascii_uppercase()
        }
    }
}

/// Splitting, reversal and keeping the right-hand parts (§7.3).
fn transform(value: &str, m: &Macro) -> String {
    if m.keep.is_none() && !m.reverse && m.delimiters.is_empty() {
        return value.to_string();
    }
    let mut parts: Vec<&str> = if m.delimiters.is_empty() {
        value.split('.').collect()
    } else {
        value.split(|c| m.delimiters.contains(&c)).collect()
    };
    if m.reverse {
        parts.reverse();
    }
    if let Some(keep) = m.keep {
        let keep = keep as usize;
        if keep < parts.len() {
            parts.drain(..parts.len() - keep);
        }
    }
    parts.join(".")
}

/// URL escaping for upper-case macro letters: everything but the
/// unreserved characters of RFC 3986 becomes `%XX`.
fn url_escape(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn parse(text: &str, explanation: bool) -> Result<MacroString, MacroError> {
    let mut tokens: Vec<Token> = Vec::new();
    let mut ends_with_expand = false;
    let push_literal = |tokens: &mut Vec<Token>, s: &str| {
        if let Some(Token::Literal(last)) = tokens.last_mut() {
            last.push_str(s);
        } else {
            tokens.push(Token::Literal(s.to_string()));
        }
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            let allowed = matches!(c, '\x21'..='\x7e') || (explanation && c == ' ');
            if !allowed {
                return Err(MacroError::BadChar(c));
            }
            push_literal(&mut tokens, c.encode_utf8(&mut [0; 4]));
            ends_with_expand = false;
            continue;
        }
        match chars.next() {
            Some('%') => push_literal(&mut tokens, "%"),
            Some('_') => push_literal(&mut tokens, " "),
            Some('-') => push_literal(&mut tokens, "%20"),
            Some('{') => {
                let letter_char = chars.next().ok_or(MacroError::Unterminated)?;
                let letter = match letter_char.to_ascii_lowercase() {
                    's' => Letter::Sender,
                    'l' => Letter::Local,
                    'o' => Letter::SenderDomain,
                    'd' => Letter::Domain,
                    'i' => Letter::Ip,
                    'p' => Letter::Validated,
                    'v' => Letter::Version,
                    'h' => Letter::Helo,
                    'c' => Letter::ClientIp,
                    'r' => Letter::Receiver,
                    't' => Letter::Timestamp,
                    '}' => return Err(MacroError::Unterminated),
                    other => return Err(MacroError::UnknownLetter(other)),
                };
                if !explanation
                    && matches!(
                        letter,
                        Letter::ClientIp | Letter::Receiver | Letter::Timestamp
                    )
                {
                    return Err(MacroError::ExplanationOnly(letter_char));
                }
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                let keep = if digits.is_empty() {
                    None
                } else {
                    // Values past any label count are as good as "all".
                    let n: u32 = digits.parse().unwrap_or(u32::MAX);
                    if n == 0 {
                        return Err(MacroError::ZeroParts);
                    }
                    Some(n)
                };
                let mut reverse = false;
                if matches!(chars.peek(), Some('r' | 'R')) {
                    reverse = true;
                    chars.next();
                }
                let mut delimiters = Vec::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(d @ ('.' | '-' | '+' | ',' | '/' | '_' | '=')) => {
                            if !delimiters.contains(&d) {
                                delimiters.push(d);
                            }
                        }
                        _ => return Err(MacroError::Unterminated),
                    }
                }
                tokens.push(Token::Macro(Macro {
                    letter,
                    escape: letter_char.is_ascii_uppercase(),
                    keep,
                    reverse,
                    delimiters,
                }));
            }
            _ => return Err(MacroError::BadPercent),
        }
        ends_with_expand = true;
    }
    Ok(MacroString {
        tokens,
        ends_with_expand,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The examples of RFC 7208 §7.4.
    fn vars(ip: &str) -> Vars<'static> {
        Vars {
            sender: "strong-bad@email.example.com",
            local_part: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            validated: None,
            helo: "mx.example.org",
            receiver: "mx.example.net",
            timestamp: 1_400_000_000,
        }
    }

    fn expand(text: &str, ip: &str) -> String {
        MacroString::parse(text).unwrap().expand(&vars(ip))
    }

    #[test]
    fn rfc7208_section_7_4_examples() {
        let ip = "192.0.2.3";
        assert_eq!(expand("%{s}", ip), "strong-bad@email.example.com");
        assert_eq!(expand("%{o}", ip), "email.example.com");
        assert_eq!(expand("%{d}", ip), "email.example.com");
        assert_eq!(expand("%{d4}", ip), "email.example.com");
        assert_eq!(expand("%{d3}", ip), "email.example.com");
        assert_eq!(expand("%{d2}", ip), "example.com");
        assert_eq!(expand("%{d1}", ip), "com");
        assert_eq!(expand("%{dr}", ip), "com.example.email");
        assert_eq!(expand("%{d2r}", ip), "example.email");
        assert_eq!(expand("%{l}", ip), "strong-bad");
        assert_eq!(expand("%{l-}", ip), "strong.bad");
        assert_eq!(expand("%{lr}", ip), "strong-bad");
        assert_eq!(expand("%{lr-}", ip), "bad.strong");
        assert_eq!(expand("%{l1r-}", ip), "strong");
        assert_eq!(
            expand("%{ir}.%{v}._spf.%{d2}", ip),
            "3.2.0.192.in-addr._spf.example.com"
        );
        assert_eq!(
            expand("%{lr-}.lp._spf.%{d2}", ip),
            "bad.strong.lp._spf.example.com"
        );
        assert_eq!(
            expand("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", ip),
            "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"
        );
        assert_eq!(
            expand("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", ip),
            "3.2.0.192.in-addr.strong.lp._spf.example.com"
        );
        assert_eq!(
            expand("%{d2}.trusted-domains.example.net", ip),
            "example.com.trusted-domains.example.net"
        );
        assert_eq!(
            expand("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01"),
            "1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2.ip6._spf.example.com"
        );
    }

    #[test]
    fn escapes_and_upper_case() {
        let ip = "192.0.2.3";
        assert_eq!(expand("a%%b%_c%-d", ip), "a%b c%20d");
        let v = Vars {
            local_part: "~jack&jill=up-a_b3.c",
            ..vars(ip)
        };
        let m = MacroString::parse("why.html?l=%{L}").unwrap();
        assert_eq!(m.expand(&v), "why.html?l=~jack%26jill%3Dup-a_b3.c");
    }

    #[test]
    fn explanation_letters() {
        assert_eq!(
            MacroString::parse("%{c}.example.com"),
            Err(MacroError::ExplanationOnly('c'))
        );
        assert_eq!(
            MacroString::parse("%{r}"),
            Err(MacroError::ExplanationOnly('r'))
        );
        let m = MacroString::parse_explanation("%{c} via %{r} at %{t}").unwrap();
        assert_eq!(
            m.expand(&vars("2001:db8::1")),
            "2001:db8::1 via mx.example.net at 1400000000"
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            MacroString::parse("%(ir).sbl.example.com"),
            Err(MacroError::BadPercent)
        );
        assert_eq!(MacroString::parse("foo%.sbl"), Err(MacroError::BadPercent));
        assert_eq!(
            MacroString::parse("%{a}.example.com"),
            Err(MacroError::UnknownLetter('a'))
        );
        assert_eq!(MacroString::parse("%{d0}"), Err(MacroError::ZeroParts));
        assert_eq!(MacroString::parse("%{d"), Err(MacroError::Unterminated));
        assert_eq!(MacroString::parse("%{d2x}"), Err(MacroError::Unterminated));
        assert_eq!(MacroString::parse("a b"), Err(MacroError::BadChar(' ')));
        assert!(MacroString::parse_explanation("a b").is_ok());
        assert_eq!(
            MacroString::parse("a\u{0}b"),
            Err(MacroError::BadChar('\u{0}'))
        );
    }

    #[test]
    fn domain_end_helpers() {
        let m = MacroString::parse("foo.%{d}").unwrap();
        assert!(m.ends_with_expand());
        let m = MacroString::parse("%{d}.example.com.").unwrap();
        assert!(!m.ends_with_expand());
        assert_eq!(m.literal_tail(), ".example.com.");
        assert!(MacroString::parse("%{p}.x").unwrap().uses_validated_name());
    }

    #[test]
    fn multiple_delimiters() {
        assert_eq!(
            expand("%{l2r+-}", "192.0.2.3").as_str(),
            "bad.strong",
            "strong-bad split on + and -"
        );
        let v = Vars {
            local_part: "foo-bar+zip+quux",
            ..vars("192.0.2.3")
        };
        let m = MacroString::parse("%{l2r+-}").unwrap();
        assert_eq!(m.expand(&v), "bar.foo");
    }
}
