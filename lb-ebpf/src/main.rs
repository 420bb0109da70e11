//! lb's XDP program. One entry point handles both paths of a node:
//! - client path: a packet to a VIP is hashed to a bucket and sent, GUE-encapsulated, to
//!   the bucket's backend (`client.rs`);
//! - backend path: a GUE packet to this node is decapsulated and accepted, or passed on to
//!   the bucket's previous owner when no local socket owns its flow (`backend.rs`).
//! Everything else is passed to the stack untouched.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::stats::Reason;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let _ = ctx;
    maps::count(Reason::PassNotIp);
    xdp_action::XDP_PASS
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
