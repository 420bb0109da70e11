//! Does a socket on this host own a flow? The backend path asks before it accepts a
//! packet that is not a new connection.

use core::{
    mem::size_of,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::generated::{
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
    },
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    addr::{ne_words, v4_part},
    hash::FlowTuple,
};

use crate::{
    parse::{Flow, Ip, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK},
    ptr,
};

/// `BPF_F_CURRENT_NETNS` (-1) as the helpers' u64 argument.
const CURRENT_NETNS: u64 = u64::MAX;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

/// True when a local socket owns `flow`: for TCP an established (or handshaking or
/// closing) socket, or a listener for which the packet carries a valid SYN cookie; for
/// UDP a socket connected to the flow's source.
#[inline(never)]
pub fn owns(ctx: &XdpContext, flow: &Flow, inner: &Ip) -> bool {
    // SAFETY: a plain C union; zero is valid.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = fill(&mut t, &flow.tuple, inner.v6);
    let ctx_ptr = ctx.as_ptr();
    match flow.tuple.proto {
        IPPROTO_TCP => {
            // SAFETY: the tuple is initialised for `size` bytes; the returned reference is
            // released below on every path.
            let sk = unsafe { bpf_skc_lookup_tcp(ctx_ptr, &mut t, size, CURRENT_NETNS, 0) };
            if sk.is_null() {
                return false;
            }
            // SAFETY: non-null socket from the helper; `state` is readable on sock_common.
            let state = unsafe { (*sk).state };
            let owned = state != TCP_LISTEN
                || (!flow.icmp && flow.tcp_flags & TCP_ACK != 0 && syncookie_ok(ctx, sk, inner));
            // SAFETY: releases the reference taken above.
            unsafe { bpf_sk_release(sk.cast()) };
            owned
        }
        IPPROTO_UDP => {
            // SAFETY: as above.
            let sk = unsafe { bpf_sk_lookup_udp(ctx_ptr, &mut t, size, CURRENT_NETNS, 0) };
            if sk.is_null() {
                return false;
            }
            let owned = connected_to(sk, &t, inner.v6);
            // SAFETY: as above.
            unsafe { bpf_sk_release(sk.cast()) };
            owned
        }
        _ => false,
    }
}

/// True when the UDP socket `sk` is connected to the source of tuple `t`. The lookup also
/// finds a socket bound to the port but connected to nobody (a server's new session socket
/// before its `connect`); that socket may connect to another peer before its state is read
/// here, so an established state alone does not make it this flow's.
#[inline(always)]
fn connected_to(sk: *mut bpf_sock, t: &bpf_sock_tuple, v6: bool) -> bool {
    // SAFETY: a non-null socket from the helper, still referenced; each field is read
    // with one 4-byte (or, for the port, 2-byte) load, as the verifier requires.
    unsafe {
        if read_volatile(addr_of!((*sk).state)) != TCP_ESTABLISHED {
            return false;
        }
        if v6 {
            let s = &t.__bindgen_anon_1.ipv6;
            let mut same = read_volatile(addr_of!((*sk).dst_port)) == s.sport;
            for i in 0..4 {
                same &= read_volatile(addr_of!((*sk).dst_ip6[i])) == s.saddr[i];
            }
            same
        } else {
            let s = &t.__bindgen_anon_1.ipv4;
            read_volatile(addr_of!((*sk).dst_port)) == s.sport
                && read_volatile(addr_of!((*sk).dst_ip4)) == s.saddr
        }
    }
}

#[inline(always)]
fn fill(t: &mut bpf_sock_tuple, f: &FlowTuple, v6: bool) -> u32 {
    // SAFETY: writing the union member that the size passed to the helper selects.
    unsafe {
        if v6 {
            let s = &mut t.__bindgen_anon_1.ipv6;
            s.saddr = ne_words(&f.src);
            s.daddr = ne_words(&f.dst);
            s.sport = f.src_port.to_be();
            s.dport = f.dst_port.to_be();
            size_of::<[u32; 9]>() as u32
        } else {
            let s = &mut t.__bindgen_anon_1.ipv4;
            s.saddr = u32::from_ne_bytes(v4_part(&f.src));
            s.daddr = u32::from_ne_bytes(v4_part(&f.dst));
            s.sport = f.src_port.to_be();
            s.dport = f.dst_port.to_be();
            size_of::<[u32; 3]>() as u32
        }
    }
}

/// An ACK to a listener completes a handshake whose SYN was answered with a cookie.
/// The helper reads the fixed headers in the packet itself: no copies on the stack, whose
/// frames are small on the client path's call chain.
#[inline(never)]
fn syncookie_ok(ctx: &XdpContext, sk: *mut bpf_sock, inner: &Ip) -> bool {
    let Some(th) = ptr::at::<[u8; 20]>(ctx, inner.l4_off) else {
        return false;
    };
    // SAFETY: both pointers are bounds-checked for the lengths passed, and the helper
    // only reads.
    let rc = unsafe {
        if inner.v6 {
            let Some(iph) = ptr::at::<[u8; 40]>(ctx, inner.l3_off) else {
                return false;
            };
            bpf_tcp_check_syncookie(sk.cast(), iph.cast(), 40, th.cast(), 20)
        } else {
            let Some(iph) = ptr::at::<[u8; 20]>(ctx, inner.l3_off) else {
                return false;
            };
            bpf_tcp_check_syncookie(sk.cast(), iph.cast(), 20, th.cast(), 20)
        }
    };
    rc == 0
}
