//! Data-plane fixtures: lb's XDP program run through BPF_PROG_TEST_RUN on packets built
//! with etherparse, each checked for its verdict, its output packet (byte for byte) and
//! the counters it moved.
//!
//! The program runs in a namespace of its own with one veth, addresses, routes and
//! permanent neighbours (`tests::fixture`), so `bpf_fib_lookup` gives known answers.
//! Kernel features used: XDP, BPF_PROG_TEST_RUN with an ingress ifindex, bpf_fib_lookup,
//! bpf_skc_lookup_tcp, bpf_sk_lookup_udp, bpf_xdp_adjust_head (Linux 5.10 or newer;
//! checked here on 6.18).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Result};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
};
use lb::dataplane::{Dataplane, LoadOptions, Node};
use lb_common::{
    addr::v4_mapped,
    encap::{FLAG_CHAINED, FLAG_FORWARD_SYN, FLAG_RETURNED, GUE_HLEN, HOP_LIST_TYPE},
    hash::{bucket_index, flow_hash, outer_source_port, FlowTuple},
    maps::{names, Bucket},
    packet::example::{NODE_MAC, PEER_MAC},
    stats::Reason,
};
use tests::fixture::{self, install_service, GW_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE4: [u8; 4] = [10, 0, 0, 1];
const LB4: [u8; 4] = [10, 0, 0, 5];
const VIP4: [u8; 4] = [192, 0, 2, 10];
const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const OTHER4: [u8; 4] = [203, 0, 113, 1];
const SEED: u32 = 0x5eed_1234;
const GUE_PORT: u16 = 6080;
const TABLE_BITS: u32 = 4;
const BUCKETS: u32 = 1 << TABLE_BITS;

fn node6() -> Ipv6Addr {
    "fd00::1".parse().unwrap()
}
fn vip6() -> Ipv6Addr {
    "2001:db8::10".parse().unwrap()
}
fn client6() -> Ipv6Addr {
    "2001:db8:1::7".parse().unwrap()
}
fn backend4(i: u32) -> [u8; 4] {
    [10, 1, 0, 1 + i as u8]
}
fn backend6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1 + i as u16)
}

/// The services of the fixture node: (vip, port, proto, id, backends' family is v6).
/// Bucket `b` of every table belongs to backend `b % 3` of its family, and was owned
/// before by backend `(b + 1) % 3` (its second hop). Service 5 has empty buckets.
struct Svc {
    vip: [u8; 16],
    port: u16,
    proto: u8,
    id: u32,
    v6_backends: bool,
}

const TCP: u8 = 6;
const UDP: u8 = 17;

fn services() -> Vec<Svc> {
    let v4 = v4_mapped(VIP4);
    let v6 = vip6().octets();
    vec![
        Svc {
            vip: v4,
            port: 80,
            proto: TCP,
            id: 0,
            v6_backends: false,
        },
        Svc {
            vip: v4,
            port: 53,
            proto: UDP,
            id: 1,
            v6_backends: false,
        },
        Svc {
            vip: v6,
            port: 80,
            proto: TCP,
            id: 2,
            v6_backends: true,
        },
        Svc {
            vip: v4,
            port: 8080,
            proto: TCP,
            id: 3,
            v6_backends: true,
        },
        Svc {
            vip: v6,
            port: 8080,
            proto: TCP,
            id: 4,
            v6_backends: false,
        },
        Svc {
            vip: v4,
            port: 81,
            proto: TCP,
            id: 5,
            v6_backends: false,
        },
    ]
}

/// Backend slots: 0..3 IPv4, 3..6 IPv6.
fn slot(family_v6: bool, i: u32) -> u32 {
    if family_v6 {
        3 + i
    } else {
        i
    }
}
fn slot_addr(s: u32) -> [u8; 16] {
    if s < 3 {
        v4_mapped(backend4(s))
    } else {
        backend6(s - 3).octets()
    }
}

fn configure(dp: &mut Dataplane) -> Result<()> {
    dp.set_node(&Node {
        hash_seed: SEED,
        gue_port: GUE_PORT,
        addr_v4: Some(Ipv4Addr::from(NODE4)),
        addr_v6: Some(node6()),
    })?;
    for s in 0..6 {
        dp.set_backend(s, lb_common::addr::from_bytes(slot_addr(s)))?;
    }
    for svc in services() {
        let table: Vec<Bucket> = (0..BUCKETS)
            .map(|b| {
                if svc.id == 5 {
                    Bucket::EMPTY
                } else {
                    Bucket {
                        first: slot(svc.v6_backends, b % 3),
                        second: slot(svc.v6_backends, (b + 1) % 3),
                    }
                }
            })
            .collect();
        install_service(dp, (svc.vip, svc.port, svc.proto), svc.id, &table)?;
    }
    Ok(())
}

