//! The DNS resolver: hickory's, configured by `[dns] nameservers` (the
//! system's resolv.conf when empty). mail-auth wraps the same resolver, so
//! there is one cache for everything.

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::DnsConfig;

/// Builds the resolver. Names are always looked up as given (no search
/// domains), and answers are cached by their TTL.
pub fn resolver(config: &DnsConfig) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.ndots = 0;
    opts.attempts = 2;
    opts.timeout = config.timeout;
    // Delivery tries every address of an MX host, IPv4 and IPv6 alike.
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    let builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// A resolver asking exactly these name servers (tests and tools).
pub fn resolver_for(nameservers: &[std::net::SocketAddr]) -> Result<TokioResolver, String> {
    resolver(&DnsConfig {
        nameservers: nameservers.to_vec(),
        ..DnsConfig::default()
    })
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtAnswer {
    /// The TXT records at the name, each one's strings joined (RFC 6376
    /// §3.6.2.2 joins them without separators).
    Records(Vec<String>),
    /// NXDOMAIN, or the name has no TXT records.
    NotFound,
    /// SERVFAIL, refused, timeout: nothing can be concluded.
    Failed(String),
}

pub async fn txt(resolver: &TokioResolver, name: &str) -> TxtAnswer {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    match resolver.txt_lookup(fqdn).await {
        Ok(lookup) => {
            let records: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                TxtAnswer::NotFound
            } else {
                TxtAnswer::Records(records)
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no)))
            if matches!(
                no.response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            TxtAnswer::NotFound
        }
        Err(e) => TxtAnswer::Failed(e.to_string()),
    }
}
