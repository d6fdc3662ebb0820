//! The transaction log: one JSON line per event under `<data_dir>/log/`.
//!
//! The record types here are the schema that the daemon writes and the
//! CLI and tests read. Every record has `type` and `timestamp` (RFC 3339,
//! UTC); fields that do not apply are left out, never written as null.
//!
//! Records are serialized and written by one thread, off the async reactor.
//! [`TransactionLog::write_acked`] waits until its record has been handed to
//! the operating system (written, not fsynced): reception uses it for the
//! Reception record before it answers 250, so `kill -9` after a 250 cannot
//! lose the record. Power loss can lose the last records; the queue, which
//! is fsynced, stays the truth about messages.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::smtp::{Reply, TlsInfo};

/// When something happened, serialized as RFC 3339 in UTC.
pub type Timestamp = OffsetDateTime;

/// Where a session's client is and how it is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SessionInfo {
    pub peer_ip: String,
    pub peer_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl SessionInfo {
    pub fn set_tls(&mut self, tls: Option<&TlsInfo>) {
        self.tls_version = tls.map(|t| t.version.clone());
        self.tls_cipher = tls.map(|t| t.cipher.clone());
    }
}

/// An SMTP reply as the log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedReply {
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced_code: Option<String>,
    pub text: String,
}

impl From<&Reply> for LoggedReply {
    fn from(r: &Reply) -> Self {
        LoggedReply {
            code: r.code,
            enhanced_code: r.status.map(|s| s.to_string()),
            text: r.text.replace('\n', " / "),
        }
    }
}

/// A message was accepted and is durably queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reception {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    pub queue_id: String,
    #[serde(flatten)]
    pub session: SessionInfo,
    /// `ESMTPSA` and friends (RFC 3848).
    pub protocol: String,
    /// MAIL FROM; empty for `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    /// Bytes stored, headers we added included.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The DKIM signatures added (domain, selector, algorithm).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<crate::sign::SignatureInfo>,
    /// Why the message was accepted unsigned, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_unsigned: Option<String>,
    /// SPF of the MAIL FROM domain for our egress IPs, when checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spf: Option<SpfNote>,
    /// DMARC alignment of the message as sent, when checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc: Option<DmarcNote>,
}

/// The DMARC alignment a Reception record carries (RFC 7489).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmarcNote {
    pub from_domain: String,
    /// The published policy that applies (`none`, `quarantine`, `reject`);
    /// absent without a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// One of our DKIM signatures aligns with the From: domain.
    pub dkim_aligned: bool,
    /// SPF passed and the MAIL FROM domain aligns with the From: domain.
    pub spf_aligned: bool,
    /// `pass`, `fail`, `none` (no policy) or `temperror`.
    pub result: String,
}

/// The SPF result a Reception record carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfNote {
    pub domain: String,
    /// The egress IP the result is for (a passing one when any passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// pass, fail, softfail, neutral, none, temperror, permerror, or
    /// `pending` when the check had not finished (policy warn).
    pub result: String,
}

/// The SPF result of a (sender domain, egress IP) pair changed (or was
/// first seen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfChange {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    pub domain: String,
    pub ip: String,
    /// Absent the first time the pair is evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// The directive that matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What to add to the record for this IP to pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// A command, a message or a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    #[serde(flatten)]
    pub session: SessionInfo,
    /// What was refused: `CONNECT`, `MAIL`, `RCPT`, `DATA`, `BDAT`, `AUTH`,
    /// `TIMEOUT`, `UNKNOWN` (an unparsable line), …
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    #[serde(flatten)]
    pub reply: LoggedReply,
}

/// A failed AUTH attempt. Never carries the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthFailure {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    #[serde(flatten)]
    pub session: SessionInfo,
    pub mechanism: String,
    /// The user name the client tried.
    pub user: String,
    /// `invalid credentials`, `address locked out`, `authorization identity refused`.
    pub reason: String,
    #[serde(flatten)]
    pub reply: LoggedReply,
}

/// A successful AUTH, written the moment it succeeds, so that `mta audit
/// logins` shows a login while its session is still open. The session
/// fields carry the tenant; `auth_user` is left out (it is `user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthSuccess {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    #[serde(flatten)]
    pub session: SessionInfo,
    pub mechanism: String,
    pub user: String,
}

