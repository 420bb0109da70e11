//! The `multiply-shift` flow hash: `base + Σ mul[i] * word[i]` in 64-bit arithmetic,
//! over the tuple's ten 32-bit words, with `base` and `mul` drawn from the seed, then
//! one xorshift-multiply step.
//!
//! - The sum is Thorup's strongly universal vector hash in its top 32 bits ("High Speed
//!   Hashing for Integers and Strings", 2015: 32-bit inputs, 64-bit keys): which flows
//!   collide depends on the keys, so on the seed.
//! - Its top half alone spreads structured flows (one client's consecutive ports) over
//!   the low bits, which pick the bucket, unevenly for some seeds: 0 to 822 flows a
//!   bucket where 256 were due, over 300 seeds in a trial. The last step (`finish`)
//!   makes every bit of the sum reach the low bits: 184 to 334 in the same trial, as
//!   random buckets would give.
//!
//! Every product is independent of the others: the data plane's chain is one multiply,
//! a tree of adds and the last step, where `murmur3` runs ten rounds one after the other.

use super::{murmur3::V4_MAPPED_WORD, FlowTuple, WORDS};

/// `base` and `mul` for `seed`: splitmix64's output stream (Steele, Lea and Flood,
/// "Fast Splittable Pseudorandom Number Generators", 2014) started at the seed, so every
/// node with the seed draws the same.
pub fn keys(seed: u32) -> (u64, [u64; WORDS]) {
    let mut state = u64::from(seed);
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let base = next();
    let mut mul = [0; WORDS];
    for m in &mut mul {
        *m = next();
    }
    (base, mul)
}

/// `base` plus the products of an IPv4-mapped pair's constant words (the first three of
/// each address), the same for every IPv4 flow.
pub fn v4_base(base: u64, mul: &[u64; WORDS]) -> u64 {
    base.wrapping_add(mul[2].wrapping_mul(V4_MAPPED_WORD.into()))
        .wrapping_add(mul[6].wrapping_mul(V4_MAPPED_WORD.into()))
}

/// The hash of `t`.
#[inline(always)]
pub fn hash(base: u64, mul: &[u64; WORDS], t: &FlowTuple) -> u32 {
    let a = t.address_words();
    let words = [
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6],
        a[7],
        t.ports_word(),
        t.proto.into(),
    ];
    let mut h = base;
    for (m, w) in mul.iter().zip(words) {
        h = h.wrapping_add(m.wrapping_mul(w.into()));
    }
    finish(h)
}

/// `hash` of a tuple whose addresses are both IPv4, from `v4_base` (as `murmur3::hash_v4`
/// takes its words).
#[inline(always)]
pub fn hash_v4(v4_base: u64, mul: &[u64; WORDS], src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let p = mul[3]
        .wrapping_mul(src.into())
        .wrapping_add(mul[7].wrapping_mul(dst.into()));
    let q = mul[8]
        .wrapping_mul(ports.into())
        .wrapping_add(mul[9].wrapping_mul(proto.into()));
    finish(v4_base.wrapping_add(p).wrapping_add(q))
}

/// The sum's halves folded, times an odd constant (2^64 over the golden ratio), the top
/// half taken: each output bit then depends on every bit of the sum.
#[inline(always)]
fn finish(sum: u64) -> u32 {
    ((sum ^ (sum >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}
