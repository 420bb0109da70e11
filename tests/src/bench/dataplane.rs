//! Per-packet cost of lb's XDP program on each path, next to `lb_pass` (the floor).
//!
//! The program runs in a namespace of its own, the data-plane fixtures' network
//! (`tests::fixture`: a veth, a gateway with permanent neighbour entries, routes to the
//! backends, the VIPs on `lo`), configured like a node that is both an LB node and a
//! backend: three services of 100 backends each, a listener and established connections.
//! Every case is a set of frames, one flow each, that the harness cycles through.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
};

use anyhow::{bail, ensure, Context, Result};
use lb::{
    agent::nexthop,
    dataplane::{Dataplane, LoadOptions, Node},
    table::{self, Candidate},
};
use lb_common::{
    addr::{to_bytes, v4_mapped},
    hash::{bucket_index, FlowHash, FlowHashKey, FlowTuple},
    limits::DEFAULT_TABLE_BITS,
    maps::Bucket,
    proto::ETH_P_IP,
    stats::Reason,
};

use super::harness::{Harness, Target};
pub use crate::fixture::{XDP_PASS, XDP_TX};
use crate::{
    fixture::{self, install_service, packets, plan},
    link,
};

const NODE4: Ipv4Addr = plan::node_v4();
const NODE6: Ipv6Addr = plan::node_v6();
const VIP4: Ipv4Addr = plan::vip_v4();
const VIP6: Ipv6Addr = plan::vip_v6();
/// An LB node sending GUE to this one.
const LB4: Ipv4Addr = Ipv4Addr::from_octets(plan::PEER_V4);
/// A router on the way back to a client, reporting a too-small MTU.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const SEED: u32 = 0x5eed_0b07;
/// Backends of each service (of each family).
const BACKENDS: u32 = 100;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The cases, in the order they are reported.
pub const CASES: [&str; 11] = [
    "tcp_syn_vip_v4",
    "tcp_ack_vip_v4",
    "udp_vip_v4",
    "tcp_syn_vip_v6",
    "non_vip_pass_v4",
    "gue_decap_accept_v4",
    "gue_decap_last_hop_v4",
    "gue_second_hop_v4",
    "icmp_too_big_v4",
    "tcp_ack_local_v4",
    "tcp_ack_local_chained_v4",
];

/// One path through the program: its frames and what every run of them must end in.
pub struct Case {
    pub name: &'static str,
    pub frames: Vec<Vec<u8>>,
    pub verdict: u32,
    pub reason: Reason,
}

/// Measurement settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Runs per test run.
    pub repeat: u32,
    /// Test runs per figure; the median is reported.
    pub rounds: usize,
    /// Distinct flows (frames) per case.
    pub flows: usize,
    /// The node's flow hash (`node.flow_hash`).
    pub flow_hash: FlowHash,
}

/// Which cases to run: all when `only` is empty.
pub fn selected(only: &[String]) -> Vec<&'static str> {
    CASES
        .into_iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| o == c))
        .collect()
}

/// What was measured for one case. Times are medians over the rounds.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub name: &'static str,
    pub verdict: u32,
    pub reason: Reason,
    /// `lb_xdp`'s cost as if run directly: harness with `lb_xdp`, minus harness with
    /// `lb_pass`, plus the floor (median over the rounds, each round's own figures).
    pub ns_per_packet: f64,
    /// The lowest and highest round.
    pub ns_min: f64,
    pub ns_max: f64,
    /// The harness's own cost on this case's frames: harness with `lb_pass` minus floor.
    pub harness_ns: f64,
    /// For a case whose packets pass unchanged: `lb_xdp` timed directly on its first
    /// frame, without the harness.
    pub direct_ns: Option<f64>,
    /// Distinct outputs over the case's frames, and for forwarding cases distinct outer
    /// destinations (backends).
    pub distinct_outputs: usize,
    pub distinct_backends: Option<usize>,
    /// Runs checked against the counters: every one ended in `reason`.
    pub runs_checked: u64,
}

/// The whole data-plane measurement.
pub struct Measured {
    pub floor_ns: f64,
    pub cases: Vec<CaseResult>,
}

