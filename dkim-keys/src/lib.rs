//! DKIM keys for the mta (RFC 6376, RFC 8463).
//!
//! This crate will own key generation (RSA 2048+ and Ed25519), key files,
//! rendering the DNS TXT record, checking a published record against a key,
//! and the key ring that hands signers to the signing step. It is empty until
//! the DKIM issue lands; reception does not sign yet.
