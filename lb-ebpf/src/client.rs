//! The client path: a packet to a service is hashed to a bucket of the service's table
//! and sent, encapsulated, to the bucket's backend, with the bucket's previous owner as
//! the next hop of the hop list.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    addr::{is_v4_mapped, v4_mapped},
    encap::{write_outer_v4, write_outer_v6, Outer, ENCAP_LEN_V4, ENCAP_LEN_V6, ETH_LEN},
    hash::{bucket_index, flow_hash, outer_source_port},
    limits::MAX_TABLE_BITS,
    maps::{Backend, NodeConfig, ServiceKey, BACKEND_PRESENT},
    stats::Reason,
};

use crate::{
    forward::{self, NextHop},
    maps::{self, BACKENDS, BACKEND_STATS, BUCKETS, SERVICES, SERVICE_STATS},
    parse::{Flow, Ip, ETH_P_IP, ETH_P_IPV6, L2},
    ptr,
    verdict::{drop, pass, Verdict},
};

#[inline(never)]
pub fn handle(ctx: &XdpContext, node: &NodeConfig, l2: &L2, ip: &Ip) -> Verdict {
    // Without ports there is no flow to hash: such packets to a VIP cannot be forwarded
    // right, so they are dropped and counted; to anything else they pass untouched.
    let unusable = |reason| {
        if maps::is_vip(&ip.dst) {
            drop(reason)
        } else {
            pass(Reason::PassNotService)
        }
    };
    if ip.fragment {
        return unusable(Reason::DropFragment);
    }
    if ip.bad_ihl {
        return unusable(Reason::DropMalformed);
    }
    let mut flow = Flow::EMPTY;
    match crate::parse::flow(ctx, ip, &mut flow) {
        Ok(true) => {}
        Ok(false) => return pass(Reason::PassNotService),
        Err(_) => return unusable(Reason::DropMalformed),
    }
    // An ICMP error about a VIP's flow is sent to that VIP (the quoted packet's source);
    // one addressed elsewhere is not lb's to forward.
    if flow.icmp && flow.tuple.dst != ip.dst {
        return pass(Reason::PassNotService);
    }
    let key = ServiceKey {
        addr: flow.tuple.dst,
        port_be: flow.tuple.dst_port.to_be(),
        proto: flow.tuple.proto,
        _pad: 0,
    };
    // SAFETY: the value is only read.
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return pass(Reason::PassNotService);
    };
    if svc.table_bits > MAX_TABLE_BITS {
        return drop(Reason::DropNoBackend);
    }
    let hash = flow_hash(node.hash_seed, &flow.tuple);
    let Some(bucket) = BUCKETS.get(svc.table_offset + bucket_index(hash, svc.table_bits)) else {
        return drop(Reason::DropNoBackend);
    };
    let Some(first) = present(bucket.first) else {
        return drop(Reason::DropNoBackend);
    };
    let mut hops_left = 0;
    let mut next_hop = [0u8; 16];
    if bucket.second != bucket.first {
        if let Some(second) = present(bucket.second) {
            // Chaining needs one outer family: a hop list cannot switch it.
            if is_v4_mapped(&second.addr) == is_v4_mapped(&first.addr) {
                hops_left = 1;
                next_hop = second.addr;
            }
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let reason = if flow.icmp {
        Reason::IcmpForwarded
    } else {
        Reason::Encapsulated
    };
    let v = encapsulate(
        ctx,
        node,
        l2,
        ip,
        bucket.first,
        &first.addr,
        hash,
        hops_left,
        next_hop,
    );
    match v {
        Some(Ok(action)) => {
            maps::add(&SERVICE_STATS, svc.id, bytes);
            maps::add(&BACKEND_STATS, bucket.first, bytes);
            Verdict::new(action, reason)
        }
        Some(Err(r)) => drop(r),
        None => drop(Reason::DropMalformed),
    }
}

#[inline(always)]
fn present(index: u32) -> Option<&'static Backend> {
    BACKENDS
        .get(index)
        .filter(|b| b.flags & BACKEND_PRESENT != 0)
}

/// Puts the outer headers in front of the IP packet at `ip.l3_off` and sends it to `dst`,
/// the backend in slot `slot`.
/// `None` when the packet could not be rewritten (no headroom), `Some(Err)` for a drop.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, all values at hand"
)]
fn encapsulate(
    ctx: &XdpContext,
    node: &NodeConfig,
    l2: &L2,
    ip: &Ip,
    slot: u32,
    dst: &[u8; 16],
    hash: u32,
    hops_left: u8,
    next_hop: [u8; 16],
) -> Option<Result<u32, Reason>> {
    let outer_v4 = is_v4_mapped(dst);
    let src = if outer_v4 {
        if node.addr_v4 == [0; 4] {
            return Some(Err(Reason::DropNoSource));
        }
        v4_mapped(node.addr_v4)
    } else {
        if node.addr_v6 == [0; 16] {
            return Some(Err(Reason::DropNoSource));
        }
        node.addr_v6
    };
    let inner_len = ctx.data_end() - ctx.data() - l2.l3_off;
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
    let outer = Outer {
        src,
        dst: *dst,
        src_port: outer_source_port(hash),
        dst_port: u16::from_be(node.gue_port_be),
        inner_len: inner_len as u16,
        inner_v6: ip.v6,
        tos,
        flow_label: hash,
        hops_left,
        flags: 0,
        next_hop,
    };
    let delta = (ETH_LEN + encap_len - l2.l3_off) as i32;
    // SAFETY: plain helper call; every packet pointer is derived anew afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
        return None;
    }
    if outer_v4 {
        let out = ptr::at::<[u8; ENCAP_LEN_V4]>(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by `ptr::at`.
        write_outer_v4(&outer, unsafe { &mut *out });
        forward::send(ctx, &hop, ETH_P_IP).map(Ok)
    } else {
        let out = ptr::at::<[u8; ENCAP_LEN_V6]>(ctx, ETH_LEN)?;
        // SAFETY: as above.
        write_outer_v6(&outer, unsafe { &mut *out });
        forward::send(ctx, &hop, ETH_P_IPV6).map(Ok)
    }
}
