//! Addresses are carried as 16 bytes everywhere: IPv6 as is, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), so one key and one value type serve both families.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The 12-byte prefix of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `a.b.c.d` as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The third word of an IPv4-mapped address, as a native load reads it.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether a 16-byte address holds an IPv4 address.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..12] == V4_MAPPED_PREFIX
}

/// Whether an address's four words (`words`) hold an IPv4 address.
#[inline(always)]
pub fn is_v4_mapped_words(w: [u32; 4]) -> bool {
    w[0] | w[1] == 0 && w[2] == V4_MAPPED_WORD
}

/// The IPv4 part of a mapped address.
#[inline(always)]
pub const fn v4_part(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Copies the address into `words`, four u32 in memory order, as kernel structs
/// (`bpf_fib_lookup`, `bpf_sock_tuple`) hold IPv6 addresses. Byte by byte: built as words
/// first, the address took registers that the FIB helper's callers then spilled to the
/// stack, whose frames are at the bottom of the longest call chain.
#[inline(always)]
pub fn copy_to_words(words: &mut [u32; 4], a: &[u8; 16]) {
    // SAFETY: `[u32; 4]` is 16 bytes, and any bytes are valid u32s.
    let bytes = unsafe { &mut *(words as *mut [u32; 4]).cast::<[u8; 16]>() };
    *bytes = *a;
}

/// The `N` words at `p` in memory order, each read with one aligned load: where a
/// struct keeps addresses at 4-aligned offsets, the data plane compares and hashes words,
/// not bytes (a byte array's comparison takes a load per byte).
///
/// # Safety
/// `p` points at `4 * N` readable, initialised bytes, 4-byte aligned.
#[inline(always)]
pub unsafe fn aligned_words<const N: usize>(p: *const u8) -> [u32; N] {
    let p = p.cast::<u32>();
    // SAFETY: the caller's promise.
    core::array::from_fn(|i| unsafe { p.add(i).read() })
}

/// The address's four words in memory order, as `aligned_words` reads them (for bytes
/// that need not be aligned; the host's side).
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    })
}

/// Four words (as `aligned_words` reads them) as the address's bytes. An address copied
/// as `from_words(aligned_words(..))` into a field at an aligned offset is four word
/// loads and stores: a plain `[u8; 16]` copy is sixteen of each in BPF.
#[inline(always)]
pub fn from_words(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: 16 bytes either way, and any bytes are valid.
    unsafe { core::mem::transmute(w) }
}

/// Host-side conversion from `IpAddr`.
pub fn to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Host-side conversion back to `IpAddr` (mapped addresses become IPv4).
pub fn from_bytes(a: [u8; 16]) -> IpAddr {
    if is_v4_mapped(&a) {
        IpAddr::V4(Ipv4Addr::from(v4_part(&a)))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for ip in ["10.1.2.3", "0.0.0.0", "fd00::1", "::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = from_bytes(to_bytes(ip));
            assert_eq!(back, ip.to_canonical());
        }
        assert!(is_v4_mapped(&to_bytes("192.0.2.1".parse().unwrap())));
        assert!(!is_v4_mapped(&to_bytes("2001:db8::1".parse().unwrap())));
    }
}
