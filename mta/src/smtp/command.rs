//! Parsing one SMTP command line (RFC 5321 §4.1, with the parameters of
//! RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 3030 BDAT and
//! RFC 4954 AUTH). Pure: a line in, a [`Command`] or the error [`Reply`] out.

use std::fmt;

use super::reply::{Reply, Status, quote};

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `from` is `None` for the null reverse-path `<>`.
    Mail {
        from: Option<Mailbox>,
        params: MailParams,
    },
    Rcpt {
        to: Mailbox,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

impl Command {
    /// The verb, as the transaction log names the command a reply answered.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy => "VRFY",
            Command::Expn => "EXPN",
            Command::Help => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

/// The domain part of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// A host name, possibly with UTF-8 labels (RFC 6531).
    Name(String),
    /// An address literal, with its brackets: `[192.0.2.1]`, `[IPv6:...]`.
    Literal(String),
}

/// `local-part@domain` (RFC 5321 §4.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// As given, including quotes when the local part was a quoted string.
    pub local: String,
    pub domain: Domain,
}

impl Mailbox {
    pub fn domain_str(&self) -> &str {
        match &self.domain {
            Domain::Name(d) | Domain::Literal(d) => d,
        }
    }

    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain_str().is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain_str())
    }
}

/// `BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

/// The parameters of MAIL FROM we support.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870): the client's estimate of the message size.
    pub size: Option<u64>,
    pub body: BodyType,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;
const MAX_PATH: usize = 256;
/// How much of an unknown parameter's name a reply quotes.
const MAX_PARAM_NAME: usize = 64;

fn unrecognized() -> Reply {
    Reply::new(500, Status(5, 5, 2), "Command unrecognized")
}

fn syntax(text: &'static str) -> Reply {
    Reply::new(501, Status(5, 5, 4), text)
}

/// Parses one command line, without its CRLF.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    if line.contains(&0) {
        return Err(Reply::new(500, Status(5, 5, 2), "NUL byte in command line"));
    }
    let line = std::str::from_utf8(line)
        .map_err(|_| Reply::new(500, Status(5, 5, 2), "Command line is not valid UTF-8"))?;
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, r),
        None => (line, ""),
    };
    if verb.len() > 8 {
        return Err(unrecognized());
    }
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command, usage: &'static str| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(syntax(usage))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let name = rest.trim();
            if name.is_empty() || name.contains(char::is_whitespace) || !name.is_ascii() {
                return Err(syntax("Syntax: EHLO hostname"));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(name.to_string())
            } else {
                Command::Helo(name.to_string())
            })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data, "Syntax: DATA (no parameters)"),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset, "Syntax: RSET (no parameters)"),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit, "Syntax: QUIT (no parameters)"),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls, "Syntax: STARTTLS (no parameters)"),
        "AUTH" => {
            let mut parts = rest.split(' ').filter(|p| !p.is_empty());
            let mechanism = parts
                .next()
                .ok_or_else(|| syntax("Syntax: AUTH mechanism [initial-response]"))?
                .to_ascii_uppercase();
            let initial = parts.next().map(str::to_string);
            if parts.next().is_some() {
                return Err(syntax("Syntax: AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(unrecognized()),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn bad_sender() -> Reply {
    Reply::new(
        501,
        Status(5, 1, 7),
        "Bad sender address syntax: use MAIL FROM:<local@domain>",
    )
}

fn bad_recipient() -> Reply {
    Reply::new(
        501,
        Status(5, 1, 3),
        "Bad recipient address syntax: use RCPT TO:<local@domain>",
    )
}

fn parse_mail(rest: &str) -> Result<Command, Reply> {
    let rest =
        strip_prefix_ci(rest, "FROM:").ok_or_else(|| syntax("Syntax: MAIL FROM:<address>"))?;
    // Clients commonly put a space after the colon; RFC 5321 does not, but
    // refusing it would help no one.
    let rest = rest.trim_start_matches(' ');
    let (from, params) = if let Some(after) = rest.strip_prefix("<>") {
        (None, after)
    } else {
        let (mb, after) = parse_path(rest).ok_or_else(bad_sender)?;
        (Some(mb), after)
    };
    let params = parse_mail_params(params)?;
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(rest: &str) -> Result<Command, Reply> {
    let rest = strip_prefix_ci(rest, "TO:").ok_or_else(|| syntax("Syntax: RCPT TO:<address>"))?;
    let rest = rest.trim_start_matches(' ');
    let (to, params) = parse_path(rest).ok_or_else(bad_recipient)?;
    if let Some(p) = params.split(' ').find(|p| !p.is_empty()) {
        return Err(Reply::new(
            555,
            Status(5, 5, 4),
            format!(
                "Unsupported RCPT TO parameter {}",
                quote(&param_name(p), MAX_PARAM_NAME)
            ),
        ));
    }
    Ok(Command::Rcpt { to })
}

fn param_name(p: &str) -> String {
    p.split('=').next().unwrap_or(p).to_ascii_uppercase()
}

fn parse_mail_params(s: &str) -> Result<MailParams, Reply> {
    if !s.is_empty() && !s.starts_with(' ') {
        return Err(bad_sender());
    }
    let mut params = MailParams::default();
    let mut seen = Vec::new();
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (p.to_ascii_uppercase(), None),
        };
        if seen.contains(&key) {
            return Err(syntax("Duplicate MAIL FROM parameter"));
        }
        seen.push(key.clone());
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax("Syntax: SIZE=<decimal number of octets>"));
                }
                params.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) => {
                params.body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    _ => {
                        return Err(Reply::new(
                            555,
                            Status(5, 5, 4),
                            "Unsupported BODY type: use 7BIT or 8BITMIME",
                        ));
                    }
                };
            }
            ("SMTPUTF8", None) => params.smtputf8 = true,
            // RFC 4954 §5: the submitter's identity; accepted and not trusted.
            ("AUTH", Some(_)) => {}
            _ => {
                return Err(Reply::new(
                    555,
                    Status(5, 5, 4),
                    format!(
                        "Unsupported MAIL FROM parameter {}",
                        quote(&key, MAX_PARAM_NAME)
                    ),
                ));
            }
        }
    }
    Ok(params)
}

