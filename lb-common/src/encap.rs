//! The encapsulation header layout (documented for decoder writers in docs/encapsulation.md).
//!
//! A forwarded packet is `outer Ethernet | outer IPv4 or IPv6 | UDP | GUE | hop list |
//! inner IP packet`. GUE is draft-ietf-intarea-gue "variant 0": a 4-byte base header whose
//! `hlen` counts the 32-bit words of extension data after it; lb carries its hop list there
//! as GUE private data.

use core::mem::size_of;

use crate::{
    parse::Wire,
    proto::{IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, UDP_LEN},
};

/// GUE base header: `ver(2) C(1) hlen(5) | proto/ctype(8) | flags(16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueHeader {
    /// Version (top 2 bits, 0), control bit (1 bit, 0), hlen (low 5 bits).
    pub ver_c_hlen: u8,
    /// The inner protocol: [`IPPROTO_IPIP`] or [`IPPROTO_IPV6`].
    pub proto: u8,
    /// GUE flags: none are used, always 0.
    pub flags: [u8; 2],
}

/// lb's hop list, carried as GUE private data right after the base header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopList {
    /// Marks the private data as lb's: [`HOP_LIST_TYPE`], big-endian.
    pub kind: [u8; 2],
    /// How many more times the packet may be passed on (0: the receiver must accept).
    pub hops_left: u8,
    /// [`FLAG_FORWARD_SYN`] and reserved bits (0).
    pub flags: u8,
    /// The next hop (the bucket's previous owner) as a 16-byte address (see `addr`);
    /// meaningful only while `hops_left > 0`.
    pub next_hop: [u8; 16],
}

/// The GUE base header and lb's hop list as they follow the UDP header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gue {
    pub header: GueHeader,
    pub hops: HopList,
}

// SAFETY: bytes and byte arrays only: alignment 1, no padding, any bit pattern valid.
unsafe impl Wire for GueHeader {}
// SAFETY: as above.
unsafe impl Wire for HopList {}
// SAFETY: as above.
unsafe impl Wire for Gue {}

pub const GUE_HEADER_LEN: usize = size_of::<GueHeader>();
pub const HOP_LIST_LEN: usize = size_of::<HopList>();
/// The GUE base header and the hop list.
pub const GUE_LEN: usize = size_of::<Gue>();
const _: () = assert!(GUE_HEADER_LEN == 4 && HOP_LIST_LEN == 20 && GUE_LEN == 24);

/// hlen of every lb GUE header: the hop list in 32-bit words.
pub const GUE_HLEN: u8 = (HOP_LIST_LEN / 4) as u8;
/// The first byte of an lb GUE header: version 0, data message, hlen 5.
pub const GUE_FIRST_BYTE: u8 = GUE_HLEN;
/// "lb" in ASCII.
pub const HOP_LIST_TYPE: [u8; 2] = *b"lb";
/// A SYN carrying this flag is not accepted just for being a SYN: the receiver looks for
/// a socket like for any other packet and passes it on when it has none.
pub const FLAG_FORWARD_SYN: u8 = 0x01;
/// Set by a backend that passes a packet on to the next hop (daisy chaining).
pub const FLAG_CHAINED: u8 = 0x02;
/// Set on a UDP packet that the last hop owns no socket for, sent back to the first hop
/// that passed it on: the receiver accepts it. Without this, a new UDP flow in a bucket
/// that moved would land on the bucket's previous owner, which accepts at the last hop.
pub const FLAG_RETURNED: u8 = 0x04;
/// The most hops a hop list may announce; more is malformed.
pub const MAX_HOPS: u8 = 1;

/// Bytes added in front of the inner IP packet with an IPv4 outer header.
pub const ENCAP_LEN_V4: usize = IPV4_LEN + UDP_LEN + GUE_LEN;
/// Bytes added in front of the inner IP packet with an IPv6 outer header.
pub const ENCAP_LEN_V6: usize = IPV6_LEN + UDP_LEN + GUE_LEN;
const _: () = assert!(ENCAP_LEN_V4 == 52 && ENCAP_LEN_V6 == 72);

