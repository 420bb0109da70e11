//! The model's rules case by case, the seed corpus (written here, committed under
//! lb-common/fuzz/corpus/classify), and a bounded fuzz run: the model over the seeds and
//! thousands of mutations of them with a fixed seed, checking its invariants.

extern crate std;

use std::{collections::BTreeMap, format, string::String, vec, vec::Vec};

use super::{example::*, mutate::*, *};
use crate::{
    addr::v4_mapped,
    encap::{GUE_HLEN, HOP_LIST_TYPE, OUTER_TTL},
    proto::*,
};

// ---- frames ---------------------------------------------------------------------------

fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = NODE_MAC.to_vec();
    v.extend_from_slice(&PEER_MAC);
    v.extend_from_slice(&ether_type.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn ipv4_opts(src: [u8; 4], dst: [u8; 4], proto: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let hlen = IPV4_LEN + options.len();
    let mut h = [0u8; IPV4_LEN];
    h[0] = 0x40 | (hlen / 4) as u8;
    h[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    h[6] = 0x40;
    h[8] = OUTER_TTL;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let sum = crate::encap::ipv4_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(options);
    v.extend_from_slice(payload);
    v
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_opts(src, dst, proto, &[], payload)
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x60, 0, 0, 0];
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(&[next, 64]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(payload);
    v
}

/// An IPv6 extension header of `8 * (len8 + 1)` bytes in front of `payload`.
fn ext(next: u8, len8: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 8 * (len8 as usize + 1)];
    v[0] = next;
    v[1] = len8;
    v.extend_from_slice(payload);
    v
}

fn ext_fragment(next: u8, offset_flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![next, 0];
    v.extend_from_slice(&offset_flags.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 1]);
    v.extend_from_slice(payload);
    v
}

fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 20];
    v[0..2].copy_from_slice(&sport.to_be_bytes());
    v[2..4].copy_from_slice(&dport.to_be_bytes());
    v[4..8].copy_from_slice(&1000u32.to_be_bytes());
    v[12] = 5 << 4;
    v[13] = flags;
    v[14..16].copy_from_slice(&65000u16.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v[0..2].copy_from_slice(&sport.to_be_bytes());
    v[2..4].copy_from_slice(&dport.to_be_bytes());
    v[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn icmp(ty: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut v = vec![ty, code, 0, 0];
    v.extend_from_slice(&rest.to_be_bytes());
    v.extend_from_slice(quoted);
    v
}

/// GUE header, hop list and `inner` (an IP packet).
fn gue(inner: &[u8], hops: u8, flags: u8, next_hop: [u8; 16]) -> Vec<u8> {
    let inner_v6 = inner[0] >> 4 == 6;
    let mut v = vec![GUE_HLEN, if inner_v6 { 41 } else { 4 }, 0, 0];
    v.extend_from_slice(&HOP_LIST_TYPE);
    v.extend_from_slice(&[hops, flags]);
    v.extend_from_slice(&next_hop);
    v.extend_from_slice(inner);
    v
}

fn gue4_to_node(inner: &[u8], hops: u8, flags: u8, next_hop: [u8; 16]) -> Vec<u8> {
    let g = gue(inner, hops, flags, next_hop);
    eth(
        ETH_P_IP,
        &ipv4(PEER_V4, NODE_V4, IPPROTO_UDP, &udp(50000, GUE_PORT, &g)),
    )
}

fn gue6_to_node(inner: &[u8], hops: u8, flags: u8, next_hop: [u8; 16]) -> Vec<u8> {
    let g = gue(inner, hops, flags, next_hop);
    eth(
        ETH_P_IPV6,
        &ipv6(PEER_V6, NODE_V6, IPPROTO_UDP, &udp(50000, GUE_PORT, &g)),
    )
}

const SYN: u8 = TCP_SYN;
const ACK: u8 = TCP_ACK;
const BACKEND2_V4: [u8; 4] = [10, 1, 0, 3];
/// fd01::3
const BACKEND2_V6: [u8; 16] = [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];

/// A type-0 routing header with `segments_left` in front of `payload`.
fn routing0(next: u8, segments_left: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ext(next, 0, payload);
    v[3] = segments_left;
    v
}

/// Sets the total length of the IPv4 packet `p` (and its header checksum).
fn set_tot_len4(p: &mut [u8], len: u16) {
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let mut h = [0u8; IPV4_LEN];
    h.copy_from_slice(&p[..IPV4_LEN]);
    let sum = crate::encap::ipv4_checksum(&h);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The first `len` bytes of a GUE frame over IPv4, its outer lengths saying so.
fn cut_outer4(frame: &[u8], len: usize) -> Vec<u8> {
    let mut f = frame[..len].to_vec();
    set_tot_len4(&mut f[14..], (len - 14) as u16);
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&((len - 14 - 20) as u16).to_be_bytes());
    f
}

fn tcp4(src: [u8; 4], dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_TCP, &tcp(40000, dport, flags, b"hello"))
}

fn tcp6(src: [u8; 16], dst: [u8; 16], dport: u16, flags: u8) -> Vec<u8> {
    ipv6(src, dst, IPPROTO_TCP, &tcp(40000, dport, flags, b"hello"))
}

/// A packet a backend sent for the service VIP:80 to the client's port 40001, as an ICMP
/// error quotes it.
fn quoted4() -> Vec<u8> {
    ipv4(
        VIP_V4,
        CLIENT_V4,
        IPPROTO_TCP,
        &tcp(80, 40001, ACK, b"hello"),
    )
}

/// What the model must say about a seed.
#[derive(Clone, Copy, Debug)]
enum Want {
    Is(Reason),
    Service { icmp: bool },
    Gue(Reasons),
}

const CHAIN: Reasons = Reasons::one(Reason::AcceptSocket)
    .with(Reason::SecondHop)
    .with(Reason::DropFibMiss)
    .with(Reason::DropTooBig);
/// No hop left: accepted without asking the socket table.
const LAST: Reasons = Reasons::one(Reason::AcceptLastHop);

/// The seed corpus: real packets of every path, and the malformed ones the program must
/// tell apart. Each with what the model must make of it.
fn seeds() -> Vec<(&'static str, Vec<u8>, Want)> {
    use Reason::*;
    use Want::*;
    let v4 = |f: Vec<u8>| eth(ETH_P_IP, &f);
    let v6 = |f: Vec<u8>| eth(ETH_P_IPV6, &f);
    let hop2 = v4_mapped(BACKEND2_V4);
    let mut s: Vec<(&'static str, Vec<u8>, Want)> = vec![
        (
            "tcp4-syn-vip",
            v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN)),
            Service { icmp: false },
        ),
        (
            "tcp4-ack-vip",
            v4(tcp4(CLIENT_V4, VIP_V4, 80, ACK)),
            Service { icmp: false },
        ),
        (
            "udp4-vip",
            v4(ipv4(
                CLIENT_V4,
                VIP_V4,
                IPPROTO_UDP,
                &udp(5353, 53, b"query"),
            )),
            Service { icmp: false },
        ),
        (
            "tcp6-syn-vip",
            v6(tcp6(CLIENT_V6, VIP_V6, 80, SYN)),
            Service { icmp: false },
        ),
        (
            "udp6-vip",
            v6(ipv6(CLIENT_V6, VIP_V6, IPPROTO_UDP, &udp(5353, 53, b"q"))),
            Service { icmp: false },
        ),
        (
            "tcp4-options-vip",
            v4(ipv4_opts(
                CLIENT_V4,
                VIP_V4,
                IPPROTO_TCP,
                &[1; 8],
                &tcp(40000, 80, SYN, b""),
            )),
            Service { icmp: false },
        ),
        (
            "tcp4-max-options-vip",
            v4(ipv4_opts(
                CLIENT_V4,
                VIP_V4,
                IPPROTO_TCP,
                &[1; 40],
                &tcp(40000, 80, ACK, b""),
            )),
            Service { icmp: false },
        ),
        (
            "icmp4-frag-needed-vip",
            v4(ipv4(
                OTHER_V4,
                VIP_V4,
                IPPROTO_ICMP,
                &icmp(3, 4, 1400, &quoted4()[..28]),
            )),
            Service { icmp: true },
        ),
        (
            "icmp6-too-big-vip",
            v6(ipv6(
                PEER_V6,
                VIP_V6,
                IPPROTO_ICMPV6,
                &icmp(
                    2,
                    0,
                    1280,
                    &ipv6(VIP_V6, CLIENT_V6, IPPROTO_TCP, &tcp(80, 40001, ACK, b""))[..48],
                ),
            )),
            Service { icmp: true },
        ),
        (
            "icmp4-echo-vip",
            v4(ipv4(
                CLIENT_V4,
                VIP_V4,
                IPPROTO_ICMP,
                &icmp(8, 0, 1, b"ping"),
            )),
            Is(PassNotService),
        ),
        (
            // Not sent to the VIP the quoted packet came from: not lb's to forward.
            "icmp4-frag-needed-to-non-vip",
            v4(ipv4(
                CLIENT_V4,
                OTHER_V4,
                IPPROTO_ICMP,
                &icmp(3, 4, 1400, &quoted4()[..28]),
            )),
            Is(PassNotService),
        ),
        (
            "icmp6-too-big-to-node",
            v6(ipv6(
                PEER_V6,
                NODE_V6,
                IPPROTO_ICMPV6,
                &icmp(
                    2,
                    0,
                    1280,
                    &ipv6(VIP_V6, CLIENT_V6, IPPROTO_TCP, &tcp(80, 40001, ACK, b""))[..48],
                ),
            )),
            Is(PassNotService),
        ),
        (
            "icmp4-frag-needed-quoting-non-service",
            v4(ipv4(
                OTHER_V4,
                VIP_V4,
                IPPROTO_ICMP,
                &icmp(3, 4, 1400, &quoted4()[..28])
                    .iter()
                    .enumerate()
                    .map(|(i, b)| if i == 8 + 20 + 1 { 81 } else { *b })
                    .collect::<Vec<u8>>(),
            )),
            Is(PassNotService),
        ),
        (
            "tcp4-other",
            v4(tcp4(CLIENT_V4, OTHER_V4, 80, SYN)),
            Is(PassNotService),
        ),
        (
            "tcp4-vip-other-port",
            v4(tcp4(CLIENT_V4, VIP_V4, 443, SYN)),
            Is(PassNotService),
        ),
        (
            "tcp6-vip-udp-port",
            v6(tcp6(CLIENT_V6, VIP_V6, 53, SYN)),
            Is(PassNotService),
        ),
        ("arp-request", eth(0x0806, &[0u8; 28]), Is(PassNotIp)),
        ("eth-only-ipv4", eth(ETH_P_IP, &[]), Is(PassUnparsed)),
        (
            "tcp4-cut-in-ip",
            v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN))[..14 + 12].to_vec(),
            Is(PassUnparsed),
        ),
        (
            "tcp4-cut-in-tcp-vip",
            v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN))[..14 + 30].to_vec(),
            Is(DropMalformed),
        ),
        (
            "tcp4-cut-in-tcp-other",
            v4(tcp4(CLIENT_V4, OTHER_V4, 80, SYN))[..14 + 30].to_vec(),
            Is(PassNotService),
        ),
        (
            "tcp6-cut-in-ip",
            v6(tcp6(CLIENT_V6, VIP_V6, 80, SYN))[..14 + 30].to_vec(),
            Is(PassUnparsed),
        ),
        (
            "ipv6-version-4",
            {
                let mut f = v6(tcp6(CLIENT_V6, VIP_V6, 80, SYN));
                f[14] = 0x40;
                f
            },
            Is(PassUnparsed),
        ),
        (
            "tcp4-ihl-4-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                f[14] = 0x44;
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-ihl-15-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                f[14] = 0x4f;
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-doff-4-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                f[14 + 20 + 12] = 0x40;
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-first-fragment-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                f[14 + 6] = 0x20;
                f
            },
            Is(DropFragment),
        ),
        (
            "tcp4-later-fragment-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                f[14 + 6] = 0x00;
                f[14 + 7] = 0x10;
                f
            },
            Is(DropFragment),
        ),
        (
            "tcp4-fragment-other",
            {
                let mut f = v4(tcp4(CLIENT_V4, OTHER_V4, 80, SYN));
                f[14 + 6] = 0x20;
                f
            },
            Is(PassNotService),
        ),
        (
            "tcp6-fragment-header-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_FRAGMENT,
                &ext_fragment(IPPROTO_TCP, 1, &tcp(40000, 80, SYN, b"")),
            )),
            Is(DropFragment),
        ),
        (
            "tcp6-hopopts-dstopts-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_HOPOPTS,
                &ext(
                    IPPROTO_DSTOPTS,
                    0,
                    &ext(IPPROTO_TCP, 1, &tcp(40000, 80, SYN, b"")),
                ),
            )),
            Service { icmp: false },
        ),
        (
            "tcp6-routing-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_ROUTING,
                &ext(IPPROTO_TCP, 2, &tcp(40000, 80, ACK, b"")),
            )),
            Service { icmp: false },
        ),
        (
            "tcp6-four-ext-headers-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_HOPOPTS,
                &ext(
                    IPPROTO_DSTOPTS,
                    0,
                    &ext(
                        IPPROTO_ROUTING,
                        0,
                        &ext(
                            IPPROTO_DSTOPTS,
                            0,
                            &ext(IPPROTO_TCP, 0, &tcp(40000, 80, SYN, b"")),
                        ),
                    ),
                ),
            )),
            // Three are walked; the fourth is taken for the transport protocol.
            Is(PassNotService),
        ),
        (
            "tcp6-ext-header-past-limit-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_DSTOPTS,
                &ext(
                    IPPROTO_DSTOPTS,
                    127,
                    &ext(IPPROTO_TCP, 0, &tcp(40000, 80, SYN, b"")),
                ),
            )),
            // The second header starts past MAX_HEADER_OFFSET: the chain does not parse,
            // and a broken chain to a VIP is dropped.
            Is(DropMalformed),
        ),
        (
            "tcp6-dstopts-928-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_DSTOPTS,
                &ext(IPPROTO_TCP, 115, &tcp(40000, 80, ACK, b"")),
            )),
            // Forwarded; but behind the outer headers its TCP header lies past the limit,
            // so the backend drops it (see `check::RoundTrip::PastHeaderLimit`).
            Service { icmp: false },
        ),
        (
            "tcp6-ext-header-cut-vip",
            v6(ipv6(CLIENT_V6, VIP_V6, IPPROTO_ROUTING, &[])),
            Is(DropMalformed),
        ),
        (
            "tcp4-vlan-vip",
            {
                let f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                let mut v = f[..12].to_vec();
                v.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
                v.extend_from_slice(&f[12..]);
                v
            },
            Service { icmp: false },
        ),
        (
            "tcp4-qinq-vip",
            {
                let f = v4(tcp4(CLIENT_V4, VIP_V4, 80, SYN));
                let mut v = f[..12].to_vec();
                v.extend_from_slice(&[0x88, 0xa8, 0x00, 0x2a, 0x81, 0x00, 0x00, 0x07]);
                v.extend_from_slice(&f[12..]);
                v
            },
            Is(PassNotIp),
        ),
        (
            "vlan-cut",
            {
                let mut v = eth(0x8100, &[]);
                v.extend_from_slice(&[0, 0x2a]);
                v
            },
            Is(PassUnparsed),
        ),
        (
            "udp4-vip-trailing-padding",
            {
                let mut f = v4(ipv4(CLIENT_V4, VIP_V4, IPPROTO_UDP, &udp(5353, 53, b"")));
                f.extend_from_slice(&[0u8; 18]);
                f
            },
            Service { icmp: false },
        ),
        (
            "tcp4-vip-too-big",
            v4(ipv4(
                CLIENT_V4,
                VIP_V4,
                IPPROTO_TCP,
                &tcp(40000, 80, ACK, &[0u8; 1460]),
            )),
            Service { icmp: false },
        ),
        // The backend path.
        (
            "gue4-syn",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, SYN), 1, 0, hop2),
            Gue(Reasons::one(AcceptSyn)),
        ),
        (
            "gue4-ack-chain",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2),
            Gue(CHAIN),
        ),
        (
            "gue4-last-hop",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 0, 0, hop2),
            Gue(LAST),
        ),
        (
            "gue4-forward-syn",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, SYN), 1, FLAG_FORWARD_SYN, hop2),
            Gue(CHAIN),
        ),
        (
            "gue4-next-hop-self",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, v4_mapped(NODE_V4)),
            Gue(LAST),
        ),
        (
            "gue4-next-hop-other-family",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, BACKEND2_V6),
            Gue(LAST),
        ),
        (
            "gue4-udp",
            gue4_to_node(
                &ipv4(CLIENT_V4, VIP_V4, IPPROTO_UDP, &udp(5353, 53, b"q")),
                1,
                0,
                hop2,
            ),
            Gue(CHAIN),
        ),
        (
            "gue4-icmp-echo",
            gue4_to_node(
                &ipv4(CLIENT_V4, VIP_V4, IPPROTO_ICMP, &icmp(8, 0, 1, b"ping")),
                1,
                0,
                hop2,
            ),
            Gue(Reasons::one(SecondHop).with(DropFibMiss).with(DropTooBig)),
        ),
        (
            "gue4-inner6",
            gue4_to_node(&tcp6(CLIENT_V6, VIP_V6, 80, ACK), 1, 0, hop2),
            Gue(CHAIN),
        ),
        (
            "gue6-inner6",
            gue6_to_node(&tcp6(CLIENT_V6, VIP_V6, 80, ACK), 1, 0, BACKEND2_V6),
            Gue(CHAIN),
        ),
        (
            "gue6-syn-inner4",
            gue6_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, SYN), 1, 0, BACKEND2_V6),
            Gue(Reasons::one(AcceptSyn)),
        ),
        (
            "gue6-outer-dstopts",
            {
                let g = gue(&tcp6(CLIENT_V6, VIP_V6, 80, ACK), 1, 0, BACKEND2_V6);
                eth(
                    ETH_P_IPV6,
                    &ipv6(
                        PEER_V6,
                        NODE_V6,
                        IPPROTO_DSTOPTS,
                        &ext(IPPROTO_UDP, 0, &udp(50000, GUE_PORT, &g)),
                    ),
                )
            },
            Gue(CHAIN),
        ),
        (
            "gue4-outer-options",
            {
                let g = gue(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                eth(
                    ETH_P_IP,
                    &ipv4_opts(
                        PEER_V4,
                        NODE_V4,
                        IPPROTO_UDP,
                        &[1; 4],
                        &udp(50000, GUE_PORT, &g),
                    ),
                )
            },
            Gue(Reasons::one(AcceptSocket)
                .with(DropFibMiss)
                .with(DropTooBig)
                .with(DropBadGue)),
        ),
        (
            "gue4-inner-fragment",
            {
                let mut inner = tcp4(CLIENT_V4, VIP_V4, 80, SYN);
                inner[6] = 0x20;
                gue4_to_node(&inner, 1, 0, hop2)
            },
            Gue(Reasons::one(SecondHop).with(DropFibMiss).with(DropTooBig)),
        ),
        (
            "gue4-version-1",
            {
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 20 + 8] = 0x45;
                f
            },
            Is(DropBadGue),
        ),
        (
            "gue4-hops-2",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 2, 0, hop2),
            Is(DropBadGue),
        ),
        (
            "gue4-hops-255",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 255, 0, hop2),
            Is(DropBadGue),
        ),
        (
            "gue4-proto-gre",
            {
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 20 + 8 + 1] = 47;
                f
            },
            Is(DropBadGue),
        ),
        (
            "gue4-hop-list-type",
            {
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 20 + 8 + 4] = b'x';
                f
            },
            Is(DropBadGue),
        ),
        (
            "gue4-inner-proto-mismatch",
            {
                // Says IPv6 inside, carries IPv4.
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 20 + 8 + 1] = 41;
                f
            },
            Is(DropMalformed),
        ),
        (
            "gue4-cut-in-hop-list",
            cut_outer4(
                &gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2),
                14 + 20 + 8 + 10,
            ),
            Is(DropMalformed),
        ),
        (
            "gue4-cut-in-inner-tcp",
            cut_outer4(
                &gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2),
                14 + 20 + 8 + 24 + 20 + 8,
            ),
            Is(DropMalformed),
        ),
        (
            "gue4-outer-length-beyond-frame",
            gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2)
                [..14 + 20 + 8 + 24 + 20 + 8]
                .to_vec(),
            Is(PassUnparsed),
        ),
        (
            "gue4-inner-length-beyond-frame",
            {
                let mut inner = tcp4(CLIENT_V4, VIP_V4, 80, ACK);
                set_tot_len4(&mut inner, 1400);
                gue4_to_node(&inner, 1, 0, hop2)
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-length-beyond-frame-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, ACK));
                f.truncate(14 + 40);
                set_tot_len4(&mut f[14..], 1500);
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-length-below-headers-vip",
            {
                let mut f = v4(tcp4(CLIENT_V4, VIP_V4, 80, ACK));
                set_tot_len4(&mut f[14..], 21);
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp4-length-beyond-frame-other",
            {
                let mut f = v4(tcp4(CLIENT_V4, OTHER_V4, 80, ACK));
                set_tot_len4(&mut f[14..], 1500);
                f
            },
            Is(PassNotService),
        ),
        (
            "tcp6-length-beyond-frame-vip",
            {
                let mut f = v6(tcp6(CLIENT_V6, VIP_V6, 80, ACK));
                f[14 + 4..14 + 6].copy_from_slice(&1400u16.to_be_bytes());
                f
            },
            Is(DropMalformed),
        ),
        (
            "tcp6-routing-type0-segments-left-vip",
            v6(ipv6(
                CLIENT_V6,
                VIP_V6,
                IPPROTO_ROUTING,
                &routing0(IPPROTO_TCP, 1, &tcp(40000, 80, ACK, b"")),
            )),
            Is(DropMalformed),
        ),
        (
            "tcp6-routing-type0-segments-left-other",
            v6(ipv6(
                CLIENT_V6,
                CLIENT_V6,
                IPPROTO_ROUTING,
                &routing0(IPPROTO_TCP, 1, &tcp(40000, 80, ACK, b"")),
            )),
            Is(PassUnparsed),
        ),
        (
            "gue4-inner-ihl-3",
            {
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 20 + 8 + 24] = 0x43;
                f
            },
            Is(DropMalformed),
        ),
        (
            "udp4-node-other-port",
            v4(ipv4(
                PEER_V4,
                NODE_V4,
                IPPROTO_UDP,
                &udp(50000, GUE_PORT + 1, b"x"),
            )),
            Is(PassNotService),
        ),
        (
            "gue4-fragment",
            {
                let mut f = gue4_to_node(&tcp4(CLIENT_V4, VIP_V4, 80, ACK), 1, 0, hop2);
                f[14 + 6] = 0x20;
                f
            },
            Is(PassNotService),
        ),
    ];
    for (_, f, _) in &mut s {
        assert!(f.len() <= CAPACITY);
    }
    s
}

