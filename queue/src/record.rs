//! What the store keeps for a message, and how it is encoded.
//!
//! Records are postcard-encoded behind a one-byte schema version, so a later
//! release can read what an earlier one wrote.

use serde::{Deserialize, Serialize};

use crate::content::ContentRef;
use crate::error::QueueError;
use crate::id::QueueId;

pub(crate) const SCHEMA_V1: u8 = 1;

/// Where one recipient of a message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecipientState {
    /// Accepted, not yet attempted.
    Queued,
    /// Attempted at least once; waiting for its next attempt.
    Deferred,
    /// Final: the receiving server accepted it.
    Delivered,
    /// Final: permanently refused.
    Bounced,
    /// Final: retried until the message's lifetime ran out.
    Expired,
    /// Final: removed by an administrator.
    Deleted,
}

impl RecipientState {
    pub fn is_final(self) -> bool {
        !matches!(self, RecipientState::Queued | RecipientState::Deferred)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Queued => "queued",
            RecipientState::Deferred => "deferred",
            RecipientState::Delivered => "delivered",
            RecipientState::Bounced => "bounced",
            RecipientState::Expired => "expired",
            RecipientState::Deleted => "deleted",
        }
    }
}

/// One envelope recipient and its delivery state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientRecord {
    /// The RCPT TO address as the client gave it (without angle brackets).
    pub address: String,
    /// The lower-cased domain of `address`: the routing key.
    pub domain: String,
    pub state: RecipientState,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When this recipient is next due (ms since the epoch). Meaningless once final.
    pub next_attempt_ms: u64,
    /// The last reply from a receiving server, if any ("451 4.7.1 try later").
    pub last_reply: Option<String>,
}

impl RecipientRecord {
    pub fn new(address: impl Into<String>, due_ms: u64) -> Self {
        let address = address.into();
        let domain = domain_of(&address);
        RecipientRecord {
            address,
            domain,
            state: RecipientState::Queued,
            attempts: 0,
            next_attempt_ms: due_ms,
            last_reply: None,
        }
    }
}

/// The lower-cased part after the last `@`; empty when there is none.
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_lowercase())
        .unwrap_or_default()
}

/// Envelope facts the submission carried, beyond sender and recipients.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The client's IP address.
    pub peer_ip: Option<String>,
    /// The name the client gave in EHLO/HELO.
    pub helo: Option<String>,
    /// The SASL user that authenticated, if any.
    pub auth_user: Option<String>,
    /// `SMTPUTF8` was given on MAIL FROM (RFC 6531).
    pub smtputf8: bool,
    /// `BODY=8BITMIME` was given on MAIL FROM (RFC 6152).
    pub body_8bit: bool,
    /// The Message-ID header of the stored message.
    pub message_id: Option<String>,
    /// The DKIM signatures added at reception, as `d=<domain> s=<selector> a=<algorithm>`.
    #[serde(default)]
    pub dkim: Vec<String>,
}

/// Everything the store knows about one message, except its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: QueueId,
    /// Reception time, ms since the epoch.
    pub received_ms: u64,
    /// The tenant the message was accepted for.
    pub tenant: Option<String>,
    /// MAIL FROM address; empty for the null reverse-path `<>`.
    pub sender: String,
    /// Size of the stored content in bytes.
    pub size: u64,
    pub submission: Submission,
    /// Held messages are never due until released.
    pub held: bool,
    pub recipients: Vec<RecipientRecord>,
    /// The time under which the message sits in the schedule index, if it does.
    pub(crate) scheduled_ms: Option<u64>,
    /// Where the content is.
    pub(crate) content: ContentRef,
}

