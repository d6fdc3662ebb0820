//! Delivery: from the queue to the recipients' MX hosts (RFC 5321 §4.5.4,
//! §5), with opportunistic STARTTLS (RFC 3207, RFC 7435), retries with
//! exponential backoff, and RFC 3464 DSNs for bounces and expiries.
//!
//! Flow: the scheduler claims due messages from the queue (at most
//! `max_in_flight` at once) and hands each message's due recipients, one
//! job per destination domain, to that destination's workers
//! ([`destination`]). A worker holds one connection ([`client`]) to an MX
//! host found by [`route`] and sends job after job over it. When every job
//! of a message has its results, the outcomes are stored in the queue
//! (durable) and only then written to the transaction log: one Delivery,
//! TransientFailure, Bounce or Expiration record per recipient and attempt.
//!
//! Trust boundary: MX hosts and DNS answers are untrusted input; nothing
//! they say is executed or stored other than as reply text.

mod bounce;
pub mod client;
pub mod destination;
pub mod dsn;
pub mod outcome;
pub mod route;
pub mod suspend;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::TokioResolver;
use queue::{Claim, MessageRecord, NewMessage, Outcome, Queue, Submission};
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};

use crate::clock::{Clock, millis};
use crate::config::{DeliveryConfig, EgressConfig, OutboundTls};
use crate::log::{Attempt, LoggedReply, Record, TransactionLog};
use crate::metrics::Metrics;
use crate::sign::{Signed, Signer};
use crate::smtp::{Reply, Status};
use crate::spf::checker::SpfChecker;
use client::{ConnInfo, Connection, Envelope, Params, TlsState};
use destination::{Destination, Job, JobResult};
use outcome::{Failure, RcptResult, Scope};
use route::Host;
use suspend::Suspensions;
use tls::ClientTls;

/// Recipients per transaction: RFC 5321 §4.5.3.1.8 obliges servers to
/// take at least 100.
const MAX_RCPTS_PER_TRANSACTION: usize = 100;
/// Addresses tried for one connection before the attempt counts as failed.
const MAX_ADDRESSES_PER_ATTEMPT: usize = 10;
/// Failed handshakes are forgotten after this long, so TLS is tried again.
const HANDSHAKE_MEMORY: Duration = Duration::from_secs(3600);
/// The scheduler looks at the queue at least this often.
const POLL: Duration = Duration::from_secs(1);

/// What delivery needs of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Our name: EHLO (unless an egress names its own), DSNs.
    pub hostname: String,
    pub delivery: DeliveryConfig,
    pub egress: Vec<EgressConfig>,
}

/// Everything delivery shares.
pub struct Delivery {
    settings: Settings,
    relay: Option<Host>,
    queue: Queue,
    log: TransactionLog,
    clock: Arc<dyn Clock>,
    resolver: TokioResolver,
    client_tls: ClientTls,
    signer: Arc<Signer>,
    metrics: Arc<Metrics>,
    destinations: Mutex<HashMap<String, Arc<Destination>>>,
    connections: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    handshake_failures: Mutex<HashMap<String, (u32, Instant)>>,
    egress_next: AtomicUsize,
    rng: Mutex<rand::rngs::StdRng>,
    stopping: AtomicBool,
    spf: Option<Arc<SpfChecker>>,
    suspensions: Arc<Suspensions>,
    /// Reception wakes the scheduler with this after each accepted message.
    pub wake: Arc<Notify>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

/// What delivery is built from.
pub struct Parts {
    pub settings: Settings,
    pub queue: Queue,
    pub log: TransactionLog,
    pub clock: Arc<dyn Clock>,
    pub resolver: TokioResolver,
    pub client_tls: ClientTls,
    pub signer: Arc<Signer>,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// SPF results of our egress IPs: sources that pass for the sender's
    /// domain are preferred.
    pub spf: Option<Arc<SpfChecker>>,
    /// Seed for shuffling MX hosts and jitter; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Destination domains not to be attempted for now.
    pub suspensions: Arc<Suspensions>,
}

/// Where one recipient's attempt went.
#[derive(Debug, Clone, Default)]
struct Via {
    conn: Option<ConnInfo>,
    last_host: Option<(String, SocketAddr)>,
}

impl Delivery {
    pub fn new(p: Parts) -> Arc<Delivery> {
        let d = &p.settings.delivery;
        let relay = route::relay(&d.relay_host);
        let rng = match p.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Arc::new(Delivery {
            relay,
            connections: Arc::new(Semaphore::new(d.max_connections)),
            in_flight: Arc::new(Semaphore::new(d.max_in_flight)),
            settings: p.settings,
            queue: p.queue,
            log: p.log,
            clock: p.clock,
            resolver: p.resolver,
            client_tls: p.client_tls,
            signer: p.signer,
            metrics: p.metrics,
            destinations: Mutex::new(HashMap::new()),
            handshake_failures: Mutex::new(HashMap::new()),
            egress_next: AtomicUsize::new(0),
            rng: Mutex::new(rng),
            stopping: AtomicBool::new(false),
            spf: p.spf,
            suspensions: p.suspensions,
            wake: p.wake,
        })
    }

