//! The queue: a sled tree holding envelopes and the schedule index, and the
//! content segments beside it.
//!
//! Keys in the one tree. A message's record (`m`) is the durable state and
//! changes by one insert or compare-and-swap; its schedule key (`s`) is an
//! index that follows under the message's lock and that recovery rebuilds:
//!
//! | key                          | value                        |
//! |------------------------------|------------------------------|
//! | `m` id(8, BE)                | [`MessageRecord`], encoded (sealed when the queue has keys, see `codec.rs`) |
//! | `s` due-ms(8, BE) id(8, BE)  | empty: the schedule index    |
//! | `q` id(8, BE)                | a record in quarantine: why, and its envelope as it was |
//! | `k` key id(8)                | empty: a key that sealed something in this store |
//!
//! The `k` keys make a wrong key file a start-up error instead of a
//! quarantined queue: a key is added when it is current at an opening and
//! removed only by [`Queue::rekey_blocking`] once nothing it sealed is
//! left, so they always cover every key the records need.
//!
//! Invariant: a message that is neither held nor complete has exactly one
//! schedule key, at `record.scheduled_ms`, except while it is claimed (the
//! claim took the key away) and between `enqueue` and the release of its
//! [`Enqueued`] (not yet due). Recovery rebuilds the index from the records,
//! so a crash while claimed makes the message due again.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::codec::{Codec, Form, QuarantineEntry, QuarantineKind, Refused, content_place, form_of};
use crate::commit::{CommitStats, ExpectedWrite, GroupCommit};
use crate::content::{ContentLog, ContentRef};
use crate::crypt::{KeyId, QueueKeys, SEALED_PREFIX};
use crate::error::QueueError;
use crate::fresh::{Content, FreshContent};
use crate::gauges::{Contribution, Gauges, QueueShape};
use crate::id::{IdGenerator, QueueId};
use crate::record::{MessageRecord, MessageState, RecipientRecord, RecipientState, Submission};

const MSG: u8 = b'm';
const SCHED: u8 = b's';
const QUAR: u8 = b'q';
const KEYS: u8 = b'k';

/// Locks serializing changes per message, chosen by ID.
const SERIAL_STRIPES: usize = 64;

fn keys_key(id: KeyId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = KEYS;
    k[1..].copy_from_slice(&id.0);
    k
}

fn key(prefix: u8, id: QueueId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn sched_key(due_ms: u64, id: QueueId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = SCHED;
    k[1..9].copy_from_slice(&due_ms.to_be_bytes());
    k[9..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The due time a schedule key names.
fn due_of_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

fn id_from_key(k: &[u8]) -> Option<QueueId> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(QueueId::from_u64(u64::from_be_bytes(tail)))
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Directory of the store (`index/` for sled, `content/` for the
    /// segments); created if missing.
    pub path: PathBuf,
    /// Bytes of sled's page cache. Bounds the store's share of memory.
    pub cache_capacity: u64,
    /// How long a write may wait for its fsync before the store is declared
    /// failed (a disk that stopped answering, or sled after ENOSPC).
    pub commit_timeout: std::time::Duration,
    /// How long a group commit may wait for writes announced with
    /// [`Queue::expect_write`] that have not arrived yet. Default 10 ms.
    pub commit_gather: std::time::Duration,
    /// Size at which a content segment is closed and a new one started.
    pub segment_bytes: u64,
    /// [`Queue::compact`] moves the live entries out of a closed content
    /// segment whose live bytes are under this fraction of its size. The
    /// default, 0.25, leaves closed segments at most about four times their
    /// live bytes after a pass, and a pass copies under a quarter of the
    /// bytes it frees. 0 only removes closed segments with nothing live.
    pub compact_below: f64,
    /// Encryption at rest: with keys, every envelope and content is sealed
    /// under the current key before it is written (see `codec.rs`); `None`
    /// (the default of [`QueueConfig::new`]) writes them in clear. The mta
    /// daemon always gives keys unless `[queue] encrypt = false`.
    pub keys: Option<Arc<QueueKeys>>,
    /// Bytes of messages just stored that are kept in memory, in clear, for
    /// their first delivery attempt ([`Queue::take_content`]), so that it
    /// need not read and decrypt them. 0 keeps none. Default 32 MiB.
    pub fresh_content_bytes: usize,
}

impl QueueConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QueueConfig {
            path: path.into(),
            cache_capacity: 64 * 1024 * 1024,
            commit_timeout: std::time::Duration::from_secs(30),
            commit_gather: std::time::Duration::from_millis(10),
            segment_bytes: 16 * 1024 * 1024,
            compact_below: 0.25,
            keys: None,
            fresh_content_bytes: 32 * 1024 * 1024,
        }
    }
}

/// A message to be accepted.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// From [`Queue::next_id`].
    pub id: QueueId,
    pub received_ms: u64,
    pub tenant: Option<String>,
    /// MAIL FROM; empty for `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    pub submission: Submission,
    /// The start of the message, stored before `content`: header fields
    /// added on reception (signatures, trace fields), kept apart so that the
    /// message need not be copied to put them on top. Often empty.
    pub head: Vec<u8>,
    /// The message as it will be sent after `head` (headers and body, CRLF
    /// lines).
    pub content: Vec<u8>,
}

/// What recovery found when the store was opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Messages in the queue.
    pub messages: usize,
    /// Recipients not yet final.
    pub pending_recipients: usize,
    /// Messages put back in the schedule (including ones claimed when the
    /// previous process stopped).
    pub scheduled: usize,
    /// Content segments that no message pointed into, removed.
    pub orphans_removed: usize,
    /// Records that could not be decoded or whose content is missing; left
    /// in place, never scheduled, and reported.
    pub corrupt: Vec<QueueId>,
    /// Records in quarantine (failed authentication, sealed under a key the
    /// ring lacks, or in clear in an encrypted queue), with why: never
    /// scheduled, kept with their content, listed by [`Queue::quarantined`].
    pub quarantined: Vec<(QueueId, String)>,
    /// Records taken out of quarantine because the key they need is back.
    pub restored: usize,
    /// Records in clear sealed by this opening (the first with keys).
    pub sealed: usize,
}

/// What [`Queue::rekey_blocking`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RekeyReport {
    /// Envelopes sealed again under the current key.
    pub envelopes: usize,
    /// Contents sealed again under the current key.
    pub contents: usize,
    /// Records taken out of quarantine (their key is back, or they were in
    /// clear and are now sealed).
    pub restored: usize,
    /// Records still in quarantine.
    pub quarantined: usize,
    /// The keys something in the store is still sealed with (the current
    /// key always); the others may leave the key file.
    pub keys_in_use: Vec<KeyId>,
}

/// A record in quarantine, for a postmaster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub id: QueueId,
    pub kind: QuarantineKind,
    pub reason: String,
}

/// What one [`Queue::compact`] pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    /// Closed segments found under [`QueueConfig::compact_below`], whose live
    /// entries the pass moved to the current segment.
    pub segments_compacted: usize,
    /// Messages whose content was moved (and whose records now point to
    /// the copy, durably).
    pub messages_moved: usize,
    /// Bytes copied, entry headers included.
    pub bytes_moved: u64,
    /// Segment files deleted by the pass: compacted ones, and closed ones
    /// that already held nothing live.
    pub segments_removed: usize,
}

/// The result of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        reply: String,
    },
    Deferred {
        reply: String,
        next_attempt_ms: u64,
    },
    Bounced {
        reply: String,
    },
    Expired {
        reply: String,
    },
    /// Not attempted (its destination is suspended): due again at
    /// `next_attempt_ms`, with its state, attempts and last reply unchanged.
    Postponed {
        next_attempt_ms: u64,
    },
}

/// What became of a message after outcomes were recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterOutcome {
    /// Every recipient is final; the message and its content are gone.
    Complete,
    /// Some recipients remain; the message is due again at this time (or
    /// waits for release, when held).
    Pending { next_due_ms: Option<u64> },
    /// The message was deleted while it was being delivered.
    Gone,
}

/// Filters for [`Queue::list`]. Every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A recipient's domain (case-insensitive).
    pub domain: Option<String>,
    pub tenant: Option<String>,
    pub state: Option<MessageState>,
    /// Received before this time (ms since the epoch).
    pub received_before_ms: Option<u64>,
    /// The envelope sender (case-insensitive).
    pub sender: Option<String>,
    /// A pending recipient's address (case-insensitive): for erasure
    /// requests, every message still queued for that address.
    pub recipient: Option<String>,
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, rec: &MessageRecord) -> bool {
        if let Some(d) = &self.domain {
            let d = d.to_lowercase();
            if !rec
                .recipients
                .iter()
                .any(|r| !r.state.is_final() && r.domain == d)
            {
                return false;
            }
        }
        if let Some(t) = &self.tenant
            && rec.tenant.as_deref() != Some(t.as_str())
        {
            return false;
        }
        if let Some(s) = self.state
            && rec.state() != s
        {
            return false;
        }
        if let Some(before) = self.received_before_ms
            && rec.received_ms >= before
        {
            return false;
        }
        if let Some(s) = &self.sender
            && !rec.sender.eq_ignore_ascii_case(s)
        {
            return false;
        }
        if let Some(a) = &self.recipient
            && !rec
                .recipients
                .iter()
                .any(|r| !r.state.is_final() && r.address.eq_ignore_ascii_case(a))
        {
            return false;
        }
        true
    }
}

/// How [`Queue::summary`] groups messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryBy {
    Domain,
    Tenant,
}

/// One row of a qshape-style summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SummaryRow {
    /// The destination domain or tenant.
    pub key: String,
    pub messages: u64,
    pub recipients: u64,
    /// Messages by age: `counts[i]` are younger than `bounds_minutes[i]`, the
    /// last holds the rest.
    pub counts: Vec<u64>,
}

/// Messages and recipients by domain (or tenant) and age.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub bounds_minutes: Vec<u64>,
    pub total: SummaryRow,
    /// Sorted by message count, largest first.
    pub rows: Vec<SummaryRow>,
}

