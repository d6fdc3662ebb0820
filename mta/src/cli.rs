//! The `mta` command line: `serve`, `config check`, `user hash`, and the
//! queue commands (through the running daemon's admin socket, or with
//! `--offline` from a stopped daemon's store).
//!
//! Exit codes: 0 success, 1 error, 2 usage (clap's own).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use queue::{Queue, QueueId, SummaryBy};

use crate::admin::api::{
    Action, BulkView, ListQuery, MessageView, QuarantineView, ResumeView, Route, SummaryView,
    SuspensionView,
};
use crate::admin::{AdminClient, ClientError};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::daemon::{Daemon, queue_path};
use crate::notify::{Notifier, watchdog_interval};

#[derive(Debug, Parser)]
#[command(
    name = "mta",
    version,
    about = "An outbound mail transfer agent for campaign senders"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (without --config: the embedded default, SMTP with
    /// STARTTLS on 127.0.0.1:2525, data in ./mta-data).
    Serve(ServeArgs),
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage SMTP AUTH users.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect and steer the queue (through the running daemon, or --offline).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Manage DKIM keys: generate, show the DNS record, check DNS, list.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Check that SPF authorises our egress IPs for the sender domains.
    #[command(subcommand)]
    Spf(SpfCommand),
    /// The transaction log: purge old days, redact an address.
    #[command(subcommand)]
    Log(crate::log_cli::LogCommand),
    /// Access records from the transaction log: who logged in, when, from where.
    #[command(subcommand)]
    Audit(crate::audit_cli::AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum SpfCommand {
    /// Evaluate SPF for every sender domain of the tenants (or --domain)
    /// and every egress IP (or --ip): result, matching directive, DNS
    /// lookups used, and what to add to a failing record. Exit 1 unless
    /// every pair passes.
    Check {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: DkimConfigArgs,
    },
}

/// Which configuration file to read.
#[derive(Debug, Args)]
pub struct DkimConfigArgs {
    /// The config file (its [dkim] keys and keys_dir, tenants, [[egress]],
    /// [dns]); default: the embedded default (keys in ./mta-data/dkim).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Generate a key, write it (mode 0600) into the keys directory, and
    /// print the DNS TXT record to publish and the config to add.
    Generate {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// rsa-sha256 or ed25519-sha256.
        #[arg(long, default_value = "rsa-sha256", value_parser = parse_algorithm)]
        algorithm: dkim_keys::Algorithm,
        /// RSA key size: 2048, 3072 or 4096.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Write into this directory instead of [dkim] keys_dir.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: DkimConfigArgs,
    },
    /// Print the DNS TXT record of a key again, from its key file.
    Dns {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: Option<String>,
        /// Look for key files in this directory instead of [dkim] keys_dir.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: DkimConfigArgs,
    },
    /// Look up every configured selector in DNS and compare it with its key.
    /// Exit 1 if any key is not publishable as it is.
    Check {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: DkimConfigArgs,
    },
    /// List the configured keys: domain, selector, algorithm, size, file,
    /// active. Exit 1 if a key file does not load.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: DkimConfigArgs,
    },
}

fn parse_algorithm(s: &str) -> Result<dkim_keys::Algorithm, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file; default: the embedded default.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir` of the config.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file; errors name the line. Exit 1 on error.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Read a password from standard input and print the `password_hash`
    /// line for [[tenants.users]].
    Hash,
}

/// Which daemon (its data directory, where the admin socket is).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Read the data directory named in this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory; default ./mta-data (or the config's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A daemon's HTTPS admin listener (`[admin] listen`) instead of the
    /// local socket: https://host:port. Needs --ca-file and a token.
    #[arg(long, value_name = "URL", requires = "ca_file")]
    pub url: Option<String>,
    /// PEM certificate(s) the listener's certificate must chain to (the
    /// daemon's certificate itself, for a self-signed one).
    #[arg(long, value_name = "FILE", requires = "url")]
    pub ca_file: Option<PathBuf>,
    /// The file holding the bearer token (mode 0600); default: the
    /// MTA_ADMIN_TOKEN environment variable.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub token_file: Option<PathBuf>,
}

/// Where the queue is: the running daemon's admin socket, or with
/// `--offline` the store itself.
#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Read the store directly instead of asking the running daemon. Only
    /// while the daemon is stopped (for recovery).
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    Queued,
    Deferred,
    Held,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ByArg {
    Domain,
    Tenant,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        filters: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, recipients and their state, headers.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        /// Print the whole message, not only its headers.
        #[arg(long)]
        body: bool,
        #[arg(long)]
        json: bool,
    },
    /// Messages by destination (or tenant) and age, like qshape.
    Summary {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, value_enum, default_value = "domain")]
        by: ByArg,
        #[arg(long)]
        json: bool,
    },
    /// Hold messages: they are not attempted until released (running daemon).
    Hold(ChangeArgs),
    /// Release held messages (running daemon).
    Release(ChangeArgs),
    /// Make every pending recipient of messages due now (running daemon).
    Retry(ChangeArgs),
    /// Remove messages from the queue, without a DSN (running daemon).
    Delete(ChangeArgs),
    /// Fail every pending recipient of messages now and send the sender a
    /// DSN, then remove them (running daemon).
    Bounce(ChangeArgs),
    /// Make no delivery attempts to a destination domain for a while; its
    /// mail waits in the queue (running daemon).
    Suspend {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// The destination domain (an IDN as its A-label).
        domain: String,
        /// How long: "30m", "4h", "1d". A suspension always ends.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        /// Why, for the record and for `mta queue suspensions`.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a quarantined record (see `list`) and its content for good
    /// (running daemon).
    DeleteQuarantined(ChangeIdArgs),
    /// Lift a suspension: the domain's mail is due now (running daemon).
    Resume {
        #[command(flatten)]
        daemon: DaemonArgs,
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// The suspended destination domains (running daemon).
    Suspensions {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write a new random queue encryption key to FILE (mode 0600).
    GenerateKey(crate::queue_key_cli::GenerateKeyArgs),
    /// Make the key in FILE current in the queue's key file, keeping the
    /// old keys so older records still open; takes effect at the daemon's
    /// next restart.
    RotateKey(crate::queue_key_cli::RotateKeyArgs),
    /// Seal every queued record again under the current key and drop old
    /// keys nothing uses any more. Only while the daemon is stopped.
    Rekey(crate::queue_key_cli::RekeyArgs),
}

/// One record by its queue ID, through the running daemon.
#[derive(Debug, Args)]
pub struct ChangeIdArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

/// Which messages: the filters of `list`, and of the changes by filter.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only messages with a pending recipient at this domain.
    #[arg(long)]
    pub domain: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only messages older than this ("1h", "2d").
    #[arg(long, value_name = "AGE")]
    pub older_than: Option<String>,
    /// Only messages with this envelope sender.
    #[arg(long)]
    pub sender: Option<String>,
    /// Only messages still queued for this recipient address (for an
    /// erasure request: `delete --recipient ADDR`).
    #[arg(long)]
    pub recipient: Option<String>,
    /// At most this many messages, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl FilterArgs {
    fn query(self) -> anyhow::Result<ListQuery> {
        // Checked here too, so both modes say it the same way.
        if let Some(a) = &self.older_than {
            humantime::parse_duration(a).with_context(|| {
                format!("--older-than '{a}' is not a duration: write it like 30m, 1h or 2d")
            })?;
        }
        Ok(ListQuery {
            domain: self.domain,
            tenant: self.tenant,
            state: self.state.map(|s| state_name(s).to_string()),
            older_than: self.older_than,
            sender: self.sender,
            recipient: self.recipient,
            limit: self.limit,
        })
    }
}

/// A change to one message by its ID, or to every message the filters
/// match, through the running daemon.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// The message's queue ID; or name messages with the filters instead.
    #[arg(
        required_unless_present_any = ["domain", "tenant", "state", "older_than", "sender", "recipient", "all"],
        conflicts_with_all = ["domain", "tenant", "state", "older_than", "sender", "recipient", "limit", "all"]
    )]
    pub id: Option<String>,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Every message in the queue (when no ID or filter names them).
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

/// The whole program: logging to stderr (`MTA_LOG` sets the filter, default
/// `info`), the command line, exit codes.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::User(UserCommand::Hash) => user_hash(),
        Command::Queue(cmd) => queue_command(cmd),
        Command::Dkim(cmd) => crate::dkim_cli::run(cmd),
        Command::Log(cmd) => crate::log_cli::run(cmd),
        Command::Audit(cmd) => crate::audit_cli::run(cmd),
        Command::Spf(SpfCommand::Check {
            domain,
            ip,
            json,
            config,
        }) => {
            let config = load_config(config.config.as_deref())?;
            crate::spf_cli::check(&config, domain.as_deref(), ip, json)
        }
    }
}

pub(crate) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = load_config(args.config.as_deref())?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mta")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let daemon = Daemon::start(&config, clock).await?;
        for a in &daemon.smtp_addrs {
            tracing::info!("SMTP with STARTTLS on {a}");
        }
        for a in &daemon.smtps_addrs {
            tracing::info!("SMTP over implicit TLS on {a}");
        }
        tracing::info!(data_dir = %config.data_dir.display(), "mta is running; stop it with Ctrl-C or SIGTERM");
        // Under systemd (Type=notify): ready now that the queue is
        // recovered and the listeners are bound.
        let notifier = Notifier::from_env();
        notifier.send(&format!(
            "READY=1\nMAINPID={}\nSTATUS=accepting mail on {:?}",
            std::process::id(),
            daemon.smtp_addrs
        ));
        let watchdog = watchdog_interval().map(|every| {
            let (notifier, queue) = (notifier.clone(), daemon.queue().clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    // A failed store is not healthy: without keep-alives
                    // systemd restarts the daemon, which recovers the queue.
                    if !queue.is_failed() {
                        notifier.send("WATCHDOG=1");
                    }
                }
            })
        });
        let (config_path, data_dir) = (args.config.clone(), args.data_dir.clone());
        wait_for_signal(|| async {
            notifier.send("RELOADING=1");
            reload(&daemon, config_path.as_deref(), data_dir.as_deref()).await;
            notifier.send("READY=1");
        })
        .await?;
        tracing::info!("shutting down");
        notifier.send("STOPPING=1");
        if let Some(w) = watchdog {
            w.abort();
        }
        let grace = daemon.shutdown_grace();
        daemon.shutdown(grace).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: reads the config file again and applies what can change while
/// running (see [`Daemon::reload`]); says which changed keys need a
/// restart, or why the new configuration was refused and the old one kept.
async fn reload(daemon: &Daemon, config_path: Option<&Path>, data_dir: Option<&Path>) {
    match daemon.reload(config_path, data_dir).await {
        Ok(r) => {
            for key in &r.changes.needs_restart {
                tracing::warn!(
                    "SIGHUP: needs a restart: {key} (changed in the file; the running value stays until `systemctl restart mta`)"
                );
            }
            tracing::info!(
                changed = ?r.changes.applied,
                keys = r.dkim_keys,
                certificate_sha256 = %r.tls_fingerprint,
                "SIGHUP: configuration reloaded and DKIM keys reloaded; open sessions finish under the settings they started with"
            );
        }
        Err(e) => tracing::error!(
            "SIGHUP: the new configuration is refused; the running configuration and the old keys stay in use: {e}"
        ),
    }
}

/// Waits for SIGTERM or Ctrl-C, calling `on_hup` for each SIGHUP (whose
/// default action would otherwise stop the daemon).
async fn wait_for_signal<F: std::future::Future<Output = ()>>(
    mut on_hup: impl FnMut() -> F,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => return r.context("waiting for Ctrl-C"),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received");
                on_hup().await;
            }
        }
    }
}

fn config_check(file: &Path) -> anyhow::Result<ExitCode> {
    match Config::load(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn user_hash() -> anyhow::Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("no password on standard input: run `printf '%s' \"$PASSWORD\" | mta user hash`");
    }
    let hash = crate::auth::hash_password(password)?;
    println!("password_hash = \"{hash}\"");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn data_dir(daemon: &DaemonArgs) -> anyhow::Result<PathBuf> {
    let config = load_config(daemon.config.as_deref())?;
    Ok(daemon.data_dir.clone().unwrap_or(config.data_dir))
}

