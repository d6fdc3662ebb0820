//! Where a destination's mail goes: the relay host, or the domain's MX
//! hosts (RFC 5321 §5.1) through the configured resolver.
//!
//! - MX records in preference order; hosts of equal preference shuffled
//!   (§5.1: spread the load) with the injected randomness.
//! - No MX records (NOERROR, empty answer): the domain itself is the host
//!   (the implicit MX of §5.1).
//! - A null MX (RFC 7505: one record, preference 0, exchange ".") means the
//!   domain accepts no mail: permanent, `556 5.1.10`.
//! - NXDOMAIN: permanent, `550 5.1.2`. SERVFAIL, refusals, timeouts:
//!   temporary, `451 4.4.3`.
//!
//! Answers are cached by the resolver for their TTL.

use std::net::IpAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

use super::outcome::{Failure, Scope};
use crate::smtp::Status;

/// One host to try, by name, with the port to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The MX host name (no trailing dot), or the relay host as configured.
    pub name: String,
    pub port: u16,
}

/// How a lookup of a name ended when it found nothing usable.
enum Missing {
    NxDomain,
    NoRecords,
    Failed(String),
}

fn classify(e: NetError) -> Missing {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NXDomain =>
        {
            Missing::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NoError =>
        {
            Missing::NoRecords
        }
        other => Missing::Failed(other.to_string()),
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Orders MX records: by preference, equal preferences shuffled with
/// `random` (one value per record, any order-free source).
pub fn order_mx(mut records: Vec<(u16, String)>, mut random: impl FnMut() -> u32) -> Vec<String> {
    let mut keyed: Vec<(u16, u32, String)> =
        records.drain(..).map(|(p, n)| (p, random(), n)).collect();
    keyed.sort_by_key(|k| (k.0, k.1));
    let mut seen = std::collections::HashSet::new();
    keyed
        .into_iter()
        .map(|(_, _, n)| n)
        .filter(|n| seen.insert(n.to_ascii_lowercase()))
        .collect()
}

/// The address of an address-literal domain (`[192.0.2.1]`,
/// `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3): mail goes there, no MX lookup.
pub fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

/// The hosts for `domain`, in the order to try them.
pub async fn mx_hosts(
    resolver: &TokioResolver,
    domain: &str,
    port: u16,
    random: impl FnMut() -> u32,
) -> Result<Vec<Host>, Failure> {
    if let Some(ip) = address_literal(domain) {
        return Ok(vec![Host {
            name: ip.to_string(),
            port,
        }]);
    }
    let lookup = resolver.mx_lookup(fqdn(domain)).await;
    let records: Vec<(u16, String)> = match lookup {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) => match classify(e) {
            Missing::NxDomain => {
                return Err(Failure::permanent(
                    Scope::Destination,
                    550,
                    Status(5, 1, 2),
                    format!("domain {domain} does not exist (NXDOMAIN)"),
                ));
            }
            Missing::NoRecords => Vec::new(),
            Missing::Failed(why) => {
                return Err(Failure::temporary(
                    Scope::Destination,
                    Status(4, 4, 3),
                    format!("MX lookup for {domain} failed: {why}"),
                ));
            }
        },
    };
    if records.is_empty() {
        // RFC 5321 §5.1: no MX records, so the domain is its own host.
        return Ok(vec![Host {
            name: domain.to_string(),
            port,
        }]);
    }
    let is_null = |(p, n): &(u16, String)| *p == 0 && (n == "." || n.is_empty());
    if records.len() == 1 && is_null(&records[0]) {
        return Err(Failure::permanent(
            Scope::Destination,
            556,
            Status(5, 1, 10),
            format!("domain {domain} accepts no mail (null MX, RFC 7505)"),
        ));
    }
    let ordered = order_mx(
        records.into_iter().filter(|r| !is_null(r)).collect(),
        random,
    );
    Ok(ordered
        .into_iter()
        .map(|n| Host {
            name: n.trim_end_matches('.').to_string(),
            port,
        })
        .collect())
}

/// The addresses of one host. An IP literal is its own address.
pub async fn addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, Failure> {
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(vec![ip]);
    }
    match resolver.lookup_ip(fqdn(host)).await {
        Ok(l) => {
            let addrs: Vec<IpAddr> = l.iter().collect();
            if addrs.is_empty() {
                Err(no_address(host, "no A or AAAA records"))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(match classify(e) {
            Missing::NxDomain => no_address(host, "the name does not exist"),
            Missing::NoRecords => no_address(host, "no A or AAAA records"),
            Missing::Failed(why) => Failure::temporary(
                Scope::Host,
                Status(4, 4, 3),
                format!("address lookup for {host} failed: {why}"),
            ),
        }),
    }
}

fn no_address(host: &str, why: &str) -> Failure {
    // Temporary: a missing address of one MX host is usually a DNS change
    // in progress; the lifetime bounds how long we keep trying.
    Failure::temporary(
        Scope::Host,
        Status(4, 4, 4),
        format!("host {host} has no address: {why}"),
    )
}

/// The relay host of `[delivery] relay_host` ("host:port").
pub fn relay(relay_host: &str) -> Option<Host> {
    let (h, p) = relay_host.rsplit_once(':')?;
    Some(Host {
        name: h.trim_start_matches('[').trim_end_matches(']').to_string(),
        port: p.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_order_is_by_preference_and_shuffles_equal_ones() {
        let recs = vec![
            (20, "c.".to_string()),
            (10, "a.".to_string()),
            (10, "b.".to_string()),
        ];
        let mut n = 0u32;
        let ordered = order_mx(recs.clone(), || {
            n += 1;
            n
        });
        assert_eq!(ordered[2], "c.");
        // Reversed randomness reverses the equal-preference pair only.
        let mut m = 10u32;
        let reversed = order_mx(recs, || {
            m -= 1;
            m
        });
        assert_eq!(reversed[2], "c.");
        assert_ne!(ordered[0], reversed[0]);
    }

    #[test]
    fn duplicate_mx_names_are_tried_once() {
        let ordered = order_mx(vec![(10, "a.".into()), (20, "A.".into())], || 0);
        assert_eq!(ordered, ["a."]);
    }

    #[test]
    fn address_literals_are_their_own_host() {
        assert_eq!(
            address_literal("[127.0.0.2]"),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(address_literal("[IPv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(address_literal("example.com"), None);
        assert_eq!(address_literal("[not-an-ip]"), None);
    }

    #[test]
    fn relay_host_parses_names_and_bracketed_addresses() {
        assert_eq!(
            relay("smtp.example:2525"),
            Some(Host {
                name: "smtp.example".into(),
                port: 2525
            })
        );
        assert_eq!(relay("[::1]:25").unwrap().name, "::1");
        assert_eq!(relay("nope"), None);
    }
}
