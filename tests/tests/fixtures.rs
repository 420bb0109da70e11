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
    collections::BTreeMap,
    io::Read as _,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::FromRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Result};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
};
use lb::dataplane::{Dataplane, LoadOptions};
use lb_common::{
    addr::v4_mapped,
    encap::{FLAG_CHAINED, FLAG_FORWARD_SYN, FLAG_RETURNED, GUE_HLEN, HOP_LIST_TYPE},
    hash::{bucket_index, outer_source_port, FlowHash, FlowHashKey, FlowTuple},
    maps::{Bucket, Counters, ServiceBackendKey, ServiceKey},
    packet::{
        example::{NODE_MAC, PEER_MAC},
        ServiceAddr,
    },
    proto::{ETH_P_IP, ETH_P_IPV6},
    service_index,
    stats::Reason,
};
use tests::fixture::{
    self,
    configure::{round_robin, slot, slot_addr, Service},
    install_service,
    packets::{self, TO_NODE},
    plan::{
        backend_v4, client_v6, node_v6, vip_v6, CLIENT_V4 as CLIENT4, GUE_PORT, NODE_V4 as NODE4,
        OTHER_V4 as OTHER4, PEER_V4 as LB4, VIP_V4 as VIP4,
    },
    GW_MAC, XDP_DROP, XDP_PASS, XDP_TX,
};

const SEED: u32 = 0x5eed_1234;
/// The fixtures' flow hash, as lb.example.json sets it; `every_flow_hash_sends_flows_where_the_host_predicts`
/// runs both.
const FLOW_HASH: FlowHash = FlowHash::MultiplyShift;
const TABLE_BITS: u32 = 4;
const BUCKETS: u32 = 1 << TABLE_BITS;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// The services of the fixture node. Bucket `b` of every table belongs to backend
/// `b % 3` of its family, and was owned before by backend `(b + 1) % 3` (its second
/// hop). Service 5 has empty buckets.
fn services() -> Vec<Service> {
    let v4 = v4_mapped(VIP4);
    let v6 = vip_v6().octets();
    [
        (v4, 80, TCP, false),
        (v4, 53, UDP, false),
        (v6, 80, TCP, true),
        (v4, 8080, TCP, true),
        (v6, 8080, TCP, false),
        (v4, 81, TCP, false),
    ]
    .into_iter()
    .enumerate()
    .map(|(id, (vip, port, proto, v6_backends))| Service {
        addr: ServiceAddr { vip, port, proto },
        id: id as u32,
        v6_backends,
        empty: id == 5,
    })
    .collect()
}

/// The fixtures' flow hash with its keys.
fn key() -> FlowHashKey {
    FlowHashKey::new(FLOW_HASH, SEED)
}

fn configure(dp: &mut Dataplane) -> Result<()> {
    configure_with(dp, FLOW_HASH)
}

fn configure_with(dp: &mut Dataplane, flow_hash: FlowHash) -> Result<()> {
    round_robin(dp, (flow_hash, SEED), TABLE_BITS, &services())
}

// ---- packets -------------------------------------------------------------------------

/// The payload of the fixtures' TCP segments.
const HELLO: &[u8] = b"hello";

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    packets::tcp(TO_NODE, (src, dst), (sport, dport), syn, HELLO)
}

/// A TCP ACK segment from `src` to `dst` (one family) with sequence number `seq`,
/// acknowledging `ack`.
fn tcp_seq(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32) -> Vec<u8> {
    packets::tcp_seq(TO_NODE, src, dst, (seq, ack), HELLO)
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    packets::tcp(TO_NODE, (src, dst), (sport, dport), syn, HELLO)
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp((src, sport).into(), (dst, dport).into(), payload)
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp((src, sport).into(), (dst, dport).into(), payload)
}

/// A UDP packet from `src` to `dst`, of their family.
fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    packets::udp(TO_NODE, src, dst, payload)
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

/// Where the fixture table, with flows hashed by `key`, sends a flow of a service whose
/// backends are IPv6 when `svc_v6_backends`: (hash, first, second).
fn owner(key: &FlowHashKey, svc_v6_backends: bool, t: &FlowTuple) -> (u32, [u8; 16], [u8; 16]) {
    let h = key.hash(t);
    let b = bucket_index(h, TABLE_BITS);
    (
        h,
        slot_addr(slot(svc_v6_backends, b % 3)),
        slot_addr(slot(svc_v6_backends, (b + 1) % 3)),
    )
}

/// What lb should send for `inner` (an IP packet): the encapsulated frame, built here
/// with etherparse's own header code, not lb's.
#[expect(
    clippy::too_many_arguments,
    reason = "every field of the outer headers is a parameter of the oracle"
)]
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
        out.extend_from_slice(&ETH_P_IP.to_be_bytes());
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
        out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
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