/// Measures the cases named in `names` (see [`CASES`]).
pub fn measure(s: Settings, names: &[&str]) -> Result<Measured> {
    let opts = LoadOptions {
        bucket_slots: BUCKET_SLOTS,
        pin_dir: None,
    };
    fixture::with_dataplane("bench", &opts, |dp, ifindex| {
        configure(dp, s.flow_hash)?;
        let sockets = Sockets::open(80, s.flows, |_| true)?;
        let local = Sockets::open(LOCAL_PORT, s.flows, |_| true)?;
        // Connections whose bucket this node took over from backend 0, which the bucket
        // keeps as its second hop.
        let chained_table = chained_table()?;
        let chained = Sockets::open(CHAINED_PORT, s.flows, |port| {
            let b = chained_table[chained_bucket(s.flow_hash, port)];
            b.first == LOCAL_SLOT && b.second == 0
        })?;
        let mut harness = Harness::load(dp.ebpf(), ifindex)?;
        let established = [
            &sockets.established,
            &local.established,
            &chained.established,
        ];
        let cases: Vec<Case> = cases(s.flows, established.map(Vec::as_slice))
            .into_iter()
            .filter(|c| names.contains(&c.name))
            .collect();
        ensure!(!cases.is_empty(), "no case selected");
        let unchanged = cases
            .iter()
            .map(|c| verify_frames(dp, &harness, c))
            .collect::<Result<Vec<bool>>>()?;
        run_rounds(dp, &mut harness, &cases, &unchanged, s)
    })
}

/// Per-round figures of one case.
#[derive(Clone, Default)]
struct Samples {
    net: Vec<f64>,
    harness: Vec<f64>,
    direct: Vec<f64>,
}

fn run_rounds(
    dp: &mut Dataplane,
    harness: &mut Harness,
    cases: &[Case],
    unchanged: &[bool],
    s: Settings,
) -> Result<Measured> {
    let mut floors = Vec::new();
    let mut samples = vec![Samples::default(); cases.len()];
    let mut checked = vec![0u64; cases.len()];
    let mut last_outputs: Vec<Vec<u8>> = vec![Vec::new(); cases.len()];
    for _ in 0..s.rounds {
        let frame = &cases[0].frames[0];
        let floor = harness.run_direct(dp.ebpf(), lb::ebpf::PASS_PROGRAM, frame, s.repeat)?;
        ensure!(
            floor.return_value == XDP_PASS,
            "lb_pass returned {}",
            floor.return_value
        );
        floors.push(floor.ns_per_run);
        for (i, c) in cases.iter().enumerate() {
            harness.set_frames(&c.frames)?;
            let first = &c.frames[0];
            let base = harness.run(dp.ebpf(), Target::Pass, first, s.repeat)?;
            ensure!(
                base.return_value == XDP_PASS,
                "{}: harness with lb_pass returned {}",
                c.name,
                base.return_value
            );
            let before = dp.reason_counts()?;
            let t = harness.run(dp.ebpf(), Target::Lb, first, s.repeat)?;
            let after = dp.reason_counts()?;
            check_counts(c, &before, &after, u64::from(s.repeat), &[])?;
            ensure!(
                t.return_value == c.verdict,
                "{}: verdict {}, expected {}",
                c.name,
                t.return_value,
                c.verdict
            );
            checked[i] += u64::from(s.repeat);
            last_outputs[i] = t.output;
            let x = &mut samples[i];
            x.net
                .push(t.ns_per_run - base.ns_per_run + floor.ns_per_run);
            x.harness.push(base.ns_per_run - floor.ns_per_run);
            if unchanged[i] {
                // A program that leaves the packet alone can be timed without the
                // harness too (one flow only): a check on the subtraction above.
                let d = harness.run_direct(dp.ebpf(), lb::ebpf::PROGRAM, first, s.repeat)?;
                x.direct.push(d.ns_per_run);
            }
        }
    }
    let floor_ns = median(&floors);
    let mut results = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        // The last run of a test run used frame (repeat - 1) mod frames: its output must
        // be what lb_xdp makes of that frame when run on it alone.
        let last = (s.repeat as usize - 1) % c.frames.len();
        let direct = harness.run_direct(dp.ebpf(), lb::ebpf::PROGRAM, &c.frames[last], 1)?;
        if direct.output != last_outputs[i] {
            bail!(
                "{}: the harness's last output differs from lb_xdp's own on frame {last}",
                c.name
            );
        }
        let x = &samples[i];
        let (distinct_outputs, distinct_backends) = spread(dp, harness, c)?;
        results.push(CaseResult {
            name: c.name,
            verdict: c.verdict,
            reason: c.reason,
            ns_per_packet: median(&x.net),
            ns_min: x.net.iter().copied().fold(f64::INFINITY, f64::min),
            ns_max: x.net.iter().copied().fold(0.0, f64::max),
            harness_ns: median(&x.harness),
            direct_ns: (!x.direct.is_empty()).then(|| median(&x.direct)),
            distinct_outputs,
            distinct_backends,
            runs_checked: checked[i],
        });
    }
    Ok(Measured {
        floor_ns,
        cases: results,
    })
}

