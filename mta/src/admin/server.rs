//! The daemon's side: the socket, one request per connection, the queue
//! operations, and the AdminAction records.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use queue::{Filter, Queue, QueueError, QueueId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::api::{
    Action, ApiError, BulkFailure, BulkView, MessageView, ResumeView, Route, SummaryView,
    SuspensionView, rfc3339_ms,
};
use super::http::{self, MAX_REQUEST_BYTES};
use super::tokens::{self, Tokens};
use crate::clock::Clock;
use crate::delivery::Delivery;
use crate::delivery::suspend::Suspension;
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
    /// Bounces (with their DSNs) and suspensions.
    pub delivery: Arc<Delivery>,
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
        tokio::spawn(async move {
            let who = peer(&socket);
            connection(socket, Caller::Local(who), &state).await
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// The TLS acceptor to use for a new connection: the daemon's certificate as
/// it is now, so a renewal loaded on SIGHUP reaches this listener too.
pub type CurrentTls = Arc<dyn Fn() -> TlsAcceptor + Send + Sync>;

/// Serves the admin API over HTTPS on `listener` (`[admin] listen`) until
/// `shutdown`: every request needs one of `tokens` as its bearer token.
pub async fn serve_tcp(
    listener: TcpListener,
    tls: CurrentTls,
    tokens: Tokens,
    state: State,
    mut shutdown: watch::Receiver<bool>,
) {
    let tokens = Arc::new(tokens);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => break,
        };
        let Ok((socket, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (state, tls, tokens) = (state.clone(), tls(), tokens.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(IO_TIMEOUT, tls.accept(socket)).await else {
                return;
            };
            connection(
                stream,
                Caller::Remote {
                    from: addr.to_string(),
                    tokens,
                },
                &state,
            )
            .await
        });
    }
}

/// Who is calling, before the request is read.
enum Caller {
    /// On the Unix socket: the kernel says who.
    Local(Peer),
    /// On the HTTPS listener: the bearer token will say.
    Remote { from: String, tokens: Arc<Tokens> },
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    caller: Caller,
    state: &State,
) {
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
            Some((method, target)) => match authenticate(caller, &buf[..n]) {
                Err((from, why)) => {
                    let who = Peer {
                        uid: None,
                        name: "unauthenticated".into(),
                        from,
                    };
                    let outcome = Err(why.to_string());
                    let what = format!("{method} {}", target.split('?').next().unwrap_or(""));
                    record(state, "refused", "", &who, Some(what), &outcome, Vec::new()).await;
                    error(401, why)
                }
                Ok(who) => match Route::parse(&method, &target) {
                    Err(e) => error(e.status, &e.message),
                    Ok(route) => handle(state, route, &who).await,
                },
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

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: Option<u32>,
    /// The local user, or `token:<name>` on the HTTPS listener.
    pub name: String,
    /// `unix` for the socket, else the client's address and port.
    pub from: String,
}

fn peer(socket: &UnixStream) -> Peer {
    match socket.peer_cred() {
        Ok(c) => {
            let uid = c.uid();
            Peer {
                uid: Some(uid),
                name: user_name(uid).unwrap_or_else(|| format!("uid:{uid}")),
                from: "unix".into(),
            }
        }
        Err(_) => Peer {
            uid: None,
            name: "unknown".into(),
            from: "unix".into(),
        },
    }
}

/// The caller of a request whose head is `head`; on the HTTPS listener
/// its bearer token must be one of ours.
fn authenticate(caller: Caller, head: &[u8]) -> Result<Peer, (String, &'static str)> {
    match caller {
        Caller::Local(p) => Ok(p),
        Caller::Remote { from, tokens } => {
            let Some(presented) = tokens::bearer(head) else {
                return Err((
                    from,
                    "this listener needs an Authorization: Bearer <token> header (one of [admin] tokens)",
                ));
            };
            match tokens.check(presented) {
                Some(name) => Ok(Peer {
                    uid: None,
                    name: format!("token:{name}"),
                    from,
                }),
                None => Err((from, "the bearer token is not one of [admin] tokens")),
            }
        }
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

/// Answers a request. Reads are recorded here (an AdminAction `list`,
/// `show`, `summary` or `suspensions`: who looked at what); changes are
/// recorded where they are made, one record per message.
async fn handle(state: &State, route: Route, who: &Peer) -> (u16, Vec<u8>) {
    let read = match &route {
        Route::List(q) => Some(("list", String::new(), Some(q.selector()))),
        Route::Show { id, body } => Some((
            "show",
            id.to_string(),
            body.then(|| "body=true".to_string()),
        )),
        Route::Summary(by) => Some((
            "summary",
            String::new(),
            Some(match by {
                queue::SummaryBy::Domain => "by=domain".to_string(),
                queue::SummaryBy::Tenant => "by=tenant".to_string(),
            }),
        )),
        Route::Suspensions => Some(("suspensions", String::new(), None)),
        Route::Quarantine => Some(("quarantine", String::new(), None)),
        _ => None,
    };
    let (status, body) = answer(state, route, who).await;
    if let Some((action, queue_id, selector)) = read {
        let outcome = if status == 200 {
            Ok(())
        } else {
            Err(serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("status {status}")))
        };
        record(
            state,
            action,
            &queue_id,
            who,
            selector,
            &outcome,
            Vec::new(),
        )
        .await;
    }
    (status, body)
}

async fn answer(state: &State, route: Route, who: &Peer) -> (u16, Vec<u8>) {
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
            let summary = blocking(move || {
                let mut v = SummaryView::from(&q.summary(now, by)?);
                v.deferred_reasons = super::api::deferred_reasons(q.records())?;
                Ok(v)
            });
            match summary.await {
                Ok(v) => ok(&v),
                Err(e) => queue_error(&e),
            }
        }
        Route::Change { id, action } => match apply(state, id, action, who, None).await {
            Ok(v) => ok(&v),
            Err(e) => queue_error(&e),
        },
        Route::Bulk { action, query, .. } => {
            let filter = match query.filter(state.clock.now_ms()) {
                Ok(f) => f,
                Err(e) => return error(400, &e),
            };
            let records = match blocking(move || q.list(&filter)).await {
                Ok(r) => r,
                Err(e) => return queue_error(&e),
            };
            let selector = query.selector();
            let mut view = BulkView {
                action: action.as_str().to_string(),
                selector: selector.clone(),
                matched: records.len(),
                changed: Vec::new(),
                failed: Vec::new(),
            };
            for rec in records {
                match apply(state, rec.id, action, who, Some(&selector)).await {
                    Ok(_) => view.changed.push(rec.id.to_string()),
                    Err(e) => view.failed.push(BulkFailure {
                        id: rec.id.to_string(),
                        error: e.to_string(),
                    }),
                }
            }
            ok(&view)
        }
        Route::Suspensions => ok(&state
            .delivery
            .suspensions()
            .list(state.clock.now_ms())
            .iter()
            .map(SuspensionView::from_suspension)
            .collect::<Vec<_>>()),
        Route::Suspend {
            domain,
            duration,
            reason,
        } => {
            let length = match super::api::parse_age(&duration) {
                Ok(d) => d,
                Err(e) => return error(400, &e),
            };
            let until_ms = state
                .clock
                .now_ms()
                .saturating_add(length.as_millis() as u64);
            let suspension = Suspension {
                domain: domain.to_lowercase(),
                until_ms,
                who: who.name.clone(),
                reason: reason.unwrap_or_default(),
            };
            let sus = state.delivery.suspensions().clone();
            let result = tokio::task::spawn_blocking(move || sus.suspend(suspension))
                .await
                .expect("saving suspensions does not panic");
            let selector = format!(
                "domain={} until={}",
                domain.to_lowercase(),
                rfc3339_ms(until_ms)
            );
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            record(
                state,
                "suspend",
                "",
                who,
                Some(selector),
                &outcome,
                Vec::new(),
            )
            .await;
            match result {
                Ok(s) => ok(&SuspensionView::from_suspension(&s)),
                Err(e) => error(500, &e.to_string()),
            }
        }
        Route::DeleteQuarantined { id } => {
            let result = q.delete_quarantined(id).await;
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            record(
                state,
                "delete-quarantined",
                &id.to_string(),
                who,
                None,
                &outcome,
                Vec::new(),
            )
            .await;
            match result {
                Ok(qr) => ok(&crate::admin::api::QuarantineView::from(&qr)),
                Err(e) => queue_error(&e),
            }
        }
        Route::Redact { recipient } => {
            let Some((key_id, key)) = state.queue.derive_key(crate::redact::KEY_LABEL) else {
                return error(
                    409,
                    "redaction needs the queue's encryption key (the keyed hash is derived from it), and this queue is not encrypted: set [queue] encrypt = true",
                );
            };
            let token = crate::redact::token(&key, &recipient);
            let address = recipient.clone();
            let t = token.clone();
            let done = state
                .log
                .exclusive(move |dir| crate::redact::redact_dir(dir, &address, &t))
                .await;
            let result = match done {
                Some(Ok(mut r)) => {
                    r.key_id = key_id.to_string();
                    Ok(r)
                }
                Some(Err(e)) => Err(format!("rewriting the transaction log: {e}")),
                None => Err("the transaction log writer has stopped".to_string()),
            };
            // The record names the hash, never the address.
            let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
            record(
                state,
                "redact",
                "",
                who,
                Some(format!("recipient={token}")),
                &outcome,
                Vec::new(),
            )
            .await;
            match result {
                Ok(r) => ok(&r),
                Err(e) => error(500, &e),
            }
        }
        Route::Resume { domain } => {
            let sus = state.delivery.suspensions().clone();
            let d = domain.clone();
            let result = tokio::task::spawn_blocking(move || sus.resume(&d))
                .await
                .expect("saving suspensions does not panic");
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            let selector = Some(format!("domain={}", domain.to_lowercase()));
            record(state, "resume", "", who, selector, &outcome, Vec::new()).await;
            let lifted = match result {
                Ok(l) => l,
                Err(e) => return error(500, &e.to_string()),
            };
            // The domain's recipients were postponed to the suspension's
            // end: make them due now.
            let filter = Filter {
                domain: Some(domain.clone()),
                ..Default::default()
            };
            let mut retried = 0;
            if lifted.is_some()
                && let Ok(records) = blocking(move || q.list(&filter)).await
            {
                let now = state.clock.now_ms();
                for rec in records {
                    if state.queue.retry_now(rec.id, now).await.is_ok() {
                        retried += 1;
                    }
                }
                state.wake.notify_one();
            }
            ok(&ResumeView {
                domain: domain.to_lowercase(),
                lifted: lifted.as_ref().map(SuspensionView::from_suspension),
                retried,
            })
        }
    }
}

/// One action on one message, with its AdminAction record.
async fn apply(
    state: &State,
    id: QueueId,
    action: Action,
    who: &Peer,
    selector: Option<&str>,
) -> Result<MessageView, QueueError> {
    let q = &state.queue;
    let result = match action {
        Action::Hold => q.hold(id).await,
        Action::Release => q.release(id).await,
        Action::Retry => q.retry_now(id, state.clock.now_ms()).await,
        Action::Delete => q.delete(id).await,
        Action::Bounce => state
            .delivery
            .bounce_now(id, &who.name)
            .await
            .map(|b| b.record),
    };
    let pending = |rec: &queue::MessageRecord| {
        rec.recipients
            .iter()
            .filter(|r| !r.state.is_final())
            .map(|r| r.address.clone())
            .collect()
    };
    let recipients = match (&result, action) {
        (Ok(rec), Action::Delete | Action::Bounce) => pending(rec),
        _ => Vec::new(),
    };
    let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
    record(
        state,
        action.as_str(),
        &id.to_string(),
        who,
        selector.map(str::to_string),
        &outcome,
        recipients,
    )
    .await;
    if result.is_ok() && matches!(action, Action::Release | Action::Retry) {
        state.wake.notify_one();
    }
    let rec = result?;
    let mut v = MessageView::from_record(&rec);
    match action {
        Action::Delete => v.mark_deleted(),
        Action::Bounce => v.mark_bounced(),
        _ => {}
    }
    Ok(v)
}

/// Writes the AdminAction record of a call (before answering it).
async fn record(
    state: &State,
    action: &str,
    queue_id: &str,
    who: &Peer,
    selector: Option<String>,
    outcome: &Result<(), String>,
    recipients: Vec<String>,
) {
    state
        .log
        .write_acked(Record::AdminAction(AdminAction {
            timestamp: time::OffsetDateTime::from(state.clock.now()),
            action: action.to_string(),
            queue_id: queue_id.to_string(),
            selector: selector.clone(),
            who: who.name.clone(),
            uid: who.uid,
            from: Some(who.from.clone()),
            result: match outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => e.clone(),
            },
            recipients,
        }))
        .await;
    tracing::info!(
        action,
        queue_id,
        selector = selector.as_deref().unwrap_or(""),
        who = %who.name,
        ok = outcome.is_ok(),
        "admin action"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_has_a_name() {
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
    }
}
