//! The configuration file: one TOML file, strict, every key documented with
//! its default. An empty file (or no file) is the embedded default.
//!
//! Values are checked while they are read (addresses, networks, durations,
//! domains, password hashes), so a bad value is reported with the file, line
//! and column where it stands; checks across keys use spans for the same.
//! Each component receives only its own section.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::policy::DomainPattern;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name used in the greeting, EHLO reply and Received header.
    /// Default: the host name of the machine.
    pub hostname: Option<String>,
    /// Queue, logs, generated certificate, admin socket. Default `./mta-data`.
    pub data_dir: PathBuf,
    pub smtp: SmtpConfig,
    /// Default: no tenants (relay clients may then use any sender domain).
    pub tenants: Vec<TenantConfig>,
    pub dkim: DkimConfig,
    pub spf: SpfConfig,
    /// Default: none (the system chooses the source address).
    pub egress: Vec<EgressConfig>,
    pub delivery: DeliveryConfig,
    pub dns: DnsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub queue: QueueConfig,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: None,
            data_dir: PathBuf::from("mta-data"),
            smtp: SmtpConfig::default(),
            tenants: Vec::new(),
            dkim: DkimConfig::default(),
            spf: SpfConfig::default(),
            egress: Vec::new(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            queue: QueueConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

/// `[smtp]`: reception.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Listeners offering STARTTLS. Default `["127.0.0.1:2525"]`.
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (port 465 style). Default `[]`.
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain. Default: a self-signed certificate generated
    /// into `<data_dir>/tls/` on first start.
    pub tls_certificate: Option<Spanned<PathBuf>>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Set with `tls_certificate`.
    pub tls_private_key: Option<Spanned<PathBuf>>,
    /// Clients outside these networks get `554 5.7.1` at connect.
    /// Default `["127.0.0.0/8", "::1/128"]`.
    pub allowed_networks: Vec<IpNet>,
    /// Clients in these networks may send without AUTH.
    /// Default `["127.0.0.0/8", "::1/128"]`.
    pub relay_networks: Vec<IpNet>,
    /// Largest message in bytes (advertised as SIZE). Default 26214400 (25 MiB).
    pub max_message_size: u64,
    /// Recipients per message. Default 1000.
    pub max_recipients: usize,
    /// Concurrent connections in total. Default 2000.
    pub max_connections: usize,
    /// Concurrent connections from one IP address. Default 200.
    pub max_connections_per_ip: usize,
    /// Waiting for a command. Default "5m" (RFC 5321 §4.5.3.2.7).
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Waiting for more message content. Default "5m".
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// The TLS handshake (STARTTLS or implicit). Default "30s".
    #[serde(deserialize_with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// Protocol errors before a session is closed with 421. Default 20.
    pub max_errors: u32,
    /// Failed AUTH attempts in one session before it is closed. Default 3.
    pub max_auth_failures: u32,
    /// Failed AUTH attempts from one IP address within `auth_failure_window`
    /// before further attempts are refused with 421. An IPv6 client counts
    /// by its /64. Default 10.
    pub max_auth_failures_per_ip: u32,
    /// Failed AUTH attempts for one user name, from any addresses, within
    /// `auth_failure_window` before further attempts as that user are
    /// refused with 454 from every address that has not logged in as it in
    /// the last 7 days (a guessing attack spread over many addresses;
    /// the account's own clients keep working). Default 30.
    pub max_auth_failures_per_user: u32,
    /// Default "15m".
    #[serde(deserialize_with = "duration")]
    pub auth_failure_window: Duration,
    /// Wait before answering a failed AUTH (slows guessing). Default "2s".
    #[serde(deserialize_with = "duration")]
    pub auth_failure_delay: Duration,
    /// On SIGTERM, how long sessions in the middle of a message may take to
    /// finish it, and deliveries under way their transaction. Keep it below
    /// systemd's `TimeoutStopSec`. Default "30s".
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
}

