//! Starting and stopping the daemon: open the queue (recovering it), start
//! the transaction log, load or generate the TLS certificate, bind the
//! listeners, and on shutdown stop accepting, let sessions finish, and
//! close the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use queue::{Queue, QueueConfig, QueueError, RecoveryReport};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use dkim_keys::KeyRing;

use crate::auth::{AuthThrottle, Users};
use crate::clock::Clock;
use crate::config::{Config, SpfPolicy};
use crate::delivery::tls::ClientTls;
use crate::delivery::{Delivery, Parts, Settings};
use crate::log::{LogError, LogWriterGuard, TransactionLog};
use crate::metrics::Metrics;
use crate::policy::{Policy, Tenant};
use crate::server::{ConnectionLimits, Receiver, StorageGuard, Timeouts, accept_loop};
use crate::sign::{Signer, SigningPolicy};
use crate::smtp::SessionConfig;
use crate::spf::checker::{CheckerParts, Source, SpfChecker, default_source};
use crate::tls::{self, CertSource, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the queue: {0}")]
    Queue(#[from] QueueError),
    #[error("cannot open the queue: {0}")]
    QueueKey(#[from] crate::queue_keys::QueueKeyError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dkim(#[from] dkim_keys::KeyError),
    #[error("{0}; check [dns] nameservers")]
    Dns(String),
    #[error(transparent)]
    ClientTls(#[from] crate::delivery::tls::ClientTlsError),
    #[error("cannot create the admin socket {}: {source}", path.display())]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// How often transaction log retention is applied.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// How often the queue's content segments are compacted.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(60);

/// Where the daemon keeps things inside its data directory.
pub fn queue_path(data_dir: &Path) -> PathBuf {
    data_dir.join("queue")
}

pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// A running daemon.
pub struct Daemon {
    /// Bound STARTTLS listeners (port 0 in the config becomes the real port).
    pub smtp_addrs: Vec<SocketAddr>,
    /// Bound implicit-TLS listeners.
    pub smtps_addrs: Vec<SocketAddr>,
    /// The bound metrics listener.
    pub metrics_addr: SocketAddr,
    pub recovery: RecoveryReport,
    pub certificate: Option<CertSource>,
    shutdown: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    receiver: Arc<Receiver>,
    delivery: Arc<Delivery>,
    spf: Option<Arc<SpfChecker>>,
    log_guard: LogWriterGuard,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("smtp_addrs", &self.smtp_addrs)
            .field("smtps_addrs", &self.smtps_addrs)
            .finish_non_exhaustive()
    }
}

fn bind_error(addr: SocketAddr, source: std::io::Error, fix: &'static str) -> StartError {
    let hint = match source.kind() {
        std::io::ErrorKind::AddrInUse => {
            if fix.contains("metrics") {
                ": another program listens there (is mta already running?); change [metrics] listen"
            } else {
                ": another program listens there (is mta already running?); change [smtp] listen"
            }
        }
        std::io::ErrorKind::PermissionDenied => {
            ": ports below 1024 need CAP_NET_BIND_SERVICE (see systemd/mta.service)"
        }
        _ => "",
    };
    StartError::Bind { addr, source, hint }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| bind_error(addr, source, "; change [smtp] listen"))
}

fn signing_policy(config: &Config) -> SigningPolicy {
    SigningPolicy {
        unsigned: config.dkim.unsigned,
        expiration: config.dkim.expiration,
        tenant_domains: config
            .tenants
            .iter()
            .filter_map(|t| {
                t.signing_domain
                    .as_ref()
                    .map(|d| (t.name.get_ref().clone(), d.get_ref().0.clone()))
            })
            .collect(),
    }
}

fn policy(config: &Config) -> Policy {
    Policy {
        allowed_networks: config.smtp.allowed_networks.clone(),
        relay_networks: config.smtp.relay_networks.clone(),
        tenants: config
            .tenants
            .iter()
            .map(|t| Tenant {
                name: t.name.get_ref().clone(),
                sender_domains: t.sender_domains.clone(),
            })
            .collect(),
    }
}

/// The sources SPF must authorise: the `[[egress]]` addresses, or the
/// system's own source address when none binds one.
pub fn spf_sources(config: &Config) -> Vec<Source> {
    let hostname = config.hostname();
    let mut sources: Vec<Source> = config
        .egress
        .iter()
        .filter_map(|e| {
            Some(Source {
                ip: e.address?,
                ehlo: e.ehlo.clone().unwrap_or_else(|| hostname.clone()),
            })
        })
        .collect();
    if config.egress.is_empty() || config.egress.iter().any(|e| e.address.is_none()) {
        let ehlo = config
            .egress
            .iter()
            .find(|e| e.address.is_none())
            .and_then(|e| e.ehlo.clone())
            .unwrap_or_else(|| hostname.clone());
        sources.extend(
            [false, true]
                .into_iter()
                .filter_map(default_source)
                .map(|ip| Source {
                    ip,
                    ehlo: ehlo.clone(),
                }),
        );
    }
    sources
}

/// The tenants' sender domains SPF checks periodically (exact ones: a
/// wildcard names no domain to look up).
pub fn spf_domains(config: &Config) -> Vec<String> {
    let mut domains: Vec<String> = config
        .tenants
        .iter()
        .flat_map(|t| t.sender_domains.iter())
        .filter_map(|p| match p {
            crate::policy::DomainPattern::Exact(d) => Some(d.clone()),
            crate::policy::DomainPattern::Subdomains(_) => None,
        })
        .collect();
    domains.sort();
    domains.dedup();
    domains
}

fn spf_checker(
    config: &Config,
    resolver: &hickory_resolver::TokioResolver,
    log: &TransactionLog,
    metrics: &Arc<Metrics>,
    clock: &Arc<dyn Clock>,
) -> Option<Arc<SpfChecker>> {
    if config.spf.policy == SpfPolicy::Off {
        return None;
    }
    let sources = spf_sources(config);
    if sources.is_empty() {
        tracing::warn!(
            "no egress address known: SPF of senders cannot be checked; configure [[egress]] address"
        );
        return None;
    }
    Some(SpfChecker::new(CheckerParts {
        policy: config.spf.policy,
        interval: config.spf.check_interval,
        sources,
        domains: spf_domains(config),
        dns: crate::spf::HickoryDns::new(resolver.clone()),
        receiver: config.hostname(),
        log: log.clone(),
        metrics: metrics.clone(),
        clock: clock.clone(),
    }))
}

/// Opens the queue with its key (generating the default key on first
/// start); a key generated for a queue that turns out to be encrypted
/// already is removed again and the lost key reported.
async fn open_queue(config: &Config) -> Result<(Queue, RecoveryReport), StartError> {
    let (keys, generated) = crate::queue_keys::for_daemon(config)?;
    let mut qc = QueueConfig::new(queue_path(&config.data_dir));
    qc.cache_capacity = config.queue.cache_mb * 1024 * 1024;
    qc.commit_timeout = config.queue.commit_timeout;
    qc.keys = keys.clone();
    let opened = tokio::task::spawn_blocking(move || Queue::open(&qc))
        .await
        .expect("queue open does not panic");
    match (opened, keys) {
        (
            Err(QueueError::WrongKey {
                store, key_file, ..
            }),
            Some(_),
        ) if generated => {
            if let Err(e) = std::fs::remove_file(&key_file) {
                tracing::warn!(key_file = %key_file.display(), error = %e, "cannot remove the key generated for an encrypted queue");
            }
            Err(crate::queue_keys::QueueKeyError::DefaultKeyLost { store, key_file }.into())
        }
        (opened, _) => Ok(opened?),
    }
}

impl Daemon {
    /// Starts everything. The data directory comes from `config.data_dir`.
    pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Daemon, StartError> {
        tls::install_crypto_provider();
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let hostname = config.hostname();

        let (queue, recovery) = open_queue(config).await?;
        tracing::info!(
            messages = recovery.messages,
            recipients = recovery.pending_recipients,
            corrupt = recovery.corrupt.len(),
            quarantined = recovery.quarantined.len(),
            "queue recovered"
        );
        for (id, reason) in &recovery.quarantined {
            tracing::error!(queue_id = %id, %reason, "message in quarantine: it is not delivered (mta queue list)");
        }
        let (log, log_guard) = TransactionLog::open_with(
            &log_path(&data_dir),
            config.log.max_file_mb.saturating_mul(1024 * 1024),
        )?;

        let certificate = match (&config.smtp.tls_certificate, &config.smtp.tls_private_key) {
            (Some(c), Some(k)) => CertSource {
                certificate: c.get_ref().clone(),
                private_key: k.get_ref().clone(),
                generated: false,
            },
            _ => tls::ensure_self_signed(&data_dir, &hostname)?,
        };
        let acceptor = TlsAcceptor::from(tls::server_config(&certificate)?);

        let ring = tokio::task::spawn_blocking({
            let specs = config.dkim_key_specs();
            move || KeyRing::load(&specs)
        })
        .await
        .expect("key loading does not panic")?;
        tracing::info!(keys = ring.keys().len(), "DKIM keys loaded");
        let metrics = Metrics::new();
        let signer = Arc::new(Signer::new(ring, signing_policy(config), metrics.clone()));
        let resolver = crate::dns::resolver(&config.dns).map_err(StartError::Dns)?;
        let client_tls = ClientTls::new(
            config
                .delivery
                .tls_trust_anchors
                .as_ref()
                .map(|p| p.get_ref().as_path()),
        )?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let spf = spf_checker(config, &resolver, &log, &metrics, &clock);

        let policy = Arc::new(policy(config));
        let users = Arc::new(Users::from_config(&config.tenants));
        let s = &config.smtp;
        let storage = StorageGuard::new(
            queue_path(&data_dir),
            config.queue.min_free_mb * 1024 * 1024,
        );
        storage.check(0);
        let session = Arc::new(SessionConfig {
            hostname,
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_errors: s.max_errors,
            max_auth_failures: s.max_auth_failures,
            starttls: true,
            auth: !users.is_empty(),
            policy: policy.clone(),
            storage_low: storage.flag(),
            check_sender: spf
                .as_ref()
                .is_some_and(|c| c.policy() == SpfPolicy::Enforce),
        });
        let receiver = Arc::new(Receiver {
            session,
            policy,
            users,
            throttle: AuthThrottle::new(s.max_auth_failures_per_ip, s.auth_failure_window),
            limits: ConnectionLimits::new(s.max_connections, s.max_connections_per_ip),
            queue,
            log,
            clock,
            tls: Some(acceptor),
            timeouts: Timeouts {
                command: s.command_timeout,
                data: s.data_timeout,
                handshake: s.tls_handshake_timeout,
                auth_failure_delay: s.auth_failure_delay,
            },
            storage,
            signer: signer.clone(),
            metrics: metrics.clone(),
            wake: wake.clone(),
            spf: spf.clone(),
        });
        let delivery = Delivery::new(Parts {
            settings: Settings {
                hostname: config.hostname(),
                delivery: config.delivery.clone(),
                egress: config.egress.clone(),
            },
            queue: receiver.queue.clone(),
            log: receiver.log.clone(),
            clock: receiver.clock.clone(),
            resolver,
            client_tls,
            signer,
            metrics: metrics.clone(),
            wake,
            spf: spf.clone(),
            seed: None,
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut acceptors = Vec::new();
        let metrics_listener =
            crate::metrics::bind(config.metrics.listen)
                .await
                .map_err(|source| {
                    bind_error(config.metrics.listen, source, "; change [metrics] listen")
                })?;
        let metrics_addr = metrics_listener
            .local_addr()
            .unwrap_or(config.metrics.listen);
        acceptors.push(tokio::spawn(crate::metrics::serve(
            metrics_listener,
            metrics,
            shutdown_rx.clone(),
        )));
        // The admin API (`mta queue`), bound before the SMTP listeners so
        // that it answers as soon as mail is accepted.
        {
            let path = crate::admin::socket_path(&data_dir);
            let listener = crate::admin::bind(&path).map_err(|source| StartError::Admin {
                path: path.clone(),
                source,
            })?;
            acceptors.push(tokio::spawn(crate::admin::serve(
                listener,
                path,
                crate::admin::server::State {
                    queue: receiver.queue.clone(),
                    log: receiver.log.clone(),
                    clock: receiver.clock.clone(),
                    wake: receiver.wake.clone(),
                },
                shutdown_rx.clone(),
            )));
        }
        // Free space is checked with every message, and here every second so
        // that MAIL is refused (and accepted again) without waiting for one.
        {
            let rx = receiver.clone();
            let mut stop = shutdown_rx.clone();
            acceptors.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => { rx.storage.check(0); }
                        _ = stop.wait_for(|&s| s) => return,
                    }
                }
            }));
        }
        // Deferred messages would otherwise pin whole content segments:
        // compaction copies them out of mostly-dead segments (queue crate).
        {
            let queue = receiver.queue.clone();
            let mut stop = shutdown_rx.clone();
            acceptors.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(COMPACTION_INTERVAL) => {}
                        _ = stop.wait_for(|&s| s) => return,
                    }
                    let q = queue.clone();
                    match tokio::task::spawn_blocking(move || q.compact_blocking()).await {
                        Ok(Ok(r)) if r.segments_removed > 0 || r.messages_moved > 0 => {
                            tracing::info!(
                                moved = r.messages_moved,
                                bytes = r.bytes_moved,
                                removed = r.segments_removed,
                                "queue compacted"
                            )
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "queue compaction failed; retried later")
                        }
                        Err(e) => tracing::error!(error = %e, "queue compaction panicked"),
                    }
                }
            }));
        }
        // Retention: whole days of transaction log older than
        // retention_days go, checked at start and hourly.
        if config.log.retention_days > 0 {
            let dir = log_path(&data_dir);
            let days = config.log.retention_days;
            let clock = receiver.clock.clone();
            let mut stop = shutdown_rx.clone();
            acceptors.push(tokio::spawn(async move {
                loop {
                    let today = time::OffsetDateTime::from(clock.now()).date();
                    let cutoff = today - time::Duration::days(days.into());
                    let dir = dir.clone();
                    match tokio::task::spawn_blocking(move || crate::log::remove_before(&dir, cutoff)).await {
                        Ok(Ok(removed)) if !removed.is_empty() => tracing::info!(
                            files = removed.len(),
                            before = %cutoff,
                            "transaction log files past retention_days removed"
                        ),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot apply the log retention; retried in an hour"),
                        Err(e) => tracing::error!(error = %e, "log retention panicked"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
                        _ = stop.wait_for(|&s| s) => return,
                    }
                }
            }));
        }
        let mut smtp_addrs = Vec::new();
        let mut smtps_addrs = Vec::new();
        for (addrs, implicit, bound) in [
            (&s.listen, false, &mut smtp_addrs),
            (&s.listen_tls, true, &mut smtps_addrs),
        ] {
            for addr in addrs {
                let listener = bind(*addr).await?;
                bound.push(listener.local_addr().unwrap_or(*addr));
                acceptors.push(tokio::spawn(accept_loop(
                    receiver.clone(),
                    listener,
                    implicit,
                    shutdown_rx.clone(),
                )));
            }
        }
        if let Some(spf) = &spf {
            acceptors.push(tokio::spawn(spf.clone().run(shutdown_rx.clone())));
        }
        if config.delivery.enabled {
            acceptors.push(tokio::spawn(delivery.clone().run(shutdown_rx.clone())));
        } else {
            tracing::warn!("[delivery] enabled = false: mail is accepted and queued, not sent");
        }
        tracing::info!(smtp = ?smtp_addrs, smtps = ?smtps_addrs, "accepting mail");
        Ok(Daemon {
            smtp_addrs,
            smtps_addrs,
            metrics_addr,
            recovery,
            certificate: Some(certificate),
            shutdown,
            acceptors,
            receiver,
            delivery,
            spf,
            log_guard,
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.receiver.queue
    }

    /// The delivery side.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// Loads the DKIM keys of `config` and, if every one loads, uses them
    /// for new messages; otherwise keeps the current keys. Returns how many
    /// keys are now in use.
    pub async fn reload_dkim(&self, config: &Config) -> Result<usize, dkim_keys::KeyError> {
        let specs = config.dkim_key_specs();
        let ring = tokio::task::spawn_blocking(move || KeyRing::load(&specs))
            .await
            .expect("key loading does not panic")?;
        let n = ring.keys().len();
        self.receiver.signer.replace_ring(ring);
        Ok(n)
    }

    /// Evaluates every configured sender domain with every egress IP
    /// again (SIGHUP): a record the customer fixed passes from now on.
    pub async fn refresh_spf(&self) {
        if let Some(spf) = &self.spf {
            spf.refresh().await;
        }
    }

    /// The SPF checker, when `[spf] policy` is not off.
    pub fn spf(&self) -> Option<&Arc<SpfChecker>> {
        self.spf.as_ref()
    }

    /// The keys in use.
    pub fn dkim_ring(&self) -> Arc<KeyRing> {
        self.receiver.signer.ring()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.receiver.limits.active()
    }

    /// Stops accepting; sessions waiting for a command get `421 4.3.2`,
    /// sessions inside a message may finish it within `grace`. Then the
    /// store is closed and the log written out.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        for a in self.acceptors {
            let _ = a.await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.receiver.limits.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while self.delivery.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.receiver.limits.active();
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "sessions still open at shutdown; their unfinished messages were not accepted"
            );
        }
        let queue = self.receiver.queue.clone();
        let _ = tokio::task::spawn_blocking(move || queue.sync()).await;
        let stats = self.receiver.queue.commit_stats();
        tracing::info!(
            flushes = stats.flushes,
            writes_per_flush = format!("{:.1}", stats.waiters as f64 / stats.flushes.max(1) as f64),
            ms_per_flush = format!(
                "{:.2}",
                stats.flush_time.as_secs_f64() * 1000.0 / stats.flushes.max(1) as f64
            ),
            "queue commits since start"
        );
        self.receiver.log.flush();
        drop(self.receiver);
        drop(self.log_guard);
    }
}