/// At most this many queue IDs in a Session record; `messages_accepted`
/// still counts them all.
pub const SESSION_MAX_QUEUE_IDS: usize = 100;
/// At most this many distinct reply codes in a Session record's
/// `rejected`; further ones are counted under [`SESSION_OTHER_REJECTIONS`].
pub const SESSION_MAX_REJECTION_CODES: usize = 32;
/// The `rejected` key of the codes beyond [`SESSION_MAX_REJECTION_CODES`].
pub const SESSION_OTHER_REJECTIONS: &str = "other";

/// The summary of one SMTP session, written once when it ends, however it
/// ends. Connections refused at accept have no session: their CONNECT
/// Rejection is their only record. `timestamp` is the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmtpSession {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub started: Timestamp,
    pub duration_seconds: f64,
    /// The state at the end: the HELO after STARTTLS, the TLS in use, the
    /// authenticated user and tenant.
    #[serde(flatten)]
    pub session: SessionInfo,
    /// Our listener the client connected to (`ip:port`).
    pub listener: String,
    pub messages_accepted: u32,
    /// The first [`SESSION_MAX_QUEUE_IDS`] accepted messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue_ids: Vec<String>,
    /// How many Rejection records the session wrote.
    pub rejections: u32,
    /// Those rejections by `code enhanced-code` (`550 5.7.1`, or just the
    /// code when there is none).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rejected: std::collections::BTreeMap<String, u32>,
    /// How many AuthFailure records the session wrote.
    pub auth_failures: u32,
    /// How it ended: `quit`, `closed` (the client went away), `timeout`,
    /// `shutdown` (421 at daemon stop), `too_many_errors`,
    /// `too_many_auth_failures`, `tls_failed` (STARTTLS or implicit TLS
    /// handshake), `error` (a read or write failed).
    pub outcome: String,
}

/// One delivery attempt for one recipient: the body of the Delivery,
/// TransientFailure, Bounce and Expiration records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    pub queue_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// MAIL FROM; empty for `<>`.
    pub sender: String,
    pub recipient: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Seconds since the message was received.
    pub delay_seconds: f64,
    /// The MX (or relay) host that answered, or was last tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx_ip: Option<String>,
    /// Our source address on that connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<String>,
    /// `tls`, `plaintext-not-offered`, `plaintext-after-failed-handshakes`
    /// or `plaintext-disabled`; absent when no session was established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<String>,
    /// Whether the MX certificate verified (web PKI, host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verified: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_verify_error: Option<String>,
    /// The reply: the remote server's, or ours for local failures.
    #[serde(flatten)]
    pub reply: LoggedReply,
    /// How far a failure reached: recipient, message, host, session, destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// TransientFailure: when the next attempt is due.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_attempt: Option<Timestamp>,
    /// Bounce/Expiration: the queue ID of the DSN sent to the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_queue_id: Option<String>,
}

/// A change made through the admin API (`mta queue hold|release|retry|delete`).
///
/// For `delete` it is also the final record of every recipient still
/// pending when the message was removed: `recipients` lists them (their
/// state became `deleted`), so each accepted recipient still ends with
/// exactly one final record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAction {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    /// `hold`, `release`, `retry`, `delete`, `bounce` (one per message,
    /// also when many were named by filters), `suspend` or `resume` (of a
    /// destination domain, without a queue ID).
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub queue_id: String,
    /// How the message or domain was named when not by its ID: the
    /// filters (`domain=example.com state=deferred`, or `all`), or for a
    /// suspension `domain=… until=… reason=…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The local user who asked (from the socket peer's uid), or `uid:<n>`
    /// when the uid has no name.
    pub who: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Where the call came from: `unix` (the admin socket) or the HTTPS
    /// client's address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `ok`, or the error.
    pub result: String,
    /// Delete and bounce: the recipients that were still pending (final
    /// from now on; a bounce also writes a Bounce record for each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

