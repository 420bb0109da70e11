//! A host-side model of the XDP program's decisions that need nothing but the packet's
//! headers and a small view of the node: whether a frame is IP at all, whether it parses,
//! whether it is for a service or is GUE for this node, and whether it is a fragment,
//! malformed or bad GUE. What needs the kernel (the service's table, the FIB, local
//! sockets) is left open as the set of reasons the program may still end in.
//!
//! The rules are those of `lb-ebpf/src/parse.rs`, `main.rs`, `client.rs` and
//! `backend.rs`, rule for rule, including the program's limit on how deep into a packet
//! it looks for headers ([`MAX_HEADER_OFFSET`]). The data-plane tests run the real
//! program on random and mutated frames and check that it agrees with this model; the
//! fuzz target `classify` (lb-common/fuzz) runs the model on arbitrary bytes.

use crate::{
    addr::{is_v4_mapped, v4_mapped},
    encap::{
        FLAG_CHAINED, FLAG_FORWARD_SYN, FLAG_RETURNED, GUE_FIRST_BYTE, GUE_HEADER_LEN,
        HOP_LIST_LEN, HOP_LIST_TYPE, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, IPV6_LEN, MAX_HOPS,
        UDP_LEN,
    },
    hash::FlowTuple,
    maps::vip_filter_bit,
    stats::Reason,
};

/// Headers are looked for only this far into a packet (the program's
/// `ptr::MAX_HEADER_OFFSET`): a header starting further in counts as missing.
pub const MAX_HEADER_OFFSET: usize = 1024;
/// IPv6 extension headers walked before the program stops looking for the transport
/// header (the program's `parse::MAX_EXT_HEADERS`).
pub const MAX_EXT_HEADERS: usize = 3;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// The GUE base header and the hop list as they arrive.
const GUE_LEN: usize = GUE_HEADER_LEN + HOP_LIST_LEN;

/// A service as the model needs it: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The VIP (see `addr`).
    pub vip: [u8; 16],
    pub port: u16,
    pub proto: u8,
}

/// What the program knows of its node without looking at tables: the `NODE` map and
/// the keys of the `SERVICES` and `VIPS` maps.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    /// `NODE_CONFIGURED` is set.
    pub configured: bool,
    /// The node's GUE addresses; all zero when it has none of that family.
    pub addr_v4: [u8; 4],
    pub addr_v6: [u8; 16],
    pub gue_port: u16,
    pub services: &'a [ServiceAddr],
}

impl NodeView<'_> {
    /// Whether `addr` is the VIP of any service (the `VIPS` map).
    pub fn is_vip(&self, addr: &[u8; 16]) -> bool {
        self.services.iter().any(|s| &s.vip == addr)
    }

    /// Whether (`vip`, `port`, `proto`) is a service (the `SERVICES` map).
    pub fn is_service(&self, vip: &[u8; 16], port: u16, proto: u8) -> bool {
        self.services
            .iter()
            .any(|s| &s.vip == vip && s.port == port && s.proto == proto)
    }
}

/// A set of reasons (bit `r as u32` for reason `r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reasons(pub u32);

impl Reasons {
    pub const EMPTY: Reasons = Reasons(0);

    pub const fn one(r: Reason) -> Reasons {
        Reasons(1 << r as u32)
    }

    #[must_use]
    pub const fn with(self, r: Reason) -> Reasons {
        Reasons(self.0 | 1 << r as u32)
    }

