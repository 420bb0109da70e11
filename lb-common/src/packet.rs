//! A host-side model of the XDP program's decisions that need nothing but the packet's
//! headers and a small view of the node: whether a frame is IP at all, whether it parses,
//! whether it is for a service or is GUE for this node, and whether it is a fragment,
//! malformed or bad GUE. What needs the kernel (the service's table, the FIB, local
//! sockets) is left open as the set of reasons the program may still end in.
//!
//! The parsing and the decisions are not restated here: the model runs the program's own
//! code, `crate::parse`, over a slice, and only maps its outcomes to reasons where the
//! program would go on to the kernel. The data-plane tests run the real program on random
//! and mutated frames and check that it agrees with this model; the fuzz target
//! `classify` (lb-common/fuzz) runs the model on arbitrary bytes.

pub use crate::parse::{Flow, Ip, ParseError};
use crate::{
    addr,
    encap::{FLAG_FORWARD_SYN, FLAG_RETURNED, GUE_LEN},
    hash::FlowTuple,
    maps::{vip_filter_bit, vip_filter_bit_of_words},
    parse::{self, next_step, Step},
    proto::{IPPROTO_UDP, IPV4_LEN, UDP_LEN},
    stats::Reason,
};

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
                if !g.chains && !g.returns {
                    // Accepted whatever the socket table says, so it is not asked.
                    return Reasons::one(Reason::AcceptLastHop);
                }
                let mut r = Reasons::EMPTY;
                if g.flow.is_some() {
                    r = r.with(Reason::AcceptSocket);
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

// ---- the shared parser, by value ----------------------------------------------------

/// Where the IP header starts and whether it is IPv6; `Ok(None)` for frames that are not
/// IP (`parse::ethernet`).
pub fn ethernet(f: &[u8]) -> Result<Option<(usize, bool)>, ParseError> {
    parse::ethernet(f).map(|l2| l2.map(|l2| (l2.l3_off, l2.v6())))
}

/// The IP header at `off` (`parse::ip`).
pub fn ip(f: &[u8], off: usize, v6: bool) -> Result<Ip, ParseError> {
    let mut out = Ip::EMPTY;
    parse::ip(f, off, v6, &mut out).map(|()| out)
}

/// The flow of a TCP or UDP packet or of an ICMP/ICMPv6 "too big" error; `Ok(None)`
/// for anything else (`parse::flow`).
pub fn flow(f: &[u8], ip: &Ip) -> Result<Option<Flow>, ParseError> {
    let mut out = Flow::EMPTY;
    parse::flow(f, ip, &mut out).map(|found| found.then_some(out))
}

// ---- the decisions, as the program's `process`, `client::handle`, `backend::handle` ---

/// What the program does with `frame` on `node`, as far as its headers tell.
pub fn classify(node: &NodeView<'_>, frame: &[u8]) -> Class {
    use Class::Decided;
    if !node.configured {
        return Decided(Reason::PassUnconfigured);
    }
    let l2 = match parse::ethernet(frame) {
        Ok(Some(l2)) => l2,
        Ok(None) => return Decided(Reason::PassNotIp),
        Err(_) => return Decided(Reason::PassUnparsed),
    };
    let maybe_vip = |dst: [u32; 4]| {
        let bit = vip_filter_bit_of_words(dst);
        node.services.iter().any(|s| vip_filter_bit(&s.vip) == bit)
    };
    let own = (u32::from_ne_bytes(node.addr_v4), addr::words(&node.addr_v6));
    if parse::certainly_not_for_lb(frame, &l2, own, maybe_vip) {
        return Decided(Reason::PassNotService);
    }
    // As in the program, the addresses are read before the extension headers are walked,
    // so a broken chain to a VIP is dropped, not passed.
    let mut outer = Ip::EMPTY;
    if parse::ip(frame, l2.l3_off, l2.v6(), &mut outer).is_err()
        || !parse::lengths_ok(frame, &outer)
    {
        return Decided(if node.is_vip(&outer.dst) {
            Reason::DropMalformed
        } else {
            Reason::PassUnparsed
        });
    }
    if parse::is_gue_to_me(frame, &outer, own, node.gue_port) {
        return backend(frame, &outer);
    }
    let mut fl = Flow::EMPTY;
    if let Err(no) = parse::client_flow(frame, &outer, &mut fl) {
        return Decided(no.reason(|| node.is_vip(&outer.dst)));
    }
    if !node.is_service(&fl.tuple.dst, fl.tuple.dst_port, fl.tuple.proto) {
        return Decided(Reason::PassNotService);
    }
    Class::Service(ServiceFlow {
        tuple: fl.tuple,
        icmp: fl.icmp,
        l3_off: outer.l3_off,
    })
}

fn backend(f: &[u8], outer: &Ip) -> Class {
    use Class::Decided;
    let g = match parse::gue(f, outer.l4_off + UDP_LEN) {
        Ok(g) => g,
        Err(r) => return Decided(r),
    };
    let inner_v6 = g.inner_v6();
    let (hops_left, flags, next_hop) = (g.hops.hops_left, g.hops.flags, g.hops.next_hop);
    let inner_off = outer.l4_off + UDP_LEN + GUE_LEN;
    let mut inner = Ip::EMPTY;
    if parse::ip(f, inner_off, inner_v6, &mut inner).is_err()
        || !parse::lengths_ok(f, &inner)
        || inner.bad_ihl
    {
        return Decided(Reason::DropMalformed);
    }
    if flags & FLAG_RETURNED != 0 {
        return Decided(Reason::AcceptReturned);
    }
    let mut fl = None;
    let mut udp = false;
    if !inner.fragment {
        match flow(f, &inner) {
            Err(_) => return Decided(Reason::DropMalformed),
            Ok(None) => {}
            Ok(Some(x)) => {
                fl = Some(x);
                udp = x.tuple.proto == IPPROTO_UDP && !x.icmp;
            }
        }
    }
    let step = next_step(outer, hops_left, flags, addr::words(&next_hop), udp);
    Class::Gue(GueFacts {
        inner_v6,
        inner_off,
        flow: fl.map(|x| x.tuple),
        syn: fl.is_some_and(|x| x.is_syn()) && flags & FLAG_FORWARD_SYN == 0,
        chains: step == Step::PassOn,
        returns: step == Step::Return,
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
