//! Path MTU: a client packet that would not fit the egress MTU once encapsulated is
//! answered, from XDP, with ICMP "fragmentation needed" (IPv4 with DF set) or ICMPv6
//! "packet too big", carrying the largest inner packet that fits, and sent back out the
//! interface it came in by (XDP_TX, MAC addresses swapped), so the client's path-MTU
//! discovery adapts. The reply comes from the address the client sent to (the VIP).
//! Replies are rate-limited per CPU; past the limit, and for IPv4 without DF, the packet
//! is dropped as `drop_too_big`, as before.
//!
//! The client path tells this module which next hop refused the packet
//! (`remember_hop`); the entry point answers when the client path ends in
//! `drop_too_big` (`too_big`), so the reply is built in a frame of its own.

use aya_ebpf::{
    bindings::BPF_FIB_LKUP_RET_FRAG_NEEDED,
    helpers::generated::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    addr::{copy_to_words, is_v4_mapped, v4_part},
    encap::{ipv4_checksum, ENCAP_LEN_V4, ENCAP_LEN_V6},
    maps::NodeConfig,
    parse::{Ip, L2},
    proto::{ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_LEN, IPV6_LEN},
    stats::Reason,
};

use crate::{
    forward, ptr,
    verdict::{drop, Verdict},
};

/// Bytes of the client's packet quoted: enough for its IP and transport headers, and the
/// ICMP header and quote are one `bpf_csum_diff` call (at most 512 bytes). A packet too
/// big for any usable MTU is longer than this.
const QUOTE_LEN: usize = 504;
/// Replies per second per CPU.
const REPLIES_PER_SEC: u64 = 1000;
const NS_PER_SEC: u64 = 1_000_000_000;
const IPV6_MIN_MTU: u32 = 1280;
const IPV4_MIN_MTU: u32 = 68;

/// The next hop a client packet was too big for (`valid` 1), per CPU, until `too_big`
/// takes it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefusedHop {
    addr: [u8; 16],
    valid: u32,
}

/// The current second of replies on this CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RateWindow {
    start_ns: u64,
    sent: u64,
}

#[map]
static TOO_BIG_HOP: PerCpuArray<RefusedHop> = PerCpuArray::with_max_entries(1, 0);

#[map]
static ICMP_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// Notes that a client packet (not an ICMP error itself) was too big for `hop`.
#[inline(always)]
pub fn remember_hop(hop: &[u8; 16]) {
    if let Some(h) = TOO_BIG_HOP.get_ptr_mut(0) {
        // SAFETY: a per-CPU value, only this CPU touches it while the program runs.
        unsafe {
            (*h).addr = *hop;
            (*h).valid = 1;
        }
    }
}

/// Answers the client packet `ip` (which the client path found too big for the hop it
/// remembered) with an ICMP error, or drops it as `drop_too_big`.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, node: &NodeConfig, l2: &L2, ip: &Ip) -> Verdict {
    let Some(h) = TOO_BIG_HOP.get_ptr_mut(0) else {
        return drop(Reason::DropTooBig);
    };
    // SAFETY: as in `remember_hop`.
    let (hop, valid) = unsafe { ((*h).addr, (*h).valid) };
    // SAFETY: as above.
    unsafe { (*h).valid = 0 };
    if valid == 0 {
        return drop(Reason::DropTooBig);
    }
    if !ip.v6 {
        // Without DF the client expects routers to fragment; lb does not.
        // Two bytes, flags and fragment offset: for a one-byte read LLVM turns the bounds
        // check into `p < data_end`, from which the verifier learns no range.
        match ptr::read::<[u8; 2]>(ctx, ip.l3_off + 6) {
            Some([flags, _]) if flags & 0x40 != 0 => {}
            _ => return drop(Reason::DropTooBig),
        }
    }
    let Some(mtu) = path_mtu(ctx, node, &hop) else {
        return drop(Reason::DropTooBig);
    };
    let encap = if is_v4_mapped(&hop) {
        ENCAP_LEN_V4
    } else {
        ENCAP_LEN_V6
    } as u32;
    let inner_mtu = mtu.saturating_sub(encap);
    let floor = if ip.v6 { IPV6_MIN_MTU } else { IPV4_MIN_MTU };
    if inner_mtu < floor || !rate_ok() {
        return drop(Reason::DropTooBig);
    }
    let sent = if ip.v6 {
        reply_v6(ctx, l2, ip, inner_mtu)
    } else {
        reply_v4(ctx, l2, ip, inner_mtu)
    };
    match sent {
        Some(()) => Verdict::new(
            aya_ebpf::bindings::xdp_action::XDP_TX,
            Reason::IcmpTooBigSent,
        ),
        None => drop(Reason::DropTooBig),
    }
}

