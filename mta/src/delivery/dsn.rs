//! Delivery status notifications: the bounce, or the delay warning, that we
//! send to a message's return path when delivery to some of its recipients
//! failed for good or is taking long.
//!
//! [`build`] makes the whole message, ready for the caller to DKIM-sign and
//! queue (with a null reverse path, RFC 5321 §4.5.5, so that it is never
//! bounced in turn). It
//! is a `multipart/report; report-type=delivery-status` (RFC 6522, which
//! obsoletes RFC 3462) with three parts:
//!
//! 1. a short explanation for people, `text/plain` in UTF-8;
//! 2. the machine-readable report, `message/delivery-status` (RFC 3464);
//! 3. the header section of the original, `text/rfc822-headers`. Never its
//!    body: our senders include regulated ones whose content we must not
//!    copy around, and the header is enough to tell which message it was.
//!
//! The message says `Auto-Submitted: auto-replied` (RFC 3834 §5) so that
//! responders leave it alone, and keeps to RFC 5322: CRLF line ends, and no
//! line over 998 octets, whatever the remote server replied.
//!
//! A recipient address that is not ASCII (an SMTPUTF8 message) is reported
//! with the `utf-8` address type of RFC 6533 §3, in its 7-bit
//! `utf-8-addr-xtext` form (`\x{HEX}` for each non-ASCII character), so the
//! delivery-status part stays the ASCII that RFC 3464 requires and readers
//! without RFC 6533 support still parse it. The message is 8-bit only when
//! the explanation (an address or reply in UTF-8) or the returned header is:
//! then those parts say `8bit`, and the transaction needs 8BITMIME; a UTF-8
//! return path puts UTF-8 in `To:` as well, which needs SMTPUTF8 anyway.
//!
//! Pure: the caller passes the time, the Message-ID and the boundary.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

/// The longest line allowed, without its CRLF (RFC 5322 §2.1.1 MUST).
const MAX_LINE: usize = 998;

/// Where our own header fields are folded and the explanation is wrapped
/// (RFC 5322 §2.1.1 SHOULD), so that mail readers show them well.
const FOLD_AT: usize = 78;

/// The longest Message-ID we copy from the original into `In-Reply-To:`
/// and `References:`: it cannot be folded, and must fit a line.
const MAX_MSG_ID: usize = 900;

/// What happened to a recipient: the `Action:` field (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// We gave up: a permanent error, or temporary ones for too long.
    Failed,
    /// Not delivered yet; we keep trying.
    Delayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient the notification is about.
#[derive(Debug, Clone)]
pub struct DsnRecipient {
    /// The envelope recipient (RCPT TO), without angle brackets.
    pub address: String,
    pub action: Action,
    /// The enhanced status code (RFC 3463), e.g. "5.1.1" or "4.4.7". When
    /// it is not one, the report says "5.0.0" or "4.0.0" after `action`:
    /// the field is required.
    pub status: String,
    /// The host name of the MX that answered, if one did.
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. "550 5.1.1 <a@b>: no such user"; the lines of
    /// a multi-line reply may be joined with line ends or spaces.
    pub diagnostic: Option<String>,
    pub last_attempt: Option<SystemTime>,
    /// When we give up; reported for `Delayed` only.
    pub will_retry_until: Option<SystemTime>,
}

/// Everything a notification is made of.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our host name.
    pub reporting_mta: &'a str,
    /// The queue id of the original message.
    pub queue_id: &'a str,
    /// The return path of the original: where the notification goes.
    pub original_sender: &'a str,
    /// When we accepted the original.
    pub arrival: SystemTime,
    /// At least one (RFC 3464 §2.1 requires a per-recipient group).
    pub recipients: &'a [DsnRecipient],
    /// The original message as stored: header and body, CRLF line ends.
    pub original: &'a [u8],
    pub now: SystemTime,
    /// With angle brackets, e.g. "<20261201.ABC.dsn@mta1.example.net>".
    pub message_id: &'a str,
    /// The MIME boundary: random, 1 to 70 characters of RFC 2046 `bchars`.
    pub boundary: &'a str,
}

