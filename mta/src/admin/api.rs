//! Typed requests and responses of the admin API, shared by the server
//! and the CLI client.

use queue::{Filter, MessageRecord, MessageState, QueueId, RecipientState, Summary, SummaryBy};
use serde::{Deserialize, Serialize};

use super::http::{percent_decode, percent_encode};

/// One message as the API and `mta queue list|show --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    /// Reception time, RFC 3339 UTC.
    pub received: Option<String>,
    /// `queued`, `deferred` or `held`.
    pub state: String,
    pub tenant: Option<String>,
    /// MAIL FROM; empty for `<>`.
    pub sender: String,
    pub size: u64,
    pub peer_ip: Option<String>,
    pub auth_user: Option<String>,
    pub message_id: Option<String>,
    pub recipients: Vec<RecipientView>,
    /// `show` without `--body`: the header section (lossy UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<String>,
    /// `show --body`: the whole message (lossy UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A record in quarantine (failed authentication, or its key is missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineView {
    pub id: String,
    /// `unknown-key`, `failed-authentication`, `unencrypted` or
    /// `content-failed-authentication`.
    pub kind: String,
    pub reason: String,
}

impl From<&queue::Quarantined> for QuarantineView {
    fn from(q: &queue::Quarantined) -> Self {
        QuarantineView {
            id: q.id.to_string(),
            kind: q.kind.as_str().to_string(),
            reason: q.reason.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientView {
    pub address: String,
    /// `queued`, `deferred`, `delivered`, `bounced`, `expired`, `deleted`.
    pub state: String,
    pub attempts: u32,
    pub last_reply: Option<String>,
}

impl MessageView {
    pub fn from_record(rec: &MessageRecord) -> MessageView {
        MessageView {
            id: rec.id.to_string(),
            received: time::OffsetDateTime::from_unix_timestamp_nanos(
                rec.received_ms as i128 * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            }),
            state: rec.state().as_str().to_string(),
            tenant: rec.tenant.clone(),
            sender: rec.sender.clone(),
            size: rec.size,
            peer_ip: rec.submission.peer_ip.clone(),
            auth_user: rec.submission.auth_user.clone(),
            message_id: rec.submission.message_id.clone(),
            recipients: rec
                .recipients
                .iter()
                .map(|r| RecipientView {
                    address: r.address.clone(),
                    state: r.state.as_str().to_string(),
                    attempts: r.attempts,
                    last_reply: r.last_reply.clone(),
                })
                .collect(),
            headers: None,
            message: None,
        }
    }

    /// Adds the content: the whole message with `body`, else the headers.
    pub fn with_content(mut self, content: &[u8], body: bool) -> MessageView {
        if body {
            self.message = Some(String::from_utf8_lossy(content).into_owned());
        } else {
            let end = memchr::memmem::find(content, b"\r\n\r\n")
                .map(|i| i + 2)
                .unwrap_or(content.len());
            self.headers = Some(String::from_utf8_lossy(&content[..end]).into_owned());
        }
        self
    }

    /// Reception time in ms since the epoch, from `received`.
    pub fn received_ms(&self) -> Option<u64> {
        let t = time::OffsetDateTime::parse(
            self.received.as_deref()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
    }

    /// Recipients not yet final.
    pub fn pending(&self) -> impl Iterator<Item = &RecipientView> {
        self.recipients
            .iter()
            .filter(|r| r.state == "queued" || r.state == "deferred")
    }

    /// After a delete: the recipients that were pending are `deleted`.
    pub fn mark_deleted(&mut self) {
        for r in self
            .recipients
            .iter_mut()
            .filter(|r| r.state == "queued" || r.state == "deferred")
        {
            r.state = RecipientState::Deleted.as_str().to_string();
        }
    }
}

/// One row of [`SummaryView`]: [`queue::SummaryRow`] in a form both sides
/// can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRowView {
    pub key: String,
    pub messages: u64,
    pub recipients: u64,
    pub counts: Vec<u64>,
}

/// [`queue::Summary`], serialized the same way, and readable back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryView {
    pub bounds_minutes: Vec<u64>,
    pub total: SummaryRowView,
    pub rows: Vec<SummaryRowView>,
}

impl From<&Summary> for SummaryView {
    fn from(s: &Summary) -> Self {
        let row = |r: &queue::SummaryRow| SummaryRowView {
            key: r.key.clone(),
            messages: r.messages,
            recipients: r.recipients,
            counts: r.counts.clone(),
        };
        SummaryView {
            bounds_minutes: s.bounds_minutes.clone(),
            total: row(&s.total),
            rows: s.rows.iter().map(row).collect(),
        }
    }
}

/// The error body: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// The filters of `GET /v1/messages`, as given (the server resolves
/// `older_than` against its clock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub domain: Option<String>,
    pub tenant: Option<String>,
    /// `queued`, `deferred` or `held`.
    pub state: Option<String>,
    /// A duration: `30m`, `1h`, `2d`.
    pub older_than: Option<String>,
    pub sender: Option<String>,
    pub limit: Option<usize>,
}