/// Every run of the test run ended in the case's reason, and nothing else was counted but
/// under the reasons of `strays` (traffic that is not the benchmark's).
pub fn check_counts(
    c: &Case,
    before: &[(Reason, u64)],
    after: &[(Reason, u64)],
    runs: u64,
    strays: &[Reason],
) -> Result<()> {
    for ((r, a), (_, b)) in after.iter().zip(before) {
        if *r != c.reason && strays.contains(r) {
            continue;
        }
        let want = if *r == c.reason { runs } else { 0 };
        if a - b != want {
            bail!(
                "{}: counter {} moved by {} in {runs} runs, expected {want}",
                c.name,
                r.name(),
                a - b
            );
        }
    }
    Ok(())
}

/// Each frame alone through lb_xdp: the expected verdict and reason. Returns whether
/// every frame came out unchanged.
fn verify_frames(dp: &mut Dataplane, harness: &Harness, c: &Case) -> Result<bool> {
    let mut unchanged = true;
    for (i, f) in c.frames.iter().enumerate() {
        let before = dp.reason_counts()?;
        let t = harness.run_direct(dp.ebpf(), lb::ebpf::PROGRAM, f, 1)?;
        let after = dp.reason_counts()?;
        ensure!(
            t.return_value == c.verdict,
            "{} frame {i}: verdict {}, expected {}",
            c.name,
            t.return_value,
            c.verdict
        );
        check_counts(c, &before, &after, 1, &[]).with_context(|| format!("frame {i}"))?;
        unchanged &= t.output == *f;
    }
    Ok(unchanged)
}

