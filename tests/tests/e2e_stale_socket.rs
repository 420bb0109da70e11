//! A socket left over from an earlier connection must not take a new connection's
//! packets. Connection C1 from client port P lives on backend b1; b1 fails its health
//! check, so C1's next segment reaches b0, which resets it, while b1 keeps an
//! ESTABLISHED socket for C1. C2, a new connection from the same port P, lands on b0.
//! When b1 passes its checks again, its buckets come back with b0 as their second hop:
//! C2's segments reach b1 first, whose stale socket must let them go on to b0 (their
//! sequence numbers are outside its windows), so C2 keeps working.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_common::{addr, hash::FlowTuple, proto::IPPROTO_TCP};
use tests::{
    can_run,
    churn::{Lab, LabPlan, LabService},
    Netns, TcpConn,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const HEALTH_WAIT: Duration = Duration::from_secs(15);

fn tuple(client: SocketAddr, svc: &LabService) -> FlowTuple {
    FlowTuple {
        src: addr::to_bytes(client.ip()),
        dst: addr::to_bytes(svc.vip),
        src_port: client.port(),
        dst_port: svc.port,
        proto: IPPROTO_TCP,
    }
}

/// Whether `ns` has an ESTABLISHED TCP socket whose peer is `peer`.
fn established_to(ns: &Netns, peer: SocketAddr) -> Result<bool> {
    let out = ns.exec(&[
        "ss",
        "-Htn",
        "state",
        "established",
        "dst",
        &peer.to_string(),
    ])?;
    Ok(!out.trim().is_empty())
}

#[test]
fn a_stale_socket_does_not_steal_a_new_connection() {
    if !can_run("a_stale_socket_does_not_steal_a_new_connection") {
        return;
    }
    let lab = Lab::start(LabPlan {
        clients: 1,
        lbs: 1,
        backends: 2,
        weights: vec![100, 100],
        interval_ms: 200,
        fall: 2,
        table_bits: 8,
        ipv6: false,
        unimog: false,
    })
    .expect("starting the lab");
    if let Err(e) = stale_socket_sequence(lab) {
        panic!("{e:#}");
    }
}

fn stale_socket_sequence(mut lab: Lab) -> Result<()> {
    for b in ["b0", "b1"] {
        lab.wait_health(b, "up", HEALTH_WAIT)?;
    }
    let web = lab.service("web").clone();
    let b0: IpAddr = web.backend_addr(lab.backend("b0"));
    let b1: IpAddr = web.backend_addr(lab.backend("b1"));
    let client_ip = lab.topo.clients[0].addr(false);
    let table = lab.table(0, &web)?;
    let port = (40_000..60_000u16)
        .find(|p| table.hops(&tuple(SocketAddr::new(client_ip, *p), &web)).0 == Some(b1))
        .context("no client port whose bucket b1 owns")?;
    let local = SocketAddr::new(client_ip, port);

    // C1 on b1.
    let mut c1 = TcpConn::connect_from(&lab.topo.clients[0], local, web.dst(), TIMEOUT)?;
    ensure!(c1.server == "b1", "C1 landed on {}, not b1", c1.server);
    c1.echo(b"c1 first line\n")?;

    // b1 fails: C1's next segment reaches b0, which resets it; b1 keeps its socket.
    lab.fail_health("b1");
    lab.wait_health("b1", "down", HEALTH_WAIT)?;
    if c1.echo(b"c1 after the failure\n").is_ok() {
        bail!("C1 still works after b1 failed: the stale-socket sequence cannot be set up");
    }
    drop(c1);
    ensure!(
        established_to(lab.backend("b1"), local)?,
        "b1 has no ESTABLISHED socket for {local} left"
    );

    // C2 from the same port, on b0.
    let mut c2 = TcpConn::connect_from(&lab.topo.clients[0], local, web.dst(), TIMEOUT)?;
    ensure!(c2.server == "b0", "C2 landed on {}, not b0", c2.server);
    c2.echo(b"c2 first line\n")?;

    // b1 comes back: the bucket is b1's again, b0 its second hop, and b1 still holds
    // the stale socket for C1's (and C2's) ports.
    lab.restore_health("b1")?;
    lab.wait_health("b1", "up", HEALTH_WAIT)?;
    let hops = lab.table(0, &web)?.hops(&tuple(local, &web));
    ensure!(
        hops == (Some(b1), Some(b0)),
        "bucket of {local} has hops {hops:?}, expected b1 then b0"
    );
    ensure!(
        established_to(lab.backend("b1"), local)?,
        "b1's stale socket for {local} is gone: the test would prove nothing"
    );
    for i in 1..=3 {
        c2.echo(format!("c2 line {i} after b1 came back\n").as_bytes())
            .with_context(|| {
                format!(
                    "C2 line {i} after b1 came back\n  backend paths:\n    {}",
                    lab.backend_paths().join("\n    ")
                )
            })?;
    }
    println!("C2 ({local}) kept working past b1's stale socket: 3 of 3 lines echoed");
    Ok(())
}
