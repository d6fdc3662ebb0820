//! A real SMTP server on loopback that receives what the mta delivers: the
//! "sink" at the far end of the delivery tests.
//!
//! [`Sink::start`] binds a listener (port 0 picks a free port) and serves it
//! from its own thread with its own tokio runtime, so blocking test code can
//! use it while the mta under test connects to it as a client. Dropping the
//! [`Sink`] stops accepting, closes every open connection and joins the
//! thread. Each message answered with 250 is recorded as a [`SunkMessage`],
//! read with [`Sink::messages`] or awaited with [`Sink::wait_for_messages`].
//!
//! # Scripting by recipient
//!
//! The answers are chosen by the recipient's local part (the part before
//! `@`), matched as a case-insensitive prefix, so one transaction can mix
//! outcomes:
//!
//! | local part starts with | reply                                               |
//! |------------------------|-----------------------------------------------------|
//! | `defer`                | RCPT: `451 4.2.1 <addr>: mailbox busy, try later`   |
//! | `reject`               | RCPT: `550 5.1.1 <addr>: no such user`              |
//! | `full`                 | RCPT: `452 4.2.2 <addr>: mailbox full`              |
//! | `datafail`             | after the content: `554 5.6.0 content rejected`     |
//! | `datadefer`            | after the content: `451 4.3.0 try again later`      |
//! | anything else          | `250 2.1.5 Ok`, then `250 2.0.0 Ok: queued as <n>`  |
//!
//! The content replies look at the accepted recipients only, and `datafail`
//! wins over `datadefer`. Faults of the whole session (slow greeting or
//! replies, a refusing greeting, a STARTTLS that breaks, a connection that
//! closes after some messages or in the middle of the content) are set in
//! [`SinkConfig`].
//!
//! # Protocol
//!
//! EHLO, HELO, MAIL, RCPT, DATA, BDAT (with [`SinkConfig::chunking`]), RSET,
//! NOOP, QUIT and STARTTLS. Commands may be pipelined or split across reads;
//! replies go out in order, one write each. Commands end in CRLF or a bare
//! LF; DATA content ends only at CRLF.CRLF, as RFC 5321 says, so a sender
//! that ends it otherwise is noticed (the test times out) rather than
//! forgiven. After STARTTLS the client must EHLO again, and whatever it
//! pipelined after STARTTLS in the clear is discarded (RFC 3207 §4.2).
//! The certificate is self-signed for `localhost` and the bound IP;
//! [`Sink::certificate_pem`] gives it to tests that want to trust it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The name the sink gives itself, and the certificate's DNS name.
const HOSTNAME: &str = "localhost";
/// Advertised with SIZE; BDAT content beyond it is refused.
const MAX_SIZE: usize = 52_428_800;
/// A command line longer than this ends the session: only a broken or
/// hostile client sends one, and the buffer must not grow without bound.
const MAX_LINE: usize = 64 * 1024;
/// Sent instead of a TLS handshake by [`SinkConfig::break_handshake`]; its
/// first byte is no TLS record type, so any client fails at once.
const GARBAGE: &[u8] = b"this is not a TLS handshake\r\n\x00\xff\xfe\xfd";

