//! Private keys: generation, PEM key files, loading with permission checks,
//! and the public key a DNS record publishes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::algorithm::Algorithm;
use crate::error::KeyError;

/// The parsed key, ready to sign.
enum Pair {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A private key and what is known about it.
pub struct PrivateKey {
    pair: Pair,
    pub algorithm: Algorithm,
    /// Modulus size for RSA; 256 for Ed25519.
    pub bits: usize,
    /// The key as PKCS#8 or PKCS#1 DER.
    der: PrivateKeyDer<'static>,
    /// What `p=` publishes: SubjectPublicKeyInfo DER for RSA (as
    /// opendkim-genkey writes it), the raw 32 bytes for Ed25519 (RFC 8463).
    pub public_key: Vec<u8>,
    /// RSA only: the bare RSAPublicKey (PKCS#1), which some zones publish instead.
    pub public_key_pkcs1: Option<Vec<u8>>,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits.
const MIN_RSA_BITS: usize = 1024;

/// The smallest RSA key aws-lc-rs parses for signing (and RFC 8301's
/// SHOULD); 1024..2047-bit keys are allowed by the RFC but cannot be used.
const SIGNABLE_RSA_BITS: usize = 2048;

/// The conventional file name of a key: `<domain>.<selector>.pem`.
pub fn key_file_name(domain: &str, selector: &str) -> String {
    format!("{domain}.{selector}.pem")
}

impl PrivateKey {
    /// A new key. RSA keys are generated at 2048 (the usual size), 3072 or
    /// 4096 bits; any other size is refused with the reason:
    ///
    /// - under 1024 bits: RFC 8301 §3.2 forbids them;
    /// - 1024 to 2047 bits: aws-lc-rs, which signs the mail, neither
    ///   generates nor signs with RSA keys under 2048 bits (its `KeySize`
    ///   offers 2048, 3072, 4096 and 8192), so such a key could not be used;
    /// - anything else: not offered (8192-bit records are long and slow to
    ///   verify, and odd sizes gain nothing).
    pub fn generate(algorithm: Algorithm, bits: usize) -> Result<PrivateKey, KeyError> {
        let der = match algorithm {
            Algorithm::RsaSha256 => {
                let size = match bits {
                    2048 => KeySize::Rsa2048,
                    3072 => KeySize::Rsa3072,
                    4096 => KeySize::Rsa4096,
                    b if b < MIN_RSA_BITS => {
                        return Err(KeyError::Generate(format!(
                            "{b}-bit RSA keys are refused: RFC 8301 §3.2 forbids RSA keys under 1024 bits; use 2048 (the default), 3072 or 4096 bits"
                        )));
                    }
                    b if b < SIGNABLE_RSA_BITS => {
                        return Err(KeyError::Generate(format!(
                            "{b}-bit RSA keys cannot be generated: aws-lc-rs, which signs the mail, generates RSA keys of 2048, 3072, 4096 or 8192 bits only and cannot sign with keys under 2048 bits; use 2048 (the default), 3072 or 4096 bits (receivers such as Gmail expect 2048 bits, and RFC 8301 recommends at least 2048)"
                        )));
                    }
                    b => {
                        return Err(KeyError::Generate(format!(
                            "{b}-bit RSA keys are not offered: use 2048 (the default), 3072 or 4096 bits"
                        )));
                    }
                };
                let pair =
                    RsaKeyPair::generate(size).map_err(|e| KeyError::Generate(e.to_string()))?;
                let doc: Pkcs8V1Der = pair
                    .as_der()
                    .map_err(|e| KeyError::Generate(e.to_string()))?;
                doc.as_ref().to_vec()
            }
            Algorithm::Ed25519Sha256 => {
                let pair =
                    Ed25519KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
                let doc: Pkcs8V1Der = pair
                    .as_der()
                    .map_err(|e| KeyError::Generate(e.to_string()))?;
                doc.as_ref().to_vec()
            }
        };
        Self::from_der(PrivateKeyDer::Pkcs8(der.into()), Path::new("<generated>"))
    }

