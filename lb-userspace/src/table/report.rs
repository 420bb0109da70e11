//! Figures for the benchmark report (`cargo xtask bench`): build time, balance, and movement
//! against the optimum and against Maglev, for `n` equal-weight backends.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{builder::first_column, maglev, Candidate, TableError};

/// The service seed the figures are taken with.
const SEED: u32 = 0x1b5e_ed01;
/// Changes averaged per figure: a single one varies by a few percent.
const CHANGES: usize = 4;
/// Builds timed per figure; the fastest counts.
const RUNS: usize = 5;

/// Measured figures for one backend count and table size. Shares are of all buckets.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub backends: usize,
    pub bits: u32,
    /// Microseconds to build the first column on one thread (fastest of a few builds).
    pub build_us: f64,
    /// Maglev's build time for the same input.
    pub maglev_build_us: f64,
    /// The largest backend's buckets over the mean.
    pub max_over_mean: f64,
    /// The smallest backend's buckets over the mean.
    pub min_over_mean: f64,
    /// Share of buckets whose owner changes when one backend is added to `n - 1` (mean of a
    /// few).
    pub moved_add: f64,
    /// The least possible on adding: the new backend's share, `1 / n`.
    pub optimum_add: f64,
    /// The same for Maglev.
    pub maglev_moved_add: f64,
    /// Share of buckets whose owner changes when one backend is removed.
    pub moved_remove: f64,
    /// The least possible on removing: `1 / n`.
    pub optimum_remove: f64,
    pub maglev_moved_remove: f64,
    /// Share of buckets whose owner changes when one backend's weight doubles.
    pub moved_reweight: f64,
    /// The least possible on doubling one weight: `(n - 1) / (n (n + 1))`.
    pub optimum_reweight: f64,
    pub maglev_moved_reweight: f64,
}

impl Figures {
    /// Moved over optimum, on adding, removing and reweighting.
    pub fn ratios(&self) -> [f64; 3] {
        [
            self.moved_add / self.optimum_add,
            self.moved_remove / self.optimum_remove,
            self.moved_reweight / self.optimum_reweight,
        ]
    }

    /// The same for Maglev.
    pub fn maglev_ratios(&self) -> [f64; 3] {
        [
            self.maglev_moved_add / self.optimum_add,
            self.maglev_moved_remove / self.optimum_remove,
            self.maglev_moved_reweight / self.optimum_reweight,
        ]
    }
}

/// Backend `i` of a synthetic service: 10.x.y.z, weight 1, slot `i`.
pub fn synthetic_backend(i: u32) -> Candidate {
    Candidate::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 1, i)
}

type FirstColumn = fn(&[Candidate], u32, u32) -> Result<Vec<u32>, TableError>;

fn moved(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

/// Mean moved share over a few changes of each kind: (add, remove, reweight). Adding is
/// measured as going from `n - 1` to the `n` backends, so `n` may be the largest count allowed.
fn movement(f: FirstColumn, base: &[Candidate], bits: u32) -> Result<[f64; 3], TableError> {
    let n = base.len();
    let before = f(base, bits, SEED)?;
    let mut sum = [0.0; 3];
    for c in 0..CHANGES {
        // Spread the changed backends over the list; adds and removes use different ones.
        let added = (2 * c * n) / (2 * CHANGES);
        let removed = ((2 * c + 1) * n) / (2 * CHANGES);

        let mut without = base.to_vec();
        without.remove(added);
        sum[0] += moved(&f(&without, bits, SEED)?, &before);

        let mut without = base.to_vec();
        without.remove(removed);
        sum[1] += moved(&before, &f(&without, bits, SEED)?);

        let mut reweighted = base.to_vec();
        reweighted[removed].weight = 2;
        sum[2] += moved(&before, &f(&reweighted, bits, SEED)?);
    }
    Ok(sum.map(|s| s / CHANGES as f64))
}

fn fastest(f: FirstColumn, backends: &[Candidate], bits: u32) -> Result<Duration, TableError> {
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        std::hint::black_box(f(std::hint::black_box(backends), bits, SEED)?);
        best = best.min(t.elapsed());
    }
    Ok(best)
}

/// Measures the builder and Maglev for `backends` equal-weight backends and `2^bits` buckets.
/// Takes about 20 builds of each; meant for release builds. Needs at least two backends.
pub fn figures(backends: usize, bits: u32) -> Result<Figures, TableError> {
    assert!(backends >= 2, "figures need at least two backends");
    let base: Vec<Candidate> = (0..backends as u32).map(synthetic_backend).collect();
    let table = first_column(&base, bits, SEED)?;
    let mut counts = vec![0u32; backends];
    for &slot in &table {
        counts[slot as usize] += 1;
    }
    let mean = table.len() as f64 / backends as f64;
    let [moved_add, moved_remove, moved_reweight] = movement(first_column, &base, bits)?;
    let [maglev_moved_add, maglev_moved_remove, maglev_moved_reweight] =
        movement(maglev::first_column, &base, bits)?;
    let n = backends as f64;
    Ok(Figures {
        backends,
        bits,
        build_us: fastest(first_column, &base, bits)?.as_secs_f64() * 1e6,
        maglev_build_us: fastest(maglev::first_column, &base, bits)?.as_secs_f64() * 1e6,
        max_over_mean: f64::from(*counts.iter().max().unwrap_or(&0)) / mean,
        min_over_mean: f64::from(*counts.iter().min().unwrap_or(&0)) / mean,
        moved_add,
        optimum_add: 1.0 / n,
        maglev_moved_add,
        moved_remove,
        optimum_remove: 1.0 / n,
        maglev_moved_remove,
        moved_reweight,
        optimum_reweight: (n - 1.0) / (n * (n + 1.0)),
        maglev_moved_reweight,
    })
}