pub(crate) fn admin_client(daemon: &DaemonArgs) -> anyhow::Result<AdminClient> {
    if let (Some(url), Some(ca)) = (&daemon.url, &daemon.ca_file) {
        let token = match &daemon.token_file {
            Some(f) => crate::admin::tokens::read_token("--token-file", f)?,
            None => std::env::var("MTA_ADMIN_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "--url needs a bearer token: --token-file FILE, or MTA_ADMIN_TOKEN in the environment"
                )
            })?,
        };
        return AdminClient::https(url, ca, token).map_err(|e| anyhow::anyhow!(e));
    }
    Ok(AdminClient::new(crate::admin::socket_path(&data_dir(
        daemon,
    )?)))
}

fn open_store(store: &StoreArgs) -> anyhow::Result<Queue> {
    let data_dir = data_dir(&store.daemon)?;
    let path = queue_path(&data_dir);
    if !path.exists() {
        bail!(
            "no queue at {}: pass --data-dir (or --config) pointing at the daemon's data directory",
            path.display()
        );
    }
    let config = crate::queue_key_cli::store_config(&store.daemon)?;
    Queue::open_for_inspection_with(&config).map_err(|e| match e {
        queue::QueueError::Locked { .. } => anyhow::anyhow!(
            "the queue at {} is open by a running daemon: stop it first (`systemctl stop mta`), since --offline reads the store directly",
            path.display()
        ),
        other => anyhow::Error::new(other),
    })
}

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn age(received_ms: u64) -> String {
    let secs = now_ms().saturating_sub(received_ms) / 1000;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Prints rows as a table with aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn state_name(s: StateArg) -> &'static str {
    match s {
        StateArg::Queued => "queued",
        StateArg::Deferred => "deferred",
        StateArg::Held => "held",
    }
}

