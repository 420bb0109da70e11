//! The flow hash: one function per kind, compiled into the XDP program and used on the
//! host to predict where a flow goes (tests, `lb` tooling). The kind and its keys are the
//! `FLOW_HASH` map's value ([`FlowHashKey`]), worked out by the agent from the node's
//! `flow_hash` and `hash_seed`, which every node of a fleet shares.
//!
//! Words are read little-endian from the address bytes, making the result the same on
//! every host and in BPF (which is little-endian here).

mod multiply_shift;
mod murmur3;

pub use murmur3::fmix32;

/// The parts of a packet that pick its bucket. Addresses as in [`crate::addr`];
/// ports in host byte order. Aligned to 4 bytes, with the addresses first, so that the
/// hash reads each address word with one load rather than four byte loads
/// (`address_words`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(4))]
pub struct FlowTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// The words a flow hash reads: eight address words, the ports, the protocol.
pub const WORDS: usize = 10;

impl FlowTuple {
    /// The hash of the tuple with `key`; `v4`: both addresses are IPv4, the cheaper way.
    #[inline(always)]
    pub fn hash(&self, key: &FlowHashKey, v4: bool) -> u32 {
        let multiply_shift = key.kind == FlowHash::MultiplyShift as u32;
        if v4 {
            let w = self.address_words();
            let ports = self.ports_word();
            if multiply_shift {
                multiply_shift::hash_v4(key.v4_base, &key.mul, w[3], w[7], ports, self.proto)
            } else {
                murmur3::hash_v4(key.v4_head, w[3], w[7], ports, self.proto)
            }
        } else if multiply_shift {
            multiply_shift::hash(key.base, &key.mul, self)
        } else {
            murmur3::hash(key.seed, self)
        }
    }

    /// The addresses as eight words (`src`'s, then `dst`'s), each read little-endian, with
    /// one aligned load a word: the tuple is `repr(C, align(4))` with the addresses first.
    #[inline(always)]
    fn address_words(&self) -> [u32; 8] {
        // SAFETY: the 32 bytes from the start are the two addresses, 4-byte aligned.
        unsafe { crate::addr::aligned_words::<8>((self as *const Self).cast()) }.map(u32::from_le)
    }

    /// `dst` in four aligned loads, in memory order.
    #[inline(always)]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: `dst` is at offset 16 of the 4-aligned tuple.
        unsafe { crate::addr::aligned_words(self.dst.as_ptr()) }
    }

    /// Both ports in one word, the source's in the upper half.
    #[inline(always)]
    fn ports_word(&self) -> u32 {
        ((self.src_port as u32) << 16) | self.dst_port as u32
    }

    /// The tuple of the reply direction (used for ICMP errors, which quote the packet
    /// the backend sent).
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        FlowTuple {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }
}

/// Which function hashes flows (the node setting `flow_hash`). Every node of a fleet
/// must run the same with the same seed: a change moves nearly every flow to another
/// bucket, as a change of seed does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[repr(u32)]
pub enum FlowHash {
    /// MurmurHash3's mixing, round after round: the hash of every lb before
    /// `multiply-shift`, and the default, so an upgraded node keeps its flows' buckets.
    #[default]
    Murmur3 = 0,
    /// A strongly universal multiply-shift hash: independent products, a fraction of
    /// `murmur3`'s dependent chain per packet (docs/benchmarks.md).
    MultiplyShift = 1,
}

impl FlowHash {
    /// The kind of a [`FlowHashKey`]'s `kind`.
    pub fn from_kind(kind: u32) -> Option<FlowHash> {
        [FlowHash::Murmur3, FlowHash::MultiplyShift]
            .into_iter()
            .find(|k| *k as u32 == kind)
    }

    /// The name in settings and logs.
    pub fn name(self) -> &'static str {
        match self {
            FlowHash::Murmur3 => "murmur3",
            FlowHash::MultiplyShift => "multiply-shift",
        }
    }
}

/// What the data plane hashes flows with (the value of the `FLOW_HASH` map): the kind,
/// and each kind's keys worked out once by the agent, not per packet, including what
/// every IPv4 flow's constant words contribute.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHashKey {
    /// [`FlowHash`] as `u32`.
    pub kind: u32,
    /// `murmur3`: the seed, and the state after the first three words of an IPv4 flow
    /// (about a quarter of that hash's chain).
    pub seed: u32,
    pub v4_head: u32,
    pub _pad: u32,
    /// `multiply-shift`: the added key, the same plus an IPv4 flow's constant words'
    /// products, and the multipliers.
    pub base: u64,
    pub v4_base: u64,
    pub mul: [u64; WORDS],
}

