//! Bearer tokens of the admin API's HTTPS listener (`[admin] tokens`).
//!
//! Trust boundary: anyone who can reach the listener and present a token
//! may steer the queue, so token files must be the owner's alone, tokens
//! long enough not to be guessed, and comparisons constant-time (digests
//! of equal length, compared with aws-lc-rs).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{SHA256, digest};

/// Tokens shorter than this are refused: 32 characters of base64 are 192
/// bits.
pub const MIN_TOKEN_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "[admin] listen is set but [admin] tokens is empty: add a token file (e.g. `ops = \"/etc/mta/admin-ops.token\"`), or remove listen"
    )]
    NoTokens,
    #[error("cannot read the admin token file {} (token {name}): {source}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin token file {} (token {name}) can be read by others (mode {mode:o}): run `chmod 600 {}`", path.display(), path.display())]
    Mode {
        name: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("the admin token in {} (token {name}) has {len} characters; it needs at least {MIN_TOKEN_CHARS}: make one with `head -c 32 /dev/urandom | base64 > {}`", path.display(), path.display())]
    Short {
        name: String,
        path: PathBuf,
        len: usize,
    },
    #[error("the admin token in {} (token {name}) holds spaces or control characters: one line of printable characters only", path.display())]
    Chars { name: String, path: PathBuf },
}

/// The tokens, kept as SHA-256 digests.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    digests: Vec<(String, [u8; 32])>,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = digest(&SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Tokens {
    /// Reads every token file, checking its mode and the token.
    pub fn load(files: &BTreeMap<String, PathBuf>) -> Result<Tokens, TokenError> {
        if files.is_empty() {
            return Err(TokenError::NoTokens);
        }
        let mut digests = Vec::new();
        for (name, path) in files {
            let token = read_token(name, path)?;
            digests.push((name.clone(), sha256(token.as_bytes())));
        }
        Ok(Tokens { digests })
    }

    /// The name of the token `presented` is, if it is one. Every token is
    /// compared, so the time taken says nothing about which one was close.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let got = sha256(presented.as_bytes());
        let mut found = None;
        for (name, want) in &self.digests {
            if aws_lc_rs::constant_time::verify_slices_are_equal(&got, want).is_ok() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Reads one token file: the owner's alone, one line, long enough.
pub fn read_token(name: &str, path: &Path) -> Result<String, TokenError> {
    let read = |source| TokenError::Read {
        name: name.into(),
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode {
            name: name.into(),
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let token = text.trim_end_matches(['\r', '\n']);
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::Chars {
            name: name.into(),
            path: path.to_path_buf(),
        });
    }
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(TokenError::Short {
            name: name.into(),
            path: path.to_path_buf(),
            len: token.chars().count(),
        });
    }
    Ok(token.to_string())
}

/// The token of an `Authorization: Bearer <token>` header in a request head.
pub fn bearer(head: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let v = v.trim();
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn tokens_are_checked_by_name_and_bad_files_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let good = "k3J9sQ2vXw8Lr5Tz1Yb7Nc4Md6Pf0Hg2Aa";
        let files = BTreeMap::from([
            (
                "ops".to_string(),
                file(dir.path(), "ops", &format!("{good}\n"), 0o600),
            ),
            (
                "ci".to_string(),
                file(dir.path(), "ci", "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp", 0o400),
            ),
        ]);
        let t = Tokens::load(&files).unwrap();
        assert_eq!(t.check(good), Some("ops"));
        assert_eq!(t.check("Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp"), Some("ci"));
        assert_eq!(t.check(&good[1..]), None);
        assert_eq!(t.check(""), None);

        let open = BTreeMap::from([("ops".to_string(), file(dir.path(), "open", good, 0o644))]);
        let e = Tokens::load(&open).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        let short = BTreeMap::from([("ops".to_string(), file(dir.path(), "short", "abc", 0o600))]);
        let e = Tokens::load(&short).unwrap_err().to_string();
        assert!(e.contains("at least 32") && e.contains("urandom"), "{e}");
        let spaced = BTreeMap::from([(
            "ops".to_string(),
            file(dir.path(), "sp", &format!("{good} {good}"), 0o600),
        )]);
        assert!(matches!(
            Tokens::load(&spaced),
            Err(TokenError::Chars { .. })
        ));
        assert!(matches!(
            Tokens::load(&BTreeMap::new()),
            Err(TokenError::NoTokens)
        ));
    }

    #[test]
    fn the_bearer_token_is_found_in_any_case() {
        let head = b"GET /v1/messages HTTP/1.1\r\nHost: x\r\nauthorization: bearer abc\r\n\r\n";
        assert_eq!(bearer(head), Some("abc"));
        assert_eq!(
            bearer(b"GET / HTTP/1.1\r\nAuthorization: Basic abc\r\n\r\n"),
            None
        );
        assert_eq!(bearer(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