/// How the sink behaves; every field applies to every connection.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Advertise STARTTLS and do the handshake.
    pub starttls: bool,
    /// Advertise STARTTLS, reply `220 2.0.0 Ready`, then answer the
    /// client's first handshake bytes with garbage and close.
    pub break_handshake: bool,
    /// Advertise PIPELINING (pipelined commands are handled either way).
    pub pipelining: bool,
    /// Advertise CHUNKING and accept BDAT.
    pub chunking: bool,
    /// Wait this long before the greeting.
    pub greeting_delay: Duration,
    /// Wait this long before every reply after the greeting.
    pub reply_delay: Duration,
    /// After this many accepted messages on one connection, answer the next
    /// MAIL with `421 4.3.2 closing` and close.
    pub close_after_messages: Option<usize>,
    /// Read the first bytes of the message content (DATA or BDAT), then
    /// close without replying.
    pub drop_in_data: bool,
    /// Replaces the `220` greeting line. A `421` greeting closes at once;
    /// any other non-2xx one (e.g. `554 5.3.2 go away`) refuses the session:
    /// every command but QUIT gets `503`, as RFC 5321 §3.1 asks.
    pub greeting: Option<String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            starttls: false,
            break_handshake: false,
            pipelining: true,
            chunking: false,
            greeting_delay: Duration::ZERO,
            reply_delay: Duration::ZERO,
            close_after_messages: None,
            drop_in_data: false,
            greeting: None,
        }
    }
}

/// A message the sink accepted.
#[derive(Clone, Debug)]
pub struct SunkMessage {
    /// The reverse path without angle brackets; empty for `<>`.
    pub mail_from: String,
    /// Only the recipients the sink accepted, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The content after dot-unstuffing, without the final `.\r\n`, line
    /// ends as received (for BDAT: the chunks as sent).
    pub data: Vec<u8>,
    /// The session was in TLS when the message came.
    pub tls: bool,
    /// The EHLO or HELO argument.
    pub helo: String,
    pub peer: SocketAddr,
    /// Which connection (1, 2, ...) carried it, so tests can see reuse.
    pub connection: u64,
    /// When the sink took it, just before its 250: tests that kill the
    /// daemon tell deliveries in flight at a kill from the others by it.
    pub received_at: Instant,
}

