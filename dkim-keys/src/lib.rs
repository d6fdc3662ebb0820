//! DKIM keys for the mta (RFC 6376, RFC 8301, RFC 8463).
//!
//! This crate owns the keys, not the signing of messages:
//!
//! - [`PrivateKey`]: generation (RSA 2048/3072/4096 and Ed25519), PEM key
//!   files written 0600, loading with checks (missing, unreadable, loose
//!   permissions, unparsable, too small), PKCS#8 and PKCS#1 (as
//!   opendkim-genkey writes).
//! - [`record`]: the DNS TXT record of a key, split into 255-octet strings
//!   for zone files; parsing a published record and comparing it with a key
//!   (matching, different key, missing, syntax error, revoked).
//! - [`KeyRing`]: the configured keys, loaded and checked together, handing
//!   the active keys of a domain to the signing step in `mta`, which builds
//!   and canonicalizes the signature and calls [`PrivateKey::sign`] for the
//!   cryptographic primitive (aws-lc-rs).
//!
//! Trust boundary: key files and configuration are trusted input from the
//! operator; published DNS records are untrusted and only ever compared.

mod algorithm;
mod error;
mod key;
pub mod record;
mod ring;

pub use algorithm::Algorithm;
pub use error::KeyError;
pub use key::{PrivateKey, key_file_name, key_path};
pub use record::Publication;
pub use ring::{KeyRing, KeySpec, RingKey, check_selector};
