//! The configuration file is the truth: a change made with a command is written back to
//! it before it is applied, atomically (a temporary file in the same directory, synced,
//! then renamed over it), so a reload or a restart keeps it.
//!
//! The agent remembers the bytes it last read or wrote. A file edited since then is not
//! overwritten: the command is refused until `lb reload` has taken the edit in.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::config::{Config, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "{path} was edited since the agent last read it; run `lb reload` to apply the edit \
         first (the change would overwrite it)"
    )]
    EditedMeanwhile { path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration file and what the agent last knew of it.
pub struct ConfigFile {
    path: PathBuf,
    seen: Vec<u8>,
}

impl ConfigFile {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<(ConfigFile, Config), ConfigError> {
        let seen = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config = Config::parse(path, &seen)?;
        Ok((
            ConfigFile {
                path: path.into(),
                seen,
            },
            config,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `config` over the file, atomically, unless the file changed since it was
    /// last read or written here.
    pub fn save(&mut self, config: &Config) -> Result<(), PersistError> {
        let now = std::fs::read(&self.path).map_err(|source| PersistError::Read {
            path: self.path.clone(),
            source,
        })?;
        if now != self.seen {
            return Err(PersistError::EditedMeanwhile {
                path: self.path.clone(),
            });
        }
        let mut text = serde_json::to_vec_pretty(config).expect("a config always serializes");
        text.push(b'\n');
        write_atomic(&self.path, &text).map_err(|source| PersistError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.seen = text;
        Ok(())
    }
}

/// Replaces `path` with `data`: a reader sees the old file or the new one, and after a
/// crash the file is one of the two, never a part.
pub(super) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable once the directory is.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"node": {"interfaces": ["eth0"], "address_v4": "10.0.0.1"},
        "services": [{"name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
                      "backends": [{"address": "10.3.0.2"}]}]}"#;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-persist-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("lb.json")
    }

    #[test]
    fn a_saved_change_is_what_the_next_load_reads() {
        let path = scratch("saved");
        std::fs::write(&path, CONFIG).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (mut file, mut config) = ConfigFile::load(&path).unwrap();
        config.services[0].backends[0].drain = true;
        file.save(&config).unwrap();
        let (_, again) = ConfigFile::load(&path).unwrap();
        assert_eq!(again, config);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "the file keeps its mode");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        // Saved twice in a row: the agent's own write is not an edit.
        config.services[0].backends[0].weight = 7;
        file.save(&config).unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_file_edited_meanwhile_is_not_overwritten() {
        let path = scratch("edited");
        std::fs::write(&path, CONFIG).unwrap();
        let (mut file, mut config) = ConfigFile::load(&path).unwrap();
        let edit = CONFIG.replace("10.3.0.2", "10.3.0.9");
        std::fs::write(&path, &edit).unwrap();
        config.services[0].backends[0].drain = true;
        let err = file.save(&config).unwrap_err();
        assert!(matches!(err, PersistError::EditedMeanwhile { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edit);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
