//! The backend path: a GUE packet to this node. Accept it (strip the outer headers and
//! pass the inner packet to the stack) when it opens a connection or a local socket owns
//! its flow; otherwise pass it on to the next hop of its hop list (daisy chaining), and
//! accept it when no hop is left.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, xdp_action},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{
    encap::{
        ipv4_checksum, HopList, FLAG_FORWARD_SYN, FLAG_RETURNED, GUE_HEADER_LEN, GUE_LEN, OUTER_TTL,
    },
    parse::{self, next_step, step_flags, Flow, Frame, Ip, Step},
    proto::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, UDP_LEN},
    stats::Reason,
};

use crate::{
    forward::{self, NextHop},
    ptr::{self, PacketWords, Xdp},
    socket,
    verdict::{drop, Verdict},
};

/// The backend path, inlined in the entry point: a call and return cost 3 to 8 ns a
/// packet here, and the entry point's frame holds this path's locals in the slots of the
/// client path's.
#[inline(always)]
pub fn handle(ctx: &XdpContext, outer: &Ip, f: &mut Flow, tuple: &mut bpf_sock_tuple) -> Verdict {
    let frame = Xdp(ctx);
    // Opaque: inlined in the entry point, LLVM rebuilt this offset from one of the GUE
    // test's, of a range the verifier cannot follow.
    let gue_off = ptr::opaque(outer.l4_off) + UDP_LEN;
    let g = match parse::gue(frame, gue_off) {
        Ok(g) => g,
        Err(r) => return drop(r),
    };
    let inner_v6 = g.inner_v6();
    let hops_left = g.hops.hops_left;
    let flags = g.hops.flags;
    // As words (one load each), read where used: held across the socket question, they
    // would take stack slots the entry point's frame has no room for.
    let next_hop = frame.words::<0, 4, 16>(&g.hops.next_hop);

    let inner_off = gue_off + GUE_LEN;
    let mut inner = Ip::EMPTY;
    if parse::ip(frame, inner_off, inner_v6, &mut inner).is_err()
        || !parse::lengths_ok(frame, &inner)
    {
        return drop(Reason::DropMalformed);
    }
    if inner.bad_ihl {
        return drop(Reason::DropMalformed);
    }
    if flags & FLAG_RETURNED != 0 {
        return accept(ctx, inner_off, inner_v6, Reason::AcceptReturned);
    }
    let mut udp = false;
    let mut flow = None;
    if !inner.fragment {
        match parse::flow(frame, &inner, f) {
            Err(_) => return drop(Reason::DropMalformed),
            Ok(false) => {}
            Ok(true) => {
                udp = f.tuple.proto == IPPROTO_UDP && !f.icmp;
                flow = Some(&*f);
            }
        }
    }
    let step = next_step(outer, hops_left, flags, next_hop, udp);
    if let Some(f) = flow {
        let forward_syn = flags & FLAG_FORWARD_SYN != 0;
        let stays = step == Step::Accept;
        if let Some(reason) = claim(ctx, f, &inner, tuple, forward_syn, stays) {
            return accept(ctx, inner_off, inner_v6, reason);
        }
    }
    match step {
        Step::PassOn | Step::Return => pass_on(ctx, outer, gue_off, step_flags(step, flags)),
        Step::Accept => accept(ctx, inner_off, inner_v6, Reason::AcceptLastHop),
    }
}

/// Whether the packet of flow `f` (IP header `ip`) is this node's to take: a new TCP
/// connection (a SYN, unless the sender asks for SYNs to be passed on) or a flow a local
/// socket owns. `stays`: the packet is accepted here whatever the answer (no one is left
/// to pass it to), so the socket table is not asked; most packets of a backend are such,
/// as a bucket has a second hop only after a change of its owner. The backend path asks
/// it of a GUE packet's inner packet, and the client path of a packet whose bucket's
/// first hop is this node.
#[inline(always)]
pub fn claim(
    ctx: &XdpContext,
    f: &Flow,
    ip: &Ip,
    tuple: &mut bpf_sock_tuple,
    forward_syn: bool,
    stays: bool,
) -> Option<Reason> {
    if f.is_syn() && !forward_syn {
        return Some(Reason::AcceptSyn);
    }
    if !stays && socket::owns(ctx, f, ip, tuple) {
        return Some(Reason::AcceptSocket);
    }
    None
}

