//! Host settings the agent makes: VIPs on `lo` (rtnetlink) for a node that is a backend,
//! and forwarding on the attached interfaces, without which `bpf_fib_lookup` refuses to
//! resolve next hops for packets that arrived on them.

use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use tracing::info;

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
