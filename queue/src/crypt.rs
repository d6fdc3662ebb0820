//! Encryption at rest: the queue's keys, their file, and sealing.
//!
//! **Algorithm.** AES-256-GCM-SIV (RFC 8452) from aws-lc-rs, with a random
//! 96-bit nonce drawn for every seal. The queue seals an envelope again at
//! every change of state (each attempt, hold, release), so one key seals
//! many more records than messages; GCM-SIV derives a fresh key per nonce
//! and, should two random nonces ever meet, reveals only that the two
//! plaintexts were equal, where plain GCM would lose its authentication.
//! It also needs no counter to survive restarts or restores from backup,
//! which a counter-based nonce would repeat.
//!
//! **Sealed form** (the same for envelopes and content):
//! `key id (8) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The associated data
//! is chosen by the caller and always names what the bytes are and the
//! queue ID they belong to (see `record.rs` and `store.rs`), so a sealed
//! envelope or content cannot be moved to another message, and an
//! envelope cannot pass for content.
//!
//! **Key id.** The first 8 bytes of SHA-256 over a label and the key:
//! stable, says nothing usable about the key, and tells which key of the
//! ring opens a record.
//!
//! **Key file.** Text: one key per line as 64 hexadecimal characters
//! (32 random bytes); blank lines and lines starting with `#` are ignored.
//! The first key is current (it seals); the others only open records
//! sealed before a rotation. The file must not be readable by group or
//! others (mode 0600 or stricter). It is written whole, by a rename, so a
//! crash leaves the old or the new ring, never a mix.
//!
//! Trust boundary: key bytes live only in the aws-lc-rs key objects and in
//! the key file; nothing here prints or logs them (`Debug` shows ids).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// A sealed form starts with this many bytes: the key's ID, the nonce.
pub(crate) const SEALED_PREFIX: usize = KeyId::LEN + NONCE_LEN;
/// Bytes a sealed form adds to its plaintext.
pub(crate) const OVERHEAD: usize = KeyId::LEN + NONCE_LEN + TAG_LEN;

/// Names a key without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub const LEN: usize = 8;

    fn of(key: &[u8; KEY_LEN]) -> KeyId {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"mta queue key id\0");
        ctx.update(key);
        let digest = ctx.finish();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        KeyId(id)
    }

    /// The id at the start of a sealed form.
    pub(crate) fn of_sealed(sealed: &[u8]) -> Option<KeyId> {
        Some(KeyId(sealed.get(..Self::LEN)?.try_into().ok()?))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// What is wrong with a key file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the queue key file {} does not exist: create it with `mta queue generate-key {}` (or point [queue] encryption_key_file at the key the queue was written with)",
        path.display(), path.display()
    )]
    Missing { path: PathBuf },
    #[error("cannot read the queue key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error(
        "the queue key file {} has mode {mode:04o}: it must not be readable by group or others; run `chmod 600 {}`",
        path.display(), path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the queue key file {} line {line}: {reason}", path.display())]
    Format {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "the queue key file {} holds no key: each key is a line of 64 hexadecimal characters (make one with `mta queue generate-key FILE`)",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error("cannot write the queue key file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("the system's random number generator failed")]
    Random,
}

struct Key {
    id: KeyId,
    bytes: [u8; KEY_LEN],
    aead: RandomizedNonceKey,
}

impl Key {
    fn new(bytes: [u8; KEY_LEN]) -> Key {
        Key {
            id: KeyId::of(&bytes),
            aead: RandomizedNonceKey::new(&AES_256_GCM_SIV, &bytes)
                .expect("a 32-byte key suits AES-256-GCM-SIV"),
            bytes,
        }
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // The aws-lc-rs context cleans its own copy; volatile so that the
        // compiler keeps these writes to memory about to be freed.
        for b in self.bytes.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Why a sealed form did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Sealed under a key the ring does not hold.
    UnknownKey(KeyId),
    /// The tag did not verify: altered, truncated, or moved from elsewhere.
    Forged(KeyId),
    /// Too short to be a sealed form.
    Truncated,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::UnknownKey(id) => write!(
                f,
                "is sealed with key {id}, which the key file does not hold (add that key back as a line after the current one)"
            ),
            OpenError::Forged(id) => write!(
                f,
                "failed authentication under key {id} (altered on disk, or not this message's)"
            ),
            OpenError::Truncated => write!(f, "is too short to be sealed data"),
        }
    }
}