/// The GUE port when the config names none (the port Linux's own GUE examples use).
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// What goes into the outer headers of one packet. The addresses come first, in a struct
/// aligned to 8 bytes, so the data plane reads their words with one load each.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outer {
    /// Outer source and destination (see `addr`): both IPv4-mapped or both IPv6.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub next_hop: [u8; 16],
    /// IPv6 flow label (low 20 bits used), from the flow hash so routers spread flows.
    pub flow_label: u32,
    /// UDP source port (from the flow hash) and destination port (the GUE port).
    pub src_port: u16,
    pub dst_port: u16,
    /// Length of the inner IP packet.
    pub inner_len: u16,
    /// Inner DSCP/ECN byte, copied so the path treats the tunnel like the flow.
    pub tos: u8,
    /// The inner packet is IPv6.
    pub inner_v6: bool,
    pub hops_left: u8,
    pub flags: u8,
}

/// Outer TTL / hop limit.
pub const OUTER_TTL: u8 = 64;

/// Where outer headers go: 32-bit words, each stored big-endian at `4 * i` bytes. Every
/// field of lb's outer headers lies within one word, so a header is one store per word;
/// in the data plane that is a word store into the packet instead of a store per byte.
pub trait WordSink {
    /// Stores `w` big-endian at bytes `4 * i..4 * i + 4`.
    fn put(&mut self, i: usize, w: u32);
}

