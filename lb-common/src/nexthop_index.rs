//! The next-hop index: an array in front of the `NEXTHOPS_BY_ADDR` hash map (`open_index`),
//! so the backend path finds the next hop of a packet it passes on with a few inlined
//! array reads instead of a hash-map helper call (about 23 ns a packet on the benchmark
//! machine, docs/benchmarks.md).

use crate::{
    addr,
    limits::MAX_BACKENDS,
    maps::NextHopEntry,
    open_index::{self, Slot, GOLDEN, MIX},
};

/// Slots of the index: one per entry at the limit, as `NEXTHOPS_BY_ADDR` has.
pub const SLOTS: u32 = MAX_BACKENDS;
const _: () = assert!(SLOTS.is_power_of_two());
/// Slots a reader looks at before it asks `NEXTHOPS_BY_ADDR`: few, as each one searched
/// is code in the entry point (there are far fewer next hops than slots).
pub const PROBES: u32 = 2;

/// What the index says about an address.
pub type Probe<'a> = open_index::Probe<'a, NextHopEntry>;

/// One slot of the `NEXTHOP_INDEX` array; the default one is `EMPTY`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopSlot {
    pub addr: [u8; 16],
    pub entry: NextHopEntry,
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NextHopSlot>() == 40);
const _: () = assert!(open_index::EMPTY == 0, "the default slot is empty");

impl Slot for NextHopSlot {
    type Key = [u8; 16];
    type Value = NextHopEntry;
    type Words = [u64; 2];
    const SLOTS: u32 = SLOTS;
    const PROBES: u32 = PROBES;

    #[inline(always)]
    fn words(a: &[u8; 16]) -> [u64; 2] {
        pair(addr::words(a))
    }

    /// Four aligned loads (the slot is 4-aligned, its address first).
    #[inline(always)]
    fn key_words(&self) -> [u64; 2] {
        // SAFETY: `addr` is the first field of a 4-aligned `repr(C)` struct.
        pair(unsafe { addr::aligned_words(self.addr.as_ptr()) })
    }

    #[inline(always)]
    fn home(a: &[u8; 16]) -> u32 {
        home_of(Self::words(a))
    }

    fn new(addr: [u8; 16], entry: NextHopEntry, state: u8) -> Self {
        NextHopSlot {
            addr,
            entry,
            state,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn key(&self) -> &[u8; 16] {
        &self.addr
    }

    #[inline(always)]
    fn value(&self) -> &NextHopEntry {
        &self.entry
    }

    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

/// An address's words (`addr::words`) as two: two registers held across a search, where
/// more would be spilled to the entry point's frame, which has no room to spare.
#[inline(always)]
pub fn pair(w: [u32; 4]) -> [u64; 2] {
    let join = |a: u32, b: u32| {
        let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]])
    };
    [join(w[0], w[1]), join(w[2], w[3])]
}

/// The home slot of an address, as `pair` gives it: the top bits of a multiplicative hash,
/// two multiplications deep (two rounds of `fmix32` were six steps on the backend path).
/// The addresses are the operator's next hops, not a client's choosing, and a crowded
/// window only sends a search to `NEXTHOPS_BY_ADDR`.
#[inline(always)]
pub fn home_of([hi, lo]: [u64; 2]) -> u32 {
    let fold = |w: u64| (w as u32) ^ ((w >> 32) as u32).rotate_left(16);
    let h = (fold(hi) ^ fold(lo).wrapping_mul(GOLDEN)).wrapping_mul(MIX);
    h >> (32 - SLOTS.trailing_zeros())
}

/// Looks up the address whose words (`addr::words`) are `w`, reading slots with `slot`
/// (the array's lookup).
#[inline(always)]
pub fn probe<'a>(w: [u32; 4], slot: impl Fn(u32) -> Option<&'a NextHopSlot>) -> Probe<'a> {
    let want = pair(w);
    open_index::probe_words::<NextHopSlot>(want, home_of(want), slot)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::HashMap, vec};

    use super::*;
    use crate::{addr::v4_mapped, open_index::VALID};

    #[test]
    fn homes_spread_over_the_slots() {
        let mut per_home = HashMap::new();
        for n in 0..4096u32 {
            let [_, a, b, c] = n.to_be_bytes();
            *per_home
                .entry(NextHopSlot::home(&v4_mapped([10, a, b, c])))
                .or_insert(0) += 1;
        }
        assert!(per_home.len() > 3000, "{} distinct homes", per_home.len());
        assert!(per_home.values().all(|&n| n <= 6));
        // IPv6 next hops differing in their last bytes, and in their prefix.
        for vary in [15, 7] {
            let mut per_home = HashMap::new();
            for n in 0..4096u32 {
                let mut a = [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                a[vary - 1..=vary].copy_from_slice(&(n as u16).to_be_bytes());
                *per_home.entry(NextHopSlot::home(&a)).or_insert(0) += 1;
            }
            assert!(
                per_home.len() > 3000,
                "{vary}: {} distinct homes",
                per_home.len()
            );
            assert!(per_home.values().all(|&n| n <= 6), "{vary}");
        }
    }

    #[test]
    fn a_slot_reads_its_key_as_the_words_of_a_search() {
        let a = [0xfd, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let s = NextHopSlot::new(a, NextHopEntry::default(), VALID);
        assert_eq!(s.key_words(), NextHopSlot::words(&a));
    }

    #[test]
    fn an_address_is_found_with_its_entry() {
        let a = v4_mapped([10, 2, 0, 7]);
        let mut slots = vec![NextHopSlot::default(); SLOTS as usize];
        assert_eq!(
            probe(addr::words(&a), |i| slots.get(i as usize)),
            Probe::Absent
        );
        let entry = NextHopEntry {
            ifindex: 3,
            mtu: 1500,
            flags: 1,
            dmac: [2, 0, 0, 0, 0, 1],
            smac: [2, 0, 0, 0, 0, 2],
        };
        slots[NextHopSlot::home(&a) as usize] = NextHopSlot::new(a, entry, VALID);
        assert_eq!(
            probe(addr::words(&a), |i| slots.get(i as usize)),
            Probe::Found(&entry)
        );
        let other = v4_mapped([10, 2, 0, 8]);
        assert_ne!(
            probe(addr::words(&other), |i| slots.get(i as usize)),
            Probe::Found(&entry)
        );
    }
}
