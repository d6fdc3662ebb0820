//! The SMTP server session: a pure state machine.
//!
//! Bytes go in with [`Session::feed`]; [`Session::advance`] processes as
//! much of them as it can and says what the driver must do next
//! ([`Step`]); replies accumulate in [`Session::output`] and log-worthy
//! happenings in [`Session::take_events`]. Work that needs I/O or heavy CPU
//! (the TLS handshake, checking a password, storing a message) goes out as a
//! step, and its result comes back through `tls_established`,
//! `auth_result` or `message_result`. No sockets, no clock, no tokio: every
//! exchange is testable with byte strings.
//!
//! Pipelining (RFC 2920) falls out of the design: commands are handled in
//! order from the input buffer, and the driver writes the collected replies
//! whenever the session needs more input.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::body::{ChunkReader, DataReader};
use super::command::{self, Command, Domain, MailParams, Mailbox};
use super::reply::{Reply, Status, quote, replies};
use crate::policy::Policy;

/// Line limit for commands (RFC 5321 §4.5.3.1.4 allows 512; the issue of
/// long ESMTP parameters makes 1000 the common practice).
pub const MAX_COMMAND_LINE: usize = 1000;
/// RFC 4954 §4 raises the limit for AUTH lines and SASL responses.
pub const MAX_AUTH_LINE: usize = 12288;

/// Settings of a session, shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our name, in the greeting and EHLO reply.
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Protocol errors (5.5.x) before the session is closed with 421.
    pub max_errors: u32,
    /// Failed AUTH attempts before the session is closed with 421.
    pub max_auth_failures: u32,
    /// A certificate is loaded, so STARTTLS may be offered.
    pub starttls: bool,
    /// Some user is configured, so AUTH may be offered (after TLS).
    pub auth: bool,
    pub policy: Arc<Policy>,
    /// Set while the queue's disk is short of space: MAIL gets 452 4.3.1.
    pub storage_low: Arc<AtomicBool>,
    /// MAIL FROM waits for the driver to check the sender (SPF alignment
    /// of our egress IPs under `[spf] policy = "enforce"`).
    pub check_sender: bool,
}

/// The remote end of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ip: IpAddr,
    pub port: u16,
    /// The client is in `relay_networks`: it may send without AUTH.
    pub relay: bool,
}

/// What TLS was negotiated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub tenant: String,
}

/// Credentials for the driver to check. The password never appears in
/// `Debug` output, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub mechanism: &'static str,
    /// The authentication identity (user name).
    pub user: String,
    /// PLAIN's authorization identity, when the client gave one.
    pub authzid: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .field("authzid", &self.authzid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The driver's verdict on an [`AuthRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Success(Identity),
    /// Wrong user or password, or a refused authorization identity (the
    /// driver has already waited its delay). The reason goes to the log.
    Failure {
        reason: &'static str,
    },
    /// Too many failures from this address: the session is closed.
    Locked,
    /// Too many failures for this user name from addresses it has not
    /// logged in from: refused for now, counted as a failure of the session.
    UserLocked,
    /// The check itself failed.
    TempFail,
}

/// A complete message, for the driver to check and store.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub peer: Peer,
    pub helo: String,
    pub esmtp: bool,
    pub tls: Option<TlsInfo>,
    pub auth: Option<Identity>,
    pub tenant: Option<String>,
    /// MAIL FROM; empty for `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    pub params: MailParams,
    /// The content as received (dot-unstuffed, CRLF lines).
    pub content: Vec<u8>,
}

impl Envelope {
    /// The `with` protocol of the Received header (RFC 3848, RFC 6531 §3.7.3).
    pub fn protocol(&self) -> String {
        let mut p = String::new();
        if self.params.smtputf8 {
            p.push_str("UTF8SMTP");
        } else if self.esmtp {
            p.push_str("ESMTP");
        } else {
            p.push_str("SMTP");
        }
        if self.tls.is_some() {
            p.push('S');
        }
        if self.auth.is_some() {
            p.push('A');
        }
        p
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Write the output, then read more input and `feed` it.
    NeedInput,
    /// Write the output (it ends with `220`), do the TLS handshake, then
    /// call `tls_established`.
    StartTls,
    /// Check the credentials, then call `auth_result`.
    Authenticate(AuthRequest),
    /// Check the sender of MAIL FROM (its address; never `<>`), then call
    /// `sender_result`.
    CheckSender(String),
    /// Check and store the message, then call `message_result`.
    Message(Box<Envelope>),
    /// Write the output and close the connection.
    Close,
}

/// Something the transaction log should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session refused a command with this reply.
    Rejected {
        command: &'static str,
        reply: Reply,
        sender: Option<String>,
        recipient: Option<String>,
    },
    /// An AUTH attempt failed. Carries the user name tried, never the password.
    AuthFailed {
        mechanism: &'static str,
        user: String,
        reason: &'static str,
        reply: Reply,
    },
}

