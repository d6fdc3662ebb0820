//! The durable spool of the mta.
//!
//! This crate owns every message between the `250` that accepted it and the
//! final outcome of its last recipient: the envelope, the content, the state
//! of each recipient, the schedule of due work, holds, and the queries that
//! postmasters run. It knows nothing about SMTP or sockets; reception and
//! delivery drive it through [`Queue`].
//!
//! # Durability guarantee
//!
//! * **Layout.** `<path>/index/` is a sled database of envelopes,
//!   per-recipient state and the schedule; `<path>/content/` holds message
//!   content in append-only segment files (see `content.rs` for why sled
//!   does not hold it).
//! * **Commit point.** [`Queue::enqueue`] writes the content to the current
//!   segment, then the envelope (with the content's place and CRC) in one
//!   sled insert, then waits for a group commit: a
//!   dedicated thread fdatasyncs the segments written, flushes sled and
//!   fdatasyncs sled's file (sled's own flush stops at `sync_file_range`),
//!   for all writers waiting at that moment. `enqueue` returns `Ok` only
//!   after that, and only then may reception answer `250`. Concurrent
//!   sessions share one fsync (group commit), so durability is the default,
//!   not a slow mode. Writes announced with [`Queue::expect_write`] (a
//!   message being signed) hold a commit back for at most
//!   [`QueueConfig::commit_gather`], so that they share it. Only then does the message enter the schedule, when
//!   the caller lets go of the returned [`Enqueued`] (reception does after
//!   writing its Reception record): nothing is delivered before it is
//!   durable and its reception logged.
//! * **Nothing half-written.** The envelope insert is all or nothing, and
//!   content without an envelope is garbage that recovery removes. If the
//!   commit fails, `enqueue` undoes the insert and returns an error;
//!   reception answers `451 4.3.0` and the client keeps the message. Content
//!   is read back through a CRC check.
//! * **Outcomes before log records.** [`Queue::record_outcomes`] returns only
//!   after the new recipient states are durable, so the caller writes final
//!   log records for states that are already stored. A crash between a
//!   remote `250` and that store can deliver twice, never zero times.
//! * **A failing disk.** Every wait for an fsync is bounded
//!   ([`QueueConfig::commit_timeout`]). A flush that fails or times out marks
//!   the store failed: sled 0.34 never finishes a flush after a write error
//!   such as ENOSPC, so from then on every `enqueue` fails at once (451 for
//!   the client) until the process restarts and recovers from what reached
//!   the disk. Reception keeps free space in reserve so that a full disk is
//!   refused before sled meets it.
//! * **Restart.** [`Queue::open`] rebuilds the schedule from the records: a
//!   message claimed for delivery when the process died (cleanly or by
//!   `kill -9`) is due again. A message is never claimed twice at once
//!   within a process.
//! * **Space.** Once every recipient of a message is final, its envelope is
//!   removed by the compare-and-swap that records the last outcome, and its
//!   content is released once that is durable; a segment file is deleted
//!   when nothing in it is live. So that a few long-deferred messages do not
//!   keep whole segments, [`Queue::compact`] (meant to be called
//!   periodically) copies the live entries of each closed segment under
//!   [`QueueConfig::compact_below`] (25 % live by default) to the current
//!   segment, waits for a group commit, repoints each record in a
//!   transaction that checks it still points at the old place, waits for
//!   another, and only then releases the old entries, so the old segment is
//!   deleted. At every instant a durable record points at durable bytes; a
//!   crash mid-pass leaves either the old place referenced (the copy is an
//!   orphan that recovery does not count) or the new one (the old segment is
//!   removed at recovery as unreferenced). After a pass, closed segments
//!   hold at most about four times their live bytes (entries that cannot be
//!   read stay where they are, for a postmaster).
//!
//!
//! # Encryption at rest
//!
//! With keys ([`QueueConfig::keys`], a [`QueueKeys`] ring read from a key
//! file that lives outside the store), every envelope and every content is
//! sealed with AES-256-GCM-SIV under the ring's current key, with a fresh
//! random nonce per seal, before it is written: no address, header or body
//! of a queued message reaches `<path>/` in clear. The associated data is
//! the queue ID and what the bytes are (envelope or content), so sealed
//! bytes cannot be moved to another message or pass for the other kind.
//! Each sealed form starts with its key's id, so after a rotation old
//! records still open with the old key (kept in the file after the new
//! one) and [`Queue::rekey_blocking`] seals them again under the new one.
//! Crash safety is unchanged: sealing happens before the same writes, and
//! compaction copies sealed bytes as they are. See `crypt.rs` (keys, key
//! file, algorithm) and `codec.rs` (stored forms).
//!
//! Trust boundary: the key file and whoever may read it. What the
//! encryption does not hide: queue IDs (hence reception times), due times,
//! sizes and the number of records. An envelope or content that fails
//! authentication, sealed under a key the ring lacks, or in clear in an
//! encrypted store is **quarantined**: moved out of the schedule to its own
//! key with the reason, kept with its content, never delivered, reported by
//! recovery and [`Queue::quarantined`]. Someone who can write the store can
//! still delete records or put back an older sealed version of the same
//! message (at worst a second delivery); they cannot read, alter or swap
//! them. A wrong key file is refused at [`Queue::open`]
//! ([`QueueError::WrongKey`]) rather than quarantining the queue.

mod codec;
mod commit;
mod content;
mod crypt;
mod error;
mod fresh;
mod gauges;
mod id;
mod record;
mod store;

pub use codec::QuarantineKind;
pub use commit::{CommitStats, ExpectedWrite};
pub use crypt::{KEY_LEN, KeyError, KeyId, QueueKeys};
pub use error::QueueError;
pub use fresh::Content;
pub use gauges::{QueueShape, StateTotals};
pub use id::{ParseQueueIdError, QueueId};
pub use record::{
    MessageRecord, MessageState, RecipientRecord, RecipientState, Submission, domain_of,
};
pub use store::{
    AfterOutcome, Claim, CompactionReport, Enqueued, Filter, NewMessage, Outcome, QSHAPE_BUCKETS,
    Quarantined, Queue, QueueConfig, RecoveryReport, RekeyReport, Summary, SummaryBy, SummaryRow,
};
