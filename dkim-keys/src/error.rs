//! The crate's typed error: every variant names the file and the reason.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("DKIM key file {} does not exist", path.display())]
    Missing { path: PathBuf },

    #[error("cannot read DKIM key file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "DKIM key file {} has loose permissions {mode:04o}: private keys must not be accessible to others or writable by the group (chmod 600 {})",
        path.display(),
        path.display()
    )]
    LoosePermissions { path: PathBuf, mode: u32 },

    #[error("DKIM key file {} is not a private key: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },

    #[error("DKIM key file {} holds an {found} key, but the configuration says {configured}", path.display())]
    AlgorithmMismatch {
        path: PathBuf,
        configured: &'static str,
        found: &'static str,
    },

    /// An RSA key under 1024 bits (RFC 8301 §3.2).
    #[error(
        "DKIM key file {} holds a {bits}-bit RSA key, which is refused: RFC 8301 §3.2 forbids RSA keys under 1024 bits; generate a new 2048-bit one with `mta dkim generate`",
        path.display()
    )]
    Forbidden { path: PathBuf, bits: usize },

    /// An RSA key of 1024 to 2047 bits: allowed by RFC 8301, but aws-lc-rs
    /// cannot sign with it.
    #[error(
        "DKIM key file {} holds a {bits}-bit RSA key, which cannot be used: aws-lc-rs, which signs the mail, takes RSA keys of 2048 bits or more, as receivers such as Gmail expect (RFC 8301 recommends at least 2048); generate a new one with `mta dkim generate`",
        path.display()
    )]
    TooSmall { path: PathBuf, bits: usize },

    #[error("{} exists already: choose another selector or remove the old key first", path.display())]
    Exists { path: PathBuf },

    #[error("cannot write DKIM key file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot generate a key: {0}")]
    Generate(String),

    #[error("{0}")]
    Config(String),
}