// ---- packets -------------------------------------------------------------------------

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65000);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let mut v = Vec::new();
    b.write(&mut v, b"hello").unwrap();
    v
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 65000);
    let b = if syn { b.syn() } else { b.ack(5000) };
    let mut v = Vec::new();
    b.write(&mut v, b"hello").unwrap();
    v
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

/// A UDP packet from `src` to `dst`, of their family.
fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            udp4(s.octets(), d.octets(), src.port(), dst.port(), payload)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => udp6(s, d, src.port(), dst.port(), payload),
        _ => panic!("mixed families"),
    }
}

fn tuple(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8) -> FlowTuple {
    FlowTuple {
        src,
        dst,
        src_port: sport,
        dst_port: dport,
        proto,
    }
}

/// Where the fixture table sends a flow of service `svc`: (hash, first, second).
fn owner(svc_v6_backends: bool, t: &FlowTuple) -> (u32, [u8; 16], [u8; 16]) {
    let h = flow_hash(SEED, t);
    let b = bucket_index(h, TABLE_BITS);
    (
        h,
        slot_addr(slot(svc_v6_backends, b % 3)),
        slot_addr(slot(svc_v6_backends, (b + 1) % 3)),
    )
}

/// What lb should send for `inner` (an IP packet): the encapsulated frame, built here
/// with etherparse's own header code, not lb's.
#[allow(clippy::too_many_arguments)]
fn encapsulated(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    outer_src: [u8; 16],
    outer_dst: [u8; 16],
    sport: u16,
    hops_left: u8,
    flags: u8,
    next_hop: [u8; 16],
    inner: &[u8],
) -> Vec<u8> {
    let inner_v6 = inner[0] >> 4 == 6;
    let mut gue = vec![GUE_HLEN, if inner_v6 { 41 } else { 4 }, 0, 0];
    gue.extend_from_slice(&HOP_LIST_TYPE);
    gue.extend_from_slice(&[hops_left, flags]);
    gue.extend_from_slice(&next_hop);
    let udp_len = (8 + gue.len() + inner.len()) as u16;
    let mut out = Vec::new();
    out.extend_from_slice(&eth_dst);
    out.extend_from_slice(&eth_src);
    if lb_common::addr::is_v4_mapped(&outer_dst) {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = Ipv4Header::new(
            udp_len,
            64,
            IpNumber::UDP,
            outer_src[12..].try_into().unwrap(),
            outer_dst[12..].try_into().unwrap(),
        )
        .unwrap();
        ip.dont_fragment = true;
        ip.header_checksum = ip.calc_header_checksum();
        out.extend_from_slice(&ip.to_bytes());
    } else {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::try_new(0).unwrap(),
            payload_length: udp_len,
            next_header: IpNumber::UDP,
            hop_limit: 64,
            source: outer_src,
            destination: outer_dst,
        };
        out.extend_from_slice(&ip.to_bytes());
    }
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&GUE_PORT.to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&gue);
    out.extend_from_slice(inner);
    out
}

/// The flow label lb puts in an IPv6 outer header: the low 20 bits of the flow hash.
fn set_flow_label(frame: &mut [u8], hash: u32) {
    let label = hash & 0x000f_ffff;
    frame[15] = (frame[15] & 0xf0) | (label >> 16) as u8;
    frame[16] = (label >> 8) as u8;
    frame[17] = label as u8;
}

/// The frame lb sends for a client packet to a service whose backends are in `v6`.
fn client_path_output(frame: &[u8], l3: usize, t: &FlowTuple, v6_backends: bool) -> Vec<u8> {
    let (h, first, second) = owner(v6_backends, t);
    let src = if v6_backends {
        node6().octets()
    } else {
        v4_mapped(NODE4)
    };
    let mut out = encapsulated(
        GW_MAC,
        NODE_MAC,
        src,
        first,
        outer_source_port(h),
        1,
        0,
        second,
        &frame[l3..],
    );
    if v6_backends {
        set_flow_label(&mut out, h);
    }
    out
}

