//! The forwarding-table builder: a service's backends in, `2^bits` buckets `{first, second}`
//! out. See `builder` for how owners are chosen and `plan` for what a change would move.

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

/// One backend of a service, as the builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// The identity that drives hashing: the same on every node.
    pub addr: IpAddr,
    /// Relative share, `0..=MAX_WEIGHT`; 0 drains.
    pub weight: u32,
    pub state: BackendState,
    /// The value stored in buckets for this backend (its index in this node's `BACKENDS`);
    /// may differ between nodes and never affects which buckets it owns.
    pub slot: u32,
}

impl Backend {
    /// An active backend.
    pub fn new(addr: IpAddr, weight: u32, slot: u32) -> Self {
        Backend {
            addr,
            weight,
            state: BackendState::Active,
            slot,
        }
    }
}
