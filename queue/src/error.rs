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

    /// A record (or its content) that failed authentication, was sealed
    /// under a key the ring lacks, or is in clear in an encrypted queue:
    /// taken out of the schedule, never delivered, kept for a postmaster.
    #[error(
        "queue record {id} is quarantined and will not be delivered: {reason} (see `mta queue list`)"
    )]
    Quarantined { id: QueueId, reason: String },

    /// A key file could not be used.
    #[error(transparent)]
    Key(#[from] crate::crypt::KeyError),

    /// The queue holds records sealed under keys none of which the key file
    /// holds: the wrong key file, or a key lost.
    #[error(
        "the queue at {} was encrypted with key {sealed_with}, but the key file {} holds only key {holds}: point [queue] encryption_key_file at the key file the queue was written with (restore it from your backup if it was lost)",
        store.display(), key_file.display()
    )]
    WrongKey {
        store: PathBuf,
        key_file: PathBuf,
        sealed_with: String,
        holds: String,
    },

    /// The queue is encrypted and was opened without a key.
    #[error(
        "the queue at {} is encrypted (key {key_ids}) and was opened without a key: set [queue] encryption_key_file to its key file (encryption cannot be turned off while encrypted messages are queued)",
        path.display()
    )]
    Encrypted { path: PathBuf, key_ids: String },

    /// Sealing failed (the system's random number generator).
    #[error("cannot encrypt for the queue: {0}")]
    Crypto(String),
}
