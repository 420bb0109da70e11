//! Maglev's table (Eisenbud et al., NSDI 2016) as a yardstick for movement in tests and
//! benchmarks; never used to forward.
//!
//! Each backend has a permutation of the buckets (`offset + j * skip`, the skip odd so it
//! covers a power-of-two table) and the backends take turns claiming their next free bucket.
//! Weights as in weighted variants of it: a backend gains its weight in credit every round
//! and claims one bucket per `max weight` of credit. Backends take turns in the builder's
//! canonical order, so this table is also a function of the state alone.

use lb_common::maps::NO_BACKEND;

use super::{
    builder::{owners, validate},
    score::fmix64,
    Candidate, TableError,
};

/// Maglev's first column for the same input as [`super::first_column`].
pub fn first_column(backends: &[Candidate], bits: u32, seed: u32) -> Result<Vec<u32>, TableError> {
    validate(backends, bits)?;
    let size = 1usize << bits;
    let mask = size as u64 - 1;
    let owners = owners(backends, seed);
    let mut table = vec![NO_BACKEND; size];
    let Some(max_weight) = owners.iter().map(|o| o.weight).max() else {
        return Ok(table);
    };
    let offset: Vec<u64> = owners
        .iter()
        .map(|o| fmix64(o.key ^ 0x6f66) & mask)
        .collect();
    let skip: Vec<u64> = owners
        .iter()
        .map(|o| (fmix64(o.key ^ 0x736b) & mask) | 1)
        .collect();
    let mut next = vec![0u64; owners.len()];
    let mut credit = vec![0u32; owners.len()];
    let mut filled = 0;
    loop {
        for (i, o) in owners.iter().enumerate() {
            credit[i] += o.weight;
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                loop {
                    let c = ((offset[i] + next[i] * skip[i]) & mask) as usize;
                    next[i] += 1;
                    if table[c] == NO_BACKEND {
                        table[c] = o.slot;
                        break;
                    }
                }
                filled += 1;
                if filled == size {
                    return Ok(table);
                }
            }
        }
    }
}
