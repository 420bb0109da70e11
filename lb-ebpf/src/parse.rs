//! Header parsing: Ethernet (one optional 802.1Q tag), IPv4 (any header length), IPv6
//! (skipping up to three extension headers), and the flow a packet belongs to.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    addr::v4_mapped,
    encap::{ETH_LEN, IPV4_LEN, IPV6_LEN},
    hash::FlowTuple,
};

use crate::ptr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_LEN: usize = 4;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXT_HEADERS: usize = 3;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Why a packet could not be parsed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Too short for the header at hand.
    Truncated,
    /// A header field that cannot be right (version, header length).
    Invalid,
}

/// The layer-2 facts: where the IP header starts and which family it is.
#[derive(Clone, Copy)]
pub struct L2 {
    pub l3_off: usize,
    pub ether_type: u16,
}

/// Ethernet with at most one VLAN tag. `Ok(None)` for frames that are not IP.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Result<Option<L2>, ParseError> {
    let mut ether_type = ptr::read_be16(ctx, 12).ok_or(ParseError::Truncated)?;
    let mut l3_off = ETH_LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = ptr::read_be16(ctx, ETH_LEN + 2).ok_or(ParseError::Truncated)?;
        l3_off += VLAN_LEN;
    }
    Ok(match ether_type {
        ETH_P_IP | ETH_P_IPV6 => Some(L2 { l3_off, ether_type }),
        _ => None,
    })
}

/// An IP header's facts, with addresses as 16 bytes (see `lb_common::addr`).
#[derive(Clone, Copy)]
pub struct Ip {
    pub v6: bool,
    pub l3_off: usize,
    /// Offset of the transport header (after options / extension headers).
    pub l4_off: usize,
    /// The transport protocol (after extension headers).
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// An IPv4 fragment (MF set or offset non-zero) or an IPv6 fragment header.
    pub fragment: bool,
    /// The IPv4 header length field was below 5 words.
    pub bad_ihl: bool,
}

impl Ip {
    pub const EMPTY: Ip = Ip {
        v6: false,
        l3_off: 0,
        l4_off: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        fragment: false,
        bad_ihl: false,
    };
}

/// Parses the IP header at `off`, IPv4 or IPv6 as `v6` says, into `out`. Results come
/// back through a pointer (BPF functions return scalars only) and are written in place:
/// temporaries would cost stack, of which BPF has 512 bytes for the whole call chain.
///
/// `Invalid` also for a type-0 routing header with segments left (deprecated, RFC 5095:
/// the packet would go on elsewhere). The addresses are read by then, so a caller can
/// tell whether it was to a VIP. Returning at once, rather than carrying a flag, keeps
/// the verifier's paths few.
#[inline(never)]
pub fn ip(ctx: &XdpContext, off: usize, v6: bool, out: &mut Ip) -> Result<(), ParseError> {
    if v6 {
        ipv6(ctx, off, out)
    } else {
        ipv4(ctx, off, out)
    }
}