fn summary_by(by: ByArg) -> SummaryBy {
    match by {
        ByArg::Domain => SummaryBy::Domain,
        ByArg::Tenant => SummaryBy::Tenant,
    }
}

fn parse_id(id: &str) -> anyhow::Result<QueueId> {
    Ok(id.parse()?)
}

fn no_message(id: QueueId) -> anyhow::Error {
    anyhow::anyhow!(
        "no message {id} in the queue: it may have been delivered; see `mta queue list`"
    )
}

/// An admin API call, with "no such message" said the way offline mode says it.
fn call<T: serde::de::DeserializeOwned>(
    client: &AdminClient,
    route: &Route,
    id: Option<QueueId>,
) -> anyhow::Result<T> {
    client.call(route).map_err(|e| match (e, id) {
        (ClientError::Api { status: 404, .. }, Some(id)) => no_message(id),
        (e, _) => e.into(),
    })
}

fn write_json(out: &mut impl Write, v: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// `queue list`: the table, or `--json` (an array of [`MessageView`]).
fn render_list(out: &mut impl Write, views: &[MessageView], json: bool) -> anyhow::Result<()> {
    if json {
        // Through a JSON value, as offline mode always printed it.
        return write_json(out, &serde_json::to_value(views)?);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.received_ms().map(age).unwrap_or_else(|| "?".into()),
                r.state.clone(),
                r.tenant.clone().unwrap_or_else(|| "-".into()),
                r.size.to_string(),
                if r.sender.is_empty() {
                    "<>".into()
                } else {
                    r.sender.clone()
                },
                r.pending().count().to_string(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(
            &["ID", "AGE", "STATE", "TENANT", "SIZE", "SENDER", "RCPTS"],
            &rows
        )
    )?;
    writeln!(out, "{} message(s)", views.len())?;
    Ok(())
}

/// `queue show` (and the answer to a change): envelope, recipients, and
/// the headers or message when the view carries them.
fn render_show(out: &mut impl Write, v: &MessageView, json: bool) -> anyhow::Result<()> {
    if json {
        return write_json(out, &serde_json::to_value(v)?);
    }
    writeln!(out, "id:         {}", v.id)?;
    writeln!(out, "state:      {}", v.state)?;
    writeln!(
        out,
        "age:        {}",
        v.received_ms().map(age).unwrap_or_else(|| "?".into())
    )?;
    writeln!(out, "tenant:     {}", v.tenant.as_deref().unwrap_or("-"))?;
    writeln!(out, "sender:     <{}>", v.sender)?;
    writeln!(out, "size:       {}", v.size)?;
    writeln!(
        out,
        "from:       {} ({})",
        v.peer_ip.as_deref().unwrap_or("?"),
        v.auth_user.as_deref().unwrap_or("no AUTH")
    )?;
    writeln!(
        out,
        "dkim:       {}",
        if v.dkim.is_empty() {
            "unsigned".to_string()
        } else {
            v.dkim.join(", ")
        }
    )?;
    let rows: Vec<Vec<String>> = v
        .recipients
        .iter()
        .map(|r| {
            vec![
                r.address.clone(),
                r.state.clone(),
                r.attempts.to_string(),
                r.next_attempt.clone().unwrap_or_else(|| "-".into()),
                r.last_reply.clone().unwrap_or_default(),
            ]
        })
        .collect();
    writeln!(out)?;
    write!(
        out,
        "{}",
        table(
            &[
                "RECIPIENT",
                "STATE",
                "ATTEMPTS",
                "NEXT ATTEMPT",
                "LAST REPLY"
            ],
            &rows
        )
    )?;
    if let Some(text) = v.message.as_deref().or(v.headers.as_deref()) {
        writeln!(out)?;
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// `queue summary`: the qshape table, or `--json`.
fn render_summary(
    out: &mut impl Write,
    s: &SummaryView,
    by: SummaryBy,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return write_json(out, s);
    }
    let mut header = vec![match by {
        SummaryBy::Domain => "DOMAIN".to_string(),
        SummaryBy::Tenant => "TENANT".to_string(),
    }];
    header.push("MSGS".into());
    header.push("RCPTS".into());
    header.extend(s.bounds_minutes.iter().map(|b| format!("<{b}m")));
    header.push(format!(
        "{}m+",
        s.bounds_minutes.last().copied().unwrap_or(0)
    ));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = std::iter::once(&s.total)
        .chain(s.rows.iter())
        .map(|r| {
            let mut row = vec![
                r.key.clone(),
                r.messages.to_string(),
                r.recipients.to_string(),
            ];
            row.extend(r.counts.iter().map(u64::to_string));
            row
        })
        .collect();
    write!(out, "{}", table(&header, &rows))?;
    if !s.deferred_reasons.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = s
            .deferred_reasons
            .iter()
            .map(|r| vec![r.recipients.to_string(), r.reason.clone()])
            .collect();
        write!(out, "{}", table(&["DEFERRED", "LAST REPLY"], &rows))?;
    }
    Ok(())
}

fn queue_command(cmd: QueueCommand) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match cmd {
        QueueCommand::List {
            store,
            filters,
            json,
        } => {
            let query = filters.query()?;
            let (views, quarantined): (Vec<MessageView>, Vec<QuarantineView>) = if store.offline {
                let filter = query.filter(now_ms()).map_err(|e| anyhow::anyhow!(e))?;
                let q = open_store(&store)?;
                let views = q
                    .list(&filter)?
                    .iter()
                    .map(MessageView::from_record)
                    .collect();
                (
                    views,
                    q.quarantined()?.iter().map(QuarantineView::from).collect(),
                )
            } else {
                let client = admin_client(&store.daemon)?;
                let views = call(&client, &Route::List(query), None)?;
                (views, call(&client, &Route::Quarantine, None)?)
            };
            render_list(&mut stdout, &views, json)?;
            if !json {
                crate::queue_key_cli::render_quarantine(&mut stdout, &quarantined)?;
            }
        }
        QueueCommand::Show {
            store,
            id,
            body,
            json,
        } => {
            let id = parse_id(&id)?;
            let view = if store.offline {
                let q = open_store(&store)?;
                let rec = q.get(id).map_err(|e| match e {
                    queue::QueueError::NotFound(_) => no_message(id),
                    other => other.into(),
                })?;
                let content = q.content(id)?;
                MessageView::from_record(&rec).with_content(&content, body)
            } else {
                call(
                    &admin_client(&store.daemon)?,
                    &Route::Show { id, body },
                    Some(id),
                )?
            };
            render_show(&mut stdout, &view, json)?;
        }
        QueueCommand::Summary { store, by, json } => {
            let by = summary_by(by);
            let s = if store.offline {
                let q = open_store(&store)?;
                let mut v = SummaryView::from(&q.summary(now_ms(), by)?);
                v.deferred_reasons = crate::admin::api::deferred_reasons(q.records())?;
                v
            } else {
                call(&admin_client(&store.daemon)?, &Route::Summary(by), None)?
            };
            render_summary(&mut stdout, &s, by, json)?;
        }
        QueueCommand::Hold(args) => change(&mut stdout, args, Action::Hold)?,
        QueueCommand::Release(args) => change(&mut stdout, args, Action::Release)?,
        QueueCommand::Retry(args) => change(&mut stdout, args, Action::Retry)?,
        QueueCommand::Delete(args) => change(&mut stdout, args, Action::Delete)?,
        QueueCommand::Bounce(args) => change(&mut stdout, args, Action::Bounce)?,
        QueueCommand::DeleteQuarantined(args) => {
            let id = parse_id(&args.id)?;
            let v: QuarantineView = admin_client(&args.daemon)?
                .call(&Route::DeleteQuarantined { id })
                .map_err(|e| match e {
                    ClientError::Api { status: 404, .. } => anyhow::anyhow!(
                        "no quarantined record {id}: see the quarantine list at the end of `mta queue list`"
                    ),
                    e => e.into(),
                })?;
            if args.json {
                write_json(&mut stdout, &v)?;
            } else {
                writeln!(stdout, "{id}: quarantined record and its content removed")?;
            }
        }
        QueueCommand::Suspend {
            daemon,
            domain,
            duration,
            reason,
            json,
        } => {
            humantime::parse_duration(&duration).with_context(|| {
                format!("--for '{duration}' is not a duration: write it like 30m, 4h or 1d")
            })?;
            let v: SuspensionView = admin_client(&daemon)?.call(&Route::Suspend {
                domain,
                duration,
                reason,
            })?;
            if json {
                write_json(&mut stdout, &v)?;
            } else {
                writeln!(
                    stdout,
                    "{}: suspended until {}; its mail waits in the queue (`mta queue resume {}` to lift it)",
                    v.domain, v.until, v.domain
                )?;
            }
        }
        QueueCommand::Resume {
            daemon,
            domain,
            json,
        } => {
            let v: ResumeView = admin_client(&daemon)?.call(&Route::Resume { domain })?;
            if json {
                write_json(&mut stdout, &v)?;
            } else if v.lifted.is_some() {
                writeln!(
                    stdout,
                    "{}: resumed; {} message(s) due now",
                    v.domain, v.retried
                )?;
            } else {
                writeln!(stdout, "{}: was not suspended", v.domain)?;
            }
        }
        QueueCommand::Suspensions { daemon, json } => {
            let list: Vec<SuspensionView> = admin_client(&daemon)?.call(&Route::Suspensions)?;
            if json {
                write_json(&mut stdout, &list)?;
            } else if list.is_empty() {
                writeln!(stdout, "no destination is suspended")?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.domain.clone(),
                            s.until.clone(),
                            s.who.clone(),
                            s.reason.clone(),
                        ]
                    })
                    .collect();
                write!(
                    stdout,
                    "{}",
                    table(&["DOMAIN", "UNTIL", "BY", "REASON"], &rows)
                )?;
            }
        }
        QueueCommand::GenerateKey(args) => return crate::queue_key_cli::generate(args),
        QueueCommand::RotateKey(args) => return crate::queue_key_cli::rotate(args),
        QueueCommand::Rekey(args) => return crate::queue_key_cli::rekey(args),
    }
    Ok(ExitCode::SUCCESS)
}