    fn random_u32(&self) -> u32 {
        self.rng.lock().expect("rng lock").random()
    }

    fn random_f64(&self) -> f64 {
        self.rng.lock().expect("rng lock").random()
    }

    /// Claims due messages and starts their delivery until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let wanted = self.in_flight.available_permits().min(256);
            let mut claimed = 0;
            if wanted > 0 {
                match self.queue.claim_due(self.clock.now_ms(), wanted) {
                    Ok(claims) => {
                        claimed = claims.len();
                        for claim in claims {
                            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                                break;
                            };
                            tokio::spawn(self.clone().deliver(claim, permit));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot read the schedule"),
                }
            }
            if claimed == wanted && wanted > 0 {
                // Probably more due right now.
                tokio::task::yield_now().await;
                continue;
            }
            let pause = if wanted == 0 {
                // Everything in flight: wait for a slot.
                Duration::from_millis(20)
            } else {
                let now = self.clock.now_ms();
                match self.queue.next_due_ms() {
                    Ok(Some(due)) => Duration::from_millis(due.saturating_sub(now)).min(POLL),
                    _ => POLL,
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|&s| s) => break,
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The destination domains suspended by a postmaster.
    pub fn suspensions(&self) -> &Arc<Suspensions> {
        &self.suspensions
    }

    /// Messages being delivered now.
    pub fn in_flight(&self) -> usize {
        self.settings.delivery.max_in_flight - self.in_flight.available_permits()
    }

    /// Delivers one claimed message's due recipients and records the outcomes.
    async fn deliver(self: Arc<Self>, claim: Claim, _permit: OwnedSemaphorePermit) {
        let rec = claim.record.clone();
        let now_ms = self.clock.now_ms();
        let due: Vec<usize> = rec
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.state.is_final() && r.next_attempt_ms <= now_ms)
            .map(|(i, _)| i)
            .collect();
        // Recipients at a suspended domain wait, without an attempt, until
        // the suspension ends.
        let (due, postponed): (Vec<usize>, Vec<usize>) = due.into_iter().partition(|&i| {
            self.suspensions
                .until(&rec.recipients[i].domain, now_ms)
                .is_none()
        });
        let postponed: Vec<(usize, Outcome)> = postponed
            .into_iter()
            .filter_map(|i| {
                let until = self.suspensions.until(&rec.recipients[i].domain, now_ms)?;
                Some((
                    i,
                    Outcome::Postponed {
                        next_attempt_ms: until,
                    },
                ))
            })
            .collect();
        if due.is_empty() {
            if !postponed.is_empty()
                && let Err(e) = self.queue.record_outcomes(claim, postponed).await
            {
                tracing::error!(queue_id = %rec.id, error = %e, "cannot postpone recipients of a suspended domain");
            }
            return;
        }
        // The first attempt usually finds the content still in memory.
        let results: Vec<(usize, RcptResult, Via)> = match self.queue.take_content(rec.id) {
            Ok(content) => self.attempt(&rec, Arc::new(content), &due).await,
            Err(e) => {
                tracing::error!(queue_id = %rec.id, error = %e, "cannot read a message's content");
                let f = Failure::temporary(
                    Scope::Message,
                    Status(4, 3, 0),
                    format!("the queued content cannot be read: {e}"),
                );
                due.iter()
                    .map(|&i| (i, RcptResult::Failed(f.clone()), Via::default()))
                    .collect()
            }
        };
        self.settle(claim, rec, results, postponed).await;
    }

    /// Sends the due recipients, grouped by destination.
    async fn attempt(
        self: &Arc<Self>,
        rec: &MessageRecord,
        content: Arc<queue::Content>,
        due: &[usize],
    ) -> Vec<(usize, RcptResult, Via)> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in due {
            let key = match &self.relay {
                Some(_) => String::new(),
                None => rec.recipients[i].domain.clone(),
            };
            groups.entry(key).or_default().push(i);
        }
        let egress = self.pinned_egress(&queue::domain_of(&rec.sender));
        let mut pending = Vec::new();
        for (domain, idxs) in groups {
            for chunk in idxs.chunks(MAX_RCPTS_PER_TRANSACTION) {
                let (done, rx) = oneshot::channel();
                self.submit(
                    &domain,
                    egress,
                    Job {
                        queue_id: rec.id.to_string(),
                        sender: rec.sender.clone(),
                        recipients: chunk
                            .iter()
                            .map(|&i| rec.recipients[i].address.clone())
                            .collect(),
                        content: content.clone(),
                        smtputf8: rec.submission.smtputf8,
                        body_8bit: rec.submission.body_8bit,
                        egress,
                        done,
                    },
                );
                pending.push((chunk.to_vec(), rx));
            }
        }
        let mut out = Vec::with_capacity(due.len());
        for (idxs, rx) in pending {
            // A job dropped unsent at shutdown made no attempt, so none is
            // recorded: its recipients stay as they were.
            if let Ok(r) = rx.await {
                let via = Via {
                    conn: r.conn,
                    last_host: r.last_host,
                };
                for (i, result) in idxs.into_iter().zip(r.results) {
                    out.push((i, result, via.clone()));
                }
            }
        }
        out
    }

