//! Reception's I/O edge: listeners, connection limits, TLS handshakes,
//! timeouts, and the loop that drives each [`Session`] over a socket.
//!
//! Trust boundary: every byte from a client is untrusted. It goes to the
//! pure session machine; this module only moves bytes, enforces time and
//! connection limits, and carries out the session's steps (handshake,
//! password check off the reactor, storing the message).

mod access;
mod limits;
pub mod password_checks;
mod storage;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use queue::{NewMessage, Queue, Submission};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use access::{Outcome, Tally};
pub use limits::{ConnectionLimits, Slot};
pub use storage::{StorageGuard, available_bytes};

/// A reception connection: plaintext until STARTTLS.
type Stream = crate::stream::Stream<tokio_rustls::server::TlsStream<TcpStream>>;

use crate::auth::{AuthThrottle, Users};
use crate::clock::{Clock, millis};
use crate::log::{self, Record, SessionInfo, TransactionLog};
use crate::metrics::{Metrics, RejectReason, reasons};
use crate::policy::canonical_ip;
use crate::reception;
use crate::sign::{Signed, Signer};
use crate::smtp::command::BodyType;
use crate::smtp::reply::replies;
use crate::smtp::{
    AuthOutcome, AuthRequest, Envelope, Event, Peer, Reply, Session, SessionConfig, Status, Step,
};
use crate::spf::checker::{SpfChecker, WARN_WAIT};

/// Time limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub command: Duration,
    pub data: Duration,
    pub handshake: Duration,
    pub auth_failure_delay: Duration,
}

/// What sessions read from the configuration. SIGHUP builds a new one and
/// swaps it in whole; each connection takes the one current when it is
/// accepted and keeps it to its end, so a reload never changes the rules
/// (networks, tenants, users, limits) in the middle of a session.
pub struct Live {
    /// The session's settings and the reception policy (`session.policy`).
    pub session: Arc<SessionConfig>,
    pub users: Arc<Users>,
    /// The certificate. Taken afresh at every handshake, so that a STARTTLS
    /// after a reload already presents the new one.
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
}

/// Everything sessions share.
pub struct Receiver {
    /// The current [`Live`] settings; read with [`Receiver::live`].
    pub live: RwLock<Arc<Live>>,
    pub throttle: AuthThrottle,
    /// The threads that check passwords, one per two cores: a crowd
    /// sending AUTH at once waits for them instead of taking memory and
    /// every core.
    pub password_checks: password_checks::PasswordChecks,
    pub limits: Arc<ConnectionLimits>,
    pub queue: Queue,
    pub log: TransactionLog,
    pub clock: Arc<dyn Clock>,
    pub storage: StorageGuard,
    pub signer: Arc<Signer>,
    pub metrics: Arc<Metrics>,
    /// Wakes delivery when a message is queued.
    pub wake: Arc<tokio::sync::Notify>,
    /// SPF of senders for our egress IPs; `None` with `[spf] policy = "off"`.
    pub spf: Option<Arc<SpfChecker>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

fn timestamp(clock: &dyn Clock) -> log::Timestamp {
    time::OffsetDateTime::from(clock.now())
}

/// Writing to a client that does not read must not hold a task forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

impl Receiver {
    /// The settings new connections get now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("live lock").clone()
    }

    /// Swaps in new settings (SIGHUP); open sessions keep theirs.
    pub fn replace_live(&self, live: Live) {
        *self.live.write().expect("live lock") = Arc::new(live);
    }

    fn info(&self, peer: SocketAddr, session: Option<&Session>) -> SessionInfo {
        let mut info = SessionInfo {
            peer_ip: canonical_ip(peer.ip()).to_string(),
            peer_port: peer.port(),
            ..Default::default()
        };
        if let Some(s) = session {
            info.helo = s.helo_name().map(str::to_string);
            info.set_tls(s.tls());
            if let Some(id) = s.identity() {
                info.auth_user = Some(id.user.clone());
                info.tenant = Some(id.tenant.clone());
            }
        }
        info
    }

