//! How much a backend wants a bucket.
//!
//! Each backend walks the buckets in an order of its own: a bijection on `0..2^bits` keyed by
//! a hash of the backend's address and the service seed, so it is the same on every node and
//! independent of the other backends, of slot numbers and of input order. The bucket at
//! position `p` of a backend's walk gets the score `E(p) / weight`, where `E(p)` is the
//! exponential quantile of `(p + 1/2) / 2^bits`. Lower is better. For one bucket the scores of
//! the backends are then (close to) independent exponential variables with rates equal to the
//! weights, so the best-scored backend of a bucket is backend `b` with probability
//! `weight_b / total`: weighted rendezvous hashing. Scores are integers so that every platform
//! ranks alike.

/// MurmurHash3's 64-bit finaliser: a bijection in which every input bit affects every output
/// bit.
pub(super) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The hash of a backend's identity: its address (16 bytes, IPv4 mapped) under the service
/// seed. Everything a backend's scores depend on comes from this key and the weight.
pub(super) fn backend_key(addr: &[u8; 16], seed: u32) -> u64 {
    let lo = u64::from_le_bytes(addr[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(addr[8..].try_into().expect("8 bytes"));
    let s = fmix64(u64::from(seed) ^ 0x6c62_7461_626c_6521);
    fmix64(fmix64(s ^ lo) ^ hi)
}

/// A backend's walk over the buckets: a bijection on `0..2^bits`, so every bucket comes
/// exactly once. It is built from steps that are each invertible modulo 2^bits: xor-shift by
/// half the width, multiplication by a key-derived odd number, addition of a key-derived
/// number. Three multiplications, each followed by a shift that folds the high bits they fill
/// back into the low ones, make the walks of different keys look independent.
#[derive(Clone, Copy, Debug)]
pub(super) struct Walk {
    mask: u32,
    shift: u32,
    mul: [u32; 3],
    add: [u32; 2],
}

impl Walk {
    pub(super) fn new(key: u64, bits: u32) -> Self {
        let mut state = key;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            fmix64(state) as u32
        };
        Walk {
            mask: ((1u64 << bits) - 1) as u32,
            shift: bits.div_ceil(2),
            mul: [next() | 1, next() | 1, next() | 1],
            add: [next(), next()],
        }
    }

    /// The bucket at a position of the walk.
    #[inline]
    pub(super) fn bucket(&self, position: u32) -> u32 {
        let (m, s) = (self.mask, self.shift);
        let mut x = position;
        x ^= x >> s;
        x = x.wrapping_mul(self.mul[0]) & m;
        x ^= x >> s;
        x = x.wrapping_mul(self.mul[1]) & m;
        x = x.wrapping_add(self.add[0]) & m;
        x ^= x >> s;
        x = x.wrapping_mul(self.mul[2]) & m;
        (x ^ self.add[1]) & m
    }
}

/// log2(1 + i/256) with 32 fractional bits, i in 0..=256, computed bit by bit (square, and
/// halve when at least 2) in integers at compile time.
const LOG2_TABLE: [u64; 257] = {
    let mut t = [0u64; 257];
    let mut i = 0;
    while i <= 256 {
        // x = 1 + i/256 with 62 fractional bits.
        let mut x: u128 = ((256 + i as u128) << 62) / 256;
        let mut r = 0u64;
        let mut b = 0;
        while b < 32 {
            x = (x * x) >> 62;
            r <<= 1;
            if x >= 2u128 << 62 {
                x >>= 1;
                r |= 1;
            }
            b += 1;
        }
        t[i] = r;
        i += 1;
    }
    t
};

/// log2(x) for x ≥ 1 with 32 fractional bits: a 256-entry table, linearly interpolated,
/// which keeps it strictly increasing at the spacing it is used at.
fn log2_fixed(x: u64) -> u64 {
    debug_assert!(x >= 1);
    let lz = x.leading_zeros();
    let e = u64::from(63 - lz);
    let n = x << lz;
    let i = ((n >> 55) & 0xff) as usize;
    let r = (n >> 32) & 0x7f_ffff;
    let (a, b) = (LOG2_TABLE[i], LOG2_TABLE[i + 1]);
    (e << 32) + a + (((b - a) * r) >> 23)
}

/// `-log2(1 - (p + 1/2) / 2^bits)` with 32 fractional bits: the exponential quantile (in
/// units of ln 2, which ranks alike) at the middle of position `p`. Below 2^37.
#[inline]
pub(super) fn exp_quantile(p: u32, bits: u32) -> u64 {
    ((u64::from(bits) + 1) << 32) - log2_fixed((2u64 << bits) - 2 * u64::from(p) - 1)
}

/// Per-backend factor that turns a quantile into a score: `u64::MAX / weight`.
pub(super) fn weight_factor(weight: u32) -> u64 {
    debug_assert!(weight > 0);
    u64::MAX / u64::from(weight)
}

/// The score of the bucket at position `p` for a backend: about `E(p) * 2^26 / weight`,
/// below 2^63. `E` grows by at least 2^32 / (2^bits ln 2) > 5,900 from one position to the
/// next (at 2^20 buckets), so a score grows by more than 2^22 even at the largest weight: the
/// builder may overwrite its low 12 bits and a backend still ranks its buckets strictly.
#[inline]
pub(super) fn score(p: u32, bits: u32, factor: u64) -> u64 {
    ((u128::from(exp_quantile(p, bits) << 26) * u128::from(factor)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_is_a_bijection() {
        for bits in [4, 5, 9, 16, 20] {
            let w = Walk::new(backend_key(&[7; 16], 3), bits);
            let mut seen = vec![false; 1 << bits];
            for p in 0..1u32 << bits {
                let k = w.bucket(p) as usize;
                assert!(!seen[k]);
                seen[k] = true;
            }
        }
    }

    #[test]
    fn log2_is_close_and_increasing() {
        assert_eq!(log2_fixed(1), 0);
        assert_eq!(log2_fixed(1 << 20), 20 << 32);
        for x in [3u64, 1000, 12345, 1 << 21] {
            let want = (x as f64).log2();
            let got = log2_fixed(x) as f64 / (1u64 << 32) as f64;
            assert!((want - got).abs() < 1e-5, "{x}: {want} {got}");
        }
        let bits = 20;
        let mut last = 0;
        for p in 0..1u32 << bits {
            let e = exp_quantile(p, bits);
            assert!(e > last || p == 0);
            last = e;
        }
    }

    #[test]
    fn scores_rise_by_more_than_the_low_bits_along_a_walk() {
        let bits = 20;
        for weight in [1, 65535] {
            let f = weight_factor(weight);
            let mut last = score(0, bits, f);
            for p in 1..1u32 << bits {
                let s = score(p, bits, f);
                assert!(s - last > 1 << 22, "weight {weight} p {p}");
                last = s;
            }
        }
    }

    #[test]
    fn key_is_pinned() {
        // A change here reshuffles every table of a running fleet.
        let k = backend_key(&lb_common::addr::v4_mapped([10, 0, 0, 1]), 0);
        assert_eq!(k, 0xc0b0_9c14_14d7_8951);
    }
}