/// A GUE frame from an LB node (10.0.0.5) to this node carrying `inner_frame`'s packet.
fn gue_to_node(inner_frame: &[u8], hops_left: u8, flags: u8, next_hop: [u8; 16]) -> Vec<u8> {
    encapsulated(
        NODE_MAC,
        PEER_MAC,
        v4_mapped(LB4),
        v4_mapped(NODE4),
        50000,
        hops_left,
        flags,
        next_hop,
        &inner_frame[14..],
    )
}

/// What the backend path passes to the stack: the inner packet behind the frame's MACs.
fn decapsulated(gue_frame: &[u8], inner_frame: &[u8]) -> Vec<u8> {
    let mut out = gue_frame[..12].to_vec();
    out.extend_from_slice(&inner_frame[12..]);
    out
}

// ---- the runner ----------------------------------------------------------------------

enum Out {
    /// The packet must come out exactly as it went in.
    Same,
    Bytes(Vec<u8>),
    /// Dropped: the output does not matter.
    Any,
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Out,
    reason: Reason,
    /// (service id, backend slot) whose counters must grow by this packet.
    counted: Option<(u32, u32)>,
}

fn run_case(dp: &mut Dataplane, ifindex: u32, c: &Case) -> Result<()> {
    let before = dp.reason_counts()?;
    let counters_before = match c.counted {
        Some((s, b)) => Some((
            dp.counters(names::SERVICE_STATS, s)?,
            dp.counters(names::BACKEND_STATS, b)?,
        )),
        None => None,
    };
    let run = fixture::test_run(dp, ifindex, &c.input)?;
    let out = run.output;
    if run.verdict != c.verdict {
        bail!("verdict {} , expected {}", run.verdict, c.verdict);
    }
    match &c.output {
        Out::Same if out != c.input => bail!(
            "packet changed:\n got  {:02x?}\n want {:02x?}",
            out,
            c.input
        ),
        Out::Bytes(want) if &out != want => {
            bail!("output differs:\n got  {:02x?}\n want {:02x?}", out, want)
        }
        _ => {}
    }
    let after = dp.reason_counts()?;
    // Outcomes only: whether a next hop came from the FIB (`FibFallback`) depends on
    // what the agent resolved, which these runs leave empty.
    for ((r, a), (_, b)) in after.iter().zip(before.iter()) {
        if !r.is_outcome() {
            continue;
        }
        let want = u64::from(*r == c.reason);
        if a - b != want {
            bail!("counter {} moved by {}, expected {}", r.name(), a - b, want);
        }
    }
    if let (Some((s, b)), Some((sb, bb))) = (c.counted, counters_before) {
        let sa = dp.counters(names::SERVICE_STATS, s)?;
        let ba = dp.counters(names::BACKEND_STATS, b)?;
        let bytes = c.input.len() as u64;
        if sa.packets != sb.packets + 1 || sa.bytes != sb.bytes + bytes {
            bail!("service {s} counters {sa:?}, before {sb:?}");
        }
        if ba.packets != bb.packets + 1 || ba.bytes != bb.bytes + bytes {
            bail!("backend {b} counters {ba:?}, before {bb:?}");
        }
    }
    Ok(())
}

fn slot_of(addr: [u8; 16]) -> u32 {
    (0..6).find(|s| slot_addr(*s) == addr).unwrap()
}

