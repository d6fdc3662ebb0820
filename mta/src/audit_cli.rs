//! `mta audit logins`: when and from where an SMTP AUTH account was used,
//! read from the transaction log's AuthSuccess and AuthFailure records.
//!
//! It reads the log files directly, so it works with the daemon stopped
//! and while it runs: the files are only ever appended to. Only the files
//! of days within `--since` are opened (their names carry the day).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::log::{self, AuthFailure, AuthSuccess, Timestamp};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recent successful and failed SMTP logins (time, user, result,
    /// reason, peer, TLS), newest first.
    Logins(LoginsArgs),
}

#[derive(Debug, Args)]
pub struct LoginsArgs {
    /// Only this user name (as the client gave it).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// How far back: 7d, 24h, 90m, 2w.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_since)]
    pub since: Duration,
    /// A JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Read the data directory named in this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory; default ./mta-data (or the config's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

fn parse_since(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write it like 7d, 24h or 90m"))
}

/// One login attempt, as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    pub user: String,
    /// `ok` or `failed`.
    pub result: String,
    /// Why a failure failed: `invalid credentials`, `address locked out`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub mechanism: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub peer_ip: String,
    pub peer_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<String>,
}

impl From<AuthSuccess> for Login {
    fn from(r: AuthSuccess) -> Login {
        Login {
            timestamp: r.timestamp,
            user: r.user,
            result: "ok".into(),
            reason: None,
            mechanism: r.mechanism,
            tenant: r.session.tenant,
            peer_ip: r.session.peer_ip,
            peer_port: r.session.peer_port,
            tls_version: r.session.tls_version,
            tls_cipher: r.session.tls_cipher,
        }
    }
}

impl From<AuthFailure> for Login {
    fn from(r: AuthFailure) -> Login {
        Login {
            timestamp: r.timestamp,
            user: r.user,
            result: "failed".into(),
            reason: Some(r.reason),
            mechanism: r.mechanism,
            tenant: None,
            peer_ip: r.session.peer_ip,
            peer_port: r.session.peer_port,
            tls_version: r.session.tls_version,
            tls_cipher: r.session.tls_cipher,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "no transaction log at {}: pass --data-dir (or --config) pointing at the daemon's data directory",
        .0.display()
    )]
    NoLog(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not a transaction log record ({reason}); the file is damaged or not the daemon's", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The logins in the log directory `dir` at or after `since`, of `user`
/// if given, newest first.
pub fn read_logins(
    dir: &Path,
    since: OffsetDateTime,
    user: Option<&str>,
) -> Result<Vec<Login>, AuditError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AuditError::NoLog(dir.to_path_buf()));
        }
        Err(source) => {
            return Err(AuditError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let first_day = since.to_offset(time::UtcOffset::UTC).date();
    let mut logins = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| AuditError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        let day = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(log::parse_name)
            .map(|(d, _)| d);
        if day.is_some_and(|d| d >= first_day) {
            read_file(&path, &mut logins)?;
        }
    }
    logins.retain(|l| l.timestamp >= since && user.is_none_or(|u| l.user == u));
    // Newest first; the same instant keeps no particular order, so the
    // user and peer break ties for a stable listing.
    logins.sort_by(|a, b| {
        b.timestamp
            .cmp(&a.timestamp)
            .then_with(|| a.user.cmp(&b.user))
            .then_with(|| a.peer_port.cmp(&b.peer_port))
    });
    Ok(logins)
}

