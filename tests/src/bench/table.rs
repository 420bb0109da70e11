//! The forwarding-table builder as services grow: build time, buckets moved when a
//! backend is added or removed (next to the optimum and Maglev), and balance. The
//! figures come from `lb::table::report`.

use anyhow::Result;
use lb::table::report::{self, Figures};

/// Backend counts measured.
pub const BACKENDS: [usize; 4] = [10, 100, 1_000, 4_096];
/// Table sizes measured, as powers of two: the default and the largest.
pub const BITS: [u32; 2] = [16, 20];

/// Figures for every backend count at every table size.
pub fn measure() -> Result<Vec<Figures>> {
    let mut out = Vec::new();
    for bits in BITS {
        for n in BACKENDS {
            out.push(report::figures(n, bits)?);
        }
    }
    Ok(out)
}
