//! Developer and CI tasks for lb, run as `cargo xtask <command>` (alias in .cargo/config.toml).

mod build;
mod lint;
mod proc;
mod setup;
mod test;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and lint lb"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, bpf-linker, bpffs); idempotent.
    Setup,
    /// Build the workspace; the `lb` binary embeds the XDP object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test suite (host, fixtures, e2e), installing what is missing first.
    Test {
        /// Run only this suite.
        #[arg(long, value_enum)]
        suite: Option<test::Suite>,
    },
    /// Clippy with warnings as errors, for the host crates and the XDP crate.
    Clippy,
    /// Format the workspace, or with --check only report what would change.
    Fmt {
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks in release mode: data-plane cost per packet, table builder (needs root).
    Bench {
        /// Also write the results to FILE as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Run this suite: dataplane, table, live, control, fleet or load (repeatable); without it,
        /// dataplane and table.
        #[arg(long, value_name = "NAME")]
        suite: Vec<String>,
        /// Passed to the `bench` binary of the tests crate (after `--`; see its --help).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole system in network namespaces, narrated: traffic through two LB nodes
    /// while a backend is added, one drained and one failed (needs root; under 2 min).
    Demo {
        /// Unimog mode: four nodes that each both balance and serve.
        #[arg(long)]
        unimog: bool,
    },
    /// A running namespace topology for manual exploration: `lab up`, `lab down [--all]`.
    #[command(disable_help_flag = true)]
    Lab {
        /// Passed through to the `lab` binary of the tests crate.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Printed here rather than returned: anyhow would add a backtrace when RUST_BACKTRACE
    // is set, which buries the one line that matters.
    dispatch(Cli::parse().cmd).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Setup => setup::run(setup::Mode::Install).map(|_| ExitCode::SUCCESS),
        Cmd::Build { release } => build::run(release).map(|()| ExitCode::SUCCESS),
        Cmd::Test { suite } => test::run(suite),
        Cmd::Clippy => lint::clippy().map(|()| ExitCode::SUCCESS),
        Cmd::Fmt { check } => lint::fmt(check).map(|()| ExitCode::SUCCESS),
        Cmd::Bench { json, suite, args } => {
            let setup = setup::run(setup::Mode::Install)?;
            let mut cmd = proc::cargo();
            setup.apply(&mut cmd);
            cmd.args(["run", "--quiet", "--locked", "--release", "-p", "tests"])
                .args(["--bin", "bench", "--"])
                .args(suite.iter().flat_map(|s| ["--suite", s.as_str()]))
                .args(args);
            if let Some(path) = json {
                // The bench runs in the workspace root; the path is the caller's.
                cmd.arg("--json").arg(std::path::absolute(path)?);
            }
            proc::run(&mut cmd).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Demo { unimog } => demo(unimog),
        Cmd::Lab { args } => {
            let mut cmd = proc::cargo();
            cmd.args([
                "run", "--quiet", "--locked", "-p", "tests", "--bin", "lab", "--",
            ])
            .args(args);
            proc::run(&mut cmd).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// Builds `lb` and the demo (debug, as the tests use them), then becomes the demo, so
/// the shell waits for its clean-up after Ctrl-C.
fn demo(unimog: bool) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let setup = setup::run(setup::Mode::Install)?;
    let mut build = proc::cargo();
    setup.apply(&mut build);
    build.args("build --quiet --locked -p lb-userspace --bin lb -p tests --bin demo".split(' '));
    proc::run(&mut build)?;
    let bin = proc::target_dir().join("debug");
    let mut demo = std::process::Command::new(bin.join("demo"));
    if unimog {
        demo.arg("--unimog");
    }
    let err = demo
        .env("LB_BIN", bin.join("lb"))
        .current_dir(proc::root())
        .exec();
    Err(anyhow::anyhow!("cannot run {}: {err}", proc::show(&demo)))
}
