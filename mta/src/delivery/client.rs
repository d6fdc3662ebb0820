//! One outbound SMTP connection (RFC 5321), with STARTTLS (RFC 3207),
//! PIPELINING (RFC 2920), CHUNKING (RFC 3030), SIZE (RFC 1870), 8BITMIME
//! (RFC 6152) and SMTPUTF8 (RFC 6531).
//!
//! mail-send's client reads and parses the replies; we drive MAIL, RCPT
//! and DATA/BDAT ourselves so that every recipient gets its own reply
//! (mail-send's `send` stops at the first refused RCPT), and we set every
//! step's timeout ourselves (mail-send's default is an hour).
//!
//! Trust boundary: everything the remote server says is untrusted and only
//! ever becomes a [`Reply`] in a log record or a DSN.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_send::SmtpClient;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_CHUNKING, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::outcome::{Failure, RcptResult, Scope};
use super::tls::{ClientTls, TlsOutcome};
use crate::config::OutboundTls;
use crate::smtp::{Reply, Status};
use crate::stream::Stream;

type Io = Stream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Time limits of one connection (RFC 5321 §4.5.3.2 gives the defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// How to open a connection.
#[derive(Debug, Clone)]
pub struct Params<'a> {
    /// The name we give in EHLO.
    pub ehlo: &'a str,
    /// The source address to bind; `None` lets the system choose.
    pub egress: Option<IpAddr>,
    pub tls: OutboundTls,
    /// Opportunistic TLS to this host failed often enough that plaintext
    /// is allowed without trying again.
    pub plaintext_fallback: bool,
    pub timeouts: Timeouts,
    pub client_tls: &'a ClientTls,
}

/// How the connection is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsState {
    Tls(TlsOutcome),
    /// The server did not offer STARTTLS (or refused it with 454).
    NotOffered,
    /// Plaintext because handshakes with this host kept failing.
    AfterFailedHandshakes,
    /// `tls = "disabled"`.
    Disabled,
}

impl TlsState {
    /// The label in log records and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TlsState::Tls(_) => "tls",
            TlsState::NotOffered => "plaintext-not-offered",
            TlsState::AfterFailedHandshakes => "plaintext-after-failed-handshakes",
            TlsState::Disabled => "plaintext-disabled",
        }
    }
}

/// Who we are talking to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub addr: SocketAddr,
    /// Our side's address.
    pub local: Option<SocketAddr>,
    pub tls: TlsState,
}

/// Opening failed.
#[derive(Debug, Clone)]
pub struct OpenError {
    pub failure: Failure,
    /// The failure was the TLS handshake (counted towards plaintext fallback).
    pub handshake_failed: bool,
}

/// The envelope of one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Empty for the null reverse-path.
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub smtputf8: bool,
    pub body_8bit: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    pipelining: bool,
    chunking: bool,
    /// SIZE advertised, with its limit (0: none stated).
    size: Option<usize>,
    smtputf8: bool,
    eightbit: bool,
    starttls: bool,
}

/// An open, greeted connection, ready for transactions.
pub struct Connection {
    client: SmtpClient<Io>,
    pub info: ConnInfo,
    caps: Caps,
    timeouts: Timeouts,
    /// Transactions attempted on this connection.
    pub transactions: usize,
    /// The connection can no longer be used (broken, or the server said 421).
    pub broken: bool,
    /// The last transaction got as far as sending content (a failure after
    /// that may still have delivered).
    pub content_sent: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn reply_of(r: smtp_proto::Response<String>) -> Reply {
    let [a, b, c] = r.esc;
    Reply {
        code: r.code,
        status: (a != 0).then_some(Status(a, b.into(), c.into())),
        text: r.message.trim_end().to_string().into(),
    }
}

/// What a mail-send error means for the session: the connection is gone.
fn session_failure(host: &str, what: &str, e: mail_send::Error) -> Failure {
    match e {
        mail_send::Error::UnexpectedReply(r) => Failure::new(Scope::Session, reply_of(r)),
        mail_send::Error::Timeout => Failure::temporary(
            Scope::Session,
            Status(4, 4, 2),
            format!("{host} did not answer {what} in time"),
        ),
        mail_send::Error::UnparseableReply => Failure::temporary(
            Scope::Session,
            Status(4, 4, 2),
            format!("{host} closed the connection or sent an unparsable reply to {what}"),
        ),
        other => Failure::temporary(
            Scope::Session,
            Status(4, 4, 2),
            format!("connection to {host} failed during {what}: {other}"),
        ),
    }
}

fn as_host(mut f: Failure) -> Failure {
    f.scope = Scope::Host;
    f
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = mail_send::Result<T>>,
) -> mail_send::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| mail_send::Error::Timeout)?
}

