//! The CLI's side: one blocking request per connection, on the daemon's
//! Unix socket or, with `--url`, its HTTPS listener with a bearer token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use serde::de::DeserializeOwned;

use super::api::{ApiError, Route};
use super::http::{self, MAX_RESPONSE_BYTES};

/// How long the CLI waits for the daemon (a listing of a big queue takes a while).
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no daemon at {}: is mta running? see `systemctl status mta` (or use --offline to read a stopped daemon's queue)",
        socket.display()
    )]
    NoDaemon { socket: PathBuf },
    #[error(
        "cannot reach the daemon at {}: {source} (the socket is mode 0660: run as the service's user or a member of its group)",
        socket.display()
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the daemon at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon at {} sent an answer this CLI does not understand: {reason}", socket.display())]
    Protocol { socket: PathBuf, reason: String },
    /// The daemon answered with an error status.
    #[error("{message}")]
    Api { status: u16, message: String },
}

/// A client of one daemon's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// The socket, or for HTTPS the URL (what errors name).
    socket: PathBuf,
    remote: Option<Remote>,
}

/// The HTTPS listener: where, which name its certificate must have, the
/// roots that certificate must chain to, and our token.
#[derive(Clone)]
struct Remote {
    addr: String,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> AdminClient {
        AdminClient {
            socket: socket.into(),
            remote: None,
        }
    }

    /// A client of the HTTPS listener at `url` (`https://host:port`),
    /// verifying its certificate against the PEM certificates in `ca_file`,
    /// sending `token`.
    pub fn https(url: &str, ca_file: &Path, token: String) -> Result<AdminClient, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            format!("--url '{url}' must start with https:// (the listener speaks only TLS)")
        })?;
        let hostport = rest.trim_end_matches('/');
        let (host, port) = hostport
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .ok_or_else(|| format!("--url '{url}' needs a port: https://host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| format!("--url '{url}': '{host}' is not a host name or IP address"))?;
        let pem = std::fs::read(ca_file)
            .map_err(|e| format!("cannot read --ca-file {}: {e}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "--ca-file {} holds no PEM certificate: give the daemon's certificate or its CA",
                ca_file.display()
            ));
        }
        crate::tls::install_crypto_provider();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AdminClient {
            socket: PathBuf::from(url),
            remote: Some(Remote {
                addr: format!("{}:{port}", bracket(host)),
                server_name,
                tls: Arc::new(tls),
                token,
            }),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `route` and reads the answer as `T`.
    pub fn call<T: DeserializeOwned>(&self, route: &Route) -> Result<T, ClientError> {
        let socket = || self.socket.clone();
        let not_there = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon { socket: socket() }
            }
            _ => ClientError::Connect {
                socket: socket(),
                source,
            },
        };
        let io = |source| ClientError::Io {
            socket: socket(),
            source,
        };
        let (method, target) = route.to_request();
        let raw = match &self.remote {
            None => {
                let s = UnixStream::connect(&self.socket).map_err(not_there)?;
                s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
                s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
                exchange(s, &http::request(method, &target)).map_err(io)?
            }
            Some(r) => {
                let tcp = TcpStream::connect(&r.addr).map_err(not_there)?;
                tcp.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
                tcp.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
                let conn = rustls::ClientConnection::new(r.tls.clone(), r.server_name.clone())
                    .map_err(|e| io(std::io::Error::other(e)))?;
                let tls = rustls::StreamOwned::new(conn, tcp);
                let request = http::request_with_token(method, &target, &r.token);
                exchange(tls, &request).map_err(io)?
            }
        };
        let protocol = |reason: String| ClientError::Protocol {
            socket: socket(),
            reason,
        };
        let (status, body) =
            http::parse_response(&raw).ok_or_else(|| protocol("not an HTTP response".into()))?;
        if status != 200 {
            let message = serde_json::from_slice::<ApiError>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(body).map_err(|e| protocol(e.to_string()))
    }
}

/// Writes `request` and reads the whole answer (the server closes).
fn exchange(mut s: impl Read + Write, request: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(request)?;
    s.flush()?;
    let mut raw = Vec::new();
    match (&mut s)
        .take(MAX_RESPONSE_BYTES as u64)
        .read_to_end(&mut raw)
    {
        Ok(_) => Ok(raw),
        // A TLS peer that closes without close_notify after a complete
        // answer (Content-Length says whether it is complete).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
    }
}

/// An IPv6 literal in brackets, for host:port.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
