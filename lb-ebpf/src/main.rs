//! lb's XDP program. One entry point handles both paths of a node:
//! - client path: a packet to a VIP is hashed to a bucket and sent, GUE-encapsulated, to
//!   the bucket's backend (`client.rs`);
//! - backend path: a GUE packet to this node is decapsulated and accepted, or passed on to
//!   the bucket's previous owner when no local socket owns its flow (`backend.rs`).
//!
//! Everything else is passed to the stack untouched. Every packet is counted under exactly
//! one reason (`lb_common::stats::Reason`).
#![no_std]
#![no_main]

mod backend;
mod bench;
mod client;
mod forward;
mod icmp_reply;
mod maps;
mod parse;
mod ptr;
mod socket;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    addr::v4_mapped,
    maps::{NodeConfig, NODE_CONFIGURED},
    stats::Reason,
};
use parse::{Ip, ETH_P_IPV6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L2};
use verdict::{pass, Verdict};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let v = process(&ctx);
    maps::count(v.reason_index());
    v.action()
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let Some(node) = maps::NODE.get(0) else {
        return pass(Reason::PassUnconfigured);
    };
    if node.flags & NODE_CONFIGURED == 0 {
        return pass(Reason::PassUnconfigured);
    }
    let l2 = match parse::ethernet(ctx) {
        Ok(Some(l2)) => l2,
        Ok(None) => return pass(Reason::PassNotIp),
        Err(_) => return pass(Reason::PassUnparsed),
    };
    if certainly_not_for_lb(ctx, node, &l2) {
        return pass(Reason::PassNotService);
    }
    let mut ip = Ip::EMPTY;
    let parsed = parse::ip(ctx, l2.l3_off, l2.ether_type == ETH_P_IPV6, &mut ip);
    if parsed.is_err() || !parse::lengths_ok(ctx, &ip, ctx.data_end() - ctx.data()) {
        // The addresses are read before the extension headers: a broken header (or one
        // whose lengths contradict the frame) to a VIP is lb's to drop, not the stack's
        // to route; the backend's kernel would discard it.
        if maps::is_vip(&ip.dst) {
            return verdict::drop(Reason::DropMalformed);
        }
        return pass(Reason::PassUnparsed);
    }
    if is_gue_to_me(ctx, node, &ip) {
        return backend::handle(ctx, &ip);
    }
    let mut v = client::handle(ctx, node, &ip, false);
    if let Some((service, backend)) = v.asked_local() {
        if client::local_claim(ctx, &ip) {
            return client::claimed(service, backend, (ctx.data_end() - ctx.data()) as u64);
        }
        v = client::handle(ctx, node, &ip, true);
    }
    if v.reason_index() == Reason::DropTooBig as u32 {
        return icmp_reply::too_big(ctx, node, &l2, &ip);
    }
    v
}

/// The fast path for foreign traffic: a well-formed IP header (IPv6 without extension
/// headers) to an address that is neither a VIP (by the VIP filter) nor this node. The
/// full path would end such a packet in `PassNotService` too; it only costs more.
#[inline(always)]
fn certainly_not_for_lb(ctx: &XdpContext, node: &NodeConfig, l2: &L2) -> bool {
    let dst = if l2.ether_type == ETH_P_IPV6 {
        let Some(h) = ptr::read::<[u8; 8]>(ctx, l2.l3_off) else {
            return false;
        };
        let direct = matches!(h[6], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6);
        if h[0] >> 4 != 6 || !direct {
            return false;
        }
        let Some(dst) = ptr::read::<[u8; 16]>(ctx, l2.l3_off + 24) else {
            return false;
        };
        if dst == node.addr_v6 {
            return false;
        }
        dst
    } else {
        let Some(h) = ptr::read::<[u8; 20]>(ctx, l2.l3_off) else {
            return false;
        };
        if h[0] >> 4 != 4 {
            return false;
        }
        let dst = [h[16], h[17], h[18], h[19]];
        if dst == node.addr_v4 {
            return false;
        }
        v4_mapped(dst)
    };
    !maps::maybe_vip(&dst)
}

/// UDP to this node's GUE address and port.
#[inline(always)]
fn is_gue_to_me(ctx: &XdpContext, node: &NodeConfig, ip: &Ip) -> bool {
    if ip.proto != IPPROTO_UDP || ip.fragment || ip.bad_ihl {
        return false;
    }
    let mine = if ip.v6 {
        node.addr_v6 != [0; 16] && ip.dst == node.addr_v6
    } else {
        node.addr_v4 != [0; 4] && ip.dst == v4_mapped(node.addr_v4)
    };
    mine && ptr::read_be16(ctx, ip.l4_off + 2) == Some(u16::from_be(node.gue_port_be))
}

/// Returns XDP_PASS and nothing else: the floor of the benchmarks, and the program put on
/// the far side of a veth so that XDP_TX on native-mode veth is delivered.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