/// How many distinct outputs the case's frames give, and for forwarded frames how many
/// distinct outer destinations.
fn spread(dp: &mut Dataplane, harness: &Harness, c: &Case) -> Result<(usize, Option<usize>)> {
    let mut outputs = HashSet::new();
    let mut dests = HashSet::new();
    for f in &c.frames {
        let t = harness.run_direct(dp.ebpf(), lb::ebpf::PROGRAM, f, 1)?;
        if c.verdict == XDP_TX {
            let dst = match u16::from_be_bytes([t.output[12], t.output[13]]) {
                ETH_P_IP => t.output[30..34].to_vec(),
                _ => t.output[38..54].to_vec(),
            };
            dests.insert(dst);
        }
        outputs.insert(t.output);
    }
    Ok((outputs.len(), (c.verdict == XDP_TX).then_some(dests.len())))
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

// ---- the node --------------------------------------------------------------------------

/// Node settings, backends (slots 0.. IPv4, BACKENDS.. IPv6) with their next hops as the
/// agent resolves them, and three services, each with a default-size table from the real
/// builder, as it stands after one backend was added (so some buckets have a second hop).
pub fn configure(dp: &mut Dataplane, flow_hash: FlowHash) -> Result<()> {
    dp.set_node(&Node {
        hash_seed: SEED,
        flow_hash,
        gue_port: plan::GUE_PORT,
        addr_v4: Some(NODE4),
        addr_v6: Some(NODE6),
    })?;
    let mut families: Vec<Vec<Candidate>> = Vec::new();
    let mut slots = Vec::new();
    for v6 in [false, true] {
        let mut list = Vec::new();
        for i in 0..BACKENDS {
            let (addr, slot) = if v6 {
                (IpAddr::V6(plan::backend_v6(i)), BACKENDS + i)
            } else {
                (IpAddr::V4(plan::backend_v4(i)), i)
            };
            dp.set_backend(slot, addr)?;
            slots.push((addr, slot));
            list.push(Candidate::new(addr, 1, slot));
        }
        families.push(list);
    }
    let addrs: Vec<IpAddr> = slots.iter().map(|(a, _)| *a).collect();
    let hops = link::with_netlink(|h| async move { nexthop::resolve(&h, &addrs).await })?;
    for (addr, slot) in slots {
        let hop = hops.hops.get(&addr).copied().flatten();
        let hop = hop.with_context(|| format!("no next hop resolved for backend {addr}"))?;
        dp.set_nexthop(slot, hop)?;
        dp.set_nexthop_of(addr, Some(hop))?;
    }
    // This node itself, the only backend of a fourth service: every bucket's first hop.
    dp.set_backend(LOCAL_SLOT, IpAddr::V4(NODE4))?;
    let local = vec![local_candidate()];
    let services = [
        (to_bytes(VIP4.into()), 80, TCP, &families[0]),
        (to_bytes(VIP4.into()), 53, UDP, &families[0]),
        (to_bytes(VIP6.into()), 80, TCP, &families[1]),
        (to_bytes(VIP4.into()), LOCAL_PORT, TCP, &local),
    ];
    let bits = DEFAULT_TABLE_BITS;
    for (id, (addr, port, proto, backends)) in services.into_iter().enumerate() {
        let before = match backends.len() {
            1 => None,
            n => Some(table::build(&backends[..n - 1], bits, SEED, None)?),
        };
        let buckets = table::build(backends, bits, SEED, before.as_deref())?;
        install_service(dp, (addr, port, proto), id as u32, &buckets)?;
    }
    // A fifth: this node added to backend 0, so the buckets it took over keep backend 0
    // as their second hop.
    let id = services.len() as u32;
    install_service(
        dp,
        (to_bytes(VIP4.into()), CHAINED_PORT, TCP),
        id,
        &chained_table()?,
    )?;
    Ok(())
}

/// This node's backend slot.
const LOCAL_SLOT: u32 = 2 * BACKENDS;

fn local_candidate() -> Candidate {
    Candidate::new(IpAddr::V4(NODE4), 1, LOCAL_SLOT)
}

/// The fifth service's table: backend 0, then this node added.
fn chained_table() -> Result<Vec<Bucket>> {
    let b0 = Candidate::new(IpAddr::V4(plan::backend_v4(0)), 1, 0);
    let before = table::build(&[b0], DEFAULT_TABLE_BITS, SEED, None)?;
    let after = [b0, local_candidate()];
    Ok(table::build(
        &after,
        DEFAULT_TABLE_BITS,
        SEED,
        Some(&before),
    )?)
}

/// The fifth service's bucket of the connection from VIP4:`port`.
fn chained_bucket(flow_hash: FlowHash, port: u16) -> usize {
    let tuple = FlowTuple {
        src: v4_mapped(VIP4.octets()),
        dst: v4_mapped(VIP4.octets()),
        src_port: port,
        dst_port: CHAINED_PORT,
        proto: TCP,
    };
    bucket_index(
        FlowHashKey::new(flow_hash, SEED).hash(&tuple),
        DEFAULT_TABLE_BITS,
    ) as usize
}

/// Room in `BUCKETS` for the five services' tables of `configure`.
pub const BUCKET_SLOTS: u32 = 8 << DEFAULT_TABLE_BITS;

/// The port of the service whose only backend is this node.
const LOCAL_PORT: u16 = 8080;
/// The port of the service this node was added to (`chained_table`).
const CHAINED_PORT: u16 = 8081;

/// Sockets of the backend side: a listener on VIP4:`port` and established connections
/// to it, whose client ports and next sequence numbers the decapsulation (port 80) and
/// local (`LOCAL_PORT`, `CHAINED_PORT`) cases use (a segment must fall in its socket's
/// windows).
struct Sockets {
    _listener: TcpListener,
    _conns: Vec<(TcpStream, TcpStream)>,
    established: Vec<Established>,
}

/// A client port of an established connection to a port of VIP4 and the sequence and
/// acknowledgment numbers its next segment carries.
#[derive(Clone, Copy)]
pub struct Established {
    pub port: u16,
    pub seq: u32,
    pub ack: u32,
}

impl Sockets {
    /// `n` connections whose client port `wanted` accepts (others are opened too, and
    /// kept open, but not listed).
    fn open(port: u16, n: usize, wanted: impl Fn(u16) -> bool) -> Result<Self> {
        let listener = TcpListener::bind((VIP4, port)).context("listening on the VIP")?;
        let mut conns = Vec::new();
        let mut ports = Vec::new();
        while ports.len() < n {
            ensure!(
                conns.len() < 16 * n,
                "too few wanted connections to port {port}"
            );
            let client = TcpStream::connect((VIP4, port))?;
            let (server, _) = listener.accept()?;
            let (seq, ack) = crate::fixture::next_seq_ack(&client)?;
            let client_port = client.local_addr()?.port();
            if wanted(client_port) {
                ports.push(Established {
                    port: client_port,
                    seq,
                    ack,
                });
            }
            conns.push((client, server));
        }
        Ok(Sockets {
            _listener: listener,
            _conns: conns,
            established: ports,
        })
    }
}

// ---- the cases -------------------------------------------------------------------------

/// Flow `i`'s client: 198.18.0.0/15 and 2001:db8:1::/64, and a port.
fn client4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xc612_0001 + i as u32 * 37)
}

fn client6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, (i >> 16) as u16, 1 + i as u16)
}

fn client_port(i: usize) -> u16 {
    10_000 + (i as u16).wrapping_mul(211) % 50_000
}

