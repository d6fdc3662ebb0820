//! The signing step: DKIM-sign every accepted message once, before it is
//! stored, so every retry sends the same signature (RFC 6376, RFC 8463).
//!
//! The signing domain is the From: header's domain; when it has no active
//! key, the tenant's `signing_domain`; otherwise the message is unsigned and
//! `[dkim] unsigned` decides (accept, or `550 5.7.1`). Each active key of
//! the domain adds one signature, so an RSA and an Ed25519 key give dual
//! signatures. Canonicalization is relaxed/relaxed. The header list follows
//! RFC 6376 §5.4: the headers below when present, with From, To, Subject,
//! Date, Message-ID and List-Unsubscribe over-signed (listed once more than
//! they occur) so that none can be added after signing.
//!
//! A message up to [`INLINE_SIGN_BYTES`] is signed on the session's own
//! task, at most one signing per core at a time; a larger one, whose
//! canonicalization and hashing would hold a runtime thread for
//! milliseconds, on the blocking pool. Signing on the blocking pool was
//! measured to cost more than it saves: each RSA signature (about 1 ms of
//! CPU) put one more runnable thread on the cores, and the kernel left
//! the runtime's threads waiting behind it while the other core idled
//! (docs/performance.md, "Signing where the session runs").
//!
//! The signature is built here (`dkim.rs`, `canon.rs`) rather than by
//! mail-auth's signer: canonicalization over whole runs of lines and one
//! body hash for all keys keep the signing step within 80 % of the cost
//! of the cryptography itself (see docs/performance.md); mail-auth and
//! dkimpy verify every signature in the tests.

pub mod canon;
pub mod dkim;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use dkim::{SIGNED_HEADERS, sign_message, sign_message_below};
use dkim_keys::{KeyRing, RingKey};
use tokio::sync::Semaphore;

use crate::config::UnsignedPolicy;
use crate::metrics::Metrics;
use crate::smtp::{Reply, Status};

/// One signature added to a message, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignatureInfo {
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
}

/// The outcome of the signing step for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signed {
    /// The signatures to put on top of the message.
    Yes {
        headers: Vec<u8>,
        signatures: Vec<SignatureInfo>,
    },
    /// Accepted unsigned (policy `accept`), and why.
    No { reason: String },
}

/// What the signing step needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct SigningPolicy {
    pub unsigned: UnsignedPolicy,
    pub expiration: Option<Duration>,
    /// Fallback signing domain per tenant.
    pub tenant_domains: Vec<(String, String)>,
}

/// Messages up to this size (with the fields added on top) are signed on
/// the session's task: canonicalizing and hashing 256 KiB takes about a
/// quarter of a millisecond here (`bench --sign-only --size-kb 256`), a
/// third of an RSA-2048 signature.
pub const INLINE_SIGN_BYTES: usize = 256 * 1024;

/// The signing step of reception.
pub struct Signer {
    ring: RwLock<Arc<KeyRing>>,
    /// Swapped with the ring on SIGHUP (tenants' signing domains, the
    /// unsigned policy, the expiration).
    policy: RwLock<Arc<SigningPolicy>>,
    permits: Semaphore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

impl Signer {
    pub fn new(ring: KeyRing, policy: SigningPolicy, metrics: Arc<Metrics>) -> Signer {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Signer {
            ring: RwLock::new(Arc::new(ring)),
            policy: RwLock::new(Arc::new(policy)),
            permits: Semaphore::new(cores),
            metrics,
        }
    }

    /// The keys in use.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().expect("ring lock").clone()
    }

    /// Swaps in freshly loaded keys and a new policy together (SIGHUP);
    /// messages being signed finish with the old ones.
    pub fn replace(&self, ring: KeyRing, policy: SigningPolicy) {
        let mut r = self.ring.write().expect("ring lock");
        let mut p = self.policy.write().expect("policy lock");
        *r = Arc::new(ring);
        *p = Arc::new(policy);
    }

    fn policy(&self) -> Arc<SigningPolicy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// The domain and keys that sign a message from `from_domain` of `tenant`.
    pub fn choose(
        &self,
        from_domain: &str,
        tenant: Option<&str>,
    ) -> Option<(String, Vec<Arc<RingKey>>)> {
        let ring = self.ring();
        let keys = ring.active_for(from_domain);
        if !keys.is_empty() {
            return Some((from_domain.to_ascii_lowercase(), keys));
        }
        let fallback = tenant.and_then(|t| {
            self.policy()
                .tenant_domains
                .iter()
                .find(|(name, _)| name == t)
                .map(|(_, d)| d.clone())
        })?;
        let keys = ring.active_for(&fallback);
        (!keys.is_empty()).then_some((fallback, keys))
    }

    /// Signs a message, or says why not: `Err` is the reply refusing the
    /// message.
    pub async fn sign(
        &self,
        message: Arc<Vec<u8>>,
        from_domain: &str,
        tenant: Option<&str>,
        now: SystemTime,
    ) -> Result<Signed, Reply> {
        self.sign_below(Vec::new(), message, from_domain, tenant, now)
            .await
    }

    /// [`Signer::sign`] of the header fields `on_top` followed by
    /// `message`, as if they were one (see [`sign_message_below`]).
    pub async fn sign_below(
        &self,
        on_top: Vec<u8>,
        message: Arc<Vec<u8>>,
        from_domain: &str,
        tenant: Option<&str>,
        now: SystemTime,
    ) -> Result<Signed, Reply> {
        let Some((domain, keys)) = self.choose(from_domain, tenant) else {
            let reason = match tenant {
                Some(t) => {
                    format!("no DKIM key for {from_domain} nor a signing domain of tenant {t}")
                }
                None => format!("no DKIM key for {from_domain}"),
            };
            return match self.policy().unsigned {
                UnsignedPolicy::Accept => {
                    self.metrics.dkim_unsigned.inc();
                    Ok(Signed::No { reason })
                }
                UnsignedPolicy::Reject => Err(Reply::new(
                    550,
                    Status(5, 7, 1),
                    format!(
                        "Message refused: {reason}, and unsigned mail is not sent (configure [[dkim.keys]])"
                    ),
                )),
            };
        };
        let _permit = self.permits.acquire().await.expect("never closed");
        let expiration = self.policy().expiration;
        let started = Instant::now();
        let result = if on_top.len() + message.len() <= INLINE_SIGN_BYTES {
            sign_message_below(&keys, &domain, &on_top, &message, now, expiration)
        } else {
            tokio::task::spawn_blocking(move || {
                sign_message_below(&keys, &domain, &on_top, &message, now, expiration)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        };
        self.metrics
            .dkim_signing_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((headers, signatures)) => {
                for s in &signatures {
                    self.metrics
                        .dkim_signatures
                        .with_label_values(&[&s.algorithm])
                        .inc();
                }
                Ok(Signed::Yes {
                    headers,
                    signatures,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "DKIM signing failed; answered 451");
                Err(Reply::new(
                    451,
                    Status(4, 3, 0),
                    "Temporary failure signing the message; please try again later",
                ))
            }
        }
    }
}
