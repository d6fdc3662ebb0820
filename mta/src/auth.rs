//! SMTP AUTH accounts: argon2id password hashes, verification, and the
//! per-address failure throttle.
//!
//! Trust boundary: user names and passwords come from remote clients. A
//! password is only ever handed to argon2 and dropped; it is never logged,
//! never stored, and never part of an error.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::config::TenantConfig;
use crate::smtp::Identity;

/// Argon2id with the parameters OWASP recommends (m=19 MiB, t=2, p=1).
fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("could not hash the password: {0}")]
    Hash(String),
}

/// A new argon2id PHC string for `password`, with a random salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks that `s` is an argon2id PHC string (as config validation does).
pub fn check_hash_format(s: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(s)
        .map_err(|e| format!("not a password hash ({e}): generate one with `mta user hash`"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "the hash uses {}, not argon2id: generate one with `mta user hash`",
            parsed.algorithm
        ));
    }
    Ok(())
}

struct Account {
    tenant: String,
    hash: String,
}

/// The accounts of all tenants.
pub struct Users {
    accounts: HashMap<String, Account>,
    /// Verified against when the user does not exist, so that unknown and
    /// known users take the same time (no user enumeration by timing).
    decoy: String,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.accounts.len())
            .finish()
    }
}

impl Users {
    pub fn from_config(tenants: &[TenantConfig]) -> Self {
        let mut accounts = HashMap::new();
        for t in tenants {
            for u in &t.users {
                accounts.insert(
                    u.name.get_ref().clone(),
                    Account {
                        tenant: t.name.get_ref().clone(),
                        hash: u.password_hash.0.clone(),
                    },
                );
            }
        }
        let decoy = if accounts.is_empty() {
            String::new()
        } else {
            hash_password("decoy password for unknown users").unwrap_or_default()
        };
        Users { accounts, decoy }
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Checks a user's password. CPU-heavy (tens of milliseconds): call it
    /// off the async reactor.
    pub fn verify(&self, user: &str, password: &str) -> Option<Identity> {
        let (hash, account) = match self.accounts.get(user) {
            Some(a) => (a.hash.as_str(), Some(a)),
            None => (self.decoy.as_str(), None),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        match (ok, account) {
            (true, Some(a)) => Some(Identity {
                user: user.to_string(),
                tenant: a.tenant.clone(),
            }),
            _ => None,
        }
    }
}

/// Counts failed AUTH attempts per client address within a window.
#[derive(Debug)]
pub struct AuthThrottle {
    /// The limit and the window, replaced on SIGHUP; the counts stay.
    limits: Mutex<(u32, Duration)>,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// Addresses tracked at most; beyond this the oldest entries are dropped, so
/// an attacker spraying from many addresses cannot exhaust memory.
const MAX_TRACKED: usize = 100_000;

impl AuthThrottle {
    pub fn new(max: u32, window: Duration) -> Self {
        AuthThrottle {
            limits: Mutex::new((max, window)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// New limits (SIGHUP): the failures counted so far still count.
    pub fn set_limits(&self, max: u32, window: Duration) {
        *self.limits.lock().expect("throttle lock") = (max, window);
    }

    fn limits(&self) -> (u32, Duration) {
        *self.limits.lock().expect("throttle lock")
    }

    fn prune(q: &mut VecDeque<Instant>, window: Duration, now: Instant) {
        while q
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= window)
        {
            q.pop_front();
        }
    }

    /// Has this address used up its attempts?
    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        let (max, window) = self.limits();
        let mut map = self.failures.lock().expect("throttle lock");
        match map.get_mut(&ip) {
            Some(q) => {
                Self::prune(q, window, now);
                q.len() as u32 >= max
            }
            None => false,
        }
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let (_, window) = self.limits();
        let mut map = self.failures.lock().expect("throttle lock");
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, q| {
                Self::prune(q, window, now);
                !q.is_empty()
            });
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let q = map.entry(ip).or_default();
        Self::prune(q, window, now);
        q.push_back(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PasswordHashString, UserConfig};

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        check_hash_format(&h).unwrap();
        assert!(check_hash_format("$2b$10$abcdefghijklmnopqrstuv").is_err());
        assert!(
            check_hash_format("plain")
                .unwrap_err()
                .contains("mta user hash")
        );
        let argon2i = "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$YWJjZGVmZ2hpamtsbW5vcA";
        assert!(check_hash_format(argon2i).unwrap_err().contains("argon2id"));
    }

    #[test]
    fn users_verify_against_their_tenant() {
        let tenants = vec![TenantConfig {
            name: toml::Spanned::new(0..0, "acme".into()),
            sender_domains: vec![],
            users: vec![UserConfig {
                name: toml::Spanned::new(0..0, "acme-app".into()),
                password_hash: PasswordHashString(hash_password("s3cret").unwrap()),
            }],
            signing_domain: None,
        }];
        let users = Users::from_config(&tenants);
        assert_eq!(
            users.verify("acme-app", "s3cret"),
            Some(Identity {
                user: "acme-app".into(),
                tenant: "acme".into()
            })
        );
        assert_eq!(users.verify("acme-app", "wrong"), None);
        assert_eq!(users.verify("nobody", "s3cret"), None);
    }

    #[test]
    fn throttle_locks_after_max_failures_within_the_window() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(!t.is_locked(ip, t0 + Duration::from_secs(i)));
            t.record_failure(ip, t0 + Duration::from_secs(i));
        }
        assert!(t.is_locked(ip, t0 + Duration::from_secs(3)));
        assert!(!t.is_locked(other, t0 + Duration::from_secs(3)));
        // The first failure leaves the window at t0+60.
        assert!(!t.is_locked(ip, t0 + Duration::from_secs(60)));
        // A lowered limit (SIGHUP) keeps the counts: the two failures still
        // in the window and one more reach 3 of 3.
        t.set_limits(3, Duration::from_secs(120));
        assert!(!t.is_locked(ip, t0 + Duration::from_secs(60)));
        t.record_failure(ip, t0 + Duration::from_secs(60));
        assert!(t.is_locked(ip, t0 + Duration::from_secs(61)));
        t.set_limits(4, Duration::from_secs(120));
        assert!(!t.is_locked(ip, t0 + Duration::from_secs(61)));
    }
}