fn check_want(name: &str, c: &Class, want: Want) {
    let ok = match (want, c) {
        (Want::Is(r), Class::Decided(d)) => r == *d,
        (Want::Service { icmp }, Class::Service(f)) => f.icmp == icmp,
        (Want::Gue(rs), Class::Gue(_)) => c.reasons() == rs,
        _ => false,
    };
    assert!(ok, "{name}: got {c:?} ({:?}), want {want:?}", c.reasons());
}

#[test]
fn seeds_classify_as_the_program_decides() {
    for (name, frame, want) in seeds() {
        check_want(name, &classify(&NODE, &frame), want);
    }
}

#[test]
fn unconfigured_node_passes_everything() {
    let node = NodeView {
        configured: false,
        ..NODE
    };
    for (name, frame, _) in seeds() {
        let c = classify(&node, &frame);
        assert_eq!(c, Class::Decided(Reason::PassUnconfigured), "{name}");
    }
}

#[test]
fn icmp_errors_carry_the_quoted_flow_reversed() {
    let f = eth(
        ETH_P_IP,
        &ipv4(
            OTHER_V4,
            VIP_V4,
            IPPROTO_ICMP,
            &icmp(3, 4, 1400, &quoted4()[..28]),
        ),
    );
    let Class::Service(s) = classify(&NODE, &f) else {
        panic!("not a service flow");
    };
    // The quoted packet went VIP:80 -> client:40001; the flow is client:40001 -> VIP:80.
    assert_eq!(s.tuple.src, v4_mapped(CLIENT_V4));
    assert_eq!(s.tuple.dst, v4_mapped(VIP_V4));
    assert_eq!(
        (s.tuple.src_port, s.tuple.dst_port, s.tuple.proto),
        (40001, 80, IPPROTO_TCP)
    );
    assert!(s.icmp);
    // An echo request and a "port unreachable" are not errors lb forwards.
    for (ty, code) in [(8, 0), (3, 3)] {
        let f = eth(
            ETH_P_IP,
            &ipv4(
                OTHER_V4,
                VIP_V4,
                IPPROTO_ICMP,
                &icmp(ty, code, 0, &quoted4()[..28]),
            ),
        );
        assert_eq!(classify(&NODE, &f), Class::Decided(Reason::PassNotService));
    }
}