/// `queue hold|release|retry|delete|bounce ID|--filters|--all`, through
/// the running daemon.
fn change(out: &mut impl Write, args: ChangeArgs, action: Action) -> anyhow::Result<()> {
    let Some(id) = &args.id else {
        let route = Route::Bulk {
            action,
            query: args.filters.query()?,
            all: args.all,
        };
        let v: BulkView = admin_client(&args.daemon)?.call(&route)?;
        if args.json {
            return write_json(out, &v);
        }
        writeln!(
            out,
            "{}: {} of {} message(s) matching {}",
            v.action,
            v.changed.len(),
            v.matched,
            v.selector
        )?;
        for f in &v.failed {
            writeln!(out, "  {}: not changed: {}", f.id, f.error)?;
        }
        if !v.failed.is_empty() {
            anyhow::bail!("{} message(s) were not changed (see above)", v.failed.len());
        }
        return Ok(());
    };
    let id = parse_id(id)?;
    let view: MessageView = call(
        &admin_client(&args.daemon)?,
        &Route::Change { id, action },
        Some(id),
    )?;
    if args.json {
        return write_json(out, &serde_json::to_value(&view)?);
    }
    let pending = view.pending().count();
    match action {
        Action::Hold => writeln!(out, "{id}: held")?,
        Action::Release => writeln!(out, "{id}: released (state {})", view.state)?,
        Action::Retry => writeln!(out, "{id}: {pending} recipient(s) due now")?,
        Action::Bounce => {
            let bounced = view
                .recipients
                .iter()
                .filter(|r| r.state == "bounced")
                .count();
            writeln!(
                out,
                "{id}: bounced ({bounced} recipient(s); the sender gets a DSN unless it is <> or bounces are off)"
            )?
        }
        Action::Delete => {
            let deleted = view
                .recipients
                .iter()
                .filter(|r| r.state == "deleted")
                .count();
            writeln!(
                out,
                "{id}: deleted ({deleted} pending recipient(s) dropped)"
            )?
        }
    }
    Ok(())
}
