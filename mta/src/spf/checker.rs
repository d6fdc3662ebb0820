//! Our egress IPs against our senders' SPF records: the results per
//! (domain, egress IP) pair, cached by TTL, refreshed periodically, and the
//! policy decision at MAIL FROM (`[spf] policy`).
//!
//! We check ourselves before we send: a campaign from an IP the domain's
//! SPF does not authorise is refused or filtered by receivers, and the
//! sender only learns it from bounces. A domain passes when at least one
//! egress IP that could carry its mail passes; delivery then prefers those
//! IPs. Results are per domain: the sender evaluated is
//! `postmaster@<domain>` (a record whose macros depend on the local part
//! is evaluated for that address).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Evaluation, HickoryDns, Options, SpfResult, check_mail_from};
use crate::clock::Clock;
use crate::config::SpfPolicy;
use crate::log::{Record, SpfChange, TransactionLog};
use crate::metrics::Metrics;
use crate::smtp::{Reply, Status};

/// Pairs cached before expired ones are dropped.
const MAX_CACHED: usize = 50_000;
/// Envelope sender domains remembered for periodic refreshes.
const MAX_SEEN: usize = 10_000;
/// How long a temperror is kept before asking again.
const TEMPERROR_TTL: Duration = Duration::from_secs(60);
/// How long MAIL FROM waits for an evaluation under `warn` before the
/// message goes on without one (the evaluation continues for the next).
pub const WARN_WAIT: Duration = Duration::from_secs(1);

/// One source of outbound connections: the IP SPF must authorise and the
/// EHLO name it uses (for `%{h}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub ehlo: String,
}

