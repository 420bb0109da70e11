//! Sending a rewritten packet on: the next hop (egress interface, MACs, MTU) from the
//! agent's next-hop maps, or from the kernel's FIB and neighbour tables
//! (`bpf_fib_lookup`) when the agent has no resolved entry; then XDP_TX when it leaves by
//! the interface it came in on, else a redirect.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    addr::{aligned_words, copy_to_words, from_words, is_v4_mapped, v4_part},
    maps::{NextHopEntry, NEXTHOP_VALID},
    proto::IPPROTO_UDP,
    stats::Reason,
};

use crate::{
    maps::{self, NEXTHOPS},
    ptr,
};

/// `bpf_fib_lookup`'s parameter block, in a per-CPU value rather than on the stack: its
/// 64 bytes would not fit under the entry point's frame (the verifier's 512 bytes for a
/// call chain).
#[map]
static FIB_PARAMS: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet to `dst` leaves: the interface, and the Ethernet header's first 12
/// bytes (destination and source MAC) as three words in memory order, copied and written
/// a word at a time.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    pub macs: [u32; 3],
}

impl NextHop {
    pub const EMPTY: NextHop = NextHop {
        ifindex: 0,
        macs: [0; 3],
    };

    /// Sets `self` from a route's interface and MACs, a word at a time as each is formed:
    /// built whole, the words were spilled to the stack around the FIB helper's call, and
    /// that frame sits at the bottom of the backend path's call chain.
    #[inline(always)]
    fn set(&mut self, ifindex: u32, d: &[u8; 6], s: &[u8; 6]) {
        self.ifindex = ifindex;
        self.macs[0] = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
        self.macs[1] = u32::from_ne_bytes([d[4], d[5], s[0], s[1]]);
        self.macs[2] = u32::from_ne_bytes([s[2], s[3], s[4], s[5]]);
    }
}

/// The next hop for an outer packet of `tot_len` bytes (from the IP header on) from `src`
/// to backend `dst`, into `out`: the agent's entry for the backend's slot `slot`, else the
/// kernel's FIB. `Err(DropTooBig)` when the packet does not fit the egress MTU.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    slot: u32,
    src: &[u8; 16],
    dst: &[u8; 16],
    tot_len: u16,
    out: &mut NextHop,
) -> Result<(), Reason> {
    resolve(NEXTHOPS.get(slot), ctx, (src, dst), tot_len, out)
}

/// As `lookup`, for a next hop known by its address, as words (`addr::words`): the
/// agent's entry for that address.
#[inline(always)]
pub fn lookup_addr(
    ctx: &XdpContext,
    src: &[u8; 16],
    dst: [u32; 4],
    tot_len: u16,
    out: &mut NextHop,
) -> Result<(), Reason> {
    // One copy of the address as bytes, for the hash map and the FIB alike.
    let bytes = from_words(dst);
    resolve(
        maps::nexthop_of(dst, &bytes),
        ctx,
        (src, &bytes),
        tot_len,
        out,
    )
}

/// The agent's `entry` when it is valid, else the kernel's FIB for `(src, dst)`.
#[inline(always)]
fn resolve(
    entry: Option<&NextHopEntry>,
    ctx: &XdpContext,
    (src, dst): (&[u8; 16], &[u8; 16]),
    tot_len: u16,
    out: &mut NextHop,
) -> Result<(), Reason> {
    match entry.filter(|e| e.flags & NEXTHOP_VALID != 0) {
        Some(e) => from_entry(e, tot_len, out),
        None => fib(ctx, src, dst, tot_len, out),
    }
}

#[inline(always)]
fn from_entry(e: &NextHopEntry, tot_len: u16, out: &mut NextHop) -> Result<(), Reason> {
    if tot_len > e.mtu {
        return Err(Reason::DropTooBig);
    }
    *out = NextHop {
        ifindex: e.ifindex,
        // SAFETY: `dmac` and `smac` are the entry's last 12 bytes, at offset 8 of a
        // 4-aligned `repr(C)` struct.
        macs: unsafe { aligned_words(e.dmac.as_ptr()) },
    };
    Ok(())
}

/// `bpf_fib_lookup` for the route and neighbour, which also checks the MTU; counted as
/// `fib_fallback`. Not inlined: the fallback's work stays out of the callers' frames, and
/// BPF frames are small.
#[inline(never)]
fn fib(
    ctx: &XdpContext,
    src: &[u8; 16],
    dst: &[u8; 16],
    tot_len: u16,
    out: &mut NextHop,
) -> Result<(), Reason> {
    maps::count(Reason::FibFallback as u32);
    let Some((p, v4)) = fib_params(ctx, tot_len, dst) else {
        return Err(Reason::DropFibMiss);
    };
    if v4 {
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(v4_part(src));
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4_part(dst));
    } else {
        // SAFETY: the unions' IPv6 members, written whole (plain u32 arrays).
        unsafe {
            copy_to_words(&mut p.__bindgen_anon_3.ipv6_src, src);
            copy_to_words(&mut p.__bindgen_anon_4.ipv6_dst, dst);
        }
    }
    match fib_query(ctx, p) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            out.set(p.ifindex, &p.dmac, &p.smac);
            Ok(())
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Reason::DropTooBig),
        _ => Err(Reason::DropFibMiss),
    }
}

/// The per-CPU parameter block of `bpf_fib_lookup`, set for a UDP packet of `tot_len`
/// bytes (from the IP header on) to `dst`, arriving on the packet's interface, and
/// whether `dst` is IPv4: the caller sets the addresses. (The family is read after the
/// map lookup: read before, LLVM kept `dst`'s bytes across the call on the stack.)
#[inline(always)]
pub fn fib_params(
    ctx: &XdpContext,
    tot_len: u16,
    dst: &[u8; 16],
) -> Option<(&'static mut FibParams, bool)> {
    let p = FIB_PARAMS.get_ptr_mut(0)?;
    // SAFETY: a per-CPU value, only this CPU touches it while the program runs; a plain C
    // struct, all zero is its "unset" state.
    let p = unsafe {
        *p = zeroed();
        &mut *p
    };
    let v4 = is_v4_mapped(dst);
    p.l4_protocol = IPPROTO_UDP;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.family = if v4 { AF_INET } else { AF_INET6 };
    Some((p, v4))
}

/// Asks the kernel's FIB and neighbour tables (`bpf_fib_lookup`) with `p`: the helper's
/// return code; its answer is in `p`.
#[inline(always)]
pub fn fib_query(ctx: &XdpContext, p: &mut FibParams) -> u32 {
    // SAFETY: `p` is a valid, initialised parameter block of the size passed.
    unsafe { bpf_fib_lookup(ctx.as_ptr(), p, size_of::<FibParams>() as i32, 0) as u32 }
}

/// Writes the Ethernet header at the start of the packet and sends it towards `hop`.
/// Returns `None` if the packet is too short for an Ethernet header.
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: &NextHop, ether_type: u16) -> Option<u32> {
    ptr::write_ethernet(ctx, &hop.macs, ether_type)?;
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        Some(xdp_action::XDP_TX)
    } else {
        // SAFETY: plain helper call.
        Some(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
    }
}