/// The MTU of the route from this node to `hop` (the FIB's answer for a packet too big
/// for it).
#[inline(always)]
fn path_mtu(ctx: &XdpContext, node: &NodeConfig, hop: &[u8; 16]) -> Option<u32> {
    let (p, v4) = forward::fib_params(ctx, u16::MAX, hop)?;
    if v4 {
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node.addr_v4);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4_part(hop));
    } else {
        // SAFETY: the unions' IPv6 members, written whole (plain u32 arrays).
        unsafe {
            copy_to_words(&mut p.__bindgen_anon_3.ipv6_src, &node.addr_v6);
            copy_to_words(&mut p.__bindgen_anon_4.ipv6_dst, hop);
        }
    }
    if forward::fib_query(ctx, p) != BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return None;
    }
    // SAFETY: the helper sets `mtu_result` when it answers FRAG_NEEDED.
    Some(u32::from(unsafe { p.__bindgen_anon_1.mtu_result }))
}

/// One more reply in this CPU's current second, if the limit allows.
#[inline(always)]
fn rate_ok() -> bool {
    let Some(w) = ICMP_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU value, only this CPU touches it while the program runs.
    unsafe {
        if now.wrapping_sub((*w).start_ns) >= NS_PER_SEC {
            (*w).start_ns = now;
            (*w).sent = 0;
        }
        if (*w).sent >= REPLIES_PER_SEC {
            return false;
        }
        (*w).sent += 1;
    }
    true
}

/// The Ethernet (and VLAN) header of the reply: MAC addresses swapped.
#[inline(always)]
fn l2_header(ctx: &XdpContext, l2: &L2) -> Option<[u8; 18]> {
    let mut h = ptr::read::<[u8; 18]>(ctx, 0)?;
    let dst: [u8; 6] = h[0..6].try_into().ok()?;
    h.copy_within(6..12, 0);
    h[6..12].copy_from_slice(&dst);
    let type_at = l2.l3_off - 2;
    let ether_type = if l2.ether_type == ETH_P_IPV6 {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    h[type_at..type_at + 2].copy_from_slice(&ether_type.to_be_bytes());
    Some(h)
}

/// Makes room for `head` bytes of new headers before the IP packet and cuts the frame to
/// those headers and `QUOTE_LEN` bytes of the packet; writes the L2 header `eth`.
#[inline(always)]
fn reshape(ctx: &XdpContext, l2: &L2, eth: &[u8; 18], head: usize) -> Option<()> {
    let frame = ptr::frame_len(ctx);
    if frame < l2.l3_off + QUOTE_LEN {
        return None;
    }
    // SAFETY: plain helper calls; packet pointers are derived anew afterwards.
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, -(head as i32)) != 0 {
            return None;
        }
        let cut = (frame - l2.l3_off - QUOTE_LEN) as i32;
        if bpf_xdp_adjust_tail(ctx.ctx, -cut) != 0 {
            return None;
        }
    }
    if l2.l3_off == 18 {
        let p = ptr::at::<[u8; 18]>(ctx, 0)?;
        // SAFETY: bounds checked by `ptr::at`.
        unsafe { p.write_unaligned(*eth) };
    } else {
        let p = ptr::at::<[u8; 14]>(ctx, 0)?;
        let mut h = [0u8; 14];
        h.copy_from_slice(&eth[..14]);
        // SAFETY: bounds checked by `ptr::at`.
        unsafe { p.write_unaligned(h) };
    }
    Some(())
}

