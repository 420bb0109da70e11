//! The encapsulation header layout (documented for decoder writers in docs/encapsulation.md).
//!
//! A forwarded packet is `outer Ethernet | outer IPv4 or IPv6 | UDP | GUE | hop list |
//! inner IP packet`. GUE is draft-ietf-intarea-gue "variant 0": a 4-byte base header whose
//! `hlen` counts the 32-bit words of extension data after it; lb carries its hop list there
//! as GUE private data.

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

pub const GUE_HEADER_LEN: usize = core::mem::size_of::<GueHeader>();
pub const HOP_LIST_LEN: usize = core::mem::size_of::<HopList>();
const _: () = assert!(GUE_HEADER_LEN == 4);
const _: () = assert!(HOP_LIST_LEN == 20);

/// hlen of every lb GUE header: the hop list in 32-bit words.
pub const GUE_HLEN: u8 = (HOP_LIST_LEN / 4) as u8;
/// The first byte of an lb GUE header: version 0, data message, hlen 5.
pub const GUE_FIRST_BYTE: u8 = GUE_HLEN;
/// "lb" in ASCII.
pub const HOP_LIST_TYPE: [u8; 2] = *b"lb";
/// A SYN carrying this flag is not accepted just for being a SYN: the receiver looks for
/// a socket like for any other packet and passes it on when it has none.
pub const FLAG_FORWARD_SYN: u8 = 0x01;
/// The most hops a hop list may announce; more is malformed.
pub const MAX_HOPS: u8 = 1;

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
/// Bytes added in front of the inner IP packet with an IPv4 outer header.
pub const ENCAP_LEN_V4: usize = IPV4_LEN + UDP_LEN + GUE_HEADER_LEN + HOP_LIST_LEN;
/// Bytes added in front of the inner IP packet with an IPv6 outer header.
pub const ENCAP_LEN_V6: usize = IPV6_LEN + UDP_LEN + GUE_HEADER_LEN + HOP_LIST_LEN;
const _: () = assert!(ENCAP_LEN_V4 == 52 && ENCAP_LEN_V6 == 72);

/// The GUE port when the config names none (the port Linux's own GUE examples use).
pub const DEFAULT_GUE_PORT: u16 = 6080;
