//! Where the queue's encryption key comes from: the config's
//! `[queue] encryption_key_file`, systemd's credential for the daemon, or
//! the embedded default's key beside the data directory, generated on
//! first start. The key file's format and the sealing belong to the
//! `queue` crate (`QueueKeys`); this module only finds, checks and (for
//! the default) creates the file, and never logs a key, only its id.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use queue::{KeyError, QueueKeys};

use crate::config::Config;

/// The name of the systemd credential (`LoadCredential=mta-queue-key:FILE`).
pub const CREDENTIAL: &str = "mta-queue-key";

/// Where a key file was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `[queue] encryption_key_file`.
    Configured,
    /// `$CREDENTIALS_DIRECTORY/mta-queue-key` (the daemon under systemd).
    Credential,
    /// `<data_dir>-queue.key`, the default.
    Default,
}

/// The key file to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLocation {
    pub path: PathBuf,
    pub source: KeySource,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueKeyError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "cannot place the queue key beside the data directory {}: set [queue] encryption_key_file",
        data_dir.display()
    )]
    NoDefaultPlace { data_dir: PathBuf },
    #[error(
        "the queue at {} is encrypted but its key file {} is missing: restore it from your backup (a new key cannot open the queue), or set [queue] encryption_key_file to where it is",
        store.display(), key_file.display()
    )]
    DefaultKeyLost { store: PathBuf, key_file: PathBuf },
}

/// The default key file: beside the data directory, so that a copy of the
/// data directory does not carry its key.
pub fn default_key_file(data_dir: &Path) -> Result<PathBuf, QueueKeyError> {
    let no_place = || QueueKeyError::NoDefaultPlace {
        data_dir: data_dir.to_path_buf(),
    };
    let dir = match data_dir.file_name() {
        Some(_) => data_dir.to_path_buf(),
        None => std::fs::canonicalize(data_dir).map_err(|_| no_place())?,
    };
    let name = dir.file_name().ok_or_else(no_place)?;
    let mut file = name.to_os_string();
    file.push("-queue.key");
    Ok(dir.with_file_name(file))
}

/// The key file for `config`: `None` when encryption is off. The daemon
/// passes `credentials` (systemd's directory, if any); the CLI does not.
pub fn location(
    config: &Config,
    credentials: Option<&Path>,
) -> Result<Option<KeyLocation>, QueueKeyError> {
    if !config.queue.encrypt {
        return Ok(None);
    }
    if let Some(dir) = credentials {
        let path = dir.join(CREDENTIAL);
        if path.exists() {
            return Ok(Some(KeyLocation {
                path,
                source: KeySource::Credential,
            }));
        }
    }
    if let Some(p) = &config.queue.encryption_key_file {
        return Ok(Some(KeyLocation {
            path: p.get_ref().clone(),
            source: KeySource::Configured,
        }));
    }
    Ok(Some(KeyLocation {
        path: default_key_file(&config.data_dir)?,
        source: KeySource::Default,
    }))
}

/// The daemon's keys: loads the key file, generating the default one when
/// it does not exist yet (and saying so). Returns whether it generated.
pub fn for_daemon(config: &Config) -> Result<(Option<Arc<QueueKeys>>, bool), QueueKeyError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let Some(loc) = location(config, credentials.as_deref())? else {
        tracing::warn!(
            "queue encryption is off ([queue] encrypt = false): messages are stored in clear"
        );
        return Ok((None, false));
    };
    let (keys, generated) = match QueueKeys::load(&loc.path) {
        Ok(k) => (k, false),
        Err(KeyError::Missing { .. }) if loc.source == KeySource::Default => {
            let k = QueueKeys::generate(&loc.path)?;
            tracing::warn!(
                key_file = %loc.path.display(),
                key_id = %k.current(),
                "generated the queue encryption key; back it up apart from the data directory: without it the queue cannot be read"
            );
            (k, true)
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        key_file = %loc.path.display(),
        key_id = %keys.current(),
        old_keys = keys.ids().len() - 1,
        "queue encryption key loaded"
    );
    Ok((Some(Arc::new(keys)), generated))
}

/// The CLI's keys (never generated, never the credential).
pub fn for_cli(config: &Config) -> Result<Option<Arc<QueueKeys>>, QueueKeyError> {
    match location(config, None)? {
        None => Ok(None),
        Some(loc) => Ok(Some(Arc::new(QueueKeys::load(&loc.path)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_key_sits_beside_the_data_directory() {
        assert_eq!(
            default_key_file(Path::new("/var/lib/mta")).unwrap(),
            PathBuf::from("/var/lib/mta-queue.key")
        );
        assert_eq!(
            default_key_file(Path::new("/var/lib/mta/")).unwrap(),
            PathBuf::from("/var/lib/mta-queue.key")
        );
        assert_eq!(
            default_key_file(Path::new("mta-data")).unwrap(),
            PathBuf::from("mta-data-queue.key")
        );
        assert!(default_key_file(Path::new("/")).is_err());
    }

    #[test]
    fn the_credential_comes_first_then_the_config_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let default = location(&config, Some(dir.path())).unwrap().unwrap();
        assert_eq!(default.source, KeySource::Default);
        assert_eq!(default.path, dir.path().join("data-queue.key"));
        std::fs::write(dir.path().join(CREDENTIAL), "x").unwrap();
        let cred = location(&config, Some(dir.path())).unwrap().unwrap();
        assert_eq!(cred.source, KeySource::Credential);
        config.queue.encryption_key_file = Some(toml::Spanned::new(0..0, "/k".into()));
        assert_eq!(
            location(&config, None).unwrap().unwrap().source,
            KeySource::Configured
        );
        config.queue.encrypt = false;
        config.queue.encryption_key_file = None;
        assert_eq!(location(&config, Some(dir.path())).unwrap(), None);
    }
}