    pub const fn contains(self, r: Reason) -> bool {
        self.0 & (1 << r as u32) != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The reason when the set holds exactly one.
    pub fn single(self) -> Option<Reason> {
        if self.0.count_ones() == 1 {
            Reason::ALL.get(self.0.trailing_zeros() as usize).copied()
        } else {
            None
        }
    }

    pub fn iter(self) -> impl Iterator<Item = Reason> {
        Reason::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

/// Reasons under which the program passes the frame exactly as it came.
pub const UNTOUCHED: Reasons = Reasons::one(Reason::PassNotIp)
    .with(Reason::PassNotService)
    .with(Reason::PassUnconfigured)
    .with(Reason::PassUnparsed);

/// What the program does with a frame, as far as its headers tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Settled by the headers and the node view alone.
    Decided(Reason),
    /// For a service (client path): what happens depends on the service's table and
    /// the FIB.
    Service(ServiceFlow),
    /// Well-formed GUE for this node (backend path): what happens depends on local
    /// sockets and the FIB.
    Gue(GueFacts),
}

/// A client-path packet for a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceFlow {
    /// The flow as the backend sees it (for an ICMP error: the quoted flow, reversed).
    pub tuple: FlowTuple,
    /// An ICMP "too big" error about the flow.
    pub icmp: bool,
    /// Where the IP packet that would be encapsulated starts.
    pub l3_off: usize,
}

/// A GUE packet for this node whose headers are all right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueFacts {
    pub inner_v6: bool,
    /// Where the inner IP packet starts.
    pub inner_off: usize,
    /// The inner flow, when it has one (TCP, UDP, ICMP too-big; not a fragment).
    pub flow: Option<FlowTuple>,
    /// A TCP SYN without the forward-SYN flag: accepted for being a SYN.
    pub syn: bool,
    /// A hop is left, of the outer family, and not this node: it may be passed on.
    pub chains: bool,
    /// Not chained on, UDP, passed on by a first hop: if no socket owns it, it goes back
    /// to the outer source.
    pub returns: bool,
    /// The outer header is IPv4 with options (lb never sends those).
    pub outer_v4_options: bool,
    pub hops_left: u8,
    pub next_hop: [u8; 16],
}

impl Class {
    /// Every reason the program may end in for this frame.
    pub fn reasons(&self) -> Reasons {
        match self {
            Class::Decided(r) => Reasons::one(*r),
            Class::Service(f) => (if f.icmp {
                Reasons::one(Reason::IcmpForwarded)
            } else {
                // Too big once encapsulated: answered with ICMP when the rules allow.
                Reasons::one(Reason::Encapsulated).with(Reason::IcmpTooBigSent)
            })
            .with(Reason::DropNoBackend)
            .with(Reason::DropFibMiss)
            .with(Reason::DropTooBig)
            .with(Reason::DropNoSource)
            // No headroom for the outer headers.
            .with(Reason::DropMalformed),
            Class::Gue(g) => {
                if g.syn {
                    return Reasons::one(Reason::AcceptSyn);
                }
                let mut r = Reasons::EMPTY;
                if g.flow.is_some() {
                    r = r.with(Reason::AcceptSocket);
                }
                if !g.chains && !g.returns {
                    return r.with(Reason::AcceptLastHop);
                }
                r = r.with(Reason::DropFibMiss).with(Reason::DropTooBig);
                if g.outer_v4_options {
                    r.with(Reason::DropBadGue)
                } else if g.chains {
                    r.with(Reason::SecondHop)
                } else {
                    r.with(Reason::ReturnedToFirstHop)
                }
            }
        }
    }

    /// The one reason the headers settle, if they do.
    pub fn decided(&self) -> Option<Reason> {
        self.reasons().single()
    }
}

// ---- header access, as the program's `ptr` module ----------------------------------

/// `N` bytes at `off`, or `None` past the end or past [`MAX_HEADER_OFFSET`].
fn read<const N: usize>(f: &[u8], off: usize) -> Option<[u8; N]> {
    if off > MAX_HEADER_OFFSET {
        return None;
    }
    let b = f.get(off..off.checked_add(N)?)?;
    let mut out = [0u8; N];
    out.copy_from_slice(b);
    Some(out)
}

fn read_be16(f: &[u8], off: usize) -> Option<u16> {
    read::<2>(f, off).map(u16::from_be_bytes)
}

/// Headers cut short or inconsistent (the program's `ParseError`; which of the two does
/// not change its decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unparsable;

/// Where the IP header starts and its family; `Ok(None)` for frames that are not IP.
pub fn ethernet(f: &[u8]) -> Result<Option<(usize, bool)>, Unparsable> {
    let mut ether_type = read_be16(f, 12).ok_or(Unparsable)?;
    let mut l3_off = ETH_LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = read_be16(f, ETH_LEN + 2).ok_or(Unparsable)?;
        l3_off += VLAN_LEN;
    }
    Ok(match ether_type {
        ETH_P_IP => Some((l3_off, false)),
        ETH_P_IPV6 => Some((l3_off, true)),
        _ => None,
    })
}

