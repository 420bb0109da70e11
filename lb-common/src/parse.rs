//! Header parsing and the decisions that need nothing but the headers, written once for
//! the XDP program and the host: Ethernet (one optional 802.1Q tag), IPv4 (any header
//! length), IPv6 (up to [`MAX_EXT_HEADERS`] extension headers), the transport ports, the
//! packet quoted in an ICMP "too big" error, lb's GUE header and hop list, and the
//! chain-or-return step of the backend path.
//!
//! Everything reads the packet through [`Frame`], a bounds-checked byte source: a slice on
//! the host, the XDP context in `lb-ebpf`. The code is shaped for the verifier: generics
//! inlined, constant sizes, every read checked against the frame's end just before it,
//! results written in place (BPF functions return scalars only, and a temporary costs
//! stack, of which BPF has 512 bytes for the whole call chain).

use core::mem::{align_of, size_of};

use crate::{
    addr::{aligned_words, from_words, is_v4_mapped_words, v4_mapped, V4_MAPPED_WORD},
    encap::{Gue, FLAG_CHAINED, FLAG_RETURNED, GUE_FIRST_BYTE, HOP_LIST_TYPE, MAX_HOPS},
    hash::FlowTuple,
    limits::{MAX_EXT_HEADERS, MAX_HEADER_OFFSET},
    proto::{
        ETH_LEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IPPROTO_DSTOPTS,
        IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP,
        IPPROTO_IPV6, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, TCP_ACK,
        TCP_LEN, TCP_SYN, UDP_LEN, VLAN_LEN,
    },
    stats::Reason,
};

/// A header type that may be read straight out of packet bytes.
///
/// # Safety
/// Alignment 1, no padding, and every bit pattern a valid value (bytes and byte arrays
/// only).
pub unsafe trait Wire: Copy {
    /// The value's bytes as they go on the wire.
    #[inline(always)]
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: no padding (`Wire`), so every byte of the value is initialised.
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>())
        }
    }
}

// SAFETY: bytes.
unsafe impl<const N: usize> Wire for [u8; N] {}

/// The packet bytes the parser reads: bounds-checked access, implemented for a slice and
/// for the XDP context.
///
/// # Safety
/// `span(off, size)` returns a pointer only when `size` bytes from it are readable for
/// `'a`, and `len` is the frame's length.
#[expect(
    clippy::len_without_is_empty,
    reason = "the parser reads by offset and never asks whether a frame is empty"
)]
pub unsafe trait Frame<'a>: Copy {
    /// The frame's length in bytes.
    fn len(self) -> usize;

    /// A pointer to the `size` bytes at `off`, or `None` when the frame is shorter.
    fn span(self, off: usize, size: usize) -> Option<*const u8>;

    /// The `T` at `off`, or `None` when the frame is shorter or `off` is past
    /// [`MAX_HEADER_OFFSET`].
    #[inline(always)]
    fn at<T: Wire>(self, off: usize) -> Option<&'a T> {
        const { assert!(align_of::<T>() == 1) };
        if off > MAX_HEADER_OFFSET {
            return None;
        }
        // SAFETY: `span` vouches for the bytes, `Wire` for reading a `T` out of them.
        self.span(off, size_of::<T>())
            .map(|p| unsafe { &*p.cast::<T>() })
    }

    /// `N` bytes at `off`, copied.
    #[inline(always)]
    fn read<const N: usize>(self, off: usize) -> Option<[u8; N]> {
        self.at::<[u8; N]>(off).copied()
    }

    /// The big-endian u16 at `off`.
    #[inline(always)]
    fn read_be16(self, off: usize) -> Option<u16> {
        self.read::<2>(off).map(u16::from_be_bytes)
    }

    /// The `N` words at `FROM` bytes into `bytes` (a header `at` gave), each in memory
    /// order (`u32::from_ne_bytes` of its bytes): a byte array's copy or comparison takes
    /// a load per byte in BPF, a word one load (`word`).
    #[inline(always)]
    fn words<const FROM: usize, const N: usize, const M: usize>(
        self,
        bytes: &'a [u8; M],
    ) -> [u32; N] {
        const { assert!(FROM + 4 * N <= M) };
        core::array::from_fn(|i| self.word(bytes, FROM + 4 * i))
    }

    /// The word at `at` bytes into `bytes`, in memory order; 0 past their end. The XDP
    /// frame reads it with one load.
    #[inline(always)]
    fn word<const M: usize>(self, bytes: &'a [u8; M], at: usize) -> u32 {
        match bytes.get(at..at + 4) {
            Some(w) => u32::from_ne_bytes([w[0], w[1], w[2], w[3]]),
            None => 0,
        }
    }
}