/// SIGHUP read the configuration again: applied, or refused as a whole
/// (nothing changed). Operators of regulated platforms need the rules a
/// message was accepted under on record, so every reload leaves one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReload {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: Timestamp,
    /// The file read; absent for the embedded default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// `ok`, or `refused` (the running configuration stays).
    pub result: String,
    /// Why it was refused: `file:line:column: message`, or the certificate
    /// or key file that did not load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Keys whose new values are in effect now (`smtp.relay_networks`,
    /// `tenants.<name>`, `dkim.keys`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// Keys whose new values only a restart applies; their running values
    /// stay until then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs_restart: Vec<String>,
    /// SHA-256 (hex) of the certificate new TLS handshakes present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate_sha256: Option<String>,
    /// DKIM keys loaded (active or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_keys: Option<usize>,
}

/// One transaction log record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Record {
    Reception(Reception),
    Rejection(Rejection),
    AuthFailure(AuthFailure),
    AuthSuccess(AuthSuccess),
    /// The end of an SMTP session: who, how, what it accepted and refused.
    Session(SmtpSession),
    /// The receiving server accepted the recipient (final).
    Delivery(Attempt),
    /// A temporary failure; the recipient is deferred.
    TransientFailure(Attempt),
    /// A permanent failure (final).
    Bounce(Attempt),
    /// Retried until the message's lifetime ran out (final).
    Expiration(Attempt),
    SpfChange(SpfChange),
    /// A change through the admin API; for a delete, final for `recipients`.
    AdminAction(AdminAction),
    /// A SIGHUP reload of the configuration.
    ConfigReload(ConfigReload),
}

impl Record {
    pub fn timestamp(&self) -> Timestamp {
        match self {
            Record::Reception(r) => r.timestamp,
            Record::Rejection(r) => r.timestamp,
            Record::AuthFailure(r) => r.timestamp,
            Record::AuthSuccess(r) => r.timestamp,
            Record::Session(r) => r.timestamp,
            Record::SpfChange(r) => r.timestamp,
            Record::AdminAction(r) => r.timestamp,
            Record::ConfigReload(r) => r.timestamp,
            Record::Delivery(a)
            | Record::TransientFailure(a)
            | Record::Bounce(a)
            | Record::Expiration(a) => a.timestamp,
        }
    }

    pub fn queue_id(&self) -> Option<&str> {
        match self {
            Record::Reception(r) => Some(&r.queue_id),
            Record::Delivery(a)
            | Record::TransientFailure(a)
            | Record::Bounce(a)
            | Record::Expiration(a) => Some(&a.queue_id),
            _ => None,
        }
    }

    /// The attempt, for the four delivery records.
    pub fn attempt(&self) -> Option<&Attempt> {
        match self {
            Record::Delivery(a)
            | Record::TransientFailure(a)
            | Record::Bounce(a)
            | Record::Expiration(a) => Some(a),
            _ => None,
        }
    }

