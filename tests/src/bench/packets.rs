//! The benchmark's input frames, built with etherparse (GUE frames with lb-common's own
//! outer-header writer: they stand for what an LB node sends).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
use lb_common::{
    addr::v4_mapped,
    encap::{write_outer_v4, Outer, ENCAP_LEN_V4},
    proto::{ETH_LEN, ETH_P_IP},
};

pub type Mac = [u8; 6];

/// Source and destination MAC of every input frame.
#[derive(Clone, Copy)]
pub struct Macs {
    pub src: Mac,
    pub dst: Mac,
}

/// TCP over IPv4: a SYN, or an ACK of an established connection; no payload.
pub fn tcp4(m: Macs, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(m.src, m.dst)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 65000);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let mut v = Vec::new();
    b.write(&mut v, &[]).expect("tcp4 frame");
    v
}

/// A TCP ACK over IPv4 with sequence number `seq` acknowledging `ack`; no payload.
pub fn tcp4_ack(
    m: Macs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: (u16, u16),
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(m.src, m.dst)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(ports.0, ports.1, seq, 65000)
        .ack(ack)
        .write(&mut v, &[])
        .expect("tcp4 frame");
    v
}

/// A TCP SYN over IPv6, no payload.
pub fn tcp6_syn(m: Macs, src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(m.src, m.dst)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 65000)
        .syn()
        .write(&mut v, &[])
        .expect("tcp6 frame");
    v
}

/// UDP over IPv4 with `payload`.
pub fn udp4(
    m: Macs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(m.src, m.dst)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .expect("udp4 frame");
    v
}

/// ICMP "fragmentation needed" from `router` to `to`, quoting the first 28 bytes (IPv4
/// header and ports) of `quoted`, an IPv4 frame.
pub fn icmp4_frag_needed(m: Macs, router: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(m.src, m.dst)
        .ipv4(router.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut v, &quoted[ETH_LEN..ETH_LEN + 28])
        .expect("icmp frame");
    v
}

/// The IPv4 packet of `inner` (an IPv4 frame) in GUE from `src` to `dst`, with one hop
/// (`next_hop`) left in its hop list.
pub fn gue4(
    m: Macs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: (u16, u16),
    next_hop: Ipv4Addr,
    inner: &[u8],
) -> Vec<u8> {
    let inner = &inner[ETH_LEN..];
    let outer = Outer {
        src: v4_mapped(src.octets()),
        dst: v4_mapped(dst.octets()),
        src_port: port.0,
        dst_port: port.1,
        inner_len: inner.len() as u16,
        inner_v6: false,
        tos: 0,
        flow_label: 0,
        hops_left: 1,
        flags: 0,
        next_hop: v4_mapped(next_hop.octets()),
    };
    let mut headers = [0u8; ENCAP_LEN_V4];
    write_outer_v4(&outer, &mut headers);
    let mut v = Vec::with_capacity(ETH_LEN + ENCAP_LEN_V4 + inner.len());
    v.extend_from_slice(&m.dst);
    v.extend_from_slice(&m.src);
    v.extend_from_slice(&ETH_P_IP.to_be_bytes());
    v.extend_from_slice(&headers);
    v.extend_from_slice(inner);
    v
}