    fn reject(&self, info: SessionInfo, command: &str, reply: &Reply) -> Record {
        Record::Rejection(log::Rejection {
            timestamp: timestamp(self.clock.as_ref()),
            session: info,
            command: command.to_string(),
            sender: None,
            recipient: None,
            recipients: Vec::new(),
            reply: reply.into(),
        })
    }

    fn log_events(&self, peer: SocketAddr, session: &mut Session, tally: &mut Tally) {
        for event in session.take_events() {
            let info = self.info(peer, Some(session));
            let record = match event {
                Event::Rejected {
                    command,
                    reply,
                    sender,
                    recipient,
                } => {
                    self.metrics.rejected(reasons::classify(command, &reply));
                    tally.rejected(&reply);
                    // The session's own 421 (a timeout or shutdown has
                    // already given its reason): too many protocol errors.
                    if reply.code == 421 {
                        tally.ends(Outcome::TooManyErrors);
                    }
                    let mut rec = self.reject(info, command, &reply);
                    if let Record::Rejection(r) = &mut rec {
                        r.sender = sender;
                        r.recipient = recipient;
                    }
                    rec
                }
                Event::AuthFailed {
                    mechanism,
                    user,
                    reason,
                    reply,
                } => {
                    self.metrics.auth_failed(reason);
                    tally.auth_failed();
                    if reply.code == 421 {
                        tally.ends(Outcome::TooManyAuthFailures);
                    }
                    Record::AuthFailure(log::AuthFailure {
                        timestamp: timestamp(self.clock.as_ref()),
                        session: info,
                        mechanism: mechanism.to_string(),
                        user,
                        reason: reason.to_string(),
                        reply: (&reply).into(),
                    })
                }
            };
            self.log.write(record);
        }
    }

    /// The AuthSuccess record, written at once so that a login shows in
    /// `mta audit logins` while its session is still open.
    fn log_login(
        &self,
        peer: SocketAddr,
        session: &Session,
        mechanism: &str,
        id: &crate::smtp::Identity,
    ) {
        let mut info = self.info(peer, Some(session));
        info.auth_user = None;
        info.tenant = Some(id.tenant.clone());
        self.log.write(Record::AuthSuccess(log::AuthSuccess {
            timestamp: timestamp(self.clock.as_ref()),
            session: info,
            mechanism: mechanism.to_string(),
            user: id.user.clone(),
        }));
    }

    /// Writes the Session record of a session that has ended.
    fn end_session(&self, peer: SocketAddr, session: Option<&Session>, tally: Tally) {
        let record = tally.finish(timestamp(self.clock.as_ref()), self.info(peer, session));
        self.log.write(Record::Session(record));
    }

