//! Measuring a backend's utilisation: busy CPU time over the CPU time it may use, between
//! two samples. Sources: the whole host (`/proc/stat`), a cgroup (its usage against its
//! CPU quota, or against every CPU without one; cgroup v1 or v2), or a figure some other
//! program writes to a file.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};

/// Where a node's utilisation comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// All CPUs of the host.
    Host,
    /// A cgroup by its path below the hierarchy's root (`lb/web`).
    Cgroup(String),
    /// A file holding one number, the utilisation as a fraction (0.63).
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read {what} from {text:?}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        text: String,
    },
    #[error("cgroup {0}: neither cgroup v2 (cpu.stat) nor v1 (cpuacct.usage) has it")]
    NoCgroup(String),
}

/// Reads a source's counters and turns two readings into a utilisation.
#[derive(Debug)]
pub struct Meter {
    source: Source,
    root: PathBuf,
    last: Option<Sample>,
}

/// Busy and available CPU time so far, in the same unit.
#[derive(Clone, Copy, Debug)]
struct Sample {
    busy: f64,
    available: f64,
}

impl Meter {
    pub fn new(source: Source) -> Self {
        Self::with_root(source, "/sys/fs/cgroup")
    }

    /// A meter whose cgroups live below `root` instead of `/sys/fs/cgroup`.
    pub fn with_root(source: Source, root: impl Into<PathBuf>) -> Self {
        Meter {
            source,
            root: root.into(),
            last: None,
        }
    }

    /// The utilisation since the previous call (`None` on the first, or when no time
    /// passed), clamped to 0..=1; a file's figure as it is.
    pub fn sample(&mut self) -> Result<Option<f64>, MeasureError> {
        let now = match &self.source {
            Source::File(path) => {
                let text = read(path)?;
                let u = text.trim().parse::<f64>().ok().filter(|u| u.is_finite());
                let u = u.ok_or_else(|| parse_error(path, "a utilisation", &text))?;
                return Ok(Some(u.max(0.0)));
            }
            Source::Host => host()?,
            Source::Cgroup(name) => cgroup(&self.root, name)?,
        };
        let last = self.last.replace(now);
        Ok(last.and_then(|l| {
            let available = now.available - l.available;
            (available > 0.0).then(|| ((now.busy - l.busy) / available).clamp(0.0, 1.0))
        }))
    }
}

fn read(path: &Path) -> Result<String, MeasureError> {
    fs::read_to_string(path).map_err(|source| MeasureError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_error(path: &Path, what: &'static str, text: &str) -> MeasureError {
    MeasureError::Parse {
        path: path.to_owned(),
        what,
        text: text.chars().take(80).collect(),
    }
}

/// `/proc/stat`'s first line: busy is everything but idle and iowait, in ticks.
fn host() -> Result<Sample, MeasureError> {
    let path = Path::new("/proc/stat");
    let text = read(path)?;
    let ticks: Vec<f64> = text
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if ticks.len() < 5 {
        return Err(parse_error(path, "the cpu line", &text));
    }
    // user nice system idle iowait irq softirq steal ...; guest time is in user already.
    let total: f64 = ticks.iter().take(8).sum();
    Ok(Sample {
        busy: total - ticks[3] - ticks[4],
        available: total,
    })
}

/// A cgroup's CPU usage in nanoseconds and the wall time times its CPUs (the quota's, or
/// all of them), from v2 files when the cgroup has them, else from v1's cpuacct and cpu.
fn cgroup(root: &Path, name: &str) -> Result<Sample, MeasureError> {
    let at = Instant::now();
    let wall = at.duration_since(*EPOCH).as_nanos() as f64;
    let v2 = root.join(name).join("cpu.stat");
    let (usage_ns, cpus) = if v2.exists() {
        let stat = read(&v2)?;
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| parse_error(&v2, "usage_usec", &stat))?;
        let max = root.join(name).join("cpu.max");
        let quota = match fs::read_to_string(&max) {
            Ok(text) => quota_v2(&text).ok_or_else(|| parse_error(&max, "the quota", &text))?,
            Err(_) => None,
        };
        (usec * 1e3, quota)
    } else {
        let usage = root.join("cpuacct").join(name).join("cpuacct.usage");
        if !usage.exists() {
            return Err(MeasureError::NoCgroup(name.to_owned()));
        }
        let text = read(&usage)?;
        let ns = text
            .trim()
            .parse::<f64>()
            .map_err(|_| parse_error(&usage, "nanoseconds", &text))?;
        let cpu = root.join("cpu").join(name);
        let quota = read(&cpu.join("cpu.cfs_quota_us"))?;
        let period = read(&cpu.join("cpu.cfs_period_us"))?;
        (ns, quota_v1(&quota, &period))
    };
    let cpus = cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64));
    Ok(Sample {
        busy: usage_ns,
        available: wall * cpus,
    })
}

/// A fixed origin for wall time, so that samples subtract.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// CPUs a v2 `cpu.max` ("50000 100000", or "max 100000") allows; `Some(None)` for no limit.
fn quota_v2(text: &str) -> Option<Option<f64>> {
    let mut it = text.split_whitespace();
    let (quota, period) = (it.next()?, it.next()?.parse::<f64>().ok()?);
    if quota == "max" {
        return Some(None);
    }
    let quota = quota.parse::<f64>().ok()?;
    (period > 0.0).then_some(Some(quota / period))
}

/// CPUs a v1 quota and period allow; none for no quota (-1).
fn quota_v1(quota: &str, period: &str) -> Option<f64> {
    let quota = quota.trim().parse::<f64>().ok()?;
    let period = period.trim().parse::<f64>().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests;