#[test]
fn node_without_an_address_of_a_family_takes_no_gue_of_it() {
    let node = NodeView {
        addr_v4: [0; 4],
        ..NODE
    };
    let f = gue4_to_node(
        &tcp4(CLIENT_V4, VIP_V4, 80, SYN),
        1,
        0,
        v4_mapped(BACKEND2_V4),
    );
    assert_eq!(classify(&node, &f), Class::Decided(Reason::PassNotService));
    // To 0.0.0.0 with the node at 0.0.0.0 ("none"): not GUE for it either.
    let g = gue(
        &tcp4(CLIENT_V4, VIP_V4, 80, SYN),
        1,
        0,
        v4_mapped(BACKEND2_V4),
    );
    let f = eth(
        ETH_P_IP,
        &ipv4(PEER_V4, [0; 4], IPPROTO_UDP, &udp(1, GUE_PORT, &g)),
    );
    assert_eq!(classify(&node, &f), Class::Decided(Reason::PassNotService));
}

#[test]
fn reasons_set() {
    let r = Reasons::one(Reason::DropBadGue);
    assert_eq!(r.single(), Some(Reason::DropBadGue));
    assert_eq!(r.with(Reason::PassNotIp).single(), None);
    assert_eq!(Reasons::EMPTY.single(), None);
    let all: Vec<Reason> = CHAIN.iter().collect();
    assert_eq!(all.len(), 4);
    assert!(UNTOUCHED.contains(Reason::PassUnparsed) && !UNTOUCHED.contains(Reason::DropMalformed));
}

