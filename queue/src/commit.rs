//! Group commit: one fsync makes every write that came before it durable.
//!
//! Writers write their content and apply their batch to sled, then wait
//! here. A single thread takes every waiter that has arrived, makes all
//! completed writes durable (fdatasync of the content segments written,
//! sled's flush, fdatasync of sled's file), and wakes them all. Because a waiter registers only after its
//! write was applied, and the thread drains the waiters before it flushes,
//! each flush covers every write of the waiters it wakes. Under load, many
//! sessions share one fsync; alone, a writer waits for exactly one.
//!
//! Writes can be announced ([`ExpectedWrite`]): reception announces each
//! message when its DATA ends, before it is signed. While announced writes
//! have not arrived, a flush waits for them, at most the gather time: a
//! flush costs a fixed amount of CPU (two fdatasyncs and sled's write,
//! each a device request, which a virtual machine makes dear), so under
//! load fewer, larger flushes leave more of the machine for the work
//! itself. Nothing announced, nothing waits: a lone client is not delayed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, mpsc};
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

/// What the commit thread is doing, so that a writer wakes it only when it
/// must: each wake-up is a context switch, and a flush gathers many writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asleep until a writer arrives.
    Idle,
    /// Waiting for announced writes (or the gather time).
    Gathering,
    /// Flushing; it looks at the waiters again when done.
    Flushing,
}

/// The writers' side of the hand-off, under one lock.
struct Pending {
    waiters: Vec<Waiter>,
    /// Announced writes that have not arrived yet.
    expected: usize,
    phase: Phase,
    closed: bool,
}

struct Handoff {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing in Pending is left half-changed by a panic.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the thread if it sleeps with something to do: a first waiter,
    /// or the last announced write arrived while it gathers.
    fn nudge(&self, pending: &Pending) {
        let needed = match pending.phase {
            Phase::Idle => !pending.waiters.is_empty() || pending.closed,
            Phase::Gathering => pending.expected == 0 || pending.closed,
            Phase::Flushing => false,
        };
        if needed {
            self.wake.notify_one();
        }
    }
}