fn loopback_nets() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid"),
        "::1/128".parse().expect("valid"),
    ]
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().expect("valid")],
            listen_tls: Vec::new(),
            tls_certificate: None,
            tls_private_key: None,
            allowed_networks: loopback_nets(),
            relay_networks: loopback_nets(),
            max_message_size: 26_214_400,
            max_recipients: 1000,
            max_connections: 2000,
            max_connections_per_ip: 200,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
            tls_handshake_timeout: Duration::from_secs(30),
            max_errors: 20,
            max_auth_failures: 3,
            max_auth_failures_per_ip: 10,
            max_auth_failures_per_user: 30,
            auth_failure_window: Duration::from_secs(900),
            auth_failure_delay: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `[[tenants]]`: one customer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: Spanned<String>,
    /// Domains the tenant may use in MAIL FROM and From:; `*.d` for subdomains.
    #[serde(default)]
    pub sender_domains: Vec<DomainPattern>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// DKIM signing domain for messages whose From: domain has no key of
    /// its own (signatures then do not align with From: for DMARC).
    /// Default: none.
    #[serde(default)]
    pub signing_domain: Option<Spanned<DomainName>>,
}

/// `[[tenants.users]]`: an SMTP AUTH account of a tenant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: Spanned<String>,
    /// An argon2id PHC string, from `mta user hash`.
    pub password_hash: PasswordHashString,
}

/// A validated argon2 PHC hash string.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHashString(pub String);

impl fmt::Debug for PasswordHashString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHashString(..)")
    }
}

impl<'de> Deserialize<'de> for PasswordHashString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::auth::check_hash_format(&s).map_err(serde::de::Error::custom)?;
        Ok(PasswordHashString(s))
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DomainPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A domain name (lower case, no trailing dot, no wildcard).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainName(pub String);

impl<'de> Deserialize<'de> for DomainName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match DomainPattern::parse(&s) {
            Ok(DomainPattern::Exact(d)) => Ok(DomainName(d)),
            Ok(DomainPattern::Subdomains(_)) => Err(serde::de::Error::custom(format!(
                "'{s}': a signing domain is one domain, not a wildcard"
            ))),
            Err(e) => Err(serde::de::Error::custom(e)),
        }
    }
}

/// What to do with a message that no key can sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnsignedPolicy {
    #[default]
    Accept,
    Reject,
}

/// `[dkim]`: signing keys.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// A message no key can sign: `"accept"` (sent unsigned; logged and
    /// counted; the default) or `"reject"` (`550 5.7.1` at the end of DATA).
    pub unsigned: UnsignedPolicy,
    /// Where `mta dkim generate` writes keys. Default `<data_dir>/dkim`.
    pub keys_dir: Option<PathBuf>,
    /// Signature lifetime: adds `x=` (RFC 6376 §3.5). Default: none.
    #[serde(deserialize_with = "optional_duration")]
    pub expiration: Option<Duration>,
    pub keys: Vec<DkimKeyConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

/// `[[dkim.keys]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`).
    pub domain: DomainName,
    /// The selector (`s=`): the record is at `<selector>._domainkey.<domain>`.
    pub selector: Spanned<String>,
    /// `"rsa-sha256"` or `"ed25519-sha256"`.
    pub algorithm: DkimAlgorithm,
    /// PEM private key (PKCS#8, or PKCS#1 for RSA), mode 0600 or 0640.
    pub private_key: PathBuf,
    /// Published but not used for new mail (key rotation). Default true.
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// `[spf] policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpfPolicy {
    Enforce,
    #[default]
    Warn,
    Off,
}

/// `[spf]` (used from the SPF issue on).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpfConfig {
    /// `"enforce"`, `"warn"` (default) or `"off"`.
    pub policy: SpfPolicy,
    /// How often each domain × egress IP pair is checked again. Default "1h".
    #[serde(deserialize_with = "duration")]
    pub check_interval: Duration,
}

impl Default for SpfConfig {
    fn default() -> Self {
        SpfConfig {
            policy: SpfPolicy::Warn,
            check_interval: Duration::from_secs(3600),
        }
    }
}

/// `[[egress]]`: a source for outbound connections (used from the delivery issue on).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Local IP to bind; none = the system's choice.
    pub address: Option<IpAddr>,
    /// EHLO name with this source; default: `hostname`.
    pub ehlo: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    #[default]
    Opportunistic,
    Required,
    Disabled,
}

