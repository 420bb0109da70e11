//! Host settings the agent makes: VIPs on `lo` (rtnetlink) for a node that is a backend,
//! with the MSS it advertises for them clamped (a rule and a routing table with
//! `advmss`), and forwarding on the attached interfaces, without which `bpf_fib_lookup` refuses to
//! resolve next hops for packets that arrived on them.

use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{IpVersion, RouteMessageBuilder};
use tracing::info;

use crate::config::VipMss;

/// Turns IPv4 and IPv6 forwarding on for `ifname`.
pub fn enable_forwarding(ifname: &str) -> Result<()> {
    for path in [
        format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"),
        format!("/proc/sys/net/ipv6/conf/{ifname}/forwarding"),
    ] {
        let on = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path} (does interface {ifname} exist?)"))?;
        if on.trim() != "1" {
            std::fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
            info!(%path, "forwarding turned on (bpf_fib_lookup needs it)");
        }
    }
    Ok(())
}

/// Puts each VIP on `lo` (a /32 or /128) unless it is there already.
pub fn ensure_vips_on_lo(vips: &[IpAddr]) -> Result<()> {
    if vips.is_empty() {
        return Ok(());
    }
    let vips = vips.to_vec();
    // rtnetlink wants a runtime of its own: this runs from inside the agent's runtime.
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(add_vips(vips))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

async fn add_vips(vips: Vec<IpAddr>) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let conn = tokio::spawn(conn);
    let lo = handle
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_next()
        .await
        .context("looking up lo")?
        .context("no lo interface")?
        .header
        .index;
    let present: Vec<IpAddr> = handle
        .address()
        .get()
        .set_link_index_filter(lo)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .context("listing the addresses of lo")?
        .into_iter()
        .flat_map(|m| m.attributes)
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) => Some(ip),
            _ => None,
        })
        .collect();
    for vip in vips {
        if present.contains(&vip) {
            continue;
        }
        let prefix = if vip.is_ipv4() { 32 } else { 128 };
        let mut req = handle.address().add(lo, vip, prefix);
        if vip.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .with_context(|| format!("adding VIP {vip} to lo"))?;
        info!(%vip, "VIP added to lo");
    }
    conn.abort();
    Ok(())
}

/// The routing table, and the priority of the rules that select it, for traffic from this
/// node's backend VIPs (see `clamp_vip_mss`).
pub const VIP_ROUTE_TABLE: u32 = 6080;
const VIP_RULE_PRIORITY: u32 = 6080;

/// Makes the stack advertise at most `mss.ipv4` / `mss.ipv6` as its MSS on connections to
/// `vips`, so clients' segments fit the load balancer's encapsulation from the first one:
/// a rule sends traffic from each VIP to `VIP_ROUTE_TABLE`, which holds the main table's
/// routes with the `advmss` attribute (the SYN-ACK takes its MSS from the route it leaves
/// by). The routes are copied anew on every call.
pub fn clamp_vip_mss(vips: &[IpAddr], mss: VipMss) -> Result<()> {
    if vips.is_empty() {
        return Ok(());
    }
    let vips = vips.to_vec();
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(clamp(vips, mss))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

async fn clamp(vips: Vec<IpAddr>, mss: VipMss) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let conn = tokio::spawn(conn);
    for v6 in [false, true] {
        let family: Vec<IpAddr> = vips.iter().copied().filter(|v| v.is_ipv6() == v6).collect();
        if family.is_empty() {
            continue;
        }
        let advmss = if v6 { mss.ipv6 } else { mss.ipv4 };
        copy_main_routes(&handle, v6, u32::from(advmss)).await?;
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .context("listing routing rules")?;
        for vip in family {
            let present = rules.iter().any(|r| {
                r.attributes
                    .contains(&RuleAttribute::Table(VIP_ROUTE_TABLE))
                    && r.attributes.contains(&RuleAttribute::Source(vip))
            });
            if present {
                continue;
            }
            let add = handle
                .rule()
                .add()
                .table_id(VIP_ROUTE_TABLE)
                .action(RuleAction::ToTable)
                .priority(VIP_RULE_PRIORITY);
            let done = match vip {
                IpAddr::V4(v) => add.v4().source_prefix(v, 32).execute().await,
                IpAddr::V6(v) => add.v6().source_prefix(v, 128).execute().await,
            };
            done.with_context(|| format!("adding the routing rule for VIP {vip}"))?;
            info!(%vip, table = VIP_ROUTE_TABLE, advmss, "MSS clamped for connections to the VIP");
        }
    }
    conn.abort();
    Ok(())
}

/// Copies the unicast routes of the main table of one family into `VIP_ROUTE_TABLE` with
/// `advmss`, replacing what is there.
async fn copy_main_routes(handle: &rtnetlink::Handle, v6: bool, advmss: u32) -> Result<()> {
    let query = if v6 {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
    };
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    for r in routes {
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast {
            continue;
        }
        let mut copy = RouteMessage::default();
        copy.header = r.header.clone();
        copy.header.table = RouteHeader::RT_TABLE_UNSPEC;
        copy.attributes = r
            .attributes
            .into_iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Gateway(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::Priority(_)
                        | RouteAttribute::PrefSource(_)
                        | RouteAttribute::MultiPath(_)
                        | RouteAttribute::Via(_)
                )
            })
            .collect();
        copy.attributes.push(RouteAttribute::Table(VIP_ROUTE_TABLE));
        copy.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Advmss(advmss)]));
        handle
            .route()
            .add(copy)
            .replace()
            .execute()
            .await
            .context("copying a route with advmss")?;
    }
    Ok(())
}