async fn tcp_connect(
    addr: SocketAddr,
    egress: Option<IpAddr>,
    limit: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = egress {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    match tokio::time::timeout(limit, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(limit)),
        )),
    }
}

/// Writes every buffer, as few system calls as the stream allows.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Dot-stuffs CRLF-terminated content for DATA (RFC 5321 §4.5.2) and adds
/// the end-of-data line, without adding an empty line of its own.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let (body, end) = dot_stuffed(content);
    [&body[..], end].concat()
}

/// The content as DATA sends it, in two parts: the body, which is
/// `content` itself (no copy) unless a line starts with a dot, and the
/// end-of-data line (with the CRLF a last line may lack).
pub fn dot_stuffed(content: &[u8]) -> (std::borrow::Cow<'_, [u8]>, &'static [u8]) {
    let end: &'static [u8] = if !content.is_empty() && !content.ends_with(b"\r\n") {
        b"\r\n.\r\n"
    } else {
        b".\r\n"
    };
    let first = memchr::memmem::find(content, b"\r\n.");
    if first.is_none() && content.first() != Some(&b'.') {
        return (std::borrow::Cow::Borrowed(content), end);
    }
    let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 5);
    if content.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut rest = content;
    while let Some(i) = memchr::memmem::find(rest, b"\r\n.") {
        out.extend_from_slice(&rest[..i + 2]);
        out.push(b'.');
        rest = &rest[i + 2..];
    }
    out.extend_from_slice(rest);
    (std::borrow::Cow::Owned(out), end)
}

impl Connection {
    /// Connects to `addr`, reads the greeting, says EHLO and starts TLS as
    /// the policy says.
    pub async fn open(
        host: &str,
        addr: SocketAddr,
        p: &Params<'_>,
    ) -> Result<Connection, OpenError> {
        let fail = |failure: Failure| OpenError {
            failure,
            handshake_failed: false,
        };
        let tcp = tcp_connect(addr, p.egress, p.timeouts.connect)
            .await
            .map_err(|e| {
                fail(Failure::temporary(
                    Scope::Host,
                    Status(4, 4, 1),
                    format!(
                        "cannot connect to {host} [{}]:{}: {e}",
                        addr.ip(),
                        addr.port()
                    ),
                ))
            })?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let mut client = SmtpClient {
            stream: Stream::Plain(tcp),
            timeout: p.timeouts.command,
        };
        let greeting = timed(p.timeouts.command, client.read())
            .await
            .map_err(|e| fail(as_host(session_failure(host, "the greeting", e))))?;
        if greeting.code != 220 {
            return Err(fail(Failure::new(Scope::Host, reply_of(greeting))));
        }
        let caps = ehlo(&mut client, host, p)
            .await
            .map_err(|f| fail(as_host(f)))?;
        let mut conn = Connection {
            client,
            info: ConnInfo {
                host: host.to_string(),
                addr,
                local,
                tls: TlsState::Disabled,
            },
            caps,
            timeouts: p.timeouts,
            transactions: 0,
            broken: false,
            content_sent: false,
        };
        conn.info.tls = match (p.tls, caps.starttls) {
            (OutboundTls::Disabled, _) => TlsState::Disabled,
            (OutboundTls::Opportunistic, false) => TlsState::NotOffered,
            (OutboundTls::Opportunistic, true) if p.plaintext_fallback => {
                TlsState::AfterFailedHandshakes
            }
            (OutboundTls::Required, false) => {
                return Err(fail(Failure::temporary(
                    Scope::Host,
                    Status(4, 7, 10),
                    format!(
                        "TLS is required for this destination, but {host} does not offer STARTTLS"
                    ),
                )));
            }
            (_, true) => return conn.start_tls(p).await,
        };
        Ok(conn)
    }

