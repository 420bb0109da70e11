//! The client path: a packet to a service is hashed to a bucket of the service's table
//! and sent, encapsulated, to the bucket's backend, with the bucket's previous owner as
//! the next hop of the hop list. When the bucket's backend is this node itself (every
//! node both balances and serves), the backend path's decision is made in place: the
//! packet goes to the local stack untouched, or on to the previous owner.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, xdp_action},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{
    addr::{from_words, V4_MAPPED_WORD},
    encap::{write_outer_v4, write_outer_v6, Outer, ENCAP_LEN_V4, ENCAP_LEN_V6, FLAG_CHAINED},
    hash::{bucket_index, outer_source_port},
    limits::{MAX_SERVICES, MAX_TABLE_BITS},
    maps::{Backend, NodeConfig, ServiceKey, BACKEND_PRESENT},
    parse::{self, Flow, Ip, NoFlow},
    proto::{ETH_LEN, ETH_P_IP, ETH_P_IPV6},
    stats::Reason,
};

use crate::{
    forward::{self, NextHop},
    icmp_reply,
    maps::{self, BACKENDS, BUCKETS},
    ptr::{self, PacketWords, Xdp},
    verdict::{drop, pass, Verdict},
};

/// The client path, inlined in the entry point (a call and return cost about 9 ns here):
/// the flow, its service, bucket and first hop, then `forward`. When the first hop is
/// this node, the backend path's question (does a local socket own the flow?) is asked
/// here, in the entry point's frame, where the socket lookup's frames fit.
#[inline(always)]
pub fn handle(
    ctx: &XdpContext,
    node: &NodeConfig,
    ip: &Ip,
    flow: &mut Flow,
    tuple: &mut bpf_sock_tuple,
) -> Verdict {
    // `client_flow` writes every field of `flow` before anything reads one.
    match parse::client_flow(Xdp(ctx), ip, flow) {
        Ok(()) => {}
        Err(NoFlow::Unusable(r)) if maps::is_vip(&ip.dst) => return drop(r),
        Err(_) => return pass(Reason::PassNotService),
    }
    let key = ServiceKey {
        addr: flow.tuple.dst,
        port_be: flow.tuple.dst_port.to_be(),
        proto: flow.tuple.proto,
        _pad: 0,
    };
    let Some(svc) = maps::service(&key) else {
        return pass(Reason::PassNotService);
    };
    if svc.table_bits > MAX_TABLE_BITS {
        return drop(Reason::DropNoBackend);
    }
    let Some(hash_key) = maps::FLOW_HASH.get(0) else {
        return pass(Reason::PassUnconfigured);
    };
    let hash = flow.tuple.hash(hash_key, !ip.v6);
    let Some(bucket) = BUCKETS.get(svc.table_offset + bucket_index(hash, svc.table_bits)) else {
        return drop(Reason::DropNoBackend);
    };
    let Some(first) = present(bucket.first) else {
        return drop(Reason::DropNoBackend);
    };
    // This node is the first hop: what its backend path would decide, made here, so
    // nothing is encapsulated to the node itself.
    let local = node.is_own(first);
    if local && previous_owner(bucket.first, bucket.second, first).is_none() {
        // No one else to ask: the local stack answers for itself, socket or not (most
        // buckets, as a bucket has a second hop only after a change of its owner).
        return delivered(ctx, svc.id);
    }
    // Only these four values live across the socket question's call: each more would be
    // spilled to the stack on every forwarded packet too.
    let pick = Pick::new(hash, svc.id, local, flow.icmp);
    let slots = u64::from(bucket.first) | (u64::from(bucket.second) << 32);
    if local && crate::backend::claim(ctx, flow, ip, tuple, false, false).is_some() {
        return delivered(ctx, pick.service());
    }
    forward(ctx, node, ip, slots, pick)
}

/// The bucket's previous owner (in slot `second_slot`), when a packet can be chained to
/// it from the first hop `first` (in `first_slot`): a hop list cannot switch the outer
/// family.
#[inline(always)]
fn previous_owner(first_slot: u32, second_slot: u32, first: &Backend) -> Option<&'static Backend> {
    if second_slot == first_slot {
        return None;
    }
    present(second_slot).filter(|s| s.is_v4() == first.is_v4())
}