/// Age buckets of Postfix's qshape, in minutes.
pub const QSHAPE_BUCKETS: &[u64] = &[5, 10, 20, 40, 80, 160, 320, 640, 1280];

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    content: Arc<ContentLog>,
    commit: GroupCommit,
    ids: IdGenerator,
    claimed: Mutex<HashSet<QueueId>>,
    /// Serializes the changes of one message's record and schedule key
    /// (striped by ID): see [`Inner::serialize`].
    serial: Vec<Mutex<()>>,
    compact_below: f64,
    /// The queue's shape, kept up to date by every write; `None` for a
    /// store opened for inspection, which recovery did not count.
    gauges: Option<Gauges>,
    codec: Codec,
    /// Messages just stored, in clear, for their first attempt.
    fresh: FreshContent,
}

/// The durable queue. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

fn index_path(path: &Path) -> PathBuf {
    path.join("index")
}

fn content_path(path: &Path) -> PathBuf {
    path.join("content")
}

fn open_db(config: &QueueConfig) -> Result<sled::Db, QueueError> {
    let index = index_path(&config.path);
    std::fs::create_dir_all(&index).map_err(|e| {
        QueueError::Store(sled::Error::Io(std::io::Error::new(
            e.kind(),
            format!("creating {}: {e}", index.display()),
        )))
    })?;
    sled::Config::new()
        .path(&index)
        .cache_capacity(config.cache_capacity)
        .mode(sled::Mode::HighThroughput)
        // Our own group commit decides durability; this only bounds how
        // long unacknowledged writes (claims, holds) stay in memory.
        .flush_every_ms(Some(1000))
        .open()
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                QueueError::Locked {
                    path: config.path.clone(),
                }
            }
            sled::Error::Io(ref io) if io.to_string().contains("lock") => QueueError::Locked {
                path: config.path.clone(),
            },
            other => QueueError::Store(other),
        })
}

impl Queue {
    /// Opens (or creates) the store and recovers it: rebuilds the schedule
    /// from the records, so messages that were being delivered when the last
    /// process stopped are due again, and removes orphaned contents.
    ///
    /// With keys ([`QueueConfig::keys`]), the store must have been sealed
    /// with one of them ([`QueueError::WrongKey`] otherwise); the first
    /// opening with keys seals every record written in clear before, and
    /// from then on a record in clear is quarantined. Without keys, an
    /// encrypted store is refused ([`QueueError::Encrypted`]).
    pub fn open(config: &QueueConfig) -> Result<(Queue, RecoveryReport), QueueError> {
        let db = open_db(config)?;
        let tree = db.open_tree("queue")?;
        let codec = Codec::new(config.keys.clone());
        let sealed_store = check_keys(&tree, config)?;
        codec.set_accept_plain(!sealed_store);
        let content = ContentLog::open(&content_path(&config.path), config.segment_bytes, true)?;
        let (mut report, shape) = recover(&tree, &content, &codec)?;
        db.flush()?;
        let queue = Self::from_parts(
            config,
            db,
            tree,
            content,
            codec,
            Some(Gauges::starting_at(shape)),
        )?;
        queue.sync()?;
        if let Some(keys) = &config.keys {
            if sealed_store {
                queue.inner.tree.insert(keys_key(keys.current()), &[])?;
                let restored = queue.restore_quarantined(false)?;
                report
                    .quarantined
                    .retain(|(id, _)| !restored.iter().any(|r| r.id == *id));
                report.restored = restored.len();
                report.messages += restored.len();
                for rec in &restored {
                    report.pending_recipients += rec
                        .recipients
                        .iter()
                        .filter(|r| !r.state.is_final())
                        .count();
                    report.scheduled += usize::from(rec.scheduled_ms.is_some());
                }
            } else {
                // The first opening with keys: seal what is in clear, then
                // mark the store sealed (the rekey writes the `k` keys).
                let r = queue.rekey_blocking()?;
                report.sealed = r.envelopes;
                if r.envelopes > 0 {
                    tracing::info!(
                        records = r.envelopes,
                        contents = r.contents,
                        "queue records written before encryption was on are now encrypted"
                    );
                }
            }
            queue.inner.codec.set_accept_plain(false);
            queue.sync()?;
        }
        Ok((queue, report))
    }

    /// Opens the store for reading only (no recovery writes, no new
    /// segment), for offline inspection while no daemon runs. An encrypted
    /// store needs [`open_for_inspection_with`](Self::open_for_inspection_with).
    pub fn open_for_inspection(path: &Path) -> Result<Queue, QueueError> {
        Self::open_for_inspection_with(&QueueConfig::new(path))
    }

    /// [`open_for_inspection`](Self::open_for_inspection) with the
    /// config's keys.
    pub fn open_for_inspection_with(config: &QueueConfig) -> Result<Queue, QueueError> {
        let db = open_db(config)?;
        let tree = db.open_tree("queue")?;
        let codec = Codec::new(config.keys.clone());
        codec.set_accept_plain(!check_keys(&tree, config)?);
        let content = ContentLog::open(&content_path(&config.path), config.segment_bytes, false)?;
        Self::from_parts(config, db, tree, content, codec, None)
    }

    fn from_parts(
        config: &QueueConfig,
        db: sled::Db,
        tree: sled::Tree,
        content: ContentLog,
        codec: Codec,
        gauges: Option<Gauges>,
    ) -> Result<Queue, QueueError> {
        let last = tree
            .scan_prefix([MSG])
            .keys()
            .next_back()
            .transpose()?
            .and_then(|k| id_from_key(&k))
            .map(QueueId::as_u64)
            .unwrap_or(0);
        let content = Arc::new(content);
        // sled's flush stops at sync_file_range (no device cache flush, no
        // metadata): fdatasync its file ourselves. fsync acts on the file,
        // whichever descriptor asks.
        let sled_file_path = index_path(&config.path).join("db");
        let sled_file = std::fs::File::open(&sled_file_path).map_err(|e| {
            QueueError::Store(sled::Error::Io(std::io::Error::new(
                e.kind(),
                format!("opening {}: {e}", sled_file_path.display()),
            )))
        })?;
        let flush = {
            let (db, content) = (db.clone(), content.clone());
            move || -> Result<(), QueueError> {
                content.sync()?;
                db.flush()?;
                sled_file
                    .sync_data()
                    .map_err(|e| QueueError::Store(sled::Error::Io(e)))
            }
        };
        Ok(Queue {
            inner: Arc::new(Inner {
                commit: GroupCommit::start(flush, config.commit_timeout, config.commit_gather),
                db,
                tree,
                content,
                ids: IdGenerator::starting_after(last),
                claimed: Mutex::new(HashSet::new()),
                serial: (0..SERIAL_STRIPES).map(|_| Mutex::new(())).collect(),
                compact_below: config.compact_below,
                gauges,
                codec,
                fresh: FreshContent::new(config.fresh_content_bytes),
            }),
        })
    }

    /// A fresh ID for a message about to be enqueued.
    pub fn next_id(&self, now_ms: u64) -> QueueId {
        self.inner.ids.next(now_ms)
    }