/// Once a flush fails or does not finish in time, the store is failed:
/// sled 0.34 waits forever for a write that hit an I/O error (ENOSPC), so
/// no later flush can be trusted until the process restarts and recovers.
pub(crate) struct GroupCommit {
    handoff: Arc<Handoff>,
    thread: Option<thread::JoinHandle<()>>,
    stats: Arc<Mutex<CommitStats>>,
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
    /// Starts the commit thread; `flush` makes every completed write
    /// durable; a flush waits at most `gather` for announced writes.
    pub(crate) fn start(
        flush: impl FnMut() -> Result<(), QueueError> + Send + 'static,
        timeout: Duration,
        gather: Duration,
    ) -> Self {
        let handoff = Arc::new(Handoff {
            pending: Mutex::new(Pending {
                waiters: Vec::new(),
                expected: 0,
                phase: Phase::Idle,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let failed = Arc::new(AtomicBool::new(false));
        let observer = Arc::new(RwLock::new(None));
        let shared = Shared {
            handoff: handoff.clone(),
            stats: stats.clone(),
            failed: failed.clone(),
            observer: observer.clone(),
            gather,
        };
        let thread = thread::Builder::new()
            .name("queue-commit".into())
            .spawn(move || run(flush, shared))
            .expect("spawning the queue commit thread");
        GroupCommit {
            handoff,
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

    /// Announces a write that is on its way: flushes wait for it (at most
    /// the gather time) until it arrives through
    /// [`GroupCommit::durable_announced`] or is dropped.
    pub(crate) fn expect(&self) -> ExpectedWrite {
        self.handoff.lock().expected += 1;
        ExpectedWrite {
            handoff: Some(self.handoff.clone()),
        }
    }

    fn register(&self, waiter: Waiter, announced: Option<ExpectedWrite>) -> Result<(), QueueError> {
        let arrived = announced.and_then(|mut a| a.handoff.take()).is_some();
        let mut pending = self.handoff.lock();
        // Arriving: no longer expected, in the same step as the waiter
        // joins, so the thread never sees it as both or neither.
        if arrived {
            pending.expected -= 1;
        }
        let result = if self.is_failed() {
            Err(QueueError::Failed)
        } else if pending.closed {
            Err(QueueError::Closed)
        } else {
            pending.waiters.push(waiter);
            Ok(())
        };
        self.handoff.nudge(&pending);
        result
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
        self.durable_announced(None).await
    }

    /// The same, for a write announced with [`GroupCommit::expect`].
    pub(crate) async fn durable_announced(
        &self,
        announced: Option<ExpectedWrite>,
    ) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.register(Waiter::Async(tx), announced)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(r) => r.map_err(|_| QueueError::Closed)?,
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The same, blocking the calling thread (shutdown paths, tests).
    pub(crate) fn durable_blocking(&self) -> Result<(), QueueError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.register(Waiter::Blocking(tx), None)?;
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
        {
            let mut pending = self.handoff.lock();
            pending.closed = true;
            self.handoff.nudge(&pending);
        }
        // A failed store's thread may be stuck inside sled for good; waiting
        // for it would hang shutdown. The process is about to restart anyway.
        if let Some(t) = self.thread.take()
            && !self.is_failed()
        {
            let _ = t.join();
        }
    }
}

/// A write on its way to the store, announced so that group commits wait
/// for it (see the module docs). Dropping it without writing withdraws it.
pub struct ExpectedWrite {
    /// `None` once it arrived.
    handoff: Option<Arc<Handoff>>,
}

impl Drop for ExpectedWrite {
    fn drop(&mut self) {
        if let Some(handoff) = self.handoff.take() {
            let mut pending = handoff.lock();
            pending.expected -= 1;
            handoff.nudge(&pending);
        }
    }
}

impl std::fmt::Debug for ExpectedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpectedWrite")
    }
}

/// What the commit thread shares with the writers.
struct Shared {
    handoff: Arc<Handoff>,
    stats: Arc<Mutex<CommitStats>>,
    failed: Arc<AtomicBool>,
    observer: Arc<RwLock<Option<FlushObserver>>>,
    gather: Duration,
}

fn run(mut flush: impl FnMut() -> Result<(), QueueError>, shared: Shared) {
    let Shared {
        handoff,
        stats,
        failed,
        observer,
        gather,
    } = shared;
    let mut batch: Vec<Waiter> = Vec::new();
    loop {
        {
            let mut pending = handoff.lock();
            // Pending writers are still flushed after close: they wrote.
            while pending.waiters.is_empty() {
                if pending.closed {
                    return;
                }
                pending.phase = Phase::Idle;
                pending = handoff
                    .wake
                    .wait(pending)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            pending.phase = Phase::Gathering;
            let until = Instant::now() + gather;
            while pending.expected > 0 && !pending.closed {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pending = handoff
                    .wake
                    .wait_timeout(pending, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            pending.phase = Phase::Flushing;
            std::mem::swap(&mut batch, &mut pending.waiters);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    /// A group commit whose flush only counts.
    fn counting(gather: Duration) -> (GroupCommit, Arc<AtomicUsize>) {
        let flushes = Arc::new(AtomicUsize::new(0));
        let f = flushes.clone();
        let commit = GroupCommit::start(
            move || {
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
            LONG,
            gather,
        );
        (commit, flushes)
    }

    /// Registers a waiter from another thread; the receiver says when it
    /// was made durable.
    /// Says when a waiter was made durable.
    type Durable = mpsc::Receiver<Result<(), QueueError>>;

    fn wait_in_thread(commit: &Arc<GroupCommit>) -> Durable {
        let (tx, rx) = mpsc::channel();
        let c = commit.clone();
        thread::spawn(move || tx.send(c.durable_blocking()).unwrap());
        rx
    }

    /// A commit with a long gather time, one announced write, and a waiter
    /// (in a thread) that the announcement holds back.
    fn held_back() -> (Arc<GroupCommit>, Arc<AtomicUsize>, ExpectedWrite, Durable) {
        let (commit, flushes) = counting(LONG);
        let commit = Arc::new(commit);
        let announced = commit.expect();
        let first = wait_in_thread(&commit);
        // Not flushed while the announced write has not arrived.
        assert!(first.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(flushes.load(Ordering::SeqCst), 0);
        (commit, flushes, announced, first)
    }

    #[test]
    fn a_flush_waits_for_an_announced_write_and_covers_it() {
        let (commit, flushes, announced, first) = held_back();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(commit.durable_announced(Some(announced)))
            .unwrap();
        first.recv().unwrap().unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1, "one flush for both");
    }

    #[test]
    fn a_withdrawn_announcement_lets_the_flush_go() {
        let (_commit, flushes, announced, first) = held_back();
        drop(announced);
        // Well before the gather time (a minute) runs out.
        first.recv_timeout(LONG / 4).unwrap().unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_gather_time_bounds_the_wait_for_a_write_that_never_comes() {
        let (commit, flushes) = counting(Duration::from_millis(50));
        let commit = Arc::new(commit);
        let _never = commit.expect();
        let started = Instant::now();
        commit.durable_blocking().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn with_nothing_announced_a_writer_does_not_wait_for_the_gather_time() {
        let (commit, flushes) = counting(LONG);
        for n in 1..=3 {
            commit.durable_blocking().unwrap();
            assert_eq!(flushes.load(Ordering::SeqCst), n);
        }
    }

    #[test]
    fn an_announcement_does_not_keep_a_dropped_commit_alive() {
        let (commit, flushes) = counting(LONG);
        let announced = commit.expect();
        drop(commit);
        // The announcement outlives the thread without keeping it alive.
        drop(announced);
        assert_eq!(flushes.load(Ordering::SeqCst), 0);
    }
}
