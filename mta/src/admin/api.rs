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
    /// Our DKIM signatures: `d=… s=… a=…`.
    #[serde(default)]
    pub dkim: Vec<String>,
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
    /// A pending recipient's next attempt, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
}

impl MessageView {
    pub fn from_record(rec: &MessageRecord) -> MessageView {
        MessageView {
            id: rec.id.to_string(),
            received: Some(rfc3339_ms(rec.received_ms)).filter(|t| !t.is_empty()),
            state: rec.state().as_str().to_string(),
            tenant: rec.tenant.clone(),
            sender: rec.sender.clone(),
            size: rec.size,
            peer_ip: rec.submission.peer_ip.clone(),
            auth_user: rec.submission.auth_user.clone(),
            message_id: rec.submission.message_id.clone(),
            dkim: rec.submission.dkim.clone(),
            recipients: rec
                .recipients
                .iter()
                .map(|r| RecipientView {
                    address: r.address.clone(),
                    state: r.state.as_str().to_string(),
                    attempts: r.attempts,
                    last_reply: r.last_reply.clone(),
                    next_attempt: (!r.state.is_final()).then(|| rfc3339_ms(r.next_attempt_ms)),
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
        self.mark_pending(RecipientState::Deleted);
    }

    /// After a bounce: the recipients that were pending are `bounced`.
    pub fn mark_bounced(&mut self) {
        self.mark_pending(RecipientState::Bounced);
    }

    fn mark_pending(&mut self, state: RecipientState) {
        for r in self
            .recipients
            .iter_mut()
            .filter(|r| r.state == "queued" || r.state == "deferred")
        {
            r.state = state.as_str().to_string();
        }
    }
}

/// The answer to an action on every message matching filters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkView {
    /// `hold`, `release`, `retry`, `delete` or `bounce`.
    pub action: String,
    /// The filters, as the AdminAction records name them: `domain=example.com tenant=acme`.
    pub selector: String,
    /// Messages that matched.
    pub matched: usize,
    /// Their IDs, where the action succeeded.
    pub changed: Vec<String>,
    /// Where it did not (a message that left the queue meanwhile, say).
    pub failed: Vec<BulkFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkFailure {
    pub id: String,
    pub error: String,
}

/// A suspended destination domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspensionView {
    pub domain: String,
    /// When it ends, RFC 3339 UTC.
    pub until: String,
    pub who: String,
    pub reason: String,
}

impl SuspensionView {
    pub fn from_suspension(s: &crate::delivery::suspend::Suspension) -> SuspensionView {
        SuspensionView {
            domain: s.domain.clone(),
            until: rfc3339_ms(s.until_ms),
            who: s.who.clone(),
            reason: s.reason.clone(),
        }
    }
}

/// The answer to lifting a suspension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeView {
    pub domain: String,
    /// The suspension lifted; `None` when the domain was not suspended.
    pub lifted: Option<SuspensionView>,
    /// Messages with recipients at the domain made due now.
    pub retried: usize,
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
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

/// [`queue::Summary`], serialized the same way, and readable back, with
/// the deferred recipients grouped by why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryView {
    pub bounds_minutes: Vec<u64>,
    pub total: SummaryRowView,
    pub rows: Vec<SummaryRowView>,
    /// Deferred recipients by their last reply, most first (at most
    /// [`MAX_REASONS`]).
    #[serde(default)]
    pub deferred_reasons: Vec<ReasonView>,
}

/// Deferred recipients that got the same kind of reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonView {
    /// The reply, with the words that differ from message to message
    /// (those with digits after the codes: IDs, times, addresses) as `…`.
    pub reason: String,
    pub recipients: u64,
}

/// Reasons a summary lists; the rest are counted under `other`.
pub const MAX_REASONS: usize = 20;

/// The grouping key of a last reply: code and enhanced code kept, later
/// words with digits replaced, at most 120 characters.
pub fn reason_key(reply: &str) -> String {
    let mut out = String::new();
    for (i, word) in reply.split_whitespace().enumerate() {
        if !out.is_empty() {
            out.push(' ');
        }
        if i >= 2 && word.bytes().any(|b| b.is_ascii_digit()) {
            out.push('…');
        } else {
            out.push_str(word);
        }
        if out.len() >= 120 {
            break;
        }
    }
    out
}

