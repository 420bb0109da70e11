//! Builds the XDP program (lb-ebpf) so the `lb` binary can embed it.
//!
//! bpfel-unknown-none needs `-Z build-std=core`, which needs the core source of the very
//! compiler in use. Debian's rustc-web and rust-web-src are such a pair (the rustup
//! toolchains here have no rust-src), so the eBPF crate is built with them, in a target
//! directory of its own, while the rest of the workspace uses the default toolchain.
//! `cargo xtask setup` installs them; see docs/building.md.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for var in ["LB_EBPF_CARGO", "LB_EBPF_RUSTC", "LB_EBPF_LINKER"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let target_dir = root.join("target/ebpf");
    let cargo = env::var("LB_EBPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = env::var("LB_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let linker = env::var("LB_EBPF_LINKER").unwrap_or_else(|_| "bpf-linker".into());
    require(Path::new(&cargo), "Debian's cargo (package cargo-web)");
    require(Path::new(&rustc), "Debian's rustc (package rustc-web)");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root.join("lb-ebpf"));
    // The outer cargo's settings are for the host build; none may leak into this one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") || key.starts_with("RUSTC") || key.starts_with("RUSTUP") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env_remove("RUSTFLAGS")
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            // Inline memcpy/memset: bpf-linker otherwise turns every zeroed struct into a
            // call to a byte-at-a-time loop (measured: up to half the per-packet cost).
            [
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
                "-Clink-arg=--disable-expand-memcpy-in-order",
                "-Ctarget-cpu=v3",
            ]
            .join("\x1f"),
        )
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .args(["build", "--release", "--locked", "-Zbuild-std=core"])
        .args(["--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}; run `cargo xtask setup` first"));
    if !status.success() {
        panic!(
            "building lb-ebpf failed ({status}); if the toolchain is missing, run \
             `cargo xtask setup`"
        );
    }
    let obj = target_dir.join(TARGET).join("release/lb-ebpf");
    println!("cargo:rustc-env=LB_EBPF_OBJ={}", obj.display());
}

fn require(path: &Path, what: &str) {
    if !path.exists() {
        panic!(
            "{} not found: it is {what}, needed to build the XDP program; run `cargo xtask setup`",
            path.display()
        );
    }
}