/// The login records of one file. A last line without its newline is
/// still being written by the daemon and is left for the next run.
fn read_file(path: &Path, out: &mut Vec<Login>) -> Result<(), AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse = |reason: String| AuditError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        // Look at the type first: only login records are decoded, so the
        // listing does not depend on every other record's schema.
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        let kind: Kind = serde_json::from_str(line).map_err(|e| parse(e.to_string()))?;
        match kind.kind.as_ref() {
            "AuthSuccess" => {
                let r: AuthSuccess =
                    serde_json::from_str(line).map_err(|e| parse(e.to_string()))?;
                out.push(r.into());
            }
            "AuthFailure" => {
                let r: AuthFailure =
                    serde_json::from_str(line).map_err(|e| parse(e.to_string()))?;
                out.push(r.into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// The aligned table of `mta audit logins`.
pub fn render_table(logins: &[Login]) -> String {
    let rows: Vec<Vec<String>> = logins
        .iter()
        .map(|l| {
            let tls = match (&l.tls_version, &l.tls_cipher) {
                (Some(v), Some(c)) => format!("{v} {c}"),
                (Some(v), None) => v.clone(),
                _ => "-".into(),
            };
            vec![
                l.timestamp
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                l.user.clone(),
                l.result.clone(),
                format!("{}:{}", l.peer_ip, l.peer_port),
                l.mechanism.clone(),
                tls,
                l.reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    crate::cli::table(
        &[
            "TIME",
            "USER",
            "RESULT",
            "PEER",
            "MECHANISM",
            "TLS",
            "REASON",
        ],
        &rows,
    )
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Logins(args) => logins(args),
    }
}

fn logins(args: LoginsArgs) -> anyhow::Result<ExitCode> {
    let config = crate::cli::load_config(args.config.as_deref())?;
    let data_dir = args.data_dir.unwrap_or(config.data_dir);
    let now = OffsetDateTime::now_utc();
    let since = time::Duration::try_from(args.since)
        .ok()
        .and_then(|d| now.checked_sub(d))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let logins = read_logins(
        &crate::daemon::log_path(&data_dir),
        since,
        args.user.as_deref(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&logins)?);
    } else if logins.is_empty() {
        println!(
            "no logins{} in the last {}",
            args.user
                .as_deref()
                .map(|u| format!(" of {u}"))
                .unwrap_or_default(),
            humantime::format_duration(args.since)
        );
    } else {
        print!("{}", render_table(&logins));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LoggedReply, Record, SessionInfo};

    fn at(s: &str) -> Timestamp {
        Timestamp::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn session(port: u16) -> SessionInfo {
        SessionInfo {
            peer_ip: "192.0.2.7".into(),
            peer_port: port,
            tls_version: Some("TLSv1.3".into()),
            tls_cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
            ..Default::default()
        }
    }

    fn ok(at_: &str, user: &str, port: u16) -> Record {
        let mut s = session(port);
        s.tenant = Some("acme".into());
        Record::AuthSuccess(AuthSuccess {
            timestamp: at(at_),
            session: s,
            mechanism: "PLAIN".into(),
            user: user.into(),
        })
    }

    fn failed(at_: &str, user: &str, port: u16) -> Record {
        Record::AuthFailure(AuthFailure {
            timestamp: at(at_),
            session: session(port),
            mechanism: "LOGIN".into(),
            user: user.into(),
            reason: "invalid credentials".into(),
            reply: LoggedReply {
                code: 535,
                enhanced_code: Some("5.7.8".into()),
                text: "Authentication credentials invalid".into(),
            },
        })
    }

    fn write(dir: &Path, name: &str, records: &[Record], tail: &str) {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push('\n');
        }
        text.push_str(tail);
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn lists_logins_newest_first_within_since_and_for_the_user() {
        let dir = tempfile::tempdir().unwrap();
        // A day before `since`: never opened, so even garbage there is fine.
        std::fs::write(
            dir.path().join("transactions-2025-03-01.jsonl"),
            "garbage\n",
        )
        .unwrap();
        write(
            dir.path(),
            "transactions-2025-03-03.jsonl",
            &[
                ok("2025-03-03T08:00:00Z", "ann", 1001),
                failed("2025-03-03T23:00:00Z", "bob", 1002),
            ],
            "",
        );
        write(
            dir.path(),
            "transactions-2025-03-04.1.jsonl",
            &[ok("2025-03-04T09:00:00Z", "bob", 1003)],
            // Being written by the daemon: left alone.
            "{\"type\":\"AuthSucc",
        );
        write(
            dir.path(),
            "transactions-2025-03-04.jsonl",
            &[failed("2025-03-04T01:00:00Z", "ann", 1004)],
            "",
        );
        let since = at("2025-03-03T12:00:00Z");
        let all = read_logins(dir.path(), since, None).unwrap();
        let seen: Vec<(&str, &str, u16)> = all
            .iter()
            .map(|l| (l.user.as_str(), l.result.as_str(), l.peer_port))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("bob", "ok", 1003),
                ("ann", "failed", 1004),
                ("bob", "failed", 1002),
            ]
        );
        assert_eq!(all[0].tenant.as_deref(), Some("acme"));
        assert_eq!(all[1].reason.as_deref(), Some("invalid credentials"));
        assert_eq!(all[1].tenant, None);

        let bob = read_logins(dir.path(), since, Some("bob")).unwrap();
        assert_eq!(bob.len(), 2);
        assert!(bob.iter().all(|l| l.user == "bob"));
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "transactions-2025-03-03.jsonl",
            &[ok("2025-03-03T08:00:00Z", "ann", 1)],
            "not json\n",
        );
        let err = read_logins(dir.path(), at("2025-03-01T00:00:00Z"), None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("transactions-2025-03-03.jsonl:2: not a transaction log record"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_log_directory_says_which_option_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_logins(&dir.path().join("log"), at("2025-03-01T00:00:00Z"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pass --data-dir (or --config)"), "{err}");
    }

    #[test]
    fn bad_since_says_how_to_write_it() {
        let err = parse_since("seven days").unwrap_err();
        assert!(err.contains("write it like 7d, 24h or 90m"), "{err}");
        assert_eq!(parse_since("7d").unwrap(), Duration::from_secs(7 * 86400));
    }

    #[test]
    fn the_table_aligns_columns_and_shows_tls_and_reason() {
        let logins: Vec<Login> = [failed("2025-03-03T23:00:00Z", "bob", 1002)]
            .into_iter()
            .map(|r| match r {
                Record::AuthFailure(f) => f.into(),
                _ => unreachable!(),
            })
            .collect();
        let t = render_table(&logins);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("TIME "), "{t}");
        assert_eq!(
            lines[1],
            "2025-03-03T23:00:00Z  bob   failed  192.0.2.7:1002  LOGIN      TLSv1.3 TLS13_AES_128_GCM_SHA256  invalid credentials"
        );
    }
}
