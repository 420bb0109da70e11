//! What a new table would change: how many buckets change owner, from whom to whom. Shown
//! before a change is applied (`lb plan`).

use std::collections::BTreeMap;

use lb_common::maps::{Bucket, NO_BACKEND};
use serde::Serialize;

/// Buckets that change owner between two tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Buckets compared: the larger table's size.
    pub buckets: usize,
    /// Buckets whose `first` changes.
    pub changed: usize,
    /// The changes per (from, to) pair of slots ([`NO_BACKEND`] for none), sorted by
    /// (from, to).
    pub moves: Vec<Move>,
}

/// Buckets that pass from one backend to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Move {
    pub from: u32,
    pub to: u32,
    pub buckets: usize,
}

impl Plan {
    /// The share of flows that would land on another backend.
    pub fn changed_share(&self) -> f64 {
        if self.buckets == 0 {
            0.0
        } else {
            self.changed as f64 / self.buckets as f64
        }
    }
}

/// Compares the `first` columns of two tables. Tables of different sizes are compared as the
/// flow hash indexes them (bucket `i` of the larger is bucket `i mod size` of the smaller);
/// an empty table reads as all [`NO_BACKEND`].
pub fn plan(old: &[Bucket], new: &[Bucket]) -> Plan {
    let buckets = old.len().max(new.len());
    let at = |t: &[Bucket], i: usize| {
        if t.is_empty() {
            NO_BACKEND
        } else {
            t[i % t.len()].first
        }
    };
    let mut pairs: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut changed = 0;
    for i in 0..buckets {
        let (from, to) = (at(old, i), at(new, i));
        if from != to {
            changed += 1;
            *pairs.entry((from, to)).or_default() += 1;
        }
    }
    Plan {
        buckets,
        changed,
        moves: pairs
            .into_iter()
            .map(|((from, to), buckets)| Move { from, to, buckets })
            .collect(),
    }
}
