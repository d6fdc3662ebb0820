//! How envelopes and content reach the disk: in clear (a store opened
//! without keys) or sealed (see `crypt.rs` for the algorithm and keys).
//!
//! Sealed envelope (the sled value under `m<id>`):
//! `2 ‖ content place (20: segment u32, offset u64, length u32, CRC u32,
//! big-endian) ‖ sealed(schema-1 record)`, with associated data
//! `"mta-queue envelope\0" ‖ queue id ‖ the first 21 bytes`. The content's
//! place is in clear (it says where, not what) so that a record that fails
//! authentication still keeps its content alive in quarantine, for a
//! postmaster, and authenticated so that it cannot be pointed elsewhere.
//!
//! Sealed content (a content entry with magic `MTAE`): `sealed(message)`,
//! with associated data `"mta-queue content\0" ‖ queue id`. The entry's CRC
//! covers the sealed bytes, so compaction copies them without a key.
//!
//! A store once opened with keys takes nothing in clear any more: a clear
//! envelope or content met there is quarantined (it was not written by us,
//! or was written before encryption was turned on and not yet rewritten,
//! which the first opening with keys does; see `Queue::open`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::content::{ContentRef, Entry};
use crate::crypt::{KeyId, OpenError, QueueKeys, SEALED_PREFIX};
use crate::error::QueueError;
use crate::id::QueueId;
use crate::record::{MessageRecord, SCHEMA_V1};

pub(crate) const SCHEMA_SEALED: u8 = 2;
const PLACE: usize = 20;
const HEADER: usize = 1 + PLACE;

/// Why a record was taken out of the schedule. Stored with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuarantineKind {
    /// Sealed under a key the ring does not hold: may open once the key
    /// is back (retried at every start and by `rekey`).
    UnknownKey,
    /// The envelope failed authentication.
    Forged,
    /// In clear in a store that seals everything. `rekey` seals it (the
    /// postmaster vouches for it by running it).
    Plaintext,
    /// The envelope opened but its content failed authentication.
    Content,
}

impl QuarantineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineKind::UnknownKey => "unknown-key",
            QuarantineKind::Forged => "failed-authentication",
            QuarantineKind::Plaintext => "unencrypted",
            QuarantineKind::Content => "content-failed-authentication",
        }
    }
}

/// How a stored envelope is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    Plain,
    Sealed(KeyId),
}

fn envelope_ad(id: QueueId, header: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(19 + 8 + HEADER);
    ad.extend_from_slice(b"mta-queue envelope\0");
    ad.extend_from_slice(&id.as_u64().to_be_bytes());
    ad.extend_from_slice(header);
    ad
}

fn content_ad(id: QueueId) -> [u8; 26] {
    let mut ad = [0u8; 26];
    ad[..18].copy_from_slice(b"mta-queue content\0");
    ad[18..].copy_from_slice(&id.as_u64().to_be_bytes());
    ad
}

fn place_bytes(r: &ContentRef) -> [u8; PLACE] {
    let mut b = [0u8; PLACE];
    b[..4].copy_from_slice(&r.segment.to_be_bytes());
    b[4..12].copy_from_slice(&r.offset.to_be_bytes());
    b[12..16].copy_from_slice(&r.len.to_be_bytes());
    b[16..20].copy_from_slice(&r.crc.to_be_bytes());
    b
}

fn place_of(b: &[u8]) -> Option<ContentRef> {
    let b: &[u8; PLACE] = b.get(..PLACE)?.try_into().ok()?;
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    Some(ContentRef {
        segment: u32_at(0),
        offset: u64::from_be_bytes(b[4..12].try_into().expect("8 bytes")),
        len: u32_at(12),
        crc: u32_at(16),
    })
}

/// The form of a stored envelope, without opening it.
pub(crate) fn form_of(bytes: &[u8]) -> Option<Form> {
    match *bytes.first()? {
        SCHEMA_V1 => Some(Form::Plain),
        SCHEMA_SEALED => KeyId::of_sealed(bytes.get(HEADER..)?).map(Form::Sealed),
        _ => None,
    }
}

/// Where a stored envelope's content is, without opening it (for records
/// in quarantine, whose content must stay).
pub(crate) fn content_place(id: QueueId, bytes: &[u8]) -> Option<ContentRef> {
    match *bytes.first()? {
        SCHEMA_V1 => MessageRecord::decode(id, bytes).ok().map(|r| r.content),
        SCHEMA_SEALED => place_of(&bytes[1..]),
        _ => None,
    }
}

/// A record that must not be used, and why.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub kind: QuarantineKind,
    pub reason: String,
}

/// The store's sealing: its keys (none: everything in clear) and whether
/// clear records are still taken (only before the first opening with keys
/// has sealed them all).
pub(crate) struct Codec {
    keys: Option<Arc<QueueKeys>>,
    accept_plain: AtomicBool,
}

fn crypto(e: String) -> QueueError {
    QueueError::Crypto(e)
}

impl Codec {
    pub(crate) fn new(keys: Option<Arc<QueueKeys>>) -> Codec {
        Codec {
            accept_plain: AtomicBool::new(keys.is_none()),
            keys,
        }
    }