// ---- the bounded fuzz run ---------------------------------------------------------------

/// Checks one frame's invariants and counts its outcome.
fn check_frame(frame: &[u8], stats: &mut BTreeMap<String, u64>) -> Result<(), String> {
    let (c, round_trip) = check::invariants(&NODE, frame)
        .map_err(|v| format!("{v:?}: {:?}", classify(&NODE, frame)))?;
    let label = match c {
        Class::Decided(r) => format!("{r:?}"),
        Class::Service(_) => "service".into(),
        Class::Gue(_) => "gue".into(),
    };
    *stats.entry(label).or_default() += 1;
    if let Some(rt) = round_trip {
        *stats.entry(format!("round trip {rt:?}")).or_default() += 1;
    }
    Ok(())
}

/// Seeds, then each mutated 1 to 4 times, 400 rounds per seed, plus random frames: about
/// 30,000 frames, in well under a second. The same seed every run: a failure reproduces.
#[test]
fn bounded_fuzz_run_over_the_seeds_and_their_mutations() {
    let mut rng = Rng(0x1b_5eed);
    let ports = [80u16, 53, 8080, GUE_PORT];
    let mut stats = BTreeMap::new();
    let mut frames = 0u64;
    let mut kinds: BTreeMap<Mutation, u64> = BTreeMap::new();
    for (name, seed, _) in seeds() {
        for round in 0..400 {
            let mut f = Frame::new(&seed).expect("seed fits");
            for _ in 0..1 + rng.below(4) {
                *kinds.entry(mutate(&mut rng, &mut f, &ports)).or_default() += 1;
            }
            frames += 1;
            if let Err(e) = check_frame(f.as_slice(), &mut stats) {
                panic!("{name} round {round}: {e}\nframe {:02x?}", f.as_slice());
            }
        }
    }
    for i in 0..5000 {
        let f = random_frame(&mut rng, 200);
        frames += 1;
        if let Err(e) = check_frame(f.as_slice(), &mut stats) {
            panic!("random frame {i}: {e}\nframe {:02x?}", f.as_slice());
        }
    }
    std::println!("{frames} frames; outcomes {stats:?}; mutations {kinds:?}");
    assert!(frames > 25_000);
    for m in Mutation::ALL {
        assert!(
            kinds.get(&m).copied().unwrap_or(0) > 0,
            "{m:?} never applied"
        );
    }
    for r in [
        "PassNotIp",
        "PassUnparsed",
        "PassNotService",
        "DropMalformed",
        "DropFragment",
        "DropBadGue",
        "service",
        "gue",
        "round trip Same",
        "round trip PastHeaderLimit",
    ] {
        assert!(
            stats.get(r).copied().unwrap_or(0) > 0,
            "never reached {r}: {stats:?}"
        );
    }
}

// ---- the committed seed corpus ------------------------------------------------------------

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/classify")
}

/// The committed corpus is the seeds above. `LB_WRITE_CORPUS=1 cargo test -p lb-common
/// seed_corpus` writes it anew.
#[test]
fn seed_corpus_is_committed() {
    let dir = corpus_dir();
    let write = std::env::var_os("LB_WRITE_CORPUS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("corpus dir");
    }
    for (name, frame, _) in seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &frame).expect("writing a seed");
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run with LB_WRITE_CORPUS=1", path.display()));
        assert_eq!(
            on_disk, frame,
            "{name} differs from its seed; run with LB_WRITE_CORPUS=1"
        );
    }
}