/// `[delivery]`: outbound SMTP to the recipients' MX hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver queued mail. `false` only accepts and queues (a
    /// reception-only node, or a pause while something is checked).
    /// Default true.
    pub enabled: bool,
    /// Port of receiving MX hosts. Default 25.
    pub port: u16,
    /// `"opportunistic"` (default: STARTTLS whenever offered, any
    /// certificate), `"required"` (no delivery without TLS) or `"disabled"`.
    pub tls: OutboundTls,
    /// `"host:port"` sends everything there; default "" (MX routing).
    pub relay_host: String,
    /// Open connections to one destination (domain, or the relay host). Default 10.
    pub max_connections_per_destination: usize,
    /// Open outbound connections in total. Default 500.
    pub max_connections: usize,
    /// Messages sent over one connection before it is closed. Default 100.
    pub messages_per_connection: usize,
    /// Messages being delivered at once (claimed from the queue, content in
    /// memory). Default 1000.
    pub max_in_flight: usize,
    /// First retry after a temporary failure; each later one waits twice as
    /// long (with up to 10 % jitter). Default "5m".
    #[serde(deserialize_with = "duration")]
    pub retry_initial: Duration,
    /// Longest wait between two attempts. Default "4h".
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// A message still undelivered this long after reception expires
    /// (RFC 5321 §4.5.4.1 suggests 4-5 days). Default "5d".
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
    /// Send RFC 3464 DSNs for bounces and expiries. Default true. Turn off
    /// for platforms that process bounces from the transaction log.
    pub bounces: bool,
    /// TCP connect to one address. Default "30s".
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Greeting, EHLO, STARTTLS, MAIL, RCPT, RSET replies (RFC 5321
    /// §4.5.3.2). Default "5m".
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Sending the content and waiting for the final reply. Default "10m".
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// An idle connection waits this long for another message to the same
    /// destination before QUIT. Default "5s".
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Failed TLS handshakes with one host before opportunistic TLS sends to
    /// it in plaintext (logged). 0 never falls back. Default 3.
    pub tls_fallback_after: u32,
    /// Extra CA certificates (PEM) trusted when verifying MX certificates,
    /// besides the built-in web PKI roots. Verification is logged; under
    /// opportunistic TLS it does not stop delivery. Default: none.
    pub tls_trust_anchors: Option<Spanned<PathBuf>>,
    /// Per destination domain: `[delivery.domains."bank.example"] tls = "required"`.
    pub domains: std::collections::BTreeMap<String, DestinationConfig>,
}

/// `[delivery.domains."<domain>"]`: what differs for one destination.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationConfig {
    /// Overrides `[delivery] tls` for this domain.
    pub tls: Option<OutboundTls>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            port: 25,
            tls: OutboundTls::Opportunistic,
            relay_host: String::new(),
            max_connections_per_destination: 10,
            max_connections: 500,
            messages_per_connection: 100,
            max_in_flight: 1000,
            retry_initial: Duration::from_secs(300),
            retry_max: Duration::from_secs(4 * 3600),
            max_lifetime: Duration::from_secs(5 * 86400),
            bounces: true,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(5),
            tls_fallback_after: 3,
            tls_trust_anchors: None,
            domains: Default::default(),
        }
    }
}

impl DeliveryConfig {
    /// The TLS policy for a destination domain.
    pub fn tls_for(&self, domain: &str) -> OutboundTls {
        self.domains
            .get(domain)
            .and_then(|d| d.tls)
            .unwrap_or(self.tls)
    }
}

/// `[dns]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `["127.0.0.1:5353"]`; empty (default) = the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// How long one query waits for an answer before it is sent again
    /// (twice in all); a lookup that gets none is a temporary failure.
    /// Default "5s".
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// `[log]`: the transaction log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Days to keep transaction log files (checked hourly; 0 keeps them
    /// forever). Default 30.
    pub retention_days: u32,
    /// A day's file is cut into parts of this size, in MiB (0: one file per
    /// day). Default 256.
    pub max_file_mb: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            retention_days: 30,
            max_file_mb: 256,
        }
    }
}