fn client_cases() -> Vec<Case> {
    let v4 = v4_mapped;
    let mut cases = Vec::new();

    let mut encap = |name, input: Vec<u8>, l3: usize, t: FlowTuple, svc: u32, v6b: bool, reason| {
        let (_, first, _) = owner(v6b, &t);
        let output = client_path_output(&input, l3, &t, v6b);
        cases.push(Case {
            name,
            verdict: XDP_TX,
            output: Out::Bytes(output),
            reason,
            counted: Some((svc, slot_of(first))),
            input,
        });
    };
    let syn = tcp4(CLIENT4, VIP4, 40001, 80, true);
    encap(
        "tcp syn to an IPv4 VIP",
        syn,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 40001, 80, TCP),
        0,
        false,
        Reason::Encapsulated,
    );
    let ack = tcp4(CLIENT4, VIP4, 40002, 80, false);
    encap(
        "tcp ack to an IPv4 VIP",
        ack,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 40002, 80, TCP),
        0,
        false,
        Reason::Encapsulated,
    );
    let udp = udp4(CLIENT4, VIP4, 5353, 53, b"query");
    encap(
        "udp to an IPv4 VIP",
        udp,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 5353, 53, UDP),
        1,
        false,
        Reason::Encapsulated,
    );
    let s6 = tcp6(client6(), vip6(), 40003, 80, true);
    encap(
        "tcp syn to an IPv6 VIP (IPv6 outer)",
        s6,
        14,
        tuple(client6().octets(), vip6().octets(), 40003, 80, TCP),
        2,
        true,
        Reason::Encapsulated,
    );
    let s46 = tcp4(CLIENT4, VIP4, 40004, 8080, true);
    encap(
        "IPv4 inner over IPv6 outer",
        s46,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 40004, 8080, TCP),
        3,
        true,
        Reason::Encapsulated,
    );
    let s64 = tcp6(client6(), vip6(), 40005, 8080, false);
    encap(
        "IPv6 inner over IPv4 outer",
        s64,
        14,
        tuple(client6().octets(), vip6().octets(), 40005, 8080, TCP),
        4,
        false,
        Reason::Encapsulated,
    );

    // One 802.1Q tag: the tag is not carried into the encapsulated frame.
    let mut vlan = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4(CLIENT4, VIP4, 64)
        .tcp(40006, 80, 1, 1000)
        .syn()
        .write(&mut vlan, b"")
        .unwrap();
    encap(
        "VLAN-tagged tcp syn to an IPv4 VIP",
        vlan,
        18,
        tuple(v4(CLIENT4), v4(VIP4), 40006, 80, TCP),
        0,
        false,
        Reason::Encapsulated,
    );

    // IPv4 header with options (IHL 7).
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT4, VIP4).unwrap();
    ip.options = Ipv4Options::from([1u8, 1, 1, 1, 1, 1, 1, 0]);
    let mut opts = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(40007, 80, 1, 1000)
        .syn()
        .write(&mut opts, b"x")
        .unwrap();
    encap(
        "IPv4 options (IHL 7) to a VIP",
        opts,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 40007, 80, TCP),
        0,
        false,
        Reason::Encapsulated,
    );

    // ICMP "fragmentation needed" quoting a packet the backend sent (VIP:80 -> client).
    let quoted = tcp4(VIP4, CLIENT4, 80, 40008, false);
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(OTHER4, VIP4, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut icmp, &quoted[14..14 + 28])
        .unwrap();
    encap(
        "ICMP fragmentation-needed to the flow's backend",
        icmp,
        14,
        tuple(v4(CLIENT4), v4(VIP4), 40008, 80, TCP),
        0,
        false,
        Reason::IcmpForwarded,
    );

    let quoted6 = tcp6(vip6(), client6(), 80, 40009, false);
    let mut icmp6 = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv6(node6().octets(), vip6().octets(), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
        .write(&mut icmp6, &quoted6[14..14 + 48])
        .unwrap();
    encap(
        "ICMPv6 packet-too-big to the flow's backend",
        icmp6,
        14,
        tuple(client6().octets(), vip6().octets(), 40009, 80, TCP),
        2,
        true,
        Reason::IcmpForwarded,
    );

    let pass = |name, input: Vec<u8>, reason| Case {
        name,
        input,
        verdict: XDP_PASS,
        output: Out::Same,
        reason,
        counted: None,
    };
    let drop = |name, input: Vec<u8>, reason| Case {
        name,
        input,
        verdict: XDP_DROP,
        output: Out::Any,
        reason,
        counted: None,
    };

    cases.push(pass(
        "tcp to a non-VIP address passes untouched",
        tcp4(CLIENT4, OTHER4, 40010, 80, true),
        Reason::PassNotService,
    ));
    cases.push(pass(
        "tcp to a VIP on a port without service passes",
        tcp4(CLIENT4, VIP4, 40011, 443, true),
        Reason::PassNotService,
    ));
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&PEER_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    cases.push(pass(
        "ARP (not IP) passes untouched",
        arp,
        Reason::PassNotIp,
    ));
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(CLIENT4, VIP4, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .unwrap();
    cases.push(pass(
        "ICMP echo to a VIP passes (the backends' business)",
        ping,
        Reason::PassNotService,
    ));

    // Truncation at every layer.
    let full = tcp4(CLIENT4, VIP4, 40012, 80, true);
    // BPF_PROG_TEST_RUN refuses frames under 14 bytes, so the shortest cut is a VLAN
    // ethertype without its tag.
    let mut vlan_cut = full[..14].to_vec();
    vlan_cut[12..14].copy_from_slice(&[0x81, 0x00]);
    cases.push(pass("VLAN tag cut short", vlan_cut, Reason::PassUnparsed));
    cases.push(pass(
        "IPv4 header cut short",
        full[..14 + 12].to_vec(),
        Reason::PassUnparsed,
    ));
    cases.push(drop(
        "TCP header to a VIP cut short",
        full[..14 + 20 + 10].to_vec(),
        Reason::DropMalformed,
    ));
    let u = udp4(CLIENT4, VIP4, 5353, 53, b"");
    cases.push(drop(
        "UDP header to a VIP cut short",
        u[..14 + 20 + 4].to_vec(),
        Reason::DropMalformed,
    ));
    let f6 = tcp6(client6(), vip6(), 40013, 80, true);
    cases.push(pass(
        "IPv6 header cut short",
        f6[..14 + 30].to_vec(),
        Reason::PassUnparsed,
    ));
    cases.push(drop(
        "TCP header to an IPv6 VIP cut short",
        f6[..14 + 40 + 8].to_vec(),
        Reason::DropMalformed,
    ));
    // A hop-by-hop header announced but cut off: to a VIP dropped, elsewhere passed.
    let mut ext = f6[..14 + 40 + 1].to_vec();
    ext[14 + 6] = 0;
    cases.push(drop(
        "IPv6 extension header to a VIP cut short",
        ext.clone(),
        Reason::DropMalformed,
    ));
    ext[14 + 24..14 + 40].copy_from_slice(&client6().octets());
    cases.push(pass(
        "IPv6 extension header to a non-VIP cut short passes",
        ext,
        Reason::PassUnparsed,
    ));
    let other = tcp4(CLIENT4, OTHER4, 40014, 80, true);
    cases.push(pass(
        "TCP header to a non-VIP cut short passes",
        other[..14 + 20 + 10].to_vec(),
        Reason::PassNotService,
    ));
    let mut bad_ihl = tcp4(CLIENT4, VIP4, 40015, 80, true);
    bad_ihl[14] = 0x44;
    cases.push(drop(
        "IPv4 IHL below 5 to a VIP",
        bad_ihl,
        Reason::DropMalformed,
    ));

    // Fragments.
    let mut frag = tcp4(CLIENT4, VIP4, 40016, 80, true);
    frag[14 + 6] = 0x20; // more fragments
    fix_ipv4_checksum(&mut frag);
    cases.push(drop(
        "IPv4 first fragment to a VIP",
        frag,
        Reason::DropFragment,
    ));
    let mut later = tcp4(CLIENT4, VIP4, 40017, 80, true);
    later[14 + 6] = 0x00;
    later[14 + 7] = 0x10; // offset 16 * 8
    fix_ipv4_checksum(&mut later);
    cases.push(drop(
        "IPv4 later fragment to a VIP",
        later,
        Reason::DropFragment,
    ));
    let mut nfrag = tcp4(CLIENT4, OTHER4, 40018, 80, true);
    nfrag[14 + 6] = 0x20;
    fix_ipv4_checksum(&mut nfrag);
    cases.push(pass(
        "IPv4 fragment to a non-VIP passes",
        nfrag,
        Reason::PassNotService,
    ));

    cases.push(drop(
        "service whose buckets are empty",
        tcp4(CLIENT4, VIP4, 40019, 81, true),
        Reason::DropNoBackend,
    ));

    // 1500-byte MTU: an IPv4 packet of 1460 bytes becomes 1512 once encapsulated.
    let mut big = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(CLIENT4, VIP4, 64)
        .tcp(40020, 80, 1, 1000)
        .ack(1)
        .write(&mut big, &[0u8; 1420])
        .unwrap();
    cases.push(drop(
        "too big for the egress MTU once encapsulated",
        big,
        Reason::DropTooBig,
    ));
    cases
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[14 + 10] = 0;
    frame[14 + 11] = 0;
    let (h, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    frame[14 + 10..14 + 12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

/// Backend-path cases. `est_port`: client port of an established TCP connection to
/// VIP4:80 on this node; `udp_port`: peer port of a connected UDP socket on VIP4:53.
fn backend_cases(est_port: u16, udp_port: u16) -> Vec<Case> {
    let mut cases = Vec::new();
    let second = v4_mapped(backend4(2));
    let accept = |name, inner: Vec<u8>, hops, flags, reason| {
        let input = gue_to_node(&inner, hops, flags, second);
        let output = decapsulated(&input, &inner);
        Case {
            name,
            input,
            verdict: XDP_PASS,
            output: Out::Bytes(output),
            reason,
            counted: None,
        }
    };
    cases.push(accept(
        "GUE: a SYN is accepted",
        tcp4(CLIENT4, VIP4, 41001, 80, true),
        1,
        0,
        Reason::AcceptSyn,
    ));
    cases.push(accept(
        "GUE: established local TCP socket accepts",
        tcp4(VIP4, VIP4, est_port, 80, false),
        1,
        0,
        Reason::AcceptSocket,
    ));
    cases.push(accept(
        "GUE: connected local UDP socket accepts",
        udp4(VIP4, VIP4, udp_port, 53, b"x"),
        1,
        0,
        Reason::AcceptSocket,
    ));
    cases.push(accept(
        "GUE: connected local UDP socket accepts, IPv6",
        udp6(vip6(), vip6(), udp_port, 53, b"x"),
        1,
        0,
        Reason::AcceptSocket,
    ));
    cases.push(accept(
        "GUE: no hops left, accepted as the last hop",
        tcp4(CLIENT4, VIP4, 41002, 80, false),
        0,
        0,
        Reason::AcceptLastHop,
    ));
    let inner6 = tcp6(client6(), vip6(), 41003, 80, true);
    cases.push(accept(
        "GUE: IPv6 inner SYN accepted",
        inner6,
        1,
        0,
        Reason::AcceptSyn,
    ));

    // Not ours: on to the next hop, this node now the outer source, one hop fewer.
    let inner = tcp4(CLIENT4, VIP4, 41004, 80, false);
    let input = gue_to_node(&inner, 1, 0, second);
    let output = encapsulated(
        GW_MAC,
        NODE_MAC,
        v4_mapped(NODE4),
        second,
        50000,
        0,
        FLAG_CHAINED,
        second,
        &inner[14..],
    );
    cases.push(Case {
        name: "GUE: no local socket, forwarded to the second hop",
        input,
        verdict: XDP_TX,
        output: Out::Bytes(output),
        reason: Reason::SecondHop,
        counted: None,
    });
    let inner = udp4(CLIENT4, VIP4, 41005, 53, b"x");
    let input = gue_to_node(&inner, 1, 0, second);
    let output = encapsulated(
        GW_MAC,
        NODE_MAC,
        v4_mapped(NODE4),
        second,
        50000,
        0,
        FLAG_CHAINED,
        second,
        &inner[14..],
    );
    cases.push(Case {
        name: "GUE: UDP without connected socket goes to the second hop",
        input,
        verdict: XDP_TX,
        output: Out::Bytes(output),
        reason: Reason::SecondHop,
        counted: None,
    });
    let inner = tcp4(CLIENT4, VIP4, 41006, 80, true);
    let input = gue_to_node(&inner, 1, FLAG_FORWARD_SYN, second);
    let output = encapsulated(
        GW_MAC,
        NODE_MAC,
        v4_mapped(NODE4),
        second,
        50000,
        0,
        FLAG_FORWARD_SYN | FLAG_CHAINED,
        second,
        &inner[14..],
    );
    cases.push(Case {
        name: "GUE: SYN with forward-SYN goes to the second hop",
        input,
        verdict: XDP_TX,
        output: Out::Bytes(output),
        reason: Reason::SecondHop,
        counted: None,
    });

    // At the last hop, chained: UDP no socket here owns is a new flow and goes back to
    // the first hop (the outer source), which accepts it; TCP is accepted (the stack
    // answers a stray segment with a reset).
    let first_hop = v4_mapped(backend4(0));
    let inner = udp4(CLIENT4, VIP4, 41009, 53, b"new");
    let input = encapsulated(
        NODE_MAC,
        PEER_MAC,
        first_hop,
        v4_mapped(NODE4),
        50000,
        0,
        FLAG_CHAINED,
        v4_mapped(NODE4),
        &inner[14..],
    );
    let output = encapsulated(
        GW_MAC,
        NODE_MAC,
        v4_mapped(NODE4),
        first_hop,
        50000,
        0,
        FLAG_RETURNED,
        v4_mapped(NODE4),
        &inner[14..],
    );
    cases.push(Case {
        name: "GUE: chained UDP with no socket here goes back to the first hop",
        input,
        verdict: XDP_TX,
        output: Out::Bytes(output),
        reason: Reason::ReturnedToFirstHop,
        counted: None,
    });
    let inner = tcp4(CLIENT4, VIP4, 41010, 80, false);
    cases.push(accept(
        "GUE: chained TCP with no socket here, accepted as the last hop",
        inner,
        0,
        FLAG_CHAINED,
        Reason::AcceptLastHop,
    ));
    let inner = udp4(CLIENT4, VIP4, 41011, 53, b"back");
    cases.push(accept(
        "GUE: returned by the last hop, accepted",
        inner,
        0,
        FLAG_RETURNED,
        Reason::AcceptReturned,
    ));

    // A hop list naming this node itself must not loop.
    let inner = tcp4(CLIENT4, VIP4, 41007, 80, false);
    let input = gue_to_node(&inner, 1, 0, v4_mapped(NODE4));
    let output = decapsulated(&input, &inner);
    cases.push(Case {
        name: "GUE: next hop is this node, accepted",
        input,
        verdict: XDP_PASS,
        output: Out::Bytes(output),
        reason: Reason::AcceptLastHop,
        counted: None,
    });

    let drop = |name, input: Vec<u8>, reason| Case {
        name,
        input,
        verdict: XDP_DROP,
        output: Out::Any,
        reason,
        counted: None,
    };
    let inner = tcp4(CLIENT4, VIP4, 41008, 80, false);
    cases.push(drop(
        "GUE: hop count above the limit",
        gue_to_node(&inner, 2, 0, second),
        Reason::DropBadGue,
    ));
    let mut bad = gue_to_node(&inner, 1, 0, second);
    bad[14 + 20 + 8] = 0x45; // GUE version 1
    cases.push(drop("GUE: wrong version", bad, Reason::DropBadGue));
    let mut bad = gue_to_node(&inner, 1, 0, second);
    bad[14 + 20 + 8 + 4] = b'x';
    cases.push(drop("GUE: private data not lb's", bad, Reason::DropBadGue));
    let g = gue_to_node(&inner, 1, 0, second);
    cases.push(drop(
        "GUE: cut short inside the hop list",
        g[..14 + 20 + 8 + 10].to_vec(),
        Reason::DropMalformed,
    ));
    cases.push(drop(
        "GUE: inner TCP header cut short",
        g[..14 + 20 + 8 + 24 + 20 + 8].to_vec(),
        Reason::DropMalformed,
    ));

    // UDP to this node on another port is not GUE.
    cases.push(Case {
        name: "UDP to this node on another port passes",
        input: udp4(LB4, NODE4, 50000, 6081, b"x"),
        verdict: XDP_PASS,
        output: Out::Same,
        reason: Reason::PassNotService,
        counted: None,
    });
    cases
}

/// Sockets that own flows on this node: an established TCP connection to VIP4:80 (its
/// client port) and UDP sockets on VIP4:53 and [VIP6]:53 connected to port 5300 of the
/// same address.
struct LocalSockets {
    _listener: TcpListener,
    _client: TcpStream,
    _server: TcpStream,
    _udp: UdpSocket,
    _udp6: UdpSocket,
    est_port: u16,
    udp_port: u16,
}

fn local_sockets() -> Result<LocalSockets> {
    let vip = Ipv4Addr::from(VIP4);
    let listener = TcpListener::bind((vip, 80))?;
    let client = TcpStream::connect((vip, 80))?;
    let (server, _) = listener.accept()?;
    let est_port = client.local_addr()?.port();
    let udp = UdpSocket::bind((vip, 53))?;
    udp.connect((vip, 5300))?;
    let udp6 = UdpSocket::bind((vip6(), 53))?;
    udp6.connect((vip6(), 5300))?;
    Ok(LocalSockets {
        _listener: listener,
        _client: client,
        _server: server,
        _udp: udp,
        _udp6: udp6,
        est_port,
        udp_port: 5300,
    })
}

#[test]
fn data_plane_fixtures() {
    if !tests::can_run("data_plane_fixtures") {
        return;
    }
    let ns = fixture::namespace("fix").expect("fixture namespace");
    let failures = ns
        .run(|| {
            let ifindex = tests::link::if_index(fixture::IF)?;
            let mut dp = Dataplane::load(&LoadOptions::default())?;

            // Before the node is configured, everything passes untouched.
            let c = Case {
                name: "unconfigured node passes everything",
                input: tcp4(CLIENT4, VIP4, 40000, 80, true),
                verdict: XDP_PASS,
                output: Out::Same,
                reason: Reason::PassUnconfigured,
                counted: None,
            };
            let mut results = vec![(c.name, run_case(&mut dp, ifindex, &c))];

            configure(&mut dp)?;
            let socks = local_sockets()?;
            let cases: Vec<Case> = client_cases()
                .into_iter()
                .chain(backend_cases(socks.est_port, socks.udp_port))
                .collect();
            for c in &cases {
                results.push((c.name, run_case(&mut dp, ifindex, c)));
            }
            let mut failures = Vec::new();
            for (name, r) in &results {
                match r {
                    Ok(()) => println!("ok    {name}"),
                    Err(e) => {
                        println!("FAIL  {name}: {e:#}");
                        failures.push(name.to_string());
                    }
                }
            }
            println!("{} fixtures, {} failed", results.len(), failures.len());
            Ok(failures)
        })
        .expect("running fixtures");
    assert!(failures.is_empty(), "failed fixtures: {failures:?}");
}

/// A UDP socket that is bound but not yet connected, as a server's new session socket is
/// for a moment, is what the lookup finds for any flow to its port; if it connects to
/// another peer right then, it is an established socket, but not this flow's. Packets of
/// a flow no socket here owns must still go on to the second hop, however the sockets
/// around them churn.
#[test]
fn a_socket_connecting_to_another_peer_does_not_own_a_flow() {
    if !tests::can_run("a_socket_connecting_to_another_peer_does_not_own_a_flow") {
        return;
    }
    let ns = fixture::namespace("race").expect("fixture namespace");
    let results = ns
        .run(|| {
            let ifindex = tests::link::if_index(fixture::IF)?;
            let mut dp = Dataplane::load(&LoadOptions::default())?;
            configure(&mut dp)?;
            [
                (IpAddr::from(VIP4), IpAddr::from(CLIENT4)),
                (vip6().into(), client6().into()),
            ]
            .into_iter()
            .map(|(vip, client)| {
                race_session_sockets(&mut dp, ifindex, vip, client).map(|r| (vip, r))
            })
            .collect::<Result<Vec<_>>>()
        })
        .expect("running the race");
    for (vip, (runs, accepted, churned)) in results {
        println!("{vip}: {runs} runs while {churned} sockets were bound and connected: {accepted} accepted");
        assert!(churned > 1000, "only {churned} sockets churned");
        assert_eq!(accepted, 0, "{vip}: a flow no socket owns was accepted");
    }
}

/// Runs the program on a chained UDP packet from `client` to `vip`:7000 while another
/// thread binds sockets to that port and connects them to other peers. Returns the runs,
/// how many were accepted here, and how many sockets churned.
fn race_session_sockets(
    dp: &mut Dataplane,
    ifindex: u32,
    vip: IpAddr,
    client: IpAddr,
) -> Result<(usize, usize, u64)> {
    const PORT: u16 = 7000;
    const RUNS: usize = 200_000;
    let inner = udp(
        SocketAddr::new(client, 41020),
        SocketAddr::new(vip, PORT),
        b"x",
    );
    let input = gue_to_node(&inner, 1, 0, v4_mapped(backend4(2)));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Session sockets of other peers, each bound, then connected, then closed.
        let churn = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sock = UdpSocket::bind((vip, PORT))?;
                sock.connect((vip, 7001 + (n % 1000) as u16))?;
                n += 1;
            }
            anyhow::Ok(n)
        });
        let mut accepted = 0;
        let mut race = || -> Result<()> {
            for _ in 0..RUNS {
                match fixture::test_run(dp, ifindex, &input)?.verdict {
                    XDP_TX => {}
                    XDP_PASS => accepted += 1,
                    v => bail!("verdict {v}"),
                }
            }
            Ok(())
        };
        let raced = race();
        stop.store(true, Ordering::Relaxed);
        let churned = churn.join().expect("churn thread")?;
        raced?;
        Ok((RUNS, accepted, churned))
    })
}