    /// Stores a message with all its recipients due at once.
    ///
    /// **The commit point.** The content goes to the current segment, then
    /// one insert writes the envelope; then the call waits for a group commit
    /// (fsync). When it returns `Ok`, the message survives `kill -9` and power
    /// loss: only then may the caller say `250`. On `Err` nothing of the
    /// message is left behind (the insert is undone if the fsync failed), and
    /// the caller
    /// answers `451 4.3.0` so the client retries.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<Enqueued, QueueError> {
        self.enqueue_announced(msg, None).await
    }

    /// Announces a message that will be enqueued soon (reception calls it
    /// when DATA ends, before signing): group commits wait for it, at most
    /// [`QueueConfig::commit_gather`], so that messages arriving together
    /// share one fsync. Pass it to [`Queue::enqueue_expected`]; dropping it
    /// instead withdraws the announcement.
    pub fn expect_write(&self) -> ExpectedWrite {
        self.inner.commit.expect()
    }

    /// [`Queue::enqueue`] for a message announced with
    /// [`Queue::expect_write`].
    pub async fn enqueue_expected(
        &self,
        msg: NewMessage,
        expected: ExpectedWrite,
    ) -> Result<Enqueued, QueueError> {
        self.enqueue_announced(msg, Some(expected)).await
    }

    async fn enqueue_announced(
        &self,
        mut msg: NewMessage,
        expected: Option<ExpectedWrite>,
    ) -> Result<Enqueued, QueueError> {
        if self.inner.commit.is_failed() {
            return Err(QueueError::Failed);
        }
        let id = msg.id;
        let due = msg.received_ms;
        let (head, body) = (
            std::mem::take(&mut msg.head),
            std::mem::take(&mut msg.content),
        );
        let size = (head.len() + body.len()) as u64;
        let parts: [&[u8]; 2] = [&head, &body];
        let sealed = self.inner.codec.seal_content(id, &parts)?;
        let content = match &sealed {
            Some(bytes) => self.inner.content.append_entry(id, true, &[bytes])?,
            None => self.inner.content.append_entry(id, false, &parts)?,
        };
        drop(sealed);
        let (bytes, added) = match self.enqueue_record(msg, content, size) {
            Ok(b) => b,
            Err(e) => {
                self.inner.content.release(&content);
                return Err(e);
            }
        };
        // One key, so a plain insert: atomic by itself, and unlike a sled
        // batch or transaction it does not seal sled's I/O buffer (a batch
        // seals it twice, each seal a write on sled's thread pool).
        if let Err(e) = self.inner.tree.insert(key(MSG, id), bytes) {
            self.inner.content.release(&content);
            let e = QueueError::Store(e);
            // sled keeps an I/O error (ENOSPC above all) as fatal to the
            // instance: nothing after it can be trusted to reach the disk.
            if matches!(e, QueueError::Store(sled::Error::Io(_))) {
                self.inner.commit.fail(&e);
            }
            return Err(e);
        }
        self.gauges_changed(None, Some(added));
        // Kept for the first attempt; not yet due, so no delivery can look
        // for it before it is here. A deletion that came first (the ID is
        // listed from now on) finds nothing to forget: forgotten here.
        self.inner.fresh.put(id, head, body);
        if !self.inner.tree.contains_key(key(MSG, id)).unwrap_or(false) {
            self.inner.fresh.remove(id);
        }
        if let Err(e) = self.inner.commit.durable_announced(expected).await {
            self.undo_enqueue(id);
            return Err(e);
        }
        Ok(Enqueued {
            queue: Arc::downgrade(&self.inner),
            id,
            due,
        })
    }

    fn enqueue_record(
        &self,
        msg: NewMessage,
        content: ContentRef,
        size: u64,
    ) -> Result<(Vec<u8>, Contribution), QueueError> {
        let due = msg.received_ms;
        let mut seen = HashSet::new();
        let recipients = msg
            .recipients
            .into_iter()
            .filter(|r| seen.insert(r.to_lowercase()))
            .map(|r| RecipientRecord::new(r, due))
            .collect();
        let record = MessageRecord {
            id: msg.id,
            received_ms: msg.received_ms,
            tenant: msg.tenant,
            sender: msg.sender,
            size,
            submission: msg.submission,
            held: false,
            recipients,
            scheduled_ms: Some(due),
            content,
        };
        // No schedule key yet: the message becomes due only once it is
        // durable and the caller let go of its `Enqueued` (see there).
        Ok((self.inner.codec.encode(&record)?, Contribution::of(&record)))
    }

    fn undo_enqueue(&self, id: QueueId) {
        self.inner.fresh.remove(id);
        // Best effort: the store just failed. If this fails too, recovery
        // keeps the message, and the client's retry may send it twice:
        // twice is acceptable, never zero times.
        let Ok(Some(bytes)) = self.inner.tree.get(key(MSG, id)) else {
            return;
        };
        let mut batch = sled::Batch::default();
        let rec = self.inner.codec.decode(id, &bytes).ok();
        if let Some(s) = rec.as_ref().and_then(|r| r.scheduled_ms) {
            batch.remove(&sched_key(s, id));
        }
        batch.remove(&key(MSG, id));
        if self.inner.tree.apply_batch(batch).is_ok()
            && let Some(rec) = rec
        {
            self.gauges_changed(Some(Contribution::of(&rec)), None);
            self.inner.content.release(&rec.content);
        }
    }

    /// Takes up to `limit` messages that are due at `now_ms` and not held.
    /// A message is never claimed twice at once: it stays out of the
    /// schedule until its outcomes are recorded or the [`Claim`] is dropped.
    pub fn claim_due(&self, now_ms: u64, limit: usize) -> Result<Vec<Claim>, QueueError> {
        let mut claims = Vec::new();
        let end = sched_key(now_ms.saturating_add(1), QueueId::from_u64(0));
        for entry in self.inner.tree.range([SCHED].as_slice()..end.as_slice()) {
            if claims.len() >= limit {
                break;
            }
            let (k, _) = entry?;
            let Some(id) = id_from_key(&k) else { continue };
            let serial = self.inner.serialize(id);
            if self
                .inner
                .claimed
                .lock()
                .expect("claims lock")
                .contains(&id)
            {
                continue;
            }
            // Whoever removes the key owns the message.
            if self.inner.tree.remove(&k)?.is_none() {
                continue;
            }
            let Some(bytes) = self.inner.tree.get(key(MSG, id))? else {
                continue;
            };
            let record = match self.inner.codec.open(id, &bytes) {
                Ok(record) => record,
                // Tampered with while we run: out of the schedule, kept.
                Err(Ok(refused)) => {
                    drop(serial);
                    self.inner.quarantine(id, refused);
                    continue;
                }
                Err(Err(e)) => return Err(e),
            };
            // A key the record no longer names (left by a change that
            // failed half-way) is only removed: the record's own key, if
            // it has one, is elsewhere in the range or still to come.
            if record.held || record.is_complete() || record.scheduled_ms != due_of_key(&k) {
                continue;
            }
            self.inner.claimed.lock().expect("claims lock").insert(id);
            claims.push(Claim {
                record,
                queue: Arc::downgrade(&self.inner),
                settled: false,
            });
        }
        Ok(claims)
    }

    /// When the earliest scheduled message is due (ms since the epoch), if
    /// any is; held and claimed messages are not scheduled.
    pub fn next_due_ms(&self) -> Result<Option<u64>, QueueError> {
        let first = self
            .inner
            .tree
            .scan_prefix([SCHED])
            .keys()
            .next()
            .transpose()?;
        Ok(first.and_then(|k| {
            let due: [u8; 8] = k.get(1..9)?.try_into().ok()?;
            Some(u64::from_be_bytes(due))
        }))
    }

    /// Bytes of content kept in memory for first attempts (at most
    /// [`QueueConfig::fresh_content_bytes`]).
    pub fn fresh_content_bytes(&self) -> usize {
        self.inner.fresh.bytes()
    }

    /// The content for a delivery attempt: the copy kept in memory since
    /// the message was stored, if there is one (then no longer kept), else
    /// [`content`](Self::content). See `fresh.rs`.
    pub fn take_content(&self, id: QueueId) -> Result<Content, QueueError> {
        match self.inner.fresh.take(id) {
            Some(content) => Ok(content),
            None => self.content(id).map(Content::from),
        }
    }

    /// The stored content of a message, checked against its CRC. Safe
    /// while [`compact`](Self::compact) moves it: reads follow the record.
    pub fn content(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        let rec = self.get(id)?;
        self.content_at(id, rec.content)
    }

    /// Reads content from where a record pointed; if that fails because a
    /// compaction moved it meanwhile (and deleted the old segment), follows
    /// the record to the new place.
    fn content_at(&self, id: QueueId, mut at: ContentRef) -> Result<Vec<u8>, QueueError> {
        let mut tries = 0;
        loop {
            // Err(Ok(refused)): to quarantine; Err(Err(e)): to report.
            let read = self
                .inner
                .content
                .read_entry_split::<SEALED_PREFIX>(id, &at);
            let failed: Result<Refused, QueueError> = match read {
                Ok(entry) => match self.inner.codec.open_content_entry(id, entry) {
                    Ok(content) => return Ok(content),
                    Err(e) => e,
                },
                // In an encrypted queue, content that is not what its
                // (authenticated) record says is treated as forged.
                Err(QueueError::Corrupt { reason, .. }) if self.inner.codec.keys().is_some() => {
                    Ok(Refused {
                        kind: QuarantineKind::Content,
                        reason: format!("the content is damaged or altered: {reason}"),
                    })
                }
                Err(e) => Err(e),
            };
            tries += 1;
            let now = self.get(id)?.content;
            if now != at {
                // Moved by a compaction meanwhile: follow the record.
                if tries < 8 {
                    at = now;
                    continue;
                }
                return Err(failed.map_or_else(
                    |e| e,
                    |r| QueueError::Corrupt {
                        id,
                        reason: r.reason,
                    },
                ));
            }
            return Err(match failed {
                Err(e) => e,
                Ok(refused) => {
                    let reason = refused.reason.clone();
                    self.inner.quarantine(id, refused);
                    QueueError::Quarantined { id, reason }
                }
            });
        }
    }

    /// Records the outcome of an attempt for some recipients of a claimed
    /// message (by index into `claim.record.recipients`) and settles the
    /// claim. Durable when it returns `Ok`: the caller may then write the
    /// final log records. A complete message is removed with its content.
    pub async fn record_outcomes(
        &self,
        mut claim: Claim,
        outcomes: Vec<(usize, Outcome)>,
    ) -> Result<AfterOutcome, QueueError> {
        let id = claim.record.id;
        let result = self.update(id, true, |rec| {
            for (index, outcome) in &outcomes {
                let Some(r) = rec.recipients.get_mut(*index) else {
                    continue;
                };
                if r.state.is_final() {
                    continue;
                }
                match outcome {
                    Outcome::Delivered { reply } => {
                        r.state = RecipientState::Delivered;
                        r.attempts += 1;
                        r.last_reply = Some(reply.clone());
                    }
                    Outcome::Deferred {
                        reply,
                        next_attempt_ms,
                    } => {
                        r.state = RecipientState::Deferred;
                        r.attempts += 1;
                        r.next_attempt_ms = *next_attempt_ms;
                        r.last_reply = Some(reply.clone());
                    }
                    Outcome::Bounced { reply } => {
                        r.state = RecipientState::Bounced;
                        r.attempts += 1;
                        r.last_reply = Some(reply.clone());
                    }
                    Outcome::Expired { reply } => {
                        r.state = RecipientState::Expired;
                        r.last_reply = Some(reply.clone());
                    }
                    Outcome::Postponed { next_attempt_ms } => {
                        r.next_attempt_ms = *next_attempt_ms;
                    }
                }
            }
        });
        claim.settle();
        let (after, released) = result?;
        if released.is_some() {
            self.inner.fresh.remove(id);
        }
        self.inner.commit.durable().await?;
        if let Some(c) = released {
            self.inner.content.release(&c);
        }
        Ok(after)
    }

    /// Holds a message: it is not attempted until released. A delivery
    /// already under way finishes.
    pub async fn hold(&self, id: QueueId) -> Result<MessageRecord, QueueError> {
        self.change(id, |rec| rec.held = true).await
    }

    /// Releases a held message; it is due at its recipients' next attempt times.
    pub async fn release(&self, id: QueueId) -> Result<MessageRecord, QueueError> {
        self.change(id, |rec| rec.held = false).await
    }

    /// Makes every pending recipient of a message due at `now_ms`.
    pub async fn retry_now(&self, id: QueueId, now_ms: u64) -> Result<MessageRecord, QueueError> {
        self.change(id, |rec| {
            for r in rec.recipients.iter_mut().filter(|r| !r.state.is_final()) {
                r.next_attempt_ms = r.next_attempt_ms.min(now_ms);
            }
        })
        .await
    }

    /// Removes a message and its content. Returns what it was, so the caller
    /// can write one final record per pending recipient.
    pub async fn delete(&self, id: QueueId) -> Result<MessageRecord, QueueError> {
        let serial = self.inner.serialize(id);
        let removed = self.transact(|tx| {
            let Some(bytes) = tx.get(key(MSG, id))? else {
                return Ok(None);
            };
            let rec = self
                .inner
                .codec
                .decode(id, &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            if let Some(s) = rec.scheduled_ms {
                tx.remove(&sched_key(s, id))?;
            }
            tx.remove(&key(MSG, id))?;
            Ok(Some(rec))
        })?;
        drop(serial);
        let rec = removed.ok_or(QueueError::NotFound(id))?;
        self.inner.fresh.remove(id);
        self.gauges_changed(Some(Contribution::of(&rec)), None);
        self.inner.commit.durable().await?;
        // Only once the removal is durable may the content go.
        self.inner.content.release(&rec.content);
        Ok(rec)
    }

    async fn change(
        &self,
        id: QueueId,
        f: impl Fn(&mut MessageRecord),
    ) -> Result<MessageRecord, QueueError> {
        let mut out = None;
        let (after, released) = self.update(id, false, |rec| {
            f(rec);
            out = Some(rec.clone());
        })?;
        if after == AfterOutcome::Gone {
            return Err(QueueError::NotFound(id));
        }
        if released.is_some() {
            self.inner.fresh.remove(id);
        }
        self.inner.commit.durable().await?;
        if let Some(c) = released {
            self.inner.content.release(&c);
        }
        out.ok_or(QueueError::NotFound(id))
    }

    /// Read-modify-write of one record (compare-and-swap, again if it
    /// changed meanwhile), keeping the schedule index in step and removing the message once complete (then
    /// its content is returned, to be released once the removal is durable).
    /// `settling` is true when the caller is the claim's owner recording its
    /// outcome; anyone else leaves a claimed message's schedule key to the
    /// claim, which puts it back when it settles or is dropped.
    fn update(
        &self,
        id: QueueId,
        settling: bool,
        f: impl FnMut(&mut MessageRecord),
    ) -> Result<(AfterOutcome, Option<ContentRef>), QueueError> {
        let mut f = f;
        // Not a sled transaction: one read, then a compare-and-swap of the
        // one key that is durable state. A transaction (or batch) seals
        // sled's I/O buffer twice, and each seal is a write on sled's thread
        // pool, which wakes all its threads: that cost about a quarter of a
        // millisecond per message. The schedule keys are an index that
        // recovery rebuilds from the records, so they need not change in
        // the same atomic step; the message's lock keeps every change of
        // its record and its schedule key in one order.
        let _serial = self.inner.serialize(id);
        let claimed = !settling
            && self
                .inner
                .claimed
                .lock()
                .expect("claims lock")
                .contains(&id);
        let tree = &self.inner.tree;
        loop {
            let Some(bytes) = tree.get(key(MSG, id))? else {
                return Ok((AfterOutcome::Gone, None));
            };
            let mut rec = self.inner.codec.decode(id, &bytes)?;
            let before = Contribution::of(&rec);
            f(&mut rec);
            let old_due = rec.scheduled_ms.take();
            let (value, after, released, now, new_due) = if rec.is_complete() {
                (None, AfterOutcome::Complete, Some(rec.content), None, None)
            } else {
                let next = rec.next_due_ms();
                let mut new_due = None;
                if !rec.held
                    && let Some(due) = next
                {
                    rec.scheduled_ms = Some(due);
                    // While claimed, the delivery in progress settles the schedule.
                    new_due = (!claimed).then_some(due);
                }
                let now = Contribution::of(&rec);
                (
                    Some(self.inner.codec.encode(&rec)?),
                    AfterOutcome::Pending { next_due_ms: next },
                    None,
                    Some(now),
                    new_due,
                )
            };
            if tree
                .compare_and_swap(key(MSG, id), Some(&bytes), value)?
                .is_err()
            {
                // Rewritten meanwhile (compaction, rekey): start again from
                // what is there now.
                continue;
            }
            if let Some(s) = old_due
                && old_due != new_due
            {
                tree.remove(sched_key(s, id))?;
            }
            // Even when it is the old due time: a claim took the old key.
            if let Some(due) = new_due {
                tree.insert(sched_key(due, id), &[])?;
            }
            self.gauges_changed(Some(before), now);
            return Ok((after, released));
        }
    }

    fn gauges_changed(&self, before: Option<Contribution>, after: Option<Contribution>) {
        if let Some(g) = &self.inner.gauges {
            g.changed(before, after);
        }
    }

    /// Writes `rec`, sealed when the store is, as message `id` inside a
    /// transaction.
    fn put_record(
        &self,
        tx: &TransactionalTree,
        id: QueueId,
        rec: &MessageRecord,
    ) -> Result<(), ConflictableTransactionError<QueueError>> {
        let bytes = self
            .inner
            .codec
            .encode(rec)
            .map_err(ConflictableTransactionError::Abort)?;
        tx.insert(&key(MSG, id), bytes)?;
        Ok(())
    }

    fn transact<T>(
        &self,
        f: impl Fn(&TransactionalTree) -> Result<T, ConflictableTransactionError<QueueError>>,
    ) -> Result<T, QueueError> {
        self.inner.tree.transaction(f).map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => QueueError::Store(e),
        })
    }

    /// One message's record.
    pub fn get(&self, id: QueueId) -> Result<MessageRecord, QueueError> {
        let bytes = self
            .inner
            .tree
            .get(key(MSG, id))?
            .ok_or(QueueError::NotFound(id))?;
        self.inner.codec.decode(id, &bytes)
    }

    /// Messages matching `filter`, oldest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<MessageRecord>, QueueError> {
        let mut out = Vec::new();
        for rec in self.records() {
            let rec = rec?;
            if filter.matches(&rec) {
                out.push(rec);
                if filter.limit.is_some_and(|l| out.len() >= l) {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every record, oldest first.
    pub fn records(&self) -> impl Iterator<Item = Result<MessageRecord, QueueError>> + '_ {
        self.inner.tree.scan_prefix([MSG]).map(|entry| {
            let (k, v) = entry?;
            let id = id_from_key(&k).expect("message keys hold an id");
            self.inner.codec.decode(id, &v)
        })
    }

    /// A qshape-style summary of pending messages at `now_ms`.
    pub fn summary(&self, now_ms: u64, by: SummaryBy) -> Result<Summary, QueueError> {
        let bounds: Vec<u64> = QSHAPE_BUCKETS.to_vec();
        let empty_row = |key: String| SummaryRow {
            key,
            messages: 0,
            recipients: 0,
            counts: vec![0; bounds.len() + 1],
        };
        let mut rows: BTreeMap<String, SummaryRow> = BTreeMap::new();
        let mut total = empty_row("TOTAL".into());
        for rec in self.records() {
            let rec = rec?;
            let age_min = now_ms.saturating_sub(rec.received_ms) / 60_000;
            let bucket = bounds
                .iter()
                .position(|&b| age_min < b)
                .unwrap_or(bounds.len());
            let mut per_key: BTreeMap<String, u64> = BTreeMap::new();
            for r in rec.recipients.iter().filter(|r| !r.state.is_final()) {
                let k = match by {
                    SummaryBy::Domain => r.domain.clone(),
                    SummaryBy::Tenant => rec.tenant.clone().unwrap_or_else(|| "-".into()),
                };
                *per_key.entry(k).or_default() += 1;
            }
            let pending: u64 = per_key.values().sum();
            if pending == 0 {
                continue;
            }
            total.messages += 1;
            total.recipients += pending;
            total.counts[bucket] += 1;
            for (k, n) in per_key {
                let row = rows.entry(k.clone()).or_insert_with(|| empty_row(k));
                row.messages += 1;
                row.recipients += n;
                row.counts[bucket] += 1;
            }
        }
        let mut rows: Vec<SummaryRow> = rows.into_values().collect();
        rows.sort_by(|a, b| b.messages.cmp(&a.messages).then(a.key.cmp(&b.key)));
        Ok(Summary {
            bounds_minutes: bounds,
            total,
            rows,
        })
    }

    /// Number of messages in the queue.
    pub fn len(&self) -> usize {
        self.inner.tree.scan_prefix([MSG]).count()
    }

    /// A key derived from the queue's current encryption key for `label`
    /// ([`QueueKeys::derive`]); `None` when the queue is not encrypted.
    pub fn derive_key(&self, label: &str) -> Option<(KeyId, [u8; 32])> {
        self.inner.codec.keys().map(|k| k.derive(label))
    }

    pub fn is_empty(&self) -> bool {
        self.inner.tree.scan_prefix([MSG]).next().is_none()
    }

    /// An earlier write failed or timed out: the store accepts nothing more
    /// until the process restarts.
    pub fn is_failed(&self) -> bool {
        self.inner.commit.is_failed()
    }

    /// Messages, pending recipients and bytes by state, maintained as
    /// records change (no scan). `None` for a store opened for inspection.
    pub fn shape(&self) -> Option<QueueShape> {
        self.inner.gauges.as_ref().map(Gauges::snapshot)
    }

    /// Calls `observer` after every group commit with the time the flush
    /// took and the number of writers it made durable. Replaces any earlier
    /// observer. It runs on the commit thread: it must be quick.
    pub fn observe_flushes(
        &self,
        observer: impl Fn(std::time::Duration, usize) + Send + Sync + 'static,
    ) {
        self.inner.commit.observe(Arc::new(observer));
    }

    /// Flush statistics since the store was opened.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.commit.stats()
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, QueueError> {
        Ok(self.inner.db.size_on_disk()? + self.inner.content.size_on_disk())
    }

    /// Waits until everything written so far is durable (used at shutdown).
    pub fn sync(&self) -> Result<(), QueueError> {
        self.inner.commit.durable_blocking()
    }

    /// One compaction pass over the content segments; see
    /// [`QueueConfig::compact_below`]. For each closed segment under the
    /// threshold, every live entry is copied to the current segment; once
    /// the copies are durable (group commit), each record is repointed in
    /// its own transaction that first checks the record still points to the
    /// old place (a message completed, deleted or moved meanwhile is left
    /// alone and the copy becomes garbage); once the records are durable,
    /// the old entries are released and emptied segments deleted. Messages
    /// claimed for delivery are moved too: [`content`](Self::content) and
    /// the outcome paths follow the stored record, never the claim's copy.
    ///
    /// Work is done in rounds of up to one segment of bytes (two group
    /// commits each), so no single fsync grows large. A pass does
    /// synchronous file I/O between its waits; for `spawn_blocking` there is
    /// [`compact_blocking`](Self::compact_blocking). Passes running at once
    /// are safe but waste work. A pass that is cancelled or fails loses
    /// nothing: at worst some space stays taken until the next start.
    pub async fn compact(&self) -> Result<CompactionReport, QueueError> {
        let mut pass = self.compaction_start()?;
        while self.compaction_copy(&mut pass) {
            let synced = self.inner.commit.durable().await;
            self.compaction_repoint(&mut pass, synced);
            let durable = if pass.repointed.is_empty() {
                Ok(())
            } else {
                self.inner.commit.durable().await
            };
            self.compaction_release(&mut pass, durable);
        }
        pass.finish()
    }

    /// [`compact`](Self::compact), blocking the calling thread.
    pub fn compact_blocking(&self) -> Result<CompactionReport, QueueError> {
        let pass = self.compaction_start()?;
        self.run_pass_blocking(pass)
    }

    /// Copy, group commit, repoint, group commit, release, until the pass
    /// has nothing left (compaction and rekey share these steps).
    fn run_pass_blocking(&self, mut pass: Pass) -> Result<CompactionReport, QueueError> {
        while self.compaction_copy(&mut pass) {
            let synced = self.inner.commit.durable_blocking();
            self.compaction_repoint(&mut pass, synced);
            let durable = if pass.repointed.is_empty() {
                Ok(())
            } else {
                self.inner.commit.durable_blocking()
            };
            self.compaction_release(&mut pass, durable);
        }
        pass.finish()
    }

    /// Seals everything in the store again under the current key, so that
    /// older keys can leave the key file; meant for `mta queue rekey` with
    /// the daemon stopped (and run by the first opening with keys, to seal
    /// what was written in clear). In order:
    ///
    /// 1. Records in quarantine because their key was missing and that
    ///    open now, or that were in clear, go back to the queue (running
    ///    this is the postmaster vouching for records in clear).
    /// 2. Every content not under the current key is sealed again, with
    ///    compaction's steps (copy, group commit, repoint the record in a
    ///    transaction that checks it still points at the old place, group
    ///    commit, release), so a crash at any point loses nothing.
    /// 3. Every envelope not under the current key is sealed again.
    /// 4. The `k` marks are set to the keys still in use: the current one
    ///    and whatever records left in quarantine were sealed with.
    pub fn rekey_blocking(&self) -> Result<RekeyReport, QueueError> {
        if self.inner.commit.is_failed() {
            return Err(QueueError::Failed);
        }
        let Some(keys) = self.inner.codec.keys().cloned() else {
            return Err(QueueError::Crypto(
                "the queue was opened without a key: nothing to rekey with".into(),
            ));
        };
        if !self.inner.content.is_writable() {
            return Err(QueueError::Store(sled::Error::Unsupported(
                "the queue was opened for reading only".into(),
            )));
        }
        let mut report = RekeyReport {
            restored: self.restore_quarantined(true)?.len(),
            ..Default::default()
        };
        self.inner.commit.durable_blocking()?;

        let pass = self.rekey_pass()?;
        let moved = self.run_pass_blocking(pass)?;
        report.contents = moved.messages_moved;
        // Repointed records were sealed again with their new place.
        report.envelopes = moved.messages_moved;

        let current = keys.current();
        let stale: Vec<QueueId> = self
            .inner
            .tree
            .scan_prefix([MSG])
            .filter_map(|e| {
                let (k, v) = e.ok()?;
                (form_of(&v) != Some(Form::Sealed(current))).then(|| id_from_key(&k))?
            })
            .collect();
        for id in stale {
            let resealed = self.transact(|tx| {
                let Some(bytes) = tx.get(key(MSG, id))? else {
                    return Ok(false);
                };
                if form_of(&bytes) == Some(Form::Sealed(current)) {
                    return Ok(false);
                }
                let Ok(rec) = self.inner.codec.decode(id, &bytes) else {
                    return Ok(false);
                };
                self.put_record(tx, id, &rec)?;
                Ok(true)
            })?;
            report.envelopes += usize::from(resealed);
        }

        let mut in_use: std::collections::BTreeSet<KeyId> = [current].into();
        for entry in self.inner.tree.scan_prefix([QUAR]) {
            let (k, v) = entry?;
            report.quarantined += 1;
            let (Some(id), Some(q)) = (id_from_key(&k), QuarantineEntry::decode(&v)) else {
                continue;
            };
            if let Some(Form::Sealed(kid)) = form_of(&q.stored) {
                in_use.insert(kid);
            }
            if let Some(place) = content_place(id, &q.stored)
                && let Ok((true, body)) = self.inner.content.read_entry(id, &place)
                && let Some(kid) = Codec::content_key(true, &body)
            {
                in_use.insert(kid);
            }
        }
        let mut batch = sled::Batch::default();
        for k in self.inner.tree.scan_prefix([KEYS]).keys() {
            batch.remove(k?);
        }
        for kid in &in_use {
            batch.insert(&keys_key(*kid), &[]);
        }
        self.inner.tree.apply_batch(batch)?;
        self.inner.commit.durable_blocking()?;
        report.keys_in_use = in_use.into_iter().collect();
        Ok(report)
    }

    /// Puts back in the queue the quarantined records that open now: those
    /// sealed under a key that is back in the ring (and whose content opens
    /// too), and, when `clear_too`, those in clear (sealed now). Returns
    /// how many.
    fn restore_quarantined(&self, clear_too: bool) -> Result<Vec<MessageRecord>, QueueError> {
        let mut restored = Vec::new();
        for entry in self.inner.tree.scan_prefix([QUAR]) {
            let (k, v) = entry?;
            let (Some(id), Some(q)) = (id_from_key(&k), QuarantineEntry::decode(&v)) else {
                continue;
            };
            let rec = match q.kind {
                QuarantineKind::UnknownKey => match self.inner.codec.decode(id, &q.stored) {
                    Ok(rec) if self.content_opens(id, &rec.content, false) => rec,
                    _ => continue,
                },
                QuarantineKind::Plaintext if clear_too => {
                    match MessageRecord::decode(id, &q.stored) {
                        Ok(rec) if self.content_opens(id, &rec.content, true) => rec,
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let mut rec = rec;
            let due = if rec.held { None } else { rec.next_due_ms() };
            rec.scheduled_ms = due;
            let bytes = self.inner.codec.encode(&rec)?;
            let mut batch = sled::Batch::default();
            batch.remove(&k);
            batch.insert(&key(MSG, id), bytes);
            if let Some(due) = due {
                batch.insert(&sched_key(due, id), &[]);
            }
            self.inner.tree.apply_batch(batch)?;
            tracing::info!(queue_id = %id, "queue record taken out of quarantine: it opens now");
            restored.push(rec);
        }
        Ok(restored)
    }

    /// Whether a content entry can be read and opened (`clear_ok`: or is
    /// in clear).
    fn content_opens(&self, id: QueueId, at: &ContentRef, clear_ok: bool) -> bool {
        match self.inner.content.read_entry(id, at) {
            Ok((false, _)) => clear_ok,
            Ok((true, body)) => self.inner.codec.open_content(id, true, body).is_ok(),
            Err(_) => false,
        }
    }

    /// Removes a quarantined record and its content, for good: what a
    /// postmaster does after looking at it. Returns what it was.
    pub async fn delete_quarantined(&self, id: QueueId) -> Result<Quarantined, QueueError> {
        let removed = self.transact(|tx| {
            let Some(v) = tx.get(key(QUAR, id))? else {
                return Ok(None);
            };
            tx.remove(&key(QUAR, id))?;
            Ok(Some(v.to_vec()))
        })?;
        let v = removed.ok_or(QueueError::NotFound(id))?;
        self.inner.commit.durable().await?;
        let q = QuarantineEntry::decode(&v);
        // Only once the removal is durable may the content go.
        if let Some(place) = q.as_ref().and_then(|q| content_place(id, &q.stored)) {
            self.inner.content.release(&place);
        }
        Ok(match q {
            Some(q) => Quarantined {
                id,
                kind: q.kind,
                reason: q.reason,
            },
            None => Quarantined {
                id,
                kind: QuarantineKind::Forged,
                reason: "the quarantine entry itself is damaged".into(),
            },
        })
    }

    /// The records in quarantine, oldest first: never delivered, kept (with
    /// their content) for a postmaster.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, QueueError> {
        let mut out = Vec::new();
        for entry in self.inner.tree.scan_prefix([QUAR]) {
            let (k, v) = entry?;
            let Some(id) = id_from_key(&k) else { continue };
            let (kind, reason) = match QuarantineEntry::decode(&v) {
                Some(q) => (q.kind, q.reason),
                None => (
                    QuarantineKind::Forged,
                    "the quarantine entry itself is damaged".into(),
                ),
            };
            out.push(Quarantined { id, kind, reason });
        }
        Ok(out)
    }

    /// Finds the segments to compact (deleting closed ones with nothing
    /// live) and the records that point into them.
    fn compaction_start(&self) -> Result<Pass, QueueError> {
        if self.inner.commit.is_failed() {
            return Err(QueueError::Failed);
        }
        let content = &self.inner.content;
        if !content.is_writable() {
            return Err(QueueError::Store(sled::Error::Unsupported(
                "the queue was opened for reading only".into(),
            )));
        }
        let (candidates, removed) = content.compaction_candidates(self.inner.compact_below);
        let mut pass = Pass {
            content: content.clone(),
            todo: Vec::new(),
            copied: Vec::new(),
            repointed: Vec::new(),
            report: CompactionReport {
                segments_compacted: candidates.len(),
                segments_removed: removed,
                ..Default::default()
            },
            error: None,
            reseal: false,
        };
        if candidates.is_empty() {
            return Ok(pass);
        }
        let candidates: HashSet<u32> = candidates.into_iter().collect();
        for rec in self.records() {
            let rec = match rec {
                Ok(rec) => rec,
                // Reported by recovery and left in place.
                Err(QueueError::Corrupt { .. } | QueueError::Quarantined { .. }) => continue,
                Err(e) => return Err(e),
            };
            if candidates.contains(&rec.content.segment) && !content.is_unadopted(&rec.content) {
                pass.todo.push((rec.id, rec.content));
            }
        }
        // Read in file order; popped from the end.
        pass.todo
            .sort_by_key(|(_, r)| std::cmp::Reverse((r.segment, r.offset)));
        Ok(pass)
    }

    /// A pass that seals every content again under the current key, through
    /// the same copy, repoint and release steps as compaction.
    fn rekey_pass(&self) -> Result<Pass, QueueError> {
        let mut pass = Pass {
            content: self.inner.content.clone(),
            todo: Vec::new(),
            copied: Vec::new(),
            repointed: Vec::new(),
            report: CompactionReport::default(),
            error: None,
            reseal: true,
        };
        for rec in self.records() {
            match rec {
                Ok(rec) if !self.inner.content.is_unadopted(&rec.content) => {
                    pass.todo.push((rec.id, rec.content))
                }
                Ok(_) | Err(QueueError::Corrupt { .. } | QueueError::Quarantined { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        pass.todo
            .sort_by_key(|(_, r)| std::cmp::Reverse((r.segment, r.offset)));
        Ok(pass)
    }

    /// For a rekey pass: the entry sealed under the current key, or `None`
    /// when it already is (or cannot be opened: then its record is
    /// quarantined). Compaction keeps entries as they are.
    fn reseal(
        &self,
        pass: &mut Pass,
        id: QueueId,
        sealed: bool,
        data: Vec<u8>,
    ) -> Option<(bool, Vec<u8>)> {
        if !pass.reseal {
            return Some((sealed, data));
        }
        let codec = &self.inner.codec;
        let current = codec.keys()?.current();
        if Codec::content_key(sealed, &data) == Some(current) {
            return None;
        }
        // Content in clear is taken here: running rekey is the postmaster
        // vouching for it.
        let plain = if sealed {
            match codec.open_content(id, true, data) {
                Ok(plain) => plain,
                Err(Ok(refused)) => {
                    self.inner.quarantine(id, refused);
                    return None;
                }
                Err(Err(e)) => {
                    tracing::warn!(queue_id = %id, error = %e, "content left as it is: it cannot be read");
                    return None;
                }
            }
        } else {
            data
        };
        match codec.seal_content(id, &[&plain]) {
            Ok(Some(bytes)) => Some((true, bytes)),
            Ok(None) => None,
            Err(e) => {
                pass.fail(e);
                None
            }
        }
    }

    /// Copies the next entries, up to one segment of bytes, to the current
    /// segment. Returns whether there are copies to make durable.
    fn compaction_copy(&self, pass: &mut Pass) -> bool {
        if pass.error.is_some() {
            return false;
        }
        let content = &self.inner.content;
        let limit = content.segment_bytes().max(1);
        let mut bytes = 0;
        while bytes < limit
            && let Some((id, old)) = pass.todo.pop()
        {
            let (sealed, data) = match content.read_entry(id, &old) {
                Ok(entry) => entry,
                Err(e) => {
                    // Completed meanwhile (its segment may be gone already),
                    // or damaged: then it stays where it is, for a postmaster.
                    if self.get(id).is_ok_and(|r| r.content == old) {
                        tracing::warn!(queue_id = %id, error = %e, "content left uncompacted: it cannot be read");
                    }
                    continue;
                }
            };
            // Sealed bytes are copied as they are: their associated data
            // is the queue ID, not the place.
            let (sealed, data) = match self.reseal(pass, id, sealed, data) {
                Some(entry) => entry,
                None => continue,
            };
            match content.append_entry(id, sealed, &[&data]) {
                Ok(new) => {
                    bytes += new.span();
                    pass.copied.push(Move { id, old, new });
                }
                Err(e) => {
                    pass.fail(e);
                    break;
                }
            }
        }
        !pass.copied.is_empty()
    }

    /// Once the copies are durable (`synced`), points each record at its
    /// copy, in one transaction per message that checks the record still
    /// points at the old place.
    fn compaction_repoint(&self, pass: &mut Pass, synced: Result<(), QueueError>) {
        if let Err(e) = synced {
            // Pass's drop releases the copies: no record points to them.
            pass.fail(e);
            return;
        }
        while let Some(m) = pass.copied.pop() {
            let (id, old, new) = (m.id, m.old, m.new);
            let result = self.transact(|tx| {
                let Some(bytes) = tx.get(key(MSG, id))? else {
                    return Ok(false);
                };
                let Ok(mut rec) = self.inner.codec.decode(id, &bytes) else {
                    return Ok(false);
                };
                if rec.content != old {
                    return Ok(false);
                }
                rec.content = new;
                self.put_record(tx, id, &rec)?;
                Ok(true)
            });
            match result {
                Ok(true) => pass.repointed.push(m),
                // Completed, deleted or moved meanwhile: the copy is garbage.
                Ok(false) => {
                    self.inner.content.release(&new);
                }
                Err(e) => {
                    // Whether the record changed is unknown: both places stay
                    // counted live until the next start recounts them.
                    if matches!(e, QueueError::Store(sled::Error::Io(_))) {
                        self.inner.commit.fail(&e);
                    }
                    pass.fail(e);
                    return;
                }
            }
        }
    }

    /// Once the repointed records are durable, releases the old entries.
    fn compaction_release(&self, pass: &mut Pass, durable: Result<(), QueueError>) {
        if let Err(e) = durable {
            // The records may or may not be on disk in their new form: both
            // places stay counted live until the next start recounts them.
            pass.repointed.clear();
            pass.fail(e);
            return;
        }
        for m in pass.repointed.drain(..) {
            pass.report.messages_moved += 1;
            pass.report.bytes_moved += m.new.span();
            if self.inner.content.release(&m.old) {
                pass.report.segments_removed += 1;
            }
        }
    }
}

/// A content entry copied by compaction.
struct Move {
    id: QueueId,
    old: ContentRef,
    new: ContentRef,
}

/// One compaction pass in progress.
struct Pass {
    content: Arc<ContentLog>,
    /// Entries still to copy: the message and where its record pointed.
    todo: Vec<(QueueId, ContentRef)>,
    /// Copies written whose records were not repointed yet.
    copied: Vec<Move>,
    /// Records repointed, not yet known durable.
    repointed: Vec<Move>,
    report: CompactionReport,
    error: Option<QueueError>,
    /// A rekey pass: copies are sealed again under the current key (and
    /// entries already under it are left where they are).
    reseal: bool,
}

impl Pass {
    fn fail(&mut self, e: QueueError) {
        self.error.get_or_insert(e);
        self.todo.clear();
    }

    fn finish(mut self) -> Result<CompactionReport, QueueError> {
        match self.error.take() {
            Some(e) => {
                tracing::warn!(report = ?self.report, error = %e, "content compaction stopped");
                Err(e)
            }
            None => Ok(std::mem::take(&mut self.report)),
        }
    }
}

impl Drop for Pass {
    /// Copies that no record points to are garbage (also when a pass is
    /// cancelled between its steps).
    fn drop(&mut self) {
        for m in self.copied.drain(..) {
            self.content.release(&m.new);
        }
    }
}

/// A message just stored, not yet in the schedule. Dropping it (or
/// [`Enqueued::schedule`]) makes it due: reception keeps it until the
/// Reception record is written, so delivery never starts before the message
/// is durable and its reception logged. A crash before that loses nothing:
/// recovery schedules every record.
pub struct Enqueued {
    queue: Weak<Inner>,
    id: QueueId,
    due: u64,
}

impl Enqueued {
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// Puts the message in the schedule now.
    pub fn schedule(self) {}
}

impl std::fmt::Debug for Enqueued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueued").field("id", &self.id).finish()
    }
}

impl Drop for Enqueued {
    fn drop(&mut self) {
        let Some(inner) = self.queue.upgrade() else {
            return;
        };
        let (id, due) = (self.id, self.due);
        let _serial = inner.serialize(id);
        // Idempotent, and only for a message still waiting at that time:
        // a hold, deletion or reschedule in between has settled it already.
        let result = (|| -> Result<(), QueueError> {
            let Some(bytes) = inner.tree.get(key(MSG, id))? else {
                return Ok(());
            };
            let rec = inner.codec.decode(id, &bytes)?;
            if !rec.held && rec.scheduled_ms == Some(due) {
                inner.tree.insert(sched_key(due, id), &[])?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Recovery at the next start schedules it; say so now.
            tracing::error!(queue_id = %id, error = %e, "could not schedule a stored message");
        }
    }
}

/// A message taken for delivery. Record its outcomes with
/// [`Queue::record_outcomes`]; dropped without that, the message goes back
/// in the schedule unchanged.
///
/// A claim does not keep the store open: once the queue is dropped, an
/// unsettled claim is left to recovery at the next start.
pub struct Claim {
    pub record: MessageRecord,
    queue: Weak<Inner>,
    settled: bool,
}

impl Claim {
    fn settle(&mut self) {
        self.settled = true;
        if let Some(inner) = self.queue.upgrade() {
            inner
                .claimed
                .lock()
                .expect("claims lock")
                .remove(&self.record.id);
        }
    }
}

impl Inner {
    /// Held while a message's record and its schedule key change, so that
    /// those changes, which are not one atomic step (see
    /// [`Queue::update`]), happen in one order for each message: otherwise
    /// a removal of an old key could follow an insert of the same key.
    fn serialize(&self, id: QueueId) -> std::sync::MutexGuard<'_, ()> {
        let stripe = (id.as_u64() as usize) % self.serial.len();
        // The guarded data is (): a panic elsewhere leaves nothing to repair.
        self.serial[stripe]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a record out of the live queue into quarantine (`q<id>`),
    /// keeping its envelope as it was and its content where it is.
    fn quarantine(&self, id: QueueId, refused: Refused) {
        self.fresh.remove(id);
        let _serial = self.serialize(id);
        // What the record counted for in the gauges, when it can still be
        // read (bad content, or a record that decodes); a record tampered
        // with while the daemon runs stays counted until the next start.
        let counted = std::cell::Cell::new(None);
        let result = self.tree.transaction(|tx| {
            counted.set(None);
            let Some(bytes) = tx.get(key(MSG, id))? else {
                return Ok(false);
            };
            if let Ok(rec) = self.codec.decode(id, &bytes) {
                counted.set(Some(Contribution::of(&rec)));
                if let Some(s) = rec.scheduled_ms {
                    tx.remove(&sched_key(s, id))?;
                }
            }
            let entry = QuarantineEntry {
                kind: refused.kind,
                reason: refused.reason.clone(),
                stored: bytes.to_vec(),
            };
            tx.remove(&key(MSG, id))?;
            tx.insert(&key(QUAR, id), entry.encode())?;
            Ok::<_, ConflictableTransactionError<QueueError>>(true)
        });
        match result {
            Ok(true) => {
                if let (Some(g), Some(c)) = (&self.gauges, counted.get()) {
                    g.changed(Some(c), None);
                }
                tracing::error!(
                    queue_id = %id,
                    reason = %refused.reason,
                    "queue record quarantined: it will not be delivered; it is kept for a postmaster (mta queue list)"
                )
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, reason = %refused.reason, "could not quarantine a queue record")
            }
        }
    }

    /// Puts a claimed message back in the schedule without recording anything.
    fn unclaim(&self, id: QueueId) {
        let serial = self.serialize(id);
        let result = (|| -> Result<(), QueueError> {
            if let Some(bytes) = self.tree.get(key(MSG, id))? {
                let rec = self.codec.decode(id, &bytes)?;
                if !rec.held
                    && let Some(s) = rec.scheduled_ms
                {
                    self.tree.insert(sched_key(s, id), &[])?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Recovery at the next start puts it back; say so now.
            tracing::error!(queue_id = %id, error = %e, "could not return a claimed message to the schedule");
        }
        self.claimed.lock().expect("claims lock").remove(&id);
        drop(serial);
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("id", &self.record.id)
            .finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled
            && let Some(inner) = self.queue.upgrade()
        {
            inner.unclaim(self.record.id);
        }
    }
}

/// Checks the keys against the store before anything is changed: returns
/// whether the store is sealed (then records in clear are quarantined).
fn check_keys(tree: &sled::Tree, config: &QueueConfig) -> Result<bool, QueueError> {
    let mut marked = Vec::new();
    for k in tree.scan_prefix([KEYS]).keys() {
        let k = k?;
        if let Ok(id) = k[1..].try_into() {
            marked.push(KeyId(id));
        }
    }
    let has_records =
        tree.scan_prefix([MSG]).next().is_some() || tree.scan_prefix([QUAR]).next().is_some();
    let list = |ids: &[KeyId]| {
        ids.iter()
            .map(KeyId::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(keys) = &config.keys else {
        if marked.is_empty() {
            return Ok(false);
        }
        if has_records {
            return Err(QueueError::Encrypted {
                path: config.path.clone(),
                key_ids: list(&marked),
            });
        }
        tracing::warn!("queue encryption is off: the queue was encrypted, and is empty");
        for id in marked {
            tree.remove(keys_key(id))?;
        }
        return Ok(false);
    };
    let ring = keys.ids();
    // No marks: opened with keys for the first time, unless the marks were
    // lost while sealed records remain; then their keys decide.
    if marked.is_empty() {
        for entry in tree.scan_prefix([MSG]).chain(tree.scan_prefix([QUAR])) {
            let (k, v) = entry?;
            let stored = if k[0] == QUAR {
                QuarantineEntry::decode(&v).map(|q| q.stored)
            } else {
                Some(v.to_vec())
            };
            if let Some(Form::Sealed(id)) = stored.as_deref().and_then(form_of)
                && !marked.contains(&id)
            {
                marked.push(id);
            }
        }
    }
    if marked.is_empty() {
        return Ok(false);
    }
    if !marked.iter().any(|id| ring.contains(id)) {
        if has_records {
            return Err(QueueError::WrongKey {
                store: config.path.clone(),
                key_file: keys.path().to_path_buf(),
                sealed_with: list(&marked),
                holds: list(&ring),
            });
        }
        tracing::warn!(
            old = %list(&marked),
            new = %keys.current(),
            "the queue was encrypted with another key and is empty: the new key takes over"
        );
        for id in marked {
            tree.remove(keys_key(id))?;
        }
    }
    Ok(true)
}

fn recover(
    tree: &sled::Tree,
    content: &ContentLog,
    codec: &Codec,
) -> Result<(RecoveryReport, QueueShape), QueueError> {
    let mut report = RecoveryReport::default();
    let mut shape = QueueShape::default();
    let mut batch = sled::Batch::default();
    for k in tree.scan_prefix([SCHED]).keys() {
        batch.remove(k?);
    }
    for entry in tree.scan_prefix([MSG]) {
        let (k, v) = entry?;
        let Some(id) = id_from_key(&k) else { continue };
        let mut rec = match codec.open(id, &v) {
            Ok(rec) => rec,
            Err(Ok(refused)) => {
                // Never delivered, never dropped: out of the schedule, with
                // its content kept.
                tracing::error!(queue_id = %id, reason = %refused.reason, "queue record quarantined: it will not be delivered; it is kept for a postmaster (mta queue list)");
                if let Some(place) = content_place(id, &v) {
                    let _ = content.adopt(&place);
                }
                let entry = QuarantineEntry {
                    kind: refused.kind,
                    reason: refused.reason.clone(),
                    stored: v.to_vec(),
                };
                batch.remove(&k);
                batch.insert(&key(QUAR, id), entry.encode());
                report.quarantined.push((id, refused.reason));
                continue;
            }
            Err(Err(e)) => {
                tracing::error!(queue_id = %id, error = %e, "corrupt queue record left in place");
                if let Some(place) = content_place(id, &v) {
                    let _ = content.adopt(&place);
                }
                report.corrupt.push(id);
                continue;
            }
        };
        shape.add(Contribution::of(&rec));
        if let Err(reason) = content.adopt(&rec.content) {
            // Never delivered, never dropped silently: left for a postmaster.
            tracing::error!(queue_id = %id, %reason, "queue record without its content left in place");
            report.corrupt.push(id);
            continue;
        }
        report.messages += 1;
        report.pending_recipients += rec
            .recipients
            .iter()
            .filter(|r| !r.state.is_final())
            .count();
        let due = if rec.held { None } else { rec.next_due_ms() };
        if let Some(due) = due {
            batch.insert(&sched_key(due, id), &[]);
            report.scheduled += 1;
        }
        if rec.scheduled_ms != due {
            rec.scheduled_ms = due;
            batch.insert(&k, codec.encode(&rec)?);
        }
    }
    for entry in tree.scan_prefix([QUAR]) {
        let (k, v) = entry?;
        let Some(id) = id_from_key(&k) else { continue };
        let Some(q) = QuarantineEntry::decode(&v) else {
            report
                .quarantined
                .push((id, "the quarantine entry itself is damaged".into()));
            continue;
        };
        // Its content stays, whatever happens to the rest.
        if let Some(place) = content_place(id, &q.stored) {
            let _ = content.adopt(&place);
        }
        report.quarantined.push((id, q.reason));
    }
    tree.apply_batch(batch)?;
    report.orphans_removed = content.remove_unreferenced();
    Ok((report, shape))
}

#[cfg(test)]
mod tests {
    //! Compaction's internal steps, for the crash points and races that the
    //! public API cannot stop at.

    use std::collections::HashMap;

    use super::*;

    /// Records the first recipient of `claim` as delivered.
    async fn deliver_first(q: &Queue, claim: Claim) -> Result<AfterOutcome, QueueError> {
        q.record_outcomes(
            claim,
            vec![(
                0,
                Outcome::Delivered {
                    reply: "250".into(),
                },
            )],
        )
        .await
    }

    const T0: u64 = 1_800_000_000_000;
    const HOUR: u64 = 3_600_000;

    fn config(dir: &tempfile::TempDir) -> QueueConfig {
        let mut c = QueueConfig::new(dir.path().join("queue"));
        c.segment_bytes = 4096;
        c
    }

    /// Opens the store, waiting out sled 0.34's background threads, which
    /// hold a dropped instance's file lock for a moment.
    fn reopen(dir: &tempfile::TempDir) -> (Queue, RecoveryReport) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Queue::open(&config(dir)) {
                Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                opened => return opened.unwrap(),
            }
        }
    }

    fn content_of(i: u64) -> Vec<u8> {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..1000 + i % 5)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// 16 messages of ~1 KB in 4 KB segments; all but every fifth delivered,
    /// those deferred for an hour. Returns the deferred ones' contents.
    async fn spread(q: &Queue) -> HashMap<QueueId, Vec<u8>> {
        for i in 0..16 {
            q.enqueue(NewMessage {
                id: q.next_id(T0 + i),
                received_ms: T0 + i,
                tenant: None,
                sender: "s@example.com".into(),
                recipients: vec!["r@d.example".into()],
                submission: Submission::default(),
                head: Vec::new(),
                content: content_of(i),
            })
            .await
            .unwrap();
        }
        let mut kept = HashMap::new();
        for (n, claim) in q.claim_due(T0 + 100, 100).unwrap().into_iter().enumerate() {
            let outcome = if n % 5 == 1 {
                kept.insert(claim.record.id, content_of(n as u64));
                Outcome::Deferred {
                    reply: "451 later".into(),
                    next_attempt_ms: T0 + HOUR,
                }
            } else {
                Outcome::Delivered {
                    reply: "250 ok".into(),
                }
            };
            q.record_outcomes(claim, vec![(0, outcome)]).await.unwrap();
        }
        assert!(q.inner.content.segments() >= 4);
        kept
    }

    /// The live-bytes map counts exactly what the records point to.
    fn assert_accounted(q: &Queue) {
        let referenced: u64 = q.records().map(|r| r.unwrap().content.span()).sum();
        assert_eq!(q.inner.content.live_bytes(), referenced);
    }

    fn assert_contents(q: &Queue, kept: &HashMap<QueueId, Vec<u8>>) {
        assert_eq!(q.len(), kept.len());
        for (id, c) in kept {
            assert_eq!(&q.content(*id).unwrap(), c, "content of {id}");
        }
    }

    async fn deliver_all(q: &Queue) {
        for claim in q.claim_due(T0 + 10 * HOUR, 100).unwrap() {
            let after = deliver_first(q, claim).await.unwrap();
            assert_eq!(after, AfterOutcome::Complete);
        }
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_crash_after_the_copy_and_before_the_repoint_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let (q, _) = reopen(&dir);
            let kept = spread(&q).await;
            let mut pass = q.compaction_start().unwrap();
            assert!(!pass.todo.is_empty());
            assert!(q.compaction_copy(&mut pass));
            q.inner.commit.durable_blocking().unwrap();
            // The process dies here: the copies are durable, no record
            // points to them.
            std::mem::forget(pass);
            kept
        };
        let (q, report) = reopen(&dir);
        assert_eq!(report.messages, kept.len());
        assert!(report.corrupt.is_empty());
        assert_contents(&q, &kept);
        // The orphan copies are garbage, not live.
        assert_accounted(&q);
        let r = q.compact().await.unwrap();
        assert_eq!(r.messages_moved, kept.len(), "{r:?}");
        assert_contents(&q, &kept);
        assert_accounted(&q);
        deliver_all(&q).await;
        assert_eq!(q.inner.content.segments(), 1, "only the current segment");
        assert_eq!(q.inner.content.live_bytes(), 0);
    }

    #[tokio::test]
    async fn a_crash_after_the_repoint_and_before_the_release_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, old) = {
            let (q, _) = reopen(&dir);
            let kept = spread(&q).await;
            let old: HashSet<u32> = q.records().map(|r| r.unwrap().content.segment).collect();
            let mut pass = q.compaction_start().unwrap();
            while q.compaction_copy(&mut pass) {
                q.compaction_repoint(&mut pass, q.inner.commit.durable_blocking());
                // Durable, then the process dies before releasing.
                q.inner.commit.durable_blocking().unwrap();
                pass.repointed.clear();
            }
            (kept, old)
        };
        let (q, report) = reopen(&dir);
        assert_eq!(report.messages, kept.len());
        assert!(report.corrupt.is_empty());
        assert!(report.orphans_removed >= 3, "{report:?}");
        for rec in q.records() {
            assert!(!old.contains(&rec.unwrap().content.segment), "not moved");
        }
        assert_contents(&q, &kept);
        assert_accounted(&q);
        deliver_all(&q).await;
        assert_eq!(q.inner.content.segments(), 1);
    }

    #[tokio::test]
    async fn a_message_completed_or_deleted_during_its_move_stays_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = reopen(&dir);
        let mut kept = spread(&q).await;
        let mut pass = q.compaction_start().unwrap();
        assert!(q.compaction_copy(&mut pass));
        let done = pass.copied[0].id;
        let deleted = pass.copied[1].id;
        // Between the copy and the repoint: one completes, one is deleted.
        let claim = q
            .claim_due(T0 + HOUR, 100)
            .unwrap()
            .into_iter()
            .find(|c| c.record.id == done)
            .unwrap();
        let after = deliver_first(&q, claim).await.unwrap();
        assert_eq!(after, AfterOutcome::Complete);
        q.delete(deleted).await.unwrap();
        kept.remove(&done);
        kept.remove(&deleted);
        while q.compaction_copy(&mut pass) {
            q.compaction_repoint(&mut pass, q.inner.commit.durable_blocking());
            q.compaction_release(&mut pass, q.inner.commit.durable_blocking());
        }
        let report = pass.finish().unwrap();
        assert_eq!(report.messages_moved, kept.len());
        assert!(matches!(q.get(done), Err(QueueError::NotFound(_))));
        assert!(matches!(q.get(deleted), Err(QueueError::NotFound(_))));
        assert_contents(&q, &kept);
        assert_accounted(&q);
        drop(q);
        let (q, report) = reopen(&dir);
        assert_eq!(report.messages, kept.len());
        assert_contents(&q, &kept);
    }

    #[tokio::test]
    async fn a_claimed_message_moved_and_completed_releases_the_right_places() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = reopen(&dir);
        let kept = spread(&q).await;
        let mut claims = q.claim_due(T0 + HOUR, 100).unwrap();
        assert_eq!(claims.len(), kept.len());
        let stale = claims[0].record.content;
        let mut pass = q.compaction_start().unwrap();
        while q.compaction_copy(&mut pass) {
            q.compaction_repoint(&mut pass, q.inner.commit.durable_blocking());
            // The first claimed message completes after its record was
            // repointed, before the move is durable and the old place freed.
            if let Some(c) = claims.pop() {
                deliver_first(&q, c).await.unwrap();
            }
            q.compaction_release(&mut pass, q.inner.commit.durable_blocking());
        }
        pass.finish().unwrap();
        assert_accounted(&q);
        // Delivery reads by id, whatever the claim's copy of the record says;
        // a read that raced with the move follows the record.
        for c in &claims {
            assert_eq!(q.content(c.record.id).unwrap(), kept[&c.record.id]);
        }
        let first = claims[0].record.id;
        assert_ne!(q.get(first).unwrap().content, stale, "moved while claimed");
        assert_eq!(q.content_at(first, stale).unwrap(), kept[&first]);
        for c in claims {
            deliver_first(&q, c).await.unwrap();
        }
        assert!(q.is_empty());
        assert_eq!(q.inner.content.live_bytes(), 0);
        assert_eq!(q.inner.content.segments(), 1);
    }

    #[tokio::test]
    async fn copies_whose_sync_failed_or_pass_was_dropped_are_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = reopen(&dir);
        let kept = spread(&q).await;
        let mut pass = q.compaction_start().unwrap();
        assert!(q.compaction_copy(&mut pass));
        q.compaction_repoint(&mut pass, Err(QueueError::Flush("test".into())));
        assert!(!q.compaction_copy(&mut pass), "a failed pass stops");
        assert!(pass.finish().is_err());
        assert_accounted(&q);
        let mut pass = q.compaction_start().unwrap();
        assert!(q.compaction_copy(&mut pass));
        drop(pass); // cancelled between its steps
        assert_accounted(&q);
        assert_contents(&q, &kept);
    }

    /// Every schedule key names its message's `scheduled_ms`, and each
    /// message that is due, not held and not claimed has exactly its key.
    fn assert_schedule_matches_records(q: &Queue) {
        let mut keys: HashMap<QueueId, Vec<u64>> = HashMap::new();
        for k in q.inner.tree.scan_prefix([SCHED]).keys() {
            let k = k.unwrap();
            keys.entry(id_from_key(&k).unwrap())
                .or_default()
                .push(due_of_key(&k).unwrap());
        }
        let claimed = q.inner.claimed.lock().unwrap().clone();
        for rec in q.records() {
            let rec = rec.unwrap();
            let want = match rec.scheduled_ms {
                Some(due) if !rec.held && !claimed.contains(&rec.id) => vec![due],
                _ => vec![],
            };
            let have = keys.remove(&rec.id).unwrap_or_default();
            assert_eq!(
                have, want,
                "schedule keys of {} (held {})",
                rec.id, rec.held
            );
        }
        assert!(keys.is_empty(), "keys of messages that are gone: {keys:?}");
    }

    fn one_recipient(q: &Queue, at: u64) -> NewMessage {
        NewMessage {
            id: q.next_id(at),
            received_ms: at,
            tenant: None,
            sender: "s@example.com".into(),
            recipients: vec!["r@d.example".into()],
            submission: Submission::default(),
            head: Vec::new(),
            content: content_of(at),
        }
    }

    #[tokio::test]
    async fn a_schedule_key_the_record_does_not_name_claims_nothing_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = reopen(&dir);
        let id = q.enqueue(one_recipient(&q, T0)).await.unwrap().id();
        let claim = q.claim_due(T0, 10).unwrap().pop().unwrap();
        let deferred = Outcome::Deferred {
            reply: "451 later".into(),
            next_attempt_ms: T0 + HOUR,
        };
        q.record_outcomes(claim, vec![(0, deferred)]).await.unwrap();
        // What a change that failed between its record and its key leaves.
        q.inner.tree.insert(sched_key(T0 + 5, id), &[]).unwrap();
        assert!(
            q.claim_due(T0 + 10, 10).unwrap().is_empty(),
            "not before its retry time"
        );
        assert_schedule_matches_records(&q);
        let claims = q.claim_due(T0 + HOUR, 10).unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].record.id, id);
    }

    /// Record changes are a compare-and-swap followed by the schedule key's
    /// change, not one transaction: holds, releases, retries and outcomes
    /// racing on the same messages must still leave one key per due
    /// message, the one its record names.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_changes_leave_each_message_exactly_the_key_its_record_names() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = reopen(&dir);
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(q.enqueue(one_recipient(&q, T0 + i)).await.unwrap().id());
        }
        let ids = Arc::new(ids);
        let mut tasks = Vec::new();
        for worker in 0..4u64 {
            let (q, ids) = (q.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..300u64 {
                    let id = ids[((round * 7 + worker * 3) % 8) as usize];
                    let result = match (round + worker) % 4 {
                        0 => q.hold(id).await.map(|_| ()),
                        1 => q.release(id).await.map(|_| ()),
                        2 => q.retry_now(id, T0 + round % 3).await.map(|_| ()),
                        _ => {
                            for claim in q.claim_due(T0 + 2 * HOUR, 2).unwrap() {
                                let deferred = Outcome::Deferred {
                                    reply: "451 later".into(),
                                    next_attempt_ms: T0 + (round % 5) * 60_000,
                                };
                                q.record_outcomes(claim, vec![(0, deferred)]).await.unwrap();
                            }
                            Ok(())
                        }
                    };
                    result.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(q.len(), 8);
        assert_schedule_matches_records(&q);
    }
}