/// The most `[metrics] top_destinations` may be.
pub const MAX_TOP_DESTINATIONS: usize = 1000;

/// `[metrics]`: the Prometheus endpoint and how destinations are labelled
/// (see docs/metrics.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus endpoint. Default "127.0.0.1:9465".
    pub listen: SocketAddr,
    /// Recipient domains that get a `destination` label of their own, the
    /// first ones to reach `top_destination_min_recipients` recipients;
    /// every other domain is `other`. 0: only `destination_groups` and
    /// `other`. At most 1000. Default 20.
    pub top_destinations: usize,
    /// Recipients a domain must have had since the start (a lower bound,
    /// from a bounded counter of the busiest domains) before it takes one
    /// of the `top_destinations` labels. Default 100.
    pub top_destination_min_recipients: u64,
    /// Named groups of recipient domains, each its own `destination` label
    /// outside the `top_destinations` count: `google = ["gmail.com",
    /// "googlemail.com"]`; `*.example` matches subdomains. Default: none.
    pub destination_groups:
        std::collections::BTreeMap<Spanned<String>, Vec<Spanned<DomainPattern>>>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9465".parse().expect("valid"),
            top_destinations: 20,
            top_destination_min_recipients: 100,
            destination_groups: std::collections::BTreeMap::new(),
        }
    }
}

