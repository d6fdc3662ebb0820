//! `check_host()` (RFC 7208 §4): record selection, the mechanisms and
//! modifiers in order, the processing limits, and the explanation.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use super::dns::{DnsAnswer, DnsFailure, SpfDns};
use super::macros::{MacroString, Vars};
use super::record::{
    DomainSpec, Mechanism, Qualifier, Record, in_prefix_v4, in_prefix_v6, is_spf_record,
};
use super::{SpfError, SpfResult};

/// DNS-querying terms allowed in one evaluation (§4.6.4).
pub const MAX_DNS_TERMS: u32 = 10;
/// MX names one `mx` mechanism may look up; more is a permerror (§4.6.4).
pub const MAX_MX_NAMES: usize = 10;
/// PTR names one `ptr` mechanism (or `%{p}`) looks at; the rest are
/// ignored (§4.6.4).
pub const MAX_PTR_NAMES: usize = 10;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The record that decided a result, and the directive that matched in it
/// (`None` for the default result of a record where nothing matched).
pub(crate) struct Decided {
    pub domain: String,
    pub record: Arc<Record>,
    pub directive: Option<String>,
}

/// The result of one `check_host()` level.
pub(crate) struct Outcome {
    pub result: SpfResult,
    pub error: Option<SpfError>,
    pub decided: Option<Decided>,
}

impl Outcome {
    fn error(error: SpfError) -> Outcome {
        Outcome {
            result: error.result(),
            error: Some(error),
            decided: None,
        }
    }
}

impl From<Qualifier> for SpfResult {
    fn from(q: Qualifier) -> SpfResult {
        match q {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

/// The PTR names of the client, looked up once per evaluation.
#[derive(Clone)]
enum PtrNames {
    Names(Vec<String>),
    Void,
    Failed,
}

/// The state of one evaluation: the identities, the counters, the caches.
pub(crate) struct Evaluator<'a, D> {
    dns: &'a D,
    pub ip: IpAddr,
    sender: String,
    local_part: String,
    sender_domain: String,
    helo: String,
    receiver: &'a str,
    timestamp: u64,
    void_limit: u32,
    pub lookups: u32,
    pub voids: u32,
    pub ttl: Option<u32>,
    /// The record of the domain asked about, as published.
    pub record: Option<String>,
    ptr: Option<PtrNames>,
    validated: HashMap<String, bool>,
}

/// The identities one evaluation is about.
pub(crate) struct Identity<'a> {
    pub ip: IpAddr,
    pub sender: &'a str,
    pub helo: &'a str,
}

impl<'a, D: SpfDns> Evaluator<'a, D> {
    pub fn new(
        dns: &'a D,
        identity: Identity<'_>,
        receiver: &'a str,
        timestamp: u64,
        void_limit: u32,
    ) -> Self {
        // §4.3: no local part means "postmaster".
        let (local, domain) = match identity.sender.rsplit_once('@') {
            Some((local, domain)) => (local, domain),
            None => ("", identity.sender),
        };
        let local_part = if local.is_empty() {
            "postmaster"
        } else {
            local
        };
        Evaluator {
            dns,
            // §5: an IPv4-mapped IPv6 address is IPv4.
            ip: identity.ip.to_canonical(),
            sender: format!("{local_part}@{domain}"),
            local_part: local_part.to_string(),
            sender_domain: domain.to_string(),
            helo: identity.helo.to_string(),
            receiver,
            timestamp,
            void_limit,
            lookups: 0,
            voids: 0,
            ttl: None,
            record: None,
            ptr: None,
            validated: HashMap::new(),
        }
    }

