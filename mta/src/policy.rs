//! Who may connect, who may relay, and which sender domains each tenant owns.
//!
//! Pure data built from the config; the SMTP session consults it for every
//! command. Trust boundary: everything here decides on what a remote client
//! claims (its address, the domains in its commands), so every check fails
//! closed.

use std::net::IpAddr;

use ipnet::IpNet;

/// A sender domain a tenant owns: `acme.example` (that domain only) or
/// `*.acme.example` (any subdomain, not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    Subdomains(String),
}

impl DomainPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = normalize_domain(s);
        let (pattern, body) = match lower.strip_prefix("*.") {
            Some(rest) => (
                DomainPattern::Subdomains(rest.to_string()),
                rest.to_string(),
            ),
            None => (DomainPattern::Exact(lower.clone()), lower),
        };
        let valid = !body.is_empty()
            && body.len() <= 253
            && body.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        if valid {
            Ok(pattern)
        } else {
            Err(format!(
                "'{s}' is not a domain: write it as 'acme.example', or '*.acme.example' for its subdomains"
            ))
        }
    }

    pub fn matches(&self, domain: &str) -> bool {
        let d = normalize_domain(domain);
        match self {
            DomainPattern::Exact(e) => d == *e,
            DomainPattern::Subdomains(parent) => d
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

/// Lower case, without a trailing root dot.
pub fn normalize_domain(d: &str) -> String {
    d.strip_suffix('.').unwrap_or(d).to_lowercase()
}

/// One customer of the platform.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub sender_domains: Vec<DomainPattern>,
}

impl Tenant {
    pub fn owns(&self, domain: &str) -> bool {
        self.sender_domains.iter().any(|p| p.matches(domain))
    }
}

/// The reception policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allowed_networks: Vec<IpNet>,
    pub relay_networks: Vec<IpNet>,
    pub tenants: Vec<Tenant>,
}

/// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`; CIDR
/// lists are written in IPv4, so compare the IPv4 form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    nets.iter().any(|n| n.contains(&ip))
}

impl Policy {
    /// The policy a configuration describes (at start and on SIGHUP).
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            allowed_networks: config.smtp.allowed_networks.clone(),
            relay_networks: config.smtp.relay_networks.clone(),
            tenants: config
                .tenants
                .iter()
                .map(|t| Tenant {
                    name: t.name.get_ref().clone(),
                    sender_domains: t.sender_domains.clone(),
                })
                .collect(),
        }
    }

    /// May this client connect at all?
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        contains(&self.allowed_networks, ip)
    }

    /// May this client send without authenticating?
    pub fn may_relay(&self, ip: IpAddr) -> bool {
        contains(&self.relay_networks, ip)
    }

    pub fn has_tenants(&self) -> bool {
        !self.tenants.is_empty()
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// May `tenant` send as `domain`? An unknown tenant may send as nothing.
    pub fn sender_allowed(&self, tenant: &str, domain: &str) -> bool {
        self.tenant(tenant).is_some_and(|t| t.owns(domain))
    }

    /// The tenant that owns `domain`, for clients that relay without AUTH.
    pub fn tenant_for_domain(&self, domain: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.owns(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            relay_networks: vec!["127.0.0.1/32".parse().unwrap()],
            tenants: vec![
                Tenant {
                    name: "acme".into(),
                    sender_domains: vec![DomainPattern::parse("acme.example").unwrap()],
                },
                Tenant {
                    name: "bank".into(),
                    sender_domains: vec![DomainPattern::parse("*.bank.example").unwrap()],
                },
            ],
        }
    }

    #[test]
    fn networks_including_v4_mapped_addresses() {
        let p = policy();
        assert!(p.is_allowed("127.0.0.5".parse().unwrap()));
        assert!(p.is_allowed("::ffff:127.0.0.5".parse().unwrap()));
        assert!(p.is_allowed("::1".parse().unwrap()));
        assert!(!p.is_allowed("10.0.0.1".parse().unwrap()));
        assert!(p.may_relay("127.0.0.1".parse().unwrap()));
        assert!(!p.may_relay("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn tenants_own_only_their_domains() {
        let p = policy();
        assert!(p.sender_allowed("acme", "ACME.example."));
        assert!(!p.sender_allowed("acme", "mail.acme.example"));
        assert!(!p.sender_allowed("acme", "bank.example"));
        assert!(!p.sender_allowed("acme", "evilacme.example"));
        assert!(p.sender_allowed("bank", "news.bank.example"));
        assert!(!p.sender_allowed("bank", "bank.example"));
        assert!(!p.sender_allowed("bank", "xbank.example"));
        assert!(!p.sender_allowed("nobody", "acme.example"));
        assert_eq!(p.tenant_for_domain("acme.example").unwrap().name, "acme");
        assert!(p.tenant_for_domain("other.example").is_none());
    }

    #[test]
    fn domain_patterns_are_validated() {
        assert!(DomainPattern::parse("acme.example").is_ok());
        assert!(DomainPattern::parse("*.acme.example").is_ok());
        assert!(DomainPattern::parse("").is_err());
        assert!(DomainPattern::parse("*").is_err());
        assert!(DomainPattern::parse("a..b").is_err());
        assert!(DomainPattern::parse("acme.example/x").is_err());
        assert!(DomainPattern::parse("user@acme.example").is_err());
    }
}
