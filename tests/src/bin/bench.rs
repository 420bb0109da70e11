//! `bench`: per-packet cost of lb's XDP program on each path and the forwarding-table
//! builder's figures, as a table and optionally as JSON. `cargo xtask bench` runs it in
//! release mode; docs/benchmarks.md explains the figures. Needs root.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;
use tests::bench::{
    dataplane::{self, Settings},
    harness::MAX_FRAMES,
    report::Report,
    table,
};

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
    /// Only the data plane.
    #[arg(long, conflicts_with = "table_only")]
    dataplane_only: bool,
    /// Only the table builder (needs no root).
    #[arg(long)]
    table_only: bool,
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
    let settings = Settings {
        repeat: cli.repeat.max(1),
        rounds: cli.rounds.max(1),
        flows: cli.flows,
    };
    let dp = if cli.table_only {
        dataplane::Measured {
            floor_ns: 0.0,
            cases: Vec::new(),
        }
    } else {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            anyhow::bail!(
                "the data-plane benchmark needs root (namespaces, BPF); --table-only does not"
            );
        }
        eprintln!("bench: data plane ...");
        dataplane::measure(settings, &dataplane::selected(&cli.cases))?
    };
    let figures = if cli.dataplane_only {
        Vec::new()
    } else {
        eprintln!("bench: forwarding table ...");
        table::measure()?
    };
    let report = Report::new(settings, &dp, &figures);
    print!("{}", report.text());
    if let Some(path) = cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}