/// Folds a `bpf_csum_diff` sum to the ones' complement checksum, as stored in memory.
#[inline(always)]
fn fold(sum: i64) -> [u8; 2] {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// The sum of the ICMP header and quote at `off` (`ICMP_LEN + QUOTE_LEN` bytes), with
/// `seed`.
#[inline(always)]
fn icmp_sum(ctx: &XdpContext, off: usize, seed: u32) -> Option<i64> {
    let p = ptr::at::<[u8; ICMP_LEN + QUOTE_LEN]>(ctx, off)?;
    // SAFETY: the helper reads the bounds-checked bytes.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            p.cast(),
            (ICMP_LEN + QUOTE_LEN) as u32,
            seed,
        )
    };
    (sum >= 0).then_some(sum)
}

#[inline(always)]
fn reply_v4(ctx: &XdpContext, l2: &L2, ip: &Ip, mtu: u32) -> Option<()> {
    let eth = l2_header(ctx, l2)?;
    reshape(ctx, l2, &eth, IPV4_LEN + ICMP_LEN)?;
    let mut h = [0u8; IPV4_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IPV4_LEN + ICMP_LEN + QUOTE_LEN) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = IPPROTO_ICMP;
    h[12..16].copy_from_slice(&v4_part(&ip.dst));
    h[16..20].copy_from_slice(&v4_part(&ip.src));
    let sum = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    let p = ptr::at::<[u8; IPV4_LEN + ICMP_LEN]>(ctx, l2.l3_off)?;
    // Written in place, not built on the stack: this function's frame sits on top of the
    // entry point's, and BPF allows 512 bytes for the two.
    // SAFETY: bounds checked by `ptr::at`.
    let out = unsafe { &mut *p };
    *out = [0; IPV4_LEN + ICMP_LEN];
    out[..IPV4_LEN].copy_from_slice(&h);
    // Destination unreachable, fragmentation needed; next-hop MTU in the last 2 bytes.
    out[IPV4_LEN] = 3;
    out[IPV4_LEN + 1] = 4;
    out[IPV4_LEN + 6..].copy_from_slice(&(mtu as u16).to_be_bytes());
    let sum = icmp_sum(ctx, l2.l3_off + IPV4_LEN, 0)?;
    let c = ptr::at::<[u8; 2]>(ctx, l2.l3_off + IPV4_LEN + 2)?;
    // SAFETY: bounds checked by `ptr::at`.
    unsafe { c.write_unaligned(fold(sum)) };
    Some(())
}

#[inline(always)]
fn reply_v6(ctx: &XdpContext, l2: &L2, ip: &Ip, mtu: u32) -> Option<()> {
    let eth = l2_header(ctx, l2)?;
    reshape(ctx, l2, &eth, IPV6_LEN + ICMP_LEN)?;
    let payload = (ICMP_LEN + QUOTE_LEN) as u32;
    let p = ptr::at::<[u8; IPV6_LEN + ICMP_LEN]>(ctx, l2.l3_off)?;
    // Written in place, as in `reply_v4`.
    // SAFETY: bounds checked by `ptr::at`.
    let out = unsafe { &mut *p };
    *out = [0; IPV6_LEN + ICMP_LEN];
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    out[6] = IPPROTO_ICMPV6;
    out[7] = 64;
    out[8..24].copy_from_slice(&ip.dst);
    out[24..40].copy_from_slice(&ip.src);
    // Packet too big, with the MTU.
    out[IPV6_LEN] = 2;
    out[IPV6_LEN + 4..].copy_from_slice(&mtu.to_be_bytes());
    // Pseudo-header: the addresses as the reply carries them, then the upper-layer length
    // and next header, two 32-bit words added to the seed (ones' complement, as the
    // helper sums memory).
    let extra = u64::from(u32::from_ne_bytes(payload.to_be_bytes()))
        + u64::from(u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]));
    let extra = (extra & 0xffff_ffff) + (extra >> 32);
    let addrs = ptr::at::<[u8; 32]>(ctx, l2.l3_off + 8)?;
    // SAFETY: the helper reads the bounds-checked bytes.
    let seed = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, addrs.cast(), 32, extra as u32) };
    if seed < 0 {
        return None;
    }
    let sum = icmp_sum(ctx, l2.l3_off + IPV6_LEN, seed as u32)?;
    let c = ptr::at::<[u8; 2]>(ctx, l2.l3_off + IPV6_LEN + 2)?;
    // SAFETY: bounds checked by `ptr::at`.
    unsafe { c.write_unaligned(fold(sum)) };
    Some(())
}