    /// The record's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Reception(_) => "Reception",
            Record::Rejection(_) => "Rejection",
            Record::AuthFailure(_) => "AuthFailure",
            Record::AuthSuccess(_) => "AuthSuccess",
            Record::Session(_) => "Session",
            Record::Delivery(_) => "Delivery",
            Record::TransientFailure(_) => "TransientFailure",
            Record::Bounce(_) => "Bounce",
            Record::Expiration(_) => "Expiration",
            Record::SpfChange(_) => "SpfChange",
            Record::AdminAction(_) => "AdminAction",
            Record::ConfigReload(_) => "ConfigReload",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the transaction log in {}: {source}", dir.display())]
    Open {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not a transaction log record: {reason}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

enum Msg {
    Record(Box<Record>),
    /// A record whose sender waits until it is written.
    Acked(Box<Record>, tokio::sync::oneshot::Sender<()>),
    Flush(mpsc::SyncSender<()>),
    /// Run with every file closed and nothing being appended (redaction
    /// rewrites files the writer would otherwise hold open).
    Exclusive(Box<dyn FnOnce(&Path) + Send>),
    /// Write out what came before and stop.
    Close,
}

/// The writer. Cheap to clone; records from all clones go to one thread.
#[derive(Clone)]
pub struct TransactionLog {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for TransactionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransactionLog")
    }
}

/// Closes the log when dropped: the writer writes out what was sent before
/// and stops, even if some `TransactionLog` clones live on (records sent
/// through them afterwards are reported as lost).
pub struct LogWriterGuard {
    tx: mpsc::Sender<Msg>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for LogWriterGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Files are cut at this size unless configured otherwise (`[log] max_file_mb`).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// The name of the file for records of this day.
pub fn file_name(day: time::Date) -> String {
    part_name(day, 0)
}

/// The name of part `part` of a day: the day's first file, then
/// `transactions-YYYY-MM-DD.1.jsonl`, `.2.jsonl`, … once one is full.
pub fn part_name(day: time::Date, part: u32) -> String {
    let base = format!(
        "transactions-{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    );
    if part == 0 {
        format!("{base}.jsonl")
    } else {
        format!("{base}.{part}.jsonl")
    }
}

/// The day and part a log file name stands for.
pub fn parse_name(name: &str) -> Option<(time::Date, u32)> {
    let rest = name.strip_prefix("transactions-")?.strip_suffix(".jsonl")?;
    let (date, part) = match rest.split_once('.') {
        Some((d, p)) => (d, p.parse().ok()?),
        None => (rest, 0),
    };
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Some((time::Date::parse(date, format).ok()?, part))
}

/// Removes the log files of days before `before`; the paths removed.
/// Retention (`[log] retention_days`) calls it hourly.
pub fn remove_before(dir: &Path, before: time::Date) -> std::io::Result<Vec<PathBuf>> {
    let files = files_before(dir, before)?;
    for path in &files {
        std::fs::remove_file(path)?;
    }
    Ok(files)
}

/// The log files of days before `before`, sorted.
pub fn files_before(dir: &Path, before: time::Date) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let day = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_name)
            .map(|(d, _)| d);
        if day.is_some_and(|d| d < before) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

impl TransactionLog {
    /// Starts the writer on `dir` (created if missing). Dropping the guard
    /// stops it.
    pub fn open(dir: &Path) -> Result<(TransactionLog, LogWriterGuard), LogError> {
        Self::open_with(dir, DEFAULT_MAX_FILE_BYTES)
    }

    /// [`TransactionLog::open`] with files cut at `max_file_bytes` (0: one
    /// file per day whatever its size).
    pub fn open_with(
        dir: &Path,
        max_file_bytes: u64,
    ) -> Result<(TransactionLog, LogWriterGuard), LogError> {
        std::fs::create_dir_all(dir).map_err(|source| LogError::Open {
            dir: dir.to_path_buf(),
            source,
        })?;
        // Fail now, not later in the thread, if the directory is not writable.
        let probe = dir.join(".writable");
        File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|source| LogError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let dir = dir.to_path_buf();
        let thread = thread::Builder::new()
            .name("transaction-log".into())
            .spawn(move || writer(dir, max_file_bytes, rx))
            .expect("spawning the log writer");
        Ok((
            TransactionLog { tx: tx.clone() },
            LogWriterGuard {
                tx,
                thread: Some(thread),
            },
        ))
    }

    pub fn write(&self, record: Record) {
        if self.tx.send(Msg::Record(Box::new(record))).is_err() {
            tracing::error!("transaction log writer has stopped; a record was lost");
        }
    }

    /// Writes a record and resolves once it is in the file (in the
    /// operating system's hands; no fsync).
    pub async fn write_acked(&self, record: Record) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Acked(Box::new(record), tx)).is_err() {
            tracing::error!("transaction log writer has stopped; a record was lost");
            return;
        }
        let _ = rx.await;
    }

    /// Runs `f` on the log directory in the writer's thread, after every
    /// record sent before and with the current file closed: records sent
    /// meanwhile wait in the channel, and the next one reopens the day's
    /// last part. `None` if the writer has stopped.
    pub async fn exclusive<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Box::new(move |dir: &Path| {
            let _ = tx.send(f(dir));
        });
        self.tx.send(Msg::Exclusive(job)).ok()?;
        rx.await.ok()
    }

    /// Waits until every record written before this call is in the file.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// The open file of the current day, and a reused line buffer.
struct Files {
    dir: PathBuf,
    /// Cut a file at this size (0: never).
    max_bytes: u64,
    current: Option<Current>,
    line: Vec<u8>,
}