    fn vars<'v>(&'v self, domain: &'v str, validated: Option<&'v str>) -> Vars<'v> {
        Vars {
            sender: &self.sender,
            local_part: &self.local_part,
            sender_domain: &self.sender_domain,
            domain,
            ip: self.ip,
            validated,
            helo: &self.helo,
            receiver: self.receiver,
            timestamp: self.timestamp,
        }
    }

    fn note_ttl<T>(&mut self, answer: &DnsAnswer<T>) {
        if let Some(ttl) = answer.ttl() {
            self.ttl = Some(self.ttl.map_or(ttl, |t| t.min(ttl)));
        }
    }

    fn count_lookup(&mut self) -> Result<(), SpfError> {
        self.lookups += 1;
        if self.lookups > MAX_DNS_TERMS {
            return Err(SpfError::TooManyLookups);
        }
        Ok(())
    }

    fn void(&mut self) -> Result<(), SpfError> {
        self.voids += 1;
        if self.voids > self.void_limit {
            return Err(SpfError::TooManyVoidLookups {
                limit: self.void_limit,
            });
        }
        Ok(())
    }

    /// `check_host(<ip>, domain, <sender>)`: one level, recursing for
    /// `include:` and `redirect=`.
    pub fn check(&mut self, domain: String, top: bool) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            if !super::valid_domain(&domain) {
                return Outcome::error(SpfError::InvalidDomain { domain });
            }
            // §4.4, §4.5: the TXT records, exactly one of them v=spf1.
            let answer = match self.dns.txt(&domain).await {
                Ok(answer) => answer,
                Err(error) => {
                    return Outcome::error(SpfError::Dns {
                        domain,
                        query: "TXT",
                        error,
                    });
                }
            };
            self.note_ttl(&answer);
            let DnsAnswer::Records { records, .. } = answer else {
                return Outcome::error(SpfError::NoRecord { domain });
            };
            let mut spf = records.iter().filter(|r| is_spf_record(r));
            let (Some(txt), None) = (spf.next(), spf.next()) else {
                let count = records.iter().filter(|r| is_spf_record(r)).count();
                if count == 0 {
                    return Outcome::error(SpfError::NoRecord { domain });
                }
                return Outcome::error(SpfError::MultipleRecords { domain, count });
            };
            if top {
                self.record = Some(String::from_utf8_lossy(txt).into_owned());
            }
            let record = match Record::parse(txt) {
                Ok(record) => Arc::new(record),
                Err(error) => return Outcome::error(SpfError::Syntax { domain, error }),
            };
            // §4.6.2: mechanisms in order, the first match decides.
            for directive in &record.directives {
                match self.matches(&directive.mechanism, &domain).await {
                    Ok(true) => {
                        return Outcome {
                            result: directive.qualifier.into(),
                            error: None,
                            decided: Some(Decided {
                                domain,
                                record: record.clone(),
                                directive: Some(directive.text.clone()),
                            }),
                        };
                    }
                    Ok(false) => {}
                    Err(error) => return Outcome::error(error),
                }
            }
            // §6.1: redirect= when nothing matched; its result is ours.
            if let Some(redirect) = &record.redirect {
                if let Err(error) = self.count_lookup() {
                    return Outcome::error(error);
                }
                let target = self.expand_domain(redirect, &domain).await;
                let outcome = self.check(target.clone(), false).await;
                if outcome.result == SpfResult::None {
                    return Outcome::error(SpfError::RedirectNone { domain: target });
                }
                return outcome;
            }
            // §4.7: the default is neutral.
            Outcome {
                result: SpfResult::Neutral,
                error: None,
                decided: Some(Decided {
                    domain,
                    record,
                    directive: None,
                }),
            }
        })
    }

    /// Whether a mechanism matches (§5).
    async fn matches(&mut self, mechanism: &Mechanism, domain: &str) -> Result<bool, SpfError> {
        if mechanism.queries_dns() {
            self.count_lookup()?;
        }
        match mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. } => Ok(mechanism.covers(self.ip)),
            Mechanism::Include(spec) => {
                let target = self.expand_domain(spec, domain).await;
                let outcome = self.check(target.clone(), false).await;
                // §5.2: the table of include results.
                match outcome.result {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    SpfResult::None => Err(SpfError::IncludeNone { domain: target }),
                    SpfResult::TempError | SpfResult::PermError => Err(outcome
                        .error
                        .unwrap_or(SpfError::IncludeNone { domain: target })),
                }
            }
            Mechanism::A {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let target = self.target(spec.as_ref(), domain).await;
                let addresses = self.addresses(&target, true).await?;
                Ok(addresses
                    .into_iter()
                    .any(|a| self.in_cidr(a, *cidr4, *cidr6)))
            }
            Mechanism::Mx {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let target = self.target(spec.as_ref(), domain).await;
                let answer = self.dns.mx(&target).await.map_err(|error| SpfError::Dns {
                    domain: target.clone(),
                    query: "MX",
                    error,
                })?;
                self.note_ttl(&answer);
                let DnsAnswer::Records { mut records, .. } = answer else {
                    self.void()?;
                    return Ok(false);
                };
                if records.len() > MAX_MX_NAMES {
                    return Err(SpfError::TooManyMx {
                        domain: target,
                        count: records.len(),
                    });
                }
                records.sort_by_key(|mx| mx.preference);
                for mx in records {
                    // A null MX (RFC 7505) names no host.
                    if mx.exchange.is_empty() {
                        continue;
                    }
                    let addresses = self.addresses(&mx.exchange, false).await?;
                    if addresses
                        .into_iter()
                        .any(|a| self.in_cidr(a, *cidr4, *cidr6))
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(spec) => {
                let target = self.target(spec.as_ref(), domain).await;
                let names = match self.ptr_names().await {
                    PtrNames::Names(names) => names,
                    PtrNames::Void => {
                        self.void()?;
                        return Ok(false);
                    }
                    // §5.5: a DNS error on the PTR lookup is no match.
                    PtrNames::Failed => return Ok(false),
                };
                for name in names {
                    if is_within(&name, &target) && self.is_validated(&name).await {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Exists(spec) => {
                let target = self.expand_domain(spec, domain).await;
                // §5.7: an A query whatever the client's address family.
                let answer = self.dns.a(&target).await.map_err(|error| SpfError::Dns {
                    domain: target.clone(),
                    query: "A",
                    error,
                })?;
                self.note_ttl(&answer);
                if matches!(answer, DnsAnswer::Records { .. }) {
                    Ok(true)
                } else {
                    self.void()?;
                    Ok(false)
                }
            }
        }
    }

    fn in_cidr(&self, address: IpAddr, cidr4: u8, cidr6: u8) -> bool {
        match (self.ip, address) {
            (IpAddr::V4(ip), IpAddr::V4(a)) => in_prefix_v4(ip, a, cidr4),
            (IpAddr::V6(ip), IpAddr::V6(a)) => in_prefix_v6(ip, a, cidr6),
            _ => false,
        }
    }

    async fn target(&mut self, spec: Option<&DomainSpec>, domain: &str) -> String {
        match spec {
            Some(spec) => self.expand_domain(spec, domain).await,
            None => domain.to_string(),
        }
    }

    /// Expands a domain-spec to a name to query (§7.3): the final dot
    /// dropped, left-hand labels dropped past 253 characters.
    async fn expand_domain(&mut self, spec: &DomainSpec, domain: &str) -> String {
        let expanded = self.expand(&spec.macros, domain).await;
        truncate_domain(expanded)
    }

    async fn expand(&mut self, macros: &MacroString, domain: &str) -> String {
        let validated = if macros.uses_validated_name() {
            Some(self.validated_name(domain).await)
        } else {
            None
        };
        macros.expand(&self.vars(domain, validated.as_deref()))
    }

    /// The addresses of `name` in the client's family (A for IPv4, AAAA
    /// for IPv6).
    async fn addresses(&mut self, name: &str, count_void: bool) -> Result<Vec<IpAddr>, SpfError> {
        let dns_error = |query, error: DnsFailure| SpfError::Dns {
            domain: name.to_string(),
            query,
            error,
        };
        let found: Option<Vec<IpAddr>> = match self.ip {
            IpAddr::V4(_) => {
                let answer = self.dns.a(name).await.map_err(|e| dns_error("A", e))?;
                self.note_ttl(&answer);
                match answer {
                    DnsAnswer::Records { records, .. } => {
                        Some(records.into_iter().map(IpAddr::V4).collect())
                    }
                    _ => None,
                }
            }
            IpAddr::V6(_) => {
                let answer = self
                    .dns
                    .aaaa(name)
                    .await
                    .map_err(|e| dns_error("AAAA", e))?;
                self.note_ttl(&answer);
                match answer {
                    DnsAnswer::Records { records, .. } => {
                        Some(records.into_iter().map(IpAddr::V6).collect())
                    }
                    _ => None,
                }
            }
        };
        match found {
            Some(addresses) => Ok(addresses),
            None => {
                if count_void {
                    self.void()?;
                }
                Ok(Vec::new())
            }
        }
    }

    async fn ptr_names(&mut self) -> PtrNames {
        if let Some(names) = &self.ptr {
            return names.clone();
        }
        let names = match self.dns.ptr(self.ip).await {
            Ok(answer) => {
                self.note_ttl(&answer);
                match answer {
                    DnsAnswer::Records { records, .. } => {
                        PtrNames::Names(records.into_iter().take(MAX_PTR_NAMES).collect())
                    }
                    _ => PtrNames::Void,
                }
            }
            Err(_) => PtrNames::Failed,
        };
        self.ptr = Some(names.clone());
        names
    }

    /// Whether a PTR name resolves back to the client (§5.5); lookup
    /// errors make it not validated.
    async fn is_validated(&mut self, name: &str) -> bool {
        let key = name.to_ascii_lowercase();
        if let Some(&known) = self.validated.get(&key) {
            return known;
        }
        let ip = self.ip;
        let valid = match self.addresses(name, false).await {
            Ok(addresses) => addresses.contains(&ip),
            Err(_) => false,
        };
        self.validated.insert(key, valid);
        valid
    }

    /// `%{p}` (§7.3): a validated name of the client, the domain itself or
    /// one of its subdomains when there is one; "unknown" otherwise.
    async fn validated_name(&mut self, domain: &str) -> String {
        let PtrNames::Names(names) = self.ptr_names().await else {
            return "unknown".to_string();
        };
        let mut validated = Vec::new();
        for name in names {
            if self.is_validated(&name).await {
                validated.push(name);
            }
        }
        let exact = validated.iter().find(|n| same_name(n, domain));
        let sub = validated.iter().find(|n| is_within(n, domain));
        exact
            .or(sub)
            .or(validated.first())
            .map(|n| n.trim_end_matches('.').to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// The explanation for a fail (§6.2): `exp=` of the record that
    /// decided, expanded; any problem on the way means none.
    pub async fn explanation(&mut self, decided: &Decided) -> Option<String> {
        let spec = decided.record.explanation.as_ref()?;
        let name = self.expand_domain(spec, &decided.domain).await;
        let answer = self.dns.txt(&name).await.ok()?;
        self.note_ttl(&answer);
        let DnsAnswer::Records { records, .. } = answer else {
            return None;
        };
        let [text] = records.as_slice() else {
            return None;
        };
        let text = std::str::from_utf8(text).ok()?;
        let macros = MacroString::parse_explanation(text).ok()?;
        Some(self.expand(&macros, &decided.domain).await)
    }
}

fn normalized(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn same_name(a: &str, b: &str) -> bool {
    normalized(a) == normalized(b)
}

/// Whether `name` is `domain` or a subdomain of it (case-insensitive).
fn is_within(name: &str, domain: &str) -> bool {
    let name = normalized(name);
    let domain = normalized(domain);
    name == domain || name.ends_with(&format!(".{domain}"))
}

/// §7.3: drop the final dot, then left-hand labels until the name is at
/// most 253 characters.
pub(crate) fn truncate_domain(mut name: String) -> String {
    if name.ends_with('.') {
        name.pop();
    }
    while name.len() > 253 {
        match name.find('.') {
            Some(pos) => {
                name.drain(..=pos);
            }
            None => break,
        }
    }
    name
}