fn parse_bdat(rest: &str) -> Result<Command, Reply> {
    let usage = || syntax("Syntax: BDAT <size> [LAST]");
    let mut parts = rest.split(' ').filter(|p| !p.is_empty());
    let size = parts.next().ok_or_else(usage)?;
    if size.len() > 20 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage());
    }
    let size: u64 = size.parse().map_err(|_| usage())?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(usage()),
    };
    if parts.next().is_some() {
        return Err(usage());
    }
    Ok(Command::Bdat { size, last })
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Parses `<[@route,@route:]local@domain>`; returns the mailbox and what
/// follows the closing bracket.
pub fn parse_path(s: &str) -> Option<(Mailbox, &str)> {
    let inner = s.strip_prefix('<')?;
    // A source route (RFC 5321 §4.1.2, obsolete) must be accepted and ignored.
    let inner = if inner.starts_with('@') {
        &inner[inner.find(':')? + 1..]
    } else {
        inner
    };
    let (local, after_local) = parse_local_part(inner)?;
    let after_at = after_local.strip_prefix('@')?;
    let close = after_at.find('>')?;
    let domain = parse_domain(&after_at[..close])?;
    let rest = &after_at[close + 1..];
    if local.len() > MAX_LOCAL || local.len() + 1 + (close) > MAX_PATH {
        return None;
    }
    Some((Mailbox { local, domain }, rest))
}

fn parse_local_part(s: &str) -> Option<(String, &str)> {
    if let Some(q) = s.strip_prefix('"') {
        let mut escaped = false;
        for (i, c) in q.char_indices() {
            if escaped {
                if !(' '..='~').contains(&c) {
                    return None;
                }
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                let end = i + 1; // index in `q` just past the closing quote
                return Some((format!("\"{}", &q[..end]), &q[end..]));
            } else if c.is_ascii_control() {
                return None;
            }
        }
        None
    } else {
        let end = s
            .find(|c: char| !(is_atext(c) || c == '.'))
            .unwrap_or(s.len());
        let local = &s[..end];
        if local.is_empty() || local.split('.').any(str::is_empty) {
            return None;
        }
        Some((local.to_string(), &s[end..]))
    }
}