#[derive(Debug)]
enum State {
    Command,
    Data(DataReader),
    /// Reading a BDAT chunk's payload. `refusal` set: the chunk is read and
    /// thrown away, then this reply is sent.
    Chunk {
        size: u64,
        remaining: u64,
        last: bool,
        refusal: Option<Reply>,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass {
        user: String,
    },
    /// A step is out with the driver.
    Waiting,
    Closed,
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    params: MailParams,
    tenant: Option<String>,
    recipients: Vec<String>,
    chunks: Option<ChunkReader>,
}

#[derive(Debug)]
struct Helo {
    name: String,
    esmtp: bool,
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    peer: Peer,
    tls: Option<TlsInfo>,
    helo: Option<Helo>,
    auth: Option<Identity>,
    tx: Option<Transaction>,
    state: State,
    /// Input read and not yet consumed is `input[start..end]`; the bytes
    /// after `end` are space the driver reads into (see
    /// [`Session::input_space`]), so input is not copied on its way in.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Throwing away the rest of an over-long line.
    discarding: bool,
    output: Vec<u8>,
    events: Vec<Event>,
    errors: u32,
    auth_failures: u32,
    closing: bool,
    /// The command the reply being produced answers, for events.
    current: &'static str,
    /// Mechanism and user of the AUTH attempt out with the driver.
    pending_auth: Option<(&'static str, String)>,
    /// The transaction whose sender is out with the driver.
    pending_tx: Option<Transaction>,
    /// The size of the last message read in this session.
    last_size: Option<u64>,
}

fn is_protocol_error(r: &Reply) -> bool {
    r.code >= 500 && matches!(r.status, Some(Status(5, 5, _)))
}

impl Session {
    /// A new session. `tls` is set for implicit-TLS listeners, where the
    /// handshake happened before the first byte of SMTP.
    pub fn new(cfg: Arc<SessionConfig>, peer: Peer, tls: Option<TlsInfo>) -> Self {
        Session {
            cfg,
            peer,
            tls,
            helo: None,
            auth: None,
            tx: None,
            state: State::Command,
            input: Vec::new(),
            start: 0,
            end: 0,
            discarding: false,
            output: Vec::with_capacity(1024),
            events: Vec::new(),
            errors: 0,
            auth_failures: 0,
            closing: false,
            current: "CONNECT",
            pending_auth: None,
            pending_tx: None,
            last_size: None,
        }
    }

    /// Queues the `220` greeting.
    pub fn greeting(&mut self) {
        let r = Reply::plain(220, format!("{} ESMTP ready", self.cfg.hostname));
        r.write_to(&mut self.output);
    }

    /// Input from the peer, as one read delivered it.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = self.input_space();
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            self.filled(n);
            rest = &rest[n..];
        }
    }

