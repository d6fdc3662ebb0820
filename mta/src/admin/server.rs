//! The daemon's side: the socket, one request per connection, the queue
//! operations, and the AdminAction records.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use queue::{Queue, QueueError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::api::{Action, ApiError, MessageView, Route, SummaryView};
use super::http::{self, MAX_REQUEST_BYTES};
use crate::clock::Clock;
use crate::log::{AdminAction, Record, TransactionLog};

/// How long a client may take to send its request, and we to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path`: a stale socket file from an earlier run is
/// removed first (the queue lock already proved no daemon uses this data
/// directory), and the socket is made mode 0660.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way; remove it",
            ));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// What the handlers need.
#[derive(Clone)]
pub struct State {
    pub queue: Queue,
    pub log: TransactionLog,
    pub clock: Arc<dyn Clock>,
    /// Wakes the delivery scheduler after a release or retry.
    pub wake: Arc<tokio::sync::Notify>,
}

/// Serves the admin API until `shutdown` turns true, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    state: State,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => break,
        };
        let Ok((socket, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move { connection(socket, &state).await });
    }
    let _ = std::fs::remove_file(&path);
}

async fn connection(mut socket: UnixStream, state: &State) {
    let who = peer(&socket);
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut n = 0;
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        loop {
            if n == buf.len() {
                return Err(413);
            }
            match socket.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return Err(400),
                Ok(k) => {
                    n += k;
                    if memchr::memmem::find(&buf[..n], b"\r\n\r\n").is_some() {
                        return Ok(());
                    }
                }
            }
        }
    })
    .await;
    let (status, body) = match read {
        Err(_) => error(408, "the request did not arrive in time"),
        Ok(Err(413)) => error(413, "the request is too large"),
        Ok(Err(s)) => error(s, "an incomplete HTTP request"),
        Ok(Ok(())) => match http::request_line(&buf[..n]) {
            None => error(400, "not an HTTP/1.1 request line"),
            Some((method, target)) => match Route::parse(&method, &target) {
                Err(e) => error(e.status, &e.message),
                Ok(route) => handle(state, route, &who).await,
            },
        },
    };
    let response = http::response(status, &body);
    let _ = tokio::time::timeout(IO_TIMEOUT, socket.write_all(&response)).await;
    let _ = socket.shutdown().await;
}

fn error(status: u16, message: &str) -> (u16, Vec<u8>) {
    let body = serde_json::to_vec(&ApiError {
        error: message.to_string(),
    })
    .expect("serializable");
    (status, body)
}

fn ok<T: serde::Serialize>(v: &T) -> (u16, Vec<u8>) {
    match serde_json::to_vec(v) {
        Ok(b) => (200, b),
        Err(e) => error(500, &e.to_string()),
    }
}

fn queue_error(e: &QueueError) -> (u16, Vec<u8>) {
    match e {
        QueueError::NotFound(_) => error(404, &e.to_string()),
        _ => error(500, &e.to_string()),
    }
}

/// Runs a store read off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(QueueError::Closed))
}

/// Who is on the other end of the socket.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: Option<u32>,
    pub name: String,
}

fn peer(socket: &UnixStream) -> Peer {
    match socket.peer_cred() {
        Ok(c) => {
            let uid = c.uid();
            Peer {
                uid: Some(uid),
                name: user_name(uid).unwrap_or_else(|| format!("uid:{uid}")),
            }
        }
        Err(_) => Peer {
            uid: None,
            name: "unknown".into(),
        },
    }
}

/// The login name of `uid` (getpwuid_r), if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, sized as passed; on
    // success `result` points at `pwd`, whose strings point into `buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside `buf`, alive here.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

async fn handle(state: &State, route: Route, who: &Peer) -> (u16, Vec<u8>) {
    let q = state.queue.clone();
    match route {
        Route::List(query) => {
            let filter = match query.filter(state.clock.now_ms()) {
                Ok(f) => f,
                Err(e) => return error(400, &e),
            };
            match blocking(move || q.list(&filter)).await {
                Ok(records) => ok(&records
                    .iter()
                    .map(MessageView::from_record)
                    .collect::<Vec<_>>()),
                Err(e) => queue_error(&e),
            }
        }
        Route::Show { id, body } => {
            match blocking(move || Ok((q.get(id)?, q.content(id)?))).await {
                Ok((rec, content)) => {
                    ok(&MessageView::from_record(&rec).with_content(&content, body))
                }
                Err(e) => queue_error(&e),
            }
        }
        Route::Quarantine => match blocking(move || q.quarantined()).await {
            Ok(list) => ok(&list
                .iter()
                .map(crate::admin::api::QuarantineView::from)
                .collect::<Vec<_>>()),
            Err(e) => queue_error(&e),
        },
        Route::Summary(by) => {
            let now = state.clock.now_ms();
            match blocking(move || q.summary(now, by)).await {
                Ok(s) => ok(&SummaryView::from(&s)),
                Err(e) => queue_error(&e),
            }
        }
        Route::Change { id, action } => {
            let result = match action {
                Action::Hold => q.hold(id).await,
                Action::Release => q.release(id).await,
                Action::Retry => q.retry_now(id, state.clock.now_ms()).await,
                Action::Delete => q.delete(id).await,
            };
            let view = result.as_ref().ok().map(|rec| {
                let mut v = MessageView::from_record(rec);
                if action == Action::Delete {
                    v.mark_deleted();
                }
                v
            });
            let recipients = match (&result, action) {
                (Ok(rec), Action::Delete) => rec
                    .recipients
                    .iter()
                    .filter(|r| !r.state.is_final())
                    .map(|r| r.address.clone())
                    .collect(),
                _ => Vec::new(),
            };
            state
                .log
                .write_acked(Record::AdminAction(AdminAction {
                    timestamp: time::OffsetDateTime::from(state.clock.now()),
                    action: action.as_str().to_string(),
                    queue_id: id.to_string(),
                    who: who.name.clone(),
                    uid: who.uid,
                    result: match &result {
                        Ok(_) => "ok".to_string(),
                        Err(e) => e.to_string(),
                    },
                    recipients,
                }))
                .await;
            if result.is_ok() && matches!(action, Action::Release | Action::Retry) {
                state.wake.notify_one();
            }
            tracing::info!(
                action = action.as_str(),
                queue_id = %id,
                who = %who.name,
                ok = result.is_ok(),
                "admin action"
            );
            match (result, view) {
                (Ok(_), Some(v)) => ok(&v),
                (Err(e), _) => queue_error(&e),
                (Ok(_), None) => error(500, "no record"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_has_a_name() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
    }
}
