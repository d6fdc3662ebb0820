//! The CLI's side: one blocking request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// A client of one daemon's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: impl Into<PathBuf>) -> AdminClient {
        AdminClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `route` and reads the answer as `T`.
    pub fn call<T: DeserializeOwned>(&self, route: &Route) -> Result<T, ClientError> {
        let socket = || self.socket.clone();
        let mut s = UnixStream::connect(&self.socket).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon { socket: socket() }
            }
            _ => ClientError::Connect {
                socket: socket(),
                source,
            },
        })?;
        let io = |source| ClientError::Io {
            socket: socket(),
            source,
        };
        s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let (method, target) = route.to_request();
        s.write_all(&http::request(method, &target)).map_err(io)?;
        let mut raw = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE_BYTES as u64)
            .read_to_end(&mut raw)
            .map_err(io)?;
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