impl<const N: usize> WordSink for [u8; N] {
    #[inline(always)]
    fn put(&mut self, i: usize, w: u32) {
        self[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
    }
}

/// The big-endian word at bytes `4 * i..4 * i + 4` of an address.
#[inline(always)]
fn addr_word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// Writes UDP, GUE and the hop list (32 bytes, 8 words) for `o` from word `at` on.
#[inline(always)]
fn write_udp_gue<S: WordSink>(o: &Outer, out: &mut S, at: usize) {
    let udp_len = (UDP_LEN + GUE_LEN) as u32 + u32::from(o.inner_len);
    out.put(at, u32::from(o.src_port) << 16 | u32::from(o.dst_port));
    // Zero UDP checksum: the receiver is lb's own XDP program, and the inner packet
    // carries its own checksum (RFC 6935/6936 allow this for tunnels over IPv6 too).
    out.put(at + 1, udp_len << 16);
    write_gue(out, at + 2, o.inner_v6, (o.hops_left, o.flags), &o.next_hop);
}

/// Writes lb's GUE header and hop list (24 bytes, 6 words) from word `at` on.
#[inline(always)]
pub fn write_gue<S: WordSink>(
    out: &mut S,
    at: usize,
    inner_v6: bool,
    (hops_left, flags): (u8, u8),
    next_hop: &[u8; 16],
) {
    let proto = if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    // First byte, inner protocol, no GUE flags.
    out.put(at, u32::from(GUE_FIRST_BYTE) << 24 | u32::from(proto) << 16);
    let kind = u32::from(u16::from_be_bytes(HOP_LIST_TYPE));
    out.put(
        at + 1,
        kind << 16 | u32::from(hops_left) << 8 | u32::from(flags),
    );
    for i in 0..4 {
        out.put(at + 2 + i, addr_word(next_hop, i));
    }
}

/// The outer IPv4 + UDP + GUE + hop list headers of `o` (addresses IPv4-mapped), 13
/// words.
#[inline(always)]
pub fn write_outer_v4<S: WordSink>(o: &Outer, out: &mut S) {
    let tot_len = ENCAP_LEN_V4 as u32 + u32::from(o.inner_len);
    let (src, dst) = (addr_word(&o.src, 3), addr_word(&o.dst, 3));
    // Only TOS, length and addresses vary: the fixed words add up to a constant, so the
    // checksum is a few additions instead of a pass over the header.
    const FIXED: u32 = 0x4500 + 0x4000 + ((OUTER_TTL as u32) << 8 | IPPROTO_UDP as u32);
    let mut sum = FIXED + u32::from(o.tos) + tot_len;
    sum += (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let checksum = u32::from(!(sum as u16));
    out.put(0, 0x4500_0000 | u32::from(o.tos) << 16 | tot_len);
    // No identification; don't fragment: a too-big tunnel packet must be refused, not
    // split.
    out.put(1, 0x0000_4000);
    out.put(
        2,
        u32::from(OUTER_TTL) << 24 | u32::from(IPPROTO_UDP) << 16 | checksum,
    );
    out.put(3, src);
    out.put(4, dst);
    write_udp_gue(o, out, IPV4_LEN / 4);
}

/// The outer IPv6 + UDP + GUE + hop list headers of `o`, 18 words.
#[inline(always)]
pub fn write_outer_v6<S: WordSink>(o: &Outer, out: &mut S) {
    let payload_len = (ENCAP_LEN_V6 - IPV6_LEN) as u32 + u32::from(o.inner_len);
    out.put(
        0,
        (6u32 << 28) | u32::from(o.tos) << 20 | (o.flow_label & 0x000f_ffff),
    );
    out.put(
        1,
        payload_len << 16 | u32::from(IPPROTO_UDP) << 8 | u32::from(OUTER_TTL),
    );
    for i in 0..4 {
        out.put(2 + i, addr_word(&o.src, i));
        out.put(6 + i, addr_word(&o.dst, i));
    }
    write_udp_gue(o, out, IPV6_LEN / 4);
}

/// The IPv4 header checksum of a 20-byte header (its checksum field taken as zero or
/// as it is: a header with a correct checksum sums to 0).
#[inline(always)]
pub fn ipv4_checksum(h: &[u8; IPV4_LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_LEN {
        if i != 10 {
            sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        }
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    fn outer(src: [u8; 16], dst: [u8; 16]) -> Outer {
        Outer {
            src,
            dst,
            src_port: 50000,
            dst_port: DEFAULT_GUE_PORT,
            inner_len: 60,
            inner_v6: false,
            tos: 0x10,
            flow_label: 0x12345,
            hops_left: 1,
            flags: 0,
            next_hop: v4_mapped([10, 0, 2, 2]),
        }
    }

    #[test]
    fn ipv4_checksum_matches_a_known_header() {
        // The worked example of RFC 1071's usual illustration (checksum 0xb861).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
    }

    #[test]
    fn v4_outer_layout() {
        let mut b = [0u8; ENCAP_LEN_V4];
        write_outer_v4(
            &outer(v4_mapped([10, 0, 1, 2]), v4_mapped([10, 0, 3, 2])),
            &mut b,
        );
        assert_eq!(b[0], 0x45);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 52 + 60);
        assert_eq!(&b[12..20], &[10, 0, 1, 2, 10, 0, 3, 2]);
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&b[..20]);
        assert_eq!(ipv4_checksum(&ip), u16::from_be_bytes([b[10], b[11]]));
        // UDP
        assert_eq!(u16::from_be_bytes([b[20], b[21]]), 50000);
        assert_eq!(u16::from_be_bytes([b[22], b[23]]), DEFAULT_GUE_PORT);
        assert_eq!(u16::from_be_bytes([b[24], b[25]]), 32 + 60);
        // GUE + hop list
        assert_eq!(&b[28..32], &[GUE_HLEN, IPPROTO_IPIP, 0, 0]);
        assert_eq!(&b[32..36], &[b'l', b'b', 1, 0]);
        assert_eq!(&b[36..52], &v4_mapped([10, 0, 2, 2]));
    }

    #[test]
    fn outer_v4_checksum_is_the_header_checksum() {
        let longest = u16::MAX - ENCAP_LEN_V4 as u16;
        for (tos, inner_len, src, dst) in [
            (0, 0, [0, 0, 0, 0], [0, 0, 0, 0]),
            (0xff, longest, [255; 4], [255; 4]),
            (0x10, 1448, [10, 0, 1, 2], [10, 0, 3, 2]),
            (0xb8, 8948, [192, 0, 2, 200], [172, 16, 254, 1]),
        ] {
            let mut o = outer(v4_mapped(src), v4_mapped(dst));
            o.tos = tos;
            o.inner_len = inner_len;
            let mut b = [0u8; ENCAP_LEN_V4];
            write_outer_v4(&o, &mut b);
            let mut ip = [0u8; IPV4_LEN];
            ip.copy_from_slice(&b[..IPV4_LEN]);
            assert_eq!(ipv4_checksum(&ip), u16::from_be_bytes([b[10], b[11]]));
        }
    }

    #[test]
    fn v6_outer_layout() {
        let src: [u8; 16] = core::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets();
        let dst: [u8; 16] = core::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets();
        let mut b = [0u8; ENCAP_LEN_V6];
        write_outer_v6(&outer(src, dst), &mut b);
        assert_eq!(
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            0x6101_2345,
            "version, traffic class, flow label"
        );
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 32 + 60);
        assert_eq!(b[6], 17);
        assert_eq!(&b[8..24], &src);
        assert_eq!(&b[24..40], &dst);
        assert_eq!(&b[48..52], &[GUE_HLEN, IPPROTO_IPIP, 0, 0]);
    }
}
