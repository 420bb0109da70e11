//! The agent's next hops follow the network while connections run: a backend's neighbour
//! changes its MAC, then the backend's route moves to another interface (whose neighbour
//! nobody has resolved yet). Each time the data plane's entry must follow within 1 s and
//! no connection may break.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    addr,
    maps::{names, NextHopEntry, NEXTHOP_VALID},
};
use serde_json::json;
use tests::{
    agent::{node_config, remove_run_dir, Agent},
    can_run, link, tcp_request, Role, Spec, TcpConn, TcpServer, Topology,
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// How soon the data plane must follow a change.
const FOLLOW: Duration = Duration::from_secs(1);
const CONNS: usize = 8;

/// The valid entry of `addr` in the agent's pinned `NEXTHOPS_BY_ADDR`.
fn entry(pin_dir: &Path, addr: IpAddr) -> Option<NextHopEntry> {
    let data = MapData::from_pin(pin_dir.join("maps").join(names::NEXTHOPS_BY_ADDR)).ok()?;
    let m: HashMap<MapData, [u8; 16], NextHopEntry> = HashMap::try_from(Map::HashMap(data)).ok()?;
    m.get(&addr::to_bytes(addr), 0)
        .ok()
        .filter(|e| e.flags & NEXTHOP_VALID != 0)
}

/// Waits until the entry of `addr` is `want` (interface, MAC); returns how long it took.
fn wait_for(pin_dir: &Path, addr: IpAddr, want: (u32, [u8; 6])) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let e = entry(pin_dir, addr);
        if e.is_some_and(|e| (e.ifindex, e.dmac) == want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > TIMEOUT {
            bail!("next hop of {addr} is {e:?} after {TIMEOUT:?}, want {want:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Echoes on every connection until `stop`; returns the connections, or the first
/// connection that broke.
fn keep_talking(
    mut conns: Vec<TcpConn>,
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<Vec<TcpConn>>> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (i, c) in conns.iter_mut().enumerate() {
                c.echo(b"ping\n")
                    .with_context(|| format!("connection {i} to {} broke", c.server))?;
                echoes.fetch_add(1, Ordering::Relaxed);
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(conns)
    })
}

/// Packets received by the router's interface `ifname` (`/proc/net/dev` of the router's
/// namespace: sysfs would show the test's own).
fn rx_packets(topo: &Topology, ifname: &str) -> Result<u64> {
    let dev = topo
        .router
        .run(|| Ok(std::fs::read_to_string("/proc/thread-self/net/dev")?))?;
    dev.lines()
        .find_map(|l| {
            let (name, counters) = l.split_once(':')?;
            (name.trim() == ifname).then(|| counters.split_whitespace().nth(1)?.parse().ok())?
        })
        .with_context(|| format!("no counters of {ifname} in /proc/net/dev"))
}

#[test]
fn next_hops_follow_mac_and_route_changes_without_breaking_connections() {
    if !can_run("next_hops_follow_mac_and_route_changes_without_breaking_connections") {
        return;
    }
    let mut topo = Topology::build(Spec::new(1, 1, 1)).unwrap();
    let second = topo.add_second_link(Role::Lb, 0).unwrap();
    let id = topo.id.clone();
    let result = run(&topo, &second);
    remove_run_dir(&id);
    result.unwrap();
}

fn run(topo: &Topology, second: &tests::SecondLink) -> Result<()> {
    let (lb, b) = (&topo.lbs[0], &topo.backends[0]);
    let backend: IpAddr = b.v4.into();
    let any: SocketAddr = "[::]:80".parse()?;
    let _server = TcpServer::start(b, &b.name, &[any])?;
    let _backend_agent = Agent::start(&topo.id, b, json!({ "node": node_config(b) }))?;
    let service = json!({ "name": "web", "vip": topo.vip_v4(), "port": 80, "protocol": "tcp",
                          "table_bits": 8, "backends": [{ "address": backend, "weight": 1 }] });
    let agent = Agent::start(
        &topo.id,
        lb,
        json!({ "node": node_config(lb), "services": [service] }),
    )?;
    let pin_dir = agent.pin_dir.clone();
    let eth0 = lb.run(|| link::if_index(&lb.ifname))?;
    let eth1 = lb.run(|| link::if_index(&second.ifname))?;
    wait_for(&pin_dir, backend, (eth0, lb.router_mac)).context("at start")?;

    let vip = SocketAddr::new(topo.vip_v4().into(), 80);
    let conns = (0..CONNS)
        .map(|_| TcpConn::connect(&topo.clients[0], vip, TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let talker = keep_talking(conns, stop.clone(), echoes.clone());
    let echoes_after = |from: u64| -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while echoes.load(Ordering::Relaxed) < from + 2 * CONNS as u64 {
            if Instant::now() > deadline || talker.is_finished() {
                bail!("the connections stopped echoing");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    echoes_after(0)?;

    // 1. The gateway's MAC changes (its interface gets a new address, the node learns it).
    let new_mac = [0x02, 0, 0, 0x99, 0, 0x01];
    let mac = link::fmt_mac(&new_mac);
    topo.router.exec(&[
        "ip",
        "link",
        "set",
        "dev",
        &lb.router_ifname,
        "address",
        &mac,
    ])?;
    for gw in [lb.router_v4.to_string(), lb.router_v6.to_string()] {
        lb.exec(&[
            "ip",
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            &lb.ifname,
            "nud",
            "permanent",
        ])?;
    }
    let took = wait_for(&pin_dir, backend, (eth0, new_mac)).context("after the MAC change")?;
    println!("new MAC followed in {took:?}");
    if took > FOLLOW {
        bail!("the next hop followed the MAC change in {took:?}, more than {FOLLOW:?}");
    }
    echoes_after(echoes.load(Ordering::Relaxed))?;

    // 2. The backend's route moves to the second link; its gateway there is unresolved.
    let rx_before = rx_packets(topo, &second.router_ifname)?;
    let prefix = format!("{backend}/32");
    let via = second.router_v4.to_string();
    lb.exec(&[
        "ip",
        "route",
        "replace",
        &prefix,
        "via",
        &via,
        "dev",
        &second.ifname,
    ])?;
    let took =
        wait_for(&pin_dir, backend, (eth1, second.router_mac)).context("after the route moved")?;
    println!("route move followed in {took:?}");
    if took > FOLLOW {
        bail!("the next hop followed the route move in {took:?}, more than {FOLLOW:?}");
    }
    echoes_after(echoes.load(Ordering::Relaxed))?;
    let who = tcp_request(&topo.clients[0], vip, TIMEOUT).context("a new connection")?;
    if who != b.name {
        bail!("a new connection reached {who}");
    }
    let rx = rx_packets(topo, &second.router_ifname)? - rx_before;
    if rx < 2 * CONNS as u64 {
        bail!("only {rx} packets arrived by the second link");
    }

    stop.store(true, Ordering::Relaxed);
    let conns = talker.join().expect("talker thread")?;
    println!(
        "{} connections, {} echoes, none broke; {rx} packets by the second link",
        conns.len(),
        echoes.load(Ordering::Relaxed)
    );
    Ok(())
}
