//! SMTP AUTH accounts: argon2id password hashes, verification, and the
//! failure throttle (per client address, IPv6 per /64, and per user name
//! from addresses that user has not logged in from).
//!
//! Trust boundary: user names and passwords come from remote clients. A
//! password is only ever handed to argon2 and dropped; it is never logged,
//! never stored, and never part of an error.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
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
        self.verify_in(user, password, &mut Vec::new())
    }

    /// [`Users::verify`] with argon2's working memory (19 MiB with our
    /// parameters) in `memory`, grown as needed and kept by the caller: a
    /// thread that checks passwords all day allocates it once, instead of
    /// leaving malloc a fresh 19 MiB block to place at every check.
    pub fn verify_in(
        &self,
        user: &str,
        password: &str,
        memory: &mut Vec<argon2::Block>,
    ) -> Option<Identity> {
        let (hash, account) = match self.accounts.get(user) {
            Some(a) => (a.hash.as_str(), Some(a)),
            None => (self.decoy.as_str(), None),
        };
        let ok = check_password(hash, password, memory);
        match (ok, account) {
            (true, Some(a)) => Some(Identity {
                user: user.to_string(),
                tenant: a.tenant.clone(),
            }),
            _ => None,
        }
    }
}

/// Does `password` match the PHC-format argon2 `hash`? The working memory
/// comes from `memory`; the comparison is constant-time (`Output`'s `==`).
fn check_password(hash: &str, password: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(h.algorithm) else {
        return false;
    };
    let version = match h.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&h) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::new());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .is_ok()
        && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
}

/// Why the throttle refuses an AUTH before the password is even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lockout {
    /// Too many failures from this client address (an IPv6 client's /64).
    Address,
    /// Too many failures for this user name, from addresses it has not
    /// logged in from: a guessing attack spread over many addresses.
    User,
}

/// The throttle's limits, replaced on SIGHUP; the counts stay.
#[derive(Debug, Clone, Copy)]
struct Limits {
    per_address: u32,
    per_user: u32,
    window: Duration,
}

/// Counts failed AUTH attempts per client address and per user name within
/// a window, and remembers where each user last logged in, so that a
/// guessing attack on one account from many addresses locks the attackers
/// out without locking out the account's own clients.
#[derive(Debug)]
pub struct AuthThrottle {
    limits: Mutex<Limits>,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    by_address: HashMap<IpAddr, VecDeque<Instant>>,
    by_user: HashMap<String, VecDeque<Instant>>,
    /// (user, address) → the last successful login.
    known: HashMap<(String, IpAddr), Instant>,
}

/// Entries tracked at most per map; beyond this the stale ones are dropped
/// (and if none is stale, all), so an attacker spraying from many
/// addresses or user names cannot exhaust memory.
const MAX_TRACKED: usize = 100_000;

/// How long a successful login from an address keeps that address exempt
/// from its user's lockout.
const KNOWN_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// User names are kept to this many bytes: a client picks them.
const MAX_USER_KEY: usize = 256;

/// The unit an address is counted in: one IPv4 address, or the /64 an
/// IPv6 address is in (one host usually holds a whole /64). IPv4-mapped
/// IPv6 addresses count as the IPv4 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

fn user_key(user: &str) -> String {
    let mut end = user.len().min(MAX_USER_KEY);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user[..end].to_string()
}

fn prune(q: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while q
        .front()
        .is_some_and(|&t| now.saturating_duration_since(t) >= window)
    {
        q.pop_front();
    }
}

/// Adds a failure at `now` under `key`, keeping the map bounded.
fn count<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, VecDeque<Instant>>,
    key: K,
    window: Duration,
    now: Instant,
) {
    if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
        map.retain(|_, q| {
            prune(q, window, now);
            !q.is_empty()
        });
        if map.len() >= MAX_TRACKED {
            map.clear();
        }
    }
    let q = map.entry(key).or_default();
    prune(q, window, now);
    q.push_back(now);
}

fn reached<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, VecDeque<Instant>>,
    key: &K,
    max: u32,
    window: Duration,
    now: Instant,
) -> bool {
    map.get_mut(key).is_some_and(|q| {
        prune(q, window, now);
        q.len() as u32 >= max
    })
}

impl AuthThrottle {
    pub fn new(per_address: u32, per_user: u32, window: Duration) -> Self {
        AuthThrottle {
            limits: Mutex::new(Limits {
                per_address,
                per_user,
                window,
            }),
            state: Mutex::new(Counts::default()),
        }
    }

    /// New limits (SIGHUP): the failures counted so far still count.
    pub fn set_limits(&self, per_address: u32, per_user: u32, window: Duration) {
        *self.limits.lock().expect("throttle lock") = Limits {
            per_address,
            per_user,
            window,
        };
    }

    fn limits(&self) -> Limits {
        *self.limits.lock().expect("throttle lock")
    }

    /// Is an AUTH as `user` from `ip` refused before its password is
    /// checked? The same answer whether or not the user exists, so the
    /// lockout tells a guesser nothing about the accounts.
    pub fn check(&self, ip: IpAddr, user: &str, now: Instant) -> Option<Lockout> {
        let l = self.limits();
        let source = source_of(ip);
        let mut c = self.state.lock().expect("throttle lock");
        if reached(&mut c.by_address, &source, l.per_address, l.window, now) {
            return Some(Lockout::Address);
        }
        let user = user_key(user);
        if reached(&mut c.by_user, &user, l.per_user, l.window, now) {
            let known = c
                .known
                .get(&(user, source))
                .is_some_and(|&t| now.saturating_duration_since(t) < KNOWN_FOR);
            if !known {
                return Some(Lockout::User);
            }
        }
        None
    }

