//! The admin API: HTTP/1.1 with JSON bodies over a Unix socket,
//! `<data_dir>/admin.sock` (mode 0660), served by the daemon and used by
//! `mta queue` so that the CLI never opens the store of a running daemon.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/messages?domain=&tenant=&state=&older_than=&sender=&limit=` | `[MessageView]`, oldest first |
//! | `GET /v1/messages/{id}[?body=true]` | `MessageView` with `headers` (or the whole `message`) |
//! | `GET /v1/summary?by=domain\|tenant` | `SummaryView` |
//! | `POST /v1/messages/{id}/hold`, `/release`, `/retry` | the updated `MessageView` |
//! | `DELETE /v1/messages/{id}` | the deleted `MessageView` (pending recipients `deleted`) |
//! | `POST /v1/messages/{id}/bounce` | the bounced `MessageView` (pending recipients `bounced`; the sender gets a DSN) |
//! | `POST /v1/actions/{hold\|release\|retry\|delete\|bounce}?<filters of GET /v1/messages>[&all=true]` | `BulkView`: what matched, what changed, what failed; no filter needs `all=true` |
//! | `GET /v1/quarantine` | `[QuarantineView]`: records that will not be delivered |
//! | `DELETE /v1/quarantine/{id}` | the removed `QuarantineView` (record and content gone for good) |
//! | `POST /v1/redact?recipient=` | `RedactReport`: the address replaced by its keyed hash in every past log record |
//! | `GET /v1/suspensions` | `[SuspensionView]` |
//! | `POST /v1/suspensions/{domain}?for=4h[&reason=]` | the `SuspensionView`: no attempts to the domain until then |
//! | `DELETE /v1/suspensions/{domain}` | `ResumeView`; its messages are due now |
//!
//! Errors are `{"error": "..."}` with 404 (no such message), 400 (a bad
//! parameter, named) or 500. Every mutating call writes an `AdminAction`
//! record naming the peer's local user. The types in [`api`] are shared by
//! the server and the CLI client.

pub mod api;
pub mod client;
pub mod http;
pub mod server;
pub mod tokens;

use std::path::{Path, PathBuf};

pub use api::{
    Action, ApiError, BulkFailure, BulkView, ListQuery, MessageView, RecipientView, ResumeView,
    Route, SummaryRowView, SummaryView, SuspensionView,
};
pub use client::{AdminClient, ClientError};
pub use server::{bind, serve, serve_tcp};

/// The admin socket of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}
