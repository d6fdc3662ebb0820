//! The queue's typed error.

use std::path::PathBuf;

use crate::id::QueueId;

/// Everything that can go wrong in the queue.
///
/// Reception turns every variant into `451 4.3.0` (the message was not
/// accepted; the client keeps it and retries). Nothing is ever half-written:
/// see the crate documentation for the commit point.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The store could not be read or written (disk full, I/O error, corruption
    /// detected by sled).
    #[error("queue store error: {0}")]
    Store(#[from] sled::Error),

    /// Another process holds the store open.
    #[error(
        "the queue at {} is in use by another process: is an mta daemon running? (the CLI reaches a running daemon through its admin socket)",
        path.display()
    )]
    Locked { path: PathBuf },

    /// The data was flushed, but the operating system reported the flush failed.
    #[error("could not make the queue durable (fsync failed): {0}")]
    Flush(String),

    /// An earlier write failed or timed out; nothing more is accepted until
    /// the process restarts and recovers the store.
    #[error("the queue store failed earlier (see the log); restart mta once the disk is healthy")]
    Failed,

    /// The commit thread is gone (the queue is shutting down).
    #[error("the queue is shutting down")]
    Closed,

    /// No message with this ID is in the queue.
    #[error("no message {0} in the queue")]
    NotFound(QueueId),

    /// A stored record could not be decoded.
    #[error("queue record {id} is corrupt: {reason}")]
    Corrupt { id: QueueId, reason: String },
}
