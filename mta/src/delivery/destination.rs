//! Per-destination work queues and the connections that serve them.
//!
//! A destination is a recipient domain (or the relay host). Jobs (one
//! message's recipients at that destination) wait in its queue; up to
//! `max_connections_per_destination` workers each hold one connection and
//! take jobs one after another, so several messages share a connection
//! (RSET between them) until `messages_per_connection` or `idle_timeout`.
//! A slow or dead destination only ever occupies its own workers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::client::ConnInfo;
use super::outcome::RcptResult;

/// One message's recipients at one destination.
pub struct Job {
    pub queue_id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub content: Arc<queue::Content>,
    pub smtputf8: bool,
    pub body_8bit: bool,
    /// The source the message must leave from (SPF), if pinned.
    pub egress: Option<std::net::IpAddr>,
    pub done: oneshot::Sender<JobResult>,
}

/// What became of a job.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// One per recipient of the job, in order.
    pub results: Vec<RcptResult>,
    /// The connection that carried the transaction, when one was open.
    pub conn: Option<ConnInfo>,
    /// The host last tried, when no connection could be opened.
    pub last_host: Option<(String, std::net::SocketAddr)>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
}

/// A destination's queue of jobs and count of workers.
pub struct Destination {
    pub key: String,
    /// The recipient domain whose TLS policy applies (the key, except for
    /// the relay host).
    pub domain: Option<String>,
    /// The source every connection of this destination leaves from, when
    /// pinned (see `Delivery::pinned_egress`).
    pub egress: Option<std::net::IpAddr>,
    state: Mutex<State>,
    ready: Notify,
    max_workers: usize,
}

impl Destination {
    pub fn new(
        key: String,
        domain: Option<String>,
        egress: Option<std::net::IpAddr>,
        max_workers: usize,
    ) -> Destination {
        Destination {
            key,
            domain,
            egress,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            max_workers,
        }
    }

    /// Queues a job; true when a new worker should be started for it.
    pub fn push(&self, job: Job) -> bool {
        let mut s = self.state.lock().expect("destination lock");
        s.jobs.push_back(job);
        let start = s.workers < self.max_workers && s.jobs.len() > s.idle;
        if start {
            s.workers += 1;
        }
        drop(s);
        self.ready.notify_one();
        start
    }

    /// The next job, waiting at most `idle` for one. `None` retires the
    /// worker (its count is already taken off).
    pub async fn next(&self, idle: Duration) -> Option<Job> {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().expect("destination lock");
                if let Some(job) = s.jobs.pop_front() {
                    return Some(job);
                }
                s.idle += 1;
            }
            let woken = tokio::time::timeout_at(deadline, notified).await.is_ok();
            let mut s = self.state.lock().expect("destination lock");
            s.idle -= 1;
            if !woken && s.jobs.is_empty() {
                s.workers -= 1;
                return None;
            }
        }
    }

    /// Takes every waiting job (a dead destination fails them together
    /// instead of trying to connect once for each).
    pub fn drain(&self) -> Vec<Job> {
        self.state
            .lock()
            .expect("destination lock")
            .jobs
            .drain(..)
            .collect()
    }

    /// A worker stops without waiting for the idle timeout.
    pub fn retire(&self) {
        self.state.lock().expect("destination lock").workers -= 1;
    }

    /// Waiting jobs and workers, for metrics and tests.
    pub fn load(&self) -> (usize, usize) {
        let s = self.state.lock().expect("destination lock");
        (s.jobs.len(), s.workers)
    }
}
