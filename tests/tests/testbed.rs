//! The test bed itself: the network it builds works (both families, TCP and UDP, MTUs,
//! ECMP routes, static neighbours, checksum offload off) and leaves nothing behind.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    can_run, link, tcp_request, udp_request, Netns, Role, Spec, TcpServer, Topology, UdpServer,
};

const T: Duration = Duration::from_secs(5);

/// Everything of `names` that is still visible from the root namespace.
fn leftovers(names: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for n in names {
        if Path::new("/run/netns").join(n).exists() {
            left.push(format!("/run/netns/{n}"));
        }
        if listed.split_whitespace().any(|w| w == n) {
            left.push(format!("ip netns list: {n}"));
        }
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        if line.contains("lbt-") {
            left.push(format!("ip link: {line}"));
        }
    }
    left
}

#[test]
fn clients_reach_backends_over_both_families() {
    if !can_run("clients_reach_backends_over_both_families") {
        return;
    }
    let topo = Topology::build(Spec::new(1, 1, 2).router_pass(false)).unwrap();
    let c = &topo.clients[0];
    let mut servers = Vec::new();
    for b in &topo.backends {
        let any: SocketAddr = "[::]:8080".parse().unwrap();
        servers.push(TcpServer::start(b, &b.name, &[any]).unwrap());
    }
    for b in &topo.backends {
        for dst in b.sockaddrs(8080) {
            assert_eq!(tcp_request(c, dst, T).unwrap(), b.name, "TCP to {dst}");
        }
    }
    assert_eq!(servers[0].accepted(), 2);
    assert_eq!(servers[1].accepted(), 2);

    let udp: Vec<_> = topo
        .backends
        .iter()
        .map(|b| UdpServer::start(b, &b.name, &topo.backend_sockaddrs(b, 5353)).unwrap())
        .collect();
    for b in &topo.backends {
        for dst in b.sockaddrs(5353) {
            assert_eq!(
                udp_request(c, dst, b"ping", T).unwrap(),
                b.name,
                "UDP to {dst}"
            );
        }
    }
    assert_eq!(udp[1].received(), 2);
}