    /// Reads a key from DER, learning its algorithm and public key.
    fn from_der(der: PrivateKeyDer<'static>, path: &Path) -> Result<PrivateKey, KeyError> {
        let parse = |reason: String| KeyError::Parse {
            path: path.to_path_buf(),
            reason,
        };
        let as_rsa = match &der {
            PrivateKeyDer::Pkcs8(d) => RsaKeyPair::from_pkcs8(d.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(d) => RsaKeyPair::from_der(d.secret_pkcs1_der()),
            _ => {
                return Err(parse(
                    "only PKCS#8 and PKCS#1 (RSA) keys are supported".into(),
                ));
            }
        };
        match as_rsa {
            Ok(pair) => {
                let public = pair.public_key();
                let spki: PublicKeyX509Der = public.as_der().map_err(|e| parse(e.to_string()))?;
                Ok(PrivateKey {
                    algorithm: Algorithm::RsaSha256,
                    bits: pair.public_modulus_len() * 8,
                    public_key: spki.as_ref().to_vec(),
                    public_key_pkcs1: Some(public.as_ref().to_vec()),
                    der,
                    pair: Pair::Rsa(pair),
                })
            }
            Err(rsa_err) => {
                if rsa_err.to_string().contains("TooSmall") {
                    let path = path.to_path_buf();
                    return Err(match rsa_bits_of(&der) {
                        Some(bits) if bits < MIN_RSA_BITS => KeyError::Forbidden { path, bits },
                        Some(bits) => KeyError::TooSmall { path, bits },
                        None => KeyError::Parse {
                            path,
                            reason: "an RSA key under 2048 bits, which aws-lc-rs cannot sign with"
                                .into(),
                        },
                    });
                }
                let PrivateKeyDer::Pkcs8(d) = &der else {
                    return Err(parse(format!("not a usable RSA key ({rsa_err})")));
                };
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(d.secret_pkcs8_der())
                    .map_err(|e| {
                        parse(format!(
                            "neither an RSA nor an Ed25519 key ({rsa_err}; {e})"
                        ))
                    })?;
                Ok(PrivateKey {
                    algorithm: Algorithm::Ed25519Sha256,
                    bits: 256,
                    public_key: pair.public_key().as_ref().to_vec(),
                    public_key_pkcs1: None,
                    der,
                    pair: Pair::Ed25519(pair),
                })
            }
        }
    }

    /// The key as a PEM file body.
    pub fn to_pem(&self) -> String {
        let (label, der) = match &self.der {
            PrivateKeyDer::Pkcs1(d) => ("RSA PRIVATE KEY", d.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(d) => ("PRIVATE KEY", d.secret_pkcs8_der()),
            _ => unreachable!("only PKCS#1 and PKCS#8 are held"),
        };
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// Writes the key to a new file readable by its owner only (0600).
    /// An existing file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_path_buf(),
                },
                _ => KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        f.write_all(self.to_pem().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Loads a key file: it must exist, be readable, not be accessible to
    /// others (nor writable by the group), and hold a PKCS#8 or PKCS#1 RSA
    /// key or an Ed25519 key. RSA keys under 1024 bits are refused as RFC
    /// 8301 §3.2 forbids them ([`KeyError::Forbidden`]); 1024 to 2047 bits
    /// are refused as aws-lc-rs cannot sign with them ([`KeyError::TooSmall`]).
    pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => KeyError::Missing {
                path: path.to_path_buf(),
            },
            _ => KeyError::Unreadable {
                path: path.to_path_buf(),
                source,
            },
        })?;
        if !meta.is_file() {
            return Err(KeyError::Unreadable {
                path: path.to_path_buf(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o027 != 0 {
            return Err(KeyError::LoosePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| KeyError::Parse {
            path: path.to_path_buf(),
            reason: format!("no PEM private key found ({e})"),
        })?;
        Self::from_der(der, path)
    }

    /// Signs the data of a DKIM signature (RFC 6376 §3.7: the canonical
    /// headers followed by the canonical DKIM-Signature field without its
    /// `b=` value). RSA-SHA256 is RSASSA-PKCS1-v1_5 over SHA-256 of the
    /// data; Ed25519-SHA256 signs the SHA-256 hash of the data (RFC 8463 §3).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.pair {
            Pair::Rsa(pair) => {
                let mut signature = vec![0u8; pair.public_modulus_len()];
                pair.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    data,
                    &mut signature,
                )
                .map_err(|e| KeyError::Generate(format!("RSA signing failed: {e}")))?;
                Ok(signature)
            }
            Pair::Ed25519(pair) => {
                let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
                Ok(pair.sign(hash.as_ref()).as_ref().to_vec())
            }
        }
    }
}

/// The modulus size of an RSA key the library refused, read from its DER
/// (for the error message only).
fn rsa_bits_of(der: &PrivateKeyDer<'_>) -> Option<usize> {
    // RSAPrivateKey ::= SEQUENCE { version INTEGER, modulus INTEGER, ... };
    // PKCS#8 wraps it in an OCTET STRING after the algorithm identifier.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        Some((tag, b.get(hdr..hdr + len)?, b.get(hdr + len..)?))
    }
    let pkcs1 = match der {
        PrivateKeyDer::Pkcs1(d) => d.secret_pkcs1_der().to_vec(),
        PrivateKeyDer::Pkcs8(d) => {
            let (_, seq, _) = tlv(d.secret_pkcs8_der())?;
            let (_, _, rest) = tlv(seq)?; // version
            let (_, _, rest) = tlv(rest)?; // algorithm
            let (_, octets, _) = tlv(rest)?;
            octets.to_vec()
        }
        _ => return None,
    };
    let (_, seq, _) = tlv(&pkcs1)?;
    let (_, _, rest) = tlv(seq)?; // version
    let (_, modulus, _) = tlv(rest)?;
    let significant: Vec<u8> = modulus.iter().copied().skip_while(|&b| b == 0).collect();
    let first = *significant.first()?;
    Some(significant.len() * 8 - first.leading_zeros() as usize)
}

/// Where a key of a domain and selector lives in a keys directory.
pub fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(key_file_name(domain, selector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_their_pem_file() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, bits) in [
            (Algorithm::RsaSha256, 2048),
            (Algorithm::Ed25519Sha256, 256),
        ] {
            let key = PrivateKey::generate(alg, bits).unwrap();
            assert_eq!(key.algorithm, alg);
            assert_eq!(key.bits, bits);
            let path = dir.path().join(format!("{alg}.pem"));
            key.write_new(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(
                std::fs::read_to_string(&path)
                    .unwrap()
                    .starts_with("-----BEGIN PRIVATE KEY-----")
            );
            let loaded = PrivateKey::load(&path).unwrap();
            assert_eq!(loaded.algorithm, alg);
            assert_eq!(loaded.public_key, key.public_key);
            assert!(!loaded.sign(b"data").unwrap().is_empty());
            assert!(matches!(key.write_new(&path), Err(KeyError::Exists { .. })));
        }
    }

    #[test]
    fn rsa_public_key_is_published_as_subject_public_key_info() {
        let key = PrivateKey::generate(Algorithm::RsaSha256, 2048).unwrap();
        // SEQUENCE { SEQUENCE { rsaEncryption OID ...
        assert_eq!(&key.public_key[..4], &[0x30, 0x82, 0x01, 0x22]);
        assert!(key.public_key_pkcs1.as_ref().unwrap().len() < key.public_key.len());
        let ed = PrivateKey::generate(Algorithm::Ed25519Sha256, 256).unwrap();
        assert_eq!(ed.public_key.len(), 32);
    }

    #[test]
    fn generation_refuses_rsa_under_1024_bits_and_sizes_it_cannot_sign_with() {
        for b in [0, 512, 1023] {
            let e = PrivateKey::generate(Algorithm::RsaSha256, b).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains("refused")
                    && m.contains("RFC 8301 §3.2 forbids RSA keys under 1024 bits"),
                "{m}"
            );
        }
        // RFC 8301 allows 1024..2047, but aws-lc-rs can neither make nor use them.
        for b in [1024, 1536, 2047] {
            let m = PrivateKey::generate(Algorithm::RsaSha256, b)
                .unwrap_err()
                .to_string();
            assert!(
                m.contains("cannot be generated")
                    && m.contains("aws-lc-rs")
                    && m.contains("use 2048 (the default), 3072 or 4096")
                    && m.contains("Gmail"),
                "{m}"
            );
        }
        for b in [2049, 2500, 8192] {
            let m = PrivateKey::generate(Algorithm::RsaSha256, b)
                .unwrap_err()
                .to_string();
            assert!(m.contains("not offered") && m.contains("2048"), "{m}");
        }
        let k = PrivateKey::generate(Algorithm::RsaSha256, 3072).unwrap();
        assert_eq!((k.algorithm, k.bits), (Algorithm::RsaSha256, 3072));
    }