fn parse_domain(d: &str) -> Option<Domain> {
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return None;
    }
    if d.starts_with('[') {
        let inner = d.strip_prefix('[')?.strip_suffix(']')?;
        let ok = if let Some(v6) = strip_prefix_ci(inner, "IPv6:") {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            inner.parse::<std::net::Ipv4Addr>().is_ok()
        };
        return ok.then(|| Domain::Literal(d.to_string()));
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    for label in d.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        {
            return None;
        }
    }
    Some(Domain::Name(d.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, Reply> {
        parse(s.as_bytes())
    }

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: Domain::Name(domain.into()),
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            p("ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(p("QuIt"), Ok(Command::Quit));
        assert_eq!(p("noop anything"), Ok(Command::Noop));
        assert_eq!(p("STARTTLS"), Ok(Command::StartTls));
    }

    #[test]
    fn ehlo_needs_a_name() {
        assert_eq!(p("EHLO").unwrap_err().code, 501);
        assert_eq!(p("EHLO   ").unwrap_err().code, 501);
        assert_eq!(
            p("EHLO [127.0.0.1]"),
            Ok(Command::Ehlo("[127.0.0.1]".into()))
        );
    }

    #[test]
    fn mail_from_with_and_without_space_and_params() {
        let want = Command::Mail {
            from: Some(mb("a", "b.example")),
            params: MailParams::default(),
        };
        assert_eq!(p("MAIL FROM:<a@b.example>"), Ok(want.clone()));
        assert_eq!(p("mail from: <a@b.example>"), Ok(want));
        assert_eq!(
            p("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8 AUTH=<>"),
            Ok(Command::Mail {
                from: Some(mb("a", "b.example")),
                params: MailParams {
                    size: Some(1000),
                    body: BodyType::EightBitMime,
                    smtputf8: true
                }
            })
        );
    }

    #[test]
    fn null_sender() {
        assert_eq!(
            p("MAIL FROM:<>"),
            Ok(Command::Mail {
                from: None,
                params: MailParams::default()
            })
        );
    }

    #[test]
    fn mail_errors_carry_the_right_codes() {
        let e = p("MAIL FROM:a@b.example").unwrap_err();
        assert_eq!((e.code, e.status), (501, Some(Status(5, 1, 7))));
        let e = p("MAIL TO:<a@b.example>").unwrap_err();
        assert_eq!((e.code, e.status), (501, Some(Status(5, 5, 4))));
        let e = p("MAIL FROM:<a@b.example> RET=FULL").unwrap_err();
        assert_eq!((e.code, e.status), (555, Some(Status(5, 5, 4))));
        assert!(e.text.contains("RET"));
        let e = p("MAIL FROM:<a@b.example> BODY=BINARYMIME").unwrap_err();
        assert_eq!(e.code, 555);
        let e = p("MAIL FROM:<a@b.example> SIZE=big").unwrap_err();
        assert_eq!(e.code, 501);
        let e = p("MAIL FROM:<a@b.example> SIZE=1 SIZE=2").unwrap_err();
        assert_eq!(e.code, 501);
        let e = p("MAIL FROM:<a@b.example>SIZE=1").unwrap_err();
        assert_eq!(e.code, 501);
    }

    #[test]
    fn rcpt_forms() {
        assert_eq!(
            p("RCPT TO:<x@y.example>"),
            Ok(Command::Rcpt {
                to: mb("x", "y.example")
            })
        );
        assert_eq!(
            p("rcpt to: <x@y.example>"),
            Ok(Command::Rcpt {
                to: mb("x", "y.example")
            })
        );
        // Source routes are accepted and ignored (RFC 5321 §4.1.2).
        assert_eq!(
            p("RCPT TO:<@relay.example,@r2.example:x@y.example>"),
            Ok(Command::Rcpt {
                to: mb("x", "y.example")
            })
        );
        let e = p("RCPT TO:<x@y.example> NOTIFY=NEVER").unwrap_err();
        assert_eq!(e.code, 555);
        let e = p("RCPT TO:<postmaster>").unwrap_err();
        assert_eq!((e.code, e.status), (501, Some(Status(5, 1, 3))));
    }

    #[test]
    fn address_syntax() {
        assert!(parse_path("<\"john doe\"@y.example>").is_some());
        assert_eq!(
            parse_path("<\"a>b\"@y.example>").unwrap().0.local,
            "\"a>b\""
        );
        assert!(parse_path("<a..b@y.example>").is_none());
        assert!(parse_path("<.a@y.example>").is_none());
        assert!(parse_path("<a@-y.example>").is_none());
        assert!(parse_path("<a@y..example>").is_none());
        assert!(parse_path("<a@>").is_none());
        assert!(parse_path("<a@y.example").is_none());
        assert!(parse_path("<a b@y.example>").is_none());
        assert_eq!(
            parse_path("<a@[192.0.2.1]>").unwrap().0.domain,
            Domain::Literal("[192.0.2.1]".into())
        );
        assert!(parse_path("<a@[IPv6:2001:db8::1]>").is_some());
        assert!(parse_path("<a@[999.0.2.1]>").is_none());
        let long_local = format!("<{}@y.example>", "a".repeat(65));
        assert!(parse_path(&long_local).is_none());
        let long_domain = format!("<a@{}.example>", "b.".repeat(130));
        assert!(parse_path(&long_domain).is_none());
        // RFC 6531: UTF-8 in both parts.
        let (m, _) = parse_path("<δοκιμή@παράδειγμα.δοκιμή>").unwrap();
        assert!(!m.is_ascii());
    }

    #[test]
    fn bdat() {
        assert_eq!(
            p("BDAT 100"),
            Ok(Command::Bdat {
                size: 100,
                last: false
            })
        );
        assert_eq!(
            p("bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(p("BDAT").unwrap_err().code, 501);
        assert_eq!(p("BDAT x").unwrap_err().code, 501);
        assert_eq!(p("BDAT 1 FIRST").unwrap_err().code, 501);
        assert_eq!(p("BDAT 99999999999999999999999").unwrap_err().code, 501);
    }

    #[test]
    fn auth() {
        assert_eq!(
            p("AUTH plain dGVzdAB0ZXN0AHRlc3Q="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("dGVzdAB0ZXN0AHRlc3Q=".into())
            })
        );
        assert_eq!(
            p("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            })
        );
        assert_eq!(p("AUTH").unwrap_err().code, 501);
    }

    #[test]
    fn hostile_bytes() {
        assert_eq!(p("NOOP\0").unwrap_err().code, 500);
        assert_eq!(parse(b"MAIL FROM:<\xff@x.example>").unwrap_err().code, 500);
        assert_eq!(p("FOOBARBAZQUUX").unwrap_err().code, 500);
        assert_eq!(p("").unwrap_err().code, 500);
    }
}