/// The frame lb sends for a client packet to a service whose backends are in `v6`, with
/// flows hashed by `key`.
fn client_path_output(
    key: &FlowHashKey,
    frame: &[u8],
    l3: usize,
    t: &FlowTuple,
    v6_backends: bool,
) -> Vec<u8> {
    let (h, first, second) = owner(key, v6_backends, t);
    let src = if v6_backends {
        node_v6().octets()
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
    let pair = |dp: &mut Dataplane, service, backend| -> Result<Counters> {
        let key = ServiceBackendKey { service, backend };
        let all = dp.service_backend_counters()?;
        all.get(&key)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no counters for {key:?}"))
    };
    let counters_before = match c.counted {
        Some((s, b)) => Some((dp.service_counters(s)?, pair(dp, s, b)?)),
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
        let sa = dp.service_counters(s)?;
        let ba = pair(dp, s, b)?;
        let bytes = c.input.len() as u64;
        if sa.packets != sb.packets + 1 || sa.bytes != sb.bytes + bytes {
            bail!("service {s} counters {sa:?}, before {sb:?}");
        }
        if ba.packets != bb.packets + 1 || ba.bytes != bb.bytes + bytes {
            bail!("service {s}, backend {b} counters {ba:?}, before {bb:?}");
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
        let (_, first, _) = owner(&key(), v6b, &t);
        let output = client_path_output(&key(), &input, l3, &t, v6b);
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
    let s6 = tcp6(client_v6(), vip_v6(), 40003, 80, true);
    encap(
        "tcp syn to an IPv6 VIP (IPv6 outer)",
        s6,
        14,
        tuple(client_v6().octets(), vip_v6().octets(), 40003, 80, TCP),
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
    let s64 = tcp6(client_v6(), vip_v6(), 40005, 8080, false);
    encap(
        "IPv6 inner over IPv4 outer",
        s64,
        14,
        tuple(client_v6().octets(), vip_v6().octets(), 40005, 8080, TCP),
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

    let quoted6 = tcp6(vip_v6(), client_v6(), 80, 40009, false);
    let mut icmp6 = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv6(node_v6().octets(), vip_v6().octets(), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
        .write(&mut icmp6, &quoted6[14..14 + 48])
        .unwrap();
    encap(
        "ICMPv6 packet-too-big to the flow's backend",
        icmp6,
        14,
        tuple(client_v6().octets(), vip_v6().octets(), 40009, 80, TCP),
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
    let f6 = tcp6(client_v6(), vip_v6(), 40013, 80, true);
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
    ext[14 + 24..14 + 40].copy_from_slice(&client_v6().octets());
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

    // Lengths that contradict the frame, and a type-0 routing header with segments left:
    // the backend's kernel would discard them, so to a VIP they are dropped here; to
    // anything else they pass untouched.
    for (dst, vip) in [(VIP4, true), (OTHER4, false)] {
        let mut long = tcp4(CLIENT4, dst, 40030, 80, false);
        long.truncate(14 + 40);
        long[14 + 2..14 + 4].copy_from_slice(&1500u16.to_be_bytes());
        fix_ipv4_checksum(&mut long);
        let mut short = tcp4(CLIENT4, dst, 40031, 80, false);
        short[14 + 2..14 + 4].copy_from_slice(&21u16.to_be_bytes());
        fix_ipv4_checksum(&mut short);
        if vip {
            cases.push(drop(
                "IPv4 total length beyond the frame, to a VIP",
                long,
                Reason::DropMalformed,
            ));
            cases.push(drop(
                "IPv4 total length below IP and TCP headers, to a VIP",
                short,
                Reason::DropMalformed,
            ));
        } else {
            cases.push(pass(
                "IPv4 total length beyond the frame, to a non-VIP, passes",
                long,
                Reason::PassNotService,
            ));
            cases.push(pass(
                "IPv4 total length below the headers, to a non-VIP, passes",
                short,
                Reason::PassNotService,
            ));
        }
    }
    for (dst, vip) in [(vip_v6(), true), (client_v6(), false)] {
        let mut long = tcp6(client_v6(), dst, 40032, 80, false);
        long[14 + 4..14 + 6].copy_from_slice(&1400u16.to_be_bytes());
        let rh0 = with_routing_header(&tcp6(client_v6(), dst, 40033, 80, false), 0, 1);
        let (reason, name_long, name_rh0) = if vip {
            (
                Reason::DropMalformed,
                "IPv6 payload length beyond the frame, to a VIP",
                "IPv6 type-0 routing header with segments left, to a VIP",
            )
        } else {
            (
                Reason::PassNotService,
                "IPv6 payload length beyond the frame, to a non-VIP, passes",
                "IPv6 type-0 routing header with segments left, to a non-VIP, passes",
            )
        };
        if vip {
            cases.push(drop(name_long, long, reason));
            cases.push(drop(name_rh0, rh0, reason));
        } else {
            cases.push(pass(name_long, long, reason));
            // With an extension header it misses the fast path for foreign traffic and
            // is passed for being unparsable.
            cases.push(pass(name_rh0, rh0, Reason::PassUnparsed));
        }
    }

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

    // 1500-byte MTU: an IPv4 packet of 1460 bytes becomes 1512 once encapsulated. With
    // DF the client is told the largest packet that fits (1500 - 52); without, dropped.
    let payload: Vec<u8> = (0..1420u32).map(|i| i as u8).collect();
    let mut big = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv4(CLIENT4, VIP4, 64)
        .tcp(40020, 80, 1, 1000)
        .ack(1)
        .write(&mut big, &payload)
        .unwrap();
    cases.push(Case {
        name: "too big once encapsulated, IPv4 with DF: ICMP fragmentation needed, MTU 1448",
        output: Out::Bytes(too_big_reply(&big, 1500 - 52)),
        input: big.clone(),
        verdict: XDP_TX,
        reason: Reason::IcmpTooBigSent,
        counted: None,
    });
    let mut no_df = big;
    no_df[14 + 6] = 0;
    fix_ipv4_checksum(&mut no_df);
    cases.push(drop(
        "too big once encapsulated, IPv4 without DF: dropped",
        no_df,
        Reason::DropTooBig,
    ));
    // IPv6 to a service with IPv6 backends: 1500 - 72 fits.
    let mut big6 = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, NODE_MAC)
        .ipv6(client_v6().octets(), vip_v6().octets(), 64)
        .tcp(40021, 80, 1, 1000)
        .ack(1)
        .write(&mut big6, &payload)
        .unwrap();
    cases.push(Case {
        name: "too big once encapsulated, IPv6: ICMPv6 packet too big, MTU 1428",
        output: Out::Bytes(too_big_reply(&big6, 1500 - 72)),
        input: big6,
        verdict: XDP_TX,
        reason: Reason::IcmpTooBigSent,
        counted: None,
    });
    cases
}

/// What lb answers a client frame that is too big once encapsulated: from the VIP back to
/// the client (MAC addresses swapped), ICMP fragmentation needed (IPv4, no DF on the
/// reply) or ICMPv6 packet too big with `mtu`, quoting the first 504 bytes of the packet.
/// Built with etherparse's own ICMP code.
fn too_big_reply(frame: &[u8], mtu: u32) -> Vec<u8> {
    let quote = &frame[14..14 + 504];
    let b = PacketBuilder::ethernet2(NODE_MAC, PEER_MAC);
    let mut v = Vec::new();
    if frame[12..14] == [0x86, 0xdd] {
        let (h, _) = Ipv6Header::from_slice(&frame[14..]).unwrap();
        b.ipv6(h.destination, h.source, 64)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu })
            .write(&mut v, quote)
            .unwrap();
    } else {
        let (h, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
        let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, h.destination, h.source).unwrap();
        ip.dont_fragment = false;
        let unreachable = etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: mtu as u16,
        };
        b.ip(IpHeaders::Ipv4(ip, Default::default()))
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(unreachable))
            .write(&mut v, quote)
            .unwrap();
    }
    v
}

/// `frame` (Ethernet, IPv6, no extension headers) with an 8-byte routing header of type
/// `ty` and `segments_left` put in front of its transport header.
fn with_routing_header(frame: &[u8], ty: u8, segments_left: u8) -> Vec<u8> {
    let at = 14 + 40;
    let mut v = frame[..at].to_vec();
    v.extend_from_slice(&[frame[14 + 6], 0, ty, segments_left, 0, 0, 0, 0]);
    v.extend_from_slice(&frame[at..]);
    v[14 + 6] = 43;
    let len = u16::from_be_bytes([v[14 + 4], v[14 + 5]]) + 8;
    v[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
    v
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[14 + 10] = 0;
    frame[14 + 11] = 0;
    let (h, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    frame[14 + 10..14 + 12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

/// Backend-path cases, with the sockets of `socks` on this node.
fn backend_cases(socks: &LocalSockets) -> Vec<Case> {
    let mut cases = Vec::new();
    let udp_port = socks.udp_port;
    let second = v4_mapped(backend_v4(2).octets());
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
    let est = socks.est;
    cases.push(accept(
        "GUE: established local TCP socket, segment in its windows, accepted",
        tcp_seq(est.client, est.server, est.seq, est.ack),
        1,
        0,
        Reason::AcceptSocket,
    ));
    cases.push(accept(
        "GUE: established socket, acknowledges a segment still being sent, accepted",
        tcp_seq(est.client, est.server, est.seq, est.ack.wrapping_add(1448)),
        1,
        0,
        Reason::AcceptSocket,
    ));
    cases.push(accept(
        "GUE: listener and an ACK with a valid SYN cookie, accepted",
        tcp_seq(
            socks.cookie.client,
            socks.cookie.server,
            socks.cookie.seq,
            socks.cookie.ack,
        ),
        1,
        0,
        Reason::AcceptSocket,
    ));
    let g = socks.group_cookie;
    cases.push(accept(
        "GUE: reuseport listener and an ACK with a valid SYN cookie, accepted",
        tcp_seq(g.client, g.server, g.seq, g.ack),
        1,
        0,
        Reason::AcceptSocket,
    ));
    // Segments a local socket must not own: another connection's on the same ports.
    // They go on to the second hop, this node now the outer source, one hop fewer.
    let chained = |name, inner: Vec<u8>| {
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
        Case {
            name,
            input,
            verdict: XDP_TX,
            output: Out::Bytes(output),
            reason: Reason::SecondHop,
            counted: None,
        }
    };
    cases.push(chained(
        "GUE: established socket, sequence number outside its receive window, second hop",
        tcp_seq(
            est.client,
            est.server,
            est.seq.wrapping_add(0x4000_0000),
            est.ack,
        ),
    ));
    cases.push(chained(
        "GUE: established socket, sequence number far behind its window, second hop",
        tcp_seq(
            est.client,
            est.server,
            est.seq.wrapping_sub(0x0100_0000),
            est.ack,
        ),
    ));
    cases.push(chained(
        "GUE: established socket, acknowledges data it never sent, second hop",
        tcp_seq(
            est.client,
            est.server,
            est.seq,
            est.ack.wrapping_add(0x2_0000),
        ),
    ));
    cases.push(chained(
        "GUE: established socket, acknowledgment older than any window, second hop",
        tcp_seq(
            est.client,
            est.server,
            est.seq,
            est.ack.wrapping_sub(0x4000_0000),
        ),
    ));
    let tw = socks.time_wait;
    cases.push(chained(
        "GUE: a TIME_WAIT socket does not own the flow, second hop",
        tcp_seq(tw.client, tw.server, tw.seq, tw.ack),
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
        udp6(vip_v6(), vip_v6(), udp_port, 53, b"x"),
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
    let inner6 = tcp6(client_v6(), vip_v6(), 41003, 80, true);
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
    let first_hop = v4_mapped(backend_v4(0).octets());
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
    // Cut frames whose outer header says so (the outer lengths follow the cut).
    let cut = |len: usize| {
        let mut c = g[..len].to_vec();
        c[14 + 2..14 + 4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        c[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&((len - 14 - 20) as u16).to_be_bytes());
        fix_ipv4_checksum(&mut c);
        c
    };
    cases.push(drop(
        "GUE: cut short inside the hop list",
        cut(14 + 20 + 8 + 10),
        Reason::DropMalformed,
    ));
    cases.push(drop(
        "GUE: inner TCP header cut short",
        cut(14 + 20 + 8 + 24 + 20 + 8),
        Reason::DropMalformed,
    ));
    cases.push(Case {
        name: "GUE: outer length beyond the frame, not lb's: passed untouched",
        input: g[..14 + 20 + 8 + 24 + 20 + 8].to_vec(),
        verdict: XDP_PASS,
        output: Out::Same,
        reason: Reason::PassUnparsed,
        counted: None,
    });
    let inner_long = {
        let mut i = tcp4(CLIENT4, VIP4, 41012, 80, false);
        i[14 + 2..14 + 4].copy_from_slice(&1400u16.to_be_bytes());
        fix_ipv4_checksum(&mut i);
        i
    };
    cases.push(drop(
        "GUE: inner IPv4 total length beyond the frame",
        gue_to_node(&inner_long, 1, 0, second),
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

/// A TCP flow to VIP4:80 on this node and the sequence numbers its next segment from the
/// client carries.
#[derive(Clone, Copy)]
struct Segment {
    client: SocketAddr,
    server: SocketAddr,
    seq: u32,
    ack: u32,
}

/// Sockets on this node: an established TCP connection to VIP4:80, a connection to it
/// that the server closed first (its server side in TIME_WAIT), a SYN-cookie handshake
/// with its listener and another with a reuseport group of two listeners on VIP4:81
/// (which keeps its SYN-queue overflow time in the group, not in the listener), and UDP
/// sockets on VIP4:53 and [VIP6]:53 connected to port 5300 of the same address.
struct LocalSockets {
    _listener: TcpListener,
    _group: [TcpListener; 2],
    _client: TcpStream,
    _server: TcpStream,
    _udp: UdpSocket,
    _udp6: UdpSocket,
    est: Segment,
    time_wait: Segment,
    cookie: Segment,
    group_cookie: Segment,
    udp_port: u16,
}

fn local_sockets() -> Result<LocalSockets> {
    let vip = Ipv4Addr::from(VIP4);
    let listener = TcpListener::bind((vip, 80))?;
    let server_addr = listener.local_addr()?;
    let client = TcpStream::connect((vip, 80))?;
    let (server, _) = listener.accept()?;
    let (seq, ack) = fixture::next_seq_ack(&client)?;
    let est = Segment {
        client: client.local_addr()?,
        server: server_addr,
        seq,
        ack,
    };

    // The server closes first, so its side ends in TIME_WAIT.
    let closing = TcpStream::connect((vip, 80))?;
    let (closed, _) = listener.accept()?;
    let (seq, ack) = fixture::next_seq_ack(&closing)?;
    let time_wait = Segment {
        client: closing.local_addr()?,
        server: server_addr,
        seq: seq.wrapping_add(1),
        ack: ack.wrapping_add(1),
    };
    drop(closed);
    let mut buf = [0u8; 1];
    (&closing).read_exact(&mut buf).ok();
    drop(closing);
    std::thread::sleep(std::time::Duration::from_millis(100));

    let cookie = syncookie_handshake(server_addr)?;
    let group = [
        reuseport_listener((vip, 81))?,
        reuseport_listener((vip, 81))?,
    ];
    let group_cookie = syncookie_handshake(group[0].local_addr()?)?;

    let udp = UdpSocket::bind((vip, 53))?;
    udp.connect((vip, 5300))?;
    let udp6 = UdpSocket::bind((vip_v6(), 53))?;
    udp6.connect((vip_v6(), 5300))?;
    Ok(LocalSockets {
        _listener: listener,
        _group: group,
        _client: client,
        _server: server,
        _udp: udp,
        _udp6: udp6,
        est,
        time_wait,
        cookie,
        group_cookie,
        udp_port: 5300,
    })
}

/// A listener on `addr` with `SO_REUSEPORT`, so that several make a group.
fn reuseport_listener(addr: (Ipv4Addr, u16)) -> Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.bind(&SocketAddr::from(addr).into())?;
    s.listen(128)?;
    Ok(s.into())
}

/// Sends a SYN from a raw socket to `server`'s listener with SYN cookies forced on, and
/// returns the ACK that completes the handshake: the cookie is the SYN-ACK's sequence
/// number, and no request socket remembers the SYN.
fn syncookie_handshake(server: SocketAddr) -> Result<Segment> {
    std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2")?;
    let IpAddr::V4(vip) = server.ip() else {
        bail!("IPv4 only");
    };
    let client = SocketAddr::new(server.ip(), 40999);
    let isn: u32 = 0x1234_5678;
    let mut syn = etherparse::TcpHeader::new(client.port(), server.port(), isn, 65000);
    syn.syn = true;
    syn.checksum = syn.calc_checksum_ipv4_raw(vip.octets(), vip.octets(), &[])?;
    // SAFETY: plain socket call; the fd is owned by the UdpSocket-free wrapper below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns; closed when `_owned` drops.
    let _owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid fd and a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: all zeroes is a valid sockaddr_in.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from_ne_bytes(vip.octets());
    let bytes = syn.to_bytes();
    // SAFETY: a valid fd, buffer and sockaddr_in of the sizes given.
    let sent = unsafe {
        libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        bail!("sending the SYN: {}", std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 1500];
    for _ in 0..16 {
        // SAFETY: a valid fd and buffer of the size given.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            bail!("no SYN-ACK: {}", std::io::Error::last_os_error());
        }
        let Ok((_, rest)) = Ipv4Header::from_slice(&buf[..n as usize]) else {
            continue;
        };
        let Ok((th, _)) = etherparse::TcpHeader::from_slice(rest) else {
            continue;
        };
        if th.syn && th.ack && th.source_port == server.port() && th.destination_port == 40999 {
            return Ok(Segment {
                client,
                server,
                seq: isn.wrapping_add(1),
                ack: th.sequence_number.wrapping_add(1),
            });
        }
    }
    bail!("no SYN-ACK among the packets seen")
}

#[test]
fn data_plane_fixtures() {
    if !tests::can_run("data_plane_fixtures") {
        return;
    }
    let failures = fixture::with_dataplane("fix", &LoadOptions::default(), |dp, ifindex| {
        // Before the node is configured, everything passes untouched.
        let c = Case {
            name: "unconfigured node passes everything",
            input: tcp4(CLIENT4, VIP4, 40000, 80, true),
            verdict: XDP_PASS,
            output: Out::Same,
            reason: Reason::PassUnconfigured,
            counted: None,
        };
        let mut results = vec![(c.name, run_case(dp, ifindex, &c))];

        configure(dp)?;
        let socks = local_sockets()?;
        let cases: Vec<Case> = client_cases()
            .into_iter()
            .chain(backend_cases(&socks))
            .collect();
        for c in &cases {
            results.push((c.name, run_case(dp, ifindex, c)));
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
    let results = fixture::with_dataplane("race", &LoadOptions::default(), |dp, ifindex| {
        configure(dp)?;
        [
            (IpAddr::from(VIP4), IpAddr::from(CLIENT4)),
            (vip_v6().into(), client_v6().into()),
        ]
        .into_iter()
        .map(|(vip, client)| race_session_sockets(dp, ifindex, vip, client).map(|r| (vip, r)))
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
    let input = gue_to_node(&inner, 1, 0, v4_mapped(backend_v4(2).octets()));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Session sockets of other peers, each bound, then connected, then closed.
        let churn = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sock = match UdpSocket::bind((vip, PORT)) {
                    Ok(s) => s,
                    // The last socket lives on while a process that another test forks
                    // holds a copy of its descriptor, until that process execs.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
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

// ---- the local first hop (every node both balances and serves) ------------------------

/// Backend slots of the node's own addresses in the local-first-hop fixtures.
const LOCAL4_SLOT: u32 = 6;
const LOCAL6_SLOT: u32 = 7;

/// Services of the local-first-hop fixtures, each with one (first, second) in every
/// bucket: (port, proto, v6, first, second).
fn local_services() -> Vec<(u16, u8, bool, u32, u32)> {
    let mut v = Vec::new();
    for v6 in [false, true] {
        let (local, remote) = if v6 {
            (LOCAL6_SLOT, slot(true, 0))
        } else {
            (LOCAL4_SLOT, slot(false, 0))
        };
        v.push((90, TCP, v6, local, remote));
        v.push((91, TCP, v6, local, lb_common::maps::NO_BACKEND));
        v.push((92, TCP, v6, remote, local));
        v.push((93, UDP, v6, local, remote));
    }
    v
}

fn configure_local(dp: &mut Dataplane) -> Result<()> {
    configure(dp)?;
    dp.set_backend(LOCAL4_SLOT, Ipv4Addr::from(NODE4).into())?;
    dp.set_backend(LOCAL6_SLOT, node_v6().into())?;
    for (i, &(port, proto, v6, first, second)) in local_services().iter().enumerate() {
        let vip = if v6 {
            vip_v6().octets()
        } else {
            v4_mapped(VIP4)
        };
        let table = vec![Bucket { first, second }; BUCKETS as usize];
        install_service(dp, (vip, port, proto), 10 + i as u32, &table)?;
    }
    Ok(())
}

/// The service id of the local-first-hop service on `port`, `proto`, family `v6`.
fn local_service_id(port: u16, proto: u8, v6: bool) -> u32 {
    let i = local_services()
        .iter()
        .position(|s| (s.0, s.1, s.2) == (port, proto, v6))
        .expect("a local service");
    10 + i as u32
}

/// Local sockets of the local-first-hop fixtures: a listener on VIP:90 of both families
/// with one established connection each, and UDP sockets on VIP:93 connected to port 5300.
struct LocalFirstHopSockets {
    _held: Vec<Box<dyn std::any::Any>>,
    /// The next segment of each established connection, IPv4 and IPv6 (in its windows).
    est: [Vec<u8>; 2],
}

fn local_first_hop_sockets() -> Result<LocalFirstHopSockets> {
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mut est = [Vec::new(), Vec::new()];
    for (i, vip) in [IpAddr::from(VIP4), vip_v6().into()]
        .into_iter()
        .enumerate()
    {
        let listener = TcpListener::bind((vip, 90))?;
        let client = TcpStream::connect((vip, 90))?;
        let (server, _) = listener.accept()?;
        let (seq, ack) = fixture::next_seq_ack(&client)?;
        est[i] = tcp_seq(client.local_addr()?, SocketAddr::new(vip, 90), seq, ack);
        let udp = UdpSocket::bind((vip, 93))?;
        udp.connect((vip, 5300))?;
        held.extend([
            Box::new(listener) as Box<dyn std::any::Any>,
            Box::new(client),
            Box::new(server),
            Box::new(udp),
        ]);
    }
    Ok(LocalFirstHopSockets { _held: held, est })
}

/// A packet of one local-first-hop case: TCP (SYN or ACK) or UDP from `sport` of the
/// client (the VIP itself for the flows of local sockets) to `port` of the VIP.
fn local_packet(v6: bool, from_vip: bool, sport: u16, port: u16, kind: &str) -> Vec<u8> {
    let (vip, client) = if v6 {
        (IpAddr::from(vip_v6()), IpAddr::from(client_v6()))
    } else {
        (IpAddr::from(VIP4), IpAddr::from(CLIENT4))
    };
    let src = if from_vip { vip } else { client };
    match (kind, src, vip) {
        ("udp", _, _) => udp(
            SocketAddr::new(src, sport),
            SocketAddr::new(vip, port),
            b"x",
        ),
        (_, IpAddr::V4(s), IpAddr::V4(d)) => {
            tcp4(s.octets(), d.octets(), sport, port, kind == "syn")
        }
        (_, IpAddr::V6(s), IpAddr::V6(d)) => tcp6(s, d, sport, port, kind == "syn"),
        _ => unreachable!(),
    }
}

/// The frame sent to `dst` for `input`, from this node, with `hops_left`, `flags` and
/// `next_hop` in the hop list.
fn encapsulated_to(
    input: &[u8],
    v6: bool,
    dst: u32,
    hops_left: u8,
    flags: u8,
    next: u32,
) -> Vec<u8> {
    let t = local_tuple(input, v6);
    let h = key().hash(&t);
    let src = if v6 {
        node_v6().octets()
    } else {
        v4_mapped(NODE4)
    };
    let addr = |s| match s {
        LOCAL4_SLOT => v4_mapped(NODE4),
        LOCAL6_SLOT => node_v6().octets(),
        s => slot_addr(s),
    };
    let mut out = encapsulated(
        GW_MAC,
        NODE_MAC,
        src,
        addr(dst),
        outer_source_port(h),
        hops_left,
        flags,
        addr(next),
        &input[14..],
    );
    if v6 {
        set_flow_label(&mut out, h);
    }
    out
}

/// The flow tuple of a frame built by `local_packet`.
fn local_tuple(frame: &[u8], v6: bool) -> FlowTuple {
    let (src, dst, l4, proto) = if v6 {
        let a = |o: usize| -> [u8; 16] { frame[o..o + 16].try_into().unwrap() };
        (a(22), a(38), 54, frame[20])
    } else {
        let a = |o: usize| v4_mapped(frame[o..o + 4].try_into().unwrap());
        (a(26), a(30), 34, frame[23])
    };
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    tuple(src, dst, port(l4), port(l4 + 2), proto)
}

fn local_cases(est: [Vec<u8>; 2]) -> Vec<Case> {
    let mut cases = Vec::new();
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let (local, remote) = if v6 {
            (LOCAL6_SLOT, slot(true, 0))
        } else {
            (LOCAL4_SLOT, slot(false, 0))
        };
        let name = |what: &str| -> &'static str {
            Box::leak(format!("local first hop, {fam}: {what}").into_boxed_str())
        };
        let delivered = |what: &str, input: Vec<u8>, port, proto| Case {
            name: name(what),
            input,
            verdict: XDP_PASS,
            output: Out::Same,
            reason: Reason::DeliveredLocally,
            counted: Some((local_service_id(port, proto, v6), local)),
        };
        cases.push(delivered(
            "a SYN goes to the local stack untouched",
            local_packet(v6, false, 42001, 90, "syn"),
            90,
            TCP,
        ));
        cases.push(delivered(
            "an established local socket's packet goes to the local stack",
            est[v6 as usize].clone(),
            90,
            TCP,
        ));
        cases.push(delivered(
            "a connected local UDP socket's packet goes to the local stack",
            local_packet(v6, true, 5300, 93, "udp"),
            93,
            UDP,
        ));
        cases.push(delivered(
            "no socket and no second hop: to the local stack (it answers for itself)",
            local_packet(v6, false, 42002, 91, "ack"),
            91,
            TCP,
        ));
        for (what, kind, port, proto) in [
            ("an ACK no socket owns", "ack", 90, TCP),
            ("UDP no socket owns", "udp", 93, UDP),
        ] {
            let input = local_packet(v6, false, 42003, port, kind);
            let output = encapsulated_to(&input, v6, remote, 0, FLAG_CHAINED, remote);
            cases.push(Case {
                name: name(&format!("{what} goes on to the second hop, chained")),
                input,
                verdict: XDP_TX,
                output: Out::Bytes(output),
                reason: Reason::SentOnFromLocal,
                // Counted under the bucket's owner, this node.
                counted: Some((local_service_id(port, proto, v6), local)),
            });
        }
        let input = local_packet(v6, false, 42004, 92, "ack");
        let output = encapsulated_to(&input, v6, remote, 1, 0, local);
        cases.push(Case {
            name: name("second hop local, first remote: encapsulated to the first hop"),
            input,
            verdict: XDP_TX,
            output: Out::Bytes(output),
            reason: Reason::Encapsulated,
            counted: Some((local_service_id(92, TCP, v6), remote)),
        });
    }
    cases
}

/// A node that is a backend of the services it balances: when a bucket's first hop is the
/// node itself, the client path decides as the backend path would, without encapsulating.
#[test]
fn local_first_hop_fixtures() {
    if !tests::can_run("local_first_hop_fixtures") {
        return;
    }
    let failures = fixture::with_dataplane("local", &LoadOptions::default(), |dp, ifindex| {
        configure_local(dp)?;
        let socks = local_first_hop_sockets()?;
        let mut failures = Vec::new();
        let cases = local_cases(socks.est);
        for c in &cases {
            match run_case(dp, ifindex, c) {
                Ok(()) => println!("ok    {}", c.name),
                Err(e) => {
                    println!("FAIL  {}: {e:#}", c.name);
                    failures.push(c.name);
                }
            }
        }
        println!("{} fixtures, {} failed", cases.len(), failures.len());
        Ok(failures)
    })
    .expect("running fixtures");
    assert!(failures.is_empty(), "failed fixtures: {failures:?}");
}

/// A service whose slots in the service index are all taken by others is found through
/// the `SERVICES` hash map: `PROBES + 1` services on ports that share one home slot are
/// each forwarded and counted as themselves, and stay so when one of them is removed.
#[test]
fn services_beyond_a_full_index_window_are_still_forwarded() {
    if !tests::can_run("services_beyond_a_full_index_window_are_still_forwarded") {
        return;
    }
    fixture::with_dataplane("index", &LoadOptions::default(), |dp, ifindex| {
        configure(dp)?;
        let key = |port: u16| ServiceKey {
            addr: v4_mapped(VIP4),
            port_be: port.to_be(),
            proto: TCP,
            _pad: 0,
        };
        let mut by_home: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
        for port in 20000..60000 {
            by_home
                .entry(service_index::home(&key(port)))
                .or_default()
                .push(port);
        }
        let n = service_index::PROBES as usize + 1;
        let ports = by_home
            .into_values()
            .max_by_key(Vec::len)
            .filter(|p| p.len() >= n)
            .ok_or_else(|| anyhow::anyhow!("no {n} ports share a home slot"))?;
        let ports = &ports[..n];
        let table = vec![
            Bucket {
                first: slot(false, 0),
                second: lb_common::maps::NO_BACKEND,
            };
            BUCKETS as usize
        ];
        let id = |i: usize| 20 + i as u32;
        for (i, &port) in ports.iter().enumerate() {
            install_service(dp, (v4_mapped(VIP4), port, TCP), id(i), &table)?;
        }
        let indexed: Vec<bool> = ports.iter().map(|&p| dp.service_indexed(&key(p))).collect();
        assert_eq!(indexed.iter().filter(|i| !**i).count(), 1, "{indexed:?}");
        assert!(!indexed[n - 1], "the last one finds its window full");
        let forwarded = |dp: &mut Dataplane, i: usize, port: u16| -> Result<bool> {
            let before = dp.service_counters(id(i))?.packets;
            let run = fixture::test_run(dp, ifindex, &tcp4(CLIENT4, VIP4, 40000, port, true))?;
            let counted = dp.service_counters(id(i))?.packets - before;
            Ok(run.verdict == XDP_TX && counted == 1)
        };
        for (i, &port) in ports.iter().enumerate() {
            assert!(
                forwarded(dp, i, port)?,
                "port {port} not forwarded as its service"
            );
        }
        dp.remove_service(&key(ports[0]))?;
        let run = fixture::test_run(dp, ifindex, &tcp4(CLIENT4, VIP4, 40000, ports[0], true))?;
        assert_eq!(run.verdict, XDP_PASS, "a removed service passes");
        for (i, &port) in ports.iter().enumerate().skip(1) {
            assert!(forwarded(dp, i, port)?, "port {port} after the removal");
        }
        Ok(())
    })
    .expect("running the index fixture");
}

/// With either flow hash configured, the program sends each flow, IPv4 and IPv6, TCP and
/// UDP, to the backend the host's copy of that hash predicts, with the outer source port
/// (and IPv6 flow label) of that hash: the data plane and the host (tests, tooling) hash
/// alike.
#[test]
fn every_flow_hash_sends_flows_where_the_host_predicts() {
    if !tests::can_run("every_flow_hash_sends_flows_where_the_host_predicts") {
        return;
    }
    let v4 = v4_mapped;
    let flows = |i: u16| {
        let port = 20000 + 7 * i;
        [
            (
                tcp4(CLIENT4, VIP4, port, 80, true),
                tuple(v4(CLIENT4), v4(VIP4), port, 80, TCP),
                0,
                false,
            ),
            (
                udp4(CLIENT4, VIP4, port, 53, b"query"),
                tuple(v4(CLIENT4), v4(VIP4), port, 53, UDP),
                1,
                false,
            ),
            (
                tcp6(client_v6(), vip_v6(), port, 80, true),
                tuple(client_v6().octets(), vip_v6().octets(), port, 80, TCP),
                2,
                true,
            ),
        ]
    };
    let mut buckets = Vec::new();
    for kind in [FlowHash::Murmur3, FlowHash::MultiplyShift] {
        let key = FlowHashKey::new(kind, SEED);
        let failures = fixture::with_dataplane("hashes", &LoadOptions::default(), |dp, ifindex| {
            configure_with(dp, kind)?;
            let mut failures = Vec::new();
            let mut placed = Vec::new();
            for i in 0..64 {
                for (input, t, svc, v6b) in flows(i) {
                    let (_, first, _) = owner(&key, v6b, &t);
                    placed.push(bucket_index(key.hash(&t), TABLE_BITS));
                    let c = Case {
                        name: "flow",
                        output: Out::Bytes(client_path_output(&key, &input, 14, &t, v6b)),
                        verdict: XDP_TX,
                        reason: Reason::Encapsulated,
                        counted: Some((svc, slot_of(first))),
                        input,
                    };
                    if let Err(e) = run_case(dp, ifindex, &c) {
                        failures.push(format!("{}: {t:?}: {e:#}", kind.name()));
                    }
                }
            }
            buckets.push(placed);
            Ok(failures)
        })
        .expect("running the flow hash fixture");
        assert!(
            failures.is_empty(),
            "{} flows misplaced: {:?}",
            failures.len(),
            failures.first()
        );
    }
    // Were the two hashes alike on these flows, the data plane could ignore the setting.
    assert_ne!(
        buckets[0], buckets[1],
        "both hashes put every flow in the same bucket"
    );
}
