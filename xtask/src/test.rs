//! `cargo xtask test`: every suite, each with its own summary line, then the total as a
//! plain `N passed, N failed` line.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::{proc, setup};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Unit and property tests of every host crate but `tests`.
    Host,
    /// Data-plane fixtures through BPF_PROG_TEST_RUN: tests/tests/fixtures.rs.
    Fixtures,
    /// Namespace end-to-end tests: the tests crate's other targets.
    E2e,
}

impl Suite {
    const ALL: [Self; 3] = [Self::Host, Self::Fixtures, Self::E2e];

    fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Fixtures => "fixtures",
            Self::E2e => "e2e",
        }
    }

    /// The `cargo test` arguments of this suite, or why it has nothing to run.
    fn args(self, targets: &[String]) -> Result<Vec<String>, &'static str> {
        let mut args: Vec<String> = ["test", "--locked", "--no-fail-fast"]
            .map(String::from)
            .into();
        match self {
            // lb-ebpf builds only for the BPF target; lb-userspace's build script builds it.
            Self::Host => args.extend(
                ["--workspace", "--exclude", "tests", "--exclude", "lb-ebpf"].map(String::from),
            ),
            Self::Fixtures => {
                if !targets.iter().any(|t| t == "fixtures") {
                    return Err("no tests/tests/fixtures.rs yet");
                }
                args.extend(["-p", "tests", "--test", "fixtures"].map(String::from));
            }
            Self::E2e => {
                // The test-bed library's and the lab binary's own tests belong here too.
                args.extend(["-p", "tests", "--lib", "--bins"].map(String::from));
                for target in targets.iter().filter(|t| *t != "fixtures") {
                    args.extend(["--test".into(), target.clone()]);
                }
            }
        }
        Ok(args)
    }
}

#[derive(Default)]
struct Count {
    passed: u64,
    failed: u64,
    ignored: u64,
}

struct Outcome {
    suite: Suite,
    /// Counts, whether cargo exited 0, seconds; or why the suite was skipped.
    result: Result<(Count, bool, f64), &'static str>,
}

pub fn run(only: Option<Suite>) -> Result<ExitCode> {
    let setup = setup::run(setup::Mode::Install)?;
    if !setup.root {
        println!(
            "test: not root: the fixture and namespace suites need root and will fail or skip"
        );
    }
    let targets = test_targets()?;
    let mut outcomes = Vec::new();
    for suite in Suite::ALL
        .into_iter()
        .filter(|s| only.is_none_or(|o| o == *s))
    {
        let result = match suite.args(&targets) {
            Err(why) => {
                println!("== {}: skipped, {why}", suite.name());
                Err(why)
            }
            Ok(args) => {
                println!("== {}: cargo {}", suite.name(), args.join(" "));
                let mut cmd = proc::cargo();
                cmd.args(&args);
                setup.apply(&mut cmd);
                let started = Instant::now();
                let (count, ok) = run_counted(&mut cmd)?;
                Ok((count, ok, started.elapsed().as_secs_f64()))
            }
        };
        outcomes.push(Outcome { suite, result });
    }

    println!();
    let (mut passed, mut failed, mut bad) = (0, 0, Vec::new());
    for Outcome { suite, result } in &outcomes {
        match result {
            Err(why) => println!("== {}: skipped, {why}", suite.name()),
            Ok((count, ok, secs)) => {
                // A suite that failed without a failing test (a build error, a crash) still
                // counts as one failure, so the total never reads as green.
                let failures = if *ok {
                    count.failed
                } else {
                    count.failed.max(1)
                };
                let verdict = if *ok { "ok" } else { "FAILED" };
                println!(
                    "== {}: {verdict}, {} passed, {} failed, {} ignored in {secs:.1} s",
                    suite.name(),
                    count.passed,
                    failures,
                    count.ignored
                );
                passed += count.passed;
                failed += failures;
                if !ok {
                    bad.push(suite.name());
                }
            }
        }
    }
    let status = if !bad.is_empty() {
        println!("test: failed suites: {}", bad.join(", "));
        ExitCode::FAILURE
    } else if passed == 0 {
        println!("test: no test ran");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    println!("{passed} passed, {failed} failed");
    Ok(status)
}

/// Test targets of the tests crate: tests/tests/NAME.rs and tests/tests/NAME/main.rs, so
/// a new file joins a suite without touching xtask.
fn test_targets() -> Result<Vec<String>> {
    let dir = proc::root().join("tests/tests");
    let mut names = Vec::new();
    if !dir.exists() {
        return Ok(names);
    }
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = if path.is_dir() && path.join("main.rs").is_file() {
            path.file_name()
        } else if path.extension().is_some_and(|e| e == "rs") {
            path.file_stem()
        } else {
            None
        };
        if let Some(name) = name {
            names.push(name.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Runs a `cargo test` command, echoing its output while adding up its `test result:`
/// lines; returns the counts and whether it exited 0.
fn run_counted(cmd: &mut Command) -> Result<(Count, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", proc::show(cmd)))?;
    let mut count = Count::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        out.flush()?;
        if let Some(rest) = line.trim_start().strip_prefix("test result: ") {
            add_result(&mut count, rest);
        }
    }
    let status = child.wait()?;
    Ok((count, status.success()))
}

/// Adds one `ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; ...` line.
fn add_result(count: &mut Count, rest: &str) {
    let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => count.passed += n,
            "failed" => count.failed += n,
            "ignored" => count.ignored += n,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_result_line() {
        let mut c = Count::default();
        add_result(
            &mut c,
            "FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        add_result(
            &mut c,
            "ok. 4 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out",
        );
        assert_eq!((c.passed, c.failed, c.ignored), (7, 1, 2));
    }
}
