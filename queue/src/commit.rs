//! Group commit: one fsync makes every write that came before it durable.
//!
//! Writers write their content and apply their batch to sled, then wait
//! here. A single thread takes every waiter that has arrived, makes all
//! completed writes durable (fdatasync of the content segments written,
//! sled's flush, fdatasync of sled's file), and wakes them all. Because a waiter registers only after its
//! write was applied, and the thread drains the waiters before it flushes,
//! each flush covers every write of the waiters it wakes. Under load, many
//! sessions share one fsync; alone, a writer waits for exactly one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, mpsc};
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

/// Told of every flush: its duration and how many writers it made durable.
pub(crate) type FlushObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// Once a flush fails or does not finish in time, the store is failed:
/// sled 0.34 waits forever for a write that hit an I/O error (ENOSPC), so
/// no later flush can be trusted until the process restarts and recovers.
pub(crate) struct GroupCommit {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<thread::JoinHandle<()>>,
    stats: std::sync::Arc<std::sync::Mutex<CommitStats>>,
    timeout: Duration,
    failed: Arc<AtomicBool>,
    observer: Arc<RwLock<Option<FlushObserver>>>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("failed", &self.is_failed())
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the commit thread; `flush` makes every completed write durable.
    pub(crate) fn start(
        flush: impl FnMut() -> Result<(), QueueError> + Send + 'static,
        timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let stats = std::sync::Arc::new(std::sync::Mutex::new(CommitStats::default()));
        let failed = Arc::new(AtomicBool::new(false));
        let observer = Arc::new(RwLock::new(None));
        let (thread_stats, thread_failed, thread_observer) =
            (stats.clone(), failed.clone(), observer.clone());
        let thread = thread::Builder::new()
            .name("queue-commit".into())
            .spawn(move || run(flush, rx, thread_stats, thread_failed, thread_observer))
            .expect("spawning the queue commit thread");
        GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            stats,
            timeout,
            failed,
            observer,
        }
    }

    /// Sets the function told of every flush from now on.
    pub(crate) fn observe(&self, observer: FlushObserver) {
        *self.observer.write().expect("observer lock") = Some(observer);
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn register(&self, waiter: Waiter) -> Result<(), QueueError> {
        if self.is_failed() {
            return Err(QueueError::Failed);
        }
        self.tx
            .as_ref()
            .ok_or(QueueError::Closed)?
            .send(waiter)
            .map_err(|_| QueueError::Closed)
    }

    /// Marks the store failed after an error sled treats as fatal.
    pub(crate) fn fail(&self, error: &QueueError) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(
                %error,
                "the queue store failed; reception answers 451 until mta is restarted (check free space and I/O errors first)"
            );
        }
    }

    fn timed_out(&self) -> QueueError {
        self.failed.store(true, Ordering::Relaxed);
        tracing::error!(
            timeout = ?self.timeout,
            "the queue's fsync did not finish in time; the store is marked failed and reception answers 451 until mta is restarted (check free space and I/O errors first)"
        );
        QueueError::Flush(format!(
            "the write was not confirmed within {:?}",
            self.timeout
        ))
    }

    /// Resolves once everything written before this call is on stable storage.
    pub(crate) async fn durable(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.register(Waiter::Async(tx))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(r) => r.map_err(|_| QueueError::Closed)?,
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The same, blocking the calling thread (shutdown paths, tests).
    pub(crate) fn durable_blocking(&self) -> Result<(), QueueError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.register(Waiter::Blocking(tx))?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.timed_out()),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(QueueError::Closed),
        }
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
        // A failed store's thread may be stuck inside sled for good; waiting
        // for it would hang shutdown. The process is about to restart anyway.
        if let Some(t) = self.thread.take()
            && !self.is_failed()
        {
            let _ = t.join();
        }
    }
}

fn run(
    mut flush: impl FnMut() -> Result<(), QueueError>,
    rx: mpsc::Receiver<Waiter>,
    stats: std::sync::Arc<std::sync::Mutex<CommitStats>>,
    failed: Arc<AtomicBool>,
    observer: Arc<RwLock<Option<FlushObserver>>>,
) {
    let mut batch: Vec<Waiter> = Vec::new();
    // Ends when every GroupCommit (and so every sender) is dropped.
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter());
        let started = Instant::now();
        let result = flush().map_err(|e| QueueError::Flush(e.to_string()));
        let took = started.elapsed();
        if let Err(e) = &result {
            failed.store(true, Ordering::Relaxed);
            tracing::error!(error = %e, "queue flush failed; the store is marked failed until mta is restarted");
        }
        {
            let mut s = stats.lock().expect("stats lock");
            s.flushes += 1;
            s.waiters += batch.len() as u64;
            s.flush_time += took;
        }
        if let Some(observe) = observer.read().expect("observer lock").as_ref() {
            observe(took, batch.len());
        }
        for waiter in batch.drain(..) {
            waiter.wake(result.clone());
        }
    }
}