impl MetricsConfig {
    /// Group names and domains must leave every label unambiguous.
    fn check(&self) -> Result<(), (Option<Range<usize>>, String)> {
        if self.top_destinations > MAX_TOP_DESTINATIONS {
            return Err((
                None,
                format!(
                    "[metrics] top_destinations = {} is over {MAX_TOP_DESTINATIONS}: each label is a series per tenant and outcome; name the domains that matter in [metrics.destination_groups] instead",
                    self.top_destinations
                ),
            ));
        }
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for (name, patterns) in &self.destination_groups {
            let group = name.get_ref().as_str();
            if group.trim().is_empty() || group == "other" {
                return Err((
                    Some(name.span()),
                    format!(
                        "[metrics.destination_groups] '{group}' cannot name a group: \"other\" (and the empty name) is the label of ungrouped domains; choose another name"
                    ),
                ));
            }
            if patterns.is_empty() {
                return Err((
                    Some(name.span()),
                    format!(
                        "[metrics.destination_groups] {group} lists no domain: list its domains, or remove it"
                    ),
                ));
            }
            for p in patterns {
                let text = match p.get_ref() {
                    DomainPattern::Exact(d) => d.clone(),
                    DomainPattern::Subdomains(d) => format!("*.{d}"),
                };
                if let Some(other) = seen.insert(text.clone(), group) {
                    return Err((
                        Some(p.span()),
                        format!(
                            "[metrics.destination_groups] {text} is in both '{other}' and '{group}': a domain belongs to one group"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `[queue]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Encrypt queued envelopes and message content at rest (AES-256-GCM-SIV).
    /// Default true. Turning it off is refused while encrypted messages are
    /// queued.
    pub encrypt: bool,
    /// The queue's key file (one key per line as 64 hex characters, the
    /// first current; mode 0600). Default: when the daemon runs under
    /// systemd with `LoadCredential=mta-queue-key:...`, that credential;
    /// otherwise `<data_dir>-queue.key` beside (not inside) the data
    /// directory, generated on first start. The CLI (`mta queue rotate-key`,
    /// `rekey`, `--offline`) reads this file, never the credential.
    pub encryption_key_file: Option<Spanned<PathBuf>>,
    /// Memory for the store's page cache, in MiB. Default 64.
    pub cache_mb: u64,
    /// Free space (MiB) kept in reserve on the queue's filesystem: below it,
    /// new mail is refused with `452 4.3.1` so the store never fills the
    /// disk mid-write. 0 turns the check off. Default 100.
    pub min_free_mb: u64,
    /// How long a write may wait for its fsync before the store is declared
    /// failed (reception then answers 451 until a restart). Default "30s".
    #[serde(deserialize_with = "duration")]
    pub commit_timeout: Duration,
    /// How long a group commit may wait for messages whose DATA has ended
    /// but which are still being signed, so that they share its fsync.
    /// Only under load: with nothing on its way a commit starts at once.
    /// "0s" turns the wait off. Default "10ms".
    #[serde(deserialize_with = "duration")]
    pub commit_gather: Duration,
    /// Memory (MiB) for messages just stored, kept in clear until their
    /// first delivery attempt so that it need not read and decrypt them
    /// again. When delivery falls behind, messages over it are read from
    /// disk as usual. 0 keeps none. Default 32.
    pub fresh_content_mb: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            encrypt: true,
            encryption_key_file: None,
            cache_mb: 64,
            min_free_mb: 100,
            commit_timeout: Duration::from_secs(30),
            commit_gather: Duration::from_millis(10),
            fresh_content_mb: 32,
        }
    }
}

/// `[admin]`: the admin API. It is always served on the Unix socket
/// `<data_dir>/admin.sock` (mode 0660, for local users of the service's
/// group); these keys add an HTTPS listener for remote tooling.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTPS listener (TLS with the daemon's SMTP
    /// certificate). Default: none (off). Needs `tokens`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer tokens the listener accepts, by name: `ops =
    /// "/etc/mta/admin-ops.token"`. Each file holds one token of at least
    /// 32 characters and is readable by its owner only (mode 0600). The
    /// name is who the AdminAction records say made the call
    /// (`token:ops`). Default: none.
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, PathBuf>,
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Parses durations like "30s", "5m", "4h", "5d" (humantime syntax).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "'{s}' is not a duration ({e}): write it like \"30s\", \"5m\", \"4h\" or \"5d\""
        ))
    })
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            at: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |span: Option<Range<usize>>, message: String| ConfigError {
            file: file.to_path_buf(),
            at: span.map(|s| line_col(text, s.start)),
            message,
        };
        let config: Config =
            toml::from_str(text).map_err(|e| err(e.span(), e.message().trim().to_string()))?;
        config.check().map_err(|(span, msg)| err(span, msg))?;
        Ok(config)
    }

    /// Checks across keys.
    fn check(&self) -> Result<(), (Option<Range<usize>>, String)> {
        let s = &self.smtp;
        match (&s.tls_certificate, &s.tls_private_key) {
            (Some(c), None) => {
                return Err((
                    Some(c.span()),
                    "tls_certificate is set but tls_private_key is not: set both, or neither for a generated self-signed certificate".into(),
                ));
            }
            (None, Some(k)) => {
                return Err((
                    Some(k.span()),
                    "tls_private_key is set but tls_certificate is not: set both".into(),
                ));
            }
            _ => {}
        }
        if s.listen.is_empty() && s.listen_tls.is_empty() {
            return Err((
                None,
                "[smtp] has no listener: set listen or listen_tls".into(),
            ));
        }
        if s.max_message_size == 0 || s.max_recipients == 0 || s.max_connections == 0 {
            return Err((
                None,
                "[smtp] max_message_size, max_recipients and max_connections must be above 0"
                    .into(),
            ));
        }
        if s.max_connections_per_ip == 0
            || s.max_errors == 0
            || s.max_auth_failures == 0
            || s.max_auth_failures_per_ip == 0
            || s.max_auth_failures_per_user == 0
        {
            return Err((
                None,
                "[smtp] max_connections_per_ip, max_errors, max_auth_failures, max_auth_failures_per_ip and max_auth_failures_per_user must be above 0"
                    .into(),
            ));
        }
        let mut tenants = HashSet::new();
        let mut users = HashSet::new();
        for t in &self.tenants {
            if t.name.get_ref().trim().is_empty() {
                return Err((Some(t.name.span()), "a tenant needs a name".into()));
            }
            if !tenants.insert(t.name.get_ref().as_str()) {
                return Err((
                    Some(t.name.span()),
                    format!("tenant '{}' is defined twice", t.name.get_ref()),
                ));
            }
            for u in &t.users {
                if u.name.get_ref().is_empty() {
                    return Err((Some(u.name.span()), "a user needs a name".into()));
                }
                if !users.insert(u.name.get_ref().as_str()) {
                    return Err((
                        Some(u.name.span()),
                        format!(
                            "user '{}' is defined twice: user names are unique across tenants",
                            u.name.get_ref()
                        ),
                    ));
                }
            }
        }
        let keyed: HashSet<&str> = self.dkim.keys.iter().map(|k| k.domain.0.as_str()).collect();
        for t in &self.tenants {
            let Some(sd) = &t.signing_domain else {
                continue;
            };
            let d = sd.get_ref().0.as_str();
            if !keyed.contains(d) {
                return Err((
                    Some(sd.span()),
                    format!(
                        "tenant '{}' signs with {d}, but [[dkim.keys]] has no key for {d}",
                        t.name.get_ref()
                    ),
                ));
            }
            if let Some(owner) = self.tenants.iter().find(|o| {
                o.name.get_ref() != t.name.get_ref()
                    && o.sender_domains.iter().any(|p| p.matches(d))
            }) {
                return Err((
                    Some(sd.span()),
                    format!(
                        "tenant '{}' cannot sign with {d}: it is a sender domain of tenant '{}'",
                        t.name.get_ref(),
                        owner.name.get_ref()
                    ),
                ));
            }
        }
        self.metrics.check()?;
        if !self.queue.encrypt
            && let Some(k) = &self.queue.encryption_key_file
        {
            return Err((
                Some(k.span()),
                "[queue] encryption_key_file is set but encrypt = false: remove one of them".into(),
            ));
        }
        if self.queue.commit_gather > Duration::from_secs(1) {
            return Err((
                None,
                "[queue] commit_gather must be at most \"1s\" (it delays the 250 of messages arriving under load; the default is \"10ms\")".into(),
            ));
        }
        if self.spf.check_interval < Duration::from_secs(1) {
            return Err((None, "[spf] check_interval must be at least \"1s\"".into()));
        }
        let d = &self.delivery;
        if d.max_connections_per_destination == 0
            || d.max_connections == 0
            || d.messages_per_connection == 0
            || d.max_in_flight == 0
        {
            return Err((
                None,
                "[delivery] max_connections_per_destination, max_connections, messages_per_connection and max_in_flight must be above 0".into(),
            ));
        }
        if d.retry_initial.is_zero() || d.retry_max < d.retry_initial {
            return Err((
                None,
                "[delivery] retry_initial must be above 0 and retry_max at least retry_initial"
                    .into(),
            ));
        }
        for domain in d.domains.keys() {
            if DomainPattern::parse(domain).is_err()
                || domain.starts_with('*')
                || domain != &domain.to_lowercase()
            {
                return Err((
                    None,
                    format!(
                        "[delivery.domains] '{domain}' is not a domain name: write it in lower case, without wildcards"
                    ),
                ));
            }
        }
        if !self.delivery.relay_host.is_empty()
            && self
                .delivery
                .relay_host
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err((
                None,
                format!(
                    "[delivery] relay_host '{}' is not host:port",
                    self.delivery.relay_host
                ),
            ));
        }
        Ok(())
    }

    /// Where `mta dkim generate` puts keys.
    pub fn dkim_keys_dir(&self) -> PathBuf {
        self.dkim
            .keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("dkim"))
    }