/// Parses a `--older-than` / `older_than` duration.
pub fn parse_age(a: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(a)
        .map_err(|_| format!("older_than '{a}' is not a duration: write it like 30m, 1h or 2d"))
}

/// Parses a message state filter.
pub fn parse_state(s: &str) -> Result<MessageState, String> {
    match s {
        "queued" => Ok(MessageState::Queued),
        "deferred" => Ok(MessageState::Deferred),
        "held" => Ok(MessageState::Held),
        other => Err(format!(
            "state '{other}' is not one of queued, deferred, held"
        )),
    }
}

impl ListQuery {
    /// The queue filter, with `older_than` counted back from `now_ms`.
    pub fn filter(&self, now_ms: u64) -> Result<Filter, String> {
        Ok(Filter {
            domain: self.domain.clone(),
            tenant: self.tenant.clone(),
            state: self.state.as_deref().map(parse_state).transpose()?,
            received_before_ms: match &self.older_than {
                Some(a) => Some(now_ms.saturating_sub(parse_age(a)?.as_millis() as u64)),
                None => None,
            },
            sender: self.sender.clone(),
            limit: self.limit,
        })
    }

    fn to_query(&self) -> String {
        let mut parts = Vec::new();
        let limit = self.limit.map(|l| l.to_string());
        for (k, v) in [
            ("domain", &self.domain),
            ("tenant", &self.tenant),
            ("state", &self.state),
            ("older_than", &self.older_than),
            ("sender", &self.sender),
            ("limit", &limit),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", percent_encode(v)));
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// What a mutating call does to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hold,
    Release,
    Retry,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::Release => "release",
            Action::Retry => "retry",
            Action::Delete => "delete",
        }
    }
}

/// A request of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    List(ListQuery),
    /// `GET /v1/quarantine`: records that will not be delivered.
    Quarantine,
    Show {
        id: QueueId,
        body: bool,
    },
    Summary(SummaryBy),
    Change {
        id: QueueId,
        action: Action,
    },
}

/// Why a request was not understood: the status to answer and what to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub status: u16,
    pub message: String,
}

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest {
        status: 400,
        message: message.into(),
    }
}

fn not_found(method: &str, path: &str) -> BadRequest {
    BadRequest {
        status: 404,
        message: format!(
            "no such endpoint: {method} {path} (see /v1/messages, /v1/messages/{{id}}, /v1/summary, /v1/quarantine)"
        ),
    }
}

fn parse_id(s: &str) -> Result<QueueId, BadRequest> {
    s.parse()
        .map_err(|e| bad(format!("'{s}' is not a queue ID: {e}")))
}

fn query_pairs(query: &str, known: &[&str]) -> Result<Vec<(String, String)>, BadRequest> {
    let mut out = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k).ok_or_else(|| bad(format!("bad percent-encoding in '{k}'")))?;
        let v = percent_decode(v).ok_or_else(|| bad(format!("bad percent-encoding in '{v}'")))?;
        if !known.contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown parameter '{k}'; this endpoint takes: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

