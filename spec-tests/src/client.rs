//! A blocking SMTP client that sends exactly what it is told.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// Accepts any certificate: the test servers use self-signed ones, and the
/// tests are about SMTP, not PKI.
#[derive(Debug)]
pub struct AcceptAnyCert;

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client TLS configuration that trusts any server.
pub fn tls_config() -> Arc<ClientConfig> {
    mta::tls::install_crypto_provider();
    Arc::new(
        ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert))
            .with_no_client_auth(),
    )
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    Gone,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Gone => Ok(0),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Gone => Ok(()),
        }
    }
}

/// One SMTP reply as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code of the first line, if it has one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?.split(' ').next()?;
        let parts: Vec<_> = first.split('.').collect();
        (parts.len() == 3 && parts.iter().all(|p| p.parse::<u16>().is_ok())).then_some(first)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

pub struct Client {
    conn: BufReader<Conn>,
    /// The server's greeting.
    pub greeting: Reply,
}

impl Client {
    /// Connects and reads the greeting (which must arrive).
    pub fn connect(addr: SocketAddr) -> Client {
        Self::try_connect(addr).expect("connect and read the greeting")
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        Self::from_stream(s)
    }

    /// Connects from a chosen local address (e.g. 127.0.0.2, to be a
    /// client outside a network list).
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> io::Result<Client> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
        Self::from_stream(socket.into())
    }

    /// Connects with implicit TLS (port 465 style).
    pub fn connect_tls(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let tls = ClientConnection::new(tls_config(), ServerName::try_from("localhost").unwrap())
            .expect("client connection");
        let mut c = Client {
            conn: BufReader::new(Conn::Tls(Box::new(StreamOwned::new(tls, s)))),
            greeting: Reply {
                code: 0,
                lines: vec![],
            },
        };
        c.greeting = c.reply();
        c
    }

    fn from_stream(s: TcpStream) -> io::Result<Client> {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            conn: BufReader::new(Conn::Plain(s)),
            greeting: Reply {
                code: 0,
                lines: vec![],
            },
        };
        c.greeting = c.try_reply()?;
        Ok(c)
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        match self.conn.get_ref() {
            Conn::Plain(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Tls(s) => s.get_ref().set_read_timeout(Some(t)).unwrap(),
            Conn::Gone => {}
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let w = self.conn.get_mut();
        w.write_all(bytes.as_ref()).expect("send");
        w.flush().expect("flush");
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("read a reply")
    }

    pub fn try_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.conn.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {lines:?}"),
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.len() < 3 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply line {line:?}"),
                ));
            }
            let code: u16 = line[..3].parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply line {line:?}"),
                )
            })?;
            let sep = line.as_bytes().get(3).copied().unwrap_or(b' ');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if sep != b'-' {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends a command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n"));
        self.reply()
    }

    /// The connection was closed by the server (after what was read).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.conn.read(&mut b), Ok(0) | Err(_))
    }

    pub fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test");
        assert_eq!(r.code, 250, "EHLO: {r}");
        r
    }

    /// STARTTLS and the handshake; EHLO again afterwards is the caller's.
    pub fn starttls(&mut self) {
        let r = self.cmd("STARTTLS");
        assert_eq!(r.code, 220, "STARTTLS: {r}");
        self.upgrade();
    }

    /// Starts TLS on the socket now (after a 220 read by the caller).
    pub fn upgrade(&mut self) {
        let conn = std::mem::replace(self.conn.get_mut(), Conn::Gone);
        assert!(
            self.conn.buffer().is_empty(),
            "plaintext left over before TLS"
        );
        let Conn::Plain(s) = conn else {
            panic!("TLS already")
        };
        let tls = ClientConnection::new(tls_config(), ServerName::try_from("localhost").unwrap())
            .expect("client connection");
        let mut stream = StreamOwned::new(tls, s);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("TLS handshake");
        }
        *self.conn.get_mut() = Conn::Tls(Box::new(stream));
    }

    /// The DER of the certificate the server presented, once in TLS.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self.conn.get_ref() {
            Conn::Tls(s) => s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            _ => None,
        }
    }

    /// The negotiated TLS version, as the log names it.
    pub fn tls_version(&self) -> Option<String> {
        match self.conn.get_ref() {
            Conn::Tls(s) => s.conn.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                other => format!("{other:?}"),
            }),
            _ => None,
        }
    }

    /// AUTH PLAIN with an initial response.
    pub fn auth_plain(&mut self, user: &str, password: &str) -> Reply {
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}"))
    }

    /// MAIL, RCPT and DATA for one recipient, pipelined; asserts the
    /// server is then waiting for the content (354).
    pub fn begin_data(&mut self, from: &str, to: &str) {
        self.send(format!("MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n"));
        let codes: Vec<u16> = (0..3).map(|_| self.reply().code).collect();
        assert_eq!(codes, [250, 250, 354], "starting a transaction");
    }

    /// MAIL, RCPTs and DATA pipelined in one write, then the content; returns
    /// the replies in order, the last one for the content.
    pub fn send_message(&mut self, from: &str, rcpts: &[&str], content: &str) -> Vec<Reply> {
        let mut cmds = format!("MAIL FROM:<{from}>\r\n");
        for r in rcpts {
            cmds.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        cmds.push_str("DATA\r\n");
        self.send(cmds);
        let mut replies: Vec<Reply> = (0..rcpts.len() + 2).map(|_| self.reply()).collect();
        if replies.last().is_some_and(|r| r.code == 354) {
            let mut body = String::new();
            for line in content.split_inclusive("\r\n") {
                if line.starts_with('.') {
                    body.push('.');
                }
                body.push_str(line);
            }
            if !body.is_empty() && !body.ends_with("\r\n") {
                body.push_str("\r\n");
            }
            body.push_str(".\r\n");
            self.send(body);
            replies.push(self.reply());
        }
        replies
    }
}

/// A small valid message from `from`.
pub fn message(from: &str, to: &str, subject: &str) -> String {
    format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nHello from the tests.\r\n")
}
