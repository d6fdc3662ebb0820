//! SPF (RFC 7208): whether an IP address may send mail for a domain.
//!
//! This module owns the evaluation of `check_host(<ip>, <domain>,
//! <sender>)` — used to check, before we send, that our egress IPs are
//! authorised by our senders' SPF records — and what an operator needs to
//! act on the result: the record evaluated, the directive that matched,
//! the DNS-querying terms and void lookups used against their limits
//! (§4.6.4), the explanation (`exp=`, §6.2), the reason for a temperror
//! or permerror, the smallest TTL seen (how long the result may be
//! cached), and for a failing IP the mechanism to add ([`suggestion`]).
//!
//! Layout:
//! - [`checker`]: our egress IPs against our senders' records: the
//!   per-pair cache, the periodic refresh, the MAIL FROM policy.
//! - [`record`]: parsing a record (§4.5, §4.6, §5, §6), the whole record
//!   before anything is evaluated, so that a syntax error anywhere is a
//!   permerror (§4.6).
//! - [`macros`]: macro strings (§7): parsing, expansion, URL escaping.
//! - [`eval`]: `check_host()` itself: record selection, mechanisms,
//!   `include:`/`redirect=`, the limits, `exp=`.
//! - [`dns`]: the lookups evaluation makes, as the [`SpfDns`] trait (async
//!   fns; unit tests serve it from memory), and [`HickoryDns`], the
//!   production implementation over hickory's resolver.
//!
//! Why not mail-auth's SPF verifier (the design plan named mail-auth
//! 0.13): its `SpfOutput` carries only the result, the domain, an
//! explanation and a report address. It cannot say which record was
//! evaluated, which directive matched, how many DNS-querying terms and
//! void lookups were used, why a permerror happened, or for how long the
//! answer may be cached — what `mta spf check` and TTL-based caching
//! need. Its parser keeps no text of the terms either, so the evaluation
//! and the parser are ours; the OpenSPF RFC 7208 suite
//! (`spec-tests/tests/spf_suite.rs`) checks both against real DNS.
//!
//! Trust boundary: every DNS answer is untrusted. Records are parsed
//! strictly (printable ASCII only, every term to the grammar) and only
//! ever shown as text; the work one evaluation may cause is bounded by the
//! RFC's limits (10 DNS-querying terms, 10 MX names per `mx`, 10 PTR names
//! per `ptr`, 2 void lookups) and by an overall timeout
//! ([`Options::timeout`]), so a hostile record can neither loop nor fan
//! out.

pub mod checker;
pub mod dns;
pub mod eval;
pub mod macros;
pub mod record;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

pub use dns::{DnsAnswer, DnsFailure, DnsResult, HickoryDns, MxRecord, SpfDns};
pub use eval::{MAX_DNS_TERMS, MAX_MX_NAMES, MAX_PTR_NAMES};
pub use record::RecordError;

use eval::{Evaluator, Identity};

/// The seven results of §2.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl SpfResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

impl std::fmt::Display for SpfResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an evaluation ended in none, temperror or permerror.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpfError {
    #[error("{domain} is not a valid multi-label domain name (RFC 7208 §4.3)")]
    InvalidDomain { domain: String },
    #[error("{domain} has no SPF record")]
    NoRecord { domain: String },
    #[error("{query} lookup of {domain} failed: {error}")]
    Dns {
        domain: String,
        query: &'static str,
        error: DnsFailure,
    },
    #[error("{domain} has {count} SPF records; exactly one is allowed (RFC 7208 §4.5)")]
    MultipleRecords { domain: String, count: usize },
    #[error("the SPF record of {domain} is invalid: {error}")]
    Syntax { domain: String, error: RecordError },
    #[error("more than {MAX_DNS_TERMS} DNS-querying terms (RFC 7208 §4.6.4)")]
    TooManyLookups,
    #[error("more than {limit} void DNS lookups (RFC 7208 §4.6.4)")]
    TooManyVoidLookups { limit: u32 },
    #[error(
        "mx of {domain} has {count} MX records; at most {MAX_MX_NAMES} are allowed (RFC 7208 §4.6.4)"
    )]
    TooManyMx { domain: String, count: usize },
    #[error("include:{domain} has no SPF record (RFC 7208 §5.2)")]
    IncludeNone { domain: String },
    #[error("redirect={domain} has no SPF record (RFC 7208 §6.1)")]
    RedirectNone { domain: String },
    #[error("the evaluation took longer than {seconds} s (RFC 7208 §4.6.4)")]
    Timeout { seconds: u64 },
}