    pub(crate) fn keys(&self) -> Option<&Arc<QueueKeys>> {
        self.keys.as_ref()
    }

    pub(crate) fn set_accept_plain(&self, yes: bool) {
        self.accept_plain
            .store(yes || self.keys.is_none(), Ordering::SeqCst);
    }

    fn accepts_plain(&self) -> bool {
        self.accept_plain.load(Ordering::SeqCst)
    }

    pub(crate) fn encode(&self, rec: &MessageRecord) -> Result<Vec<u8>, QueueError> {
        let plain = rec.encode();
        let Some(keys) = &self.keys else {
            return Ok(plain);
        };
        let mut header = [0u8; HEADER];
        header[0] = SCHEMA_SEALED;
        header[1..].copy_from_slice(&place_bytes(&rec.content));
        let sealed = keys
            .seal(&envelope_ad(rec.id, &header), &plain)
            .map_err(crypto)?;
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a stored envelope: `Err(Ok(refused))` for one to quarantine,
    /// `Err(Err(e))` for one that is damaged (reported as corrupt).
    pub(crate) fn open(
        &self,
        id: QueueId,
        bytes: &[u8],
    ) -> Result<MessageRecord, Result<Refused, QueueError>> {
        let refuse = |kind, reason: String| Err(Ok(Refused { kind, reason }));
        match bytes.first() {
            Some(&SCHEMA_V1) if !self.accepts_plain() => refuse(
                QuarantineKind::Plaintext,
                "the envelope is stored unencrypted in an encrypted queue: run `mta queue rekey` (daemon stopped) if it is genuine".into(),
            ),
            Some(&SCHEMA_SEALED) => {
                let Some(keys) = &self.keys else {
                    return Err(Err(QueueError::Corrupt {
                        id,
                        reason: "the record is encrypted and the queue was opened without a key".into(),
                    }));
                };
                if bytes.len() < HEADER {
                    return refuse(QuarantineKind::Forged, format!("the envelope {}", OpenError::Truncated));
                }
                let plain = match keys.open(&envelope_ad(id, &bytes[..HEADER]), &bytes[HEADER..]) {
                    Ok(p) => p,
                    Err(e @ OpenError::UnknownKey(_)) => {
                        return refuse(QuarantineKind::UnknownKey, format!("the envelope {e}"));
                    }
                    Err(e) => return refuse(QuarantineKind::Forged, format!("the envelope {e}")),
                };
                let rec = MessageRecord::decode(id, &plain).map_err(Err)?;
                if Some(rec.content) != place_of(&bytes[1..]) || rec.id != id {
                    return refuse(
                        QuarantineKind::Forged,
                        "the envelope does not match its authenticated header".into(),
                    );
                }
                Ok(rec)
            }
            _ => MessageRecord::decode(id, bytes).map_err(Err),
        }
    }

    /// [`open`](Self::open) for callers that only pass errors on.
    pub(crate) fn decode(&self, id: QueueId, bytes: &[u8]) -> Result<MessageRecord, QueueError> {
        self.open(id, bytes).map_err(|e| match e {
            Ok(r) => QueueError::Quarantined {
                id,
                reason: r.reason,
            },
            Err(e) => e,
        })
    }

    /// The bytes of a content entry for `content`, and whether they are sealed.
    pub(crate) fn seal_content(
        &self,
        id: QueueId,
        content: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, QueueError> {
        match &self.keys {
            None => Ok(None),
            Some(keys) => keys
                .seal_parts(&content_ad(id), content)
                .map(Some)
                .map_err(crypto),
        }
    }

    /// The message from a content entry's bytes.
    pub(crate) fn open_content(
        &self,
        id: QueueId,
        sealed: bool,
        mut body: Vec<u8>,
    ) -> Result<Vec<u8>, Result<Refused, QueueError>> {
        if !sealed {
            if self.accepts_plain() {
                return Ok(body);
            }
            return Err(Ok(Refused {
                kind: QuarantineKind::Plaintext,
                reason: "the content is stored unencrypted in an encrypted queue: run `mta queue rekey` (daemon stopped) if it is genuine".into(),
            }));
        }
        let keys = self.content_keys(id)?;
        match keys.open_in_place(&content_ad(id), &mut body) {
            Ok(range) => {
                body.truncate(range.end);
                body.drain(..range.start);
                Ok(body)
            }
            Err(e) => Err(Ok(content_refused(e))),
        }
    }

    /// [`open_content`](Self::open_content) for an entry read with its
    /// sealed prefix apart: the plaintext is opened where it lies, and not
    /// moved down over the prefix.
    pub(crate) fn open_content_entry(
        &self,
        id: QueueId,
        entry: Entry<SEALED_PREFIX>,
    ) -> Result<Vec<u8>, Result<Refused, QueueError>> {
        let Entry {
            sealed,
            prefix: Some(prefix),
            mut rest,
        } = entry
        else {
            return self.open_content(id, entry.sealed, entry.rest);
        };
        debug_assert!(sealed);
        let keys = self.content_keys(id)?;
        match keys.open_apart(&content_ad(id), &prefix, &mut rest) {
            Ok(n) => {
                rest.truncate(n);
                Ok(rest)
            }
            Err(e) => Err(Ok(content_refused(e))),
        }
    }

    fn content_keys(&self, id: QueueId) -> Result<&QueueKeys, Result<Refused, QueueError>> {
        self.keys.as_deref().ok_or_else(|| {
            Err(QueueError::Corrupt {
                id,
                reason: "the content is encrypted and the queue was opened without a key".into(),
            })
        })
    }

    /// The key a content entry's bytes were sealed with (`None`: in clear).
    pub(crate) fn content_key(sealed: bool, body: &[u8]) -> Option<KeyId> {
        if sealed { KeyId::of_sealed(body) } else { None }
    }
}

/// A record in quarantine, as stored under `q<id>`: why, and the envelope
/// exactly as it was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct QuarantineEntry {
    pub kind: QuarantineKind,
    pub reason: String,
    pub stored: Vec<u8>,
}

const QUARANTINE_V1: u8 = 1;

impl QuarantineEntry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![QUARANTINE_V1];
        postcard::to_io(self, &mut out).expect("writing into a Vec cannot fail");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<QuarantineEntry> {
        match bytes.split_first()? {
            (&QUARANTINE_V1, rest) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

fn content_refused(e: OpenError) -> Refused {
    Refused {
        kind: match e {
            OpenError::UnknownKey(_) => QuarantineKind::UnknownKey,
            _ => QuarantineKind::Content,
        },
        reason: format!("the content {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecipientRecord, Submission};

    fn record(id: u64) -> MessageRecord {
        MessageRecord {
            id: QueueId::from_u64(id),
            received_ms: 1,
            tenant: None,
            sender: "secret-sender@example.com".into(),
            size: 3,
            submission: Submission::default(),
            held: false,
            recipients: vec![RecipientRecord::new("secret-rcpt@example.net", 1)],
            scheduled_ms: Some(1),
            content: ContentRef {
                segment: 7,
                offset: 99,
                len: 3,
                crc: 5,
            },
        }
    }

    fn sealed_codec() -> Codec {
        Codec::new(Some(Arc::new(QueueKeys::ephemeral().unwrap())))
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_sealed_envelope_round_trips_and_hides_its_addresses() {
        let codec = sealed_codec();
        let rec = record(1);
        let bytes = codec.encode(&rec).unwrap();
        assert!(!contains(&bytes, b"secret-rcpt"));
        assert!(!contains(&bytes, b"secret-sender"));
        assert_eq!(codec.open(rec.id, &bytes).unwrap(), rec);
        assert_eq!(content_place(rec.id, &bytes), Some(rec.content));
        assert_eq!(
            form_of(&bytes),
            Some(Form::Sealed(codec.keys().unwrap().current()))
        );
    }

    #[test]
    fn an_envelope_moved_to_another_id_or_repointed_fails_authentication() {
        let codec = sealed_codec();
        let bytes = codec.encode(&record(1)).unwrap();
        let moved = codec
            .open(QueueId::from_u64(2), &bytes)
            .unwrap_err()
            .unwrap();
        assert_eq!(moved.kind, QuarantineKind::Forged);
        let mut repointed = bytes.clone();
        repointed[5] ^= 1; // the offset in the clear header
        let r = codec
            .open(QueueId::from_u64(1), &repointed)
            .unwrap_err()
            .unwrap();
        assert_eq!(r.kind, QuarantineKind::Forged);
        let unknown = sealed_codec()
            .open(QueueId::from_u64(1), &bytes)
            .unwrap_err()
            .unwrap();
        assert_eq!(unknown.kind, QuarantineKind::UnknownKey);
    }

    #[test]
    fn clear_records_are_refused_once_the_queue_is_sealed() {
        let codec = sealed_codec();
        let plain = record(1).encode();
        codec.set_accept_plain(true);
        assert!(codec.open(QueueId::from_u64(1), &plain).is_ok());
        codec.set_accept_plain(false);
        let r = codec
            .open(QueueId::from_u64(1), &plain)
            .unwrap_err()
            .unwrap();
        assert_eq!(r.kind, QuarantineKind::Plaintext);
        let r = codec
            .open_content(QueueId::from_u64(1), false, b"x".to_vec())
            .unwrap_err()
            .unwrap();
        assert_eq!(r.kind, QuarantineKind::Plaintext);
    }

    #[test]
    fn content_opens_only_for_its_own_message() {
        let codec = sealed_codec();
        let id = QueueId::from_u64(1);
        let sealed = codec
            .seal_content(id, &[b"Subject: ", b"hi"])
            .unwrap()
            .unwrap();
        assert_eq!(
            codec.open_content(id, true, sealed.clone()).unwrap(),
            b"Subject: hi"
        );
        let r = codec
            .open_content(QueueId::from_u64(2), true, sealed)
            .unwrap_err()
            .unwrap();
        assert_eq!(r.kind, QuarantineKind::Content);
    }
}