    fn write(dir: &Path, name: &str, body: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn load_names_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        assert!(matches!(
            PrivateKey::load(&missing),
            Err(KeyError::Missing { .. })
        ));
        let key = PrivateKey::generate(Algorithm::Ed25519Sha256, 256).unwrap();
        let loose = write(dir.path(), "loose.pem", key.to_pem().as_bytes(), 0o644);
        let e = PrivateKey::load(&loose).unwrap_err();
        assert!(
            matches!(e, KeyError::LoosePermissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("loose.pem") && e.to_string().contains("chmod 600"));
        // Group-readable is fine (root:mta 0640 is a common layout).
        let grp = write(dir.path(), "group.pem", key.to_pem().as_bytes(), 0o640);
        PrivateKey::load(&grp).unwrap();
        let junk = write(dir.path(), "junk.pem", b"not a key\n", 0o600);
        let e = PrivateKey::load(&junk).unwrap_err();
        assert!(matches!(e, KeyError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("junk.pem"));
        let e = PrivateKey::load(dir.path()).unwrap_err();
        assert!(matches!(e, KeyError::Unreadable { .. }), "{e}");
    }

    /// A key made by `openssl genrsa` (PKCS#8 by default, PKCS#1 with
    /// `-traditional`, as opendkim-genkey writes them).
    fn openssl_genrsa(dir: &Path, name: &str, bits: usize, pkcs1: bool) -> PathBuf {
        let mut args = vec!["genrsa"];
        if pkcs1 {
            args.push("-traditional");
        }
        let bits = bits.to_string();
        args.push(&bits);
        let out = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl is needed for this test (Debian: apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl genrsa {bits}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        write(dir, name, &out.stdout, 0o600)
    }

    #[test]
    fn openssl_style_2048_bit_keys_load_as_pkcs1_and_pkcs8() {
        let dir = tempfile::tempdir().unwrap();
        let pkcs1 = openssl_genrsa(dir.path(), "pkcs1.pem", 2048, true);
        assert!(
            std::fs::read_to_string(&pkcs1)
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );
        let k = PrivateKey::load(&pkcs1).unwrap();
        assert_eq!((k.algorithm, k.bits), (Algorithm::RsaSha256, 2048));
        assert_eq!(k.sign(b"data").unwrap().len(), 256);
        let pkcs8 = openssl_genrsa(dir.path(), "pkcs8.pem", 2048, false);
        let k = PrivateKey::load(&pkcs8).unwrap();
        assert_eq!((k.algorithm, k.bits), (Algorithm::RsaSha256, 2048));
    }

    #[test]
    fn rsa_keys_under_1024_bits_are_refused_on_load_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pkcs1) in [("tiny-pkcs1.pem", true), ("tiny-pkcs8.pem", false)] {
            let path = openssl_genrsa(dir.path(), name, 512, pkcs1);
            let e = PrivateKey::load(&path).unwrap_err();
            assert!(matches!(e, KeyError::Forbidden { bits: 512, .. }), "{e}");
            let m = e.to_string();
            assert!(
                m.contains(name) && m.contains("RFC 8301 §3.2 forbids RSA keys under 1024 bits"),
                "{m}"
            );
        }
        // The size is exact, not rounded to bytes.
        let path = openssl_genrsa(dir.path(), "odd.pem", 1020, true);
        let e = PrivateKey::load(&path).unwrap_err();
        assert!(matches!(e, KeyError::Forbidden { bits: 1020, .. }), "{e}");
    }

    #[test]
    fn rsa_keys_of_1024_to_2047_bits_are_refused_on_load_with_the_reason() {
        // RFC 8301 allows them (with a SHOULD for 2048), but aws-lc-rs
        // rejects them for signing, so they cannot load with a warning.
        let dir = tempfile::tempdir().unwrap();
        for (name, bits, pkcs1) in [
            ("old-opendkim.pem", 1024, true),
            ("old-pkcs8.pem", 1024, false),
            ("mid.pem", 1536, true),
        ] {
            let path = openssl_genrsa(dir.path(), name, bits, pkcs1);
            let e = PrivateKey::load(&path).unwrap_err();
            assert!(
                matches!(e, KeyError::TooSmall { bits: b, .. } if b == bits),
                "{e}"
            );
            let m = e.to_string();
            assert!(
                m.contains(name)
                    && m.contains(&format!("{bits}-bit"))
                    && m.contains("aws-lc-rs")
                    && m.contains("Gmail")
                    && m.contains("mta dkim generate"),
                "{m}"
            );
        }
    }
}