/// Groups the deferred recipients of `records` by [`reason_key`].
pub fn deferred_reasons(
    records: impl Iterator<Item = Result<MessageRecord, queue::QueueError>>,
) -> Result<Vec<ReasonView>, queue::QueueError> {
    let mut counts: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for rec in records {
        for r in rec?
            .recipients
            .iter()
            .filter(|r| r.state == RecipientState::Deferred)
        {
            let key = r.last_reply.as_deref().map(reason_key).unwrap_or_default();
            *counts.entry(key).or_default() += 1;
        }
    }
    let mut list: Vec<ReasonView> = counts
        .into_iter()
        .map(|(reason, recipients)| ReasonView { reason, recipients })
        .collect();
    list.sort_by(|a, b| {
        b.recipients
            .cmp(&a.recipients)
            .then(a.reason.cmp(&b.reason))
    });
    if list.len() > MAX_REASONS {
        let other: u64 = list[MAX_REASONS..].iter().map(|r| r.recipients).sum();
        list.truncate(MAX_REASONS);
        list.push(ReasonView {
            reason: "other".into(),
            recipients: other,
        });
    }
    Ok(list)
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
            deferred_reasons: Vec::new(),
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
    /// A pending recipient's address.
    pub recipient: Option<String>,
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
            recipient: self.recipient.clone(),
            limit: self.limit,
        })
    }

    /// No filter at all (a bulk action would touch every message).
    pub fn is_empty(&self) -> bool {
        self.domain.is_none()
            && self.tenant.is_none()
            && self.state.is_none()
            && self.older_than.is_none()
            && self.sender.is_none()
            && self.recipient.is_none()
    }

    /// The filters as words: `domain=example.com state=deferred`, or `all`.
    pub fn selector(&self) -> String {
        let limit = self.limit.map(|l| l.to_string());
        let words: Vec<String> = self
            .fields(&limit)
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        if words.is_empty() {
            "all".into()
        } else {
            words.join(" ")
        }
    }

    fn fields<'a>(&'a self, limit: &'a Option<String>) -> [(&'static str, &'a Option<String>); 7] {
        [
            ("domain", &self.domain),
            ("tenant", &self.tenant),
            ("state", &self.state),
            ("older_than", &self.older_than),
            ("sender", &self.sender),
            ("recipient", &self.recipient),
            ("limit", limit),
        ]
    }

    /// Reads the filter parameters out of `pairs`; others are left.
    fn take(&mut self, k: &str, v: String) -> Result<bool, BadRequest> {
        match k {
            "domain" => self.domain = Some(v),
            "tenant" => self.tenant = Some(v),
            "state" => {
                parse_state(&v).map_err(bad)?;
                self.state = Some(v)
            }
            "older_than" => {
                parse_age(&v).map_err(bad)?;
                self.older_than = Some(v)
            }
            "sender" => self.sender = Some(v),
            "recipient" => self.recipient = Some(v),
            "limit" => {
                self.limit = Some(
                    v.parse()
                        .map_err(|_| bad(format!("limit '{v}' is not a non-negative number")))?,
                )
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn to_query(&self) -> String {
        self.to_query_with(&[])
    }

    fn to_query_with(&self, extra: &[(&str, &str)]) -> String {
        let mut parts = Vec::new();
        let limit = self.limit.map(|l| l.to_string());
        for (k, v) in self.fields(&limit) {
            if let Some(v) = v {
                parts.push(format!("{k}={}", percent_encode(v)));
            }
        }
        for (k, v) in extra {
            parts.push(format!("{k}={}", percent_encode(v)));
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
    /// Every pending recipient fails now; the sender gets a DSN.
    Bounce,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::Release => "release",
            Action::Retry => "retry",
            Action::Delete => "delete",
            Action::Bounce => "bounce",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "hold" => Action::Hold,
            "release" => Action::Release,
            "retry" => Action::Retry,
            "delete" => Action::Delete,
            "bounce" => Action::Bounce,
            _ => return None,
        })
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
    /// An action on every message the filters match; `all` must be set
    /// when there are no filters, so that no one empties the queue by
    /// forgetting one.
    Bulk {
        action: Action,
        query: ListQuery,
        all: bool,
    },
    Suspensions,
    /// Suspends a destination domain for `duration` (`30m`, `4h`).
    Suspend {
        domain: String,
        duration: String,
        reason: Option<String>,
    },
    Resume {
        domain: String,
    },
    /// Removes a quarantined record for good.
    DeleteQuarantined {
        id: QueueId,
    },
    /// Replaces an address in past transaction log records by its keyed hash.
    Redact {
        recipient: String,
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
            "no such endpoint: {method} {path} (see /v1/messages, /v1/messages/{{id}}, /v1/summary, /v1/actions/{{action}}, /v1/suspensions, /v1/quarantine)"
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
                for (k, v) in query_pairs(query, FILTERS)? {
                    q.take(&k, v)?;
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
            ("DELETE", ["quarantine", id]) => {
                query_pairs(query, &[])?;
                Ok(Route::DeleteQuarantined { id: parse_id(id)? })
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
                let action = match Action::parse(action) {
                    Some(Action::Delete) | None => return Err(not_found(method, path)),
                    Some(a) => a,
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
            ("POST", ["actions", action]) => {
                let action = Action::parse(action).ok_or_else(|| {
                    bad(format!(
                        "'{action}' is not an action: hold, release, retry, delete or bounce"
                    ))
                })?;
                let mut known = FILTERS.to_vec();
                known.push("all");
                let mut q = ListQuery::default();
                let mut all = false;
                for (k, v) in query_pairs(query, &known)? {
                    if !q.take(&k, v.clone())? {
                        all = parse_bool("all", &v)?;
                    }
                }
                if q.is_empty() && !all {
                    return Err(bad(
                        "name the messages: at least one of domain, tenant, state, older_than, sender, recipient, or all=true for every message",
                    ));
                }
                Ok(Route::Bulk {
                    action,
                    query: q,
                    all,
                })
            }
            ("POST", ["redact"]) => {
                let mut recipient = None;
                for (_, v) in query_pairs(query, &["recipient"])? {
                    if !v.contains('@') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(bad(format!(
                            "recipient '{v}' is not an address: write it as local@domain"
                        )));
                    }
                    recipient = Some(v);
                }
                Ok(Route::Redact {
                    recipient: recipient
                        .ok_or_else(|| bad("say which address: recipient=local@domain"))?,
                })
            }
            ("GET", ["suspensions"]) => {
                query_pairs(query, &[])?;
                Ok(Route::Suspensions)
            }
            ("POST", ["suspensions", domain]) => {
                let domain = percent_decode(domain)
                    .ok_or_else(|| bad(format!("bad percent-encoding in '{domain}'")))?;
                check_domain(&domain)?;
                let (mut duration, mut reason) = (None, None);
                for (k, v) in query_pairs(query, &["for", "reason"])? {
                    if k == "for" {
                        let d = parse_age(&v).map_err(|_| {
                            bad(format!(
                                "for '{v}' is not a duration: write it like 30m, 4h or 1d"
                            ))
                        })?;
                        if d.is_zero() {
                            return Err(bad("for must be longer than 0"));
                        }
                        duration = Some(v);
                    } else {
                        reason = Some(v);
                    }
                }
                Ok(Route::Suspend {
                    domain,
                    duration: duration.ok_or_else(|| {
                        bad("say for how long: for=30m, for=4h (a suspension always ends)")
                    })?,
                    reason,
                })
            }
            ("DELETE", ["suspensions", domain]) => {
                let domain = percent_decode(domain)
                    .ok_or_else(|| bad(format!("bad percent-encoding in '{domain}'")))?;
                check_domain(&domain)?;
                query_pairs(query, &[])?;
                Ok(Route::Resume { domain })
            }
            (
                _,
                ["messages"]
                | ["messages", _]
                | ["summary"]
                | ["quarantine"]
                | ["messages", _, _]
                | ["actions", _]
                | ["suspensions"]
                | ["suspensions", _]
                | ["redact"]
                | ["quarantine", _],
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
            Route::Bulk { action, query, all } => {
                let extra: &[(&str, &str)] = if *all { &[("all", "true")] } else { &[] };
                (
                    "POST",
                    format!(
                        "/v1/actions/{}{}",
                        action.as_str(),
                        query.to_query_with(extra)
                    ),
                )
            }
            Route::Suspensions => ("GET", "/v1/suspensions".into()),
            Route::Suspend {
                domain,
                duration,
                reason,
            } => {
                let mut target = format!(
                    "/v1/suspensions/{}?for={}",
                    percent_encode(domain),
                    percent_encode(duration)
                );
                if let Some(r) = reason {
                    target.push_str(&format!("&reason={}", percent_encode(r)));
                }
                ("POST", target)
            }
            Route::DeleteQuarantined { id } => ("DELETE", format!("/v1/quarantine/{id}")),
            Route::Redact { recipient } => (
                "POST",
                format!("/v1/redact?recipient={}", percent_encode(recipient)),
            ),
            Route::Resume { domain } => (
                "DELETE",
                format!("/v1/suspensions/{}", percent_encode(domain)),
            ),
        }
    }
}

/// The filter parameters of listings and bulk actions.
const FILTERS: &[&str] = &[
    "domain",
    "tenant",
    "state",
    "older_than",
    "sender",
    "recipient",
    "limit",
];

fn parse_bool(name: &str, v: &str) -> Result<bool, BadRequest> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(bad(format!("{name} '{other}' is not true or false"))),
    }
}

/// A destination domain as suspensions name it: letters, digits, dots and
/// hyphens (an A-label for IDNs).
fn check_domain(d: &str) -> Result<(), BadRequest> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !d.starts_with('.')
        && !d.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "'{d}' is not a domain name (write an IDN as its A-label, xn--...)"
        )))
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
                recipient: Some("Erase.Me@y.example".into()),
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
            Route::Change {
                id,
                action: Action::Bounce,
            },
            Route::Bulk {
                action: Action::Retry,
                query: ListQuery {
                    domain: Some("gmail.example".into()),
                    state: Some("deferred".into()),
                    ..Default::default()
                },
                all: false,
            },
            Route::Bulk {
                action: Action::Delete,
                query: ListQuery::default(),
                all: true,
            },
            Route::Suspensions,
            Route::Suspend {
                domain: "gmail.example".into(),
                duration: "4h".into(),
                reason: Some("421 rate limited & blocklisted".into()),
            },
            Route::Resume {
                domain: "gmail.example".into(),
            },
            Route::Redact {
                recipient: "Erase+Me@gmail.example".into(),
            },
            Route::DeleteQuarantined { id },
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

    #[test]
    fn reasons_group_replies_that_differ_only_in_ids_and_numbers() {
        assert_eq!(
            reason_key("451 4.7.1 Try again in 300 seconds, id=7af3c"),
            "451 4.7.1 Try again in … seconds, …"
        );
        assert_eq!(
            reason_key("451 4.7.1 Try again in 60 seconds, id=99"),
            reason_key("451 4.7.1 Try again in 300 seconds, id=7af3c")
        );
        assert_ne!(
            reason_key("421 4.4.2 timed out"),
            reason_key("451 4.4.2 timed out")
        );
    }

    #[test]
    fn bulk_actions_need_a_filter_or_all() {
        let e = Route::parse("POST", "/v1/actions/delete").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("all=true"), "{}", e.message);
        let e = Route::parse("POST", "/v1/actions/explode?all=true").unwrap_err();
        assert!(e.message.contains("not an action"), "{}", e.message);
        assert!(Route::parse("POST", "/v1/actions/hold?all=maybe").is_err());
        assert_eq!(
            ListQuery {
                domain: Some("d.example".into()),
                older_than: Some("1h".into()),
                ..Default::default()
            }
            .selector(),
            "domain=d.example older_than=1h"
        );
        assert_eq!(ListQuery::default().selector(), "all");
    }

    #[test]
    fn suspensions_need_a_domain_and_a_duration() {
        let e = Route::parse("POST", "/v1/suspensions/d.example").unwrap_err();
        assert!(e.message.contains("for how long"), "{}", e.message);
        let e = Route::parse("POST", "/v1/suspensions/d.example?for=soon").unwrap_err();
        assert!(e.message.contains("not a duration"), "{}", e.message);
        let e = Route::parse("POST", "/v1/suspensions/not%20a%20domain?for=1h").unwrap_err();
        assert!(e.message.contains("not a domain"), "{}", e.message);
        assert_eq!(
            Route::parse("PUT", "/v1/suspensions/d.example")
                .unwrap_err()
                .status,
            405
        );
    }
}
