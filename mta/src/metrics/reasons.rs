//! Why reception refused something: a small fixed set of labels for
//! `mta_rejections_total`, so the label never carries reply text.
//!
//! Refusals decided outside the session (at connect, and after the content
//! arrived: policy, signing, DMARC, storage) name their reason where they
//! are made. Refusals by the session machine are known only by their
//! command and reply; [`classify`] reads them by the RFC 3463 enhanced
//! status code, which each of the session's refusals sets to say exactly
//! this, and the command where one code serves two purposes.

use crate::smtp::{Reply, Status};

/// One reason a command, a connection or a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The client's address is outside `allowed_networks` (554 5.7.1).
    NetworkNotAllowed,
    /// `max_connections` or `max_connections_per_ip` reached (421 4.7.0).
    ConnectionLimit,
    /// MAIL without AUTH from outside `relay_networks` (530 5.7.0).
    AuthRequired,
    /// AUTH before STARTTLS (538 5.7.11).
    TlsRequired,
    /// Failed credentials, a refused authorization identity, or an address
    /// or user name locked out after failures (535 5.7.8, 421 4.7.0,
    /// 454 4.7.0).
    AuthFailed,
    /// The password check itself failed (454 4.7.0).
    AuthTempFail,
    /// STARTTLS where TLS is not offered (454 4.7.0).
    TlsUnavailable,
    /// The MAIL FROM domain (or the From: domain) is not the tenant's (5.7.1).
    SenderNotAllowed,
    /// SPF of our egress IPs fails for the sender's domain under enforce
    /// (5.7.23, 5.7.24, 4.7.24).
    Spf,
    /// The message would fail DMARC at a p=reject domain under enforce.
    Dmarc,
    /// No DKIM key could sign and `[dkim] unsigned = "reject"`.
    Unsigned,
    /// Over `max_message_size` (552 5.3.4).
    Size,
    /// Free space under the reserve, or the store failed (452 4.3.1, 451 4.3.0).
    Storage,
    /// A temporary failure of ours, e.g. signing failed (451 4.3.0).
    Internal,
    /// More than `max_recipients` (452 4.5.3).
    TooManyRecipients,
    /// A recipient we do not take, e.g. an address literal (550 5.1.2).
    BadRecipient,
    /// The content is malformed: bare CR/LF, overlong lines, bad headers
    /// (554 5.5.2, 5.6.x at DATA/BDAT).
    Content,
    /// A malformed or out-of-sequence command, an unknown verb or
    /// parameter, SMTPUTF8 missing (5.5.x, 5.6.7, 5.0.0).
    Syntax,
    /// `max_errors` protocol errors: the session is closed (421 4.7.0).
    TooManyErrors,
    /// A command or the content did not arrive in time (421 4.4.2).
    Timeout,
    /// The daemon is shutting down (421 4.3.2).
    Shutdown,
    /// Anything else.
    Other,
}

impl RejectReason {
    /// Every reason, in the order of the documentation.
    pub const ALL: [RejectReason; 22] = [
        RejectReason::NetworkNotAllowed,
        RejectReason::ConnectionLimit,
        RejectReason::AuthRequired,
        RejectReason::TlsRequired,
        RejectReason::AuthFailed,
        RejectReason::AuthTempFail,
        RejectReason::TlsUnavailable,
        RejectReason::SenderNotAllowed,
        RejectReason::Spf,
        RejectReason::Dmarc,
        RejectReason::Unsigned,
        RejectReason::Size,
        RejectReason::Storage,
        RejectReason::Internal,
        RejectReason::TooManyRecipients,
        RejectReason::BadRecipient,
        RejectReason::Content,
        RejectReason::Syntax,
        RejectReason::TooManyErrors,
        RejectReason::Timeout,
        RejectReason::Shutdown,
        RejectReason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NetworkNotAllowed => "network_not_allowed",
            RejectReason::ConnectionLimit => "connection_limit",
            RejectReason::AuthRequired => "auth_required",
            RejectReason::TlsRequired => "tls_required",
            RejectReason::AuthFailed => "auth_failed",
            RejectReason::AuthTempFail => "auth_tempfail",
            RejectReason::TlsUnavailable => "tls_unavailable",
            RejectReason::SenderNotAllowed => "sender_not_allowed",
            RejectReason::Spf => "spf",
            RejectReason::Dmarc => "dmarc",
            RejectReason::Unsigned => "unsigned",
            RejectReason::Size => "size",
            RejectReason::Storage => "storage",
            RejectReason::Internal => "internal",
            RejectReason::TooManyRecipients => "too_many_recipients",
            RejectReason::BadRecipient => "bad_recipient",
            RejectReason::Content => "content",
            RejectReason::Syntax => "syntax",
            RejectReason::TooManyErrors => "too_many_errors",
            RejectReason::Timeout => "timeout",
            RejectReason::Shutdown => "shutdown",
            RejectReason::Other => "other",
        }
    }
}

