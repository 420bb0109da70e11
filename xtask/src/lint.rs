//! `cargo xtask clippy` and `cargo xtask fmt`: the lints CI runs, runnable by hand.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{proc, setup};

/// Host crates with the default toolchain, then the XDP crate with Debian's clippy (the
/// same 1.96 compiler that builds it; rustup's toolchains have no core source to build
/// bpfel-unknown-none against).
pub fn clippy() -> Result<()> {
    let setup = setup::run(setup::Mode::Check)?;

    println!("clippy: host crates");
    let mut host = proc::cargo();
    // lb-ebpf only compiles for the BPF target; it is linted below.
    host.args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--locked",
    ])
    .args(["--", "-D", "warnings"]);
    setup.apply(&mut host);
    // Both halves run even when the first fails, so one run shows every finding.
    let host = proc::run(&mut host);

    println!("clippy: lb-ebpf (bpfel-unknown-none)");
    let mut bpf = Command::new("/usr/bin/cargo");
    bpf.current_dir(proc::root().join("lb-ebpf"));
    // The outer cargo's settings are for the host toolchain; none may leak into this one.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key.starts_with("RUSTUP") {
            bpf.env_remove(key.as_ref());
        }
    }
    // /usr/bin first so `cargo clippy` finds Debian's cargo-clippy, not rustup's proxy.
    let path = std::env::var("PATH").unwrap_or_default();
    bpf.env("PATH", format!("/usr/bin:{path}"))
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2")
        .args(["clippy", "--release", "--locked", "-Zbuild-std=core"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(proc::target_dir().join("ebpf-clippy"))
        .args(["--", "-D", "warnings"]);
    let bpf = proc::run(&mut bpf);
    match (host, bpf) {
        (Ok(()), Ok(())) => {
            println!("clippy: clean");
            Ok(())
        }
        (host, bpf) => {
            let failed: Vec<&str> = [("host", host), ("lb-ebpf", bpf)]
                .into_iter()
                .filter_map(|(name, r)| r.is_err().then_some(name))
                .collect();
            bail!("clippy found problems in: {}", failed.join(", "))
        }
    }
}

/// rustfmt.toml uses nightly-only options (import grouping and merging), so this prefers
/// rustup's nightly rustfmt, which the machine image ships. Stable rustfmt leaves
/// nightly-formatted imports alone, so it is a weaker but consistent fallback.
pub fn fmt(check: bool) -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustfmt", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    let mut cmd = Command::new("cargo");
    cmd.current_dir(proc::root());
    if nightly {
        cmd.arg("+nightly");
    } else {
        println!("fmt: no nightly rustfmt; using stable (import grouping is not checked)");
    }
    cmd.args(["fmt", "--all"]);
    if check {
        cmd.arg("--check");
    }
    proc::run(&mut cmd)
}
