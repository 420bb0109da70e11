//! The `murmur3` flow hash: MurmurHash3's 32-bit mixing over the tuple's ten words, one
//! dependent round after the other. The hash of every lb before `multiply-shift`, kept
//! so that a fleet that runs it keeps its flows where they are.

use super::FlowTuple;

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

/// The seeded hash of a flow.
#[inline(always)]
pub fn hash(seed: u32, t: &FlowTuple) -> u32 {
    let mut h = seed;
    for w in t.address_words() {
        h = mix(h, w);
    }
    h = mix(h, t.ports_word());
    h = mix(h, t.proto as u32);
    fmix32(h ^ 40)
}

/// `hash`'s state after an IPv4-mapped source's first three words, the same for every
/// IPv4 flow: worked out once by the agent (`FlowHashKey::v4_head`), not per packet.
#[inline(always)]
pub fn v4_head(seed: u32) -> u32 {
    mix(mix(mix(seed, 0), 0), V4_MAPPED_WORD)
}

/// `hash` of a tuple whose addresses are both IPv4 (`::ffff:a.b.c.d`): the same value,
/// starting from `head` (`v4_head`), with the mapped prefix's constant words folded into
/// the mixing by the compiler. `src` and `dst`: each address's last word, as
/// `FlowTuple::address_words` reads it.
#[inline(always)]
pub fn hash_v4(head: u32, src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
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
pub(super) const V4_MAPPED_WORD: u32 = 0xffff_0000;