/// The notification message: header and body, CRLF line ends, no line over
/// 998 octets.
pub fn build(input: &DsnInput<'_>) -> Vec<u8> {
    let original = header_section(input.original);
    let any_failed = input.recipients.iter().any(|r| r.action == Action::Failed);
    let explanation = explanation(input);
    let report = delivery_status(input);
    let returned = returned_header(original);
    let explanation_8bit = !explanation.is_ascii();
    let returned_8bit = !returned.is_ascii();
    let boundary = clean(input.boundary);

    let mut out = Vec::with_capacity(explanation.len() + report.len() + returned.len() + 1024);
    field(
        &mut out,
        "From",
        &format!(
            "Mail Delivery System <MAILER-DAEMON@{}>",
            clean(input.reporting_mta)
        ),
    );
    field(
        &mut out,
        "To",
        &format!("<{}>", clean(input.original_sender)),
    );
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    field(&mut out, "Subject", subject);
    field(&mut out, "Date", &rfc5322_date(input.now));
    field(&mut out, "Message-ID", &clean(input.message_id));
    // Threads the notification with the original in the sender's mail
    // reader (RFC 5322 §3.6.4).
    if let Some(id) = original_message_id(original) {
        field(&mut out, "In-Reply-To", &id);
        field(&mut out, "References", &id);
    }
    field(&mut out, "Auto-Submitted", "auto-replied");
    field(&mut out, "MIME-Version", "1.0");
    field(
        &mut out,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    // A multipart is labelled with the widest encoding of its parts
    // (RFC 2045 §6.4).
    if explanation_8bit || returned_8bit {
        field(&mut out, "Content-Transfer-Encoding", "8bit");
    }
    out.extend_from_slice(b"\r\n");
    // For readers that do not know MIME (RFC 2046 §5.1.1 preamble).
    out.extend_from_slice(b"This is a delivery status notification in MIME format.\r\n");

    part_start(&mut out, &boundary);
    field(&mut out, "Content-Type", "text/plain; charset=utf-8");
    field(
        &mut out,
        "Content-Transfer-Encoding",
        if explanation_8bit { "8bit" } else { "7bit" },
    );
    field(&mut out, "Content-Description", "Notification");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(explanation.as_bytes());

    part_start(&mut out, &boundary);
    field(&mut out, "Content-Type", "message/delivery-status");
    field(&mut out, "Content-Description", "Delivery report");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&report);

    part_start(&mut out, &boundary);
    if returned_8bit {
        // UTF-8 header fields of an SMTPUTF8 message (RFC 6532). We keep
        // text/rfc822-headers rather than RFC 6533's message/global-headers,
        // which readers know less well; the charset says how to read it.
        let charset = if std::str::from_utf8(&returned).is_ok() {
            "; charset=utf-8"
        } else {
            ""
        };
        field(
            &mut out,
            "Content-Type",
            &format!("text/rfc822-headers{charset}"),
        );
        field(&mut out, "Content-Transfer-Encoding", "8bit");
    } else {
        field(&mut out, "Content-Type", "text/rfc822-headers");
    }
    field(
        &mut out,
        "Content-Description",
        "Header of the undelivered message",
    );
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&returned);

    // The CRLF before a boundary belongs to the boundary (RFC 2046 §5.1.1),
    // so every part above ends with its own CRLF, then this one.
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out
}

/// The header section of a message: everything before the first empty
/// line, with the line end of its last field. Without an empty line, the
/// whole message is header; a message that starts with one has none.
///
/// Bare LF line ends count too: a message stored with the wrong line ends
/// must not have its body taken for header and returned.
pub fn header_section(message: &[u8]) -> &[u8] {
    let mut start = 0;
    while let Some(i) = message[start..].iter().position(|&b| b == b'\n') {
        let end = start + i + 1;
        if matches!(&message[start..end], b"\n" | b"\r\n") {
            return &message[..start];
        }
        start = end;
    }
    message
}

