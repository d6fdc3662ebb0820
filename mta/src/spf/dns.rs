//! The DNS the evaluator asks, as a trait, and its production
//! implementation over hickory's resolver.
//!
//! Every lookup tells the three outcomes SPF treats differently apart:
//! records (with the TTL they may be cached for), no records of that type
//! (NODATA), the name does not exist (NXDOMAIN) — the last two are "void"
//! lookups (RFC 7208 §4.6.4) — and failure (SERVFAIL, refused, timeout),
//! which makes the result temperror (§2.6.6).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer<T> {
    /// At least one record; `ttl` is how long (seconds) the answer may be
    /// cached.
    Records { records: Vec<T>, ttl: u32 },
    /// The name exists but has no records of the type (NODATA); `ttl` is
    /// the negative-caching TTL when the server gave one.
    NoRecords { ttl: Option<u32> },
    /// The name does not exist (NXDOMAIN), or cannot be a DNS name at all
    /// (an empty label, a label over 63 octets).
    NotFound { ttl: Option<u32> },
}

impl<T> DnsAnswer<T> {
    /// The TTL of the answer, when there is one.
    pub fn ttl(&self) -> Option<u32> {
        match self {
            DnsAnswer::Records { ttl, .. } => Some(*ttl),
            DnsAnswer::NoRecords { ttl } | DnsAnswer::NotFound { ttl } => *ttl,
        }
    }
}

/// A lookup that failed: nothing can be concluded from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    #[error("the DNS query timed out")]
    Timeout,
    #[error("the DNS server failed: {0}")]
    Server(String),
}

pub type DnsResult<T> = Result<DnsAnswer<T>, DnsFailure>;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// The exchange, without the final dot; empty for the root (a null MX,
    /// RFC 7505).
    pub exchange: String,
}

/// The lookups SPF evaluation makes. Names are given without a final dot
/// and are always absolute (no search domains).
pub trait SpfDns: Send + Sync {
    /// TXT records, each one's strings joined without separators
    /// (RFC 7208 §3.3).
    fn txt(&self, name: &str) -> impl Future<Output = DnsResult<Vec<u8>>> + Send;
    fn a(&self, name: &str) -> impl Future<Output = DnsResult<Ipv4Addr>> + Send;
    fn aaaa(&self, name: &str) -> impl Future<Output = DnsResult<Ipv6Addr>> + Send;
    fn mx(&self, name: &str) -> impl Future<Output = DnsResult<MxRecord>> + Send;
    /// PTR records of the address's reverse name (`in-addr.arpa` /
    /// `ip6.arpa`), each without the final dot.
    fn ptr(&self, ip: IpAddr) -> impl Future<Output = DnsResult<String>> + Send;
}

/// [`SpfDns`] over hickory's resolver (the one `crate::dns::resolver`
/// builds, which caches answers by their TTL).
#[derive(Clone)]
pub struct HickoryDns {
    resolver: TokioResolver,
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HickoryDns")
    }
}

impl HickoryDns {
    pub fn new(resolver: TokioResolver) -> HickoryDns {
        HickoryDns { resolver }
    }

    async fn lookup<T>(
        &self,
        name: Option<Name>,
        record_type: RecordType,
        pick: impl Fn(&RData) -> Option<T>,
    ) -> DnsResult<T> {
        let Some(name) = name else {
            return Ok(DnsAnswer::NotFound { ttl: None });
        };
        match self.resolver.lookup(name, record_type).await {
            Ok(lookup) => {
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32;
                // CNAMEs on the way are in the answers too: keep the type
                // asked for.
                let records: Vec<T> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| pick(&r.data))
                    .collect();
                if records.is_empty() {
                    Ok(DnsAnswer::NoRecords { ttl: Some(ttl) })
                } else {
                    Ok(DnsAnswer::Records { records, ttl })
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no))) => match no.response_code {
                ResponseCode::NXDomain => Ok(DnsAnswer::NotFound {
                    ttl: no.negative_ttl,
                }),
                ResponseCode::NoError => Ok(DnsAnswer::NoRecords {
                    ttl: no.negative_ttl,
                }),
                code => Err(DnsFailure::Server(code.to_string())),
            },
            Err(NetError::Timeout) => Err(DnsFailure::Timeout),
            Err(e) => Err(DnsFailure::Server(e.to_string())),
        }
    }
}

/// The DNS name for an SPF target name: labels taken as they are (SPF
/// names may hold any visible character, RFC 7208 §7.1), IDNA only for
/// non-ASCII names. `None` when it cannot be a name (empty or over-long
/// labels, over 255 octets).
pub fn dns_name(name: &str) -> Option<Name> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Some(Name::root());
    }
    if !name.is_ascii() {
        return Name::from_utf8(format!("{name}.")).ok();
    }
    Name::from_labels(name.split('.').map(str::as_bytes)).ok()
}

/// A name from an answer as text: its labels joined by dots, no final dot.
pub fn name_text(name: &Name) -> String {
    name.iter()
        .map(|label| String::from_utf8_lossy(label).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

impl SpfDns for HickoryDns {
    async fn txt(&self, name: &str) -> DnsResult<Vec<u8>> {
        self.lookup(dns_name(name), RecordType::TXT, |data| match data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect(),
            ),
            _ => None,
        })
        .await
    }

    async fn a(&self, name: &str) -> DnsResult<Ipv4Addr> {
        self.lookup(dns_name(name), RecordType::A, |data| match data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .await
    }

    async fn aaaa(&self, name: &str) -> DnsResult<Ipv6Addr> {
        self.lookup(dns_name(name), RecordType::AAAA, |data| match data {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .await
    }

    async fn mx(&self, name: &str) -> DnsResult<MxRecord> {
        self.lookup(dns_name(name), RecordType::MX, |data| match data {
            RData::MX(mx) => Some(MxRecord {
                preference: mx.preference,
                exchange: name_text(&mx.exchange),
            }),
            _ => None,
        })
        .await
    }

    async fn ptr(&self, ip: IpAddr) -> DnsResult<String> {
        self.lookup(Some(Name::from(ip)), RecordType::PTR, |data| match data {
            RData::PTR(ptr) => Some(name_text(&ptr.0)),
            _ => None,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            dns_name("foo:bar/baz.example.com").map(|n| name_text(&n)),
            Some("foo:bar/baz.example.com".to_string())
        );
        assert_eq!(
            dns_name("macro%percent  space%20url-space.example.com.").map(|n| name_text(&n)),
            Some("macro%percent  space%20url-space.example.com".to_string())
        );
        assert!(dns_name("mail.example...com").is_none());
        assert!(dns_name(&format!("{}.example.com", "a".repeat(64))).is_none());
        assert!(dns_name(&format!("{}.example.com", "a".repeat(63))).is_some());
        assert!(dns_name("").unwrap().is_root());
    }
}