/// The queue's keys: the current one seals, all of them open.
pub struct QueueKeys {
    keys: Vec<Key>,
    /// Where the ring was read from, for messages.
    path: PathBuf,
}

impl fmt::Debug for QueueKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueKeys")
            .field("path", &self.path)
            .field("ids", &self.ids())
            .finish()
    }
}

fn random_key() -> Result<[u8; KEY_LEN], KeyError> {
    let mut bytes = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| KeyError::Random)?;
    Ok(bytes)
}

fn hex_key(bytes: &[u8; KEY_LEN]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_key(s: &str) -> Result<[u8; KEY_LEN], String> {
    if s.len() != 2 * KEY_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "not a key: expected 64 hexadecimal characters (32 bytes), found {} character(s){}",
            s.chars().count(),
            if s.bytes().all(|b| b.is_ascii_hexdigit()) {
                ""
            } else {
                " that are not all hexadecimal"
            }
        ));
    }
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hexadecimal");
    }
    Ok(out)
}

fn read_err(path: &Path, e: std::io::Error) -> KeyError {
    if e.kind() == std::io::ErrorKind::NotFound {
        KeyError::Missing {
            path: path.to_path_buf(),
        }
    } else {
        KeyError::Read {
            path: path.to_path_buf(),
            source: Arc::new(e),
        }
    }
}

fn write_err(path: &Path, e: std::io::Error) -> KeyError {
    KeyError::Write {
        path: path.to_path_buf(),
        source: Arc::new(e),
    }
}

impl QueueKeys {
    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<QueueKeys, KeyError> {
        let meta = std::fs::metadata(path).map_err(|e| read_err(path, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<QueueKeys, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let format = |reason: String| KeyError::Format {
                path: path.to_path_buf(),
                line: n + 1,
                reason,
            };
            let key = Key::new(parse_hex_key(line).map_err(format)?);
            if keys.iter().any(|k| k.id == key.id) {
                return Err(format(format!("key {} is listed twice", key.id)));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(QueueKeys {
            keys,
            path: path.to_path_buf(),
        })
    }

    /// Creates a key file holding one new random key (mode 0600, durable);
    /// refuses to replace an existing file.
    pub fn generate(path: &Path) -> Result<QueueKeys, KeyError> {
        let key = Key::new(random_key()?);
        write_new(path, &render(std::slice::from_ref(&key)))?;
        Ok(QueueKeys {
            keys: vec![key],
            path: path.to_path_buf(),
        })
    }

    /// Makes the first key of `new_key_file` current in the key file at
    /// `path`, keeping the keys it had (to open older records). Returns
    /// the new ring. A key already in the ring moves to the front.
    pub fn rotate(path: &Path, new_key_file: &Path) -> Result<QueueKeys, KeyError> {
        let ring = Self::load(path)?;
        let new = Self::load(new_key_file)?;
        let first = new.keys[0].id;
        let mut keys = vec![Key::new(new.keys[0].bytes)];
        keys.extend(
            ring.keys
                .iter()
                .filter(|k| k.id != first)
                .map(|k| Key::new(k.bytes)),
        );
        let ring = QueueKeys {
            keys,
            path: path.to_path_buf(),
        };
        ring.store()?;
        Ok(ring)
    }

    /// Removes from the key file every old key not in `keep` (the current
    /// key always stays). Returns the ids removed.
    pub fn retire(path: &Path, keep: &[KeyId]) -> Result<Vec<KeyId>, KeyError> {
        let ring = Self::load(path)?;
        let (mut kept, mut removed) = (Vec::new(), Vec::new());
        for (i, k) in ring.keys.iter().enumerate() {
            if i == 0 || keep.contains(&k.id) {
                kept.push(k);
            } else {
                removed.push(k);
            }
        }
        if removed.is_empty() {
            return Ok(Vec::new());
        }
        let ring2 = QueueKeys {
            keys: kept.iter().map(|k| Key::new(k.bytes)).collect(),
            path: path.to_path_buf(),
        };
        ring2.store()?;
        Ok(removed.iter().map(|k| k.id).collect())
    }

    /// Writes the ring back to its file: a temporary file beside it
    /// (0600), fsynced, renamed over it, and the directory fsynced.
    fn store(&self) -> Result<(), KeyError> {
        let tmp = self.path.with_extension("tmp-new");
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(&tmp, e)),
        }
        write_new(&tmp, &render(&self.keys))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| write_err(&self.path, e))?;
        sync_parent(&self.path)
    }