    /// Checks the credentials off the reactor, with the throttle (per
    /// address and per user name) and the delay after a failure.
    async fn authenticate(&self, live: &Live, ip: IpAddr, req: AuthRequest) -> AuthOutcome {
        let now = Instant::now();
        match self.throttle.check(ip, &req.user, now) {
            Some(crate::auth::Lockout::Address) => return AuthOutcome::Locked,
            Some(crate::auth::Lockout::User) => {
                // Delayed like a failure, so the lockout costs a guesser
                // the same time as a wrong password.
                tokio::time::sleep(live.timeouts.auth_failure_delay).await;
                return AuthOutcome::UserLocked;
            }
            None => {}
        }
        let users = live.users.clone();
        let (user, password) = (req.user.clone(), req.password);
        let verified = self.password_checks.verify(users, user, password).await;
        let identity = match verified {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "password check failed");
                return AuthOutcome::TempFail;
            }
        };
        let reason = match identity {
            Some(id) if req.authzid.as_ref().is_none_or(|z| *z == id.user) => {
                self.throttle.record_success(ip, &id.user, now);
                return AuthOutcome::Success(id);
            }
            Some(_) => "authorization identity refused",
            None => "invalid credentials",
        };
        self.throttle.record_failure(ip, &req.user, now);
        tokio::time::sleep(live.timeouts.auth_failure_delay).await;
        AuthOutcome::Failure { reason }
    }

    /// The SPF verdict at MAIL FROM under `enforce` (the step is only
    /// asked for then).
    async fn check_sender(&self, sender: &str) -> Result<(), Reply> {
        let Some(spf) = &self.spf else {
            return Ok(());
        };
        let domain = queue::domain_of(sender);
        let verdict = spf.verdict(&domain).await;
        spf.decide(&verdict)
    }

    /// The SPF note of a Reception record. Under `warn` the check may still
    /// be running: it gets [`WARN_WAIT`], then goes on for later messages.
    async fn spf_note(&self, sender: &str) -> Option<log::SpfNote> {
        let spf = self.spf.clone()?;
        if sender.is_empty() {
            return None;
        }
        let domain = queue::domain_of(sender);
        let task = tokio::spawn({
            let domain = domain.clone();
            async move { spf.verdict(&domain).await }
        });
        let (ip, result) = match tokio::time::timeout(WARN_WAIT, task).await {
            Ok(Ok(v)) => (
                v.evaluation.map(|e| e.ip.to_string()),
                v.result.as_str().to_string(),
            ),
            _ => (None, "pending".to_string()),
        };
        self.metrics
            .spf_messages
            .with_label_values(&[&result])
            .inc();
        Some(log::SpfNote { domain, ip, result })
    }

    /// DMARC alignment (RFC 7489) of the message as we will send it: the
    /// From: domain against our own DKIM signatures and the MAIL FROM
    /// domain (when SPF passed). Like SPF, it waits at most [`WARN_WAIT`]
    /// unless the policy is enforce.
    async fn dmarc_note(
        &self,
        from_domain: &str,
        dkim: &[crate::sign::SignatureInfo],
        sender: &str,
        spf: Option<&log::SpfNote>,
    ) -> Option<(crate::dmarc::Verdict, log::DmarcNote)> {
        let checker = self.spf.clone()?;
        if from_domain.is_empty() {
            return None;
        }
        let dns = checker.dns().clone();
        let from = from_domain.to_string();
        let task = tokio::spawn(async move { crate::dmarc::discover(&dns, &from).await });
        let wait = if checker.policy() == crate::config::SpfPolicy::Enforce {
            Duration::from_secs(30)
        } else {
            WARN_WAIT
        };
        let discovery = match tokio::time::timeout(wait, task).await {
            Ok(Ok(d)) => d,
            _ => crate::dmarc::Discovery::TempError("the DMARC lookup did not finish".into()),
        };
        let signers: Vec<String> = dkim.iter().map(|s| s.domain.clone()).collect();
        let mail_from = (!sender.is_empty()).then(|| queue::domain_of(sender));
        let spf_pass = spf.is_some_and(|n| n.result == "pass");
        let verdict = crate::dmarc::evaluate(
            &discovery,
            from_domain,
            &signers,
            mail_from.as_deref(),
            spf_pass,
        );
        let outcome = verdict.outcome();
        self.metrics
            .dmarc_messages
            .with_label_values(&[outcome])
            .inc();
        let note = log::DmarcNote {
            from_domain: verdict.from_domain.clone(),
            policy: verdict.policy.map(|p| p.as_str().to_string()),
            dkim_aligned: verdict.dkim_aligned,
            spf_aligned: verdict.spf_aligned,
            result: outcome.to_string(),
        };
        Some((verdict, note))
    }

    /// Checks, stores and logs a complete message; the queue ID on success.
    async fn receive(
        &self,
        live: &Live,
        mut env: Envelope,
        info: SessionInfo,
    ) -> Result<String, Reply> {
        let now = self.clock.now();
        // Announced now, while it is signed: a group commit under way waits
        // for it rather than taking an fsync of its own (dropped on refusal).
        let expected = self.queue.expect_write();
        // Signing runs on this task. Yielding first lets the other sessions
        // whose DATA ended in the same wake-up announce theirs before any
        // is signed, so one flush covers them all instead of the first few
        // (measured: about half as many flushes; docs/performance.md).
        tokio::task::yield_now().await;
        let id = self.queue.next_id(millis(now));
        let id_text = id.to_string();
        let refuse = |reply: Reply, env: &Envelope, reason: RejectReason| {
            self.metrics.rejected(reason);
            self.log.write(Record::Rejection(log::Rejection {
                timestamp: timestamp(self.clock.as_ref()),
                session: info.clone(),
                command: "DATA".into(),
                sender: Some(env.sender.clone()),
                recipient: None,
                recipients: env.recipients.clone(),
                reply: (&reply).into(),
            }));
            reply
        };
        let prepared = match reception::prepare(
            &env,
            &live.session.policy,
            &live.session.hostname,
            &id_text,
            now,
            rand::random(),
        ) {
            Ok(p) => p,
            Err(reply) => {
                // The From: domain outside the tenant's is a policy refusal;
                // the others are about malformed header fields.
                let reason = if reply.status == Some(Status(5, 7, 1)) {
                    RejectReason::SenderNotAllowed
                } else {
                    RejectReason::Content
                };
                return Err(refuse(reply, &env, reason));
            }
        };
        // Sign once, before storing: every retry sends the same signature.
        let reception::Prepared {
            added,
            message_id,
            from_domain,
        } = prepared;
        let original = Arc::new(std::mem::take(&mut env.content));
        let signed = match self
            .signer
            .sign_below(
                added.clone(),
                original.clone(),
                &from_domain,
                env.tenant.as_deref(),
                now,
            )
            .await
        {
            Ok(s) => s,
            Err(reply) => {
                // Permanent: unsigned mail refused by policy; temporary: the
                // signing itself failed.
                let reason = if reply.is_transient() {
                    RejectReason::Internal
                } else {
                    RejectReason::Unsigned
                };
                return Err(refuse(reply, &env, reason));
            }
        };
        // Signatures and our fields go on top of the message as the store
        // writes it: the message itself is not copied to make room.
        let (on_top, dkim, dkim_unsigned) = match signed {
            Signed::Yes {
                headers,
                signatures,
            } => (headers, signatures, None),
            Signed::No { reason } => (Vec::new(), Vec::new(), Some(reason)),
        };
        let mut head = on_top;
        head.extend_from_slice(&added);
        // The signer has let go of it by now: no copy.
        let content = Arc::unwrap_or_clone(original);
        // SPF and DMARC alignment of what we are about to send: a message
        // that would fail DMARC at a p=reject domain is refused under
        // enforce rather than sent to be rejected.
        let spf = self.spf_note(&env.sender).await;
        let dmarc = self
            .dmarc_note(&from_domain, &dkim, &env.sender, spf.as_ref())
            .await;
        if let (Some(checker), Some((verdict, _))) = (&self.spf, &dmarc)
            && checker.policy() == crate::config::SpfPolicy::Enforce
            && verdict.would_be_rejected()
        {
            return Err(refuse(
                Reply::new(
                    550,
                    Status(5, 7, 1),
                    format!(
                        "Message refused: it would fail DMARC at {} (p=reject): neither a DKIM signature nor SPF aligns with the From: domain {}",
                        verdict
                            .record_domain
                            .as_deref()
                            .unwrap_or(&verdict.from_domain),
                        verdict.from_domain
                    ),
                ),
                &env,
                RejectReason::Dmarc,
            ));
        }
        let dmarc = dmarc.map(|(_, note)| note);
        let size = (head.len() + content.len()) as u64;
        // The store writes the message and its record; twice the size keeps
        // the estimate on the safe side.
        if !self.storage.check(size.saturating_mul(2)) {
            return Err(refuse(
                replies::insufficient_storage(),
                &env,
                RejectReason::Storage,
            ));
        }
        let message = NewMessage {
            id,
            received_ms: millis(now),
            tenant: env.tenant.clone(),
            sender: env.sender.clone(),
            recipients: env.recipients.clone(),
            submission: Submission {
                peer_ip: Some(info.peer_ip.clone()),
                helo: Some(env.helo.clone()),
                auth_user: env.auth.as_ref().map(|a| a.user.clone()),
                smtputf8: env.params.smtputf8,
                body_8bit: env.params.body == BodyType::EightBitMime,
                message_id: message_id.clone(),
                dkim: dkim
                    .iter()
                    .map(|s| format!("d={} s={} a={}", s.domain, s.selector, s.algorithm))
                    .collect(),
            },
            head,
            content,
        };
        let stored = match self.queue.enqueue_expected(message, expected).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "could not store a message; answered 451");
                return Err(refuse(
                    replies::storage_failure(),
                    &env,
                    RejectReason::Storage,
                ));
            }
        };
        self.metrics
            .received(env.tenant.as_deref(), &env.recipients);
        let mut info = info;
        info.tenant = env.tenant.clone();
        // Written before the 250: a crash after the reply cannot lose it.
        self.log
            .write_acked(Record::Reception(log::Reception {
                timestamp: timestamp(self.clock.as_ref()),
                queue_id: id_text.clone(),
                session: info,
                protocol: env.protocol(),
                sender: env.sender,
                recipients: env.recipients,
                size,
                message_id,
                dkim,
                dkim_unsigned,
                spf,
                dmarc,
            }))
            .await;
        // Only now may delivery start: the message is durable and its
        // Reception record comes before any delivery record.
        stored.schedule();
        self.wake.notify_one();
        Ok(id_text)
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn accept_loop(
    rx: Arc<Receiver>,
    listener: TcpListener,
    implicit_tls: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => return,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let ip = canonical_ip(peer.ip());
        // The settings of this connection, from accept to close.
        let live = rx.live();
        let refusal = if !live.session.policy.is_allowed(ip) {
            Err((
                RejectReason::NetworkNotAllowed,
                Reply::new(
                    554,
                    Status(5, 7, 1),
                    format!(
                        "{} Access denied: your address is not allowed to connect",
                        live.session.hostname
                    ),
                ),
            ))
        } else {
            rx.limits
                .acquire(ip)
                .map_err(|r| (RejectReason::ConnectionLimit, r))
        };
        match refusal {
            Ok(slot) => {
                let rx = rx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    rx.metrics.smtp_sessions.inc();
                    serve(&rx, &live, socket, peer, implicit_tls, shutdown).await;
                    rx.metrics.smtp_sessions.dec();
                    drop(slot);
                });
            }
            Err((reason, reply)) => {
                rx.metrics.rejected(reason);
                rx.log
                    .write(rx.reject(rx.info(peer, None), "CONNECT", &reply));
                tokio::spawn(async move { refuse_connection(socket, reply, implicit_tls).await });
            }
        }
    }
}

