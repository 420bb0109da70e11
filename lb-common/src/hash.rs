//! The flow hash: one function, compiled into the XDP program and used on the host to
//! predict where a flow goes (tests, `lb` tooling). It is MurmurHash3's 32-bit mixing
//! over a fixed 10-word input, so the XDP program runs it without loops or tables.
//!
//! Words are read little-endian from the address bytes, making the result the same on
//! every host and in BPF (which is little-endian here).

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

impl FlowTuple {
    /// `flow_hash` of the tuple with `key`'s seed; `v4`: both addresses are IPv4, the
    /// cheaper way.
    #[inline(always)]
    pub fn hash(&self, key: &FlowHashKey, v4: bool) -> u32 {
        if v4 {
            let w = self.address_words();
            let ports = ((self.src_port as u32) << 16) | self.dst_port as u32;
            flow_hash_v4(key.v4_head, w[3], w[7], ports, self.proto)
        } else {
            flow_hash(key.seed, self)
        }
    }

    /// The addresses as eight words (`src`'s, then `dst`'s), each read little-endian, with
    /// one aligned load a word: the tuple is `repr(C, align(4))` with the addresses first.
    #[inline(always)]
    fn address_words(&self) -> [u32; 8] {
        // SAFETY: the 32 bytes from the start are the two addresses, 4-byte aligned.
        unsafe { crate::addr::aligned_words::<8>((self as *const Self).cast()) }.map(u32::from_le)
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

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    times5_plus_n((h ^ k).rotate_left(13))
}

/// `r * 5 + 0xe654_6b64`, the last steps of `mix`. On BPF a shift and two adds, two
/// steps deep: the JIT makes a multiply an `imul`, three cycles on the hash's dependent
/// chain before its add, and LLVM would turn the shift back into a multiply.
#[inline(always)]
fn times5_plus_n(r: u32) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        let mut r = u64::from(r);
        // SAFETY: register arithmetic only; the upper half is ignored by the `as u32`.
        unsafe {
            core::arch::asm!(
                "{t} = {r}",
                "{t} <<= 2",
                "{r} += {n}",
                "{r} += {t}",
                r = inout(reg) r,
                t = out(reg) _,
                n = const 0xe654_6b64u32 as i32,
                options(pure, nomem, nostack),
            );
        }
        r as u32
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        r.wrapping_mul(5).wrapping_add(0xe654_6b64)
    }
}

/// MurmurHash3's finaliser: every input bit affects every output bit.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Seeded hash of a flow. The seed is the same on every load-balancer node of a fleet,
/// so they all send a flow to the same bucket.
#[inline(always)]
pub fn flow_hash(seed: u32, t: &FlowTuple) -> u32 {
    let mut h = seed;
    for w in t.address_words() {
        h = mix(h, w);
    }
    h = mix(h, ((t.src_port as u32) << 16) | t.dst_port as u32);
    h = mix(h, t.proto as u32);
    fmix32(h ^ 40)
}

/// What the data plane hashes flows with (the value of the `FLOW_HASH` map): the seed, and
/// the hash's state after the first three words of an IPv4 flow, which are the same for
/// every IPv4 flow. Worked out once by the agent, not per packet: each mixing step waits
/// for the one before it, and these three were about a quarter of the IPv4 hash's chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHashKey {
    pub seed: u32,
    pub v4_head: u32,
}

impl FlowHashKey {
    pub fn new(seed: u32) -> Self {
        FlowHashKey {
            seed,
            v4_head: v4_head(seed),
        }
    }
}

/// `flow_hash`'s state after an IPv4-mapped source's first three words.
#[inline(always)]
fn v4_head(seed: u32) -> u32 {
    mix(mix(mix(seed, 0), 0), V4_MAPPED_WORD)
}

/// `flow_hash` of a tuple whose addresses are both IPv4 (`::ffff:a.b.c.d`): the same
/// value, starting from `head` (`FlowHashKey::v4_head`), with the mapped prefix's
/// constant words folded into the mixing by the compiler. `src` and `dst`: each address's
/// last word, as `address_words` reads it.
#[inline(always)]
pub fn flow_hash_v4(head: u32, src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let mut h = mix(head, src);
    h = mix(h, 0);
    h = mix(h, 0);
    h = mix(h, V4_MAPPED_WORD);
    h = mix(h, dst);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    fmix32(h ^ 40)
}

/// The third word of an IPv4-mapped address (bytes 0, 0, 0xff, 0xff), as `address_words`
/// reads it.
const V4_MAPPED_WORD: u32 = 0xffff_0000;

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
    fn known_value_is_stable() {
        // Pinned so that a change to the hash, which would move every flow of a running
        // fleet, cannot go unnoticed.
        assert_eq!(flow_hash(0, &tuple(40000)), 0xeafd_d353);
    }

    #[test]
    fn seed_and_every_field_matter() {
        let base = tuple(1234);
        let h = flow_hash(7, &base);
        assert_ne!(h, flow_hash(8, &base));
        assert_ne!(h, flow_hash(7, &tuple(1235)));
        assert_ne!(h, flow_hash(7, &base.reversed()));
        let mut t = base;
        t.proto = 17;
        assert_ne!(h, flow_hash(7, &t));
    }

    #[test]
    fn source_port_in_range() {
        for h in [0, u32::MAX, 0x1234_5678] {
            assert!(outer_source_port(h) >= 49152);
        }
    }

    proptest::proptest! {
        #[test]
        fn the_ipv4_hash_is_the_hash(seed: u32, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) {
            let t = FlowTuple {
                src: v4_mapped(src),
                dst: v4_mapped(dst),
                src_port: sport,
                dst_port: dport,
                proto,
            };
            let ports = ((sport as u32) << 16) | dport as u32;
            let key = FlowHashKey::new(seed);
            let v4 = flow_hash_v4(key.v4_head, u32::from_le_bytes(src), u32::from_le_bytes(dst), ports, proto);
            proptest::prop_assert_eq!(v4, flow_hash(seed, &t));
            proptest::prop_assert_eq!(t.hash(&key, true), flow_hash(seed, &t));
            proptest::prop_assert_eq!(t.hash(&key, false), flow_hash(seed, &t));
        }

        #[test]
        fn buckets_spread_evenly(seed: u32) {
            // 64k flows into 256 buckets: each near 256, none wildly off.
            let mut counts = [0u32; 256];
            for i in 0..65536u32 {
                let mut t = tuple((i & 0xffff) as u16);
                t.src[15] = (i >> 8) as u8;
                counts[bucket_index(flow_hash(seed, &t), 8) as usize] += 1;
            }
            let max = *counts.iter().max().unwrap();
            let min = *counts.iter().min().unwrap();
            proptest::prop_assert!(max < 360 && min > 160, "min {min} max {max}");
        }
    }
}