/// Strips everything before the inner IP packet but the Ethernet addresses, and passes it.
/// Inlined, as a call costs about 9 ns here. (Out of line it once had to be: LLVM reused
/// bounds checks of byte-wise Ethernet accesses across the head's move, which the
/// verifier cannot follow; `PacketWords` checks its span anew after the move.)
#[inline(always)]
fn accept(ctx: &XdpContext, inner_off: usize, inner_v6: bool, reason: Reason) -> Verdict {
    let Some(old) = PacketWords::<12>::at(ctx, 0) else {
        return drop(Reason::DropMalformed);
    };
    let macs = [old.get(0), old.get(1), old.get(2)];
    // SAFETY: plain helper call; packet pointers are derived anew afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (inner_off - ETH_LEN) as i32) } != 0 {
        return drop(Reason::DropMalformed);
    }
    let ether_type = if inner_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    if ptr::write_ethernet(ctx, &macs, ether_type).is_none() {
        return drop(Reason::DropMalformed);
    }
    Verdict::new(xdp_action::XDP_PASS, reason)
}

/// Sends the packet on with hop-list flags `flags`: to the hop list's next hop when
/// chaining (`FLAG_CHAINED`, one hop fewer), back to the first hop, the outer source, when
/// returning (`FLAG_RETURNED`, no hop taken); outer destination rewritten, this node as
/// the source. Inlined, as a call costs about 9 ns here.
#[inline(always)]
fn pass_on(ctx: &XdpContext, outer: &Ip, gue_off: usize, flags: u8) -> Verdict {
    let returning = flags & FLAG_RETURNED != 0;
    // Opaque: inlined, LLVM derived this pointer from a bounds check of another offset,
    // which the verifier cannot follow.
    let hops_off = core::hint::black_box(gue_off + GUE_HEADER_LEN);
    let Some(hops) = ptr::at::<HopList>(ctx, hops_off) else {
        return drop(Reason::DropMalformed);
    };
    let next_hop = if returning {
        outer.src_words()
    } else {
        // SAFETY: bounds checked by `ptr::at`.
        Xdp(ctx).words::<0, 4, 16>(unsafe { &(*hops).next_hop })
    };
    let tot_len = ptr::frame_len(ctx) - outer.l3_off;
    let mut hop = NextHop::EMPTY;
    if let Err(r) = forward::lookup_addr(ctx, &outer.dst, next_hop, tot_len as u16, &mut hop) {
        return drop(r);
    }
    // SAFETY: bounds checked; `handle` saw hops at most MAX_HOPS, and above 0 when
    // chaining.
    unsafe {
        if !returning {
            (*hops).hops_left -= 1;
        }
        (*hops).flags = flags;
    }
    let rewritten = if outer.v6 {
        rewrite_v6(ctx, outer.l3_off, &outer.dst, next_hop)
    } else if outer.l4_off == outer.l3_off + IPV4_LEN {
        rewrite_v4(ctx, outer.l3_off, &outer.dst, next_hop)
    } else {
        // lb never sends outer IPv4 options; a header with them is not of its making.
        return drop(Reason::DropBadGue);
    };
    if rewritten.is_none() {
        return drop(Reason::DropMalformed);
    }
    // Drop a VLAN tag, if any: the Ethernet header is written anew for the egress.
    let vlan = (outer.l3_off - ETH_LEN) as i32;
    // SAFETY: plain helper call; packet pointers are derived anew afterwards.
    if vlan != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, vlan) } != 0 {
        return drop(Reason::DropMalformed);
    }
    let ether_type = if outer.v6 { ETH_P_IPV6 } else { ETH_P_IP };
    match forward::send(ctx, &hop, ether_type) {
        Some(action) if returning => Verdict::new(action, Reason::ReturnedToFirstHop),
        Some(action) => Verdict::new(action, Reason::SecondHop),
        None => drop(Reason::DropMalformed),
    }
}

/// The outer IPv4 header at `off` from `src` to `dst` (as words, `addr::words`: stored
/// from registers, where bytes would be copied through the stack).
#[inline(always)]
fn rewrite_v4(ctx: &XdpContext, off: usize, src: &[u8; 16], dst: [u32; 4]) -> Option<()> {
    let p = ptr::at::<[u8; IPV4_LEN]>(ctx, off)?;
    // SAFETY: bounds checked by `ptr::at`.
    let h = unsafe { &mut *p };
    h[8] = OUTER_TTL;
    h[12..16].copy_from_slice(&src[12..16]);
    h[16..20].copy_from_slice(&dst[3].to_ne_bytes());
    let sum = ipv4_checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// As `rewrite_v4`, for an outer IPv6 header.
#[inline(always)]
fn rewrite_v6(ctx: &XdpContext, off: usize, src: &[u8; 16], dst: [u32; 4]) -> Option<()> {
    let p = ptr::at::<[u8; IPV6_LEN]>(ctx, off)?;
    // SAFETY: bounds checked by `ptr::at`.
    let h = unsafe { &mut *p };
    h[7] = OUTER_TTL;
    h[8..24].copy_from_slice(src);
    for (i, w) in dst.iter().enumerate() {
        h[24 + 4 * i..28 + 4 * i].copy_from_slice(&w.to_ne_bytes());
    }
    Some(())
}