async fn refuse_connection(mut socket: TcpStream, reply: Reply, implicit_tls: bool) {
    // A TLS client cannot read a plaintext reply; it just sees the close.
    if !implicit_tls {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.shutdown()).await;
}

async fn handshake(
    rx: &Receiver,
    socket: TcpStream,
) -> Result<(Stream, crate::smtp::TlsInfo), String> {
    // The certificate current now, even in a session opened before a reload.
    let live = rx.live();
    let acceptor = live.tls.as_ref().ok_or("TLS is not configured")?;
    match tokio::time::timeout(live.timeouts.handshake, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => {
            let info = crate::tls::info(tls.get_ref().1);
            Ok((Stream::Tls(Box::new(tls)), info))
        }
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

async fn flush(io: &mut Stream, session: &mut Session) -> std::io::Result<()> {
    let out = session.output();
    if out.is_empty() {
        return Ok(());
    }
    let result = match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(out)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    };
    out.clear();
    result
}

/// Drives one session until it ends.
async fn serve(
    rx: &Receiver,
    live: &Live,
    socket: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let ip = canonical_ip(peer.ip());
    let listener = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut tally = Tally::new(timestamp(rx.clock.as_ref()), listener);
    let session_peer = Peer {
        ip,
        port: peer.port(),
        relay: live.session.policy.may_relay(ip),
    };
    let (mut io, tls) = if implicit_tls {
        match handshake(rx, socket).await {
            Ok((io, info)) => (io, Some(info)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "implicit TLS connection failed");
                tally.ends(Outcome::TlsFailed);
                rx.end_session(peer, None, tally);
                return;
            }
        }
    } else {
        (Stream::Plain(socket), None)
    };
    let mut session = Session::new(live.session.clone(), session_peer, tls);
    session.greeting();
    loop {
        let step = session.advance();
        rx.log_events(peer, &mut session, &mut tally);
        if let Err(e) = flush(&mut io, &mut session).await {
            tally.ends(Outcome::of_io_error(&e));
            break;
        }
        match step {
            Step::NeedInput => {
                let in_data = session.in_data();
                let (limit, what) = if in_data {
                    (live.timeouts.data, "message content")
                } else {
                    (live.timeouts.command, "a command")
                };
                tokio::select! {
                    // Read into the session's buffer: no copy on the way in.
                    read = tokio::time::timeout(limit, io.read(session.input_space())) => match read {
                        Ok(Ok(0)) => {
                            tally.ends(Outcome::Closed);
                            break;
                        }
                        Ok(Err(e)) => {
                            tally.ends(Outcome::of_io_error(&e));
                            break;
                        }
                        Ok(Ok(n)) => session.filled(n),
                        Err(_) => {
                            tally.ends(Outcome::Timeout);
                            session.abort(Reply::new(
                                421,
                                Status(4, 4, 2),
                                format!("{} Timeout waiting for {what}; closing the connection", live.session.hostname),
                            ));
                        }
                    },
                    // A session in the middle of a message may finish it.
                    _ = shutdown.wait_for(|&s| s), if !in_data => {
                        tally.ends(Outcome::Shutdown);
                        session.abort(Reply::new(
                            421,
                            Status(4, 3, 2),
                            format!("{} Service shutting down; try again later", live.session.hostname),
                        ));
                    }
                }
            }
            Step::StartTls => {
                let Stream::Plain(socket) = std::mem::replace(&mut io, Stream::Gone) else {
                    tally.ends(Outcome::Error);
                    break;
                };
                match handshake(rx, socket).await {
                    Ok((tls_io, info)) => {
                        io = tls_io;
                        session.tls_established(info);
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "STARTTLS failed");
                        tally.ends(Outcome::TlsFailed);
                        break;
                    }
                }
            }
            Step::Authenticate(req) => {
                let mechanism = req.mechanism;
                let outcome = rx.authenticate(live, ip, req).await;
                if let AuthOutcome::Success(id) = &outcome {
                    rx.log_login(peer, &session, mechanism, id);
                }
                session.auth_result(outcome);
            }
            Step::CheckSender(sender) => {
                let result = rx.check_sender(&sender).await;
                session.sender_result(result);
            }
            Step::Message(env) => {
                let info = rx.info(peer, Some(&session));
                let result = rx.receive(live, *env, info).await;
                match &result {
                    Ok(id) => tally.accepted(id),
                    // `receive` wrote the Rejection record.
                    Err(reply) => tally.rejected(reply),
                }
                session.message_result(result);
            }
            Step::Close => break,
        }
    }
    rx.log_events(peer, &mut session, &mut tally);
    let _ = flush(&mut io, &mut session).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), io.shutdown()).await;
    rx.end_session(peer, Some(&session), tally);
}