    /// A 32-byte key for another purpose, derived from the current key and
    /// `label` (HMAC-SHA256), so that no second secret needs keeping: the
    /// transaction log's keyed hashes of erased addresses use it. The
    /// queue key itself never leaves this type.
    pub fn derive(&self, label: &str) -> (KeyId, [u8; 32]) {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.keys[0].bytes);
        let tag = aws_lc_rs::hmac::sign(&key, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        (self.keys[0].id, out)
    }

    /// The key that seals.
    pub fn current(&self) -> KeyId {
        self.keys[0].id
    }

    /// Every key's id, the current one first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// The file the ring came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A ring of one key that lives in no file (tests, benchmarks).
    pub fn ephemeral() -> Result<QueueKeys, KeyError> {
        Ok(QueueKeys {
            keys: vec![Key::new(random_key()?)],
            path: PathBuf::from("(in memory)"),
        })
    }

    /// Seals `plaintext` under the current key with associated data `ad`.
    pub(crate) fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
        self.seal_parts(ad, &[plaintext])
    }

    /// Seals the concatenation of `parts`: the parts are copied once, into
    /// the sealed form, and not joined first.
    pub(crate) fn seal_parts(&self, ad: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        let key = &self.keys[0];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(OVERHEAD + len);
        out.extend_from_slice(&key.id.0);
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        for part in parts {
            out.extend_from_slice(part);
        }
        let (nonce, tag) = key
            .aead
            .seal_in_place_separate_tag(Aad::from(ad), &mut out[KeyId::LEN + NONCE_LEN..])
            .map_err(|_| "sealing failed (the random number generator?)".to_string())?;
        out[KeyId::LEN..KeyId::LEN + NONCE_LEN].copy_from_slice(nonce.as_ref());
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a sealed form in place; returns the plaintext's range in `sealed`.
    pub(crate) fn open_in_place(
        &self,
        ad: &[u8],
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::Truncated);
        }
        let (prefix, rest) = sealed.split_at_mut(SEALED_PREFIX);
        let n = self.open_apart(ad, prefix, rest)?;
        Ok(SEALED_PREFIX..SEALED_PREFIX + n)
    }

    /// Opens a sealed form whose first [`SEALED_PREFIX`] bytes (key ID and
    /// nonce) are `prefix` and whose ciphertext and tag are `rest`, in
    /// place; returns the length of the plaintext at the start of `rest`.
    pub(crate) fn open_apart(
        &self,
        ad: &[u8],
        prefix: &[u8],
        rest: &mut [u8],
    ) -> Result<usize, OpenError> {
        if prefix.len() != SEALED_PREFIX || rest.len() < TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let id = KeyId::of_sealed(prefix).ok_or(OpenError::Truncated)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(OpenError::UnknownKey(id))?;
        let nonce = Nonce::try_assume_unique_for_key(&prefix[KeyId::LEN..])
            .map_err(|_| OpenError::Truncated)?;
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(ad), rest)
            .map_err(|_| OpenError::Forged(id))?;
        Ok(plain.len())
    }

    /// Opens a sealed form into a new buffer.
    pub(crate) fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let mut buf = sealed.to_vec();
        let range = self.open_in_place(ad, &mut buf)?;
        buf.truncate(range.end);
        buf.drain(..range.start);
        Ok(buf)
    }
}