impl MessageRecord {
    /// The earliest time any non-final recipient is due, or `None` when all are final.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.recipients
            .iter()
            .filter(|r| !r.state.is_final())
            .map(|r| r.next_attempt_ms)
            .min()
    }

    pub fn is_complete(&self) -> bool {
        self.recipients.iter().all(|r| r.state.is_final())
    }

    /// The message's state as a postmaster sees it: held, deferred (some
    /// recipient has failed before), or queued.
    pub fn state(&self) -> MessageState {
        if self.held {
            MessageState::Held
        } else if self
            .recipients
            .iter()
            .any(|r| r.state == RecipientState::Deferred)
        {
            MessageState::Deferred
        } else {
            MessageState::Queued
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![SCHEMA_V1];
        postcard::to_io(self, &mut out).expect("writing into a Vec cannot fail");
        out
    }

    pub(crate) fn decode(id: QueueId, bytes: &[u8]) -> Result<Self, QueueError> {
        match bytes.split_first() {
            Some((&SCHEMA_V1, rest)) => {
                postcard::from_bytes(rest).map_err(|e| QueueError::Corrupt {
                    id,
                    reason: e.to_string(),
                })
            }
            Some((v, _)) => Err(QueueError::Corrupt {
                id,
                reason: format!("unknown record schema version {v}"),
            }),
            None => Err(QueueError::Corrupt {
                id,
                reason: "empty record".into(),
            }),
        }
    }
}

/// A message's state for listings and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageState {
    Queued,
    Deferred,
    Held,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Deferred => "deferred",
            MessageState::Held => "held",
        }
    }
}

impl std::str::FromStr for MessageState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "queued" => Ok(MessageState::Queued),
            "deferred" => Ok(MessageState::Deferred),
            "held" => Ok(MessageState::Held),
            other => Err(format!(
                "unknown state '{other}': use queued, deferred or held"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MessageRecord {
        MessageRecord {
            id: QueueId::from_u64(42),
            received_ms: 1_700_000_000_000,
            tenant: Some("acme".into()),
            sender: "news@acme.example".into(),
            size: 1234,
            submission: Submission {
                peer_ip: Some("127.0.0.1".into()),
                helo: Some("client.example".into()),
                auth_user: Some("acme-app".into()),
                smtputf8: true,
                body_8bit: false,
                message_id: Some("<x@y>".into()),
                dkim: vec!["d=acme.example s=s1 a=rsa-sha256".into()],
            },
            held: false,
            recipients: vec![
                RecipientRecord::new("a@Dest.Example", 5),
                RecipientRecord::new("b@other.example", 7),
            ],
            scheduled_ms: Some(5),
            content: ContentRef {
                segment: 1,
                offset: 0,
                len: 1234,
                crc: 0,
            },
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let rec = sample();
        let bytes = rec.encode();
        assert_eq!(bytes[0], SCHEMA_V1);
        assert_eq!(MessageRecord::decode(rec.id, &bytes).unwrap(), rec);
    }

    #[test]
    fn unknown_schema_version_is_reported_as_corrupt() {
        let err = MessageRecord::decode(QueueId::from_u64(1), &[99, 0]).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
        assert!(MessageRecord::decode(QueueId::from_u64(1), &[]).is_err());
    }

    #[test]
    fn domain_is_lower_cased_and_next_due_ignores_final_recipients() {
        let mut rec = sample();
        assert_eq!(rec.recipients[0].domain, "dest.example");
        assert_eq!(rec.next_due_ms(), Some(5));
        rec.recipients[0].state = RecipientState::Delivered;
        assert_eq!(rec.next_due_ms(), Some(7));
        assert!(!rec.is_complete());
        rec.recipients[1].state = RecipientState::Bounced;
        assert_eq!(rec.next_due_ms(), None);
        assert!(rec.is_complete());
    }

    #[test]
    fn message_state_prefers_held_then_deferred() {
        let mut rec = sample();
        assert_eq!(rec.state(), MessageState::Queued);
        rec.recipients[1].state = RecipientState::Deferred;
        assert_eq!(rec.state(), MessageState::Deferred);
        rec.held = true;
        assert_eq!(rec.state(), MessageState::Held);
    }
}
