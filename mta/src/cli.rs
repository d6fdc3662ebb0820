//! The `mta` command line: `serve`, `config check`, `user hash`, and the
//! offline queue inspection commands.
//!
//! Exit codes: 0 success, 1 error, 2 usage (clap's own).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use queue::{Filter, MessageRecord, MessageState, Queue, QueueId, SummaryBy};

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
    /// Inspect the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Manage DKIM keys: generate, show the DNS record, check DNS, list.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Check that SPF authorises our egress IPs for the sender domains.
    #[command(subcommand)]
    Spf(SpfCommand),
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

/// Where the store is.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Read the data directory named in this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory; default ./mta-data (or the config's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read the store directly. Only while the daemon is stopped; reaching
    /// a running daemon needs the admin API, which is not built yet.
    #[arg(long, required = true)]
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
        /// Only messages with a pending recipient at this domain.
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only messages older than this ("1h", "2d").
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        #[arg(long)]
        sender: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
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
    if let Some(d) = args.data_dir {
        config.data_dir = d;
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
        let config_path = args.config.clone();
        wait_for_signal(|| async {
            notifier.send("RELOADING=1");
            reload(&daemon, config_path.as_deref()).await;
            notifier.send("READY=1");
        })
        .await?;
        tracing::info!("shutting down");
        notifier.send("STOPPING=1");
        if let Some(w) = watchdog {
            w.abort();
        }
        daemon.shutdown(Duration::from_secs(30)).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: checks SPF of every sender domain and egress IP again, reads
/// the config file again and reloads the DKIM keys it names. If the file or
/// any key fails, the keys in use stay, and the log says why.
async fn reload(daemon: &Daemon, config_path: Option<&Path>) {
    daemon.refresh_spf().await;
    let Some(path) = config_path else {
        tracing::warn!(
            "SIGHUP received: running on the embedded default, SPF checked again, nothing else to reload"
        );
        return;
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: the configuration has an error, nothing reloaded: {e}");
            return;
        }
    };
    match daemon.reload_dkim(&config).await {
        Ok(n) => tracing::info!(
            keys = n,
            "SIGHUP: DKIM keys reloaded (other configuration changes need a restart)"
        ),
        Err(e) => tracing::error!("SIGHUP: DKIM keys not reloaded, the old keys stay in use: {e}"),
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

fn open_store(store: &StoreArgs) -> anyhow::Result<Queue> {
    let config = load_config(store.config.as_deref())?;
    let data_dir = store.data_dir.clone().unwrap_or(config.data_dir);
    let path = queue_path(&data_dir);
    if !path.exists() {
        bail!(
            "no queue at {}: pass --data-dir (or --config) pointing at the daemon's data directory",
            path.display()
        );
    }
    Queue::open_for_inspection(&path).map_err(|e| match e {
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

fn record_json(rec: &MessageRecord) -> serde_json::Value {
    serde_json::json!({
        "id": rec.id.to_string(),
        "received": time::OffsetDateTime::from_unix_timestamp_nanos(rec.received_ms as i128 * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "state": rec.state().as_str(),
        "tenant": rec.tenant,
        "sender": rec.sender,
        "size": rec.size,
        "peer_ip": rec.submission.peer_ip,
        "auth_user": rec.submission.auth_user,
        "message_id": rec.submission.message_id,
        "recipients": rec.recipients.iter().map(|r| serde_json::json!({
            "address": r.address,
            "state": r.state.as_str(),
            "attempts": r.attempts,
            "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
    })
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

fn queue_command(cmd: QueueCommand) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match cmd {
        QueueCommand::List {
            store,
            domain,
            tenant,
            state,
            older_than,
            sender,
            limit,
            json,
        } => {
            let received_before_ms = match older_than {
                Some(a) => {
                    let d = humantime::parse_duration(&a).with_context(|| {
                        format!("--older-than '{a}' is not a duration: write it like 30m, 1h or 2d")
                    })?;
                    Some(now_ms().saturating_sub(d.as_millis() as u64))
                }
                None => None,
            };
            let filter = Filter {
                domain,
                tenant,
                state: state.map(|s| match s {
                    StateArg::Queued => MessageState::Queued,
                    StateArg::Deferred => MessageState::Deferred,
                    StateArg::Held => MessageState::Held,
                }),
                received_before_ms,
                sender,
                limit,
            };
            let q = open_store(&store)?;
            let records = q.list(&filter)?;
            if json {
                let v: Vec<_> = records.iter().map(record_json).collect();
                serde_json::to_writer_pretty(&mut stdout, &v)?;
                writeln!(stdout)?;
            } else {
                let rows: Vec<Vec<String>> = records
                    .iter()
                    .map(|r| {
                        let pending = r.recipients.iter().filter(|x| !x.state.is_final()).count();
                        vec![
                            r.id.to_string(),
                            age(r.received_ms),
                            r.state().as_str().to_string(),
                            r.tenant.clone().unwrap_or_else(|| "-".into()),
                            r.size.to_string(),
                            if r.sender.is_empty() {
                                "<>".into()
                            } else {
                                r.sender.clone()
                            },
                            pending.to_string(),
                        ]
                    })
                    .collect();
                write!(
                    stdout,
                    "{}",
                    table(
                        &["ID", "AGE", "STATE", "TENANT", "SIZE", "SENDER", "RCPTS"],
                        &rows
                    )
                )?;
                writeln!(stdout, "{} message(s)", records.len())?;
            }
        }
        QueueCommand::Show {
            store,
            id,
            body,
            json,
        } => {
            let id: QueueId = id.parse()?;
            let q = open_store(&store)?;
            let rec = q.get(id).map_err(|e| match e {
                queue::QueueError::NotFound(_) => anyhow::anyhow!(
                    "no message {id} in the queue: it may have been delivered; see `mta queue list`"
                ),
                other => other.into(),
            })?;
            let content = q.content(id)?;
            let shown: &[u8] = if body {
                &content
            } else {
                let end = memchr::memmem::find(&content, b"\r\n\r\n")
                    .map(|i| i + 2)
                    .unwrap_or(content.len());
                &content[..end]
            };
            if json {
                let mut v = record_json(&rec);
                v[if body { "message" } else { "headers" }] =
                    String::from_utf8_lossy(shown).into_owned().into();
                serde_json::to_writer_pretty(&mut stdout, &v)?;
                writeln!(stdout)?;
            } else {
                writeln!(stdout, "id:         {}", rec.id)?;
                writeln!(stdout, "state:      {}", rec.state().as_str())?;
                writeln!(stdout, "age:        {}", age(rec.received_ms))?;
                writeln!(
                    stdout,
                    "tenant:     {}",
                    rec.tenant.as_deref().unwrap_or("-")
                )?;
                writeln!(stdout, "sender:     <{}>", rec.sender)?;
                writeln!(stdout, "size:       {}", rec.size)?;
                writeln!(
                    stdout,
                    "from:       {} ({})",
                    rec.submission.peer_ip.as_deref().unwrap_or("?"),
                    rec.submission.auth_user.as_deref().unwrap_or("no AUTH")
                )?;
                let rows: Vec<Vec<String>> = rec
                    .recipients
                    .iter()
                    .map(|r| {
                        vec![
                            r.address.clone(),
                            r.state.as_str().into(),
                            r.attempts.to_string(),
                            r.last_reply.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                writeln!(stdout)?;
                write!(
                    stdout,
                    "{}",
                    table(&["RECIPIENT", "STATE", "ATTEMPTS", "LAST REPLY"], &rows)
                )?;
                writeln!(stdout)?;
                stdout.write_all(shown)?;
            }
        }
        QueueCommand::Summary { store, by, json } => {
            let q = open_store(&store)?;
            let by = match by {
                ByArg::Domain => SummaryBy::Domain,
                ByArg::Tenant => SummaryBy::Tenant,
            };
            let s = q.summary(now_ms(), by)?;
            if json {
                serde_json::to_writer_pretty(&mut stdout, &s)?;
                writeln!(stdout)?;
            } else {
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
                write!(stdout, "{}", table(&header, &rows))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