// SAFETY: `get` checks the bounds; the bytes live as long as the slice.
unsafe impl<'a> Frame<'a> for &'a [u8] {
    #[inline(always)]
    fn len(self) -> usize {
        <[u8]>::len(self)
    }

    #[inline(always)]
    fn span(self, off: usize, size: usize) -> Option<*const u8> {
        self.get(off..off.checked_add(size)?).map(<[u8]>::as_ptr)
    }
}

/// Why headers could not be parsed (which of the two does not change a decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Too short for the header at hand.
    Truncated,
    /// A header field that cannot be right (version, header length).
    Invalid,
}

/// The layer-2 facts: where the IP header starts and which family it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2 {
    pub l3_off: usize,
    pub ether_type: u16,
}

impl L2 {
    #[inline(always)]
    pub fn v6(&self) -> bool {
        self.ether_type == ETH_P_IPV6
    }
}

/// Ethernet with at most one VLAN tag. `Ok(None)` for frames that are not IP.
#[inline(always)]
pub fn ethernet<'a, F: Frame<'a>>(f: F) -> Result<Option<L2>, ParseError> {
    let mut ether_type = f.read_be16(12).ok_or(ParseError::Truncated)?;
    let mut l3_off = ETH_LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = f.read_be16(ETH_LEN + 2).ok_or(ParseError::Truncated)?;
        l3_off += VLAN_LEN;
    }
    Ok(match ether_type {
        ETH_P_IP | ETH_P_IPV6 => Some(L2 { l3_off, ether_type }),
        _ => None,
    })
}

/// An IP header's facts, with addresses as 16 bytes (see `addr`), first and aligned, so
/// they are copied and compared as words (`src_words`, `dst_words`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Ip {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l3_off: usize,
    /// Offset of the transport header (after options / extension headers).
    pub l4_off: usize,
    pub v6: bool,
    /// The transport protocol (after extension headers).
    pub proto: u8,
    /// An IPv4 fragment (MF set or offset non-zero) or an IPv6 fragment header.
    pub fragment: bool,
    /// The IPv4 header length field was below 5 words.
    pub bad_ihl: bool,
}

impl Ip {
    pub const EMPTY: Ip = Ip {
        src: [0; 16],
        dst: [0; 16],
        v6: false,
        l3_off: 0,
        l4_off: 0,
        proto: 0,
        fragment: false,
        bad_ihl: false,
    };

    /// `src` in four aligned loads.
    #[inline(always)]
    pub fn src_words(&self) -> [u32; 4] {
        // SAFETY: `src` is the first field of an 8-aligned `repr(C)` struct.
        unsafe { aligned_words(self.src.as_ptr()) }
    }

    /// `dst` in four aligned loads.
    #[inline(always)]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: `dst` is at offset 16 of an 8-aligned `repr(C)` struct.
        unsafe { aligned_words(self.dst.as_ptr()) }
    }
}
const _: () = assert!(core::mem::offset_of!(Ip, src) == 0);
const _: () = assert!(core::mem::offset_of!(Ip, dst) == 16);
// No bigger than Rust's own layout made it: it is on the backend path's stack.
const _: () = assert!(size_of::<Ip>() == 56);

/// Parses the IP header at `off`, IPv4 or IPv6 as `v6` says, into `out`.
///
/// `Invalid` also for a type-0 routing header with segments left (deprecated, RFC 5095:
/// the packet would go on elsewhere). The addresses are read by then, so a caller can
/// tell whether it was to a VIP. Returning at once, rather than carrying a flag, keeps
/// the verifier's paths few.
#[inline(always)]
pub fn ip<'a, F: Frame<'a>>(f: F, off: usize, v6: bool, out: &mut Ip) -> Result<(), ParseError> {
    if v6 {
        ipv6(f, off, out)
    } else {
        ipv4(f, off, out)
    }
}