/// The reason of a refusal the session machine made, from the command it
/// answered and its reply.
pub fn classify(command: &str, reply: &Reply) -> RejectReason {
    let Some(Status(_, subject, detail)) = reply.status else {
        return RejectReason::Other;
    };
    let content = matches!(command, "DATA" | "BDAT");
    match (reply.code, subject, detail) {
        (530, 7, 0) => RejectReason::AuthRequired,
        (538, 7, 11) => RejectReason::TlsRequired,
        (_, 7, 23 | 24) => RejectReason::Spf,
        (_, 7, 1) if command == "MAIL" => RejectReason::SenderNotAllowed,
        (_, 7, 8) => RejectReason::AuthFailed,
        (454, 7, 0) if command == "STARTTLS" => RejectReason::TlsUnavailable,
        (454, 7, 0) if command == "AUTH" => RejectReason::AuthTempFail,
        (421, 7, 0) => RejectReason::TooManyErrors,
        (_, 3, 4) => RejectReason::Size,
        (_, 3, 1) => RejectReason::Storage,
        (_, 4, 2) => RejectReason::Timeout,
        (_, 3, 2) => RejectReason::Shutdown,
        (_, 5, 3) => RejectReason::TooManyRecipients,
        (_, 1, _) => RejectReason::BadRecipient,
        (_, 5, 2) | (_, 6, _) if content && !(subject == 6 && detail == 7) => RejectReason::Content,
        (_, 5, _) | (_, 6, 7) | (_, 0, 0) => RejectReason::Syntax,
        _ => RejectReason::Other,
    }
}

/// The label of an AUTH failure's reason (`mta_auth_failures_total`).
pub fn auth_failure_label(reason: &str) -> &'static str {
    match reason {
        "invalid credentials" => "invalid_credentials",
        "authorization identity refused" => "authzid_refused",
        "address locked out" => "locked_out",
        "user locked out" => "user_locked_out",
        _ => "other",
    }
}

/// Every AUTH failure label.
pub const AUTH_FAILURE_LABELS: [&str; 5] = [
    "invalid_credentials",
    "authzid_refused",
    "locked_out",
    "user_locked_out",
    "other",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::replies;

    fn r(code: u16, s: (u8, u16, u16)) -> Reply {
        Reply::new(code, Status(s.0, s.1, s.2), "text")
    }

    #[test]
    fn session_refusals_are_classified_by_their_status() {
        use RejectReason::*;
        let cases = [
            ("MAIL", r(530, (5, 7, 0)), AuthRequired),
            ("AUTH", r(538, (5, 7, 11)), TlsRequired),
            ("MAIL", r(550, (5, 7, 23)), Spf),
            ("MAIL", r(550, (5, 7, 24)), Spf),
            ("MAIL", r(451, (4, 7, 24)), Spf),
            ("MAIL", r(550, (5, 7, 1)), SenderNotAllowed),
            ("STARTTLS", r(454, (4, 7, 0)), TlsUnavailable),
            ("AUTH", r(454, (4, 7, 0)), AuthTempFail),
            ("RCPT", replies::too_many_errors(), TooManyErrors),
            ("MAIL", replies::message_too_big(10), Size),
            ("DATA", replies::message_too_big(10), Size),
            ("MAIL", replies::insufficient_storage(), Storage),
            ("MAIL", r(452, (4, 3, 1)), Storage),
            ("TIMEOUT", r(421, (4, 4, 2)), Timeout),
            ("DATA", r(421, (4, 4, 2)), Timeout),
            ("TIMEOUT", r(421, (4, 3, 2)), Shutdown),
            ("RCPT", r(452, (4, 5, 3)), TooManyRecipients),
            ("RCPT", r(550, (5, 1, 2)), BadRecipient),
            ("DATA", r(554, (5, 5, 2)), Content),
            ("DATA", r(554, (5, 6, 0)), Content),
            ("BDAT", r(554, (5, 6, 0)), Content),
            ("DATA", r(554, (5, 5, 1)), Syntax),
            ("UNKNOWN", replies::line_too_long(), Syntax),
            ("UNKNOWN", r(500, (5, 5, 2)), Syntax),
            ("MAIL", replies::bad_sequence("x"), Syntax),
            ("MAIL", replies::syntax("x"), Syntax),
            ("MAIL", r(553, (5, 6, 7)), Syntax),
            ("RCPT", r(553, (5, 6, 7)), Syntax),
            ("AUTH", r(501, (5, 0, 0)), Syntax),
            ("AUTH", r(502, (5, 5, 1)), Syntax),
            ("MAIL", Reply::plain(554, "no status"), Other),
            ("MAIL", r(550, (5, 2, 0)), Other),
        ];
        for (command, reply, want) in cases {
            assert_eq!(classify(command, &reply), want, "{command} {reply:?}");
        }
    }

    #[test]
    fn labels_are_unique_and_auth_reasons_map() {
        let mut seen = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            assert!(seen.insert(r.as_str()), "{}", r.as_str());
        }
        assert_eq!(
            auth_failure_label("invalid credentials"),
            "invalid_credentials"
        );
        assert_eq!(auth_failure_label("address locked out"), "locked_out");
        assert_eq!(auth_failure_label("something new"), "other");
    }
}