/// What `handle` chose, for `forward`, in one scalar: the flow hash, the service id,
/// whether the first hop is this node and whether the packet is an ICMP error about the
/// flow. One register live across the socket question's call, not four: each more would
/// be spilled to the stack on every forwarded packet.
#[derive(Clone, Copy)]
struct Pick(u64);

const PICK_LOCAL: u64 = 1 << 16;
const PICK_ICMP: u64 = 1 << 17;
const _: () = assert!(MAX_SERVICES as u64 <= PICK_LOCAL);

impl Pick {
    #[inline(always)]
    fn new(hash: u32, service: u32, local: bool, icmp: bool) -> Pick {
        let mut p = (u64::from(hash) << 32) | u64::from(service);
        if local {
            p |= PICK_LOCAL;
        }
        if icmp {
            p |= PICK_ICMP;
        }
        Pick(p)
    }

    #[inline(always)]
    fn hash(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    fn service(self) -> u32 {
        (self.0 & (PICK_LOCAL - 1)) as u32
    }

    #[inline(always)]
    fn local(self) -> bool {
        self.0 & PICK_LOCAL != 0
    }

    #[inline(always)]
    fn icmp(self) -> bool {
        self.0 & PICK_ICMP != 0
    }
}

/// Sends the packet of `pick`'s flow on, encapsulated: to the bucket's first hop, with the
/// previous owner as the next hop of the hop list; or, when the first hop is this node
/// and no local socket owns the flow, to the second hop, chained. `slots`: the bucket's
/// first and second backend slots, in the low and high half. Inlined (a call and return
/// measured about 10 ns): the entry point's frame then holds the outer headers, and still
/// leaves room under BPF's 512 bytes for the calls made on top of it (the socket check,
/// the ICMP reply).
#[inline(always)]
fn forward(ctx: &XdpContext, node: &NodeConfig, ip: &Ip, slots: u64, pick: Pick) -> Verdict {
    let (first_slot, second_slot) = (slots as u32, (slots >> 32) as u32);
    let Some(first) = present(first_slot) else {
        return drop(Reason::DropNoBackend);
    };
    let local = pick.local();
    let second = previous_owner(first_slot, second_slot, first);
    let mut reason = if pick.icmp() {
        Reason::IcmpForwarded
    } else {
        Reason::Encapsulated
    };
    let hash = pick.hash();
    // The outer headers as far as the bucket decides them; `encapsulate` adds the rest.
    let mut outer = Outer {
        src: [0; 16],
        dst: from_words(first.addr_words()),
        src_port: outer_source_port(hash),
        dst_port: u16::from_be(node.gue_port_be),
        inner_len: 0,
        inner_v6: ip.v6,
        tos: 0,
        flow_label: hash,
        hops_left: 0,
        flags: 0,
        next_hop: [0; 16],
    };
    if local {
        let Some(second) = second else {
            // Gone since `handle` looked (the agent writes meanwhile): delivered here, as
            // `handle` would have.
            return delivered(ctx, pick.service());
        };
        // As a first hop passes a packet it does not own on: to the second hop, chained,
        // with no hop left, so an unowned UDP flow comes back here.
        reason = Reason::SentOnFromLocal;
        outer.dst = from_words(second.addr_words());
        outer.flags = FLAG_CHAINED;
        outer.next_hop = outer.dst;
    } else if let Some(second) = second {
        outer.hops_left = 1;
        outer.next_hop = from_words(second.addr_words());
    }
    let slot = if local { second_slot } else { first_slot };
    // A hop list cannot switch the family: the second hop's is the first's.
    let v = encapsulate(ctx, node, ip, (slot, first.is_v4()), &mut outer);
    if v.action() != xdp_action::XDP_DROP {
        // Counted, as every packet of the bucket, under its owner (`sent_on_from_local`
        // tells those this node handed on), with the length it arrived with.
        let bytes = (outer.inner_len as usize + ip.l3_off) as u64;
        if local {
            maps::add_local(pick.service(), bytes);
        } else {
            maps::add(pick.service(), first_slot, bytes);
        }
        return Verdict::new(v.action(), reason);
    } else if v.reason_index() == Reason::DropTooBig as u32 && !pick.icmp() {
        // The entry point answers the client (`icmp_reply`), not an ICMP error.
        icmp_reply::remember_hop(&outer.dst);
    }
    v
}

/// A packet passed to the local stack untouched, counted for the service and this node's
/// own backend.
#[inline(always)]
fn delivered(ctx: &XdpContext, service: u32) -> Verdict {
    maps::add_local(service, ptr::frame_len(ctx) as u64);
    pass(Reason::DeliveredLocally)
}

#[inline(always)]
fn present(index: u32) -> Option<&'static Backend> {
    BACKENDS
        .get(index)
        .filter(|b| b.flags & BACKEND_PRESENT != 0)
}

