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
//! * **Commit point.** [`Queue::enqueue`] writes a message's envelope,
//!   content and schedule key in one atomic sled batch, then waits for a
//!   group commit: a dedicated thread calls sled's `flush` (write and fsync
//!   of the log) for all writers waiting at that moment. `enqueue` returns
//!   `Ok` only after that fsync succeeded, and only then may reception answer
//!   `250`. Concurrent sessions share one fsync (group commit), so durability
//!   is the default, not a slow mode.
//! * **Nothing half-written.** A batch is all or nothing. If the fsync fails,
//!   `enqueue` undoes the batch and returns an error; reception answers
//!   `451 4.3.0` and the client keeps the message.
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
//! * **Space.** Once every recipient of a message is final, its envelope and
//!   content are removed in the same transaction that records the last outcome.
//!
//! The store is not encrypted yet (see the data-protection issue).

mod commit;
mod error;
mod id;
mod record;
mod store;

pub use commit::CommitStats;
pub use error::QueueError;
pub use id::{ParseQueueIdError, QueueId};
pub use record::{
    MessageRecord, MessageState, RecipientRecord, RecipientState, Submission, domain_of,
};
pub use store::{
    AfterOutcome, Claim, Filter, NewMessage, Outcome, QSHAPE_BUCKETS, Queue, QueueConfig,
    RecoveryReport, Summary, SummaryBy, SummaryRow,
};