impl SpfError {
    /// The result this problem gives.
    pub fn result(&self) -> SpfResult {
        match self {
            SpfError::InvalidDomain { .. } | SpfError::NoRecord { .. } => SpfResult::None,
            SpfError::Dns { .. } | SpfError::Timeout { .. } => SpfResult::TempError,
            SpfError::MultipleRecords { .. }
            | SpfError::Syntax { .. }
            | SpfError::TooManyLookups
            | SpfError::TooManyVoidLookups { .. }
            | SpfError::TooManyMx { .. }
            | SpfError::IncludeNone { .. }
            | SpfError::RedirectNone { .. } => SpfResult::PermError,
        }
    }
}

/// The directive that decided a result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Matched {
    /// The domain whose record holds the directive: the domain evaluated,
    /// or the target of a `redirect=` it led to.
    pub domain: String,
    /// The directive as published, e.g. `ip4:203.0.113.0/24` or
    /// `-include:_spf.example.com`.
    pub directive: String,
}

/// One evaluation of `check_host()`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Evaluation {
    /// The client address as evaluated (an IPv4-mapped IPv6 address is
    /// IPv4, §5).
    pub ip: IpAddr,
    /// The `<domain>` evaluated.
    pub domain: String,
    pub result: SpfResult,
    /// The SPF record of `domain`, as published (joined strings).
    pub record: Option<String>,
    /// The directive that matched; `None` when the result is the default
    /// (neutral: nothing matched) or an error.
    pub matched: Option<Matched>,
    /// DNS-querying terms evaluated (include, a, mx, ptr, exists,
    /// redirect), against the limit of [`MAX_DNS_TERMS`].
    pub dns_lookups: u32,
    /// Lookups that found nothing (NXDOMAIN or no records), against
    /// [`Options::void_lookup_limit`].
    pub void_lookups: u32,
    /// For a fail, the expanded `exp=` text when the record has one and it
    /// could be fetched (§6.2).
    pub explanation: Option<String>,
    /// The smallest TTL (seconds) of the DNS answers used: how long this
    /// result may be cached. `None` when no answer gave a TTL.
    pub ttl: Option<u32>,
    /// Why the result is none, temperror or permerror.
    #[serde(serialize_with = "display_opt")]
    pub error: Option<SpfError>,
}

fn display_opt<S: serde::Serializer>(
    error: &Option<SpfError>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match error {
        Some(e) => serializer.serialize_some(&e.to_string()),
        None => serializer.serialize_none(),
    }
}

impl Evaluation {
    /// What to add to the record so that this IP passes (see
    /// [`suggestion`]).
    pub fn suggestion(&self) -> Option<String> {
        suggestion(self.result, self.ip)
    }
}

/// For a fail, softfail or neutral result, the mechanism that would
/// authorise `ip`: `ip4:203.0.113.7` or `ip6:2001:db8::7` (to be put before
/// the record's `all`). `None` for other results, which adding an address
/// does not fix.
pub fn suggestion(result: SpfResult, ip: IpAddr) -> Option<String> {
    match result {
        SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Some(mechanism_for(ip)),
        _ => None,
    }
}

/// The `ip4:`/`ip6:` mechanism for exactly one address.
pub fn mechanism_for(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => format!("ip4:{v4}"),
        IpAddr::V6(v6) => format!("ip6:{v6}"),
    }
}

