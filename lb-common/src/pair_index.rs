//! The pair index: the counters of each (service, backend) pair in a per-CPU array
//! (`PAIR_STATS`), found through an array of keys (`PAIR_INDEX`) with inlined reads, so
//! a forwarded packet is counted without a hash-map helper call (in this kernel the
//! lookup and the functions under it each return through the return thunk, about 9 ns
//! apiece on the benchmark machine).
//!
//! Open addressing as in `open_index`, with the same slot states and the same write
//! order (a slot's key changes only while it is not `VALID`, going live or being removed
//! changes `state` alone, a slot never becomes `EMPTY` again). A pair's counters are the
//! `PAIR_STATS` entry of its slot. A pair whose window is full is counted in
//! `SERVICE_BACKEND_STATS` instead, as before the index.

use crate::{
    hash::fmix32,
    limits::MAX_SERVICE_BACKENDS,
    maps::ServiceBackendKey,
    open_index::{EMPTY, VALID},
};

/// Slots of the index: one per pair at the limit, so windows stay short below it.
pub const SLOTS: u32 = MAX_SERVICE_BACKENDS;
const _: () = assert!(SLOTS.is_power_of_two());
/// Slots a reader looks at before it counts in `SERVICE_BACKEND_STATS`.
pub const PROBES: u32 = 8;

/// One slot of the `PAIR_INDEX` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairSlot {
    pub key: ServiceBackendKey,
    /// `open_index::EMPTY`, `VALID` or `REMOVED`.
    pub state: u32,
}
const _: () = assert!(core::mem::size_of::<PairSlot>() == 12);

impl PairSlot {
    pub const EMPTY: PairSlot = PairSlot {
        key: ServiceBackendKey {
            service: 0,
            backend: 0,
        },
        state: EMPTY as u32,
    };
}

/// The slots a search for `key` may look at, in order.
#[inline(always)]
pub fn window(key: &ServiceBackendKey) -> impl Iterator<Item = u32> {
    let home = fmix32(key.service ^ fmix32(key.backend));
    (0..PROBES).map(move |i| (home + i) & (SLOTS - 1))
}

/// Where a pair is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// In `PAIR_STATS` at this slot.
    Slot(u32),
    /// Nowhere: the agent opened no such pair.
    Absent,
    /// In `SERVICE_BACKEND_STATS`.
    Unindexed,
}

/// Looks `key` up, reading slots with `slot` (the array's lookup).
#[inline(always)]
pub fn probe<'a>(key: &ServiceBackendKey, slot: impl Fn(u32) -> Option<&'a PairSlot>) -> Probe {
    for i in window(key) {
        let Some(s) = slot(i) else {
            return Probe::Unindexed;
        };
        if s.state == EMPTY as u32 {
            return Probe::Absent;
        }
        if s.state == VALID as u32 && s.key == *key {
            return Probe::Slot(i);
        }
    }
    Probe::Unindexed
}