/// The address the system would send from when no `[[egress]]` binds one:
/// the source of a route towards a documentation address. Connecting a UDP
/// socket sends nothing.
pub fn default_source(v6: bool) -> Option<IpAddr> {
    let (bind, to): (SocketAddr, SocketAddr) = if v6 {
        ("[::]:0".parse().ok()?, "[2001:db8::1]:25".parse().ok()?)
    } else {
        ("0.0.0.0:0".parse().ok()?, "192.0.2.1:25".parse().ok()?)
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The verdict on one sender domain: the best pair.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub domain: String,
    pub result: SpfResult,
    /// The evaluation behind the result (a passing one when any passes).
    pub evaluation: Option<Evaluation>,
}

struct Cached {
    evaluation: Evaluation,
    until: Instant,
}

/// The SPF side of the daemon.
pub struct SpfChecker {
    /// What SIGHUP may change: the policy, the interval, the domains.
    tuning: std::sync::RwLock<Tuning>,
    sources: Vec<Source>,
    dns: HickoryDns,
    options: Options,
    cache: Mutex<HashMap<(String, IpAddr), Cached>>,
    /// The last result of each pair, for change records and the gauge.
    known: Mutex<HashMap<(String, IpAddr), SpfResult>>,
    /// Envelope sender domains seen, refreshed with the configured ones.
    seen: Mutex<std::collections::BTreeSet<String>>,
    log: TransactionLog,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SpfChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpfChecker")
            .field("tuning", &self.tuning())
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

/// The settings of a running checker that a reload replaces.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Enforce or warn (off has no checker).
    pub policy: SpfPolicy,
    pub interval: Duration,
    /// Tenants' sender domains (exact ones), checked periodically.
    pub domains: Arc<Vec<String>>,
}

/// What the checker is built from.
pub struct CheckerParts {
    pub policy: SpfPolicy,
    pub interval: Duration,
    pub sources: Vec<Source>,
    pub domains: Vec<String>,
    pub dns: HickoryDns,
    pub receiver: String,
    pub log: TransactionLog,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
}

impl SpfChecker {
    pub fn new(p: CheckerParts) -> Arc<SpfChecker> {
        Arc::new(SpfChecker {
            tuning: std::sync::RwLock::new(Tuning {
                policy: p.policy,
                interval: p.interval,
                domains: Arc::new(p.domains),
            }),
            sources: p.sources,
            dns: p.dns,
            options: Options {
                receiver: p.receiver,
                ..Options::default()
            },
            cache: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            seen: Mutex::new(Default::default()),
            log: p.log,
            metrics: p.metrics,
            clock: p.clock,
        })
    }

    pub fn policy(&self) -> SpfPolicy {
        self.tuning().policy
    }

    pub fn interval(&self) -> Duration {
        self.tuning().interval
    }

    fn tuning(&self) -> Tuning {
        self.tuning.read().expect("spf tuning").clone()
    }

    fn domains(&self) -> Arc<Vec<String>> {
        self.tuning.read().expect("spf tuning").domains.clone()
    }

    /// New policy, interval and domains (SIGHUP). Results cached so far
    /// stay; the caller refreshes to check new domains at once.
    pub fn retune(&self, tuning: Tuning) {
        *self.tuning.write().expect("spf tuning") = tuning;
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// The DNS the checks use (DMARC discovery shares it).
    pub fn dns(&self) -> &HickoryDns {
        &self.dns
    }

    /// Evaluates one pair now, bypassing the cache, and caches the result.
    pub async fn evaluate(&self, domain: &str, source: &Source) -> Evaluation {
        let domain = domain.to_ascii_lowercase();
        let e = check_mail_from(
            &self.dns,
            &self.options,
            source.ip,
            &format!("postmaster@{domain}"),
            &source.ehlo,
        )
        .await;
        let interval = self.interval();
        let ttl = match e.result {
            SpfResult::TempError => TEMPERROR_TTL,
            _ => e
                .ttl
                .map_or(interval, |t| Duration::from_secs(t.into()))
                .min(interval),
        };
        self.note(&domain, &e);
        let mut cache = self.cache.lock().expect("spf cache");
        if cache.len() >= MAX_CACHED {
            // Bounded whatever senders relay clients use: expired first.
            let now = Instant::now();
            cache.retain(|_, c| c.until > now);
        }
        cache.insert(
            (domain, source.ip),
            Cached {
                evaluation: e.clone(),
                until: Instant::now() + ttl,
            },
        );
        e
    }

    fn cached(&self, domain: &str, ip: IpAddr) -> Option<Evaluation> {
        let cache = self.cache.lock().expect("spf cache");
        cache
            .get(&(domain.to_string(), ip))
            .filter(|c| c.until > Instant::now())
            .map(|c| c.evaluation.clone())
    }

    /// Records a pair's result: a change record when it differs from the
    /// last one, and the gauge.
    fn note(&self, domain: &str, e: &Evaluation) {
        let ip = e.ip;
        let domains = self.domains();
        let previous = {
            let mut known = self.known.lock().expect("spf known");
            if known.len() >= MAX_CACHED {
                // Keep the configured domains' history; seen ones start over.
                known.retain(|(d, _), _| domains.contains(d));
            }
            known.insert((domain.to_string(), ip), e.result)
        };
        if previous == Some(e.result) {
            return;
        }
        let ip_text = ip.to_string();
        // The gauge only for the configured domains: label values stay
        // bounded whatever senders relay clients use.
        if domains.iter().any(|d| d == domain) {
            if let Some(p) = previous {
                self.metrics
                    .spf_pair
                    .with_label_values(&[domain, &ip_text, p.as_str()])
                    .set(0);
            }
            self.metrics
                .spf_pair
                .with_label_values(&[domain, &ip_text, e.result.as_str()])
                .set(1);
        }
        if previous.is_some() || e.result != SpfResult::Pass {
            tracing::warn!(domain, ip = %ip, result = %e.result, previous = ?previous.map(SpfResult::as_str), "SPF result of a sending pair changed");
        }
        self.log.write(Record::SpfChange(SpfChange {
            timestamp: time::OffsetDateTime::from(self.clock.now()),
            domain: domain.to_string(),
            ip: ip_text,
            previous: previous.map(|p| p.as_str().to_string()),
            result: e.result.as_str().to_string(),
            record: e.record.clone(),
            matched: e.matched.as_ref().map(|m| m.directive.clone()),
            error: e.error.as_ref().map(|x| x.to_string()),
            fix: e.suggestion(),
        }));
    }

    /// The verdict on `domain`: cached pairs where fresh, evaluated
    /// otherwise. The best result wins: pass, then temperror (a retry may
    /// pass), then the first other.
    pub async fn verdict(&self, domain: &str) -> Verdict {
        let domain = domain.to_ascii_lowercase();
        {
            let mut seen = self.seen.lock().expect("spf seen");
            if seen.len() < MAX_SEEN && !self.domains().contains(&domain) {
                seen.insert(domain.clone());
            }
        }
        let mut evaluations = Vec::with_capacity(self.sources.len());
        for source in &self.sources {
            let e = match self.cached(&domain, source.ip) {
                Some(e) => e,
                None => self.evaluate(&domain, source).await,
            };
            evaluations.push(e);
        }
        let rank = |r: SpfResult| match r {
            SpfResult::Pass => 0,
            SpfResult::TempError => 1,
            _ => 2,
        };
        let best = evaluations.into_iter().min_by_key(|e| rank(e.result));
        Verdict {
            result: best.as_ref().map_or(SpfResult::None, |e| e.result),
            domain,
            evaluation: best,
        }
    }

    /// The egress IPs whose last result for `domain` was pass (delivery
    /// prefers them). Last known, not only fresh: a record's short TTL must
    /// not make delivery forget which sources are authorised.
    pub fn passing(&self, domain: &str) -> Vec<IpAddr> {
        let domain = domain.to_ascii_lowercase();
        let known = self.known.lock().expect("spf known");
        self.sources
            .iter()
            .filter(|s| known.get(&(domain.clone(), s.ip)) == Some(&SpfResult::Pass))
            .map(|s| s.ip)
            .collect()
    }

    /// Evaluates every configured domain, and every sender domain seen so
    /// far, with every source again (start, every `check_interval`,
    /// SIGHUP).
    pub async fn refresh(&self) {
        let seen: Vec<String> = self
            .seen
            .lock()
            .expect("spf seen")
            .iter()
            .cloned()
            .collect();
        let domains = self.domains();
        for domain in domains.iter().chain(&seen) {
            for source in &self.sources {
                self.evaluate(domain, source).await;
            }
        }
    }

    /// Runs [`Self::refresh`] at once and then every interval until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.refresh().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval()) => {}
                _ = stop.wait_for(|&s| s) => return,
            }
        }
    }

    /// The decision at MAIL FROM under `enforce`: `Err` is the refusal
    /// (RFC 7372: 5.7.23 SPF validation failed, 4.7.24/5.7.24 SPF
    /// validation error).
    pub fn decide(&self, v: &Verdict) -> Result<(), Reply> {
        let e = v.evaluation.as_ref();
        let ip = e.map(|e| e.ip.to_string()).unwrap_or_default();
        let why = e
            .and_then(|e| e.error.as_ref().map(|x| x.to_string()))
            .or_else(|| {
                e.and_then(|e| e.record.clone())
                    .map(|r| format!("record \"{r}\""))
            })
            .unwrap_or_default();
        match v.result {
            SpfResult::Pass => Ok(()),
            SpfResult::TempError => Err(Reply::new(
                451,
                Status(4, 7, 24),
                format!(
                    "SPF of {} could not be checked for our sending IP {ip} ({why}); try again later",
                    v.domain
                ),
            )),
            SpfResult::PermError => Err(Reply::new(
                550,
                Status(5, 7, 24),
                format!(
                    "The SPF record of {} is broken ({why}): fix it before sending from it",
                    v.domain
                ),
            )),
            r => {
                let fix = e.and_then(Evaluation::suggestion).map_or_else(
                    || format!("publish an SPF record that includes {ip}"),
                    |f| format!("add {f} to it"),
                );
                Err(Reply::new(
                    550,
                    Status(5, 7, 23),
                    format!(
                        "SPF of {} does not authorise our sending IP {ip} ({r}; {why}): {fix}",
                        v.domain
                    ),
                ))
            }
        }
    }
}