impl Route {
    /// Parses a request line's method and target.
    pub fn parse(method: &str, target: &str) -> Result<Route, BadRequest> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let segments: Vec<&str> = path
            .strip_prefix("/v1/")
            .ok_or_else(|| not_found(method, path))?
            .split('/')
            .collect();
        match (method, segments.as_slice()) {
            ("GET", ["messages"]) => {
                let mut q = ListQuery::default();
                for (k, v) in query_pairs(
                    query,
                    &["domain", "tenant", "state", "older_than", "sender", "limit"],
                )? {
                    match k.as_str() {
                        "domain" => q.domain = Some(v),
                        "tenant" => q.tenant = Some(v),
                        "state" => {
                            parse_state(&v).map_err(bad)?;
                            q.state = Some(v)
                        }
                        "older_than" => {
                            parse_age(&v).map_err(bad)?;
                            q.older_than = Some(v)
                        }
                        "sender" => q.sender = Some(v),
                        _ => {
                            q.limit = Some(v.parse().map_err(|_| {
                                bad(format!("limit '{v}' is not a non-negative number"))
                            })?)
                        }
                    }
                }
                Ok(Route::List(q))
            }
            ("GET", ["messages", id]) => {
                let id = parse_id(id)?;
                let mut body = false;
                for (_, v) in query_pairs(query, &["body"])? {
                    body = match v.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        other => return Err(bad(format!("body '{other}' is not true or false"))),
                    };
                }
                Ok(Route::Show { id, body })
            }
            ("GET", ["quarantine"]) => {
                query_pairs(query, &[])?;
                Ok(Route::Quarantine)
            }
            ("GET", ["summary"]) => {
                let mut by = SummaryBy::Domain;
                for (_, v) in query_pairs(query, &["by"])? {
                    by = match v.as_str() {
                        "domain" => SummaryBy::Domain,
                        "tenant" => SummaryBy::Tenant,
                        other => return Err(bad(format!("by '{other}' is not domain or tenant"))),
                    };
                }
                Ok(Route::Summary(by))
            }
            ("POST", ["messages", id, action]) => {
                let action = match *action {
                    "hold" => Action::Hold,
                    "release" => Action::Release,
                    "retry" => Action::Retry,
                    _ => return Err(not_found(method, path)),
                };
                query_pairs(query, &[])?;
                Ok(Route::Change {
                    id: parse_id(id)?,
                    action,
                })
            }
            ("DELETE", ["messages", id]) => {
                query_pairs(query, &[])?;
                Ok(Route::Change {
                    id: parse_id(id)?,
                    action: Action::Delete,
                })
            }
            (
                _,
                ["messages"] | ["messages", _] | ["summary"] | ["quarantine"] | ["messages", _, _],
            ) => Err(BadRequest {
                status: 405,
                message: format!("{method} is not allowed on {path}"),
            }),
            _ => Err(not_found(method, path)),
        }
    }

    /// The method and target that [`Route::parse`] reads back.
    pub fn to_request(&self) -> (&'static str, String) {
        match self {
            Route::List(q) => ("GET", format!("/v1/messages{}", q.to_query())),
            Route::Quarantine => ("GET", "/v1/quarantine".to_string()),
            Route::Show { id, body } => (
                "GET",
                format!("/v1/messages/{id}{}", if *body { "?body=true" } else { "" }),
            ),
            Route::Summary(by) => (
                "GET",
                format!(
                    "/v1/summary?by={}",
                    match by {
                        SummaryBy::Domain => "domain",
                        SummaryBy::Tenant => "tenant",
                    }
                ),
            ),
            Route::Change {
                id,
                action: Action::Delete,
            } => ("DELETE", format!("/v1/messages/{id}")),
            Route::Change { id, action } => {
                ("POST", format!("/v1/messages/{id}/{}", action.as_str()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_round_trip() {
        let id: QueueId = "038HGNGMEP000".parse().unwrap();
        let routes = [
            Route::List(ListQuery::default()),
            Route::List(ListQuery {
                domain: Some("gmail.example".into()),
                tenant: Some("acme".into()),
                state: Some("held".into()),
                older_than: Some("1h 30m".into()),
                sender: Some("a+b@x.example".into()),
                limit: Some(5),
            }),
            Route::Show { id, body: true },
            Route::Show { id, body: false },
            Route::Summary(SummaryBy::Tenant),
            Route::Quarantine,
            Route::Change {
                id,
                action: Action::Hold,
            },
            Route::Change {
                id,
                action: Action::Delete,
            },
        ];
        for r in routes {
            let (m, t) = r.to_request();
            assert_eq!(Route::parse(m, &t).unwrap(), r, "{m} {t}");
        }
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let e = Route::parse("GET", "/v1/messages?state=lost").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("state 'lost'"), "{}", e.message);
        let e = Route::parse("GET", "/v1/messages?colour=red").unwrap_err();
        assert!(e.message.contains("unknown parameter 'colour'"));
        let e = Route::parse("GET", "/v1/messages?limit=-1").unwrap_err();
        assert!(e.message.contains("limit"));
        let e = Route::parse("GET", "/v1/messages/nope").unwrap_err();
        assert!(e.message.contains("not a queue ID"));
        assert_eq!(Route::parse("GET", "/v2/x").unwrap_err().status, 404);
        assert_eq!(Route::parse("PUT", "/v1/summary").unwrap_err().status, 405);
    }
}