/// Whether the lengths in the header of the whole packet `ip` agree with the frame of
/// `frame` bytes: an IPv4 total length within the frame and at least the IP and transport
/// headers, an IPv6 payload length within the frame. (A packet quoted in an ICMP error is
/// cut short by design: this is not for it.)
#[inline(never)]
pub fn lengths_ok(ctx: &XdpContext, ip: &Ip, frame: usize) -> bool {
    let Some(h) = ptr::read::<[u8; 8]>(ctx, ip.l3_off) else {
        return false;
    };
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
fn ipv4(ctx: &XdpContext, off: usize, out: &mut Ip) -> Result<(), ParseError> {
    let h = ptr::at::<[u8; IPV4_LEN]>(ctx, off).ok_or(ParseError::Truncated)?;
    // SAFETY: bounds checked by `ptr::at`.
    let h = unsafe { &*h };
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

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, out: &mut Ip) -> Result<(), ParseError> {
    let h = ptr::at::<[u8; IPV6_LEN]>(ctx, off).ok_or(ParseError::Truncated)?;
    // SAFETY: bounds checked by `ptr::at`.
    let h = unsafe { &*h };
    if h[0] >> 4 != 6 {
        return Err(ParseError::Invalid);
    }
    let mut proto = h[6];
    let mut l4_off = off + IPV6_LEN;
    let mut fragment = false;
    out.src.copy_from_slice(&h[8..24]);
    out.dst.copy_from_slice(&h[24..40]);
    // Bounded walk over extension headers; the verifier needs a fixed trip count.
    for _ in 0..MAX_EXT_HEADERS {
        match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e: [u8; 4] = ptr::read(ctx, l4_off).ok_or(ParseError::Truncated)?;
                // Routing type 0 with segments left: the packet would go on elsewhere.
                if proto == IPPROTO_ROUTING && e[2] == 0 && e[3] != 0 {
                    return Err(ParseError::Invalid);
                }
                proto = e[0];
                l4_off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let e: [u8; 2] = ptr::read(ctx, l4_off).ok_or(ParseError::Truncated)?;
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
fn min_l4_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP => 8,
        _ => 0,
    }
}

/// The flow a packet belongs to, as its owner (the backend's socket) sees it.
#[derive(Clone, Copy)]
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
}

/// Reads into `out` the flow of a TCP or UDP packet, or of an ICMP/ICMPv6 "too big" error
/// (whose quoted packet went from the VIP to the client: reversed here). `Ok(false)`:
/// none of those, so not for lb.
#[inline(never)]
pub fn flow(ctx: &XdpContext, ip: &Ip, out: &mut Flow) -> Result<bool, ParseError> {
    out.tcp_flags = 0;
    out.icmp = false;
    match ip.proto {
        IPPROTO_TCP => {
            let h: [u8; 14] = ptr::read(ctx, ip.l4_off).ok_or(ParseError::Truncated)?;
            // The rest of the minimal header must be there too.
            ptr::at::<[u8; 20]>(ctx, ip.l4_off).ok_or(ParseError::Truncated)?;
            if (h[12] >> 4) < 5 {
                return Err(ParseError::Invalid);
            }
            set_tuple(&mut out.tuple, ip, [h[0], h[1], h[2], h[3]], IPPROTO_TCP);
            out.tcp_flags = h[13];
            Ok(true)
        }
        IPPROTO_UDP => {
            let h: [u8; 8] = ptr::read(ctx, ip.l4_off).ok_or(ParseError::Truncated)?;
            set_tuple(&mut out.tuple, ip, [h[0], h[1], h[2], h[3]], IPPROTO_UDP);
            Ok(true)
        }
        IPPROTO_ICMP if !ip.v6 => icmp_too_big(ctx, ip, 3, 4, out),
        IPPROTO_ICMPV6 if ip.v6 => icmp_too_big(ctx, ip, 2, 0, out),
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
fn icmp_too_big(
    ctx: &XdpContext,
    ip: &Ip,
    ty: u8,
    code: u8,
    out: &mut Flow,
) -> Result<bool, ParseError> {
    let h: [u8; 2] = ptr::read(ctx, ip.l4_off).ok_or(ParseError::Truncated)?;
    if h[0] != ty || h[1] != code {
        return Ok(false);
    }
    let mut quoted = Ip::EMPTY;
    self::ip(ctx, ip.l4_off + 8, ip.v6, &mut quoted)?;
    if quoted.proto != IPPROTO_TCP && quoted.proto != IPPROTO_UDP {
        return Ok(false);
    }
    if quoted.bad_ihl {
        return Err(ParseError::Invalid);
    }
    let p: [u8; 4] = ptr::read(ctx, quoted.l4_off).ok_or(ParseError::Truncated)?;
    // The quoted packet went VIP -> client; the flow is client -> VIP.
    out.tuple.src = quoted.dst;
    out.tuple.dst = quoted.src;
    out.tuple.src_port = u16::from_be_bytes([p[2], p[3]]);
    out.tuple.dst_port = u16::from_be_bytes([p[0], p[1]]);
    out.tuple.proto = quoted.proto;
    out.icmp = true;
    Ok(true)
}