impl FlowHashKey {
    pub fn new(kind: FlowHash, seed: u32) -> Self {
        let (base, mul) = multiply_shift::keys(seed);
        FlowHashKey {
            kind: kind as u32,
            seed,
            v4_head: murmur3::v4_head(seed),
            _pad: 0,
            base,
            v4_base: multiply_shift::v4_base(base, &mul),
            mul,
        }
    }

    /// The hash of `t` (the data plane's value, by the general way: for the host).
    pub fn hash(&self, t: &FlowTuple) -> u32 {
        t.hash(self, false)
    }
}

/// The bucket of a hash in a table of `1 << bits` buckets.
#[inline(always)]
pub fn bucket_index(hash: u32, bits: u32) -> u32 {
    hash & ((1u32 << bits) - 1)
}

/// The outer UDP source port for a flow: from the hash's upper half (the lower bits pick
/// the bucket), within 49152..=65535, so receivers spread flows over their queues.
#[inline(always)]
pub fn outer_source_port(hash: u32) -> u16 {
    0xc000 | ((hash >> 16) as u16 & 0x3fff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    const KINDS: [FlowHash; 2] = [FlowHash::Murmur3, FlowHash::MultiplyShift];

    fn tuple(sport: u16) -> FlowTuple {
        FlowTuple {
            src: v4_mapped([10, 0, 0, 1]),
            dst: v4_mapped([192, 0, 2, 10]),
            src_port: sport,
            dst_port: 80,
            proto: 6,
        }
    }

    #[test]
    fn known_values_are_stable() {
        // Pinned so that a change to a hash, which would move every flow of a running
        // fleet, cannot go unnoticed.
        assert_eq!(
            FlowHashKey::new(FlowHash::Murmur3, 0).hash(&tuple(40000)),
            0xeafd_d353
        );
        assert_eq!(
            FlowHashKey::new(FlowHash::MultiplyShift, 0).hash(&tuple(40000)),
            0x6181_27e4
        );
    }

    #[test]
    fn seed_and_every_field_matter() {
        for kind in KINDS {
            let base = tuple(1234);
            let k7 = FlowHashKey::new(kind, 7);
            let h = k7.hash(&base);
            assert_ne!(h, FlowHashKey::new(kind, 8).hash(&base), "{kind:?}");
            assert_ne!(h, k7.hash(&tuple(1235)), "{kind:?}");
            assert_ne!(h, k7.hash(&base.reversed()), "{kind:?}");
            let mut t = base;
            t.proto = 17;
            assert_ne!(h, k7.hash(&t), "{kind:?}");
            let mut t = base;
            t.src[0] = 0x20;
            assert_ne!(h, k7.hash(&t), "{kind:?}");
        }
    }

    #[test]
    fn the_kinds_differ() {
        let t = tuple(1234);
        assert_ne!(
            FlowHashKey::new(FlowHash::Murmur3, 7).hash(&t),
            FlowHashKey::new(FlowHash::MultiplyShift, 7).hash(&t)
        );
    }

    #[test]
    fn source_port_in_range() {
        for h in [0, u32::MAX, 0x1234_5678] {
            assert!(outer_source_port(h) >= 49152);
        }
    }

    proptest::proptest! {
        #[test]
        fn the_ipv4_way_is_the_hash(seed: u32, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) {
            let t = FlowTuple {
                src: v4_mapped(src),
                dst: v4_mapped(dst),
                src_port: sport,
                dst_port: dport,
                proto,
            };
            for kind in KINDS {
                let key = FlowHashKey::new(kind, seed);
                proptest::prop_assert_eq!(t.hash(&key, true), key.hash(&t));
            }
            // The murmur3 of every earlier lb, written out as it was.
            let key = FlowHashKey::new(FlowHash::Murmur3, seed);
            proptest::prop_assert_eq!(key.hash(&t), murmur3::hash(seed, &t));
        }
    }

    proptest::proptest! {
        // 64 seeds: each case hashes 256k flows.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn buckets_spread_evenly(seed: u32, v6: bool) {
            // 64k flows of one client address block to one service, into 256 buckets:
            // each near 256, none wildly off.
            for kind in KINDS {
                let key = FlowHashKey::new(kind, seed);
                let mut counts = [0u32; 256];
                for i in 0..65536u32 {
                    let mut t = tuple((i & 0xffff) as u16);
                    t.src[15] = (i >> 8) as u8;
                    if v6 {
                        t.src[0] = 0x20;
                    }
                    counts[bucket_index(key.hash(&t), 8) as usize] += 1;
                }
                let max = *counts.iter().max().unwrap();
                let min = *counts.iter().min().unwrap();
                proptest::prop_assert!(max < 360 && min > 160, "{kind:?}: min {min} max {max}");
            }
        }
    }
}
