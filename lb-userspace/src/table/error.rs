//! What can be wrong with a table builder's input.

use std::net::IpAddr;

use lb_common::limits::{MAX_BACKENDS_PER_SERVICE, MAX_TABLE_BITS, MAX_WEIGHT, MIN_TABLE_BITS};

/// Why a table could not be built. The input is checked as a whole before anything is built,
/// and checks do not depend on backend states, so an input that is valid stays valid while
/// health checks flip backends up and down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error(
        "table bits {bits} out of range: a table has 2^{MIN_TABLE_BITS} to 2^{MAX_TABLE_BITS} buckets"
    )]
    BadTableBits { bits: u32 },
    #[error("backend {addr} has weight {weight}, above the maximum {MAX_WEIGHT}")]
    WeightOutOfRange { addr: IpAddr, weight: u32 },
    #[error("backend {addr} is listed twice")]
    DuplicateBackend { addr: IpAddr },
    #[error("backends {first} and {second} both use slot {slot}")]
    DuplicateSlot {
        slot: u32,
        first: IpAddr,
        second: IpAddr,
    },
    #[error("backend {addr} uses slot {slot}, which marks an empty bucket")]
    ReservedSlot { addr: IpAddr, slot: u32 },
    #[error("{count} backends, above the maximum {MAX_BACKENDS_PER_SERVICE} of one service")]
    TooManyBackends { count: usize },
    #[error(
        "{count} backends are more than the {buckets} buckets of the table (use more table bits)"
    )]
    TableTooSmall { count: usize, buckets: usize },
    #[error(
        "previous table has {len} buckets: not a power of two between 2^{MIN_TABLE_BITS} and \
         2^{MAX_TABLE_BITS}"
    )]
    BadPreviousTable { len: usize },
}
