//! Does a socket on this host own a flow? The backend path asks before it accepts a
//! packet that is not a new connection. A socket owns a TCP segment only if it still
//! carries that connection: not in TIME_WAIT, and with the segment's sequence and
//! acknowledgment numbers inside its windows (`lb_common::tcp_window`), so a socket left
//! over from an earlier connection on the same ports cannot take a new one's packets.

use core::{
    mem::size_of,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::generated::{
        bpf_jiffies64, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
        bpf_tcp_check_syncookie,
    },
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    addr::{copy_to_words, v4_part},
    hash::FlowTuple,
    parse::{Flow, Ip},
    proto::{IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, TCP_ACK, TCP_LEN},
    tcp_window::{
        ack_in_window, seq_in_window, syn_cookies_may_be_valid, TcpSockLayout, CAST_CALL,
    },
};

use crate::ptr;

/// `BPF_F_CURRENT_NETNS` (-1) as the helpers' u64 argument.
const CURRENT_NETNS: u64 = u64::MAX;
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;

/// This kernel's `struct tcp_sock`: its BTF id and where it keeps the fields `tcp_window`
/// reads, set by the loader from the kernel's BTF. A read-only global, so the verifier
/// knows the values and checks each field access against the kernel's own type.
#[unsafe(no_mangle)]
static TCP_SOCK_LAYOUT: TcpSockLayout = TcpSockLayout::UNKNOWN;

/// True when a local socket owns `flow`: for TCP a connected socket (established,
/// handshaking or closing, not TIME_WAIT) whose windows the segment falls in, or a
/// listener for which the packet carries a valid SYN cookie; for UDP a socket connected
/// to the flow's source. `t`: room for the lookup's tuple (a per-CPU value: on the stack,
/// its 36 bytes would not fit the entry point's frame).
/// Inlined: a call and return cost about 9 ns here.
#[inline(always)]
pub fn owns(ctx: &XdpContext, flow: &Flow, inner: &Ip, t: &mut bpf_sock_tuple) -> bool {
    // `fill` writes the member the size selects whole.
    let size = fill(t, &flow.tuple, inner.v6);
    let ctx_ptr = ctx.as_ptr();
    match flow.tuple.proto {
        IPPROTO_TCP => {
            // SAFETY: the tuple is initialised for `size` bytes; the returned reference is
            // released below on every path.
            let sk = unsafe { bpf_skc_lookup_tcp(ctx_ptr, t, size, CURRENT_NETNS, 0) };
            if sk.is_null() {
                return false;
            }
            // SAFETY: non-null socket from the helper; `state` is readable on sock_common.
            let state = unsafe { (*sk).state };
            let owned = match state {
                TCP_LISTEN => {
                    !flow.icmp
                        && flow.tcp_flags & TCP_ACK != 0
                        && cookies_may_be_valid(sk)
                        && syncookie_ok(ctx, sk, inner)
                }
                TCP_TIME_WAIT | TCP_CLOSE => false,
                // A handshake in progress (request socket, or a local connect).
                TCP_NEW_SYN_RECV | TCP_SYN_SENT => true,
                // An ICMP error quotes an earlier segment: the socket decides on it.
                _ => flow.icmp || segment_in_window(ctx, sk, flow, inner),
            };
            // SAFETY: releases the reference taken above.
            unsafe { bpf_sk_release(sk.cast()) };
            owned
        }
        IPPROTO_UDP => {
            // SAFETY: as above.
            let sk = unsafe { bpf_sk_lookup_udp(ctx_ptr, t, size, CURRENT_NETNS, 0) };
            if sk.is_null() {
                return false;
            }
            let owned = connected_to(sk, t, inner.v6);
            // SAFETY: as above.
            unsafe { bpf_sk_release(sk.cast()) };
            owned
        }
        _ => false,
    }
}

/// True when the TCP segment of `flow` (at `inner.l4_off`) falls in the windows of the
/// full socket `sk`. Without the field offsets (no kernel BTF), the state check alone
/// decides. Values are checked as they are read: the frame stays small.
#[inline(always)]
fn segment_in_window(ctx: &XdpContext, sk: *mut bpf_sock, flow: &Flow, inner: &Ip) -> bool {
    let o = addr_of!(TCP_SOCK_LAYOUT);
    // SAFETY: reads of the loader-set global's fields.
    let offset = |f: *const u32| unsafe { read_volatile(f) } as usize;
    // SAFETY: the address of a field of a static.
    if offset(unsafe { addr_of!((*o).rcv_nxt) }) == TcpSockLayout::UNKNOWN_OFFSET as usize {
        return true;
    }
    let Some(h) = ptr::read::<[u8; 8]>(ctx, inner.l4_off + 4) else {
        return false;
    };
    let tp = as_tcp_sock(sk);
    if tp.is_null() {
        return true;
    }
    // SAFETY: offsets of `u32` members of `struct tcp_sock` from the kernel's BTF (the
    // verifier checks every access against that type), read from a static's fields.
    let field = |f: *const u32| unsafe { read_volatile(tp.add(offset(f)).cast::<u32>()) };
    // SAFETY: addresses of fields of a static.
    unsafe {
        let seq = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if !seq_in_window(
            seq,
            field(addr_of!((*o).rcv_nxt)),
            field(addr_of!((*o).rcv_wup)),
            field(addr_of!((*o).rcv_wnd)),
        ) {
            return false;
        }
        let ack = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        flow.tcp_flags & TCP_ACK == 0
            || ack_in_window(
                ack,
                field(addr_of!((*o).snd_una)),
                field(addr_of!((*o).snd_nxt)),
                field(addr_of!((*o).max_window)),
            )
    }
}

