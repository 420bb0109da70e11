//! `bench --compare OTHER`: this build against another `bench` binary (another commit's
//! data plane, embedded in it), run alternately on one machine. The figures of one run
//! move by more than most changes do; only runs taken in turn, in the same minutes, tell
//! a few nanoseconds apart (docs/benchmarks.md, "Comparing two builds").

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::dataplane::median;

/// The options that are the comparison's own: the rest go to both binaries as they are
/// (each run writes its JSON to a file of the comparison's).
const OWN: [&str; 2] = ["--compare", "--alternations"];

/// One binary's figures over the alternations, by row (`dataplane CASE`, `live CASE`,
/// `floor`).
#[derive(Default)]
struct Series {
    /// Per row: each run's figure and, for the data plane, its lowest round.
    runs: BTreeMap<String, Vec<(f64, Option<f64>)>>,
}

/// Runs this binary and `other` in turn `alternations` times each (the first of each pair
/// alternating, so that neither always runs on a warmer machine), with `args` (this
/// process's own arguments), and prints each row's median of the runs' figures and of
/// their minimums.
pub fn run(other: &Path, alternations: usize, args: Vec<OsString>) -> Result<()> {
    let this = std::env::current_exe().context("finding this binary")?;
    let pass = passed_on(args);
    let dir = tempdir()?;
    let (mut a, mut b) = (Series::default(), Series::default());
    for i in 0..alternations.max(1) {
        let order: [(&Path, &mut Series, &str); 2] = [(&this, &mut a, "a"), (other, &mut b, "b")];
        let [first, second] = order;
        let pair = if i % 2 == 0 {
            [first, second]
        } else {
            [second, first]
        };
        for (bin, series, tag) in pair {
            eprintln!(
                "bench: compare {}/{}: {}",
                i + 1,
                alternations.max(1),
                bin.display()
            );
            let json = dir.join(format!("{tag}.json"));
            let run = Command::new(bin)
                .args(&pass)
                .arg("--json")
                .arg(&json)
                .output()
                .with_context(|| format!("running {}", bin.display()))?;
            if !run.status.success() {
                bail!(
                    "{} failed ({}): {}",
                    bin.display(),
                    run.status,
                    String::from_utf8_lossy(&run.stderr).trim()
                );
            }
            let text = std::fs::read_to_string(&json)?;
            series.add(&serde_json::from_str(&text)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print!("{}", text(&this, other, &a, &b));
    Ok(())
}

/// `args` without the comparison's own options.
fn passed_on(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if OWN.contains(&s.as_ref()) {
            it.next();
        } else if !OWN.iter().any(|o| s.starts_with(&format!("{o}="))) {
            out.push(a);
        }
    }
    out
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lb-bench-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Series {
    fn add(&mut self, report: &Value) {
        let mut put = |row: String, x: Option<f64>, min: Option<f64>| {
            if let Some(x) = x.filter(|x| *x > 0.0) {
                self.runs.entry(row).or_default().push((x, min));
            }
        };
        put("floor ns".into(), report["floor_ns"].as_f64(), None);
        for c in report["dataplane"].as_array().into_iter().flatten() {
            let row = format!("{} ns", c["case"].as_str().unwrap_or("?"));
            put(row, c["ns_per_packet"].as_f64(), c["ns_min"].as_f64());
        }
        for c in report["live"].as_array().into_iter().flatten() {
            let row = format!("{} live Mpps", c["case"].as_str().unwrap_or("?"));
            put(row, c["mpps"].as_f64(), None);
        }
    }

    /// The median of the runs' figures, and of their minimums where there are any.
    fn summary(&self, row: &str) -> Option<(f64, Option<f64>, usize)> {
        let runs = self.runs.get(row)?;
        let figures: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mins: Vec<f64> = runs.iter().filter_map(|r| r.1).collect();
        let min = (!mins.is_empty()).then(|| median(&mins));
        Some((median(&figures), min, runs.len()))
    }
}

fn text(this: &Path, other: &Path, a: &Series, b: &Series) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "a: {}\nb: {}", this.display(), other.display());
    let _ = writeln!(
        out,
        "medians of the runs' figures (of their lowest rounds in brackets), and b - a\n"
    );
    let _ = writeln!(out, "{:<34} {:>18} {:>18} {:>8}", "row", "a", "b", "b - a");
    let rows: std::collections::BTreeSet<&String> = a.runs.keys().chain(b.runs.keys()).collect();
    for row in rows {
        let show = |s: Option<(f64, Option<f64>, usize)>| match s {
            Some((m, Some(min), _)) => format!("{m:.1} ({min:.1})"),
            Some((m, None, _)) => format!("{m:.2}"),
            None => "-".into(),
        };
        let (sa, sb) = (a.summary(row), b.summary(row));
        let diff = match (sa, sb) {
            (Some(x), Some(y)) => format!("{:+.1}", y.0 - x.0),
            _ => "-".into(),
        };
        let _ = writeln!(out, "{row:<34} {:>18} {:>18} {diff:>8}", show(sa), show(sb));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_comparisons_own_options_are_not_passed_on() {
        let args = [
            "--suite",
            "dataplane",
            "--compare",
            "/x",
            "--alternations=4",
            "--case",
            "c",
        ]
        .map(OsString::from)
        .to_vec();
        let pass: Vec<String> = passed_on(args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(pass, ["--suite", "dataplane", "--case", "c"]);
    }

    #[test]
    fn medians_of_figures_and_of_minimums() {
        let mut s = Series::default();
        for (x, min) in [(120.0, 110.0), (100.0, 99.0), (130.0, 101.0)] {
            s.add(&serde_json::json!({
                "floor_ns": 21.5,
                "dataplane": [{"case": "c", "ns_per_packet": x, "ns_min": min}],
                "live": [],
            }));
        }
        assert_eq!(s.summary("c ns"), Some((120.0, Some(101.0), 3)));
        assert_eq!(s.summary("floor ns"), Some((21.5, None, 3)));
        assert_eq!(s.summary("nothing"), None);
    }
}