fn part_start(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The text for people: which message, what happened to each recipient and
/// what the remote server said, and for delays when we give up.
fn explanation(input: &DsnInput<'_>) -> String {
    let mut text = String::new();
    line(
        &mut text,
        &format!(
            "This is the mail delivery system at {}.",
            clean(input.reporting_mta)
        ),
    );
    let about = format!(
        "Your message with queue ID {}, received {},",
        clean(input.queue_id),
        rfc5322_date(input.arrival)
    );
    let failed: Vec<&DsnRecipient> = input
        .recipients
        .iter()
        .filter(|r| r.action == Action::Failed)
        .collect();
    let delayed: Vec<&DsnRecipient> = input
        .recipients
        .iter()
        .filter(|r| r.action == Action::Delayed)
        .collect();
    let failed_any = !failed.is_empty();
    if failed_any {
        text.push_str("\r\n");
        line(
            &mut text,
            &format!(
                "{about} could not be delivered to the recipients below. \
                 We have given up on them and will not try again."
            ),
        );
        for r in failed {
            recipient_text(&mut text, r);
        }
    }
    if !delayed.is_empty() {
        // Said once about the message, even when it also failed for some.
        let subject = if failed_any { "It".to_owned() } else { about };
        text.push_str("\r\n");
        line(
            &mut text,
            &format!(
                "{subject} has not yet been delivered to the recipients below. \
                 We are still trying; you need not send it again."
            ),
        );
        for r in delayed {
            recipient_text(&mut text, r);
            let until = match r.will_retry_until {
                Some(t) => format!("We will keep trying until {}.", rfc5322_date(t)),
                None => "We will keep trying for a while.".to_owned(),
            };
            indented(&mut text, &until);
        }
    }
    text.push_str("\r\n");
    line(
        &mut text,
        "The delivery report and the header of your message are attached. \
         The content of your message is not returned.",
    );
    text
}

fn recipient_text(text: &mut String, r: &DsnRecipient) {
    text.push_str("\r\n");
    line(text, &format!("<{}>", clean(&r.address)));
    let remote = r.remote_mta.as_deref().map(clean);
    let reply = r.diagnostic.as_deref().map(clean);
    let said = match (remote, reply) {
        (Some(host), Some(reply)) => format!("{host} said: {reply}"),
        (None, Some(reply)) => reply,
        (Some(host), None) => format!("{host} gave no reply (status {}).", status(r)),
        (None, None) => format!("No server answered (status {}).", status(r)),
    };
    indented(text, &said);
}

/// A paragraph line of the explanation, wrapped.
fn line(text: &mut String, words: &str) {
    wrap(text, "", words);
}

/// A detail line of the explanation, wrapped and indented.
fn indented(text: &mut String, words: &str) {
    wrap(text, "    ", words);
}

/// Appends `words` as lines of at most `FOLD_AT` characters where the words
/// allow, each starting with `indent`. A word that does not fit any line
/// (a 3000-character reply without spaces) is cut: a break too many is
/// better than a line too long.
fn wrap(text: &mut String, indent: &str, words: &str) {
    let room = MAX_LINE - indent.len();
    let mut current = String::from(indent);
    let mut empty = true;
    for word in words.split([' ', '\t']).filter(|w| !w.is_empty()) {
        let mut word = word;
        while word.len() > room {
            if !empty {
                text.push_str(&current);
                text.push_str("\r\n");
            }
            let cut = word.floor_char_boundary(room);
            text.push_str(indent);
            text.push_str(&word[..cut]);
            text.push_str("\r\n");
            word = &word[cut..];
            current = String::from(indent);
            empty = true;
        }
        if !empty && current.len() + 1 + word.len() > FOLD_AT {
            text.push_str(&current);
            text.push_str("\r\n");
            current = String::from(indent);
            empty = true;
        }
        if !empty {
            current.push(' ');
        }
        current.push_str(word);
        empty = false;
    }
    if !empty {
        text.push_str(&current);
        text.push_str("\r\n");
    }
}

/// The `message/delivery-status` body (RFC 3464 §2.1): the per-message
/// fields, then a group of fields for each recipient, each group after an
/// empty line. All ASCII.
fn delivery_status(input: &DsnInput<'_>) -> Vec<u8> {
    let mut fields = Vec::new();
    // No Original-Envelope-Id: we do not take the DSN extension's ENVID
    // (RFC 3461), so there is none to report (RFC 3464 §2.2.1).
    field(
        &mut fields,
        "Reporting-MTA",
        &format!("dns; {}", ascii(&clean(input.reporting_mta))),
    );
    field(&mut fields, "Arrival-Date", &rfc5322_date(input.arrival));
    for r in input.recipients {
        fields.extend_from_slice(b"\r\n");
        field(&mut fields, "Final-Recipient", &typed_address(&r.address));
        field(&mut fields, "Action", r.action.as_str());
        field(&mut fields, "Status", status(r));
        if let Some(host) = &r.remote_mta {
            field(
                &mut fields,
                "Remote-MTA",
                &format!("dns; {}", ascii(&clean(host))),
            );
        }
        if let Some(reply) = &r.diagnostic {
            // The exact reply, UTF-8 included, is in the explanation; this
            // field is ASCII (RFC 3464 §2.3.6).
            field(
                &mut fields,
                "Diagnostic-Code",
                &format!("smtp; {}", ascii(&clean(reply))),
            );
        }
        if let Some(t) = r.last_attempt {
            field(&mut fields, "Last-Attempt-Date", &rfc5322_date(t));
        }
        if r.action == Action::Delayed
            && let Some(t) = r.will_retry_until
        {
            field(&mut fields, "Will-Retry-Until", &rfc5322_date(t));
        }
    }
    fields
}

/// The `Final-Recipient:` value: `rfc822; addr`, or for a non-ASCII
/// address `utf-8; ` and its utf-8-addr-xtext form (RFC 6533 §3): each
/// character outside QCHAR (printable ASCII but `\`, `+` and `=`) as
/// `\x{HEX}`, upper case, at least two digits.
fn typed_address(address: &str) -> String {
    let address = clean(address);
    if address.is_ascii() {
        return format!("rfc822; {address}");
    }
    let mut xtext = String::with_capacity(address.len() * 2);
    for c in address.chars() {
        if matches!(c, '!'..='~') && !matches!(c, '\\' | '+' | '=') {
            xtext.push(c);
        } else {
            xtext.push_str(&format!("\\x{{{:02X}}}", u32::from(c)));
        }
    }
    format!("utf-8; {xtext}")
}

/// The recipient's status if it is an enhanced status code (RFC 3463 §2:
/// class 2, 4 or 5, then two numbers of up to three digits), else the
/// generic one for its action.
fn status(r: &DsnRecipient) -> &str {
    let code = r.status.trim();
    let number = |n: &str| (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = code.split('.').collect();
    let valid = matches!(
        parts.as_slice(),
        [class, subject, detail]
            if matches!(*class, "2" | "4" | "5") && number(subject) && number(detail)
    );
    match (valid, r.action) {
        (true, _) => code,
        (false, Action::Failed) => "5.0.0",
        (false, Action::Delayed) => "4.0.0",
    }
}

/// The header of the original as part 3 carries it: CRLF line ends, even
/// on the last line, and no line over 998 octets (a longer one is folded).
fn returned_header(section: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(section.len() + 2);
    let section = section.strip_suffix(b"\n").unwrap_or(section);
    if section.is_empty() {
        return out;
    }
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // A CR or NUL inside a line would break the CRLF structure or the
        // 8bit rules (RFC 2045 §2.8).
        let line: Vec<u8> = line
            .iter()
            .map(|&b| if b == b'\r' || b == 0 { b' ' } else { b })
            .collect();
        // Only a lone CR can make one; an empty line would end the header.
        if !line.is_empty() {
            fold(&mut out, &line, MAX_LINE);
        }
    }
    out
}

/// The first Message-ID of the original header, if it holds a msg-id we can
/// repeat safely: `<…>`, no white space or controls, short enough for a line.
fn original_message_id(section: &[u8]) -> Option<String> {
    let mut value: Option<Vec<u8>> = None;
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let continued = matches!(line.first(), Some(b' ' | b'\t'));
        match value.as_mut() {
            // Unfolding (RFC 5322 §2.2.3): the field goes on.
            Some(v) if continued => v.extend_from_slice(line),
            Some(_) => break,
            None if continued => {}
            None => {
                if let Some(colon) = line.iter().position(|&b| b == b':')
                    && line[..colon]
                        .trim_ascii()
                        .eq_ignore_ascii_case(b"message-id")
                {
                    value = Some(line[colon + 1..].to_vec());
                }
            }
        }
    }
    let value = value?;
    let start = value.iter().position(|&b| b == b'<')?;
    let len = value[start..].iter().position(|&b| b == b'>')?;
    let id = std::str::from_utf8(&value[start..=start + len]).ok()?;
    let inner = &id[1..id.len() - 1];
    let safe = !inner.is_empty()
        && id.len() <= MAX_MSG_ID
        && !inner
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<');
    safe.then(|| id.to_owned())
}