    async fn start_tls(mut self, p: &Params<'_>) -> Result<Connection, OpenError> {
        let host = self.info.host.clone();
        let reply = timed(p.timeouts.command, self.client.cmd(b"STARTTLS\r\n"))
            .await
            .map_err(|e| OpenError {
                failure: as_host(session_failure(&host, "STARTTLS", e)),
                handshake_failed: false,
            })?;
        if reply.code != 220 {
            let reply = reply_of(reply);
            // 454: TLS not available now. Opportunistic TLS goes on in
            // plaintext; required TLS cannot.
            if p.tls == OutboundTls::Opportunistic && reply.code < 500 && reply.code != 421 {
                self.info.tls = TlsState::NotOffered;
                return Ok(self);
            }
            return Err(OpenError {
                failure: Failure::new(Scope::Host, reply),
                handshake_failed: false,
            });
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.client.stream, Stream::Gone) else {
            unreachable!("STARTTLS starts on a plaintext stream");
        };
        let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::IpAddress(self.info.addr.ip().into())
        });
        let handshake = tokio::time::timeout(
            p.timeouts.command,
            p.client_tls.connector.connect(name, tcp),
        )
        .await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(handshake_error(&host, e.to_string())),
            Err(_) => return Err(handshake_error(&host, "timed out".into())),
        };
        self.info.tls = TlsState::Tls(p.client_tls.outcome(tls.get_ref().1, &host));
        self.client.stream = Stream::Tls(Box::new(tls));
        // RFC 3207 §4.2: forget what was said before TLS; ask again.
        self.caps = ehlo(&mut self.client, &host, p)
            .await
            .map_err(|f| OpenError {
                failure: as_host(f),
                handshake_failed: false,
            })?;
        Ok(self)
    }

    /// Sends one message to `env.recipients`: a result per recipient, in
    /// order. `Err` is a failure of the whole connection (it broke, timed
    /// out, or the server said 421), which no recipient's result covers.
    pub async fn send(
        &mut self,
        env: Envelope<'_>,
        content: &queue::Content,
    ) -> Result<Vec<RcptResult>, Failure> {
        self.content_sent = false;
        let result = self.transaction(env, content).await;
        self.transactions += 1;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn transaction(
        &mut self,
        env: Envelope<'_>,
        content: &queue::Content,
    ) -> Result<Vec<RcptResult>, Failure> {
        let host = self.info.host.clone();
        let caps = self.caps;
        if env.smtputf8 && !caps.smtputf8 {
            // RFC 6531 §3.4: such a message must not be sent to a server
            // without SMTPUTF8.
            return Ok(all_failed(
                env.recipients.len(),
                Failure::permanent(
                    Scope::Message,
                    553,
                    Status(5, 6, 7),
                    format!("{host} does not support SMTPUTF8, which this message needs"),
                ),
            ));
        }
        if let Some(max) = caps.size.filter(|&m| m > 0 && content.len() > m) {
            return Ok(all_failed(
                env.recipients.len(),
                Failure::permanent(
                    Scope::Message,
                    552,
                    Status(5, 3, 4),
                    format!(
                        "message of {} bytes exceeds the limit of {host} ({max} bytes)",
                        content.len()
                    ),
                ),
            ));
        }
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", content.len()));
        }
        if env.body_8bit && caps.eightbit {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = env
            .recipients
            .iter()
            .map(|r| format!("RCPT TO:<{r}>\r\n"))
            .collect();
        let reset = self.transactions > 0;
        let use_data = !caps.chunking;
        let limit = self.timeouts.command;

        // Phase 1: RSET (on a reused connection), MAIL, every RCPT, and DATA,
        // in one write when the server pipelines (RFC 2920 §3.1).
        let mut replies: Vec<Reply> = Vec::new();
        let data_sent;
        if caps.pipelining {
            let mut batch = String::new();
            if reset {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(&mail);
            rcpts.iter().for_each(|r| batch.push_str(r));
            if use_data {
                batch.push_str("DATA\r\n");
            }
            let n = usize::from(reset) + 1 + rcpts.len() + usize::from(use_data);
            let client = &mut self.client;
            let got = timed(limit, async {
                client.stream.write_all(batch.as_bytes()).await?;
                client.stream.flush().await?;
                client.read_many(n).await
            })
            .await
            .map_err(|e| session_failure(&host, "MAIL/RCPT", e))?;
            replies.extend(got.into_iter().map(reply_of));
            data_sent = use_data;
        } else {
            if reset {
                replies.push(self.command("RSET\r\n", &host).await?);
            }
            let m = self.command(&mail, &host).await?;
            let mail_ok = m.is_positive();
            replies.push(m);
            let mut accepted = false;
            if mail_ok {
                for r in &rcpts {
                    let reply = self.command(r, &host).await?;
                    accepted |= reply.is_positive();
                    replies.push(reply);
                }
            }
            data_sent = use_data && accepted;
            if data_sent {
                replies.push(self.command("DATA\r\n", &host).await?);
            }
        }
        let phase = self.finish_phase1(replies, reset, env.recipients.len(), data_sent)?;
        let mut results = phase.results;
        if phase.accepted.is_empty() {
            if phase.data_reply.as_ref().is_some_and(|d| d.code == 354) {
                // RFC 2920 §3.1: DATA was accepted though no recipient was;
                // end it without content.
                let _ = timed(limit, self.client.cmd(b".\r\n")).await;
            }
            return Ok(results);
        }
        // Phase 2: the content.
        self.content_sent = true;
        let final_reply = if use_data {
            let data = phase.data_reply.expect("DATA was sent");
            if data.code != 354 {
                let f = Failure::new(Scope::Message, data);
                if f.reply.code == 421 {
                    return Err(Failure::new(Scope::Session, f.reply));
                }
                for &i in &phase.accepted {
                    results[i] = RcptResult::Failed(f.clone());
                }
                return Ok(results);
            }
            let client = &mut self.client;
            timed(self.timeouts.data, async {
                // Piece by piece, as stored: each but the last ends a line,
                // so each is stuffed on its own, and only the last's end
                // of data is sent. All in one write where the stream can.
                let mut end: &[u8] = b".\r\n";
                let mut stuffed = Vec::with_capacity(3);
                for piece in content.pieces() {
                    let (body, piece_end) = dot_stuffed(piece);
                    stuffed.push(body);
                    end = piece_end;
                }
                let mut bufs: Vec<IoSlice<'_>> = stuffed.iter().map(|b| IoSlice::new(b)).collect();
                bufs.push(IoSlice::new(end));
                write_all_vectored(&mut client.stream, &mut bufs).await?;
                client.stream.flush().await?;
                client.read().await
            })
            .await
        } else {
            let client = &mut self.client;
            timed(self.timeouts.data, async {
                client
                    .stream
                    .write_all(format!("BDAT {} LAST\r\n", content.len()).as_bytes())
                    .await?;
                let mut bufs: Vec<IoSlice<'_>> = content.pieces().map(IoSlice::new).collect();
                write_all_vectored(&mut client.stream, &mut bufs).await?;
                client.stream.flush().await?;
                client.read().await
            })
            .await
        }
        .map_err(|e| session_failure(&host, "the message content", e))?;
        let final_reply = reply_of(final_reply);
        if final_reply.code == 421 {
            self.broken = true;
        }
        for &i in &phase.accepted {
            results[i] = if final_reply.is_positive() {
                RcptResult::Delivered(final_reply.clone())
            } else {
                RcptResult::Failed(Failure::new(Scope::Message, final_reply.clone()))
            };
        }
        Ok(results)
    }

    /// Reads the replies to RSET, MAIL and the RCPTs (and DATA).
    fn finish_phase1(
        &mut self,
        replies: Vec<Reply>,
        reset: bool,
        n_rcpts: usize,
        data_sent: bool,
    ) -> Result<Phase1, Failure> {
        let mut it = replies.into_iter();
        if reset {
            let r = it.next().expect("a reply to RSET");
            if !r.is_positive() {
                return Err(Failure::new(Scope::Session, r));
            }
        }
        let mail = it.next().expect("a reply to MAIL");
        if mail.code == 421 {
            return Err(Failure::new(Scope::Session, mail));
        }
        if !mail.is_positive() {
            // Pipelined RCPT and DATA replies (503s) are read and dropped.
            let data_reply = if data_sent { it.last() } else { None };
            return Ok(Phase1 {
                results: all_failed(n_rcpts, Failure::new(Scope::Message, mail)),
                accepted: Vec::new(),
                data_reply,
            });
        }
        let mut results = Vec::with_capacity(n_rcpts);
        let mut accepted = Vec::new();
        for i in 0..n_rcpts {
            let r = it
                .next()
                .unwrap_or_else(|| Reply::new(451, Status(4, 5, 0), "no reply to RCPT"));
            if r.code == 421 {
                return Err(Failure::new(Scope::Session, r));
            }
            if r.is_positive() {
                accepted.push(i);
                // Replaced by the content's outcome.
                results.push(RcptResult::Delivered(r));
            } else {
                results.push(RcptResult::Failed(Failure::new(Scope::Recipient, r)));
            }
        }
        let data_reply = if data_sent { it.next() } else { None };
        Ok(Phase1 {
            results,
            accepted,
            data_reply,
        })
    }

    async fn command(&mut self, cmd: &str, host: &str) -> Result<Reply, Failure> {
        let verb = cmd.split([' ', '\r']).next().unwrap_or(cmd).to_string();
        timed(self.timeouts.command, self.client.cmd(cmd.as_bytes()))
            .await
            .map(reply_of)
            .map_err(|e| session_failure(host, &verb, e))
    }

    /// Says QUIT and closes, politely but without waiting long.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.cmd(b"QUIT\r\n")).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.stream.shutdown()).await;
    }
}