/// The file being appended to.
struct Current {
    day: time::Date,
    part: u32,
    bytes: u64,
    file: BufWriter<File>,
}

impl Files {
    /// The last part of `day` already on disk and its size (after a
    /// restart, appending goes on where it stopped).
    fn last_part(&self, day: time::Date) -> (u32, u64) {
        let mut last = (0, 0);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let Some((d, part)) = e.file_name().to_str().and_then(parse_name) else {
                    continue;
                };
                if d == day && part >= last.0 {
                    last = (part, e.metadata().map_or(0, |m| m.len()));
                }
            }
        }
        last
    }

    fn open(&mut self, day: time::Date, part: u32, bytes: u64) {
        self.flush();
        let path = self.dir.join(part_name(day, part));
        self.current = match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => Some(Current {
                day,
                part,
                bytes,
                file: BufWriter::with_capacity(64 * 1024, f),
            }),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open transaction log file");
                None
            }
        };
    }

    fn append(&mut self, record: &Record) {
        self.line.clear();
        if serde_json::to_writer(&mut self.line, record).is_err() {
            return;
        }
        self.line.push(b'\n');
        let day = record.timestamp().to_offset(time::UtcOffset::UTC).date();
        let len = self.line.len() as u64;
        match &self.current {
            Some(c) if c.day == day => {
                if self.max_bytes > 0 && c.bytes > 0 && c.bytes + len > self.max_bytes {
                    let next = c.part + 1;
                    self.open(day, next, 0);
                }
            }
            _ => {
                let (part, bytes) = self.last_part(day);
                if self.max_bytes > 0 && bytes > 0 && bytes + len > self.max_bytes {
                    self.open(day, part + 1, 0);
                } else {
                    self.open(day, part, bytes);
                }
            }
        }
        if let Some(c) = self.current.as_mut() {
            match c.file.write_all(&self.line) {
                Ok(()) => c.bytes += len,
                Err(e) => tracing::error!(error = %e, "cannot write the transaction log"),
            }
        }
    }

    fn flush(&mut self) {
        if let Some(c) = self.current.as_mut()
            && let Err(e) = c.file.flush()
        {
            tracing::error!(error = %e, "cannot write the transaction log");
        }
    }
}

fn writer(dir: PathBuf, max_bytes: u64, rx: mpsc::Receiver<Msg>) {
    let mut files = Files {
        dir,
        max_bytes,
        current: None,
        line: Vec::with_capacity(1024),
    };
    let mut acks = Vec::new();
    'run: while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Close => break 'run,
                Msg::Flush(done) => {
                    files.flush();
                    let _ = done.send(());
                }
                Msg::Exclusive(job) => {
                    files.flush();
                    files.current = None;
                    job(&files.dir);
                }
                Msg::Record(record) => files.append(&record),
                Msg::Acked(record, ack) => {
                    files.append(&record);
                    acks.push(ack);
                }
            }
            next = rx.try_recv().ok();
        }
        // Nothing more waiting: write out what we have, then release the
        // writers waiting for their records.
        files.flush();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
    files.flush();
}