/// Appends the header field `name: value`, folded.
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    fold(out, format!("{name}: {value}").as_bytes(), FOLD_AT);
}

/// Appends `line` with CRLF, folded (RFC 5322 §2.2.3) so that lines keep
/// within `soft` octets where white space allows, and always within
/// `MAX_LINE`. A fold goes before a space or tab, which then starts the
/// next line, so unfolding gives back the line exactly. Only where there is
/// no white space within `MAX_LINE` is the line cut and CRLF and a space
/// inserted: that adds a space, but keeps the line legal.
fn fold(out: &mut Vec<u8>, line: &[u8], soft: usize) {
    let mut rest = line;
    // Octets already on the current output line: the space after a cut.
    let mut lead = 0;
    loop {
        if lead + rest.len() <= soft {
            out.extend_from_slice(rest);
            out.extend_from_slice(b"\r\n");
            return;
        }
        // Candidates: before a white space that follows a non-white one, so
        // that no line is white space only.
        let mut seen_text = false;
        let mut last_soft = None;
        let mut first_hard = None;
        for (i, &b) in rest.iter().enumerate().take(MAX_LINE - lead + 1) {
            if b == b' ' || b == b'\t' {
                if seen_text {
                    if lead + i <= soft {
                        last_soft = Some(i);
                    } else if first_hard.is_none() {
                        first_hard = Some(i);
                    }
                }
            } else {
                seen_text = true;
            }
        }
        if let Some(i) = last_soft.or(first_hard) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[i..];
            lead = 0;
            continue;
        }
        if lead + rest.len() <= MAX_LINE {
            out.extend_from_slice(rest);
            out.extend_from_slice(b"\r\n");
            return;
        }
        let mut cut = MAX_LINE - lead;
        // Not inside a UTF-8 sequence (continuation octets are 10xxxxxx).
        let mut back = 0;
        while back < 3 && cut > 1 && rest[cut] & 0xC0 == 0x80 {
            cut -= 1;
            back += 1;
        }
        out.extend_from_slice(&rest[..cut]);
        out.extend_from_slice(b"\r\n ");
        rest = &rest[cut..];
        lead = 1;
    }
}

