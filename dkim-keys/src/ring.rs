//! The key ring: every configured key, loaded and checked, and the active
//! signers for a domain. Loaded once at start and again on reload; a key
//! that fails to load fails the whole load, so a reload keeps the old ring.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::algorithm::Algorithm;
use crate::error::KeyError;
use crate::key::PrivateKey;

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The signing domain (`d=`), lower case.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    pub algorithm: Algorithm,
    pub path: PathBuf,
    /// Published but not used for new mail when false (rotation).
    pub active: bool,
}

/// A loaded key.
pub struct RingKey {
    pub spec: KeySpec,
    pub bits: usize,
    /// The key: it signs, and its public half is what `p=` publishes.
    pub key: PrivateKey,
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingKey")
            .field("spec", &self.spec)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: Vec<Arc<RingKey>>,
}

/// A valid selector: RFC 6376 §3.1, sub-domains of letters, digits, hyphens.
pub fn check_selector(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{s}' is not a selector: use letters, digits and hyphens, like s2026a"
        ))
    }
}

impl KeyRing {
    /// Loads and checks every key.
    pub fn load(specs: &[KeySpec]) -> Result<KeyRing, KeyError> {
        let mut seen = HashSet::new();
        let mut active = HashSet::new();
        let mut keys = Vec::with_capacity(specs.len());
        for spec in specs {
            check_selector(&spec.selector).map_err(KeyError::Config)?;
            if !seen.insert((spec.domain.clone(), spec.selector.clone())) {
                return Err(KeyError::Config(format!(
                    "[[dkim.keys]] lists selector {} of {} twice",
                    spec.selector, spec.domain
                )));
            }
            if spec.active && !active.insert((spec.domain.clone(), spec.algorithm)) {
                return Err(KeyError::Config(format!(
                    "{} has two active {} keys: mark the old one `active = false` (published, not used)",
                    spec.domain, spec.algorithm
                )));
            }
            let key = PrivateKey::load(&spec.path)?;
            if key.algorithm != spec.algorithm {
                return Err(KeyError::AlgorithmMismatch {
                    path: spec.path.clone(),
                    configured: spec.algorithm.name(),
                    found: key.algorithm.name(),
                });
            }
            keys.push(Arc::new(RingKey {
                spec: spec.clone(),
                bits: key.bits,
                key,
            }));
        }
        Ok(KeyRing { keys })
    }

    /// Every configured key, in configuration order.
    pub fn keys(&self) -> &[Arc<RingKey>] {
        &self.keys
    }

    /// The active keys of a signing domain (at most one per algorithm).
    pub fn active_for(&self, domain: &str) -> Vec<Arc<RingKey>> {
        self.keys
            .iter()
            .filter(|k| k.spec.active && k.spec.domain.eq_ignore_ascii_case(domain))
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        dir: &std::path::Path,
        domain: &str,
        selector: &str,
        alg: Algorithm,
        active: bool,
    ) -> KeySpec {
        let path = dir.join(crate::key::key_file_name(domain, selector));
        if !path.exists() {
            PrivateKey::generate(
                alg,
                if alg == Algorithm::RsaSha256 {
                    2048
                } else {
                    256
                },
            )
            .unwrap()
            .write_new(&path)
            .unwrap();
        }
        KeySpec {
            domain: domain.into(),
            selector: selector.into(),
            algorithm: alg,
            path,
            active,
        }
    }

    #[test]
    fn dual_signing_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ring = KeyRing::load(&[
            spec(d, "acme.example", "rsa1", Algorithm::RsaSha256, true),
            spec(d, "acme.example", "ed1", Algorithm::Ed25519Sha256, true),
            spec(d, "acme.example", "rsa0", Algorithm::RsaSha256, false),
            spec(d, "bank.example", "s1", Algorithm::Ed25519Sha256, true),
        ])
        .unwrap();
        let active: Vec<_> = ring
            .active_for("ACME.example")
            .iter()
            .map(|k| k.spec.selector.clone())
            .collect();
        assert_eq!(active, ["rsa1", "ed1"]);
        assert_eq!(ring.active_for("other.example").len(), 0);
        assert_eq!(ring.keys().len(), 4);
    }

    #[test]
    fn configuration_mistakes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let two_active = KeyRing::load(&[
            spec(d, "acme.example", "a", Algorithm::RsaSha256, true),
            spec(d, "acme.example", "b", Algorithm::RsaSha256, true),
        ]);
        assert!(
            two_active
                .unwrap_err()
                .to_string()
                .contains("active = false")
        );
        let twice = KeyRing::load(&[
            spec(d, "acme.example", "a", Algorithm::RsaSha256, true),
            spec(d, "acme.example", "a", Algorithm::RsaSha256, false),
        ]);
        assert!(twice.unwrap_err().to_string().contains("twice"));
        let mut wrong = spec(d, "acme.example", "e", Algorithm::Ed25519Sha256, true);
        wrong.algorithm = Algorithm::RsaSha256;
        let e = KeyRing::load(&[wrong]).unwrap_err();
        assert!(matches!(e, KeyError::AlgorithmMismatch { .. }), "{e}");
        let mut bad_selector = spec(d, "acme.example", "a", Algorithm::RsaSha256, true);
        bad_selector.selector = "no spaces".into();
        assert!(KeyRing::load(&[bad_selector]).is_err());
    }
}
