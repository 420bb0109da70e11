//! lb's XDP program, attached in native mode in a load-balancer namespace, sees the
//! packets clients send to a VIP. Only the total of its reason counters is checked: which
//! reason a packet ends in is the data plane's business, tested elsewhere.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tests::{can_run, udp_send, ReasonCounts, Spec, Topology, XdpProgram};

/// veth runs XDP in NAPI (softirq), so counters may trail the send by a moment.
fn wait_for(prog: &XdpProgram, before: &ReasonCounts, at_least: u64) -> ReasonCounts {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let delta = prog.reasons().unwrap().since(before);
        if delta.total() >= at_least || Instant::now() > deadline {
            return delta;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lb_program_counts_packets_from_a_client() {
    if !can_run("lb_program_counts_packets_from_a_client") {
        return;
    }
    let topo = Topology::build(Spec::new(1, 1, 1)).unwrap();
    let lb = topo.lbs[0].attach_lb().unwrap();
    let out = topo.lbs[0]
        .exec(&["ip", "-d", "link", "show", "eth0"])
        .unwrap();
    assert!(out.contains("xdp "), "native XDP on the LB node: {out}");
    let out = topo
        .router
        .exec(&["ip", "-d", "link", "show", "lb0"])
        .unwrap();
    assert!(out.contains("xdp "), "lb_pass on the router's end: {out}");

    const N: usize = 20;
    for vip in [IpAddr::from(topo.vip_v4()), topo.vip_v6().into()] {
        let before = lb.reasons().unwrap();
        udp_send(&topo.clients[0], SocketAddr::new(vip, 7777), b"smoke", N).unwrap();
        let delta = wait_for(&lb, &before, N as u64);
        assert!(
            delta.total() >= N as u64,
            "sent {N} packets to {vip}, the program counted {} ({delta})",
            delta.total()
        );
    }
}

#[test]
fn ecmp_spreads_flows_over_lb_nodes() {
    if !can_run("ecmp_spreads_flows_over_lb_nodes") {
        return;
    }
    let topo = Topology::build(Spec::new(1, 2, 1)).unwrap();
    let progs: Vec<_> = topo.lbs.iter().map(|n| n.attach_lb().unwrap()).collect();
    let before: Vec<_> = progs.iter().map(|p| p.reasons().unwrap()).collect();

    // With L4 hashing, 64 flows all landing on one of two nodes has odds 2^-63.
    const FLOWS: usize = 64;
    let vip = SocketAddr::new(topo.vip_v4().into(), 7777);
    udp_send(&topo.clients[0], vip, b"ecmp", FLOWS).unwrap();
    let vip6 = SocketAddr::new(topo.vip_v6().into(), 7777);
    udp_send(&topo.clients[0], vip6, b"ecmp", FLOWS).unwrap();

    let deadline = Instant::now() + Duration::from_secs(3);
    let deltas = loop {
        let d: Vec<u64> = progs
            .iter()
            .zip(&before)
            .map(|(p, b)| p.reasons().unwrap().since(b).total())
            .collect();
        if d.iter().sum::<u64>() >= 2 * FLOWS as u64 || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(deltas.iter().sum::<u64>() >= 2 * FLOWS as u64, "{deltas:?}");
    assert!(
        deltas.iter().all(|&d| d > 0),
        "every LB node gets flows: {deltas:?}"
    );
}