/// Whether the lengths in the header of the whole packet `ip` agree with the frame: an
/// IPv4 total length within the frame and at least the IP and transport headers, an IPv6
/// payload length within the frame. (A packet quoted in an ICMP error is cut short by
/// design: this is not for it.)
#[inline(always)]
pub fn lengths_ok<'a, F: Frame<'a>>(f: F, ip: &Ip) -> bool {
    let Some(h) = f.read::<8>(ip.l3_off) else {
        return false;
    };
    let frame = f.len();
    if ip.v6 {
        let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
        return ip.l3_off + IPV6_LEN + payload_len <= frame;
    }
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    // Only a first fragment (or a whole packet) carries the transport header.
    let l4_min = if !ip.fragment || u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
        min_l4_len(ip.proto)
    } else {
        0
    };
    ip.l3_off + tot_len <= frame && tot_len >= ip.l4_off - ip.l3_off + l4_min
}

#[inline(always)]
fn ipv4<'a, F: Frame<'a>>(f: F, off: usize, out: &mut Ip) -> Result<(), ParseError> {
    let h = f.at::<[u8; IPV4_LEN]>(off).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::Invalid);
    }
    let ihl = ((h[0] & 0x0f) as usize) << 2;
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    out.v6 = false;
    out.l3_off = off;
    out.l4_off = off + ihl;
    out.proto = h[9];
    out.src = v4_mapped([h[12], h[13], h[14], h[15]]);
    out.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
    out.fragment = frag != 0;
    out.bad_ihl = ihl < IPV4_LEN;
    Ok(())
}

/// A header with no extension headers (nearly all) inlined; one with them parsed out of
/// line (`ipv6_extensions`).
#[inline(always)]
fn ipv6<'a, F: Frame<'a>>(f: F, off: usize, out: &mut Ip) -> Result<(), ParseError> {
    let h = f.at::<[u8; IPV6_LEN]>(off).ok_or(ParseError::Truncated)?;
    let next = h[6];
    if h[0] >> 4 != 6
        || matches!(
            next,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
        )
    {
        return ipv6_extensions(f, off, out);
    }
    out.src = from_words(f.words::<8, 4, IPV6_LEN>(h));
    out.dst = from_words(f.words::<24, 4, IPV6_LEN>(h));
    out.v6 = true;
    out.l3_off = off;
    out.l4_off = off + IPV6_LEN;
    out.proto = next;
    out.fragment = false;
    out.bad_ihl = false;
    Ok(())
}

/// The whole IPv6 header with its extension headers. Not inlined, unlike the IPv4 half:
/// inlined into the entry point, the extension-header loop's bounds were lost to the
/// verifier ("invalid mem access 'scalar'").
#[inline(never)]
fn ipv6_extensions<'a, F: Frame<'a>>(f: F, off: usize, out: &mut Ip) -> Result<(), ParseError> {
    let h = f.at::<[u8; IPV6_LEN]>(off).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::Invalid);
    }
    let mut proto = h[6];
    let mut l4_off = off + IPV6_LEN;
    let mut fragment = false;
    out.src = from_words(f.words::<8, 4, IPV6_LEN>(h));
    out.dst = from_words(f.words::<24, 4, IPV6_LEN>(h));
    // Bounded walk over extension headers; the verifier needs a fixed trip count.
    for _ in 0..MAX_EXT_HEADERS {
        match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e = f.read::<4>(l4_off).ok_or(ParseError::Truncated)?;
                // Routing type 0 with segments left: the packet would go on elsewhere.
                if proto == IPPROTO_ROUTING && e[2] == 0 && e[3] != 0 {
                    return Err(ParseError::Invalid);
                }
                proto = e[0];
                l4_off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let e = f.read::<2>(l4_off).ok_or(ParseError::Truncated)?;
                proto = e[0];
                l4_off += 8;
                fragment = true;
            }
            _ => break,
        }
    }
    out.v6 = true;
    out.l3_off = off;
    out.l4_off = l4_off;
    out.proto = proto;
    out.fragment = fragment;
    out.bad_ihl = false;
    Ok(())
}

/// The smallest transport header of `proto` (TCP, UDP, ICMP; 0 for the rest).
#[inline(always)]
pub fn min_l4_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => TCP_LEN,
        IPPROTO_UDP => UDP_LEN,
        IPPROTO_ICMP => ICMP_LEN,
        _ => 0,
    }
}

/// The flow a packet belongs to, as its owner (the backend's socket) sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub tuple: FlowTuple,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// The packet is an ICMP error about the flow, not part of it.
    pub icmp: bool,
}

impl Flow {
    pub const EMPTY: Flow = Flow {
        tuple: FlowTuple {
            src: [0; 16],
            dst: [0; 16],
            src_port: 0,
            dst_port: 0,
            proto: 0,
        },
        tcp_flags: 0,
        icmp: false,
    };

