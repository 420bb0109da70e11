//! `cargo xtask setup`: what building and testing lb need on a Debian 12 machine.
//!
//! Each item is checked first (dpkg-query, `bpf-linker --version`, /proc/mounts), so a
//! second run does nothing and takes well under a second. See docs/building.md.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::proc;

/// Debian packages and what each is for.
const APT: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 on LLVM 22 for the XDP crate"),
    ("cargo-web", "its cargo"),
    ("rust-web-src", "its core source, for -Z build-std=core"),
    ("rust-web-clippy", "its clippy, to lint the XDP crate"),
    ("llvm-22-dev", "the LLVM bpf-linker links against"),
    ("iproute2", "ip, for the namespace tests and the lab"),
    ("ethtool", "veth offload settings in the namespace tests"),
    (
        "prometheus",
        "promtool, to check the metrics page and the alert rules",
    ),
    ("fonts-dejavu-core", "the font of the demo's chart"),
    (
        "etcd-server",
        "etcd, the fleet's store, started by the fleet tests",
    ),
    (
        "protobuf-compiler",
        "protoc, which the etcd client's build needs",
    ),
];

const LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";
const BTF: &str = "/sys/kernel/btf/vmlinux";

/// Oldest kernel with everything the program uses: BPF links for XDP (5.9) is the newest
/// of them; CAP_BPF 5.8, bpf_skc_lookup_tcp and bpf_tcp_check_syncookie 5.2,
/// bpf_fib_lookup 4.18, native XDP on veth 4.19.
pub const MIN_KERNEL: (u32, u32) = (5, 9);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report what is missing and fail if building is impossible; change nothing.
    Check,
    /// Install and mount what is missing.
    Install,
}

/// What later steps need to know from setup.
pub struct Setup {
    /// bpf-linker when it is not on PATH; passed to lb-userspace/build.rs as LB_EBPF_LINKER.
    pub linker: Option<PathBuf>,
    pub root: bool,
}

impl Setup {
    /// Applies the setup's findings to a cargo command that builds lb-userspace.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some(linker) = &self.linker {
            cmd.env("LB_EBPF_LINKER", linker);
        }
    }
}

pub fn run(mode: Mode) -> Result<Setup> {
    let started = Instant::now();
    println!("setup:");
    let privs = Privileges::current()?;
    let mut missing = Vec::new();

    let absent: Vec<&str> = APT
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dpkg_installed(name))
        .collect();
    for (name, what) in APT {
        if !absent.contains(name) {
            println!("  {name}: present ({what})");
        }
    }
    if !absent.is_empty() {
        if mode == Mode::Check {
            missing.extend(absent.iter().map(|n| format!("apt package {n}")));
        } else {
            if !privs.root {
                bail!(
                    "apt packages {} are missing and installing them needs root: run \
                     `cargo xtask setup` as root",
                    absent.join(" ")
                );
            }
            apt_install(&absent)?;
            for name in &absent {
                println!("  {name}: installed");
            }
        }
    }

    let mut linker = find_linker();
    match linker.as_deref().map(linker_version) {
        Some(Some(v)) if v == LINKER_VERSION => println!("  bpf-linker {v}: present"),
        found => {
            if mode == Mode::Check {
                missing.push(match found {
                    Some(Some(v)) => format!("bpf-linker {LINKER_VERSION} (found {v})"),
                    _ => format!("bpf-linker {LINKER_VERSION}"),
                });
            } else {
                install_linker()?;
                linker = find_linker();
                match linker.as_deref().and_then(linker_version) {
                    Some(v) if v == LINKER_VERSION => println!("  bpf-linker {v}: installed"),
                    _ => bail!("bpf-linker {LINKER_VERSION} was installed but cannot be found"),
                }
            }
        }
    }

    if bpffs_mounted()? {
        println!("  bpffs at {BPFFS}: present");
    } else if mode == Mode::Install && privs.root {
        proc::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        println!("  bpffs at {BPFFS}: mounted");
    } else {
        println!(
            "  bpffs at {BPFFS}: not mounted (the agent and tests need it; `cargo xtask setup` \
             as root mounts it)"
        );
    }

    kernel_report();
    println!("  privileges: {}", privs.describe());

    if !missing.is_empty() {
        bail!(
            "missing: {}; run `cargo xtask setup` (as root) to install",
            missing.join(", ")
        );
    }
    println!("setup: done in {:.1} s", started.elapsed().as_secs_f64());

    // build.rs runs `bpf-linker` from PATH; name it only when PATH would not find it, so
    // the build script's inputs stay the same as in a plain `cargo build`.
    let linker = linker.filter(|path| !on_path(path));
    Ok(Setup {
        linker,
        root: privs.root,
    })
}