/// Build every case with `flows` frames; `established`, `local` and `chained` are
/// connections to VIP4:80, VIP4:`LOCAL_PORT` and VIP4:`CHAINED_PORT` on this node.
pub fn cases(flows: usize, [established, local, chained]: [&[Established]; 3]) -> Vec<Case> {
    let each = |f: &dyn Fn(usize) -> Vec<u8>| (0..flows).map(f).collect::<Vec<_>>();
    let encap = |name, frames, reason| Case {
        name,
        frames,
        verdict: XDP_TX,
        reason,
    };
    let other4 = |i: usize| Ipv4Addr::from(0xcb00_7101 + i as u32); // 203.0.113.1..
    let m = packets::TO_NODE;
    // The next segment of each connection to VIP4:`port`, delivered to the local stack.
    let delivered = |name, conns: &[Established], port| Case {
        name,
        frames: each(&|i| {
            let e = conns[i];
            packets::tcp_seq(
                m,
                (VIP4, e.port).into(),
                (VIP4, port).into(),
                (e.seq, e.ack),
                &[],
            )
        }),
        verdict: XDP_PASS,
        reason: Reason::DeliveredLocally,
    };
    // GUE from an LB node, with `hops` left: the bucket's previous owner as the next hop.
    let to_node = |i: usize, hops: u8, inner: &[u8]| {
        let port = (50_000 + i as u16, plan::GUE_PORT);
        let next_hop = plan::backend_v4(i as u32 % BACKENDS);
        packets::gue4(m, LB4, NODE4, port, (hops, next_hop), inner)
    };
    // The next segment of each connection to VIP4:80, in GUE with `hops` left.
    let established_gue = |hops: u8| {
        each(&|i| {
            let e = established[i];
            let inner = packets::tcp_seq(
                m,
                (VIP4, e.port).into(),
                (VIP4, 80).into(),
                (e.seq, e.ack),
                &[],
            );
            to_node(i, hops, &inner)
        })
    };
    vec![
        encap(
            CASES[0],
            each(&|i| packets::tcp(m, (client4(i), VIP4), (client_port(i), 80), true, &[])),
            Reason::Encapsulated,
        ),
        encap(
            CASES[1],
            each(&|i| packets::tcp(m, (client4(i), VIP4), (client_port(i), 80), false, &[])),
            Reason::Encapsulated,
        ),
        encap(
            CASES[2],
            each(&|i| {
                packets::udp(
                    m,
                    (client4(i), client_port(i)).into(),
                    (VIP4, 53).into(),
                    &[0x5a; 32],
                )
            }),
            Reason::Encapsulated,
        ),
        encap(
            CASES[3],
            each(&|i| packets::tcp(m, (client6(i), VIP6), (client_port(i), 80), true, &[])),
            Reason::Encapsulated,
        ),
        Case {
            name: CASES[4],
            frames: each(&|i| {
                packets::tcp(
                    m,
                    (client4(i), other4(i)),
                    (client_port(i), 443),
                    false,
                    &[],
                )
            }),
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
        },
        Case {
            name: CASES[5],
            frames: established_gue(1),
            verdict: XDP_PASS,
            reason: Reason::AcceptSocket,
        },
        Case {
            name: CASES[6],
            frames: established_gue(0),
            verdict: XDP_PASS,
            reason: Reason::AcceptLastHop,
        },
        encap(
            CASES[7],
            each(&|i| {
                let inner = packets::tcp(m, (client4(i), VIP4), (client_port(i), 80), false, &[]);
                to_node(i, 1, &inner)
            }),
            Reason::SecondHop,
        ),
        encap(
            CASES[8],
            each(&|i| {
                let sent = packets::tcp(m, (VIP4, client4(i)), (80, client_port(i)), false, &[]);
                packets::icmp4_frag_needed(m, ROUTER4, VIP4, &sent)
            }),
            Reason::IcmpForwarded,
        ),
        delivered(CASES[9], local, LOCAL_PORT),
        delivered(CASES[10], chained, CHAINED_PORT),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_distinct_and_fit_the_harness() {
        let ports: Vec<Established> = (0..256)
            .map(|i| Established {
                port: 30_000 + i,
                seq: 1,
                ack: 2,
            })
            .collect();
        for c in cases(256, [&ports, &ports, &ports]) {
            let distinct: HashSet<&Vec<u8>> = c.frames.iter().collect();
            assert_eq!(distinct.len(), 256, "{}", c.name);
            assert!(
                c.frames
                    .iter()
                    .all(|f| f.len() <= super::super::harness::FRAME_MAX),
                "{}",
                c.name
            );
        }
    }
}