    /// Where the driver reads the next input into; it then calls
    /// [`Session::filled`] with the count read. Reading into the session's
    /// own buffer spares a copy of every byte, which counts for message
    /// content. The space is at least [`Session::READ_SPACE`] while
    /// content is being read, [`Session::COMMAND_READ_SPACE`] otherwise, so
    /// an idle connection holds little.
    pub fn input_space(&mut self) -> &mut [u8] {
        let want = if self.in_data() {
            Self::READ_SPACE
        } else {
            Self::COMMAND_READ_SPACE
        };
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.input.len() - self.end < want && self.start > 0 {
            // What is left is at most part of a line: cheap to move.
            self.input.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.input.len() - self.end < want {
            self.input.resize(self.end + want, 0);
        }
        &mut self.input[self.end..]
    }

    /// `n` bytes were read into [`Session::input_space`].
    pub fn filled(&mut self, n: usize) {
        assert!(
            self.end + n <= self.input.len(),
            "filled past the input space"
        );
        self.end += n;
    }

    /// Read space while message content is coming.
    pub const READ_SPACE: usize = 64 * 1024;
    /// Read space for commands.
    pub const COMMAND_READ_SPACE: usize = 4 * 1024;

    /// The replies to write. The driver writes and clears it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.output
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Reading message content (the data timeout applies, not the command one).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_) | State::Chunk { .. })
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.auth.as_ref()
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_ref().map(|h| h.name.as_str())
    }

    /// The envelope sender of the open transaction, if any.
    pub fn sender(&self) -> Option<&str> {
        self.tx.as_ref().map(|t| t.sender.as_str())
    }

    fn pending(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(self.start + n <= self.end);
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Forgets unconsumed input.
    fn discard_input(&mut self) {
        (self.start, self.end) = (0, 0);
    }

    /// Sends a reply; refusals become events, and too many protocol errors
    /// end the session.
    fn reply(&mut self, r: Reply) {
        if r.code >= 400 {
            let (sender, recipient) = (self.sender().map(str::to_string), None);
            self.events.push(Event::Rejected {
                command: self.current,
                reply: r.clone(),
                sender,
                recipient,
            });
        }
        self.reply_quiet(r);
    }

    fn reply_quiet(&mut self, r: Reply) {
        let protocol_error = is_protocol_error(&r);
        r.write_to(&mut self.output);
        if protocol_error {
            self.errors += 1;
            if self.errors >= self.cfg.max_errors && !self.closing {
                let bye = replies::too_many_errors();
                self.events.push(Event::Rejected {
                    command: self.current,
                    reply: bye.clone(),
                    sender: None,
                    recipient: None,
                });
                bye.write_to(&mut self.output);
                self.closing = true;
            }
        }
    }

    fn reject_rcpt(&mut self, r: Reply, recipient: &Mailbox) {
        self.events.push(Event::Rejected {
            command: "RCPT",
            reply: r.clone(),
            sender: self.sender().map(str::to_string),
            recipient: Some(recipient.to_string()),
        });
        self.reply_quiet(r);
    }

    /// Processes buffered input until the driver must act.
    pub fn advance(&mut self) -> Step {
        loop {
            if self.closing {
                self.state = State::Closed;
                return Step::Close;
            }
            match &mut self.state {
                State::Closed => return Step::Close,
                State::Waiting => return Step::NeedInput,
                State::Data(reader) => {
                    let (n, done) = reader.feed(&self.input[self.start..self.end]);
                    self.consume(n);
                    if !done {
                        return Step::NeedInput;
                    }
                    let State::Data(reader) = std::mem::replace(&mut self.state, State::Command)
                    else {
                        unreachable!()
                    };
                    self.current = "DATA";
                    match reader.finish() {
                        Ok(content) => return self.message_ready(content),
                        Err(r) => {
                            self.reply(r);
                            self.tx = None;
                        }
                    }
                }
                State::Chunk { .. } => {
                    if let Some(step) = self.read_chunk() {
                        return step;
                    }
                }
                State::Command
                | State::AuthPlain
                | State::AuthLoginUser
                | State::AuthLoginPass { .. } => {
                    let Some(line) = self.next_line() else {
                        return Step::NeedInput;
                    };
                    let Ok(line) = line else { continue };
                    let step = if matches!(self.state, State::Command) {
                        self.command(&line)
                    } else {
                        self.auth_response(&line)
                    };
                    if let Some(step) = step {
                        return step;
                    }
                }
            }
        }
    }

    /// The longest line acceptable in the current state (RFC 4954 §4 raises
    /// the limit for AUTH lines and SASL responses).
    fn line_limit(&self, line_start: &[u8]) -> usize {
        if !matches!(self.state, State::Command)
            || line_start.len() >= 5 && line_start[..5].eq_ignore_ascii_case(b"AUTH ")
        {
            MAX_AUTH_LINE
        } else {
            MAX_COMMAND_LINE
        }
    }

    /// The next complete line without its CRLF. `Some(Err(()))`: a line was
    /// consumed and refused (too long, bare LF).
    fn next_line(&mut self) -> Option<Result<Vec<u8>, ()>> {
        let pending = self.pending();
        let limit = self.line_limit(pending);
        let Some(i) = memchr::memchr(b'\n', pending) else {
            let n = pending.len();
            if n > limit {
                // Throw the line away as it comes; answer once it ends.
                self.discarding = true;
                self.consume(n);
            }
            return None;
        };
        let raw = &pending[..i];
        let too_long = i + 1 > limit;
        let (line, bare_lf) = match raw.strip_suffix(b"\r") {
            Some(l) => (l.to_vec(), false),
            None => (raw.to_vec(), true),
        };
        self.consume(i + 1);
        if std::mem::take(&mut self.discarding) || too_long {
            self.current = "UNKNOWN";
            self.state = State::Command;
            self.reply(replies::line_too_long());
            return Some(Err(()));
        }
        if bare_lf {
            self.current = "UNKNOWN";
            self.state = State::Command;
            self.reply(Reply::new(
                500,
                Status(5, 5, 2),
                "Bare LF in command: lines must end with CRLF",
            ));
            return Some(Err(()));
        }
        Some(Ok(line))
    }

    fn command(&mut self, line: &[u8]) -> Option<Step> {
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(r) => {
                self.current = "UNKNOWN";
                self.reply(r);
                return None;
            }
        };
        self.current = cmd.verb();
        match cmd {
            Command::Ehlo(name) => {
                self.tx = None;
                self.reply_quiet(self.ehlo_reply(&name));
                self.helo = Some(Helo { name, esmtp: true });
            }
            Command::Helo(name) => {
                self.tx = None;
                self.reply_quiet(Reply::plain(250, self.cfg.hostname.clone()));
                self.helo = Some(Helo { name, esmtp: false });
            }
            Command::Mail { from, params } => return self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.tx = None;
                self.reply(replies::ok());
            }
            Command::Noop => self.reply(replies::ok()),
            Command::Quit => {
                self.reply(Reply::new(221, Status(2, 0, 0), "Bye"));
                self.closing = true;
            }
            Command::Vrfy => self.reply(Reply::new(
                252,
                Status(2, 5, 0),
                "Cannot VRFY user, but will accept the message and attempt delivery",
            )),
            Command::Expn => self.reply(Reply::new(502, Status(5, 5, 1), "EXPN is not supported")),
            Command::Help => self.reply(Reply::new(
                214,
                Status(2, 0, 0),
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
            )),
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => return self.auth(&mechanism, initial),
        }
        None
    }

    fn ehlo_reply(&self, name: &str) -> Reply {
        let mut text = format!(
            "{} Hello {} [{}]\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING",
            self.cfg.hostname,
            // The name is the client's: one short line (RFC 5321 4.5.3.1.5).
            quote(name, 128),
            crate::policy::canonical_ip(self.peer.ip),
            self.cfg.max_message_size
        );
        if self.cfg.starttls && self.tls.is_none() {
            text.push_str("\nSTARTTLS");
        }
        if self.cfg.auth && self.tls.is_some() {
            text.push_str("\nAUTH PLAIN LOGIN");
        }
        Reply::plain(250, text)
    }

    fn mail(&mut self, from: Option<Mailbox>, params: MailParams) -> Option<Step> {
        if self.helo.is_none() {
            return self.refuse(replies::bad_sequence("Send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.refuse(replies::bad_sequence(
                "Nested MAIL command: send RSET first",
            ));
        }
        if self.auth.is_none() && !self.peer.relay {
            let text = if self.tls.is_none() && self.cfg.starttls {
                "Authentication required: issue STARTTLS, then AUTH"
            } else {
                "Authentication required"
            };
            return self.refuse(Reply::new(530, Status(5, 7, 0), text));
        }
        if let Some(mb) = &from
            && !params.smtputf8
            && !mb.is_ascii()
        {
            return self.refuse(Reply::new(
                553,
                Status(5, 6, 7),
                "Non-ASCII sender address needs the SMTPUTF8 parameter (RFC 6531)",
            ));
        }
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return self.refuse(replies::message_too_big(self.cfg.max_message_size));
        }
        if self.cfg.storage_low.load(Ordering::Relaxed) {
            // RFC 1870 §6.1 / RFC 3463: the system is short of storage.
            return self.refuse(Reply::new(
                452,
                Status(4, 3, 1),
                "Insufficient system storage; try again later",
            ));
        }
        let domain = from.as_ref().map(|m| m.domain_str().to_string());
        let tenant = match (&self.auth, &domain) {
            (Some(id), Some(d)) => {
                if !self.cfg.policy.sender_allowed(&id.tenant, d) {
                    return self.refuse(Reply::new(
                        550,
                        Status(5, 7, 1),
                        format!(
                            "Sender domain {d} is not one of tenant {}'s sender domains",
                            id.tenant
                        ),
                    ));
                }
                Some(id.tenant.clone())
            }
            (Some(id), None) => Some(id.tenant.clone()),
            (None, Some(d)) if self.cfg.policy.has_tenants() => {
                match self.cfg.policy.tenant_for_domain(d) {
                    Some(t) => Some(t.name.clone()),
                    None => {
                        return self.refuse(Reply::new(
                            550,
                            Status(5, 7, 1),
                            format!("Sender domain {d} does not belong to any tenant"),
                        ));
                    }
                }
            }
            (None, _) => None,
        };
        let tx = Transaction {
            sender: from.map(|m| m.to_string()).unwrap_or_default(),
            params,
            tenant,
            recipients: Vec::new(),
            chunks: None,
        };
        if self.cfg.check_sender && !tx.sender.is_empty() {
            let sender = tx.sender.clone();
            self.pending_tx = Some(tx);
            return Some(Step::CheckSender(sender));
        }
        self.tx = Some(tx);
        self.reply(Reply::new(250, Status(2, 1, 0), "Ok"));
        None
    }

    /// A refusal of MAIL: the reply, and no step for the driver.
    fn refuse(&mut self, r: Reply) -> Option<Step> {
        self.reply(r);
        None
    }

    /// The driver's verdict on the sender of the pending MAIL FROM.
    pub fn sender_result(&mut self, result: Result<(), Reply>) {
        let Some(tx) = self.pending_tx.take() else {
            return;
        };
        self.current = "MAIL";
        match result {
            Ok(()) => {
                self.tx = Some(tx);
                self.reply(Reply::new(250, Status(2, 1, 0), "Ok"));
            }
            Err(r) => {
                self.events.push(Event::Rejected {
                    command: "MAIL",
                    reply: r.clone(),
                    sender: Some(tx.sender),
                    recipient: None,
                });
                self.reply_quiet(r);
            }
        }
    }

    fn rcpt(&mut self, to: Mailbox) {
        let Some(tx) = &self.tx else {
            return self.reply(replies::bad_sequence("Send MAIL FROM before RCPT TO"));
        };
        if tx.chunks.is_some() {
            return self.reply(replies::bad_sequence("RCPT TO after BDAT: send RSET first"));
        }
        if !tx.params.smtputf8 && !to.is_ascii() {
            return self.reject_rcpt(
                Reply::new(
                    553,
                    Status(5, 6, 7),
                    "Non-ASCII recipient address needs the SMTPUTF8 parameter on MAIL FROM (RFC 6531)",
                ),
                &to,
            );
        }
        if matches!(to.domain, Domain::Literal(_)) {
            return self.reject_rcpt(
                Reply::new(
                    550,
                    Status(5, 1, 2),
                    "Address literals are not accepted as recipients: use a domain name",
                ),
                &to,
            );
        }
        if tx.recipients.len() >= self.cfg.max_recipients {
            return self.reject_rcpt(
                Reply::new(
                    452,
                    Status(4, 5, 3),
                    format!(
                        "Too many recipients: at most {} per message; send the rest in another message",
                        self.cfg.max_recipients
                    ),
                ),
                &to,
            );
        }
        let address = to.to_string();
        if let Some(tx) = &mut self.tx {
            tx.recipients.push(address);
        }
        self.reply(Reply::new(250, Status(2, 1, 5), "Ok"));
    }

    fn data(&mut self) {
        let refusal = match &self.tx {
            None => replies::bad_sequence("Send MAIL FROM and RCPT TO before DATA"),
            Some(tx) if tx.chunks.is_some() => {
                replies::bad_sequence("DATA after BDAT: send RSET first")
            }
            Some(tx) if tx.recipients.is_empty() => {
                Reply::new(554, Status(5, 5, 1), "No valid recipients")
            }
            Some(tx) => {
                // Without SIZE=, the last message of the session is the best
                // guess (campaign mail on one connection is much alike), with
                // an eighth to spare: a body grown by doubling is copied each
                // time it grows.
                let expected = tx.params.size.or_else(|| self.last_size.map(|n| n + n / 8));
                self.reply(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
                self.state = State::Data(DataReader::with_expected(
                    self.cfg.max_message_size,
                    expected,
                ));
                return;
            }
        };
        self.reply(refusal);
        // RFC 2920 §3.1: DATA ends a pipelined group, so bytes already here
        // after a refused DATA were sent before its reply: content meant
        // for a 354 that did not come. Read as commands they would run (a
        // RCPT TO and a DATA in the content would queue it), so the session
        // is closed instead. After a 354, early content is just content.
        if !self.pending().is_empty() && !self.closing {
            self.reply(Reply::new(
                421,
                Status(4, 5, 0),
                "Content sent before the reply to DATA; wait for 354 (RFC 2920 section 3.1). Closing the connection",
            ));
            self.closing = true;
        }
    }

    fn bdat(&mut self, size: u64, last: bool) {
        let refusal = match &mut self.tx {
            None => Some(replies::bad_sequence(
                "Send MAIL FROM and RCPT TO before BDAT",
            )),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::new(554, Status(5, 5, 1), "No valid recipients"))
            }
            Some(tx) => {
                tx.chunks
                    .get_or_insert_with(|| ChunkReader::new(self.cfg.max_message_size));
                None
            }
        };
        // The chunk is read even when refused: it is already on its way.
        self.state = State::Chunk {
            size,
            remaining: size,
            last,
            refusal,
        };
    }

    fn read_chunk(&mut self) -> Option<Step> {
        let State::Chunk { remaining, .. } = &mut self.state else {
            unreachable!()
        };
        let available = self.end - self.start;
        let take = (*remaining).min(available as u64) as usize;
        *remaining -= take as u64;
        let done = *remaining == 0;
        if take > 0 {
            let piece = &self.input[self.start..self.start + take];
            if let Some(chunks) = self.tx.as_mut().and_then(|t| t.chunks.as_mut()) {
                chunks.feed(piece);
            }
            self.consume(take);
        }
        if !done {
            return Some(Step::NeedInput);
        }
        let State::Chunk {
            size,
            last,
            refusal,
            ..
        } = std::mem::replace(&mut self.state, State::Command)
        else {
            unreachable!()
        };
        self.current = "BDAT";
        if let Some(r) = refusal {
            self.reply(r);
            return None;
        }
        let chunks = self.tx.as_mut().and_then(|t| t.chunks.take())?;
        if last {
            match chunks.finish() {
                Ok(content) => return Some(self.message_ready(content)),
                Err(r) => {
                    self.reply(r);
                    self.tx = None;
                }
            }
        } else if let Err(r) = chunks.faults().verdict(self.cfg.max_message_size) {
            self.reply(r);
            self.tx = None;
        } else {
            if let Some(tx) = &mut self.tx {
                tx.chunks = Some(chunks);
            }
            self.reply(Reply::new(
                250,
                Status(2, 0, 0),
                format!("{size} octets received"),
            ));
        }
        None
    }

    fn message_ready(&mut self, content: Vec<u8>) -> Step {
        self.last_size = Some(content.len() as u64);
        let tx = self.tx.take().expect("a message needs a transaction");
        let helo = self.helo.as_ref().expect("a transaction needs EHLO");
        self.state = State::Waiting;
        Step::Message(Box::new(Envelope {
            peer: self.peer.clone(),
            helo: helo.name.clone(),
            esmtp: helo.esmtp,
            tls: self.tls.clone(),
            auth: self.auth.clone(),
            tenant: tx.tenant,
            sender: tx.sender,
            recipients: tx.recipients,
            params: tx.params,
            content,
        }))
    }

    /// The driver stored the message (`Ok(queue id)`) or refused it.
    pub fn message_result(&mut self, result: Result<String, Reply>) {
        self.state = State::Command;
        match result {
            Ok(id) => self.reply(Reply::new(
                250,
                Status(2, 0, 0),
                format!("Ok: queued as {id}"),
            )),
            // The driver logs its own refusals, with the whole envelope.
            Err(r) => self.reply_quiet(r),
        }
    }

    fn starttls(&mut self) -> Option<Step> {
        if self.tls.is_some() {
            self.reply(replies::bad_sequence("TLS is already active"));
            return None;
        }
        if !self.cfg.starttls {
            self.reply(Reply::new(454, Status(4, 7, 0), "TLS not available"));
            return None;
        }
        self.reply(Reply::new(220, Status(2, 0, 0), "Ready to start TLS"));
        // RFC 3207 §4.2: anything the client pipelined after STARTTLS came
        // in plaintext and must not be executed inside TLS (CVE-2011-0411).
        self.discard_input();
        self.state = State::Waiting;
        Some(Step::StartTls)
    }

    /// The handshake succeeded: the session starts over, as RFC 3207 §4.2
    /// requires (the client must EHLO again).
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.auth = None;
        self.tx = None;
        self.discard_input();
        self.state = State::Command;
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Option<Step> {
        if !self.cfg.auth {
            self.reply(Reply::new(
                502,
                Status(5, 5, 1),
                "AUTH is not available here",
            ));
            return None;
        }
        if self.tls.is_none() {
            self.reply(Reply::new(
                538,
                Status(5, 7, 11),
                "Encryption required for requested authentication mechanism: issue STARTTLS first",
            ));
            return None;
        }
        if self.helo.as_ref().is_none_or(|h| !h.esmtp) {
            self.reply(replies::bad_sequence("Send EHLO before AUTH"));
            return None;
        }
        if self.auth.is_some() {
            self.reply(replies::bad_sequence("Already authenticated"));
            return None;
        }
        if self.tx.is_some() {
            self.reply(replies::bad_sequence(
                "AUTH is not allowed during a mail transaction",
            ));
            return None;
        }
        match (mechanism, initial) {
            ("PLAIN", Some(resp)) => self.plain_response(resp.as_bytes()),
            ("PLAIN", None) => {
                self.reply_quiet(Reply::plain(334, ""));
                self.state = State::AuthPlain;
                None
            }
            ("LOGIN", Some(user)) => self.login_user(user.as_bytes()),
            ("LOGIN", None) => {
                self.reply_quiet(Reply::plain(334, "VXNlcm5hbWU6"));
                self.state = State::AuthLoginUser;
                None
            }
            _ => {
                self.reply(Reply::new(
                    504,
                    Status(5, 5, 4),
                    "Unrecognized authentication mechanism: use PLAIN or LOGIN",
                ));
                None
            }
        }
    }

    fn auth_response(&mut self, line: &[u8]) -> Option<Step> {
        self.current = "AUTH";
        let state = std::mem::replace(&mut self.state, State::Command);
        if line == b"*" {
            self.reply(Reply::new(501, Status(5, 0, 0), "Authentication cancelled"));
            return None;
        }
        match state {
            State::AuthPlain => self.plain_response(line),
            State::AuthLoginUser => self.login_user(line),
            State::AuthLoginPass { user } => {
                let password = self.decode_text(line)?;
                self.state = State::Waiting;
                self.pending_auth = Some(("LOGIN", user.clone()));
                Some(Step::Authenticate(AuthRequest {
                    mechanism: "LOGIN",
                    user,
                    authzid: None,
                    password,
                }))
            }
            _ => unreachable!("auth_response outside AUTH"),
        }
    }

    fn decode(&mut self, b64: &[u8]) -> Option<Vec<u8>> {
        match B64.decode(b64) {
            Ok(v) => Some(v),
            Err(_) => {
                self.state = State::Command;
                self.reply(Reply::new(
                    501,
                    Status(5, 5, 2),
                    "Invalid base64 in AUTH response",
                ));
                None
            }
        }
    }

    fn decode_text(&mut self, b64: &[u8]) -> Option<String> {
        let raw = self.decode(b64)?;
        match String::from_utf8(raw) {
            Ok(s) => Some(s),
            Err(_) => {
                self.state = State::Command;
                self.reply(Reply::new(
                    501,
                    Status(5, 5, 2),
                    "AUTH response is not UTF-8",
                ));
                None
            }
        }
    }

    /// The user name of AUTH LOGIN (initial response or answer to the
    /// first challenge): asks for the password, or refuses an empty name
    /// as PLAIN does (found by the session fuzzer).
    fn login_user(&mut self, b64: &[u8]) -> Option<Step> {
        let user = self.decode_text(b64)?;
        if user.is_empty() {
            self.state = State::Command;
            self.reply(Reply::new(
                501,
                Status(5, 5, 2),
                "Empty user name in the AUTH LOGIN response",
            ));
            return None;
        }
        self.reply_quiet(Reply::plain(334, "UGFzc3dvcmQ6"));
        self.state = State::AuthLoginPass { user };
        None
    }

    fn plain_response(&mut self, b64: &[u8]) -> Option<Step> {
        let text = self.decode_text(b64)?;
        let mut parts = text.splitn(3, '\0');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(authzid), Some(user), Some(password)) if !user.is_empty() => {
                self.state = State::Waiting;
                self.pending_auth = Some(("PLAIN", user.to_string()));
                Some(Step::Authenticate(AuthRequest {
                    mechanism: "PLAIN",
                    user: user.to_string(),
                    authzid: (!authzid.is_empty()).then(|| authzid.to_string()),
                    password: password.to_string(),
                }))
            }
            _ => {
                self.reply(Reply::new(
                    501,
                    Status(5, 5, 2),
                    "Malformed PLAIN response: expected authzid NUL user NUL password (RFC 4616)",
                ));
                None
            }
        }
    }

    /// A failed AUTH of this session: `reply`, or 421 and the end of the
    /// session once it has had `max_auth_failures`.
    fn count_auth_failure(&mut self, reply: Reply) -> Reply {
        self.auth_failures += 1;
        if self.auth_failures < self.cfg.max_auth_failures {
            return reply;
        }
        self.closing = true;
        Reply::new(
            421,
            Status(4, 7, 0),
            "Too many failed authentication attempts; closing the connection",
        )
    }

    /// The driver's verdict on the credentials.
    pub fn auth_result(&mut self, outcome: AuthOutcome) {
        self.state = State::Command;
        self.current = "AUTH";
        let (mechanism, user) = self.pending_auth.take().unwrap_or(("", String::new()));
        let (reply, reason) = match outcome {
            AuthOutcome::Success(id) => {
                self.auth = Some(id);
                self.reply(Reply::new(
                    235,
                    Status(2, 7, 0),
                    "Authentication successful",
                ));
                return;
            }
            AuthOutcome::TempFail => {
                self.reply(Reply::new(
                    454,
                    Status(4, 7, 0),
                    "Temporary authentication failure; try again later",
                ));
                return;
            }
            AuthOutcome::UserLocked => (
                self.count_auth_failure(Reply::new(
                    454,
                    Status(4, 7, 0),
                    "Too many failed logins as this user from new addresses; try again later, or from an address that has logged in as it before",
                )),
                "user locked out",
            ),
            AuthOutcome::Failure { reason } => (
                self.count_auth_failure(Reply::new(
                    535,
                    Status(5, 7, 8),
                    "Authentication credentials invalid",
                )),
                reason,
            ),
            AuthOutcome::Locked => {
                self.closing = true;
                let r = Reply::new(
                    421,
                    Status(4, 7, 0),
                    "Too many failed authentication attempts from your address; try again later",
                );
                (r, "address locked out")
            }
        };
        self.events.push(Event::AuthFailed {
            mechanism,
            user,
            reason,
            reply: reply.clone(),
        });
        reply.write_to(&mut self.output);
    }

    /// Ends the session from outside (timeout, shutdown) with this reply.
    pub fn abort(&mut self, r: Reply) {
        self.events.push(Event::Rejected {
            command: if self.in_data() { "DATA" } else { "TIMEOUT" },
            reply: r.clone(),
            sender: self.sender().map(str::to_string),
            recipient: None,
        });
        r.write_to(&mut self.output);
        self.closing = true;
        self.state = State::Closed;
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