/// An IP header's facts, as the program's `parse::Ip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub v6: bool,
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub fragment: bool,
    pub bad_ihl: bool,
}

/// The IP header at `off`.
pub fn ip(f: &[u8], off: usize, v6: bool) -> Result<Ip, Unparsable> {
    if v6 {
        ipv6(f, off)
    } else {
        ipv4(f, off)
    }
}

fn ipv4(f: &[u8], off: usize) -> Result<Ip, Unparsable> {
    let h = read::<IPV4_LEN>(f, off).ok_or(Unparsable)?;
    if h[0] >> 4 != 4 {
        return Err(Unparsable);
    }
    let ihl = ((h[0] & 0x0f) as usize) << 2;
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    Ok(Ip {
        v6: false,
        l3_off: off,
        l4_off: off + ihl,
        proto: h[9],
        src: v4_mapped([h[12], h[13], h[14], h[15]]),
        dst: v4_mapped([h[16], h[17], h[18], h[19]]),
        fragment: frag != 0,
        bad_ihl: ihl < IPV4_LEN,
    })
}

/// Whether the lengths in the header of the whole packet `ip` agree with the frame (the
/// program's `parse::lengths_ok`): an IPv4 total length within the frame and at least the
/// IP and transport headers, an IPv6 payload length within the frame.
pub fn lengths_ok(f: &[u8], ip: &Ip) -> bool {
    let Some(h) = read::<8>(f, ip.l3_off) else {
        return false;
    };
    if ip.v6 {
        let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
        return ip.l3_off + IPV6_LEN + payload_len <= f.len();
    }
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let l4_min = if !ip.fragment || u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
        min_l4_len(ip.proto)
    } else {
        0
    };
    ip.l3_off + tot_len <= f.len() && tot_len >= ip.l4_off - ip.l3_off + l4_min
}

/// The smallest transport header of `proto` (TCP, UDP, ICMP; 0 for the rest).
pub fn min_l4_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP => 8,
        _ => 0,
    }
}

fn ipv6(f: &[u8], off: usize) -> Result<Ip, Unparsable> {
    let h = read::<IPV6_LEN>(f, off).ok_or(Unparsable)?;
    if h[0] >> 4 != 6 {
        return Err(Unparsable);
    }
    let mut proto = h[6];
    let mut l4_off = off + IPV6_LEN;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e = read::<4>(f, l4_off).ok_or(Unparsable)?;
                // Routing type 0 with segments left (deprecated, RFC 5095).
                if proto == IPPROTO_ROUTING && e[2] == 0 && e[3] != 0 {
                    return Err(Unparsable);
                }
                proto = e[0];
                l4_off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let e = read::<2>(f, l4_off).ok_or(Unparsable)?;
                proto = e[0];
                l4_off += 8;
                fragment = true;
            }
            _ => break,
        }
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    Ok(Ip {
        v6: true,
        l3_off: off,
        l4_off,
        proto,
        src,
        dst,
        fragment,
        bad_ihl: false,
    })
}

/// A flow as the program's `parse::Flow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub tuple: FlowTuple,
    pub tcp_flags: u8,
    pub icmp: bool,
}

/// The flow of a TCP or UDP packet or of an ICMP/ICMPv6 "too big" error; `Ok(None)`
/// for anything else.
pub fn flow(f: &[u8], ip: &Ip) -> Result<Option<Flow>, Unparsable> {
    let tuple = |p: [u8; 4], proto| FlowTuple {
        src: ip.src,
        dst: ip.dst,
        src_port: u16::from_be_bytes([p[0], p[1]]),
        dst_port: u16::from_be_bytes([p[2], p[3]]),
        proto,
    };
    match ip.proto {
        IPPROTO_TCP => {
            let h = read::<20>(f, ip.l4_off).ok_or(Unparsable)?;
            if h[12] >> 4 < 5 {
                return Err(Unparsable);
            }
            Ok(Some(Flow {
                tuple: tuple([h[0], h[1], h[2], h[3]], IPPROTO_TCP),
                tcp_flags: h[13],
                icmp: false,
            }))
        }
        IPPROTO_UDP => {
            let h = read::<8>(f, ip.l4_off).ok_or(Unparsable)?;
            Ok(Some(Flow {
                tuple: tuple([h[0], h[1], h[2], h[3]], IPPROTO_UDP),
                tcp_flags: 0,
                icmp: false,
            }))
        }
        IPPROTO_ICMP if !ip.v6 => icmp_too_big(f, ip, 3, 4),
        IPPROTO_ICMPV6 if ip.v6 => icmp_too_big(f, ip, 2, 0),
        _ => Ok(None),
    }
}

