//! Telling systemd how the daemon is doing (`sd_notify(3)`): READY once
//! the queue is recovered and the listeners are bound, RELOADING/READY
//! around a SIGHUP reload, STOPPING at shutdown, and WATCHDOG keep-alives
//! while the store is healthy, so a daemon whose disk failed is restarted
//! (`WatchdogSec=` in `systemd/mta.service`).
//!
//! The protocol is one datagram per message to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Without
//! that variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, when systemd asked for them.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// From the environment (`$NOTIFY_SOCKET`).
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// Sends `state` (`KEY=value` lines). `Ok(false)` when not under
    /// systemd.
    pub fn notify(&self, state: &str) -> std::io::Result<bool> {
        let Some(path) = &self.socket else {
            return Ok(false);
        };
        let sock = UnixDatagram::unbound()?;
        match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), path)?;
            }
        }
        Ok(true)
    }

    /// Like [`Notifier::notify`], logging a failure instead of returning it:
    /// a lost notification must not stop the daemon.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// How often to send WATCHDOG=1: half of `$WATCHDOG_USEC` (as
/// `sd_watchdog_enabled(3)` advises), when it is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_socket_path_and_nothing_happens_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(path.to_str().unwrap().to_string()),
        };
        assert!(n.notify("READY=1\nSTATUS=up").unwrap());
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        assert!(!Notifier { socket: None }.notify("READY=1").unwrap());
    }

    #[test]
    fn abstract_sockets_are_reached_by_their_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mta-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            socket: Some(format!("@{name}")),
        };
        assert!(n.notify("WATCHDOG=1").unwrap());
        let mut buf = [0u8; 16];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