/// A running SMTP sink; stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    certificate_pem: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Starts a sink on `bind` (port 0 picks a free port).
    ///
    /// # Panics
    ///
    /// If it cannot listen there.
    pub fn start(bind: SocketAddr, config: SinkConfig) -> Sink {
        Self::try_start(bind, config)
            .unwrap_or_else(|e| panic!("the SMTP sink cannot listen on {bind}: {e}"))
    }

    /// Starts a sink on `bind`, or says why it cannot.
    pub fn try_start(bind: SocketAddr, config: SinkConfig) -> io::Result<Sink> {
        // Bound here, not in the thread, so that a failure reaches the caller.
        let std_listener = std::net::TcpListener::bind(bind)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (certificate_pem, tls) = self_signed(addr.ip())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared::default());
        let server = Server {
            config: Arc::new(config),
            shared: shared.clone(),
            tls,
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("smtp-sink-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(server.serve(listener, stop_rx));
                // The runtime is dropped here, and with it every session
                // task and its socket: that is what closes the connections.
            })?;
        Ok(Sink {
            addr,
            shared,
            certificate_pem,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The messages accepted so far, in the order they were accepted.
    pub fn messages(&self) -> Vec<SunkMessage> {
        self.shared.messages().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// STARTTLS handshakes that succeeded so far.
    pub fn tls_sessions(&self) -> u64 {
        self.shared.tls_sessions.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` messages have been accepted and returns all
    /// of them.
    ///
    /// # Panics
    ///
    /// If fewer than `n` arrive within `timeout`, listing those that did.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SunkMessage> {
        let deadline = Instant::now() + timeout;
        let mut messages = self.shared.messages();
        while messages.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (got, summary) = (messages.len(), summarize(&messages));
                // Unlocked first, so the panic does not poison the mutex.
                drop(messages);
                panic!(
                    "the SMTP sink at {} expected {n} messages within {timeout:?}, got {got}:\n{summary}",
                    self.addr
                );
            }
            messages = self
                .shared
                .arrived
                .wait_timeout(messages, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        messages.clone()
    }

    /// The self-signed certificate in PEM, for a test to trust as a CA.
    pub fn certificate_pem(&self) -> String {
        self.certificate_pem.clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line per message, for failure messages.
fn summarize(messages: &[SunkMessage]) -> String {
    messages
        .iter()
        .map(|m| {
            format!(
                "  connection {}: from <{}> to {:?}, {} bytes{}\n",
                m.connection,
                m.mail_from,
                m.rcpt_to,
                m.data.len(),
                if m.tls { ", TLS" } else { "" }
            )
        })
        .collect()
}

/// A certificate for `localhost` and `ip`, and a TLS acceptor serving it.
fn self_signed(ip: IpAddr) -> io::Result<(String, TlsAcceptor)> {
    let generated = rcgen::generate_simple_self_signed(vec![HOSTNAME.to_string(), ip.to_string()])
        .map_err(io::Error::other)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    // An explicit provider, so the sink does not depend on (or race with)
    // whichever process-wide default the test installs.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)
        .map_err(io::Error::other)?;
    Ok((generated.cert.pem(), TlsAcceptor::from(Arc::new(config))))
}

/// What the test thread and the sink's thread share.
#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<SunkMessage>>,
    arrived: Condvar,
    connections: AtomicU64,
    tls_sessions: AtomicU64,
    queued: AtomicU64,
}

impl Shared {
    fn messages(&self) -> MutexGuard<'_, Vec<SunkMessage>> {
        // A test that panicked while holding the lock must not hide the
        // messages from the rest of it.
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an accepted message and returns its queue number.
    fn record(&self, message: SunkMessage) -> u64 {
        let id = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        self.messages().push(message);
        self.arrived.notify_all();
        id
    }
}

/// The accept loop, run on the sink's runtime.
struct Server {
    config: Arc<SinkConfig>,
    shared: Arc<Shared>,
    tls: TlsAcceptor,
}

impl Server {
    async fn serve(self, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                // A send or a dropped sender: either way the Sink is going.
                _ = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn_session(stream, peer),
                    // Out of descriptors and the like: pause rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
            }
        }
    }

    fn spawn_session(&self, stream: TcpStream, peer: SocketAddr) {
        let connection = self.shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        // Replies are small writes, often several in a row; Nagle would
        // hold them back for a delayed ACK and slow every test down.
        let _ = stream.set_nodelay(true);
        let session = Session {
            conn: Conn::Plain(stream),
            input: Input::default(),
            mode: Mode::Command,
            config: self.config.clone(),
            shared: self.shared.clone(),
            tls: self.tls.clone(),
            peer,
            connection,
            refused: false,
            helo: None,
            envelope: None,
            delivered: 0,
        };
        tokio::spawn(session.run());
    }
}

/// The connection, before and after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the plain stream is being handed to the TLS handshake.
    Gone,
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Ok(0),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                // TLS buffers records; the reply must reach the wire now.
                s.flush().await
            }
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }

    fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

/// Bytes received and not yet processed.
#[derive(Default)]
struct Input {
    buf: Vec<u8>,
    /// Where the unprocessed bytes start: consuming moves this instead of
    /// shifting the buffer, which would be quadratic for long messages.
    start: usize,
}

impl Input {
    fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn extend(&mut self, bytes: &[u8]) {
        // Everything complete was processed before reading more, so what
        // is left to move is at most a partial line or chunk.
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// The next line including its LF, if a whole one has arrived.
    fn take_line(&mut self) -> Option<&[u8]> {
        let pending = &self.buf[self.start..];
        let end = self.start + pending.iter().position(|&b| b == b'\n')? + 1;
        let line = &self.buf[self.start..end];
        self.start = end;
        Some(line)
    }

    /// Up to `n` bytes, as many as have arrived.
    fn take(&mut self, n: usize) -> &[u8] {
        let end = self.start + n.min(self.len());
        let bytes = &self.buf[self.start..end];
        self.start = end;
        bytes
    }
}

/// What the next input bytes are.
#[derive(Clone, Copy)]
enum Mode {
    Command,
    /// DATA content, up to CRLF.CRLF.
    Data,
    /// The rest of a BDAT chunk.
    Bdat(Chunk),
}

#[derive(Clone, Copy)]
struct Chunk {
    size: usize,
    remaining: usize,
    last: bool,
    /// The reply when the chunk is to be read and thrown away.
    refusal: Option<&'static str>,
}

/// Whether the session goes on after a step.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// The transaction begun by MAIL.
struct Envelope {
    mail_from: String,
    rcpt_to: Vec<String>,
    content: Vec<u8>,
    /// BDAT was used, so DATA may not be.
    chunked: bool,
}

/// One SMTP connection.
struct Session {
    conn: Conn,
    input: Input,
    mode: Mode,
    config: Arc<SinkConfig>,
    shared: Arc<Shared>,
    tls: TlsAcceptor,
    peer: SocketAddr,
    connection: u64,
    /// The greeting refused service: only QUIT is accepted.
    refused: bool,
    helo: Option<String>,
    envelope: Option<Envelope>,
    /// Messages accepted on this connection, for `close_after_messages`.
    delivered: usize,
}

impl Session {
    async fn run(mut self) {
        // Every error here is the peer going away or misbehaving; either
        // way the session just ends.
        let _ = self.serve().await;
        self.conn.shutdown().await;
    }

    async fn serve(&mut self) -> io::Result<()> {
        if self.greet().await? == Flow::Close {
            return Ok(());
        }
        loop {
            // Each step handles what the input holds; None asks for more.
            let step = match self.mode {
                Mode::Command => self.command().await?,
                Mode::Data => self.data().await?,
                Mode::Bdat(chunk) => self.bdat(chunk).await?,
            };
            match step {
                Some(Flow::Continue) => {}
                Some(Flow::Close) => return Ok(()),
                None => {
                    if !self.fill().await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reads more input; false at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.conn.read(&mut chunk).await?;
        self.input.extend(&chunk[..n]);
        Ok(n > 0)
    }

    async fn greet(&mut self) -> io::Result<Flow> {
        if !self.config.greeting_delay.is_zero() {
            tokio::time::sleep(self.config.greeting_delay).await;
        }
        let greeting = match &self.config.greeting {
            Some(g) => g.trim_end_matches(['\r', '\n']).to_string(),
            None => format!("220 {HOSTNAME} ESMTP sink"),
        };
        self.conn
            .write(format!("{greeting}\r\n").as_bytes())
            .await?;
        Ok(match greeting.get(..3) {
            Some(code) if code.starts_with('2') => Flow::Continue,
            Some("421") => Flow::Close,
            _ => {
                self.refused = true;
                Flow::Continue
            }
        })
    }

    /// Sends a reply (without its final CRLF) after the configured delay.
    async fn say(&mut self, reply: &str) -> io::Result<Flow> {
        if !self.config.reply_delay.is_zero() {
            tokio::time::sleep(self.config.reply_delay).await;
        }
        self.conn.write(format!("{reply}\r\n").as_bytes()).await?;
        Ok(Flow::Continue)
    }

    async fn command(&mut self) -> io::Result<Option<Flow>> {
        let Some(line) = self.input.take_line() else {
            if self.input.len() > MAX_LINE {
                self.say("500 5.5.2 line too long").await?;
                return Ok(Some(Flow::Close));
            }
            return Ok(None);
        };
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        self.dispatch(&line).await.map(Some)
    }

    async fn dispatch(&mut self, line: &str) -> io::Result<Flow> {
        let (verb, arg) = match line.split_once(' ') {
            Some((verb, arg)) => (verb.to_ascii_uppercase(), arg.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        if self.refused && verb != "QUIT" {
            return self.say("503 5.5.1 no service here, only QUIT").await;
        }
        match verb.as_str() {
            "EHLO" => self.ehlo(arg).await,
            "HELO" => self.helo(arg).await,
            "MAIL" => self.mail(arg).await,
            "RCPT" => self.rcpt(arg).await,
            "DATA" => self.data_command().await,
            "BDAT" if self.config.chunking => self.bdat_command(arg).await,
            "STARTTLS" if self.offers_starttls() => self.starttls().await,
            "STARTTLS" if self.conn.is_tls() => self.say("503 5.5.1 already in TLS").await,
            "RSET" => {
                self.envelope = None;
                self.say("250 2.0.0 Ok").await
            }
            "NOOP" => self.say("250 2.0.0 Ok").await,
            "QUIT" => {
                self.say("221 2.0.0 Bye").await?;
                Ok(Flow::Close)
            }
            _ => self.say("500 5.5.1 command not recognized").await,
        }
    }

    fn offers_starttls(&self) -> bool {
        (self.config.starttls || self.config.break_handshake) && !self.conn.is_tls()
    }

    async fn ehlo(&mut self, arg: &str) -> io::Result<Flow> {
        if arg.is_empty() {
            return self.say("501 5.5.4 syntax: EHLO hostname").await;
        }
        self.helo = Some(arg.to_string());
        self.envelope = None;
        let mut lines = vec![format!("{HOSTNAME} greets {arg}")];
        if self.config.pipelining {
            lines.push("PIPELINING".into());
        }
        lines.extend(["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"].map(String::from));
        lines.push(format!("SIZE {MAX_SIZE}"));
        if self.offers_starttls() {
            lines.push("STARTTLS".into());
        }
        if self.config.chunking {
            lines.push("CHUNKING".into());
        }
        let reply = multiline("250", &lines);
        self.say(&reply).await
    }

    async fn helo(&mut self, arg: &str) -> io::Result<Flow> {
        if arg.is_empty() {
            return self.say("501 5.5.4 syntax: HELO hostname").await;
        }
        self.helo = Some(arg.to_string());
        self.envelope = None;
        self.say(&format!("250 {HOSTNAME}")).await
    }

    async fn mail(&mut self, arg: &str) -> io::Result<Flow> {
        if self
            .config
            .close_after_messages
            .is_some_and(|limit| self.delivered >= limit)
        {
            self.say("421 4.3.2 closing").await?;
            return Ok(Flow::Close);
        }
        if self.helo.is_none() {
            return self.say("503 5.5.1 send EHLO first").await;
        }
        if self.envelope.is_some() {
            return self.say("503 5.5.1 nested MAIL").await;
        }
        let Some(mail_from) = path_after(arg, "FROM:") else {
            return self.say("501 5.5.4 syntax: MAIL FROM:<address>").await;
        };
        self.envelope = Some(Envelope {
            mail_from,
            rcpt_to: Vec::new(),
            content: Vec::new(),
            chunked: false,
        });
        self.say("250 2.1.0 Ok").await
    }

    async fn rcpt(&mut self, arg: &str) -> io::Result<Flow> {
        let Some(envelope) = self.envelope.as_mut() else {
            return self.say("503 5.5.1 need MAIL first").await;
        };
        let Some(rcpt) = path_after(arg, "TO:").filter(|r| !r.is_empty()) else {
            return self.say("501 5.5.4 syntax: RCPT TO:<address>").await;
        };
        let reply = rcpt_reply(&rcpt);
        if reply.is_none() {
            envelope.rcpt_to.push(rcpt);
        }
        let reply = reply.unwrap_or_else(|| "250 2.1.5 Ok".into());
        self.say(&reply).await
    }

    async fn data_command(&mut self) -> io::Result<Flow> {
        let refusal = match &self.envelope {
            None => Some("503 5.5.1 need MAIL first"),
            Some(e) if e.chunked => Some("503 5.5.1 DATA after BDAT"),
            Some(e) if e.rcpt_to.is_empty() => Some("554 5.5.1 no valid recipients"),
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            return self.say(refusal).await;
        }
        self.mode = Mode::Data;
        self.say("354 End data with <CR><LF>.<CR><LF>").await
    }

    /// Takes in DATA content, line by line, until CRLF.CRLF.
    async fn data(&mut self) -> io::Result<Option<Flow>> {
        if self.config.drop_in_data {
            return Ok(self.drop_when_content_arrives());
        }
        while let Some(line) = self.input.take_line() {
            let Some(envelope) = self.envelope.as_mut() else {
                // Cannot happen (DATA needs an envelope); recover anyway.
                self.mode = Mode::Command;
                return Ok(Some(Flow::Continue));
            };
            // The dot ends the content only at the start of a line, and a
            // line starts only after CRLF (or at the start of the content).
            let at_line_start = envelope.content.is_empty() || envelope.content.ends_with(b"\r\n");
            if line == b".\r\n" && at_line_start {
                self.mode = Mode::Command;
                return self.finish_message().await.map(Some);
            }
            // Likewise the sender stuffed a dot only at a line start.
            let unstuffed = match line.strip_prefix(b".") {
                Some(rest) if at_line_start => rest,
                _ => line,
            };
            envelope.content.extend_from_slice(unstuffed);
        }
        Ok(None)
    }

    /// The `drop_in_data` fault: once content starts arriving, vanish
    /// without a reply.
    fn drop_when_content_arrives(&self) -> Option<Flow> {
        if self.input.is_empty() {
            None
        } else {
            Some(Flow::Close)
        }
    }

    async fn bdat_command(&mut self, arg: &str) -> io::Result<Flow> {
        let Some((size, last)) = parse_bdat(arg) else {
            return self.say("501 5.5.4 syntax: BDAT size [LAST]").await;
        };
        // A refused chunk is still read, or its bytes would be taken for
        // commands (RFC 3030 §2).
        let refusal = match &self.envelope {
            None => Some("503 5.5.1 need MAIL first"),
            Some(e) if e.rcpt_to.is_empty() => Some("554 5.5.1 no valid recipients"),
            Some(e) if e.content.len().saturating_add(size) > MAX_SIZE => {
                Some("552 5.3.4 message too big")
            }
            Some(_) => None,
        };
        if let (None, Some(envelope)) = (refusal, self.envelope.as_mut()) {
            envelope.chunked = true;
        }
        self.mode = Mode::Bdat(Chunk {
            size,
            remaining: size,
            last,
            refusal,
        });
        Ok(Flow::Continue)
    }

    /// Takes in (the rest of) a BDAT chunk, and replies once it is all in.
    async fn bdat(&mut self, mut chunk: Chunk) -> io::Result<Option<Flow>> {
        if self.config.drop_in_data && (chunk.size == 0 || !self.input.is_empty()) {
            return Ok(Some(Flow::Close));
        }
        let bytes = self.input.take(chunk.remaining);
        chunk.remaining -= bytes.len();
        if let (None, Some(envelope)) = (chunk.refusal, self.envelope.as_mut()) {
            envelope.content.extend_from_slice(bytes);
        }
        if chunk.remaining > 0 {
            self.mode = Mode::Bdat(chunk);
            return Ok(None);
        }
        self.mode = Mode::Command;
        let flow = match chunk.refusal {
            Some(refusal) => self.say(refusal).await?,
            None if chunk.last => self.finish_message().await?,
            None => {
                self.say(&format!("250 2.0.0 {} octets received", chunk.size))
                    .await?
            }
        };
        Ok(Some(flow))
    }

    /// Answers the end of the content, recording the message if accepted.
    async fn finish_message(&mut self) -> io::Result<Flow> {
        let Some(envelope) = self.envelope.take() else {
            return self.say("503 5.5.1 need MAIL first").await;
        };
        let any_starts = |prefix: &str| {
            envelope
                .rcpt_to
                .iter()
                .any(|r| local_part_starts(r, prefix))
        };
        if any_starts("datafail") {
            return self.say("554 5.6.0 content rejected").await;
        }
        if any_starts("datadefer") {
            return self.say("451 4.3.0 try again later").await;
        }
        let message = SunkMessage {
            mail_from: envelope.mail_from,
            rcpt_to: envelope.rcpt_to,
            data: envelope.content,
            tls: self.conn.is_tls(),
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.peer,
            connection: self.connection,
            received_at: Instant::now(),
        };
        // Recorded before the reply, as a real server commits before 250.
        let id = self.shared.record(message);
        self.delivered += 1;
        self.say(&format!("250 2.0.0 Ok: queued as {id}")).await
    }

    async fn starttls(&mut self) -> io::Result<Flow> {
        self.say("220 2.0.0 Ready").await?;
        // Bytes pipelined after STARTTLS came in the clear and must not be
        // taken as sent inside TLS (RFC 3207 §4.2, command injection).
        self.input.clear();
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Ok(Flow::Close);
        };
        if self.config.break_handshake {
            break_handshake(tcp).await;
            return Ok(Flow::Close);
        }
        let Ok(tls) = self.tls.accept(tcp).await else {
            return Ok(Flow::Close);
        };
        self.conn = Conn::Tls(Box::new(tls));
        self.shared.tls_sessions.fetch_add(1, Ordering::SeqCst);
        // RFC 3207 §4.2: the client starts over with EHLO.
        self.helo = None;
        self.envelope = None;
        Ok(Flow::Continue)
    }
}

/// The `break_handshake` fault: garbage where the handshake should be.
async fn break_handshake(mut tcp: TcpStream) {
    let mut discard = [0u8; 4096];
    // Wait for the ClientHello first: garbage sent along with the 220 could
    // be swallowed by the client's read buffer for SMTP replies, and the
    // client would see a plain close instead of a broken handshake.
    let hello = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut discard)).await;
    if !matches!(hello, Ok(Ok(n)) if n > 0) {
        return;
    }
    let _ = tcp.write_all(GARBAGE).await;
    let _ = tcp.shutdown().await;
    // Read the rest (an alert, perhaps) until the client closes: closing
    // with unread input makes the kernel send a reset, which could reach
    // the client before the garbage does.
    let drain = async { while matches!(tcp.read(&mut discard).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// `lines` as one multi-line reply with `code`, without the final CRLF.
fn multiline(code: &str, lines: &[String]) -> String {
    let last = lines.len().saturating_sub(1);
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let sep = if i == last { ' ' } else { '-' };
            format!("{code}{sep}{line}")
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The address of `FROM:<a@b> params` (keyword case-insensitive), without
/// brackets; tolerates a space after the colon and a missing bracket pair.
fn path_after(arg: &str, keyword: &str) -> Option<String> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        return Some(inner[..end].to_string());
    }
    let bare = rest.split_whitespace().next()?;
    Some(bare.to_string())
}

/// `BDAT size [LAST]`.
fn parse_bdat(arg: &str) -> Option<(usize, bool)> {
    let mut words = arg.split_whitespace();
    let size = words.next()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}

/// The scripted refusal for a recipient, or None to accept it.
fn rcpt_reply(rcpt: &str) -> Option<String> {
    if local_part_starts(rcpt, "defer") {
        Some(format!("451 4.2.1 <{rcpt}>: mailbox busy, try later"))
    } else if local_part_starts(rcpt, "reject") {
        Some(format!("550 5.1.1 <{rcpt}>: no such user"))
    } else if local_part_starts(rcpt, "full") {
        Some(format!("452 4.2.2 <{rcpt}>: mailbox full"))
    } else {
        None
    }
}

/// Whether the part of `address` before its `@` starts with `prefix`,
/// ignoring ASCII case.
fn local_part_starts(address: &str, prefix: &str) -> bool {
    let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
    local
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}
