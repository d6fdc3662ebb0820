//! Destination domains a postmaster suspended (`mta queue suspend`): no
//! attempt is made to them until the suspension ends or is lifted; their
//! recipients wait in the queue, postponed to the end, without an attempt
//! being counted.
//!
//! Suspensions survive a restart: they are kept in
//! `<data_dir>/suspensions.json`, written to a temporary file, synced and
//! renamed over the old one, so a crash leaves the old or the new list,
//! never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One suspended domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The destination domain, lower case.
    pub domain: String,
    /// When it ends (ms since the epoch).
    pub until_ms: u64,
    /// Who suspended it.
    pub who: String,
    /// Why, as they said (may be empty).
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    #[error("cannot read {path}: {source}; remove it to forget every suspension")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a suspension list ({source}); remove it to forget every suspension")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The suspended domains, shared by delivery and the admin API.
#[derive(Debug)]
pub struct Suspensions {
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<String, Suspension>>,
}

impl Suspensions {
    /// Suspensions kept only in memory (tests of delivery alone).
    pub fn in_memory() -> Suspensions {
        Suspensions {
            path: None,
            map: Mutex::new(BTreeMap::new()),
        }
    }

    /// Loads the list at `path` (none yet is an empty list), forgetting
    /// suspensions that ended before `now_ms`.
    pub fn load(path: &Path, now_ms: u64) -> Result<Suspensions, SuspendError> {
        let list: Vec<Suspension> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SuspendError::Parse {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(SuspendError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let map = list
            .into_iter()
            .filter(|s| s.until_ms > now_ms)
            .map(|s| (s.domain.clone(), s))
            .collect();
        Ok(Suspensions {
            path: Some(path.to_path_buf()),
            map: Mutex::new(map),
        })
    }

    /// When delivery to `domain` may resume, if it is suspended at `now_ms`.
    pub fn until(&self, domain: &str, now_ms: u64) -> Option<u64> {
        let map = self.map.lock().expect("suspensions lock");
        if map.is_empty() {
            return None;
        }
        map.get(domain)
            .map(|s| s.until_ms)
            .filter(|&until| until > now_ms)
    }

    /// Suspends `s.domain` until `s.until_ms` (replacing an earlier
    /// suspension of it), durably.
    pub fn suspend(&self, mut s: Suspension) -> Result<Suspension, SuspendError> {
        s.domain = s.domain.to_lowercase();
        let mut map = self.map.lock().expect("suspensions lock");
        let before = map.insert(s.domain.clone(), s.clone());
        if let Err(e) = self.save(&map) {
            match before {
                Some(b) => map.insert(b.domain.clone(), b),
                None => map.remove(&s.domain),
            };
            return Err(e);
        }
        Ok(s)
    }

    /// Lifts the suspension of `domain`; what it was, if there was one.
    pub fn resume(&self, domain: &str) -> Result<Option<Suspension>, SuspendError> {
        let mut map = self.map.lock().expect("suspensions lock");
        let Some(removed) = map.remove(&domain.to_lowercase()) else {
            return Ok(None);
        };
        if let Err(e) = self.save(&map) {
            map.insert(removed.domain.clone(), removed);
            return Err(e);
        }
        Ok(Some(removed))
    }

    /// The suspensions in force at `now_ms`, by domain.
    pub fn list(&self, now_ms: u64) -> Vec<Suspension> {
        let map = self.map.lock().expect("suspensions lock");
        map.values()
            .filter(|s| s.until_ms > now_ms)
            .cloned()
            .collect()
    }

    fn save(&self, map: &BTreeMap<String, Suspension>) -> Result<(), SuspendError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |source| SuspendError::Write {
            path: path.clone(),
            source,
        };
        let list: Vec<&Suspension> = map.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).expect("serializable");
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(domain: &str, until_ms: u64) -> Suspension {
        Suspension {
            domain: domain.into(),
            until_ms,
            who: "postmaster".into(),
            reason: "blocklisted us".into(),
        }
    }

    #[test]
    fn suspensions_end_on_time_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suspensions.json");
        let a = Suspensions::load(&path, 0).unwrap();
        a.suspend(s("Example.COM", 1_000)).unwrap();
        a.suspend(s("other.example", 5_000)).unwrap();
        assert_eq!(a.until("example.com", 999), Some(1_000));
        assert_eq!(a.until("example.com", 1_000), None);
        assert_eq!(a.until("unrelated.example", 0), None);

        // Reloaded after the first ended: only the second is left.
        let b = Suspensions::load(&path, 2_000).unwrap();
        assert_eq!(b.list(2_000), vec![s("other.example", 5_000)]);
        assert_eq!(
            b.resume("OTHER.example").unwrap(),
            Some(s("other.example", 5_000))
        );
        assert_eq!(b.resume("other.example").unwrap(), None);
        assert!(Suspensions::load(&path, 0).unwrap().list(0).is_empty());
    }

    #[test]
    fn a_damaged_list_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suspensions.json");
        std::fs::write(&path, b"{not json").unwrap();
        let e = Suspensions::load(&path, 0).unwrap_err().to_string();
        assert!(
            e.contains("suspensions.json") && e.contains("remove it"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_write_keeps_the_list_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone").join("suspensions.json");
        let a = Suspensions::load(&path, 0).unwrap();
        assert!(a.suspend(s("example.com", 1_000)).is_err());
        assert_eq!(a.until("example.com", 0), None);
    }
}
