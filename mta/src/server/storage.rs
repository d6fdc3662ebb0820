//! Free space on the queue's filesystem.
//!
//! Reception refuses new mail while less than the reserve is free, so the
//! store never runs out of space in the middle of a write (sled cannot
//! recover from ENOSPC without a restart). The same idea as Postfix's
//! `queue_minfree`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct StorageGuard {
    path: PathBuf,
    reserve: u64,
    low: Arc<AtomicBool>,
}

/// Bytes available to unprivileged writers on the filesystem of `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

impl StorageGuard {
    pub fn new(path: impl Into<PathBuf>, reserve: u64) -> Self {
        StorageGuard {
            path: path.into(),
            reserve,
            low: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set while space is short; sessions refuse MAIL then.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.low.clone()
    }

    /// Is there room for `incoming` more bytes above the reserve? Updates
    /// the flag. A filesystem that cannot be asked is assumed to have room;
    /// a reserve of 0 turns the check off.
    pub fn check(&self, incoming: u64) -> bool {
        if self.reserve == 0 {
            return true;
        }
        let ok = match available_bytes(&self.path) {
            Ok(free) => free >= self.reserve.saturating_add(incoming),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read free space");
                true
            }
        };
        let was_low = self.low.swap(!ok, Ordering::Relaxed);
        // The state changed when "was low" equals "is fine now".
        if was_low == ok {
            if ok {
                tracing::info!(path = %self.path.display(), "free space is back above the reserve; accepting mail again");
            } else {
                tracing::error!(path = %self.path.display(), reserve = self.reserve, "free space below the reserve; refusing new mail with 452 4.3.1");
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_beyond_the_disk_is_low_and_zero_turns_the_check_off() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        let g = StorageGuard::new(dir.path(), 0);
        assert!(g.check(u64::MAX), "0 turns the check off");
        assert!(!g.flag().load(Ordering::Relaxed));
        let g = StorageGuard::new(dir.path(), u64::MAX / 2);
        assert!(!g.check(0));
        assert!(g.flag().load(Ordering::Relaxed));
    }
}