struct Phase1 {
    results: Vec<RcptResult>,
    /// Indexes of the recipients the server accepted.
    accepted: Vec<usize>,
    data_reply: Option<Reply>,
}

fn all_failed(n: usize, f: Failure) -> Vec<RcptResult> {
    vec![RcptResult::Failed(f); n]
}

fn handshake_error(host: &str, why: String) -> OpenError {
    OpenError {
        failure: Failure::temporary(
            Scope::Host,
            Status(4, 7, 5),
            format!("TLS handshake with {host} failed: {why}"),
        ),
        handshake_failed: true,
    }
}

/// EHLO, and HELO when EHLO is refused (RFC 5321 §3.2).
async fn ehlo(client: &mut SmtpClient<Io>, host: &str, p: &Params<'_>) -> Result<Caps, Failure> {
    match timed(p.timeouts.command, client.ehlo(p.ehlo)).await {
        Ok(r) => Ok(Caps {
            pipelining: r.has_capability(EXT_PIPELINING),
            chunking: r.has_capability(EXT_CHUNKING),
            size: r.has_capability(EXT_SIZE).then_some(r.size),
            smtputf8: r.has_capability(EXT_SMTP_UTF8),
            eightbit: r.has_capability(EXT_8BIT_MIME),
            starttls: r.has_capability(EXT_START_TLS) && matches!(client.stream, Stream::Plain(_)),
        }),
        Err(mail_send::Error::UnexpectedReply(r))
            if (500..600).contains(&r.code) && r.code != 554 =>
        {
            let helo = timed(
                p.timeouts.command,
                client.cmd(format!("HELO {}\r\n", p.ehlo)),
            )
            .await
            .map_err(|e| session_failure(host, "HELO", e))?;
            if helo.code == 250 {
                Ok(Caps::default())
            } else {
                Err(Failure::new(Scope::Host, reply_of(helo)))
            }
        }
        Err(e) => Err(session_failure(host, "EHLO", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_ends_the_data() {
        assert_eq!(dot_stuff(b"A: b\r\n\r\nhi\r\n"), b"A: b\r\n\r\nhi\r\n.\r\n");
        assert_eq!(
            dot_stuff(b".x\r\n..y\r\n.\r\n"),
            b"..x\r\n...y\r\n..\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        // Nothing to double: the content itself goes out, uncopied.
        let plain = b"A: b\r\n\r\nhi. there\r\n";
        assert!(matches!(dot_stuffed(plain), (std::borrow::Cow::Borrowed(b), _) if b == plain));
    }

    #[test]
    fn remote_replies_keep_their_enhanced_code() {
        let r = reply_of(smtp_proto::Response {
            code: 550,
            esc: [5, 1, 1],
            message: "no such user".into(),
        });
        assert_eq!(r.status, Some(Status(5, 1, 1)));
        let r = reply_of(smtp_proto::Response {
            code: 250,
            esc: [0, 0, 0],
            message: "ok".into(),
        });
        assert_eq!(r.status, None);
    }
}