/// Puts the outer headers in front of the IP packet at `ip.l3_off` and sends it to
/// `outer.dst`, the backend in slot `slot` (IPv4 when `outer_v4`), completing `outer`
/// (source, length, TOS). The verdict's reason is the caller's to set when the packet was
/// sent.
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    node: &NodeConfig,
    ip: &Ip,
    (slot, outer_v4): (u32, bool),
    outer: &mut Outer,
) -> Verdict {
    match outer_headers(ctx, node, ip, (slot, outer_v4), outer) {
        Some(Ok(action)) => Verdict::new(action, Reason::Encapsulated),
        Some(Err(r)) => drop(r),
        None => drop(Reason::DropMalformed),
    }
}

/// `encapsulate`'s work: `None` when the packet could not be rewritten (no headroom),
/// `Some(Err)` for a drop.
#[inline(always)]
fn outer_headers(
    ctx: &XdpContext,
    node: &NodeConfig,
    ip: &Ip,
    (slot, outer_v4): (u32, bool),
    outer: &mut Outer,
) -> Option<Result<u32, Reason>> {
    let dst = &outer.dst;
    let src = if outer_v4 {
        let a = node.addr_v4_word();
        if a == 0 {
            return Some(Err(Reason::DropNoSource));
        }
        from_words([0, 0, V4_MAPPED_WORD, a])
    } else {
        let w = node.addr_v6_words();
        if w == [0; 4] {
            return Some(Err(Reason::DropNoSource));
        }
        from_words(w)
    };
    let inner_len = ptr::frame_len(ctx) - ip.l3_off;
    let encap_len = if outer_v4 { ENCAP_LEN_V4 } else { ENCAP_LEN_V6 };
    let tot_len = encap_len + inner_len;
    if tot_len > u16::MAX as usize {
        return Some(Err(Reason::DropTooBig));
    }
    let mut hop = NextHop::EMPTY;
    if let Err(r) = forward::lookup(ctx, slot, &src, dst, tot_len as u16, &mut hop) {
        return Some(Err(r));
    }
    let vtc: [u8; 2] = ptr::read(ctx, ip.l3_off)?;
    let tos = if ip.v6 {
        (vtc[0] << 4) | (vtc[1] >> 4)
    } else {
        vtc[1]
    };
    outer.src = src;
    outer.inner_len = inner_len as u16;
    outer.tos = tos;
    let delta = (ETH_LEN + encap_len - ip.l3_off) as i32;
    // SAFETY: plain helper call; every packet pointer is derived anew afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
        return None;
    }
    if outer_v4 {
        write_outer_v4(outer, &mut PacketWords::<ENCAP_LEN_V4>::at(ctx, ETH_LEN)?);
        forward::send(ctx, &hop, ETH_P_IP).map(Ok)
    } else {
        write_outer_v6(outer, &mut PacketWords::<ENCAP_LEN_V6>::at(ctx, ETH_LEN)?);
        forward::send(ctx, &hop, ETH_P_IPV6).map(Ok)
    }
}
