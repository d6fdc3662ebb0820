//! `mta queue generate-key`, `rotate-key` and `rekey`: the queue's
//! encryption keys from the command line. These work on the key file named
//! by the config (or the default beside the data directory), never on
//! systemd's credential copy, and print key ids, never keys.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use queue::{KeyId, Queue, QueueConfig, QueueError, QueueKeys};

use crate::cli::{DaemonArgs, load_config};
use crate::config::Config;
use crate::daemon::queue_path;
use crate::queue_keys::{KeySource, location};

/// `mta queue generate-key FILE`.
#[derive(Debug, Args)]
pub struct GenerateKeyArgs {
    /// Where to write the new key (mode 0600); must not exist.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `mta queue rotate-key --new FILE`.
#[derive(Debug, Args)]
pub struct RotateKeyArgs {
    /// A key file holding the new key (from `mta queue generate-key`).
    #[arg(long, value_name = "FILE")]
    pub new: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `mta queue rekey`.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

fn config_of(daemon: &DaemonArgs) -> anyhow::Result<Config> {
    let mut config = load_config(daemon.config.as_deref())?;
    if let Some(d) = &daemon.data_dir {
        config.data_dir = d.clone();
    }
    Ok(config)
}

/// How the CLI opens the store: the daemon's path, with the key file's keys.
pub fn store_config(daemon: &DaemonArgs) -> anyhow::Result<QueueConfig> {
    let config = config_of(daemon)?;
    let mut qc = QueueConfig::new(queue_path(&config.data_dir));
    qc.keys = crate::queue_keys::for_cli(&config)?;
    Ok(qc)
}

fn ids(ids: &[KeyId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn generate(args: GenerateKeyArgs) -> anyhow::Result<ExitCode> {
    let keys = QueueKeys::generate(&args.file)?;
    println!(
        "wrote queue key {} to {} (mode 0600)",
        keys.current(),
        args.file.display()
    );
    println!(
        "make it current with `mta queue rotate-key --new {}`, or name it in [queue] encryption_key_file for a new queue",
        args.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn rotate(args: RotateKeyArgs) -> anyhow::Result<ExitCode> {
    let config = config_of(&args.daemon)?;
    let Some(loc) = location(&config, None)? else {
        bail!("queue encryption is off ([queue] encrypt = false): there is no key to rotate");
    };
    if loc.source == KeySource::Default && !loc.path.exists() {
        bail!(
            "no queue key file at {} yet: start the daemon once (it generates one), or set [queue] encryption_key_file",
            loc.path.display()
        );
    }
    if std::fs::canonicalize(&args.new).ok() == std::fs::canonicalize(&loc.path).ok() {
        bail!(
            "--new {} is the key file itself: give a file holding the new key (make one with `mta queue generate-key FILE`)",
            args.new.display()
        );
    }
    let ring = QueueKeys::rotate(&loc.path, &args.new)?;
    let all = ring.ids();
    println!(
        "key {} is now current in {}; kept to open older records: {}",
        all[0],
        loc.path.display(),
        ids(&all[1..])
    );
    println!(
        "restart the daemon (`systemctl restart mta`) to seal new records with it; then, with the daemon stopped, `mta queue rekey` seals the older records again and drops the old keys"
    );
    println!(
        "under systemd, LoadCredential=mta-queue-key:{} hands the rotated file to the daemon at its restart",
        loc.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn rekey(args: RekeyArgs) -> anyhow::Result<ExitCode> {
    let config = config_of(&args.daemon)?;
    let Some(loc) = location(&config, None)? else {
        bail!("queue encryption is off ([queue] encrypt = false): there is nothing to rekey");
    };
    let qc = store_config(&args.daemon)?;
    if !qc.path.exists() {
        bail!(
            "no queue at {}: pass --data-dir (or --config) pointing at the daemon's data directory",
            qc.path.display()
        );
    }
    let (q, _) = Queue::open(&qc).map_err(|e| match e {
        QueueError::Locked { .. } => anyhow::anyhow!(
            "the queue at {} is open by a running daemon: stop it first (`systemctl stop mta`), since rekey rewrites the store",
            qc.path.display()
        ),
        other => anyhow::Error::new(other),
    })?;
    let report = q.rekey_blocking().context("rekeying the queue")?;
    q.sync()?;
    drop(q);
    let retired = QueueKeys::retire(&loc.path, &report.keys_in_use)?;
    println!(
        "sealed again under the current key: {} envelope(s), {} content(s); {} record(s) back from quarantine",
        report.envelopes, report.contents, report.restored
    );
    if report.quarantined > 0 {
        println!(
            "{} record(s) remain in quarantine (see `mta queue list --offline`); the keys they need stay: {}",
            report.quarantined,
            ids(&report.keys_in_use[..])
        );
    }
    println!(
        "old keys removed from {}: {}",
        loc.path.display(),
        ids(&retired)
    );
    Ok(ExitCode::SUCCESS)
}

/// The footer of `mta queue list`: records in quarantine, if any.
pub fn render_quarantine(
    out: &mut impl std::io::Write,
    list: &[crate::admin::api::QuarantineView],
) -> anyhow::Result<()> {
    if list.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\n{} message(s) in quarantine: not delivered, kept for you to inspect",
        list.len()
    )?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|q| vec![q.id.clone(), q.kind.clone(), q.reason.clone()])
        .collect();
    write!(
        out,
        "{}",
        crate::cli::table(&["ID", "KIND", "REASON"], &rows)
    )?;
    Ok(())
}
