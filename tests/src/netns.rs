//! Named network namespaces, made the way `ip netns add` makes them: a bind mount of the
//! namespace under /run/netns, so `ip netns exec NAME ...` works for manual debugging.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    ops::{Deref, DerefMut},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{mpsc, OnceLock},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// Where named namespaces live (iproute2's `NETNS_RUN_DIR`).
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace. Dropping it kills the processes inside it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
    keep: bool,
}

impl Netns {
    /// Creates the namespace `name`; fails if it exists.
    pub fn create(name: &str) -> Result<Self> {
        prepare_run_dir()?;
        let path = path_of(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Unshare in a thread of its own so no other thread changes namespace; the bind
        // mount keeps the namespace alive after the thread ends.
        let made = thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                // SAFETY: unshare takes flags only; it moves this thread alone.
                check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
                // SAFETY: gettid cannot fail.
                let tid = unsafe { libc::gettid() };
                let src = format!("/proc/self/task/{tid}/ns/net");
                mount_bind(Path::new(&src), &path)
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
        });
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e).with_context(|| format!("creating network namespace {name}"));
        }
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: name.to_owned(),
            file,
            keep: false,
        })
    }

    /// Opens an existing namespace; dropping the handle leaves it in place.
    pub fn open(name: &str) -> Result<Self> {
        let path = path_of(name);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            name: name.to_owned(),
            file,
            keep: true,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted file under /run/netns.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// A file descriptor of the namespace (for `setns`, `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Leaves the namespace in place when this handle is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Runs `f` in a thread that has entered the namespace and waits for it. Sockets made
    /// there stay in the namespace; interface names resolve there. A panic in `f` is
    /// propagated.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.fd();
        thread::scope(|s| {
            let joined = s
                .spawn(|| {
                    enter(fd).with_context(|| format!("entering namespace {}", self.name))?;
                    f()
                })
                .join();
            joined.unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Starts `f` in a background thread that has entered the namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let file = self.file.try_clone()?;
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                let entered = enter(file.as_fd());
                drop(file);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                // The caller gets the error; the thread must not run outside the namespace.
                if !ok {
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                f()
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e).with_context(|| format!("entering namespace {}", self.name))
            }
            Err(_) => Err(anyhow!("namespace thread of {} ended early", self.name)),
        }
    }

    /// Starts a process inside the namespace. The returned guard kills it when dropped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<NsChild> {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open until exec (no CLOEXEC
        // has run yet in the child).
        unsafe {
            cmd.pre_exec(move || check(libc::setns(fd, libc::CLONE_NEWNET)));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?} in {}", cmd.get_program(), self.name))?;
        Ok(NsChild(Some(child)))
    }

    /// Runs a command to completion inside the namespace and returns its stdout; fails
    /// with its stderr when it exits non-zero.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<String> {
        let (prog, args) = argv.split_first().context("empty command")?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = self.spawn(&mut cmd)?;
        let out = child.into_inner().wait_with_output()?;
        let shown = || {
            argv.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {}",
                shown(),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The PIDs of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let meta = self.file.metadata()?;
        Ok(pids_in(meta.dev(), meta.ino()))
    }

    /// Kills (SIGKILL, by PID) every process inside the namespace and waits until they
    /// are gone, at most `timeout`.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        let meta = self.file.metadata()?;
        kill_in(meta.dev(), meta.ino(), timeout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.kill_all(Duration::from_secs(2)) {
            eprintln!("netns {}: {e:#}", self.name);
        }
        if let Err(e) = unmount_and_remove(&self.path()) {
            eprintln!("netns {}: {e:#}", self.name);
        }
    }
}

/// A process started in a namespace; killed (by PID) and reaped when dropped.
#[derive(Debug)]
pub struct NsChild(Option<Child>);

impl NsChild {
    /// The process, no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("present until dropped")
    }
}

impl Deref for NsChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("present until dropped")
    }
}

impl DerefMut for NsChild {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // std kills by PID and knows when the child has been reaped, so no stray PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Names of the namespaces under /run/netns.
pub fn list() -> Result<Vec<String>> {
    let dir = match fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes the named namespace: kills the processes inside it, then removes its mount.
pub fn delete(name: &str) -> Result<()> {
    let path = path_of(name);
    if let Ok(meta) = fs::metadata(&path) {
        // An unmounted leftover file has the tmpfs's device, which no process matches.
        kill_in(meta.dev(), meta.ino(), Duration::from_secs(2))?;
    }
    unmount_and_remove(&path)
}

fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace file, borrowed for the call.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })
}

fn cstr(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn mount_bind(src: &Path, dst: &Path) -> io::Result<()> {
    let (src, dst) = (cstr(src)?, cstr(dst)?);
    // SAFETY: NUL-terminated paths that outlive the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
}

/// Makes /run/netns a shared mount point, as iproute2 does, so namespace mounts
/// propagate to mount namespaces made later (`ip netns exec` makes one).
fn prepare_run_dir() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    fs::create_dir_all(NETNS_DIR).context(NETNS_DIR)?;
    let done = DONE.get_or_init(|| {
        let dir = cstr(Path::new(NETNS_DIR)).map_err(|e| e.to_string())?;
        let shared = || {
            // SAFETY: NUL-terminated strings that outlive the call.
            check(unsafe {
                libc::mount(
                    c"".as_ptr(),
                    dir.as_ptr(),
                    c"none".as_ptr(),
                    libc::MS_SHARED | libc::MS_REC,
                    std::ptr::null(),
                )
            })
        };
        match shared() {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a mount point yet: bind it onto itself first.
                // SAFETY: NUL-terminated strings that outlive the call.
                check(unsafe {
                    libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        c"none".as_ptr(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                })
                .and_then(|()| shared())
            }
            other => other,
        }
        .map_err(|e| format!("making {NETNS_DIR} a shared mount: {e}"))
    });
    done.clone().map_err(anyhow::Error::msg)
}

fn unmount_and_remove(path: &Path) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == -1 {
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point (a leftover file); ENOENT: already gone.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(err).with_context(|| format!("unmounting {}", path.display()));
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// PIDs whose network namespace is the nsfs inode (`dev`, `ino`); never our own.
fn pids_in(dev: u64, ino: u64) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false)
        })
        .collect()
}

fn kill_in(dev: u64, ino: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids_in(dev, ino);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} still in the namespace");
        }
        for pid in pids {
            // By PID only, and only processes inside this namespace.
            // SAFETY: kill takes plain numbers.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(10));
    }
}
