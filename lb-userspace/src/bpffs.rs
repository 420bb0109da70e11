//! The BPF filesystem pins live on.

use std::{ffi::CString, path::Path};

use anyhow::{bail, Context, Result};

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf when none is there.
pub fn ensure_mounted(pin_dir: &Path) -> Result<()> {
    if !pin_dir.starts_with(BPFFS) {
        // A bpffs mounted elsewhere by the operator: check it is one.
        let parent = pin_dir.parent().unwrap_or(pin_dir);
        if !is_bpffs(parent)? {
            bail!("{} is not on a BPF filesystem", parent.display());
        }
        return Ok(());
    }
    if is_bpffs(Path::new(BPFFS))? {
        return Ok(());
    }
    if let Some(parent) = private_mount_namespace() {
        bail!(
            "no bpffs at {BPFFS}, and lb agent runs in a mount namespace of its own \
             (`ip netns exec` makes one): a bpffs mounted here would vanish with the \
             namespace and take the pinned program with it, or miss the pins already on the \
             host. Enter only the network namespace instead: \
             `nsenter --net=/run/netns/NAME lb agent --config FILE` (parent PID {parent} \
             is in another mount namespace)"
        );
    }
    let (src, dst, fstype) = (
        CString::new("bpf")?,
        CString::new(BPFFS)?,
        CString::new("bpf")?,
    );
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// The parent's PID when this process is in another mount namespace than its parent
/// (as after `ip netns exec`); `None` when they share one or it cannot be told.
fn private_mount_namespace() -> Option<u32> {
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() } as u32;
    let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    let theirs = std::fs::read_link(format!("/proc/{parent}/ns/mnt")).ok()?;
    (own != theirs).then_some(parent)
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(false);
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}
