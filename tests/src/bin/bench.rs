//! `bench`: per-packet cost of lb's XDP program on each path, the forwarding-table
//! builder's figures and the forwarding rate with live frames, as a table and optionally as
//! JSON. `cargo xtask bench` runs it in release mode; docs/benchmarks.md explains the
//! figures; the control suite times the agent's control plane from a change to its tables
//! live. Needs root (but for the table suite).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use lb_common::hash::FlowHash;
use tests::bench::{
    compare, control,
    dataplane::{self, Settings},
    fleet,
    harness::MAX_FRAMES,
    live, load, memory,
    report::Report,
    table,
};

/// A part of the benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// Per-packet cost of each data-plane path (BPF_PROG_TEST_RUN), and map memory.
    Dataplane,
    /// Forwarding-table build time and movement.
    Table,
    /// Forwarding rate with live frames (BPF_F_TEST_XDP_LIVE_FRAMES).
    Live,
    /// From a health flip or a `set-weight` to the new tables live in the maps.
    Control,
    /// The load loop evening out backends in CPU cgroups of different quotas.
    Load,
    /// From a change committed to etcd to every node of a fleet having it.
    Fleet,
}

#[derive(Parser)]
#[command(
    name = "bench",
    about = "lb's benchmarks: data-plane cost per packet, table builder"
)]
struct Cli {
    /// Also write the results to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Runs per BPF_PROG_TEST_RUN call.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Test runs per figure; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Distinct flows (frames) per case.
    #[arg(long, default_value_t = MAX_FRAMES, value_parser = flows)]
    flows: usize,
    /// Only this data-plane case (repeatable); all by default.
    #[arg(long = "case", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(dataplane::CASES))]
    cases: Vec<String>,
    /// Run this suite (repeatable); without it, dataplane and table.
    #[arg(long, value_enum, value_name = "NAME")]
    suite: Vec<Suite>,
    /// Only the data plane (as `--suite dataplane`).
    #[arg(long, conflicts_with_all = ["table_only", "suite"])]
    dataplane_only: bool,
    /// Only the table builder, which needs no root (as `--suite table`).
    #[arg(long, conflicts_with = "suite")]
    table_only: bool,
    /// Frames per live test run.
    #[arg(long, default_value_t = 2_000_000)]
    live_frames: u32,
    /// The core the live suite runs on.
    #[arg(long, default_value_t = 1)]
    live_cpu: usize,
    /// Where the load suite's chart goes.
    #[arg(long, value_name = "FILE", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-load.png"))]
    load_chart: PathBuf,
    /// Seconds the load suite runs with the loop frozen, then running (after 5 s of warm-up;
    /// the last 30 s of the running part are measured).
    #[arg(long, default_value_t = 30)]
    load_off_s: u64,
    #[arg(long, default_value_t = 90)]
    load_on_s: u64,
    /// CPU time each of the load suite's requests costs its server, microseconds; the
    /// request rate follows (60% of the backends' capacity).
    #[arg(long, default_value_t = load::WORK.as_micros() as u64, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    load_work_us: u64,
    /// The load suite's CPU-bound server, run by the suite itself in a backend's namespace.
    #[arg(long, hide = true, value_name = "NAME")]
    cpu_server: Option<String>,
    #[arg(long, hide = true, default_value_t = 2000)]
    work_us: u64,
    /// Compare this build with another `bench` binary (another commit's, with its data
    /// plane): the two run in turn, `--alternations` times each, with the other arguments;
    /// printed are each figure's median over the runs, of the runs' lowest rounds, and the
    /// difference.
    #[arg(long, value_name = "BENCH_BINARY", conflicts_with = "json")]
    compare: Option<PathBuf>,
    /// Runs of each binary for `--compare`.
    #[arg(long, default_value_t = 5, requires = "compare")]
    alternations: usize,
    /// Changes the fleet suite times per case.
    #[arg(long, default_value_t = 50)]
    fleet_changes: usize,
    /// The node's flow hash in the data-plane and live suites: `multiply-shift` (as
    /// lb.example.json sets it) or `murmur3` (the default of a config without
    /// `node.flow_hash`).
    #[arg(long, value_name = "NAME", default_value = "multiply-shift", value_parser = flow_hash)]
    flow_hash: FlowHash,
}

fn flow_hash(s: &str) -> Result<FlowHash, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| "murmur3 or multiply-shift".to_string())
}

fn flows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_FRAMES).contains(&n) => Ok(n),
        _ => Err(format!("a number from 1 to {MAX_FRAMES}")),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(name) = &cli.cpu_server {
        return load::serve(name, std::time::Duration::from_micros(cli.work_us));
    }
    if let Some(other) = &cli.compare {
        return compare::run(
            other,
            cli.alternations,
            std::env::args_os().skip(1).collect(),
        );
    }
    let settings = Settings {
        repeat: cli.repeat.max(1),
        rounds: cli.rounds.max(1),
        flows: cli.flows,
        flow_hash: cli.flow_hash,
    };
    let suites = if cli.dataplane_only {
        vec![Suite::Dataplane]
    } else if cli.table_only {
        vec![Suite::Table]
    } else if cli.suite.is_empty() {
        vec![Suite::Dataplane, Suite::Table]
    } else {
        cli.suite.clone()
    };
    // SAFETY: geteuid cannot fail.
    if suites.iter().any(|s| *s != Suite::Table) && unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the data-plane, live, control and fleet suites need root (namespaces, BPF); the table \
             suite does not"
        );
    }
    let cases = dataplane::selected(&cli.cases);
    let (dp, map_bytes) = if suites.contains(&Suite::Dataplane) {
        eprintln!("bench: data plane ...");
        let dp = dataplane::measure(settings, &cases)?;
        eprintln!("bench: map memory ...");
        (dp, memory::measure()?)
    } else {
        let none = dataplane::Measured {
            floor_ns: 0.0,
            cases: Vec::new(),
        };
        (none, Vec::new())
    };
    let figures = if suites.contains(&Suite::Table) {
        eprintln!("bench: forwarding table ...");
        table::measure()?
    } else {
        Vec::new()
    };
    let rates = if suites.contains(&Suite::Live) {
        eprintln!("bench: live frames ...");
        let s = live::Settings {
            frames: cli.live_frames.max(1),
            rounds: settings.rounds,
            flows: settings.flows,
            cpu: cli.live_cpu,
            flow_hash: cli.flow_hash,
        };
        live::measure(s, &cases)?
    } else {
        Vec::new()
    };
    let changes = if suites.contains(&Suite::Control) {
        control::measure(settings.rounds)?
    } else {
        Vec::new()
    };
    let fleet = if suites.contains(&Suite::Fleet) {
        fleet::measure(cli.fleet_changes.max(1))?
    } else {
        Vec::new()
    };
    let mut report =
        Report::new(settings, &dp, &figures, &rates, &map_bytes, &changes).with_fleet(&fleet);
    if suites.contains(&Suite::Load) {
        let phases = load::Phases {
            off: std::time::Duration::from_secs(cli.load_off_s.max(5)),
            on: std::time::Duration::from_secs(cli.load_on_s.max(35)),
            ..load::Phases::default()
        };
        let work = std::time::Duration::from_micros(cli.load_work_us);
        report.load = Some(load::measure(phases, work, &cli.load_chart)?);
        eprintln!("bench: load chart written to {}", cli.load_chart.display());
    }
    print!("{}", report.text());
    if let Some(path) = cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}