/// Every record in `dir`, oldest file first, in the order written.
pub fn read_dir(dir: &Path) -> Result<Vec<Record>, LogError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LogError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    // By day, then part: the names do not sort that way as text.
    files.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_name)
            .map(|(d, part)| (Some(d), part, String::new()))
            .unwrap_or_else(|| (None, 0, p.display().to_string()))
    });
    let mut out = Vec::new();
    for path in files {
        let f = File::open(&path).map_err(|source| LogError::Read {
            path: path.clone(),
            source,
        })?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| LogError::Read {
                path: path.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(&line).map_err(|e| LogError::Parse {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            out.push(record);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn reception(at: &str, id: &str) -> Record {
        Record::Reception(Reception {
            timestamp: ts(at),
            queue_id: id.into(),
            session: SessionInfo {
                peer_ip: "127.0.0.1".into(),
                peer_port: 4000,
                helo: Some("c".into()),
                tls_version: Some("TLSv1.3".into()),
                tls_cipher: Some("TLS13_AES_256_GCM_SHA384".into()),
                auth_user: Some("acme-app".into()),
                tenant: Some("acme".into()),
            },
            protocol: "ESMTPSA".into(),
            sender: "n@acme.example".into(),
            recipients: vec!["a@d.example".into()],
            size: 100,
            message_id: None,
            dkim: vec![],
            dkim_unsigned: None,
            spf: None,
            dmarc: None,
        })
    }

    #[test]
    fn records_are_flat_json_with_type_and_rfc3339_timestamp() {
        let json = serde_json::to_value(reception("2026-11-22T10:00:00Z", "X")).unwrap();
        assert_eq!(json["type"], "Reception");
        assert_eq!(json["timestamp"], "2026-11-22T10:00:00Z");
        assert_eq!(json["peer_ip"], "127.0.0.1");
        assert_eq!(json["tls_version"], "TLSv1.3");
        assert!(
            json.get("message_id").is_none(),
            "absent fields are left out"
        );
        let rej = Record::Rejection(Rejection {
            timestamp: ts("2026-11-22T10:00:00Z"),
            session: SessionInfo::default(),
            command: "RCPT".into(),
            sender: None,
            recipient: Some("x@y".into()),
            recipients: vec![],
            reply: (&Reply::new(550, crate::smtp::Status(5, 7, 1), "no")).into(),
        });
        let json = serde_json::to_value(&rej).unwrap();
        assert_eq!(json["code"], 550);
        assert_eq!(json["enhanced_code"], "5.7.1");
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back, rej);
    }

    #[test]
    fn written_records_read_back_in_order_across_days() {
        let dir = tempfile::tempdir().unwrap();
        let (log, guard) = TransactionLog::open(dir.path()).unwrap();
        log.write(reception("2026-11-21T23:59:59Z", "A"));
        log.write(reception("2026-11-22T00:00:01Z", "B"));
        log.write(reception("2026-11-22T00:00:02Z", "C"));
        log.flush();
        let ids: Vec<_> = read_dir(dir.path())
            .unwrap()
            .iter()
            .map(|r| r.queue_id().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["A", "B", "C"]);
        assert!(dir.path().join("transactions-2026-11-21.jsonl").exists());
        assert!(dir.path().join("transactions-2026-11-22.jsonl").exists());
        drop(log);
        drop(guard);
    }

    #[test]
    fn files_are_cut_at_their_size_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, guard) = TransactionLog::open_with(dir.path(), 1200).unwrap();
        let ids: Vec<String> = (0..12).map(|i| format!("M{i:02}")).collect();
        for id in &ids {
            log.write(reception("2026-11-22T10:00:00Z", id));
        }
        log.flush();
        drop(log);
        drop(guard);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(names.len() >= 3, "{names:?}");
        assert!(names.contains(&"transactions-2026-11-22.jsonl".to_string()));
        assert!(names.contains(&"transactions-2026-11-22.2.jsonl".to_string()));
        for n in &names {
            let len = std::fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(len <= 1200, "{n}: {len}");
        }
        // A restart appends to the last part, and the reader keeps order.
        let (log, guard) = TransactionLog::open_with(dir.path(), 1200).unwrap();
        log.write(reception("2026-11-22T11:00:00Z", "LAST"));
        log.flush();
        drop(log);
        drop(guard);
        let read: Vec<String> = read_dir(dir.path())
            .unwrap()
            .iter()
            .map(|r| r.queue_id().unwrap().to_string())
            .collect();
        let mut want = ids.clone();
        want.push("LAST".into());
        assert_eq!(read, want);
    }

    #[test]
    fn retention_removes_whole_days_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "transactions-2026-11-20.jsonl",
            "transactions-2026-11-20.1.jsonl",
            "transactions-2026-11-21.jsonl",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let cutoff = time::macros::date!(2026 - 11 - 21);
        let removed = remove_before(dir.path(), cutoff).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(dir.path().join("transactions-2026-11-21.jsonl").exists());
        assert!(dir.path().join("notes.txt").exists());
        assert_eq!(
            parse_name("transactions-2026-11-21.3.jsonl"),
            Some((cutoff, 3))
        );
        assert_eq!(parse_name("transactions-x.jsonl"), None);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_at_open() {
        let e = TransactionLog::open(Path::new("/proc/no-such-dir/log"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/proc/no-such-dir/log"), "{e}");
    }
}
