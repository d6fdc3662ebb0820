//! Group commit: one fsync makes every write that came before it durable.
//!
//! Writers apply their batch to sled, then wait here. A single thread takes
//! every waiter that has arrived, calls `flush` (which writes and fsyncs
//! sled's log), and wakes them all. Because a waiter registers only after its
//! write was applied, and the thread drains the waiters before it flushes,
//! each flush covers every write of the waiters it wakes. Under load, many
//! sessions share one fsync; alone, a writer waits for exactly one.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::QueueError;

enum Waiter {
    Async(oneshot::Sender<Result<(), QueueError>>),
    Blocking(mpsc::SyncSender<Result<(), QueueError>>),
}

impl Waiter {
    fn wake(self, result: Result<(), QueueError>) {
        // A waiter that gave up (its session closed) is no concern.
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Statistics of the flushes done so far, for metrics and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    pub flushes: u64,
    pub waiters: u64,
    pub flush_time: Duration,
}

#[derive(Debug)]
pub(crate) struct GroupCommit {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<thread::JoinHandle<()>>,
    stats: std::sync::Arc<std::sync::Mutex<CommitStats>>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let stats = std::sync::Arc::new(std::sync::Mutex::new(CommitStats::default()));
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("queue-commit".into())
            .spawn(move || run(db, rx, thread_stats))
            .expect("spawning the queue commit thread");
        GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        }
    }

    fn register(&self, waiter: Waiter) -> Result<(), QueueError> {
        self.tx
            .as_ref()
            .ok_or(QueueError::Closed)?
            .send(waiter)
            .map_err(|_| QueueError::Closed)
    }

    /// Resolves once everything written before this call is on stable storage.
    pub(crate) async fn durable(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.register(Waiter::Async(tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// The same, blocking the calling thread (shutdown paths, tests).
    pub(crate) fn durable_blocking(&self) -> Result<(), QueueError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.register(Waiter::Blocking(tx))?;
        rx.recv().map_err(|_| QueueError::Closed)?
    }

    pub(crate) fn stats(&self) -> CommitStats {
        *self.stats.lock().expect("stats lock")
    }
}

impl Drop for GroupCommit {
    /// Stops the thread and waits for it, so the store's file lock is free
    /// once the queue is dropped (a reopen right after must succeed).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    db: sled::Db,
    rx: mpsc::Receiver<Waiter>,
    stats: std::sync::Arc<std::sync::Mutex<CommitStats>>,
) {
    let mut batch: Vec<Waiter> = Vec::new();
    // Ends when every GroupCommit (and so every sender) is dropped.
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter());
        let started = Instant::now();
        let result = db
            .flush()
            .map(|_| ())
            .map_err(|e| QueueError::Flush(e.to_string()));
        if let Err(e) = &result {
            tracing::error!(error = %e, "queue flush failed");
        }
        {
            let mut s = stats.lock().expect("stats lock");
            s.flushes += 1;
            s.waiters += batch.len() as u64;
            s.flush_time += started.elapsed();
        }
        for waiter in batch.drain(..) {
            waiter.wake(result.clone());
        }
    }
}
