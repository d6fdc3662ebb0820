//! Starting, reloading and stopping the daemon: open the queue (recovering
//! it), start the transaction log, load or generate the TLS certificate,
//! bind the listeners; on SIGHUP load the configuration again and swap in
//! what may change at run time; on shutdown stop accepting, let sessions
//! finish, and close the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use queue::{Queue, QueueConfig, QueueError, RecoveryReport};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use dkim_keys::KeyRing;

use crate::auth::{AuthThrottle, Users};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, SpfPolicy};
use crate::delivery::suspend::Suspensions;
use crate::delivery::tls::ClientTls;
use crate::delivery::{Delivery, Parts, Settings};
use crate::log::{self, LogError, LogWriterGuard, Record, TransactionLog};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reload::Changes;
use crate::server::{ConnectionLimits, Live, Receiver, StorageGuard, Timeouts, accept_loop};
use crate::sign::{Signer, SigningPolicy};
use crate::smtp::SessionConfig;
use crate::spf::checker::{CheckerParts, Source, SpfChecker, Tuning, default_source};
use crate::tls::{self, CertSource, ServerTls, TlsError};

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
    #[error(transparent)]
    AdminToken(#[from] crate::admin::tokens::TokenError),
    #[error(transparent)]
    Suspensions(#[from] crate::delivery::suspend::SuspendError),
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dkim(#[from] dkim_keys::KeyError),
}

/// A reload that was applied.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub changes: Changes,
    pub dkim_keys: usize,
    /// SHA-256 of the certificate new handshakes present.
    pub tls_fingerprint: String,
}

/// The configurations a reload compares with.
struct Running {
    /// As started: what restart-only keys still hold.
    started: Config,
    /// As last applied: what reloadable keys hold.
    applied: Config,
    tls_fingerprint: String,
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

/// The destination domains suspended with `mta queue suspend`.
pub fn suspensions_path(data_dir: &Path) -> PathBuf {
    data_dir.join("suspensions.json")
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
    /// Where the certificate came from at start.
    pub certificate: Option<CertSource>,
    shutdown: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    receiver: Arc<Receiver>,
    delivery: Arc<Delivery>,
    spf: Option<Arc<SpfChecker>>,
    running: Mutex<Running>,
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

/// The configured certificate, or the self-signed one generated in
/// `data_dir` (the running one on reload: a changed `data_dir` waits for a
/// restart, and nothing is generated where the daemon does not live).
fn certificate(config: &Config, data_dir: &Path) -> Result<(CertSource, ServerTls), TlsError> {
    let source = match (&config.smtp.tls_certificate, &config.smtp.tls_private_key) {
        (Some(c), Some(k)) => CertSource {
            certificate: c.get_ref().clone(),
            private_key: k.get_ref().clone(),
            generated: false,
        },
        _ => tls::ensure_self_signed(data_dir, &config.hostname())?,
    };
    let loaded = tls::server_config(&source)?;
    Ok((source, loaded))
}

/// What sessions read from `config` (at start and on SIGHUP).
fn live(
    config: &Config,
    users: Arc<Users>,
    tls: &ServerTls,
    storage_low: Arc<AtomicBool>,
    check_sender: bool,
) -> Live {
    let s = &config.smtp;
    Live {
        session: Arc::new(SessionConfig {
            hostname: config.hostname(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_errors: s.max_errors,
            max_auth_failures: s.max_auth_failures,
            starttls: true,
            auth: !users.is_empty(),
            policy: Arc::new(Policy::from_config(config)),
            storage_low,
            check_sender,
        }),
        users,
        tls: Some(TlsAcceptor::from(tls.config.clone())),
        timeouts: Timeouts {
            command: s.command_timeout,
            data: s.data_timeout,
            handshake: s.tls_handshake_timeout,
            auth_failure_delay: s.auth_failure_delay,
        },
    }
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
    qc.commit_gather = config.queue.commit_gather;
    qc.fresh_content_bytes =
        usize::try_from(config.queue.fresh_content_mb.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX);
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

        let (certificate, server_tls) = certificate(config, &data_dir)?;

        let ring = tokio::task::spawn_blocking({
            let specs = config.dkim_key_specs();
            move || KeyRing::load(&specs)
        })
        .await
        .expect("key loading does not panic")?;
        tracing::info!(keys = ring.keys().len(), "DKIM keys loaded");
        let metrics = Metrics::new(&config.metrics);
        metrics.watch_queue(&queue);
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

        let users = Arc::new(Users::from_config(&config.tenants));
        let s = &config.smtp;
        let storage = StorageGuard::new(
            queue_path(&data_dir),
            config.queue.min_free_mb * 1024 * 1024,
        );
        storage.check(0);
        let check_sender = spf
            .as_ref()
            .is_some_and(|c| c.policy() == SpfPolicy::Enforce);
        let live = live(config, users, &server_tls, storage.flag(), check_sender);
        let receiver = Arc::new(Receiver {
            live: std::sync::RwLock::new(Arc::new(live)),
            throttle: AuthThrottle::new(
                s.max_auth_failures_per_ip,
                s.max_auth_failures_per_user,
                s.auth_failure_window,
            ),
            password_checks: crate::server::password_checks::PasswordChecks::half_the_cores(),
            limits: ConnectionLimits::new(s.max_connections, s.max_connections_per_ip),
            queue,
            log,
            clock,
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
            suspensions: Arc::new(Suspensions::load(
                &suspensions_path(&data_dir),
                receiver.clock.now_ms(),
            )?),
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
            let state = crate::admin::server::State {
                queue: receiver.queue.clone(),
                log: receiver.log.clone(),
                clock: receiver.clock.clone(),
                wake: receiver.wake.clone(),
                delivery: delivery.clone(),
            };
            if let Some(addr) = config.admin.listen {
                let tokens = crate::admin::tokens::Tokens::load(&config.admin.tokens)?;
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|source| bind_error(addr, source, "; change [admin] listen"))?;
                tracing::info!(addr = %tcp.local_addr().unwrap_or(addr), "admin API over HTTPS (bearer tokens)");
                // The certificate SMTP has now: a reload's reaches new
                // HTTPS connections too.
                let at_start = TlsAcceptor::from(server_tls.config.clone());
                let current: crate::admin::server::CurrentTls = {
                    let receiver = receiver.clone();
                    Arc::new(move || {
                        receiver
                            .live()
                            .tls
                            .clone()
                            .unwrap_or_else(|| at_start.clone())
                    })
                };
                acceptors.push(tokio::spawn(crate::admin::serve_tcp(
                    tcp,
                    current,
                    tokens,
                    state.clone(),
                    shutdown_rx.clone(),
                )));
            }
            acceptors.push(tokio::spawn(crate::admin::serve(
                listener,
                path,
                state,
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
            running: Mutex::new(Running {
                started: config.clone(),
                applied: config.clone(),
                tls_fingerprint: server_tls.fingerprint,
            }),
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

    /// SIGHUP: reads the configuration again (`file`, or the embedded
    /// default; `data_dir` as `--data-dir` gave it) with the certificate
    /// and DKIM key files it names, and if everything loads, swaps it in
    /// for new connections and messages; sessions already open finish under
    /// the settings they started with. Keys only a restart applies are
    /// reported, not applied. Anything that fails to load refuses the
    /// whole reload and the running configuration stays. Either way a
    /// ConfigReload record says what happened; then SPF is checked again
    /// (in the background) so that a record the customer fixed passes.
    pub async fn reload(
        &self,
        file: Option<&Path>,
        data_dir: Option<&Path>,
    ) -> Result<Reloaded, ReloadError> {
        let result = self.load_and_apply(file, data_dir).await;
        let record = match &result {
            Ok(r) => log::ConfigReload {
                timestamp: time::OffsetDateTime::from(self.receiver.clock.now()),
                file: file.map(|f| f.display().to_string()),
                result: "ok".into(),
                error: None,
                changed: r.changes.applied.clone(),
                needs_restart: r.changes.needs_restart.clone(),
                tls_certificate_sha256: Some(r.tls_fingerprint.clone()),
                dkim_keys: Some(r.dkim_keys),
            },
            Err(e) => log::ConfigReload {
                timestamp: time::OffsetDateTime::from(self.receiver.clock.now()),
                file: file.map(|f| f.display().to_string()),
                result: "refused".into(),
                error: Some(e.to_string()),
                changed: Vec::new(),
                needs_restart: Vec::new(),
                tls_certificate_sha256: None,
                dkim_keys: None,
            },
        };
        self.receiver.log.write(Record::ConfigReload(record));
        if let Some(spf) = self.spf.clone() {
            tokio::spawn(async move { spf.refresh().await });
        }
        result
    }

    async fn load_and_apply(
        &self,
        file: Option<&Path>,
        data_dir: Option<&Path>,
    ) -> Result<Reloaded, ReloadError> {
        let (file, data_dir) = (file.map(Path::to_path_buf), data_dir.map(Path::to_path_buf));
        let running_dir = self
            .running
            .lock()
            .expect("running lock")
            .started
            .data_dir
            .clone();
        // Everything that reads files or hashes runs off the reactor, and
        // before anything is swapped.
        let (config, (_, server_tls), ring, users) = tokio::task::spawn_blocking(move || {
            let mut config = match &file {
                Some(f) => Config::load(f)?,
                None => Config::default(),
            };
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            let tls = certificate(&config, &running_dir)?;
            let ring = KeyRing::load(&config.dkim_key_specs())?;
            let users = Users::from_config(&config.tenants);
            Ok::<_, ReloadError>((config, tls, ring, users))
        })
        .await
        .expect("loading the configuration does not panic")?;

        let mut running = self.running.lock().expect("running lock");
        let mut changes = crate::reload::compare(&running.started, &running.applied, &config);
        if server_tls.fingerprint != running.tls_fingerprint
            && !changes.applied.iter().any(|k| k.starts_with("smtp.tls_"))
        {
            // Same paths, new files: a renewed certificate.
            changes.applied.push("smtp.tls_certificate".into());
        }
        // The SPF checker runs from start to stop: a policy turned off or
        // on waits for a restart, and meanwhile the running one holds.
        let spf_policy = match &self.spf {
            Some(c) if config.spf.policy == SpfPolicy::Off => c.policy(),
            Some(c) => {
                c.retune(Tuning {
                    policy: config.spf.policy,
                    interval: config.spf.check_interval,
                    domains: Arc::new(spf_domains(&config)),
                });
                config.spf.policy
            }
            None => SpfPolicy::Off,
        };
        let s = &config.smtp;
        self.receiver
            .limits
            .set_limits(s.max_connections, s.max_connections_per_ip);
        self.receiver.throttle.set_limits(
            s.max_auth_failures_per_ip,
            s.max_auth_failures_per_user,
            s.auth_failure_window,
        );
        let dkim_keys = ring.keys().len();
        self.receiver.signer.replace(ring, signing_policy(&config));
        let live = live(
            &config,
            Arc::new(users),
            &server_tls,
            self.receiver.storage.flag(),
            spf_policy == SpfPolicy::Enforce,
        );
        self.receiver.replace_live(live);
        running.applied = config;
        running.tls_fingerprint = server_tls.fingerprint.clone();
        Ok(Reloaded {
            changes,
            dkim_keys,
            tls_fingerprint: server_tls.fingerprint,
        })
    }

    /// Evaluates every configured sender domain with every egress IP
    /// again, and returns when done (a reload does the same in the
    /// background): a record the customer fixed passes from now on.
    pub async fn refresh_spf(&self) {
        if let Some(spf) = &self.spf {
            spf.refresh().await;
        }
    }

    /// How long a clean stop waits for sessions and deliveries under way
    /// (`[smtp] shutdown_grace` as last applied).
    pub fn shutdown_grace(&self) -> Duration {
        self.running
            .lock()
            .expect("running lock")
            .applied
            .smtp
            .shutdown_grace
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
    /// sessions inside a message may finish it within `grace` (and get
    /// their 250 only once it is stored); delivery claims nothing more,
    /// and each worker stops after the transaction it is in, whose outcome
    /// is stored. Then the store is synced and the log written out.
    /// Whatever is still running after `grace` is dropped unacknowledged:
    /// a message cut off in DATA was never answered 250, and a delivery cut
    /// off has no outcome, so the restarted daemon tries it again.
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
        let sending = self.delivery.in_flight();
        if sending > 0 {
            tracing::warn!(
                messages = sending,
                "deliveries still under way at shutdown (raise [smtp] shutdown_grace); they are tried again after the restart"
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