fn icmp_too_big(f: &[u8], ip: &Ip, ty: u8, code: u8) -> Result<Option<Flow>, Unparsable> {
    let h = read::<2>(f, ip.l4_off).ok_or(Unparsable)?;
    if h[0] != ty || h[1] != code {
        return Ok(None);
    }
    let quoted = self::ip(f, ip.l4_off + 8, ip.v6)?;
    if quoted.proto != IPPROTO_TCP && quoted.proto != IPPROTO_UDP {
        return Ok(None);
    }
    if quoted.bad_ihl {
        return Err(Unparsable);
    }
    let p = read::<4>(f, quoted.l4_off).ok_or(Unparsable)?;
    Ok(Some(Flow {
        tuple: FlowTuple {
            src: quoted.dst,
            dst: quoted.src,
            src_port: u16::from_be_bytes([p[2], p[3]]),
            dst_port: u16::from_be_bytes([p[0], p[1]]),
            proto: quoted.proto,
        },
        tcp_flags: 0,
        icmp: true,
    }))
}

// ---- the decisions, as the program's `process`, `client::handle`, `backend::handle` ---

/// What the program does with `frame` on `node`, as far as its headers tell.
pub fn classify(node: &NodeView<'_>, frame: &[u8]) -> Class {
    use Class::Decided;
    if !node.configured {
        return Decided(Reason::PassUnconfigured);
    }
    let (l3_off, v6) = match ethernet(frame) {
        Ok(Some(l2)) => l2,
        Ok(None) => return Decided(Reason::PassNotIp),
        Err(Unparsable) => return Decided(Reason::PassUnparsed),
    };
    if certainly_not_for_lb(node, frame, l3_off, v6) {
        return Decided(Reason::PassNotService);
    }
    let outer = match ip(frame, l3_off, v6) {
        Ok(o) if lengths_ok(frame, &o) => o,
        Ok(o) => return Decided(broken_header(node, &o.dst)),
        Err(Unparsable) => {
            // The program reads IPv6 addresses before walking extension headers: a broken
            // chain to a VIP is dropped, not passed.
            if let Some(h) = read::<IPV6_LEN>(frame, l3_off).filter(|h| v6 && h[0] >> 4 == 6) {
                let mut dst = [0u8; 16];
                dst.copy_from_slice(&h[24..40]);
                return Decided(broken_header(node, &dst));
            }
            return Decided(Reason::PassUnparsed);
        }
    };
    if is_gue_to_me(node, frame, &outer) {
        return backend(frame, &outer);
    }
    client(node, frame, &outer)
}

/// The program's fast path for foreign traffic: an IP header of the right version (IPv6
/// straight to TCP, UDP or ICMPv6) to an address that is not this node's and whose bit in
/// the VIP filter no VIP sets.
fn certainly_not_for_lb(node: &NodeView<'_>, f: &[u8], l3_off: usize, v6: bool) -> bool {
    let dst = if v6 {
        let Some(h) = read::<8>(f, l3_off) else {
            return false;
        };
        if h[0] >> 4 != 6 || !matches!(h[6], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) {
            return false;
        }
        let Some(dst) = read::<16>(f, l3_off + 24) else {
            return false;
        };
        if dst == node.addr_v6 {
            return false;
        }
        dst
    } else {
        let Some(h) = read::<IPV4_LEN>(f, l3_off) else {
            return false;
        };
        let dst = [h[16], h[17], h[18], h[19]];
        if h[0] >> 4 != 4 || dst == node.addr_v4 {
            return false;
        }
        v4_mapped(dst)
    };
    let bit = vip_filter_bit(&dst);
    !node.services.iter().any(|s| vip_filter_bit(&s.vip) == bit)
}