/// `s` with each run of white space and controls (CR and LF among them: no
/// field of our own may start inside a value) as one space, and none at
/// either end. So a multi-line reply becomes one line.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// `s` with each non-ASCII character as `?`, for the ASCII-only report.
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// The RFC 5322 date of `t`, in UTC ("+0000"), as reception writes it.
fn rfc5322_date(t: SystemTime) -> String {
    // A clock before 1970, or after 9999, is not worth a panic.
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|d| d.format(&Rfc2822).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".to_owned())
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MessagePart, MimeHeaders};
    use time::macros::datetime;

    use super::*;

    const ORIGINAL: &[u8] = b"From: News <news@shop.example>\r\n\
        To: a@b.example\r\n\
        Subject: December offers\r\n\
        Message-ID: <orig.1@shop.example>\r\n\
        \r\n\
        SECRET BODY of a regulated sender\r\n";

    fn at(t: time::OffsetDateTime) -> SystemTime {
        t.into()
    }

    fn failed(address: &str) -> DsnRecipient {
        DsnRecipient {
            address: address.to_owned(),
            action: Action::Failed,
            status: "5.1.1".to_owned(),
            remote_mta: Some("mx.b.example".to_owned()),
            diagnostic: Some("550 5.1.1 <a@b.example>: no such user".to_owned()),
            last_attempt: Some(at(datetime!(2026-12-01 09:59:58 UTC))),
            will_retry_until: None,
        }
    }

    fn delayed(address: &str) -> DsnRecipient {
        DsnRecipient {
            address: address.to_owned(),
            action: Action::Delayed,
            status: "4.4.7".to_owned(),
            remote_mta: Some("mx.c.example".to_owned()),
            diagnostic: Some("451 4.7.1 try again later".to_owned()),
            last_attempt: Some(at(datetime!(2026-12-01 09:00 UTC))),
            will_retry_until: Some(at(datetime!(2026-12-06 08:00 UTC))),
        }
    }

    fn input<'a>(recipients: &'a [DsnRecipient], original: &'a [u8]) -> DsnInput<'a> {
        DsnInput {
            reporting_mta: "mta1.example.net",
            queue_id: "ABC123",
            original_sender: "bounces@shop.example",
            arrival: at(datetime!(2026-12-01 08:00 UTC)),
            recipients,
            original,
            now: at(datetime!(2026-12-01 10:00 UTC)),
            message_id: "<20261201.ABC123.dsn@mta1.example.net>",
            boundary: "=_dsn_0123456789abcdef",
        }
    }

    /// The DSN's parts, after checking the top-level structure.
    fn report_parts<'x>(message: &'x mail_parser::Message<'x>) -> Vec<&'x MessagePart<'x>> {
        let ct = message.content_type().expect("Content-Type");
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(ct.attribute("boundary"), Some("=_dsn_0123456789abcdef"));
        let ids = message.parts[0].sub_parts().expect("multipart");
        ids.iter().map(|&id| &message.parts[id as usize]).collect()
    }

    fn content_type(part: &MessagePart<'_>) -> String {
        let ct = part.content_type().expect("part Content-Type");
        format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
    }

    fn text(part: &MessagePart<'_>) -> String {
        String::from_utf8(part.contents().to_vec()).expect("UTF-8 part")
    }

    /// Every line ends with CRLF, and none is over 998 octets.
    fn assert_lines_ok(message: &[u8]) {
        assert!(message.ends_with(b"\r\n"));
        for (i, &b) in message.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(message.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert_eq!(message[i - 1], b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
        for line in message.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "line of {} octets", line.len() - 1);
        }
    }

    /// The unfolded value of `name` in a delivery-status field group.
    fn unfolded(fields: &str, name: &str) -> Option<String> {
        let start = fields.find(&format!("\r\n{name}:"))? + name.len() + 3;
        let rest = &fields[start..];
        let mut end = 0;
        while let Some(i) = rest[end..].find("\r\n") {
            end += i;
            if !rest[end + 2..].starts_with([' ', '\t']) {
                break;
            }
            end += 2;
        }
        let value = rest[..end].replace("\r\n", "");
        Some(value.strip_prefix(' ').unwrap_or(&value).to_owned())
    }

    #[test]
    fn a_failure_is_a_multipart_report_in_three_parts() {
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");

        assert_eq!(
            message.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
        let from = message.from().and_then(|a| a.first()).expect("From");
        assert_eq!(from.address(), Some("MAILER-DAEMON@mta1.example.net"));
        assert_eq!(from.name(), Some("Mail Delivery System"));
        let to = message.to().and_then(|a| a.first()).expect("To");
        assert_eq!(to.address(), Some("bounces@shop.example"));
        assert_eq!(
            message.message_id(),
            Some("20261201.ABC123.dsn@mta1.example.net")
        );
        assert_eq!(
            message.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(
            message.header_raw("MIME-Version").map(str::trim),
            Some("1.0")
        );
        let date = message.date().expect("Date");
        assert_eq!(
            (date.year, date.month, date.day, date.hour, date.tz_hour),
            (2026, 12, 1, 10, 0)
        );
        let head = String::from_utf8_lossy(header_section(&dsn)).into_owned();
        assert!(head.contains("\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"));
        // Nothing in it is 8-bit, so it says nothing of it.
        assert!(!head.contains("Content-Transfer-Encoding"));

        let parts = report_parts(&message);
        assert_eq!(parts.len(), 3);
        assert_eq!(content_type(parts[0]), "text/plain");
        assert_eq!(
            parts[0].content_type().and_then(|c| c.attribute("charset")),
            Some("utf-8")
        );
        assert_eq!(content_type(parts[1]), "message/delivery-status");
        assert_eq!(content_type(parts[2]), "text/rfc822-headers");

        let human = text(parts[0]);
        assert!(human.contains("ABC123"), "{human}");
        assert!(human.contains("<a@b.example>"), "{human}");
        assert!(
            human.contains("mx.b.example said: 550 5.1.1 <a@b.example>: no such user"),
            "{human}"
        );

        let report = text(parts[1]);
        assert!(report.starts_with(
            "Reporting-MTA: dns; mta1.example.net\r\n\
             Arrival-Date: Tue, 01 Dec 2026 08:00:00 +0000\r\n\
             \r\n"
        ));
        assert!(report.ends_with(
            "\r\n\r\n\
             Final-Recipient: rfc822; a@b.example\r\n\
             Action: failed\r\n\
             Status: 5.1.1\r\n\
             Remote-MTA: dns; mx.b.example\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 <a@b.example>: no such user\r\n\
             Last-Attempt-Date: Tue, 01 Dec 2026 09:59:58 +0000\r\n"
        ));
        assert!(!report.contains("Will-Retry-Until"));
        assert!(!report.contains("Original-Envelope-Id"));
    }

    #[test]
    fn the_original_header_is_returned_without_its_body() {
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert!(!dsn.windows(6).any(|w| w == b"SECRET"));
        let message = MessageParser::default().parse(&dsn).expect("parses");
        let returned = text(report_parts(&message)[2]);
        assert_eq!(
            returned,
            "From: News <news@shop.example>\r\n\
             To: a@b.example\r\n\
             Subject: December offers\r\n\
             Message-ID: <orig.1@shop.example>\r\n"
        );
    }

    #[test]
    fn the_notification_is_threaded_with_the_original() {
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, ORIGINAL));
        let message = MessageParser::default().parse(&dsn).expect("parses");
        assert_eq!(message.in_reply_to().as_text(), Some("orig.1@shop.example"));
        assert_eq!(message.references().as_text(), Some("orig.1@shop.example"));

        // Found whatever its case, and when folded.
        let folded = b"Subject: x\r\nmessage-id:\r\n <folded.2@shop.example>\r\n\r\nbody\r\n";
        let dsn = build(&input(&recipients, folded));
        let head = String::from_utf8_lossy(header_section(&dsn)).into_owned();
        assert!(head.contains("\r\nIn-Reply-To: <folded.2@shop.example>\r\n"));
        assert!(head.contains("\r\nReferences: <folded.2@shop.example>\r\n"));
    }

    #[test]
    fn without_a_usable_message_id_there_is_no_in_reply_to() {
        let recipients = [failed("a@b.example")];
        for original in [
            &b"Subject: none\r\n\r\nbody\r\n"[..],
            b"Message-ID: not an id\r\n\r\n",
            b"Message-ID: <with space@x>\r\n\r\n",
            b"Message-ID: <>\r\n\r\n",
            b"X-Message-ID: <other@x>\r\n\r\n",
        ] {
            let dsn = build(&input(&recipients, original));
            let head = String::from_utf8_lossy(header_section(&dsn)).into_owned();
            assert!(!head.contains("In-Reply-To"), "{head}");
            assert!(!head.contains("References"), "{head}");
        }
    }

    #[test]
    fn a_delay_says_until_when_we_retry() {
        let recipients = [delayed("c@c.example")];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        assert_eq!(
            message.subject(),
            Some("Delayed Mail (still being retried)")
        );
        let parts = report_parts(&message);
        assert_eq!(parts.len(), 3);
        let human = text(parts[0]);
        assert!(
            human.contains("until Sun, 06 Dec 2026 08:00:00 +0000"),
            "{human}"
        );
        assert!(human.contains("451 4.7.1 try again later"), "{human}");
        let report = text(parts[1]);
        assert!(report.contains(
            "\r\n\r\n\
             Final-Recipient: rfc822; c@c.example\r\n\
             Action: delayed\r\n\
             Status: 4.4.7\r\n\
             Remote-MTA: dns; mx.c.example\r\n\
             Diagnostic-Code: smtp; 451 4.7.1 try again later\r\n\
             Last-Attempt-Date: Tue, 01 Dec 2026 09:00:00 +0000\r\n\
             Will-Retry-Until: Sun, 06 Dec 2026 08:00:00 +0000\r\n"
        ));
    }

    #[test]
    fn one_failure_among_delays_makes_it_a_bounce() {
        let mut gone = failed("a@b.example");
        // Not reported for a failure, even when the caller has it.
        gone.will_retry_until = Some(at(datetime!(2026-12-06 08:00 UTC)));
        let recipients = [delayed("c@c.example"), gone, delayed("d@c.example")];
        let dsn = build(&input(&recipients, ORIGINAL));
        let message = MessageParser::default().parse(&dsn).expect("parses");
        assert_eq!(
            message.subject(),
            Some("Undelivered Mail Returned to Sender")
        );
        let report = text(report_parts(&message)[1]);
        let groups: Vec<&str> = report.split("\r\n\r\n").collect();
        assert_eq!(groups.len(), 4, "{report}");
        assert!(groups[1].starts_with("Final-Recipient: rfc822; c@c.example\r\nAction: delayed"));
        assert!(groups[2].starts_with("Final-Recipient: rfc822; a@b.example\r\nAction: failed"));
        assert!(!groups[2].contains("Will-Retry-Until"));
        assert!(groups[3].starts_with("Final-Recipient: rfc822; d@c.example\r\nAction: delayed"));
        assert!(groups[3].contains("Will-Retry-Until"));
    }

    #[test]
    fn optional_fields_are_left_out_when_unknown() {
        let recipient = DsnRecipient {
            address: "a@b.example".to_owned(),
            action: Action::Delayed,
            status: "4.4.1".to_owned(),
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        };
        let recipients = [recipient];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        let parts = report_parts(&message);
        let report = text(parts[1]);
        assert!(report.ends_with(
            "\r\n\r\nFinal-Recipient: rfc822; a@b.example\r\nAction: delayed\r\nStatus: 4.4.1\r\n"
        ));
        let human = text(parts[0]);
        assert!(human.contains("(status 4.4.1)"), "{human}");
        assert!(human.contains("for a while"), "{human}");
    }

    #[test]
    fn a_status_that_is_not_an_enhanced_code_becomes_the_generic_one() {
        for (bad, action, expected) in [
            ("", Action::Failed, "5.0.0"),
            ("550", Action::Failed, "5.0.0"),
            ("5.1.1.1", Action::Failed, "5.0.0"),
            ("3.1.1", Action::Failed, "5.0.0"),
            ("4.1234.1", Action::Delayed, "4.0.0"),
            ("4.4.7\r\nX: y", Action::Delayed, "4.0.0"),
            (" 5.7.26 ", Action::Failed, "5.7.26"),
        ] {
            let mut r = failed("a@b.example");
            r.action = action;
            r.status = bad.to_owned();
            assert_eq!(status(&r), expected, "{bad:?}");
        }
    }

    #[test]
    fn a_3000_character_reply_is_folded_within_998_octets() {
        let words: Vec<String> = (0..300).map(|i| format!("word{i:05}")).collect();
        let long = format!("550 5.7.1 {}", words.join(" "));
        assert!(long.len() > 3000);
        let unbroken = format!("550 5.7.1 {}", "x".repeat(3000));
        for reply in [long, unbroken] {
            let mut r = failed("a@b.example");
            r.diagnostic = Some(reply.clone());
            let recipients = [r];
            let dsn = build(&input(&recipients, ORIGINAL));
            assert_lines_ok(&dsn);
            let message = MessageParser::default().parse(&dsn).expect("parses");
            let parts = report_parts(&message);
            assert_eq!(parts.len(), 3);
            let report = text(parts[1]);
            let diagnostic = unfolded(&report, "Diagnostic-Code").expect("Diagnostic-Code");
            if reply.contains("word") {
                // Folded at white space: unfolding gives it back exactly.
                assert_eq!(diagnostic, format!("smtp; {reply}"));
            } else {
                // Cut where it had to be: only spaces were added.
                assert_eq!(
                    diagnostic.replace(' ', ""),
                    format!("smtp;{reply}").replace(' ', "")
                );
            }
            // The field after it is still its own.
            assert!(report.contains("\r\nLast-Attempt-Date: "));
            assert!(text(parts[0]).contains("xxxxxxxxxx") || reply.contains("word"));
        }
    }

    #[test]
    fn a_reply_cannot_add_fields() {
        let mut r = failed("a@b.example");
        r.diagnostic = Some("550 no\r\nAction: delivered\nBcc: x@evil.example".to_owned());
        r.remote_mta = Some("mx\r\nX: y".to_owned());
        let recipients = [r];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert_lines_ok(&dsn);
        let all = String::from_utf8_lossy(&dsn).into_owned();
        assert!(!all.contains("\r\nAction: delivered"));
        assert!(!all.contains("\r\nBcc:"));
        assert!(!all.contains("\r\nX: y"));
        assert!(
            all.contains("Diagnostic-Code: smtp; 550 no Action: delivered Bcc: x@evil.example\r\n")
        );
    }

    #[test]
    fn a_utf8_address_gets_the_utf8_address_type_in_xtext() {
        let mut r = failed("jürgen+x@bücher.example");
        r.diagnostic = Some("550 5.1.1 Benutzer unbekannt: jürgen".to_owned());
        let recipients = [r];
        let dsn = build(&input(&recipients, ORIGINAL));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        let parts = report_parts(&message);
        // The explanation carries the address and the reply as they are.
        assert_eq!(
            parts[0]
                .headers()
                .iter()
                .find(|h| h.name() == "Content-Transfer-Encoding")
                .and_then(|h| h.value().as_text()),
            Some("8bit")
        );
        let human = text(parts[0]);
        assert!(human.contains("<jürgen+x@bücher.example>"), "{human}");
        assert!(human.contains("Benutzer unbekannt: jürgen"), "{human}");
        // The report stays ASCII (RFC 3464; RFC 6533 §3 utf-8-addr-xtext).
        let report = text(parts[1]);
        assert!(report.is_ascii());
        assert!(
            report.contains(
                "\r\nFinal-Recipient: utf-8; j\\x{FC}rgen\\x{2B}x@b\\x{FC}cher.example\r\n"
            ),
            "{report}"
        );
        assert!(
            report.contains("\r\nDiagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: j?rgen\r\n")
        );
        let head = String::from_utf8_lossy(header_section(&dsn)).into_owned();
        assert!(head.contains("\r\nContent-Transfer-Encoding: 8bit\r\n"));
    }

    #[test]
    fn xtext_escapes_what_qchar_excludes() {
        assert_eq!(
            typed_address("a+b=c\\d@x.example"),
            "rfc822; a+b=c\\d@x.example"
        );
        assert_eq!(
            typed_address("用户@例子.example"),
            "utf-8; \\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}.example"
        );
        assert_eq!(
            typed_address("é=+\\@x"),
            "utf-8; \\x{E9}\\x{3D}\\x{2B}\\x{5C}@x"
        );
        assert_eq!(typed_address("😀@x"), "utf-8; \\x{1F600}@x");
    }

    #[test]
    fn a_utf8_original_header_is_returned_as_8bit() {
        let original = "From: Jürgen <j@x.example>\r\nSubject: Grüße\r\n\r\nbody\r\n";
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, original.as_bytes()));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        let parts = report_parts(&message);
        assert_eq!(content_type(parts[2]), "text/rfc822-headers");
        assert_eq!(
            parts[2].content_type().and_then(|c| c.attribute("charset")),
            Some("utf-8")
        );
        assert_eq!(
            text(parts[2]),
            "From: Jürgen <j@x.example>\r\nSubject: Grüße\r\n"
        );
        // The explanation itself is ASCII.
        let raw = String::from_utf8_lossy(&dsn).into_owned();
        assert!(raw.contains(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n"
        ));
    }

    #[test]
    fn an_original_without_body_or_at_all_still_makes_a_report() {
        let recipients = [failed("a@b.example")];
        // All header: no empty line, no final CRLF.
        let dsn = build(&input(&recipients, b"Subject: x\r\nMessage-ID: <h@x>"));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        assert_eq!(message.in_reply_to().as_text(), Some("h@x"));
        let parts = report_parts(&message);
        assert_eq!(parts.len(), 3);
        assert_eq!(text(parts[2]), "Subject: x\r\nMessage-ID: <h@x>\r\n");

        for original in [&b""[..], b"\r\n", b"\r\nonly a body\r\n", b"\r"] {
            let dsn = build(&input(&recipients, original));
            assert_lines_ok(&dsn);
            let message = MessageParser::default().parse(&dsn).expect("parses");
            let parts = report_parts(&message);
            assert_eq!(parts.len(), 3);
            assert_eq!(content_type(parts[2]), "text/rfc822-headers");
            assert_eq!(text(parts[2]), "", "{original:?}");
            assert!(!String::from_utf8_lossy(&dsn).contains("only a body"));
        }
    }

    #[test]
    fn an_original_with_bare_lf_keeps_its_body_and_gets_crlf() {
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, b"Subject: x\nTo: y\n\nSECRET\n"));
        assert_lines_ok(&dsn);
        assert!(!dsn.windows(6).any(|w| w == b"SECRET"));
        let message = MessageParser::default().parse(&dsn).expect("parses");
        assert_eq!(text(report_parts(&message)[2]), "Subject: x\r\nTo: y\r\n");
    }

    #[test]
    fn an_overlong_original_header_line_is_folded() {
        let long = format!(
            "X-Long: {}\r\nX-Word: {}\r\n\r\nbody\r\n",
            "a ".repeat(1500),
            "b".repeat(2500)
        );
        let recipients = [failed("a@b.example")];
        let dsn = build(&input(&recipients, long.as_bytes()));
        assert_lines_ok(&dsn);
        let message = MessageParser::default().parse(&dsn).expect("parses");
        let returned = text(report_parts(&message)[2]);
        // Folded at white space: unfolding gives back the field exactly.
        let x_long = unfolded(&format!("\r\n{returned}"), "X-Long").expect("X-Long");
        assert_eq!(x_long, "a ".repeat(1500));
        let x_word = unfolded(&format!("\r\n{returned}"), "X-Word").expect("X-Word");
        assert_eq!(x_word.replace(' ', ""), "b".repeat(2500));
    }

    #[test]
    fn header_section_ends_at_the_first_empty_line() {
        assert_eq!(
            header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore"),
            b"A: 1\r\nB: 2\r\n"
        );
        assert_eq!(
            header_section(b"A: 1\r\n folded\r\n\r\n"),
            b"A: 1\r\n folded\r\n"
        );
        // No empty line: all header.
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"A: 1"), b"A: 1");
        // Nothing, or no header at all.
        assert_eq!(header_section(b""), b"");
        assert_eq!(header_section(b"\r\n"), b"");
        assert_eq!(header_section(b"\r\nbody\r\n"), b"");
        // Bare LF line ends, even mixed.
        assert_eq!(header_section(b"A: 1\nB: 2\n\nbody"), b"A: 1\nB: 2\n");
        assert_eq!(header_section(b"A: 1\r\n\nbody"), b"A: 1\r\n");
        // A line of white space is not empty.
        assert_eq!(header_section(b"A: 1\r\n \r\n\r\nb"), b"A: 1\r\n \r\n");
    }

    #[test]
    fn fold_keeps_within_the_limit_even_with_white_space_only() {
        let mut out = Vec::new();
        fold(
            &mut out,
            format!("Name:{}", " ".repeat(2500)).as_bytes(),
            MAX_LINE,
        );
        assert_lines_ok(&out);
    }

    #[test]
    fn fold_never_exceeds_the_limit_and_unfolds_back() {
        for line in [
            "Name: short".to_owned(),
            format!("Name: {}", "abc ".repeat(400)),
            format!("Name: {}", "é".repeat(1200)),
            format!("Name: {} tail", "z".repeat(997)),
        ] {
            let mut out = Vec::new();
            fold(&mut out, line.as_bytes(), FOLD_AT);
            assert_lines_ok(&out);
            let text = String::from_utf8(out).expect("cuts keep UTF-8 whole");
            let back = text.strip_suffix("\r\n").unwrap().replace("\r\n", "");
            if line.contains("é") || line.contains("zzz") {
                assert_eq!(back.replace(' ', ""), line.replace(' ', ""));
            } else {
                assert_eq!(back, line);
            }
        }
    }
}
