//! lb's XDP program. One entry point handles both paths of a node:
//! - client path: a packet to a VIP is hashed to a bucket and sent, GUE-encapsulated, to
//!   the bucket's backend (`client.rs`);
//! - backend path: a GUE packet to this node is decapsulated and accepted, or passed on to
//!   the bucket's previous owner when no local socket owns its flow (`backend.rs`).
//!
//! Everything else is passed to the stack untouched. Every packet is counted under exactly
//! one reason (`lb_common::stats::Reason`).
#![no_std]
// Inline assembly on BPF (`ptr::PacketWords`).
#![feature(asm_experimental_arch)]
#![no_main]

mod backend;
mod bench;
mod client;
mod forward;
mod icmp_reply;
mod maps;
mod ptr;
mod socket;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    maps::NODE_CONFIGURED,
    parse::{self, Ip},
    stats::Reason,
};
use ptr::Xdp;
use verdict::{pass, Verdict};

// Inlined into the entry symbol the macro makes: left to LLVM, a body this large became a
// function of its own, and every packet paid a call (7 to 9 ns).
#[xdp]
#[inline(always)]
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
    let frame = Xdp(ctx);
    let l2 = match parse::ethernet(frame) {
        Ok(Some(l2)) => l2,
        Ok(None) => return pass(Reason::PassNotIp),
        Err(_) => return pass(Reason::PassUnparsed),
    };
    let own = (node.addr_v4_word(), node.addr_v6_words());
    if parse::certainly_not_for_lb(frame, &l2, own, maps::maybe_vip) {
        return pass(Reason::PassNotService);
    }
    let Some(scratch) = maps::SCRATCH.get_ptr_mut(0) else {
        return pass(Reason::PassUnconfigured);
    };
    // SAFETY: a per-CPU value, only this program run touches it.
    let maps::Scratch { ip, flow, tuple } = unsafe { &mut *scratch };
    // Reset, as `parse::ip` may stop before it writes the address read below.
    *ip = Ip::EMPTY;
    let parsed = parse::ip(frame, l2.l3_off, l2.v6(), ip);
    if parsed.is_err() || !parse::lengths_ok(frame, ip) {
        // The addresses are read before the extension headers: a broken header (or one
        // whose lengths contradict the frame) to a VIP is lb's to drop, not the stack's
        // to route; the backend's kernel would discard it.
        if maps::is_vip(&ip.dst) {
            return verdict::drop(Reason::DropMalformed);
        }
        return pass(Reason::PassUnparsed);
    }
    let gue_port = u16::from_be(node.gue_port_be);
    // Read again, not kept: held across the calls between, the words were spilled to the
    // stack on every packet's path, foreign traffic's included.
    let own = (node.addr_v4_word(), node.addr_v6_words());
    if parse::is_gue_to_me(frame, ip, own, gue_port) {
        return backend::handle(ctx, ip, flow, tuple);
    }
    let v = client::handle(ctx, node, ip, flow, tuple);
    if v.reason_index() == Reason::DropTooBig as u32 {
        return icmp_reply::too_big(ctx, node, &l2, ip);
    }
    v
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