#[test]
fn links_are_configured_as_described() {
    if !can_run("links_are_configured_as_described") {
        return;
    }
    let spec = Spec::new(1, 2, 1)
        .link_mtu(Role::Backend, 0, 1400)
        .router_pass(false);
    let topo = Topology::build(spec).unwrap();

    let b = &topo.backends[0];
    let out = b.exec(&["ip", "-o", "link", "show", "eth0"]).unwrap();
    assert!(out.contains("mtu 1400"), "{out}");
    let out = topo
        .router
        .exec(&["ip", "-o", "link", "show", "b0"])
        .unwrap();
    assert!(out.contains("mtu 1400"), "{out}");
    let out = topo.clients[0]
        .exec(&["ip", "-o", "link", "show", "eth0"])
        .unwrap();
    assert!(out.contains("mtu 1500"), "{out}");

    // VIPs on the backend's lo.
    let out = b.exec(&["ip", "addr", "show", "lo"]).unwrap();
    assert!(out.contains(&format!("{}/32", topo.vip_v4())), "{out}");
    assert!(out.contains(&format!("{}/128", topo.vip_v6())), "{out}");

    // ECMP through both LB nodes, both families, hashed by L4.
    for (flag, vip) in [
        ("-4", topo.vip_v4().to_string()),
        ("-6", topo.vip_v6().to_string()),
    ] {
        let out = topo
            .router
            .exec(&["ip", flag, "route", "show", &vip])
            .unwrap();
        assert_eq!(out.matches("nexthop via").count(), 2, "{out}");
    }
    topo.router
        .run(|| {
            assert_eq!(link::sysctl_get("net/ipv4/fib_multipath_hash_policy")?, "1");
            assert_eq!(link::sysctl_get("net/ipv6/fib_multipath_hash_policy")?, "1");
            assert_eq!(link::sysctl_get("net/ipv4/ip_forward")?, "1");
            for n in topo.nodes() {
                assert!(!link::tx_checksum(&n.router_ifname)?, "{}", n.router_ifname);
            }
            Ok(())
        })
        .unwrap();

    // LB nodes forward (bpf_fib_lookup needs it) and blackhole what they pass to a VIP.
    let lb = &topo.lbs[0];
    let out = lb
        .exec(&["ip", "-4", "route", "show", "type", "blackhole"])
        .unwrap();
    assert!(out.contains(&topo.vip_v4().to_string()), "{out}");
    let out = lb
        .exec(&["ip", "-6", "route", "show", "type", "blackhole"])
        .unwrap();
    assert!(out.contains(&topo.vip_v6().to_string()), "{out}");
    lb.run(|| {
        assert_eq!(link::sysctl_get("net/ipv4/conf/eth0/forwarding")?, "1");
        assert_eq!(link::sysctl_get("net/ipv6/conf/eth0/forwarding")?, "1");
        Ok(())
    })
    .unwrap();

    // Permanent neighbours both ways.
    let out = topo
        .router
        .exec(&["ip", "neigh", "show", "dev", "lb1"])
        .unwrap();
    assert_eq!(out.matches("PERMANENT").count(), 2, "{out}");
    for n in topo.nodes() {
        let out = n.exec(&["ip", "neigh", "show", "dev", "eth0"]).unwrap();
        assert_eq!(out.matches("PERMANENT").count(), 2, "{}: {out}", n.name);
        n.run(|| {
            assert!(!link::tx_checksum("eth0")?);
            assert_eq!(link::sysctl_get("net/ipv4/conf/eth0/rp_filter")?, "0");
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn dropping_a_topology_removes_everything() {
    if !can_run("dropping_a_topology_removes_everything") {
        return;
    }
    let topo = Topology::build(Spec::new(2, 2, 2)).unwrap();
    let names = topo.namespaces();
    assert_eq!(names.len(), 7);
    assert!(
        leftovers(&names).len() >= 7,
        "namespaces are visible while up"
    );
    let child = topo.backends[1]
        .spawn(Command::new("sleep").arg("600").stdout(Stdio::null()))
        .unwrap();
    let pid = child.id();
    // Detached from the guard: the namespace's own cleanup must end it.
    let mut child = child.into_inner();
    drop(topo);
    assert_eq!(leftovers(&names), Vec::<String>::new());
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep {pid} was killed");
}

#[test]
fn a_panicking_test_removes_everything() {
    if !can_run("a_panicking_test_removes_everything") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let topo = Topology::build(Spec::new(1, 1, 1)).unwrap();
        tx.send(topo.namespaces()).unwrap();
        panic!("on purpose");
    })
    .join();
    assert!(result.is_err());
    let names = rx.recv().unwrap();
    assert_eq!(leftovers(&names), Vec::<String>::new());
}

#[test]
fn sweep_removes_leftovers() {
    if !can_run("sweep_removes_leftovers") {
        return;
    }
    // A run that died: its namespaces kept, a process still inside.
    let id = format!("{}-sweep", std::process::id());
    let topo = Topology::build_with_id(&id, Spec::new(1, 0, 1).router_pass(false)).unwrap();
    let names = topo.namespaces();
    let child = topo.clients[0]
        .spawn(Command::new("sleep").arg("600"))
        .unwrap()
        .into_inner();
    topo.keep();
    assert_eq!(leftovers(&names).len(), names.len() * 2);

    let prefix = format!("{id}-");
    let swept = tests::sweep(|rest| rest.starts_with(&prefix)).unwrap();
    assert_eq!(swept.namespaces.len(), names.len());
    assert_eq!(leftovers(&names), Vec::<String>::new());
    let mut child = child;
    assert!(!child.wait().unwrap().success());
    // Nothing else was touched: opening one of ours fails now.
    assert!(Netns::open(&names[0]).is_err());
}