    /// A TCP SYN (not an ICMP error about one): a new connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tuple.proto == IPPROTO_TCP
            && !self.icmp
            && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Reads into `out` the flow of a TCP or UDP packet, or of an ICMP/ICMPv6 "too big" error
/// (whose quoted packet went from the VIP to the client: reversed here). `Ok(false)`:
/// none of those, so not for lb.
#[inline(always)]
pub fn flow<'a, F: Frame<'a>>(f: F, ip: &Ip, out: &mut Flow) -> Result<bool, ParseError> {
    out.tcp_flags = 0;
    out.icmp = false;
    match ip.proto {
        IPPROTO_TCP => {
            let h = f.read::<14>(ip.l4_off).ok_or(ParseError::Truncated)?;
            // The rest of the minimal header must be there too.
            f.at::<[u8; TCP_LEN]>(ip.l4_off)
                .ok_or(ParseError::Truncated)?;
            if (h[12] >> 4) < 5 {
                return Err(ParseError::Invalid);
            }
            set_tuple(&mut out.tuple, ip, [h[0], h[1], h[2], h[3]], IPPROTO_TCP);
            out.tcp_flags = h[13];
            Ok(true)
        }
        IPPROTO_UDP => {
            let h = f.read::<UDP_LEN>(ip.l4_off).ok_or(ParseError::Truncated)?;
            set_tuple(&mut out.tuple, ip, [h[0], h[1], h[2], h[3]], IPPROTO_UDP);
            Ok(true)
        }
        IPPROTO_ICMP if !ip.v6 => icmp_too_big(f, ip, out),
        IPPROTO_ICMPV6 if ip.v6 => icmp_too_big(f, ip, out),
        _ => Ok(false),
    }
}

#[inline(always)]
fn set_tuple(t: &mut FlowTuple, ip: &Ip, ports: [u8; 4], proto: u8) {
    t.src = ip.src;
    t.dst = ip.dst;
    t.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    t.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    t.proto = proto;
}

/// ICMP type 3 code 4 / ICMPv6 type 2: the flow of the quoted packet, reversed.
#[inline(always)]
fn icmp_too_big<'a, F: Frame<'a>>(f: F, ip: &Ip, out: &mut Flow) -> Result<bool, ParseError> {
    let too_big = if ip.v6 { [2, 0] } else { [3, 4] };
    if f.read::<2>(ip.l4_off).ok_or(ParseError::Truncated)? != too_big {
        return Ok(false);
    }
    let mut quoted = Ip::EMPTY;
    self::ip(f, ip.l4_off + ICMP_LEN, ip.v6, &mut quoted)?;
    if quoted.proto != IPPROTO_TCP && quoted.proto != IPPROTO_UDP {
        return Ok(false);
    }
    if quoted.bad_ihl {
        return Err(ParseError::Invalid);
    }
    let p = f.read::<4>(quoted.l4_off).ok_or(ParseError::Truncated)?;
    // The quoted packet went VIP -> client; the flow is client -> VIP.
    out.tuple.src = from_words(quoted.dst_words());
    out.tuple.dst = from_words(quoted.src_words());
    out.tuple.src_port = u16::from_be_bytes([p[2], p[3]]);
    out.tuple.dst_port = u16::from_be_bytes([p[0], p[1]]);
    out.tuple.proto = quoted.proto;
    out.icmp = true;
    Ok(true)
}

// ---- the decisions of the entry point and both paths --------------------------------

/// The fast path for foreign traffic: a well-formed IP header (IPv6 without extension
/// headers) to an address that is neither this node's (`own`: its IPv4 address's word
/// and IPv6 address's words, as `NodeConfig::addr_v4_word` and `addr_v6_words` give
/// them) nor, by `maybe_vip` (the VIP filter, given the address's words), a VIP. The
/// full path would end such a packet in
/// `PassNotService` too; it only costs more.
#[inline(always)]
pub fn certainly_not_for_lb<'a, F: Frame<'a>>(
    f: F,
    l2: &L2,
    (own_v4, own_v6): (u32, [u32; 4]),
    maybe_vip: impl FnOnce([u32; 4]) -> bool,
) -> bool {
    let dst = if l2.v6() {
        let Some(h) = f.at::<[u8; IPV6_LEN]>(l2.l3_off) else {
            return false;
        };
        let direct = matches!(h[6], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6);
        if h[0] >> 4 != 6 || !direct {
            return false;
        }
        let dst = f.words::<24, 4, IPV6_LEN>(h);
        if dst == own_v6 {
            return false;
        }
        dst
    } else {
        let Some(h) = f.at::<[u8; IPV4_LEN]>(l2.l3_off) else {
            return false;
        };
        if h[0] >> 4 != 4 {
            return false;
        }
        let [dst] = f.words::<16, 1, IPV4_LEN>(h);
        if dst == own_v4 {
            return false;
        }
        [0, 0, V4_MAPPED_WORD, dst]
    };
    !maybe_vip(dst)
}

/// Whether `ip` is UDP to this node's GUE address (`addr_v4`, `addr_v6`; zero when it has
/// none of the family) and `gue_port`: the backend path's packet.
#[inline(always)]
pub fn is_gue_to_me<'a, F: Frame<'a>>(
    f: F,
    ip: &Ip,
    (own_v4, own_v6): (u32, [u32; 4]),
    gue_port: u16,
) -> bool {
    if ip.proto != IPPROTO_UDP || ip.fragment || ip.bad_ihl {
        return false;
    }
    // An IPv4 header's destination is mapped: its last word is the address.
    let mine = if ip.v6 {
        own_v6 != [0; 4] && ip.dst_words() == own_v6
    } else {
        own_v4 != 0 && ip.dst_words()[3] == own_v4
    };
    mine && f.read_be16(ip.l4_off + 2) == Some(gue_port)
}

/// Why a packet has no flow for the client path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoFlow {
    /// Not lb's: passed untouched (`PassNotService`).
    NotForLb,
    /// No usable flow (no ports, broken headers): to a VIP dropped under this reason, to
    /// anything else not lb's.
    Unusable(Reason),
}

