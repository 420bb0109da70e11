//! The service index: an array in front of the `SERVICES` hash map (`open_index`), so the
//! client path finds a packet's service with a few inlined array reads instead of a
//! hash-map helper call (the hash lookup was about 65 ns a packet on the benchmark
//! machine, two floors).

pub use crate::open_index::{EMPTY, REMOVED, VALID};
use crate::{
    limits::MAX_SERVICES,
    maps::{ServiceKey, ServiceValue},
    open_index::{self, Slot, GOLDEN, MIX},
};

/// Slots of the index: four per service, so windows stay short.
pub const SLOTS: u32 = 4 * MAX_SERVICES;
const _: () = assert!(SLOTS.is_power_of_two());
/// Slots a reader looks at before it asks `SERVICES`.
pub const PROBES: u32 = 8;

/// What the index says about a key.
pub type Probe<'a> = open_index::Probe<'a, ServiceValue>;

/// One slot of the `SERVICE_INDEX` array.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    pub value: ServiceValue,
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceSlot>() == 40);

impl ServiceSlot {
    pub const EMPTY: ServiceSlot = ServiceSlot {
        key: ServiceKey {
            addr: [0; 16],
            port_be: 0,
            proto: 0,
            _pad: 0,
        },
        value: ServiceValue {
            id: 0,
            table_offset: 0,
            table_bits: 0,
            flags: 0,
        },
        state: EMPTY,
        _pad: [0; 3],
    };
}

impl Slot for ServiceSlot {
    type Key = ServiceKey;
    type Value = ServiceValue;
    type Words = [u32; 5];
    const SLOTS: u32 = SLOTS;
    const PROBES: u32 = PROBES;

    /// The key as five words, each read with one aligned load (`ServiceKey` is 4-aligned).
    #[inline(always)]
    fn words(key: &ServiceKey) -> [u32; 5] {
        // SAFETY: the key is 20 bytes, 4-byte aligned, with no uninitialised padding.
        unsafe { crate::addr::aligned_words((key as *const ServiceKey).cast()) }
    }

    #[inline(always)]
    fn home(key: &ServiceKey) -> u32 {
        home(key)
    }

    fn new(key: ServiceKey, value: ServiceValue, state: u8) -> Self {
        ServiceSlot {
            key,
            value,
            state,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn key(&self) -> &ServiceKey {
        &self.key
    }

    #[inline(always)]
    fn value(&self) -> &ServiceValue {
        &self.value
    }

    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

/// The key's home slot: the top bits of a multiplicative hash of the key's words. Two
/// multiplications deep, where two rounds of `fmix32` were six steps (about 5 ns of the
/// IPv4 client path here, measured). The keys are the operator's services, not a
/// client's choosing, and a crowded window only sends a search to `SERVICES`.
#[inline(always)]
pub fn home(key: &ServiceKey) -> u32 {
    let w = ServiceSlot::words(key);
    let addr = w[0] ^ w[1].rotate_left(8) ^ w[2].rotate_left(16) ^ w[3].rotate_left(24);
    let h = (addr ^ w[4].wrapping_mul(GOLDEN)).wrapping_mul(MIX);
    h >> (32 - SLOTS.trailing_zeros())
}

/// The slots a search for `key` may look at, in order.
#[inline(always)]
pub fn window(key: &ServiceKey) -> impl Iterator<Item = u32> {
    open_index::window::<ServiceSlot>(key)
}

/// Looks `key` up, reading slots with `slot` (the array's lookup).
#[inline(always)]
pub fn probe<'a>(key: &ServiceKey, slot: impl Fn(u32) -> Option<&'a ServiceSlot>) -> Probe<'a> {
    open_index::probe(key, slot)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::HashMap, vec, vec::Vec};

    use super::*;
    use crate::addr::v4_mapped;

    fn key(last: u8, port: u16) -> ServiceKey {
        ServiceKey {
            addr: v4_mapped([10, 100, 0, last]),
            port_be: port.to_be(),
            proto: 6,
            _pad: 0,
        }
    }

    #[test]
    fn homes_spread_over_the_slots() {
        // 1024 services on 32 VIPs: no window's home holds more than a few of them.
        let mut per_home = HashMap::new();
        for vip in 0..32 {
            for port in 0..32 {
                *per_home.entry(home(&key(vip, 80 + port))).or_insert(0) += 1;
            }
        }
        assert!(per_home.len() > 800, "{} distinct homes", per_home.len());
        assert!(per_home.values().all(|&n| n <= 4));
    }

    #[test]
    fn a_search_stops_at_an_empty_slot_and_skips_removed_ones() {
        let k = key(1, 80);
        let mut slots = vec![ServiceSlot::EMPTY; SLOTS as usize];
        let get = |s: &Vec<ServiceSlot>| {
            let s = s.clone();
            move |k: &ServiceKey| match probe(k, |i| s.get(i as usize)) {
                Probe::Found(v) => Some(Ok(v.id)),
                Probe::Absent => None,
                Probe::Unindexed => Some(Err(())),
            }
        };
        assert_eq!(get(&slots)(&k), None);
        let h = home(&k) as usize;
        let other = key(2, 80);
        slots[h] = ServiceSlot {
            key: other,
            state: REMOVED,
            ..ServiceSlot::EMPTY
        };
        slots[(h + 1) % SLOTS as usize] = ServiceSlot {
            key: k,
            value: ServiceValue {
                id: 7,
                ..ServiceSlot::EMPTY.value
            },
            state: VALID,
            _pad: [0; 3],
        };
        assert_eq!(get(&slots)(&k), Some(Ok(7)));
        // A full window without the key: the hash map decides.
        for i in window(&k) {
            if slots[i as usize].state == EMPTY {
                slots[i as usize] = ServiceSlot {
                    key: other,
                    state: VALID,
                    ..ServiceSlot::EMPTY
                };
            }
        }
        slots[(h + 1) % SLOTS as usize].state = REMOVED;
        assert_eq!(get(&slots)(&k), Some(Err(())));
    }
}
