//! `cargo xtask build`: the workspace's default members; lb-userspace's build script
//! builds the XDP object with Debian's toolchain and the `lb` binary embeds it.

use std::time::Instant;

use anyhow::Result;

use crate::{proc, setup};

pub fn run(release: bool) -> Result<()> {
    let setup = setup::run(setup::Mode::Check)?;
    let started = Instant::now();
    let mut cmd = proc::cargo();
    cmd.args(["build", "--locked"]);
    if release {
        cmd.arg("--release");
    }
    setup.apply(&mut cmd);
    proc::run(&mut cmd)?;

    let target = proc::target_dir();
    let profile = if release { "release" } else { "debug" };
    println!("build: done in {:.1} s", started.elapsed().as_secs_f64());
    // build.rs always builds the XDP object in release: BPF needs the optimiser.
    println!(
        "  XDP object: {}",
        proc::root()
            .join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
            .display()
    );
    println!(
        "  lb binary:  {}",
        target.join(profile).join("lb").display()
    );
    Ok(())
}