/// How evaluations run.
#[derive(Debug, Clone)]
pub struct Options {
    /// `%{r}` in explanations: the name of the host doing the check.
    /// Default `unknown`.
    pub receiver: String,
    /// The longest one evaluation may take, all lookups included; past it
    /// the result is temperror (§4.6.4 asks for at least 20 s). Default
    /// 20 s.
    pub timeout: Duration,
    /// Void lookups allowed (§4.6.4 recommends 2). Default 2.
    pub void_lookup_limit: u32,
    /// `%{t}` in explanations, seconds since the epoch; `None` = now.
    pub timestamp: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            receiver: "unknown".to_string(),
            timeout: Duration::from_secs(20),
            void_lookup_limit: 2,
            timestamp: None,
        }
    }
}

/// §4.3: a domain SPF can be evaluated for: multi-label, labels of 1 to 63
/// octets, at most 253 in all (a final dot allowed), not a literal.
pub fn valid_domain(domain: &str) -> bool {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    !d.is_empty()
        && d.len() <= 253
        && !d.starts_with('[')
        && d.split('.').count() >= 2
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// `check_host(ip, domain, sender)` with the default [`Options`]. `sender`
/// is the MAIL FROM address (`postmaster@<helo>` for the HELO identity or
/// a null sender); `helo` is the HELO/EHLO name (for `%{h}`).
pub async fn check_host<D: SpfDns>(
    dns: &D,
    ip: IpAddr,
    domain: &str,
    sender: &str,
    helo: &str,
) -> Evaluation {
    check_host_with(dns, &Options::default(), ip, domain, sender, helo).await
}

/// `check_host(ip, domain, sender)` (RFC 7208 §4). Runs inside a Tokio
/// runtime (the overall [`Options::timeout`] uses its timer).
pub async fn check_host_with<D: SpfDns>(
    dns: &D,
    options: &Options,
    ip: IpAddr,
    domain: &str,
    sender: &str,
    helo: &str,
) -> Evaluation {
    let timestamp = options.timestamp.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let mut evaluator = Evaluator::new(
        dns,
        Identity { ip, sender, helo },
        &options.receiver,
        timestamp,
        options.void_lookup_limit,
    );
    let started = tokio::time::Instant::now();
    let timed_out = || SpfError::Timeout {
        seconds: options.timeout.as_secs(),
    };
    let outcome = match tokio::time::timeout(
        options.timeout,
        evaluator.check(domain.to_string(), true),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => eval::Outcome {
            result: SpfResult::TempError,
            error: Some(timed_out()),
            decided: None,
        },
    };
    let mut explanation = None;
    if outcome.result == SpfResult::Fail
        && let Some(decided) = &outcome.decided
    {
        let left = options.timeout.saturating_sub(started.elapsed());
        explanation = tokio::time::timeout(left, evaluator.explanation(decided))
            .await
            .ok()
            .flatten();
    }
    Evaluation {
        ip: evaluator.ip,
        domain: domain.to_string(),
        result: outcome.result,
        record: evaluator.record.take(),
        matched: outcome.decided.and_then(|d| {
            d.directive.map(|directive| Matched {
                domain: d.domain,
                directive,
            })
        }),
        dns_lookups: evaluator.lookups,
        void_lookups: evaluator.voids,
        explanation,
        ttl: evaluator.ttl,
        error: outcome.error,
    }
}

/// The MAIL FROM identity (§2.4): the domain of `mail_from`; for a null
/// sender (empty), the HELO identity.
pub async fn check_mail_from<D: SpfDns>(
    dns: &D,
    options: &Options,
    ip: IpAddr,
    mail_from: &str,
    helo: &str,
) -> Evaluation {
    if mail_from.is_empty() {
        return check_helo(dns, options, ip, helo).await;
    }
    let domain = mail_from
        .rsplit_once('@')
        .map_or(mail_from, |(_, domain)| domain);
    check_host_with(dns, options, ip, domain, mail_from, helo).await
}

/// The HELO identity (§2.3): `<domain>` is the HELO name and the sender
/// `postmaster@<helo>`.
pub async fn check_helo<D: SpfDns>(
    dns: &D,
    options: &Options,
    ip: IpAddr,
    helo: &str,
) -> Evaluation {
    let sender = format!("postmaster@{helo}");
    check_host_with(dns, options, ip, helo, &sender, helo).await
}
