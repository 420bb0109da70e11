//! Links, addresses, routes and neighbours through rtnetlink, plus the two settings
//! netlink does not cover: sysctls (/proc/sys) and TX checksum offload (ethtool ioctl).
//! Everything here acts on the namespace of the calling thread: call it inside
//! [`Netns::run`](crate::Netns::run) or [`Netns::netlink`].

use std::{
    ffi::c_void,
    fs,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::{InfoData, InfoVeth, LinkAttribute},
    route::{RouteNextHop, RouteType},
};
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder, RouteNextHopBuilder,
};

use crate::Netns;

/// A MAC address.
pub type Mac = [u8; 6];

impl Netns {
    /// Runs `f` with an rtnetlink handle bound to this namespace, on a runtime of its own
    /// in a thread inside the namespace (sync helpers such as [`sysctl`] work there too).
    pub fn netlink<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.run(|| with_netlink(f))
    }
}

/// Runs `f` with an rtnetlink handle of the calling thread's namespace, on a runtime of
/// its own (so the calling thread must not be inside one).
pub fn with_netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(conn);
        let out = f(handle).await;
        conn.abort();
        out
    })
}

/// The index of interface `name`.
pub async fn index(h: &Handle, name: &str) -> Result<u32> {
    let msg = h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up interface {name}"))?
        .with_context(|| format!("no interface {name}"))?;
    Ok(msg.header.index)
}

/// Names of all interfaces.
pub async fn names(h: &Handle) -> Result<Vec<String>> {
    let links: Vec<_> = h.link().get().execute().try_collect().await?;
    Ok(links
        .into_iter()
        .filter_map(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .collect())
}

/// One end of a veth pair to create.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: Mac,
    pub mtu: u32,
}

/// Creates a veth pair: `local` in this namespace, `peer` directly in namespace `peer_ns`
/// (never passing through the root namespace, so nothing is left there if a run dies).
pub async fn add_veth(
    h: &Handle,
    local: VethEnd<'_>,
    peer: VethEnd<'_>,
    peer_ns: BorrowedFd<'_>,
) -> Result<()> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
        .name(peer.name)
        .address(peer.mac.to_vec())
        .mtu(peer.mtu)
        .setns_by_fd(peer_ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(local.name, peer.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .address(local.mac.to_vec())
        .mtu(local.mtu)
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .with_context(|| format!("creating veth {} <-> {}", local.name, peer.name))
}

/// Sets the interface up.
pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("setting interface {index} up"))
}

/// Sets the interface down.
pub async fn set_down(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .with_context(|| format!("setting interface {index} down"))
}

/// Sets the interface's MTU.
pub async fn set_mtu(h: &Handle, index: u32, mtu: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await
        .with_context(|| format!("setting MTU {mtu} on interface {index}"))
}

/// Deletes the interface (a veth takes its peer with it).
pub async fn delete(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .del(index)
        .execute()
        .await
        .with_context(|| format!("deleting interface {index}"))
}

/// Adds an address; IPv6 ones without duplicate address detection, so they are usable
/// at once.
pub async fn add_addr(h: &Handle, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
    let mut req = h.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .with_context(|| format!("adding {addr}/{prefix} to interface {index}"))
}

/// Adds a route to `dst/prefix` through `gateways`: one means a plain route, more an
/// ECMP (multipath) route. An unspecified `dst` with prefix 0 is the default route.
pub async fn add_route(
    h: &Handle,
    dst: IpAddr,
    prefix: u8,
    gateways: &[(IpAddr, u32)],
) -> Result<()> {
    let nexthops = |gws: &[(IpAddr, u32)], v6: bool| -> Result<Vec<RouteNextHop>> {
        gws.iter()
            .map(|&(gw, oif)| {
                let b = if v6 {
                    RouteNextHopBuilder::new_ipv6()
                } else {
                    RouteNextHopBuilder::new_ipv4()
                };
                Ok(b.interface(oif)
                    .via(gw)
                    .map_err(anyhow::Error::msg)?
                    .build())
            })
            .collect()
    };
    let msg = match (dst, gateways) {
        (_, []) => bail!("route to {dst}/{prefix} without a gateway"),
        (IpAddr::V4(d), [(IpAddr::V4(gw), oif)]) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d, prefix)
            .gateway(*gw)
            .output_interface(*oif)
            .build(),
        (IpAddr::V6(d), [(IpAddr::V6(gw), oif)]) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d, prefix)
            .gateway(*gw)
            .output_interface(*oif)
            .build(),
        (IpAddr::V4(d), gws) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d, prefix)
            .multipath(nexthops(gws, false)?)
            .build(),
        (IpAddr::V6(d), gws) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d, prefix)
            .multipath(nexthops(gws, true)?)
            .build(),
    };
    h.route()
        .add(msg)
        .execute()
        .await
        .with_context(|| format!("adding route {dst}/{prefix} via {gateways:?}"))
}

/// Adds a blackhole route to `dst/prefix`: matching packets are dropped silently.
pub async fn add_blackhole(h: &Handle, dst: IpAddr, prefix: u8) -> Result<()> {
    let msg = match dst {
        IpAddr::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d, prefix)
            .kind(RouteType::BlackHole)
            .build(),
        IpAddr::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d, prefix)
            .kind(RouteType::BlackHole)
            .build(),
    };
    h.route()
        .add(msg)
        .execute()
        .await
        .with_context(|| format!("adding blackhole route {dst}/{prefix}"))
}

/// Adds a permanent neighbour entry. The XDP program resolves next-hop MACs with
/// `bpf_fib_lookup`, which fails while a neighbour is unresolved, so every link gets
/// static entries both ways.
pub async fn add_neigh(h: &Handle, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
    h.neighbours()
        .add(index, ip)
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding neighbour {ip} -> {} on {index}", fmt_mac(&mac)))
}

/// Writes a sysctl of the calling thread's namespace, e.g. `net/ipv4/ip_forward`.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    // /proc/sys/net resolves to the namespace of the thread that opens it.
    let path = format!("/proc/sys/{key}");
    fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
}

/// Reads a sysctl of the calling thread's namespace.
pub fn sysctl_get(key: &str) -> Result<String> {
    let path = format!("/proc/sys/{key}");
    Ok(fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_owned())
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut c_void,
    _pad: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<IfreqData>() == 40);

fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!(
            "interface name too long: {ifname}"
        )));
    }
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut value = EthtoolValue { cmd, data };
    let mut ifr = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (d, s) in ifr.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL reads/writes `value` through `ifr.data`, both live here.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns TX checksum offload off. XDP_TX on veth loses an skb's partial-checksum state,
/// so a packet a local stack sent with an offloaded checksum would leave with a bad
/// TCP/UDP checksum; with offload off the stack writes full checksums.
pub fn tx_checksum_off(ifname: &str) -> Result<()> {
    ethtool_value(ifname, ETHTOOL_STXCSUM, 0)
        .map(drop)
        .with_context(|| format!("turning TX checksum offload off on {ifname}"))
}

/// Whether TX checksum offload is on.
pub fn tx_checksum(ifname: &str) -> Result<bool> {
    ethtool_value(ifname, ETHTOOL_GTXCSUM, 0)
        .map(|v| v != 0)
        .with_context(|| format!("reading TX checksum offload of {ifname}"))
}

/// The index of interface `name` in the calling thread's namespace.
pub fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: `c` is a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()).with_context(|| format!("no interface {name}")),
        i => Ok(i),
    }
}

pub fn fmt_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