    /// The egress IP a sender's mail must leave from, when SPF passes for
    /// only some of several sources: one of those, in turn. `None` lets any
    /// source carry it. Connections are kept per destination and pinned
    /// source, so a reused connection never carries mail from a source its
    /// sender's SPF does not authorise.
    fn pinned_egress(&self, sender_domain: &str) -> Option<IpAddr> {
        let spf = self.spf.as_ref()?;
        let sources: Vec<IpAddr> = self
            .settings
            .egress
            .iter()
            .filter_map(|e| e.address)
            .collect();
        if sources.len() < 2 || sender_domain.is_empty() {
            return None;
        }
        let passing: Vec<IpAddr> = spf
            .passing(sender_domain)
            .into_iter()
            .filter(|ip| sources.contains(ip))
            .collect();
        if passing.is_empty() || passing.len() == sources.len() {
            return None;
        }
        Some(passing[self.egress_next.fetch_add(1, Ordering::Relaxed) % passing.len()])
    }

    /// Queues a job at its destination: `domain` (empty with a relay host),
    /// from the pinned source if any.
    fn submit(self: &Arc<Self>, domain: &str, egress: Option<IpAddr>, job: Job) {
        let mut key = if domain.is_empty() {
            self.settings.delivery.relay_host.clone()
        } else {
            domain.to_string()
        };
        if let Some(ip) = egress {
            key.push_str(&format!(" via {ip}"));
        }
        let dest = {
            let mut map = self.destinations.lock().expect("destinations lock");
            map.entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Destination::new(
                        key,
                        (!domain.is_empty()).then(|| domain.to_string()),
                        egress,
                        self.settings.delivery.max_connections_per_destination,
                    ))
                })
                .clone()
        };
        if dest.push(job) {
            tokio::spawn(self.clone().worker(dest));
        }
    }

    /// Stores the outcomes, then logs them, then sends DSNs' follow-ups.
    async fn settle(
        &self,
        claim: Claim,
        rec: MessageRecord,
        results: Vec<(usize, RcptResult, Via)>,
        postponed: Vec<(usize, Outcome)>,
    ) {
        if results.is_empty() {
            // Nothing was attempted (shutdown): the claim goes back as it
            // was; postponed recipients are due again and postponed again.
            drop(claim);
            return;
        }
        let now = self.clock.now();
        let now_ms = millis(now);
        let d = &self.settings.delivery;
        let expires_ms = rec
            .received_ms
            .saturating_add(d.max_lifetime.as_millis() as u64);
        let mut outcomes = postponed;
        let mut logged = Vec::with_capacity(results.len());
        for (i, result, via) in results {
            let r = &rec.recipients[i];
            let attempt = r.attempts + 1;
            let (outcome, kind, next) = match &result {
                RcptResult::Delivered(reply) => (
                    Outcome::Delivered {
                        reply: reply_line(reply),
                    },
                    Kind::Delivery,
                    None,
                ),
                RcptResult::Failed(f) => {
                    let permanent =
                        f.is_permanent() && !matches!(f.scope, Scope::Host | Scope::Session);
                    if permanent {
                        (
                            Outcome::Bounced {
                                reply: reply_line(&f.reply),
                            },
                            Kind::Bounce,
                            None,
                        )
                    } else if now_ms >= expires_ms {
                        (
                            Outcome::Expired {
                                reply: reply_line(&f.reply),
                            },
                            Kind::Expiration,
                            None,
                        )
                    } else {
                        let wait = outcome::backoff(
                            d.retry_initial,
                            d.retry_max,
                            attempt,
                            self.random_f64(),
                        );
                        let next = now_ms
                            .saturating_add(wait.as_millis() as u64)
                            .min(expires_ms);
                        (
                            Outcome::Deferred {
                                reply: reply_line(&f.reply),
                                next_attempt_ms: next,
                            },
                            Kind::TransientFailure,
                            Some(next),
                        )
                    }
                }
            };
            outcomes.push((i, outcome));
            logged.push(Settled {
                i,
                result,
                via,
                kind,
                next,
                attempt,
            });
        }
        // A DSN is queued before the failures are final: a crash in between
        // can send it twice, never lose it.
        let failed: Vec<_> = logged
            .iter()
            .filter(|l| matches!(l.kind, Kind::Bounce | Kind::Expiration))
            .collect();
        let dsn_id = if d.bounces && !rec.sender.is_empty() && !failed.is_empty() {
            self.send_dsn(&rec, &failed, now).await
        } else {
            None
        };
        if let Err(e) = self.queue.record_outcomes(claim, outcomes).await {
            // Not stored, so not logged: the recipients stay as they were
            // and are tried again after the store recovers.
            tracing::error!(queue_id = %rec.id, error = %e, "cannot store delivery outcomes");
            return;
        }
        for Settled {
            i,
            result,
            via,
            kind,
            next,
            attempt,
        } in logged
        {
            self.metrics.settled(
                kind.outcome(),
                rec.tenant.as_deref(),
                &rec.recipients[i].domain,
                Duration::from_millis(now_ms.saturating_sub(rec.received_ms)),
            );
            let dsn = matches!(kind, Kind::Bounce | Kind::Expiration)
                .then(|| dsn_id.clone())
                .flatten();
            let a = self.attempt_record(&rec, i, &result, &via, now, attempt, next, dsn);
            self.log.write(kind.record(a));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_record(
        &self,
        rec: &MessageRecord,
        i: usize,
        result: &RcptResult,
        via: &Via,
        now: SystemTime,
        attempt: u32,
        next: Option<u64>,
        dsn_queue_id: Option<String>,
    ) -> Attempt {
        let (reply, scope) = match result {
            RcptResult::Delivered(r) => (r, None),
            RcptResult::Failed(f) => (&f.reply, Some(f.scope.as_str().to_string())),
        };
        let (host, ip) = match (&via.conn, &via.last_host) {
            (Some(c), _) => (Some(c.host.clone()), Some(c.addr.ip().to_string())),
            (None, Some((h, a))) => (Some(h.clone()), Some(a.ip().to_string())),
            (None, None) => (None, None),
        };
        let conn = via.conn.as_ref();
        let tls = conn.map(|c| &c.tls);
        let outcome = match tls {
            Some(TlsState::Tls(o)) => Some(o),
            _ => None,
        };
        Attempt {
            timestamp: time::OffsetDateTime::from(now),
            queue_id: rec.id.to_string(),
            tenant: rec.tenant.clone(),
            sender: rec.sender.clone(),
            recipient: rec.recipients[i].address.clone(),
            attempt,
            delay_seconds: millis(now).saturating_sub(rec.received_ms) as f64 / 1000.0,
            mx_host: host,
            mx_ip: ip,
            egress_ip: conn.and_then(|c| c.local).map(|a| a.ip().to_string()),
            tls: tls.map(|t| t.label().to_string()),
            tls_version: outcome.map(|o| o.version.clone()),
            tls_cipher: outcome.map(|o| o.cipher.clone()),
            tls_verified: outcome.map(|o| o.verified),
            tls_verify_error: outcome.and_then(|o| o.verify_error.clone()),
            reply: LoggedReply::from(reply),
            scope,
            next_attempt: next.map(|ms| {
                time::OffsetDateTime::from(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            }),
            dsn_queue_id,
        }
    }

    /// Builds, signs and queues a DSN to the sender for the recipients that
    /// failed for good. Its queue ID, or `None` when it could not be queued.
    async fn send_dsn(
        &self,
        rec: &MessageRecord,
        failed: &[&Settled],
        now: SystemTime,
    ) -> Option<String> {
        let recipients: Vec<dsn::DsnRecipient> = failed
            .iter()
            .map(|Settled { i, result, via, .. }| {
                let reply = match result {
                    RcptResult::Failed(f) => &f.reply,
                    RcptResult::Delivered(r) => r,
                };
                dsn::DsnRecipient {
                    address: rec.recipients[*i].address.clone(),
                    action: dsn::Action::Failed,
                    status: reply
                        .status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| format!("{}.0.0", reply.code / 100)),
                    remote_mta: via.conn.as_ref().map(|c| c.host.clone()),
                    diagnostic: Some(reply_line(reply)),
                    last_attempt: Some(now),
                    will_retry_until: None,
                }
            })
            .collect();
        match self.queue_dsn(rec, &recipients, now).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!(queue_id = %rec.id, error = %e, "cannot queue a DSN");
                None
            }
        }
    }

    /// Builds, signs and queues a DSN to `rec`'s sender about `recipients`;
    /// the DSN's queue ID once it is durable.
    async fn queue_dsn(
        &self,
        rec: &MessageRecord,
        recipients: &[dsn::DsnRecipient],
        now: SystemTime,
    ) -> Result<String, queue::QueueError> {
        let original = match self.queue.content(rec.id) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(queue_id = %rec.id, error = %e, "cannot read the message for its DSN");
                Vec::new()
            }
        };
        let hostname = self.settings.hostname.clone();
        let id = self.queue.next_id(millis(now));
        let token: u64 = self.rng.lock().expect("rng lock").random();
        let message_id = format!("<{id}.{token:016x}.dsn@{hostname}>");
        let boundary = format!("=_dsn_{token:016x}_{id}");
        let queue_id = rec.id.to_string();
        let content = dsn::build(&dsn::DsnInput {
            reporting_mta: &hostname,
            queue_id: &queue_id,
            original_sender: &rec.sender,
            arrival: std::time::UNIX_EPOCH + Duration::from_millis(rec.received_ms),
            recipients,
            original: &original,
            now,
            message_id: &message_id,
            boundary: &boundary,
        });
        let content = Arc::new(content);
        let signed = self
            .signer
            .sign(content.clone(), &hostname, rec.tenant.as_deref(), now)
            .await;
        let content = Arc::try_unwrap(content).unwrap_or_else(|c| (*c).clone());
        let (content, dkim) = match signed {
            Ok(Signed::Yes {
                mut headers,
                signatures,
            }) => {
                headers.extend_from_slice(&content);
                (headers, signatures)
            }
            Ok(Signed::No { .. }) | Err(_) => {
                // A bounce that cannot be signed is still sent: losing it
                // would hide the failure from the sender.
                tracing::warn!(queue_id = %rec.id, domain = %hostname, "DSN sent unsigned: no DKIM key for the host name's domain");
                (content, Vec::new())
            }
        };
        let message = NewMessage {
            id,
            received_ms: millis(now),
            tenant: rec.tenant.clone(),
            sender: String::new(),
            recipients: vec![rec.sender.clone()],
            submission: Submission {
                helo: Some(hostname.clone()),
                message_id: Some(message_id),
                dkim: dkim
                    .iter()
                    .map(|s| format!("d={} s={} a={}", s.domain, s.selector, s.algorithm))
                    .collect(),
                smtputf8: !rec.sender.is_ascii(),
                // Original headers in UTF-8 make the DSN 8-bit.
                body_8bit: !content.is_ascii(),
                ..Default::default()
            },
            head: Vec::new(),
            content,
        };
        let stored = self.queue.enqueue(message).await?;
        stored.schedule();
        self.metrics.dsn_sent.with_label_values(&["failed"]).inc();
        self.wake.notify_one();
        Ok(id.to_string())
    }

    /// One worker of a destination: one connection at a time, job after job.
    async fn worker(self: Arc<Self>, dest: Arc<Destination>) {
        let mut conn: Option<(Connection, OwnedSemaphorePermit)> = None;
        let d = &self.settings.delivery;
        while let Some(job) = dest.next(d.idle_timeout).await {
            let connection = if conn.is_some() { "reused" } else { "new" };
            let started = Instant::now();
            let result = self.run_job(&dest, &mut conn, &job).await;
            self.metrics
                .delivery_attempt_seconds
                .with_label_values(&[connection])
                .observe(started.elapsed().as_secs_f64());
            if conn.is_none() && result.conn.is_none() {
                // No connection could be opened: the jobs waiting behind
                // this one would fail the same way, after as long a wait.
                for other in dest.drain() {
                    let same = JobResult {
                        results: result
                            .results
                            .iter()
                            .take(1)
                            .cycle()
                            .take(other.recipients.len())
                            .cloned()
                            .collect(),
                        conn: None,
                        last_host: result.last_host.clone(),
                    };
                    let _ = other.done.send(same);
                }
            }
            let _ = job.done.send(result);
            let spent = conn
                .as_ref()
                .is_some_and(|(c, _)| c.broken || c.transactions >= d.messages_per_connection);
            if spent && let Some((c, _permit)) = conn.take() {
                self.close(c).await;
            }
            if self.stopping.load(Ordering::SeqCst) {
                // Jobs still waiting are dropped unsent: their messages go
                // back to the schedule untouched, so a clean stop neither
                // waits for them nor sends anything twice.
                drop(dest.drain());
                dest.retire();
                if let Some((c, _)) = conn.take() {
                    self.close(c).await;
                }
                return;
            }
        }
        if let Some((c, _)) = conn.take() {
            self.close(c).await;
        }
        self.forget_if_idle(&dest);
    }

    /// Removes an idle destination (no jobs, no workers) from the map, so
    /// that sending to millions of domains over time does not keep an entry
    /// for each. A job pushed meanwhile through an old handle still starts
    /// its own worker there.
    fn forget_if_idle(&self, dest: &Arc<Destination>) {
        let mut map = self.destinations.lock().expect("destinations lock");
        if dest.load() == (0, 0) && map.get(&dest.key).is_some_and(|d| Arc::ptr_eq(d, dest)) {
            map.remove(&dest.key);
        }
    }

    /// Destinations with queued jobs or open workers, for tests and metrics.
    pub fn destinations(&self) -> usize {
        self.destinations.lock().expect("destinations lock").len()
    }

    async fn close(&self, c: Connection) {
        if !c.broken {
            c.quit().await;
        }
        self.metrics.outbound_connections.dec();
    }

    /// Sends one job, opening a connection if the worker has none. A reused
    /// connection that turns out dead before the content was sent is
    /// replaced once at once (servers close idle connections).
    async fn run_job(
        &self,
        dest: &Destination,
        conn: &mut Option<(Connection, OwnedSemaphorePermit)>,
        job: &Job,
    ) -> JobResult {
        let env = Envelope {
            sender: &job.sender,
            recipients: &job.recipients,
            smtputf8: job.smtputf8,
            body_8bit: job.body_8bit,
        };
        let all = |f: Failure| vec![RcptResult::Failed(f); job.recipients.len()];
        for round in 0..2 {
            if conn.is_none() {
                match self.open(dest).await {
                    Ok(c) => *conn = Some(c),
                    Err((f, last_host)) => {
                        return JobResult {
                            results: all(f),
                            conn: None,
                            last_host,
                        };
                    }
                }
            }
            let (c, _) = conn.as_mut().expect("opened above");
            let reused = c.transactions > 0;
            let started = Instant::now();
            match c.send(env, &job.content).await {
                Ok(results) => {
                    self.metrics
                        .delivery_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return JobResult {
                        results,
                        conn: Some(c.info.clone()),
                        last_host: None,
                    };
                }
                Err(f) => {
                    let info = c.info.clone();
                    let content_sent = c.content_sent;
                    if let Some((c, _permit)) = conn.take() {
                        self.close(c).await;
                    }
                    if reused && !content_sent && round == 0 {
                        continue;
                    }
                    return JobResult {
                        results: all(f),
                        conn: Some(info),
                        last_host: None,
                    };
                }
            }
        }
        unreachable!("the second round always returns")
    }

    /// The source for a connection to `ip`: the destination's pinned one
    /// when it fits the address family, else round robin over the sources
    /// of that family.
    fn egress_for(&self, ip: IpAddr, pinned: Option<IpAddr>) -> (Option<IpAddr>, String) {
        let fitting: Vec<&EgressConfig> = self
            .settings
            .egress
            .iter()
            .filter(|e| e.address.is_none_or(|a| a.is_ipv4() == ip.is_ipv4()))
            .filter(|e| pinned.is_none_or(|p| e.address == Some(p) || p.is_ipv4() != ip.is_ipv4()))
            .collect();
        if fitting.is_empty() {
            return (None, self.settings.hostname.clone());
        }
        let e = fitting[self.egress_next.fetch_add(1, Ordering::Relaxed) % fitting.len()];
        (
            e.address,
            e.ehlo
                .clone()
                .unwrap_or_else(|| self.settings.hostname.clone()),
        )
    }

    fn plaintext_fallback(&self, host: &str) -> bool {
        let after = self.settings.delivery.tls_fallback_after;
        let mut map = self.handshake_failures.lock().expect("handshake lock");
        match map.get(host) {
            Some((_, since)) if since.elapsed() > HANDSHAKE_MEMORY => {
                map.remove(host);
                false
            }
            Some((n, _)) => after > 0 && *n >= after,
            None => false,
        }
    }

    fn handshake_failed(&self, host: &str) {
        let mut map = self.handshake_failures.lock().expect("handshake lock");
        if map.len() >= 10_000 {
            map.retain(|_, (_, since)| since.elapsed() <= HANDSHAKE_MEMORY);
        }
        let e = map.entry(host.to_string()).or_insert((0, Instant::now()));
        e.0 += 1;
        if e.0 == self.settings.delivery.tls_fallback_after {
            tracing::warn!(
                host,
                failures = e.0,
                "TLS handshakes keep failing; opportunistic TLS sends to this host in plaintext for the next hour"
            );
        }
    }

    /// Opens a connection to the destination: MX hosts in order, each of
    /// their addresses in turn. On failure, the last failure and the host
    /// last tried.
    async fn open(
        &self,
        dest: &Destination,
    ) -> Result<(Connection, OwnedSemaphorePermit), (Failure, Option<(String, SocketAddr)>)> {
        let d = &self.settings.delivery;
        let hosts = match (&self.relay, &dest.domain) {
            (Some(relay), _) => vec![relay.clone()],
            (None, Some(domain)) => {
                route::mx_hosts(&self.resolver, domain, d.port, || self.random_u32())
                    .await
                    .map_err(|f| (f, None))?
            }
            (None, None) => unreachable!("a destination without relay has a domain"),
        };
        let tls_mode = dest
            .domain
            .as_deref()
            .map_or(d.tls, |domain| d.tls_for(domain));
        let mut last_host = None;
        let mut last_failure = None;
        let mut tried = 0;
        'hosts: for host in hosts {
            let addrs = match route::addresses(&self.resolver, &host.name).await {
                Ok(a) => a,
                Err(f) => {
                    last_failure = Some(f);
                    continue;
                }
            };
            for ip in addrs {
                if tried >= MAX_ADDRESSES_PER_ATTEMPT {
                    break 'hosts;
                }
                tried += 1;
                let addr = SocketAddr::new(ip, host.port);
                last_host = Some((host.name.clone(), addr));
                let permit = self
                    .connections
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the connection semaphore is never closed");
                let (egress, ehlo) = self.egress_for(ip, dest.egress);
                let params = Params {
                    ehlo: &ehlo,
                    egress,
                    tls: tls_mode,
                    plaintext_fallback: tls_mode == OutboundTls::Opportunistic
                        && self.plaintext_fallback(&host.name),
                    timeouts: client::Timeouts {
                        connect: d.connect_timeout,
                        command: d.command_timeout,
                        data: d.data_timeout,
                    },
                    client_tls: &self.client_tls,
                };
                match Connection::open(&host.name, addr, &params).await {
                    Ok(c) => {
                        self.metrics
                            .outbound_sessions
                            .with_label_values(&[c.info.tls.label()])
                            .inc();
                        self.metrics.outbound_connections.inc();
                        return Ok((c, permit));
                    }
                    Err(e) => {
                        if e.handshake_failed {
                            self.metrics
                                .outbound_sessions
                                .with_label_values(&["handshake-failed"])
                                .inc();
                            self.handshake_failed(&host.name);
                        }
                        tracing::debug!(host = %host.name, %addr, reply = %reply_line(&e.failure.reply), "connection attempt failed");
                        last_failure = Some(e.failure);
                    }
                }
            }
        }
        Err((
            last_failure.unwrap_or_else(|| {
                Failure::temporary(
                    Scope::Destination,
                    Status(4, 4, 4),
                    format!("no usable host for {}", dest.key),
                )
            }),
            last_host,
        ))
    }
}

/// One recipient's attempt, decided.
struct Settled {
    i: usize,
    result: RcptResult,
    via: Via,
    kind: Kind,
    /// When it is due again (TransientFailure).
    next: Option<u64>,
    attempt: u32,
}

/// The four records an attempt can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
}

impl Kind {
    fn outcome(self) -> &'static str {
        match self {
            Kind::Delivery => "delivered",
            Kind::TransientFailure => "deferred",
            Kind::Bounce => "bounced",
            Kind::Expiration => "expired",
        }
    }

    fn record(self, a: Attempt) -> Record {
        match self {
            Kind::Delivery => Record::Delivery(a),
            Kind::TransientFailure => Record::TransientFailure(a),
            Kind::Bounce => Record::Bounce(a),
            Kind::Expiration => Record::Expiration(a),
        }
    }
}

/// A reply as one line: `550 5.1.1 text`.
pub fn reply_line(r: &Reply) -> String {
    match r.status {
        Some(s) => format!("{} {s} {}", r.code, r.text.replace('\n', " / ")),
        None => format!("{} {}", r.code, r.text.replace('\n', " / ")),
    }
}
