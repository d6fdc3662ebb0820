//! The access record of one SMTP session: what the driver counts while it
//! runs, turned into the Session record when it ends (data-protection
//! "access records": who connected, from where, with what TLS and login,
//! and what came of it).

use std::collections::BTreeMap;

use crate::log::{
    self, SESSION_MAX_QUEUE_IDS, SESSION_MAX_REJECTION_CODES, SESSION_OTHER_REJECTIONS,
    SessionInfo, Timestamp,
};
use crate::smtp::Reply;

/// How a session ended, as the Session record's `outcome` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Quit,
    Closed,
    Timeout,
    Shutdown,
    TooManyErrors,
    TooManyAuthFailures,
    TlsFailed,
    Error,
}

impl Outcome {
    /// A read or write that failed: the client going away (a reset, or a
    /// TLS client closing without close_notify) is `closed`; a client that
    /// stopped reading is `timeout`; anything else is `error`.
    pub fn of_io_error(e: &std::io::Error) -> Outcome {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                Outcome::Closed
            }
            TimedOut => Outcome::Timeout,
            _ => Outcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::Closed => "closed",
            Outcome::Timeout => "timeout",
            Outcome::Shutdown => "shutdown",
            Outcome::TooManyErrors => "too_many_errors",
            Outcome::TooManyAuthFailures => "too_many_auth_failures",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Error => "error",
        }
    }
}

/// Counts of one session so far.
#[derive(Debug)]
pub struct Tally {
    started: Timestamp,
    listener: String,
    accepted: u32,
    queue_ids: Vec<String>,
    rejections: u32,
    rejected: BTreeMap<String, u32>,
    auth_failures: u32,
    outcome: Option<Outcome>,
}

impl Tally {
    pub fn new(started: Timestamp, listener: String) -> Tally {
        Tally {
            started,
            listener,
            accepted: 0,
            queue_ids: Vec::new(),
            rejections: 0,
            rejected: BTreeMap::new(),
            auth_failures: 0,
            outcome: None,
        }
    }

    pub fn accepted(&mut self, queue_id: &str) {
        self.accepted += 1;
        if self.queue_ids.len() < SESSION_MAX_QUEUE_IDS {
            self.queue_ids.push(queue_id.to_string());
        }
    }

    /// One Rejection record written. The map stays bounded whatever a
    /// client provokes: codes beyond the limit share one key.
    pub fn rejected(&mut self, reply: &Reply) {
        self.rejections += 1;
        let key = match reply.status {
            Some(s) => format!("{} {s}", reply.code),
            None => reply.code.to_string(),
        };
        let key = if self.rejected.contains_key(&key)
            || self.rejected.len() < SESSION_MAX_REJECTION_CODES
        {
            key
        } else {
            SESSION_OTHER_REJECTIONS.to_string()
        };
        *self.rejected.entry(key).or_default() += 1;
    }

    pub fn auth_failed(&mut self) {
        self.auth_failures += 1;
    }

    /// Records why the session ends; the first reason given stands (a
    /// timeout's 421 must not turn into "too many errors" later).
    pub fn ends(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }

    /// The record, at `now`. A session that reached its close without
    /// another reason ended with QUIT.
    pub fn finish(self, now: Timestamp, session: SessionInfo) -> log::SmtpSession {
        log::SmtpSession {
            timestamp: now,
            started: self.started,
            duration_seconds: (now - self.started).as_seconds_f64().max(0.0),
            session,
            listener: self.listener,
            messages_accepted: self.accepted,
            queue_ids: self.queue_ids,
            rejections: self.rejections,
            rejected: self.rejected,
            auth_failures: self.auth_failures,
            outcome: self.outcome.unwrap_or(Outcome::Quit).as_str().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::Status;

    fn at(s: &str) -> Timestamp {
        Timestamp::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn counts_ids_and_rejections_within_their_bounds() {
        let mut t = Tally::new(at("2025-01-01T00:00:00Z"), "127.0.0.1:25".into());
        for i in 0..(SESSION_MAX_QUEUE_IDS + 5) {
            t.accepted(&format!("id{i}"));
        }
        t.rejected(&Reply::new(550, Status(5, 7, 1), "no"));
        t.rejected(&Reply::new(550, Status(5, 7, 1), "no"));
        for code in 0..(SESSION_MAX_REJECTION_CODES as u16 + 3) {
            t.rejected(&Reply::new(400 + code, Status(4, 0, 0), "x"));
        }
        t.auth_failed();
        let r = t.finish(at("2025-01-01T00:00:02.5Z"), SessionInfo::default());
        assert_eq!(r.messages_accepted, SESSION_MAX_QUEUE_IDS as u32 + 5);
        assert_eq!(r.queue_ids.len(), SESSION_MAX_QUEUE_IDS);
        assert_eq!(r.queue_ids[0], "id0");
        assert_eq!(r.rejections, SESSION_MAX_REJECTION_CODES as u32 + 5);
        assert_eq!(r.rejected.len(), SESSION_MAX_REJECTION_CODES + 1);
        assert_eq!(r.rejected["550 5.7.1"], 2);
        // 550 5.7.1 and 31 others fit; the 4 codes after them share "other".
        assert_eq!(r.rejected[SESSION_OTHER_REJECTIONS], 4);
        assert_eq!(r.auth_failures, 1);
        assert_eq!(r.duration_seconds, 2.5);
        assert_eq!(r.outcome, "quit");
    }

    #[test]
    fn the_first_reason_to_end_stands() {
        let mut t = Tally::new(at("2025-01-01T00:00:00Z"), "127.0.0.1:25".into());
        t.ends(Outcome::Timeout);
        t.ends(Outcome::TooManyErrors);
        let r = t.finish(at("2025-01-01T00:00:00Z"), SessionInfo::default());
        assert_eq!(r.outcome, "timeout");
    }
}
