//! What an attempt can end in, typed by scope, and the retry schedule.
//!
//! A failure's scope says how far it reaches, so retry policy reads a type,
//! not a string: a refused recipient never fails the others, a refused
//! message fails its accepted recipients on that connection, a host failure
//! sends us to the next MX host, and a session failure ends the connection.

use std::time::Duration;

use crate::smtp::{Reply, Status};

/// How far a failure reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One RCPT was refused.
    Recipient,
    /// MAIL, DATA or the end of the content was refused: every recipient
    /// of this transaction.
    Message,
    /// One MX host could not be used (connect, greeting, EHLO, TLS): the
    /// next host is tried.
    Host,
    /// The connection broke or the server closed it (421) mid-session.
    Session,
    /// The destination could not be routed (DNS).
    Destination,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Recipient => "recipient",
            Scope::Message => "message",
            Scope::Host => "host",
            Scope::Session => "session",
            Scope::Destination => "destination",
        }
    }
}

/// A failed step, with the reply that says why (the remote one, or one we
/// make for local failures such as a refused connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub scope: Scope,
    pub reply: Reply,
}

impl Failure {
    pub fn new(scope: Scope, reply: Reply) -> Failure {
        Failure { scope, reply }
    }

    /// A local, temporary failure: `451 <status> <text>`.
    pub fn temporary(scope: Scope, status: Status, text: impl Into<String>) -> Failure {
        Failure::new(scope, Reply::new(451, status, text.into()))
    }

    /// A local, permanent failure: `550 <status> <text>`.
    pub fn permanent(scope: Scope, code: u16, status: Status, text: impl Into<String>) -> Failure {
        Failure::new(scope, Reply::new(code, status, text.into()))
    }

    /// 5xx: retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        self.reply.code >= 500
    }
}

/// The result of one attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered(Reply),
    Failed(Failure),
}

/// When to try again after the `attempts`-th failed attempt (1-based):
/// `initial · 2^(attempts-1)`, at most `max`, minus up to 10 % jitter from
/// `jitter` (a number in [0, 1)) so that recipients deferred together do
/// not come back together.
pub fn backoff(initial: Duration, max: Duration, attempts: u32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_bounded_jitter() {
        let (i, m) = (Duration::from_secs(300), Duration::from_secs(4 * 3600));
        assert_eq!(backoff(i, m, 1, 0.0), Duration::from_secs(300));
        assert_eq!(backoff(i, m, 2, 0.0), Duration::from_secs(600));
        assert_eq!(backoff(i, m, 3, 0.0), Duration::from_secs(1200));
        assert_eq!(backoff(i, m, 7, 0.0), Duration::from_secs(4 * 3600));
        assert_eq!(backoff(i, m, 1000, 0.0), Duration::from_secs(4 * 3600));
        let jittered = backoff(i, m, 1, 0.999);
        assert!(jittered < Duration::from_secs(300) && jittered > Duration::from_secs(269));
    }

    #[test]
    fn permanence_follows_the_reply_code() {
        let t = Failure::temporary(Scope::Host, Status(4, 4, 1), "refused");
        assert!(!t.is_permanent());
        let p = Failure::permanent(Scope::Destination, 556, Status(5, 1, 10), "null MX");
        assert!(p.is_permanent());
        assert_eq!(p.reply.code, 556);
    }
}
