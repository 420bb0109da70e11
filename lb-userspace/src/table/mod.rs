//! The forwarding-table builder: a service's backends in, `2^bits` buckets `{first, second}`
//! out. See `builder` for how owners are chosen, `score` for the hashing and `plan` for what
//! a change would move.
//!
//! - `first` is a function of the backends (addresses, weights, states), the table size and
//!   the seed alone: the unique stable matching of buckets and backends under weighted
//!   rendezvous scores, each backend holding between 3% below and 1% above its weight's share
//!   (exact shares, by largest remainder, below 4,096 buckets per backend). Nodes that saw
//!   different histories agree as soon as they see the same state.
//! - Movement on adding, removing or reweighting one backend, at 2^16 buckets, against the
//!   optimum (Maglev on the same inputs): 1.01x (1.02x) at 10 backends, 1.3x (1.55x) at 100,
//!   4.2x (6.9x) at 1,000, 6.9x (7.5-9x) at 4,096. More buckets per backend move less: 1.9x
//!   (3.0x) at 1,000 backends and 2^20 buckets, hence [`default_table_bits`].
//! - A 2^16-bucket build takes 3 to 4 ms on one core for 10 to 4,096 backends.
//! - `report::figures` measures all of this for `cargo xtask bench`.

mod builder;
mod error;
pub mod maglev;
pub mod plan;
pub mod report;
mod score;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

pub use builder::{build, default_table_bits, first_column};
pub use error::TableError;
pub use plan::{plan, Move, Plan};

/// What a backend may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Owns buckets in proportion to its weight (none at weight 0).
    Active,
    /// Owns no bucket, but stays the second hop of buckets it owned so its connections finish.
    Draining,
    /// Appears nowhere.
    Down,
}

/// One backend of a service as the builder sees it: a candidate owner of buckets (apart
/// from `lb_common::maps::Backend`, what the data plane stores for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The identity that drives hashing: the same on every node.
    pub addr: IpAddr,
    /// Relative share, `0..=MAX_WEIGHT`; 0 drains.
    pub weight: u32,
    pub state: BackendState,
    /// The value stored in buckets for this backend (its index in this node's `BACKENDS`);
    /// may differ between nodes and never affects which buckets it owns.
    pub slot: u32,
}

impl Candidate {
    /// An active backend.
    pub fn new(addr: IpAddr, weight: u32, slot: u32) -> Self {
        Candidate {
            addr,
            weight,
            state: BackendState::Active,
            slot,
        }
    }
}
