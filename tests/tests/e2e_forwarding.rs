//! Real TCP and UDP through the load balancer: a client connects to the VIP, the LB node's
//! XDP program encapsulates to a backend, the backend's XDP program decapsulates, and the
//! backend's stack answers the client directly (the reply does not pass the LB node).
//! The maps are written directly here; the agent's own tests drive them through `lb`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb::dataplane::{Dataplane, LoadOptions, Node as DpNode};
use lb_common::{
    addr,
    encap::DEFAULT_GUE_PORT,
    maps::{Bucket, NO_BACKEND},
    stats::Reason,
};
use tests::{
    can_run, fixture::install_service, udp_request, Node, Spec, TcpConn, TcpServer, Topology,
    UdpServer,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const BITS: u32 = 8;

/// Loads and attaches the program on `node`, configured as a node with its own
/// addresses. bpf_fib_lookup needs forwarding on.
fn attach(node: &Node) -> Dataplane {
    node.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ])
    .unwrap();
    let mut dp = Dataplane::load(&LoadOptions::default()).unwrap();
    dp.set_node(&DpNode {
        hash_seed: 7,
        flow_hash: Default::default(),
        gue_port: DEFAULT_GUE_PORT,
        addr_v4: Some(node.v4),
        addr_v6: Some(node.v6),
    })
    .unwrap();
    node.attach(dp.program()).unwrap();
    dp
}

/// Services on every VIP of the topology for `port` over TCP and UDP, buckets dealt to
/// the backends in turn, no second hops.
fn add_services(dp: &mut Dataplane, topo: &Topology, port: u16) {
    let n = topo.backends.len() as u32;
    for (i, b) in topo.backends.iter().enumerate() {
        dp.set_backend(i as u32, b.v4.into()).unwrap();
        dp.set_backend(n + i as u32, b.v6.into()).unwrap();
    }
    let vips: Vec<IpAddr> = topo
        .vips_v4()
        .map(IpAddr::from)
        .chain(topo.vips_v6().map(IpAddr::from))
        .collect();
    let mut id = 0;
    for vip in vips {
        // IPv4 VIPs go to the backends' IPv4 addresses, IPv6 VIPs to their IPv6 ones.
        let base = if vip.is_ipv4() { 0 } else { n };
        for proto in [6u8, 17] {
            let table: Vec<Bucket> = (0..1u32 << BITS)
                .map(|b| Bucket {
                    first: base + b % n,
                    second: NO_BACKEND,
                })
                .collect();
            install_service(dp, (addr::to_bytes(vip), port, proto), id, &table).unwrap();
            id += 1;
        }
    }
}

fn count(dp: &mut Dataplane, r: Reason) -> u64 {
    dp.reason_counts()
        .unwrap()
        .into_iter()
        .find(|(x, _)| *x == r)
        .unwrap()
        .1
}

#[test]
fn tcp_and_udp_reach_backends_through_the_lb() {
    if !can_run("tcp_and_udp_reach_backends_through_the_lb") {
        return;
    }
    let topo = Topology::build(Spec::new(1, 1, 2)).unwrap();
    let mut lb = attach(&topo.lbs[0]);
    add_services(&mut lb, &topo, 80);
    let mut backends: Vec<Dataplane> = topo.backends.iter().map(attach).collect();
    let vips: Vec<IpAddr> = vec![topo.vip_v4().into(), topo.vip_v6().into()];
    let mut tcp_servers = Vec::new();
    let mut udp_servers = Vec::new();
    for b in &topo.backends {
        let addrs: Vec<SocketAddr> = vips.iter().map(|v| SocketAddr::new(*v, 80)).collect();
        tcp_servers.push(TcpServer::start(&b.ns, &b.name, &addrs).unwrap());
        udp_servers.push(UdpServer::start(&b.ns, &b.name, &addrs).unwrap());
    }

    let client = &topo.clients[0];
    let mut seen = std::collections::BTreeMap::new();
    for vip in &vips {
        for _ in 0..16 {
            let mut conn = TcpConn::connect(client, SocketAddr::new(*vip, 80), TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP to {vip} through the LB: {e:#}"));
            conn.echo(b"through the load balancer").unwrap();
            *seen.entry(conn.server.clone()).or_insert(0) += 1;
        }
        for _ in 0..16 {
            let name = udp_request(client, SocketAddr::new(*vip, 80), b"udp via lb", TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP to {vip} through the LB: {e:#}"));
            *seen.entry(format!("{name}/udp")).or_insert(0) += 1;
        }
    }
    println!("answers per backend: {seen:?}");
    for b in &topo.backends {
        assert!(
            seen.contains_key(&b.name),
            "no TCP connection reached {}",
            b.name
        );
        assert!(
            seen.contains_key(&format!("{}/udp", b.name)),
            "no UDP reached {}",
            b.name
        );
    }
    let encapsulated = count(&mut lb, Reason::Encapsulated);
    assert!(encapsulated >= 64, "LB encapsulated {encapsulated} packets");
    for (b, dp) in topo.backends.iter().zip(backends.iter_mut()) {
        let syn = count(dp, Reason::AcceptSyn);
        let last = count(dp, Reason::AcceptLastHop);
        assert!(syn >= 1, "{} accepted {syn} SYNs", b.name);
        assert!(last >= 1, "{} accepted {last} packets without hops", b.name);
        // The backend's replies go straight to the client: the LB node never sees
        // traffic from the VIP.
    }
    let passed = count(&mut lb, Reason::PassNotService);
    assert!(
        passed < 8,
        "the LB node passed {passed} packets not for a service: replies went through it?"
    );
}