    pub fn record_failure(&self, ip: IpAddr, user: &str, now: Instant) {
        let l = self.limits();
        let mut c = self.state.lock().expect("throttle lock");
        count(&mut c.by_address, source_of(ip), l.window, now);
        count(&mut c.by_user, user_key(user), l.window, now);
    }

    /// A login succeeded: its address stays exempt from its user's lockout
    /// for a week.
    pub fn record_success(&self, ip: IpAddr, user: &str, now: Instant) {
        let mut c = self.state.lock().expect("throttle lock");
        if c.known.len() >= MAX_TRACKED {
            c.known
                .retain(|_, t| now.saturating_duration_since(*t) < KNOWN_FOR);
            if c.known.len() >= MAX_TRACKED {
                c.known.clear();
            }
        }
        c.known.insert((user_key(user), source_of(ip)), now);
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
    fn throttle_locks_an_address_after_max_failures_within_the_window() {
        let t = AuthThrottle::new(3, 1000, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(t.check(ip, "u", t0 + Duration::from_secs(i)), None);
            t.record_failure(ip, "u", t0 + Duration::from_secs(i));
        }
        let at3 = t0 + Duration::from_secs(3);
        assert_eq!(t.check(ip, "u", at3), Some(Lockout::Address));
        // Whatever user it tries next.
        assert_eq!(t.check(ip, "v", at3), Some(Lockout::Address));
        assert_eq!(t.check(other, "u", at3), None);
        // The first failure leaves the window at t0+60.
        assert_eq!(t.check(ip, "u", t0 + Duration::from_secs(60)), None);
        // A lowered limit (SIGHUP) keeps the counts: the two failures still
        // in the window and one more reach 3 of 3.
        t.set_limits(3, 1000, Duration::from_secs(120));
        assert_eq!(t.check(ip, "u", t0 + Duration::from_secs(60)), None);
        t.record_failure(ip, "u", t0 + Duration::from_secs(60));
        let at61 = t0 + Duration::from_secs(61);
        assert_eq!(t.check(ip, "u", at61), Some(Lockout::Address));
        t.set_limits(4, 1000, Duration::from_secs(120));
        assert_eq!(t.check(ip, "u", at61), None);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let t = AuthThrottle::new(2, 1000, Duration::from_secs(60));
        let now = Instant::now();
        t.record_failure("2001:db8:1:2::1".parse().unwrap(), "u", now);
        t.record_failure("2001:db8:1:2:ffff::7".parse().unwrap(), "u", now);
        let same_64: IpAddr = "2001:db8:1:2:abcd::9".parse().unwrap();
        assert_eq!(t.check(same_64, "u", now), Some(Lockout::Address));
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.check(next_64, "u", now), None);
        // An IPv4-mapped address is the IPv4 address.
        let v4: IpAddr = "192.0.2.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(source_of(mapped), v4);
    }

    #[test]
    fn guessing_one_user_from_many_addresses_locks_out_all_but_its_known_addresses() {
        let t = AuthThrottle::new(3, 5, Duration::from_secs(60));
        let now = Instant::now();
        let home: IpAddr = "198.51.100.7".parse().unwrap();
        t.record_success(home, "acme-app", now);
        // Five guesses from five addresses: none reaches its address limit.
        for i in 0..5u8 {
            let ip = IpAddr::from([203, 0, 113, i]);
            assert_eq!(t.check(ip, "acme-app", now), None);
            t.record_failure(ip, "acme-app", now);
        }
        // A sixth address is refused for this user, even before its
        // password is checked...
        let new = IpAddr::from([203, 0, 113, 99]);
        assert_eq!(t.check(new, "acme-app", now), Some(Lockout::User));
        // ...but may try another user, and the user's own client, which
        // logged in before, is not locked out.
        assert_eq!(t.check(new, "bank-app", now), None);
        assert_eq!(t.check(home, "acme-app", now), None);
        // A known address stops being known after a week.
        let later = now + KNOWN_FOR;
        for i in 0..5u8 {
            t.record_failure(IpAddr::from([203, 0, 113, i]), "acme-app", later);
        }
        assert_eq!(t.check(home, "acme-app", later), Some(Lockout::User));
        // The user's failures leave the window like the address's.
        assert_eq!(
            t.check(new, "acme-app", later + Duration::from_secs(60)),
            None
        );
    }

    #[test]
    fn user_names_are_kept_bounded() {
        let t = AuthThrottle::new(100, 1, Duration::from_secs(60));
        let now = Instant::now();
        let long = "é".repeat(1000);
        t.record_failure("192.0.2.1".parse().unwrap(), &long, now);
        // Counted under its first 256 bytes, cut at a character boundary.
        let prefix = format!("{}x", "é".repeat(128));
        assert_eq!(
            t.check("192.0.2.2".parse().unwrap(), &prefix, now),
            Some(Lockout::User)
        );
    }
}