fn render(keys: &[Key]) -> String {
    let mut out = String::from(
        "# mta queue encryption keys: keep this file secret (mode 0600) and out of the data directory.\n\
         # The first key seals new records; the others only open records sealed before a rotation.\n",
    );
    for (i, k) in keys.iter().enumerate() {
        let role = if i == 0 { "current" } else { "old" };
        out.push_str(&format!(
            "# key id {} ({role})\n{}\n",
            k.id,
            hex_key(&k.bytes)
        ));
    }
    out
}

/// Creates `path` (mode 0600, failing if it exists), writes `text` and makes
/// file and name durable.
fn write_new(path: &Path, text: &str) -> Result<(), KeyError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| write_err(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| write_err(path, e))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), KeyError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| write_err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_its_associated_data() {
        let keys = QueueKeys::ephemeral().unwrap();
        let sealed = keys.seal(b"env 1", b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(keys.open(b"env 1", &sealed).unwrap(), b"hello");
        assert_eq!(
            keys.open(b"env 2", &sealed),
            Err(OpenError::Forged(keys.current()))
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(keys.open(b"env 1", &flipped).is_err());
        assert_eq!(
            keys.open(b"env 1", &sealed[..10]),
            Err(OpenError::Truncated)
        );
        // A fresh nonce each time.
        assert_ne!(keys.seal(b"env 1", b"hello").unwrap(), sealed);
        let other = QueueKeys::ephemeral().unwrap();
        assert_eq!(
            other.open(b"env 1", &sealed),
            Err(OpenError::UnknownKey(keys.current()))
        );
    }

    #[test]
    fn key_files_are_generated_private_and_rotated_with_their_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        let a = QueueKeys::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            QueueKeys::generate(&path),
            Err(KeyError::Write { .. })
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&a.current().to_string()), "{text}");
        let loaded = QueueKeys::load(&path).unwrap();
        assert_eq!(loaded.ids(), a.ids());
        let sealed = a.seal(b"x", b"y").unwrap();
        assert_eq!(loaded.open(b"x", &sealed).unwrap(), b"y");

        let new_path = dir.path().join("new.key");
        let b = QueueKeys::generate(&new_path).unwrap();
        let ring = QueueKeys::rotate(&path, &new_path).unwrap();
        assert_eq!(ring.ids(), vec![b.current(), a.current()]);
        assert_eq!(QueueKeys::load(&path).unwrap().ids(), ring.ids());
        assert_eq!(ring.open(b"x", &sealed).unwrap(), b"y", "old records open");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the rewritten ring stays private");

        assert_eq!(QueueKeys::retire(&path, &[a.current()]).unwrap(), vec![]);
        assert_eq!(
            QueueKeys::retire(&path, &[]).unwrap(),
            vec![a.current()],
            "an old key no record uses goes"
        );
        assert_eq!(QueueKeys::load(&path).unwrap().ids(), vec![b.current()]);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let err = QueueKeys::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }));
        assert!(err.to_string().contains("mta queue generate-key"), "{err}");

        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = QueueKeys::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(QueueKeys::load(&path).is_ok());

        std::fs::write(&path, "# comment\n\nnot-a-key\n").unwrap();
        let err = QueueKeys::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("64 hexadecimal"),
            "{err}"
        );

        std::fs::write(&path, "# only comments\n").unwrap();
        assert!(matches!(
            QueueKeys::load(&path),
            Err(KeyError::Empty { .. })
        ));

        let k = "0f".repeat(32);
        std::fs::write(&path, format!("{k}\n{k}\n")).unwrap();
        let err = QueueKeys::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("twice"), "{err}");
    }
}
