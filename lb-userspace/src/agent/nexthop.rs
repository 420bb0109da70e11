//! Next hops resolved ahead of the packets. For every backend address the agent asks the
//! kernel where a packet to it leaves (route: egress interface, gateway, MTU; neighbour:
//! the gateway's MAC; link: the interface's MAC and MTU) and hands the result to the
//! agent, which writes it into `NEXTHOPS` (by backend slot) and `NEXTHOPS_BY_ADDR`. The
//! XDP program then forwards with one array read instead of a `bpf_fib_lookup` per packet.
//!
//! The answers are kept true by subscribing to the kernel's link, neighbour and route
//! events: any of them triggers a new resolution (debounced), and a periodic one catches
//! what no event announces. XDP traffic never touches the neighbour table, so the kernel
//! would neither resolve a missing neighbour nor confirm a stale one on its own: both are
//! asked for here (`NTF_USE`, as `ip neigh replace ... use` does).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use lb_common::maps::{NextHopEntry, NEXTHOP_VALID};
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMetric, RouteType},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Resolved next hops by address; `None`: not resolvable now (no route, neighbour not
/// resolved), so the data plane falls back to `bpf_fib_lookup`.
pub type NextHops = BTreeMap<IpAddr, Option<NextHopEntry>>;

/// Events closer together than this are handled by one resolution.
const DEBOUNCE: Duration = Duration::from_millis(5);
/// A resolution even without events (a neighbour that went stale, say).
const REFRESH: Duration = Duration::from_secs(5);
/// A neighbour is asked to resolve at most this often.
const ASK_EVERY: Duration = Duration::from_secs(1);

/// The result of one resolution pass.
#[derive(Debug, Default)]
pub struct Resolution {
    pub hops: NextHops,
    /// Neighbours (interface, address) that should be made to resolve or be confirmed.
    pub to_resolve: Vec<(u32, IpAddr)>,
}

struct Neighbour {
    state: NeighbourState,
    mac: Option<[u8; 6]>,
}

struct Link {
    mac: Option<[u8; 6]>,
    mtu: u32,
}

/// Resolves every address of `addrs` once, in the calling thread's network namespace.
pub async fn resolve(handle: &Handle, addrs: &[IpAddr]) -> Result<Resolution> {
    let links = links(handle).await?;
    let neighbours = neighbours(handle).await?;
    let mut out = Resolution::default();
    for &addr in addrs {
        let hop = match route(handle, addr).await? {
            None => None,
            Some(r) => {
                let key = (r.oif, r.gateway.unwrap_or(addr));
                let n = neighbours.get(&key);
                let usable = n.is_some_and(|n| {
                    matches!(
                        n.state,
                        NeighbourState::Reachable
                            | NeighbourState::Stale
                            | NeighbourState::Delay
                            | NeighbourState::Probe
                            | NeighbourState::Permanent
                            | NeighbourState::Noarp
                    )
                });
                // A stale entry still holds a MAC, but only traffic through the stack
                // would have the kernel confirm it.
                if !usable || n.is_some_and(|n| n.state == NeighbourState::Stale) {
                    out.to_resolve.push(key);
                }
                let link = links.get(&r.oif);
                match (usable, n.and_then(|n| n.mac), link.and_then(|l| l.mac)) {
                    (true, Some(dmac), Some(smac)) => {
                        let link_mtu = link.map_or(0, |l| l.mtu);
                        let mtu = r.mtu.filter(|m| *m > 0).unwrap_or(link_mtu).min(link_mtu);
                        Some(NextHopEntry {
                            ifindex: r.oif,
                            mtu: mtu.min(u32::from(u16::MAX)) as u16,
                            flags: NEXTHOP_VALID,
                            dmac,
                            smac,
                        })
                    }
                    _ => None,
                }
            }
        };
        out.hops.insert(addr, hop);
    }
    out.to_resolve.sort();
    out.to_resolve.dedup();
    Ok(out)
}

/// Asks the kernel to resolve (or confirm) neighbour `ip` on interface `ifindex`,
/// creating the entry if there is none.
pub async fn ask_to_resolve(handle: &Handle, ifindex: u32, ip: IpAddr) -> Result<()> {
    let mut req = handle.neighbours().add(ifindex, ip).replace();
    let m = req.message_mut();
    m.header.state = NeighbourState::None;
    m.header.flags = NeighbourFlags::Use;
    req.execute()
        .await
        .with_context(|| format!("asking to resolve neighbour {ip} on interface {ifindex}"))
}

/// Runs until `updates` is closed: resolves the addresses `addrs` holds, sends every
/// change, and resolves again on netlink events, on a change of `addrs` and every
/// `REFRESH`. Errors are logged and the watch starts over.
pub async fn watch(mut addrs: watch::Receiver<Vec<IpAddr>>, updates: mpsc::Sender<NextHops>) {
    let mut known = NextHops::new();
    loop {
        match watch_once(&mut addrs, &updates, &mut known).await {
            Ok(()) => return,
            Err(e) => {
                warn!("next-hop watch failed, starting over: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn watch_once(
    addrs: &mut watch::Receiver<Vec<IpAddr>>,
    updates: &mpsc::Sender<NextHops>,
    known: &mut NextHops,
) -> Result<()> {
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .context("subscribing to rtnetlink events")?;
    let conn = AbortOnDrop(tokio::spawn(conn));
    let mut asked: HashMap<(u32, IpAddr), Instant> = HashMap::new();
    loop {
        let want = addrs.borrow_and_update().clone();
        let r = resolve(&handle, &want).await?;
        let mut changes = NextHops::new();
        for (a, hop) in &r.hops {
            if known.get(a) != Some(hop) {
                changes.insert(*a, *hop);
            }
        }
        for a in known.keys() {
            if !r.hops.contains_key(a) {
                changes.insert(*a, None);
            }
        }
        *known = r.hops;
        if !changes.is_empty() {
            for (a, hop) in &changes {
                match hop {
                    Some(h) => info!(
                        backend = %a,
                        ifindex = h.ifindex,
                        mac = %fmt_mac(&h.dmac),
                        mtu = h.mtu,
                        "next hop resolved"
                    ),
                    None => info!(backend = %a, "next hop unresolved (bpf_fib_lookup decides)"),
                }
            }
            if updates.send(changes).await.is_err() {
                return Ok(());
            }
        }
        let now = Instant::now();
        asked.retain(|_, t| now.duration_since(*t) < ASK_EVERY);
        for key in r.to_resolve {
            if asked.contains_key(&key) {
                continue;
            }
            asked.insert(key, now);
            if let Err(e) = ask_to_resolve(&handle, key.0, key.1).await {
                debug!("{e:#}");
            }
        }
        tokio::select! {
            ev = events.next() => {
                ev.context("the rtnetlink event stream ended")?;
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
            }
            changed = addrs.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(REFRESH) => {}
            _ = updates.closed() => return Ok(()),
        }
        if conn.0.is_finished() {
            anyhow::bail!("the rtnetlink connection ended");
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Route {
    oif: u32,
    gateway: Option<IpAddr>,
    mtu: Option<u32>,
}

/// The route the kernel takes to `dst` (`ip route get`); `None` when it is not a unicast
/// route out of an interface (unreachable, local, blackhole).
async fn route(handle: &Handle, dst: IpAddr) -> Result<Option<Route>> {
    let msg = match dst {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .build(),
    };
    let m = match handle.route().get(msg).execute().try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) => {
            debug!(%dst, "no route: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("looking up the route to {dst}")),
    };
    if m.header.kind != RouteType::Unicast {
        return Ok(None);
    }
    let mut r = Route {
        oif: 0,
        gateway: None,
        mtu: None,
    };
    for a in m.attributes {
        match a {
            RouteAttribute::Oif(i) => r.oif = i,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(g.into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(g.into()),
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Mtu(v) = m {
                        r.mtu = Some(v);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((r.oif != 0).then_some(r))
}

async fn links(handle: &Handle) -> Result<HashMap<u32, Link>> {
    let mut out = HashMap::new();
    let mut s = handle.link().get().execute();
    while let Some(m) = s.try_next().await.context("listing the links")? {
        let mut l = Link { mac: None, mtu: 0 };
        for a in m.attributes {
            match a {
                LinkAttribute::Address(b) => l.mac = mac(&b),
                LinkAttribute::Mtu(v) => l.mtu = v,
                _ => {}
            }
        }
        out.insert(m.header.index, l);
    }
    Ok(out)
}

async fn neighbours(handle: &Handle) -> Result<HashMap<(u32, IpAddr), Neighbour>> {
    let mut out = HashMap::new();
    let mut s = handle.neighbours().get().execute();
    while let Some(m) = s.try_next().await.context("listing the neighbours")? {
        let mut dst = None;
        let mut lladdr = None;
        for a in m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                    dst = Some(IpAddr::from(v))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                    dst = Some(IpAddr::from(v))
                }
                NeighbourAttribute::LinkLayerAddress(b) => lladdr = mac(&b),
                _ => {}
            }
        }
        if let Some(dst) = dst {
            out.insert(
                (m.header.ifindex, dst),
                Neighbour {
                    state: m.header.state,
                    mac: lladdr,
                },
            );
        }
    }
    Ok(out)
}

fn mac(b: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(b).ok().filter(|m| *m != [0; 6])
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