impl NoFlow {
    /// The reason the packet ends in; `is_vip`: its destination is a VIP.
    #[inline(always)]
    pub fn reason(self, is_vip: impl FnOnce() -> bool) -> Reason {
        match self {
            NoFlow::Unusable(r) if is_vip() => r,
            _ => Reason::PassNotService,
        }
    }
}

/// The client path's flow of `ip`, a packet that is not the backend path's, into `out`.
#[inline(always)]
pub fn client_flow<'a, F: Frame<'a>>(f: F, ip: &Ip, out: &mut Flow) -> Result<(), NoFlow> {
    // Without ports there is no flow to hash: such packets to a VIP cannot be forwarded
    // right, so they are dropped and counted; to anything else they pass untouched.
    if ip.fragment {
        return Err(NoFlow::Unusable(Reason::DropFragment));
    }
    if ip.bad_ihl {
        return Err(NoFlow::Unusable(Reason::DropMalformed));
    }
    match flow(f, ip, out) {
        Ok(true) => {}
        Ok(false) => return Err(NoFlow::NotForLb),
        Err(_) => return Err(NoFlow::Unusable(Reason::DropMalformed)),
    }
    // An ICMP error about a VIP's flow is sent to that VIP (the quoted packet's source);
    // one addressed elsewhere is not lb's to forward.
    if out.icmp && out.tuple.dst_words() != ip.dst_words() {
        return Err(NoFlow::NotForLb);
    }
    Ok(())
}

/// The GUE header and hop list at `gue_off` (after the outer UDP header of a packet for
/// this node's GUE port), when they are lb's: the base header as lb writes it, the hop
/// list's type, at most [`MAX_HOPS`].
#[inline(always)]
pub fn gue<'a, F: Frame<'a>>(f: F, gue_off: usize) -> Result<&'a Gue, Reason> {
    let g = f.at::<Gue>(gue_off).ok_or(Reason::DropMalformed)?;
    if !matches!(g.header.proto, IPPROTO_IPIP | IPPROTO_IPV6)
        || g.header.ver_c_hlen != GUE_FIRST_BYTE
        || g.hops.kind != HOP_LIST_TYPE
        || g.hops.hops_left > MAX_HOPS
    {
        return Err(Reason::DropBadGue);
    }
    Ok(g)
}

impl Gue {
    /// The inner packet is IPv6 (`gue` saw the protocol is one of the two).
    #[inline(always)]
    pub fn inner_v6(&self) -> bool {
        self.header.proto == IPPROTO_IPV6
    }
}