fn dpkg_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

fn apt_install(names: &[&str]) -> Result<()> {
    println!("  apt-get: installing {}", names.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        proc::run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    // No pty: dpkg then skips its progress lines.
    let mut args = vec!["install", "-y", "-qq", "-o", "Dpkg::Use-Pty=0"];
    args.extend_from_slice(names);
    apt(&args)
}

/// bpf-linker on PATH, else where `cargo install` puts it.
fn find_linker() -> Option<PathBuf> {
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("bpf-linker"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(cargo_bin().join("bpf-linker")).filter(|p| p.is_file()))
}

fn on_path(path: &Path) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("bpf-linker") == path))
}

fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn linker_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn install_linker() -> Result<()> {
    println!("  bpf-linker: building {LINKER_VERSION} against LLVM 22 (about a minute)");
    let mut cmd = proc::cargo();
    // Without LLVM_PREFIX its build script finds /usr/bin/llvm-config (LLVM 14) and fails.
    cmd.env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args(["install", "--locked", "--quiet"])
        .arg(format!("bpf-linker@{LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22"]);
    proc::run(&mut cmd)
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

/// Reports the kernel facts the tests rely on; a shortfall is a warning, since building
/// does not need any of it.
fn kernel_report() {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    let (major, minor) = MIN_KERNEL;
    if version >= MIN_KERNEL {
        println!("  kernel {release}: ok (>= {major}.{minor})");
    } else {
        println!("  kernel {release}: TOO OLD, lb needs >= {major}.{minor} (BPF links for XDP)");
    }
    if Path::new(BTF).exists() {
        println!("  kernel BTF ({BTF}): present");
    } else {
        println!("  kernel BTF ({BTF}): MISSING, loading the program will fail");
    }
    println!(
        "  the tests use: BPF syscall, XDP (native on veth, attached by BPF link), \
         BPF_PROG_TEST_RUN, bpf_fib_lookup, bpf_skc_lookup_tcp, network namespaces, veth"
    );
}

struct Privileges {
    root: bool,
    caps: u64,
}

impl Privileges {
    fn current() -> Result<Self> {
        let status =
            fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        // Uid: real, effective, saved, filesystem.
        let root = field("Uid:").split_whitespace().nth(1) == Some("0");
        let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
        Ok(Self { root, caps })
    }

    fn has(&self, cap: u32) -> bool {
        self.caps & (1 << cap) != 0
    }

    fn describe(&self) -> String {
        if self.root {
            return "root".into();
        }
        let mut lacks = Vec::new();
        for (cap, name) in [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")] {
            if !self.has(cap) {
                lacks.push(name);
            }
        }
        let agent = if lacks.is_empty() {
            "enough to run the agent (CAP_BPF + CAP_NET_ADMIN)".to_owned()
        } else {
            format!(
                "running the agent needs root or CAP_BPF + CAP_NET_ADMIN, lacking {}",
                lacks.join(" + ")
            )
        };
        let tests = if self.has(CAP_SYS_ADMIN) {
            ""
        } else {
            "; the fixture and namespace tests need root"
        };
        format!("not root: {agent}{tests}; installing needs root")
    }
}