/// A full TCP socket `sk` (connected or listening, not a request or TIME_WAIT socket) as the
/// kernel's `struct tcp_sock` (its BTF id from `TCP_SOCK_LAYOUT`), for reads: the loader
/// rewrites this call (`lb_common::tcp_window::CAST_CALL`) into the `bpf_rdonly_cast`
/// kfunc, no call at all once verified, or the `bpf_skc_to_tcp_sock` helper, which may
/// give null.
#[inline(always)]
fn as_tcp_sock(sk: *mut bpf_sock) -> *const u8 {
    // SAFETY: a field of the loader-set global.
    let btf_id = unsafe { read_volatile(addr_of!(TCP_SOCK_LAYOUT.btf_id)) };
    let tp: *const u8;
    // SAFETY: a call of the BPF calling convention: arguments in r1 and r2, the result in
    // r0, r1 to r5 clobbered; the callee only reads.
    unsafe {
        core::arch::asm!(
            "call {n}",
            n = const CAST_CALL,
            inlateout("r1") sk => _,
            inlateout("r2") u64::from(btf_id) => _,
            lateout("r0") tp,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly),
        );
    }
    tp
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
            copy_to_words(&mut s.saddr, &f.src);
            copy_to_words(&mut s.daddr, &f.dst);
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

/// Whether listener `sk` may accept a SYN cookie now: false when its last SYN-queue
/// overflow is too old (`tcp_window::syn_cookies_may_be_valid`), which spares most ACKs
/// to a listener the helper's call and return. A listener in a reuseport group has the
/// time in the group, as the kernel keeps it there; without the offsets the helper decides.
#[inline(always)]
fn cookies_may_be_valid(sk: *mut bpf_sock) -> bool {
    let o = addr_of!(TCP_SOCK_LAYOUT);
    // SAFETY: reads of the loader-set global's fields.
    let (stamp_at, group_at, group_stamp_at) = unsafe {
        (
            read_volatile(addr_of!((*o).overflow_stamp)),
            read_volatile(addr_of!((*o).reuseport_cb)),
            read_volatile(addr_of!((*o).group_overflow_stamp)),
        )
    };
    if stamp_at == TcpSockLayout::UNKNOWN_OFFSET {
        return true;
    }
    let tp = as_tcp_sock(sk);
    if tp.is_null() {
        return true;
    }
    // SAFETY: offsets of members of `struct tcp_sock` from the kernel's BTF (the verifier
    // checks both accesses against that type): a pointer and an int.
    let group = unsafe { read_volatile(tp.add(group_at as usize).cast::<*const u8>()) };
    let stamp = if group.is_null() {
        // SAFETY: as above.
        unsafe { read_volatile(tp.add(stamp_at as usize).cast::<u32>()) }
    } else if group_stamp_at == TcpSockLayout::UNKNOWN_OFFSET {
        return true;
    } else {
        // SAFETY: the offset of an int member of `struct sock_reuseport` from the
        // kernel's BTF, in the group the listener points to (the verifier checks the
        // access against that type).
        unsafe { read_volatile(group.add(group_stamp_at as usize).cast::<u32>()) }
    };
    // SAFETY: plain helper call (the verifier inlines it as a load of `jiffies`).
    let now = unsafe { bpf_jiffies64() } as u32;
    syn_cookies_may_be_valid(stamp, now)
}

/// An ACK to a listener completes a handshake whose SYN was answered with a cookie.
/// The helper reads only the fixed headers, given as bounds-checked packet pointers (stack
/// copies would cost the frame they need).
#[inline(always)]
fn syncookie_ok(ctx: &XdpContext, sk: *mut bpf_sock, inner: &Ip) -> bool {
    let Some(th) = ptr::at::<[u8; TCP_LEN]>(ctx, inner.l4_off) else {
        return false;
    };
    let (iph, iph_len) = if inner.v6 {
        (
            ptr::at::<[u8; IPV6_LEN]>(ctx, inner.l3_off).map(|p| p.cast::<u8>()),
            40,
        )
    } else {
        (
            ptr::at::<[u8; IPV4_LEN]>(ctx, inner.l3_off).map(|p| p.cast::<u8>()),
            20,
        )
    };
    let Some(iph) = iph else {
        return false;
    };
    // SAFETY: the helper reads `iph_len` / 20 bytes, bounds checked by `ptr::at`.
    let rc = unsafe { bpf_tcp_check_syncookie(sk.cast(), iph.cast(), iph_len, th.cast(), 20) };
    rc == 0
}