/// Where a GUE packet that this node does not claim goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// On to the hop list's next hop, chained (`FLAG_CHAINED`), one hop fewer.
    PassOn,
    /// Back to the first hop, the outer source, which owns the bucket now
    /// (`FLAG_RETURNED`, no hop taken).
    Return,
    /// Accepted here: no one left to ask.
    Accept,
}

/// The chain-or-return step for an unclaimed GUE packet of outer header `outer`, hop-list
/// fields `hops_left`, `flags` and `next_hop` (as words, `addr::words`); `udp`: its inner
/// packet is UDP (not an ICMP error).
#[inline(always)]
pub fn next_step(outer: &Ip, hops_left: u8, flags: u8, next_hop: [u32; 4], udp: bool) -> Step {
    let dst = outer.dst_words();
    // Pass it on while a hop is left, it is of the outer family and not this node itself.
    if hops_left > 0 && next_hop != dst && is_v4_mapped_words(next_hop) != outer.v6 {
        return Step::PassOn;
    }
    // A UDP packet no socket here owns, passed on by the first hop: a new flow. Back to
    // the first hop, which owns the bucket now.
    if udp && flags & FLAG_CHAINED != 0 && outer.src_words() != dst {
        return Step::Return;
    }
    Step::Accept
}

/// The hop-list flags a packet leaves with on `step` (`PassOn` or `Return`).
#[inline(always)]
pub fn step_flags(step: Step, flags: u8) -> u8 {
    match step {
        Step::Return => (flags & !FLAG_CHAINED) | FLAG_RETURNED,
        _ => flags | FLAG_CHAINED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::words;

    #[test]
    fn a_slice_frame_reads_only_within_the_frame_and_the_header_limit() {
        let b = [7u8; MAX_HEADER_OFFSET + 8];
        let f: &[u8] = &b;
        assert_eq!(f.read::<4>(0), Some([7; 4]));
        assert_eq!(f.read::<4>(b.len() - 4), None, "past the header limit");
        assert_eq!(f.read::<8>(MAX_HEADER_OFFSET), Some([7; 8]));
        assert_eq!(f.read::<9>(MAX_HEADER_OFFSET), None, "past the end");
        assert_eq!(f.read::<1>(usize::MAX), None);
        let short: &[u8] = &b[..3];
        assert_eq!(short.read_be16(2), None);
    }

    fn outer(v6: bool, src: [u8; 16], dst: [u8; 16]) -> Ip {
        Ip {
            v6,
            src,
            dst,
            ..Ip::EMPTY
        }
    }

    #[test]
    fn the_next_step_chains_returns_or_accepts() {
        let (me, first, next) = (
            v4_mapped([10, 0, 0, 2]),
            v4_mapped([10, 0, 0, 1]),
            v4_mapped([10, 0, 0, 3]),
        );
        let (w_me, w_next) = (words(&me), words(&next));
        let o = outer(false, first, me);
        assert_eq!(next_step(&o, 1, 0, w_next, false), Step::PassOn);
        // No hop left, the next hop this node itself, or of the other family: no chaining.
        assert_eq!(next_step(&o, 0, 0, w_next, false), Step::Accept);
        assert_eq!(next_step(&o, 1, 0, w_me, false), Step::Accept);
        assert_eq!(next_step(&o, 1, 0, words(&[0xfd; 16]), false), Step::Accept);
        // An unowned UDP packet passed on by the first hop goes back to it.
        assert_eq!(next_step(&o, 0, FLAG_CHAINED, w_next, true), Step::Return);
        assert_eq!(next_step(&o, 0, FLAG_CHAINED, w_next, false), Step::Accept);
        assert_eq!(
            next_step(&outer(false, me, me), 0, FLAG_CHAINED, w_next, true),
            Step::Accept
        );
        // IPv6 outer headers: an IPv6 next hop chains, an IPv4 one does not.
        let (v6_me, v6_next) = ([0xfd; 16], [0xfe; 16]);
        let o6 = outer(true, [0xfc; 16], v6_me);
        assert_eq!(next_step(&o6, 1, 0, words(&v6_next), false), Step::PassOn);
        assert_eq!(next_step(&o6, 1, 0, words(&v6_me), false), Step::Accept);
        assert_eq!(next_step(&o6, 1, 0, w_next, false), Step::Accept);
        assert_eq!(step_flags(Step::PassOn, 0), FLAG_CHAINED);
        assert_eq!(
            step_flags(Step::Return, FLAG_CHAINED | 0x01),
            FLAG_RETURNED | 0x01
        );
    }
}
