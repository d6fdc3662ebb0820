//! The mta: an outbound mail transfer agent for senders of campaign mail.
//!
//! This crate is the daemon and its command-line tool. A marketing platform
//! submits mail over SMTP; reception checks it, DKIM-signs it and stores it
//! durably in the `queue` crate before answering 250, and writes one
//! transaction log record per event; delivery takes it from the queue to
//! the recipients' MX hosts. (SPF/DMARC alignment and the admin API arrive
//! in later issues; see ARCHITECTURE.md.)
//!
//! Layout, in the order data flows:
//! - [`smtp`]: the SMTP protocol, pure (parsing, replies, content framing,
//!   the session state machine). RFC 5321, 1870, 2920, 3030, 2034/3463,
//!   3207, 4954, 4616, 6152, 6531.
//! - [`server`]: the I/O edge (listeners, TLS, timeouts, limits) driving
//!   sessions over sockets.
//! - [`policy`], [`auth`]: who may connect, relay, authenticate, and send
//!   as which domain.
//! - [`reception`]: header checks and the headers we add.
//! - [`sign`]: DKIM signing (RFC 6376, RFC 8463) with the keys of the
//!   `dkim-keys` ring.
//! - [`spf`]: SPF evaluation (RFC 7208) of our egress IPs for our senders'
//!   domains: result, record, matched directive, lookups, TTL.
//! - [`dmarc`]: DMARC (RFC 7489) alignment of what we are about to send:
//!   policy discovery, organisational domain (public suffix list),
//!   DKIM/SPF identifier alignment, the policy that applies.
//! - [`delivery`]: MX routing, outbound SMTP with STARTTLS, retries,
//!   bounces and DSNs. RFC 5321 §4.5.4 and §5, 3207, 7435, 7505, 3464.
//! - [`log`]: the transaction log schema, writer and reader.
//! - [`metrics`]: Prometheus metrics and `/metrics`.
//! - [`dns`]: the resolver.
//! - [`reload`]: what SIGHUP applies and what needs a restart.
//! - [`config`], [`tls`], [`stream`], [`clock`], [`daemon`], [`notify`]
//!   (systemd readiness and watchdog), [`cli`], [`dkim_cli`], [`spf_cli`], [`audit_cli`] (access records).
//!
//! Trust boundary: everything a client sends is untrusted and passes
//! through `smtp` and `policy` before anything is stored; what MX hosts and
//! DNS answer is untrusted and only ever logged or bounced as text; the
//! config file and the data directory are trusted.

pub mod admin;
pub mod audit_cli;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod dkim_cli;
pub mod dmarc;
pub mod dns;
pub mod log;
pub mod log_cli;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod queue_key_cli;
pub mod queue_keys;
pub mod reception;
pub mod redact;
pub mod reload;
pub mod server;
pub mod sign;
pub mod smtp;
pub mod spf;
pub mod spf_cli;
pub mod stream;
pub mod tls;
