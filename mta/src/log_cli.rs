//! `mta log purge --before DATE`: removes the transaction log files of the
//! days before DATE, ahead of `[log] retention_days` (which the daemon
//! applies hourly), and says which files went.
//!
//! Today's file is never removed: the daemon has it open for appending, and
//! records written to an unlinked file would be lost.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::cli::DaemonArgs;

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Remove the transaction log files of every day before DATE.
    Purge(PurgeArgs),
    /// Replace an address in every past record by its keyed hash, for an
    /// erasure request (running daemon).
    Redact(RedactArgs),
}

#[derive(Debug, Args)]
pub struct RedactArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// The address to erase (matched in any case, wherever it appears).
    #[arg(long, value_name = "ADDR")]
    pub recipient: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// The first day to keep, YYYY-MM-DD (UTC); at most today.
    #[arg(long, value_name = "DATE")]
    pub before: String,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct PurgeReport {
    before: String,
    dry_run: bool,
    files: Vec<PathBuf>,
    bytes: u64,
}

pub fn run(cmd: LogCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LogCommand::Purge(args) => purge(args),
        LogCommand::Redact(args) => redact(args),
    }
}

fn redact(args: RedactArgs) -> anyhow::Result<ExitCode> {
    let client = crate::cli::admin_client(&args.daemon)?;
    let r: crate::redact::RedactReport = client.call(&crate::admin::Route::Redact {
        recipient: args.recipient.clone(),
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out)?;
    } else {
        for f in &r.files {
            writeln!(out, "rewrote {}", f.display())?;
        }
        writeln!(
            out,
            "{} is now {} in {} record(s) ({} occurrence(s), {} file(s)); queued mail for it: `mta queue delete --recipient {}`",
            args.recipient,
            r.token,
            r.records,
            r.occurrences,
            r.files.len(),
            args.recipient
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn purge(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let before = time::Date::parse(&args.before, format).map_err(|_| {
        anyhow::anyhow!(
            "--before '{}' is not a date: write it as YYYY-MM-DD",
            args.before
        )
    })?;
    let today = time::OffsetDateTime::now_utc().date();
    if before > today {
        anyhow::bail!(
            "--before {before} is after today ({today}): today's file is still being written; give {today} or earlier"
        );
    }
    let dir = crate::daemon::log_path(&crate::cli::data_dir(&args.daemon)?);
    let listing = crate::log::files_before(&dir, before)
        .with_context(|| format!("reading the log directory {}", dir.display()))?;
    let bytes = listing
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let files = if args.dry_run {
        listing
    } else {
        crate::log::remove_before(&dir, before)
            .with_context(|| format!("removing log files in {}", dir.display()))?
    };
    let report = PurgeReport {
        before: before.to_string(),
        dry_run: args.dry_run,
        files,
        bytes,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for f in &report.files {
            writeln!(out, "{verb} {}", f.display())?;
        }
        writeln!(
            out,
            "{verb} {} file(s), {} bytes, of days before {before}",
            report.files.len(),
            report.bytes
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