/// A header that does not parse or contradicts the frame: to a VIP dropped, else passed.
fn broken_header(node: &NodeView<'_>, dst: &[u8; 16]) -> Reason {
    if node.is_vip(dst) {
        Reason::DropMalformed
    } else {
        Reason::PassUnparsed
    }
}

fn is_gue_to_me(node: &NodeView<'_>, f: &[u8], ip: &Ip) -> bool {
    if ip.proto != IPPROTO_UDP || ip.fragment || ip.bad_ihl {
        return false;
    }
    let mine = if ip.v6 {
        node.addr_v6 != [0; 16] && ip.dst == node.addr_v6
    } else {
        node.addr_v4 != [0; 4] && ip.dst == v4_mapped(node.addr_v4)
    };
    mine && read_be16(f, ip.l4_off + 2) == Some(node.gue_port)
}

fn client(node: &NodeView<'_>, f: &[u8], ip: &Ip) -> Class {
    let unusable = |reason| {
        Class::Decided(if node.is_vip(&ip.dst) {
            reason
        } else {
            Reason::PassNotService
        })
    };
    if ip.fragment {
        return unusable(Reason::DropFragment);
    }
    if ip.bad_ihl {
        return unusable(Reason::DropMalformed);
    }
    let fl = match flow(f, ip) {
        Ok(Some(fl)) => fl,
        Ok(None) => return Class::Decided(Reason::PassNotService),
        Err(Unparsable) => return unusable(Reason::DropMalformed),
    };
    if fl.icmp && fl.tuple.dst != ip.dst {
        return Class::Decided(Reason::PassNotService);
    }
    if !node.is_service(&fl.tuple.dst, fl.tuple.dst_port, fl.tuple.proto) {
        return Class::Decided(Reason::PassNotService);
    }
    Class::Service(ServiceFlow {
        tuple: fl.tuple,
        icmp: fl.icmp,
        l3_off: ip.l3_off,
    })
}

fn backend(f: &[u8], outer: &Ip) -> Class {
    use Class::Decided;
    let gue_off = outer.l4_off + UDP_LEN;
    let Some(g) = read::<GUE_LEN>(f, gue_off) else {
        return Decided(Reason::DropMalformed);
    };
    let inner_v6 = match g[1] {
        IPPROTO_IPIP => false,
        IPPROTO_IPV6 => true,
        _ => return Decided(Reason::DropBadGue),
    };
    if g[0] != GUE_FIRST_BYTE || g[4..6] != HOP_LIST_TYPE || g[6] > MAX_HOPS {
        return Decided(Reason::DropBadGue);
    }
    let hops_left = g[6];
    let flags = g[7];
    let mut next_hop = [0u8; 16];
    next_hop.copy_from_slice(&g[8..24]);

    let inner_off = gue_off + GUE_LEN;
    let inner = match ip(f, inner_off, inner_v6) {
        Ok(i) if !i.bad_ihl && lengths_ok(f, &i) => i,
        _ => return Decided(Reason::DropMalformed),
    };
    if flags & FLAG_RETURNED != 0 {
        return Decided(Reason::AcceptReturned);
    }
    let mut fl = None;
    let mut syn = false;
    let mut udp = false;
    if !inner.fragment {
        match flow(f, &inner) {
            Err(Unparsable) => return Decided(Reason::DropMalformed),
            Ok(None) => {}
            Ok(Some(x)) => {
                syn = x.tuple.proto == IPPROTO_TCP
                    && !x.icmp
                    && x.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
                    && flags & FLAG_FORWARD_SYN == 0;
                fl = Some(x.tuple);
                udp = x.tuple.proto == IPPROTO_UDP && !x.icmp;
            }
        }
    }
    let chains = hops_left > 0 && next_hop != outer.dst && is_v4_mapped(&next_hop) != outer.v6;
    Class::Gue(GueFacts {
        inner_v6,
        inner_off,
        flow: fl,
        syn,
        chains,
        returns: !chains && udp && flags & FLAG_CHAINED != 0 && outer.src != outer.dst,
        outer_v4_options: !outer.v6 && outer.l4_off != outer.l3_off + IPV4_LEN,
        hops_left,
        next_hop,
    })
}

pub mod check;
pub mod example;
pub mod mutate;

#[cfg(test)]
mod tests;
