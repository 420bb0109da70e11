//! One agent per pin directory: the agent holds an exclusive `flock` on the directory
//! itself for as long as it runs (the kernel drops it when the process ends, however it
//! ends). A second agent finds it taken before it touches anything, and names the
//! holder's PID from `/proc/locks`.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another lb agent ({}) runs with pin directory {pin_dir}; stop it first \
         (`lb reload` rereads its file, `lb detach` removes it)",
        holder.map_or("PID unknown".to_string(), |p| format!("PID {p}"))
    )]
    Taken {
        pin_dir: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock pin directory {pin_dir}")]
    Io {
        pin_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while the agent runs.
pub struct PinLock {
    _dir: File,
    /// Whether the directory was made by this agent (a failed start removes it again).
    pub created: bool,
}

/// Takes the pin directory (creating it when missing) for this process.
pub fn acquire(pin_dir: &Path) -> Result<PinLock, LockError> {
    let io = |source| LockError::Io {
        pin_dir: pin_dir.into(),
        source,
    };
    let created = !pin_dir.exists();
    std::fs::create_dir_all(pin_dir).map_err(io)?;
    let dir = File::open(pin_dir).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Taken {
                pin_dir: pin_dir.into(),
                holder: holder(&dir),
            });
        }
        return Err(io(e));
    }
    Ok(PinLock { _dir: dir, created })
}

/// The PID holding a `flock` on `f`, from `/proc/locks` (`FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE ...`).
fn holder(f: &File) -> Option<u32> {
    let m = f.metadata().ok()?;
    let dev = m.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        m.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("lb-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = acquire(&dir).unwrap();
        assert!(first.created);
        // flock locks belong to the open file: a second open in this process conflicts
        // as a second agent's would.
        match acquire(&dir) {
            Err(LockError::Taken { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a second lock was granted"),
        }
        drop(first);
        let again = acquire(&dir).unwrap();
        assert!(!again.created, "the directory was there");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
