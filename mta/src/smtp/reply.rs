//! SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 3463, RFC 2034).

use std::borrow::Cow;
use std::fmt;

/// An enhanced status code, `class.subject.detail` (RFC 3463).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Status(pub u8, pub u16, pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One reply: a code, an enhanced status code, and text (lines separated by
/// `\n`). RFC 2034 puts the enhanced code on every line of every reply
/// except the greeting and the EHLO/HELO reply, whose lines clients parse
/// as host name and extension keywords.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<Status>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub fn new(code: u16, status: Status, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            status: Some(status),
            text: text.into(),
        }
    }

    /// A reply without an enhanced code (greeting, EHLO/HELO, AUTH challenges).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            status: None,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the wire form: `code-text` lines and a final `code text`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            let mut head = format!("{}{}", self.code, sep);
            if let Some(s) = self.status {
                head.push_str(&s.to_string());
                if !line.is_empty() {
                    head.push(' ');
                }
            }
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The reply on one line, as the transaction log records it.
    pub fn one_line(&self) -> String {
        let text = self.text.replace('\n', " / ");
        match self.status {
            Some(s) => format!("{} {} {}", self.code, s, text),
            None => format!("{} {}", self.code, text),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Client text quoted in a reply: control characters become `?` (a CR
/// would break the reply line, and with an LF after it let a client write
/// reply lines of its own) and the text is cut after `max` characters with
/// `...`, so that the reply stays one line within the 512 octets of RFC 5321
/// §4.5.3.1.5.
pub fn quote(text: &str, max: usize) -> Cow<'_, str> {
    let clean = !text.chars().any(char::is_control);
    match text.char_indices().nth(max) {
        None if clean => Cow::Borrowed(text),
        cut => {
            let end = cut.map_or(text.len(), |(i, _)| i);
            let mut out: String = text[..end]
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            if cut.is_some() {
                out.push_str("...");
            }
            Cow::Owned(out)
        }
    }
}

/// Replies used in more than one place.
pub mod replies {
    use super::{Reply, Status};

    pub fn ok() -> Reply {
        Reply::new(250, Status(2, 0, 0), "Ok")
    }
    pub fn syntax(text: &'static str) -> Reply {
        Reply::new(501, Status(5, 5, 4), text)
    }
    pub fn bad_sequence(text: &'static str) -> Reply {
        Reply::new(503, Status(5, 5, 1), text)
    }
    pub fn line_too_long() -> Reply {
        Reply::new(
            500,
            Status(5, 5, 2),
            "Line too long: command lines end within 1000 characters (RFC 5321 4.5.3.1)",
        )
    }
    pub fn message_too_big(max: u64) -> Reply {
        Reply::new(
            552,
            Status(5, 3, 4),
            format!("Message size exceeds the fixed limit of {max} bytes"),
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(
            421,
            Status(4, 7, 0),
            "Too many errors; closing the connection",
        )
    }
    pub fn insufficient_storage() -> Reply {
        Reply::new(
            451,
            Status(4, 3, 1),
            "Insufficient system storage; please try again later",
        )
    }
    pub fn storage_failure() -> Reply {
        Reply::new(
            451,
            Status(4, 3, 0),
            "Temporary failure storing the message; please try again later",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut v = Vec::new();
        r.write_to(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn single_line_with_enhanced_code() {
        assert_eq!(wire(&replies::ok()), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn multi_line_repeats_the_enhanced_code_on_each_line() {
        let r = Reply::new(214, Status(2, 0, 0), "first\nsecond");
        assert_eq!(wire(&r), "214-2.0.0 first\r\n214 2.0.0 second\r\n");
    }

    #[test]
    fn plain_replies_carry_no_enhanced_code() {
        let r = Reply::plain(250, "host\nPIPELINING\nSIZE 10");
        assert_eq!(wire(&r), "250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
        assert_eq!(wire(&Reply::plain(334, "")), "334 \r\n");
    }

    /// Found by fuzzing (smtp_session): a CR inside a MAIL/RCPT parameter
    /// was echoed into the 555 reply, and a long EHLO name or parameter made
    /// reply lines longer than RFC 5321 allows.
    #[test]
    fn quoted_client_text_is_one_short_line() {
        assert_eq!(quote("X-FOO", 64), "X-FOO");
        assert!(matches!(quote("X-FOO", 64), Cow::Borrowed(_)));
        assert_eq!(quote("A\rB\u{7f}\tC", 64), "A?B??C");
        assert_eq!(quote("abcdef", 3), "abc...");
        assert_eq!(quote("ééé", 2), "éé...");
        assert_eq!(quote("", 0), "");
    }

    #[test]
    fn one_line_form_for_logs() {
        let r = Reply::new(550, Status(5, 7, 1), "a\nb");
        assert_eq!(r.one_line(), "550 5.7.1 a / b");
    }
}
