//! Invariants of the model on any frame, checked by the fuzz target `classify` and by the
//! bounded fuzz run of the tests.

use super::{
    classify, ethernet, example, ip, mutate::Frame, Class, NodeView, Reason, ServiceFlow, UNTOUCHED,
};
use crate::{
    addr::{is_v4_mapped, v4_mapped},
    encap::{write_outer_v4, write_outer_v6, Outer, ENCAP_LEN_V4, ENCAP_LEN_V6},
    limits::MAX_HEADER_OFFSET,
    proto::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IPPROTO_TCP},
};

/// A broken invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The model names no reason at all.
    NoReason,
    /// A frame shorter than an Ethernet header was not "unparsed".
    ShortFrameParsed,
    /// Traffic to neither a VIP nor the node would not be passed untouched.
    NonVipTouched,
    /// A service flow, encapsulated with lb's header layout, does not read back on the
    /// backend as GUE carrying the same flow.
    RoundTrip,
}

/// How a service flow fared once encapsulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundTrip {
    /// Read back as GUE with the same flow.
    Same,
    /// Headers that sat just below the look-up limit are past it once the outer headers
    /// are in front: the backend drops the packet as malformed.
    PastHeaderLimit,
}

/// Checks the invariants of `frame` on `node`, whose addresses must not be VIPs. Returns
/// the class, and for service flows how the round trip through encapsulation went.
pub fn invariants(
    node: &NodeView<'_>,
    frame: &[u8],
) -> Result<(Class, Option<RoundTrip>), Violation> {
    let c = classify(node, frame);
    if c.reasons().is_empty() {
        return Err(Violation::NoReason);
    }
    if !node.configured {
        return Ok((c, None));
    }
    if frame.len() < ETH_LEN && c != Class::Decided(Reason::PassUnparsed) {
        return Err(Violation::ShortFrameParsed);
    }
    if let Ok(Some((l3, v6))) = ethernet(frame) {
        if let Ok(o) = ip(frame, l3, v6) {
            let to_node = o.dst == v4_mapped(node.addr_v4) || o.dst == node.addr_v6;
            let untouched = matches!(c, Class::Decided(r) if UNTOUCHED.contains(r));
            if !node.is_vip(&o.dst) && !to_node && !untouched {
                return Err(Violation::NonVipTouched);
            }
        }
    }
    let Class::Service(s) = c else {
        return Ok((c, None));
    };
    let mut worst = RoundTrip::Same;
    // Encapsulated by a peer to this node, once with each outer family.
    for (src, dst) in [
        (v4_mapped(example::PEER_V4), v4_mapped(node.addr_v4)),
        (example::PEER_V6, node.addr_v6),
    ] {
        if dst == v4_mapped([0; 4]) || dst == [0; 16] {
            continue;
        }
        let Some(e) = encapsulate(frame, &s, src, dst, node.gue_port) else {
            continue;
        };
        match classify(node, e.as_slice()) {
            Class::Gue(g) => {
                let syn_possible = !s.icmp && s.tuple.proto == IPPROTO_TCP;
                if g.flow != Some(s.tuple)
                    || g.outer_v4_options
                    || g.hops_left != 1
                    || (g.syn && !syn_possible)
                {
                    return Err(Violation::RoundTrip);
                }
            }
            Class::Decided(Reason::DropMalformed)
                if past_header_limit(frame, &s, e.len() - frame.len()) =>
            {
                worst = RoundTrip::PastHeaderLimit;
            }
            _ => return Err(Violation::RoundTrip),
        }
    }
    Ok((c, Some(worst)))
}

/// Whether the transport header (or the ICMP error's quoted headers) of the inner packet
/// lies beyond [`MAX_HEADER_OFFSET`] once shifted by `shift` bytes.
fn past_header_limit(frame: &[u8], s: &ServiceFlow, shift: usize) -> bool {
    let Ok(Some((l3, v6))) = ethernet(frame) else {
        return false;
    };
    let Ok(i) = ip(frame, l3, v6) else {
        return false;
    };
    // The deepest offset the flow parser reads: the transport header, or for an ICMP
    // error the quoted packet's transport header, which lies at most a few hundred
    // bytes further.
    let deepest = if s.icmp {
        match ip(frame, i.l4_off + ICMP_LEN, v6) {
            Ok(q) => q.l4_off,
            Err(_) => i.l4_off + ICMP_LEN,
        }
    } else {
        i.l4_off
    };
    deepest + shift > MAX_HEADER_OFFSET
}

/// `frame`'s IP packet behind lb's outer headers (lb-common's layout), sent from `src` to
/// `dst` with one hop left, the next hop being a third address of the same family.
/// `None` when it does not fit a [`Frame`].
fn encapsulate(
    frame: &[u8],
    s: &ServiceFlow,
    src: [u8; 16],
    dst: [u8; 16],
    gue_port: u16,
) -> Option<Frame> {
    let inner = &frame[s.l3_off..];
    let v4 = is_v4_mapped(&dst);
    let mut next_hop = dst;
    next_hop[15] ^= 0x80;
    let o = Outer {
        src,
        dst,
        src_port: 50000,
        dst_port: gue_port,
        inner_len: inner.len() as u16,
        inner_v6: frame[s.l3_off] >> 4 == 6,
        tos: 0,
        flow_label: 0,
        hops_left: 1,
        flags: 0,
        next_hop,
    };
    let mut out = [0u8; ETH_LEN + ENCAP_LEN_V6];
    out[..12].copy_from_slice(&frame[..12]);
    let n = if v4 {
        out[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let mut h = [0u8; ENCAP_LEN_V4];
        write_outer_v4(&o, &mut h);
        out[ETH_LEN..ETH_LEN + ENCAP_LEN_V4].copy_from_slice(&h);
        ETH_LEN + ENCAP_LEN_V4
    } else {
        out[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let mut h = [0u8; ENCAP_LEN_V6];
        write_outer_v6(&o, &mut h);
        out[ETH_LEN..].copy_from_slice(&h);
        ETH_LEN + ENCAP_LEN_V6
    };
    let mut f = Frame::EMPTY;
    (f.extend(&out[..n]) && f.extend(inner)).then_some(f)
}