    /// The key specifications for the key ring.
    pub fn dkim_key_specs(&self) -> Vec<dkim_keys::KeySpec> {
        self.dkim
            .keys
            .iter()
            .map(|k| dkim_keys::KeySpec {
                domain: k.domain.0.clone(),
                selector: k.selector.get_ref().clone(),
                algorithm: match k.algorithm {
                    DkimAlgorithm::RsaSha256 => dkim_keys::Algorithm::RsaSha256,
                    DkimAlgorithm::Ed25519Sha256 => dkim_keys::Algorithm::Ed25519Sha256,
                },
                path: k.private_key.clone(),
                active: k.active,
            })
            .collect()
    }

    /// The name we give ourselves.
    pub fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            gethostname::gethostname()
                .into_string()
                .unwrap_or_else(|_| "localhost".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("mta.toml"))
    }

    #[test]
    fn an_empty_file_is_the_embedded_default() {
        let c = parse("").unwrap();
        assert_eq!(c.data_dir, PathBuf::from("mta-data"));
        assert_eq!(c.smtp.listen, ["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.smtp.relay_networks, loopback_nets());
        assert_eq!(c.smtp.max_message_size, 26_214_400);
        assert_eq!(c.metrics.listen, "127.0.0.1:9465".parse().unwrap());
        assert_eq!(c.spf.policy, SpfPolicy::Warn);
        assert_eq!(c.delivery.port, 25);
        assert!(c.queue.encrypt, "encryption at rest is on by default");
        assert!(c.queue.encryption_key_file.is_none());
    }

    #[test]
    fn a_key_file_without_encryption_is_refused_at_its_line() {
        let err = parse("[queue]\nencrypt = false\nencryption_key_file = \"/k\"\n").unwrap_err();
        assert_eq!(err.at.map(|a| a.0), Some(3), "{err}");
        assert!(err.message.contains("remove one"), "{err}");
        assert!(!parse("[queue]\nencrypt = false\n").unwrap().queue.encrypt);
    }

    /// The example of DESIGN.md, which must be accepted and mean what it says.
    #[test]
    fn the_design_example_is_accepted() {
        let text = include_str!("../../docs/mta.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("mta1.example.net"));
        assert_eq!(c.smtp.listen_tls, ["0.0.0.0:465".parse().unwrap()]);
        assert!(c.smtp.relay_networks.is_empty());
        assert_eq!(c.tenants[0].users[0].name.get_ref(), "acme-app");
        assert_eq!(c.dkim.unsigned, UnsignedPolicy::Reject);
        assert_eq!(c.dkim.keys[0].algorithm, DkimAlgorithm::RsaSha256);
        assert_eq!(c.dkim_key_specs()[0].selector, "s2026a");
        assert_eq!(c.spf.policy, SpfPolicy::Enforce);
        assert_eq!(c.egress[0].address, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(c.delivery.max_lifetime, Duration::from_secs(5 * 86400));
    }

    #[test]
    fn metrics_destination_groups_are_checked() {
        let c = parse(
            "[metrics]\ntop_destinations = 5\n[metrics.destination_groups]\ngoogle = [\"gmail.com\", \"*.google.com\"]\n",
        )
        .unwrap();
        assert_eq!(c.metrics.top_destinations, 5);
        assert_eq!(c.metrics.top_destination_min_recipients, 100);
        let (name, patterns) = c.metrics.destination_groups.iter().next().unwrap();
        assert_eq!(name.get_ref(), "google");
        assert!(patterns[1].get_ref().matches("mail.google.com"));
        let e = parse("[metrics.destination_groups]\nother = [\"a.example\"]\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        assert!(e.message.contains("choose another name"), "{e}");
        let e = parse("[metrics.destination_groups]\na = [\"x.example\"]\nb = [\"X.example\"]\n")
            .unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(3), "{e}");
        assert!(e.message.contains("in both 'a' and 'b'"), "{e}");
        let e = parse("[metrics]\ntop_destinations = 1001\n").unwrap_err();
        assert!(e.message.contains("over 1000"), "{e}");
        let e = parse("[metrics.destination_groups]\na = []\n").unwrap_err();
        assert!(e.message.contains("lists no domain"), "{e}");
        let e = parse("[metrics.destination_groups]\na = [\"not a domain\"]\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e =
            parse("hostname = \"a\"\n\n[smtp]\nlisten = []\nmax_mesage_size = 5\n").unwrap_err();
        assert_eq!(e.at, Some((5, 1)), "{e}");
        assert!(e.message.contains("max_mesage_size"), "{e}");
        assert!(e.to_string().starts_with("mta.toml:5:1: "), "{e}");
    }

    #[test]
    fn bad_values_are_located() {
        let e = parse("[smtp]\nallowed_networks = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        let e = parse("[smtp]\ncommand_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        assert!(e.message.contains("\"5m\""), "{e}");
        let e =
            parse("[[tenants]]\nname = \"a\"\nsender_domains = [\"ok.example\", \"bad domain\"]\n")
                .unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(3), "{e}");
        let e = parse("[[tenants]]\nname = \"a\"\n[[tenants.users]]\nname = \"u\"\npassword_hash = \"hunter2\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(5), "{e}");
        assert!(e.message.contains("mta user hash"), "{e}");
        let e = parse("[spf]\npolicy = \"strict\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
    }

    #[test]
    fn checks_across_keys_are_located() {
        let e = parse("[smtp]\n\ntls_certificate = \"/x.pem\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(3), "{e}");
        let hash = crate::auth::hash_password("pw").unwrap();
        let text = format!(
            "[[tenants]]\nname = \"a\"\n[[tenants.users]]\nname = \"u\"\npassword_hash = \"{hash}\"\n[[tenants]]\nname = \"b\"\n[[tenants.users]]\nname = \"u\"\npassword_hash = \"{hash}\"\n"
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(9), "{e}");
        assert!(e.message.contains("defined twice"));
        let e = parse("[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(4), "{e}");
        let e = parse("[smtp]\nlisten = []\n").unwrap_err();
        assert!(e.message.contains("no listener"), "{e}");
        let e = parse("[queue]\ncommit_gather = \"2s\"\n").unwrap_err();
        assert!(e.message.contains("commit_gather must be at most"), "{e}");
        assert_eq!(
            parse("[queue]\ncommit_gather = \"0s\"\n")
                .unwrap()
                .queue
                .commit_gather,
            Duration::ZERO
        );
    }

    #[test]
    fn signing_domains_are_checked() {
        let keys = "[[dkim.keys]]\ndomain = \"esp.example\"\nselector = \"s1\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"/k.pem\"\n";
        let ok = format!("[[tenants]]\nname = \"a\"\nsigning_domain = \"esp.example\"\n{keys}");
        assert_eq!(
            parse(&ok).unwrap().tenants[0]
                .signing_domain
                .as_ref()
                .unwrap()
                .get_ref()
                .0,
            "esp.example"
        );
        let e =
            parse("[[tenants]]\nname = \"a\"\nsigning_domain = \"nokey.example\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(3), "{e}");
        assert!(e.message.contains("no key for nokey.example"), "{e}");
        let theirs = format!(
            "[[tenants]]\nname = \"a\"\nsigning_domain = \"esp.example\"\n[[tenants]]\nname = \"b\"\nsender_domains = [\"esp.example\"]\n{keys}"
        );
        assert!(parse(&theirs).unwrap_err().message.contains("tenant 'b'"));
        let e = parse("[[dkim.keys]]\ndomain = \"*.esp.example\"\nselector = \"s\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"/k\"\n").unwrap_err();
        assert!(e.message.contains("wildcard"), "{e}");
        let c = parse("[dkim]\nexpiration = \"7d\"\n").unwrap();
        assert_eq!(c.dkim.expiration, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.dkim_keys_dir(), PathBuf::from("mta-data/dkim"));
    }

    #[test]
    fn delivery_keys_are_checked_and_domains_override_tls() {
        let c = parse(
            "[delivery]\ntls = \"opportunistic\"\nconnect_timeout = \"10s\"\n[delivery.domains.\"bank.example\"]\ntls = \"required\"\n",
        )
        .unwrap();
        assert_eq!(c.delivery.tls_for("bank.example"), OutboundTls::Required);
        assert_eq!(
            c.delivery.tls_for("other.example"),
            OutboundTls::Opportunistic
        );
        assert_eq!(c.delivery.connect_timeout, Duration::from_secs(10));
        assert!(c.delivery.enabled);
        let e = parse("[delivery]\nretry_initial = \"1h\"\nretry_max = \"5m\"\n").unwrap_err();
        assert!(e.message.contains("retry_max"), "{e}");
        let e = parse("[delivery.domains.\"Bank.Example\"]\ntls = \"required\"\n").unwrap_err();
        assert!(e.message.contains("lower case"), "{e}");
        let e = parse("[delivery.domains.\"bank.example\"]\ntls = \"always\"\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        let e = parse("[delivery]\nmax_in_flight = 0\n").unwrap_err();
        assert!(e.message.contains("max_in_flight"), "{e}");
        let e = parse("[delivery]\nrelay_host = \"nohost\"\n").unwrap_err();
        assert!(e.message.contains("host:port"), "{e}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = parse("[smtp\n").unwrap_err();
        assert_eq!(e.at.map(|a| a.0), Some(1), "{e}");
    }
}
