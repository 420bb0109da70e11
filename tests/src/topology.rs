//! A test network built from a small description: one router namespace and client,
//! load-balancer and backend namespaces, each node joined to the router by its own veth
//! pair and subnet.
//!
//! Addressing, for role code R (client 1, lb 2, backend 3) and node index I:
//! link subnet 10.R.I.0/24 and fd00:R:I::/64, router .1 / ::1, node .2 / ::2,
//! MACs 02:00:00:R:I:01 (router end) and 02:00:00:R:I:02 (node end). The node's interface
//! is `eth0`; the router's end is `c<I>`, `lb<I>` or `b<I>`. VIPs live on the backends'
//! `lo` (and on the LB nodes' in Unimog mode, where every LB node also serves); the router
//! routes each VIP through the load-balancer nodes (ECMP, hashed by L4).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Deref,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    link::{self, Mac, VethEnd},
    Netns, XdpProgram,
};

/// Every namespace the test bed makes starts with this; the sweep looks for it.
pub const PREFIX: &str = "lbt-";

/// What a node is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Lb,
    Backend,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Lb, Role::Backend];

    /// The R of the addressing plan.
    pub const fn code(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Lb => 2,
            Role::Backend => 3,
        }
    }

    /// Short name: node `c0` / `lb0` / `b0`, also the router's interface to it.
    pub const fn short(self) -> &'static str {
        match self {
            Role::Client => "c",
            Role::Lb => "lb",
            Role::Backend => "b",
        }
    }
}

/// The MTU of one node's link (both veth ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkMtu {
    pub role: Role,
    pub index: usize,
    pub mtu: u32,
}

/// The description a [`Topology`] is built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub clients: usize,
    pub lbs: usize,
    pub backends: usize,
    /// MTU of every link not in `link_mtus`. Native XDP on veth needs it at most about
    /// 3500 (a frame must fit one page), so links with XDP must stay below that.
    pub mtu: u32,
    #[serde(default)]
    pub link_mtus: Vec<LinkMtu>,
    /// VIPs: on every backend's `lo`, routed by the router through the LB nodes.
    pub vips: Vec<IpAddr>,
    /// Attach `lb_pass` to the router's ends of the LB and backend links: native
    /// XDP_TX/redirect on veth delivers only when the peer has an XDP program too.
    pub router_pass: bool,
    /// Turn IP forwarding on in the LB and backend nodes: `bpf_fib_lookup` (without
    /// `BPF_FIB_LOOKUP_OUTPUT`) refuses to route for an ingress interface that does not
    /// forward. LB nodes then also get blackhole routes for the VIPs, so a VIP packet the
    /// program passes is dropped there instead of bouncing back to the router.
    pub forwarding: bool,
    /// The LB nodes serve the VIPs too (Unimog mode: every node balances and serves):
    /// the VIPs go on their `lo` instead of blackhole routes.
    #[serde(default)]
    pub lbs_serve: bool,
}

/// The default VIPs.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

impl Spec {
    /// `clients`, `lbs` and `backends` nodes, MTU 1500, VIPs [`VIP_V4`] and [`VIP_V6`],
    /// `lb_pass` on the router's LB and backend ends, forwarding on in LB and backend
    /// nodes.
    pub fn new(clients: usize, lbs: usize, backends: usize) -> Self {
        Self {
            clients,
            lbs,
            backends,
            mtu: 1500,
            link_mtus: Vec::new(),
            vips: vec![VIP_V4.into(), VIP_V6.into()],
            router_pass: true,
            forwarding: true,
            lbs_serve: false,
        }
    }

    /// Unimog mode: `clients` and `nodes` nodes that are all both load balancers and
    /// backends, behind the router's ECMP, with the VIPs on their `lo`.
    pub fn unimog(clients: usize, nodes: usize) -> Self {
        Self {
            lbs_serve: true,
            ..Self::new(clients, nodes, 0)
        }
    }

    /// Sets the MTU of every link.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Sets the MTU of one node's link.
    pub fn link_mtu(mut self, role: Role, index: usize, mtu: u32) -> Self {
        self.link_mtus
            .retain(|l| !(l.role == role && l.index == index));
        self.link_mtus.push(LinkMtu { role, index, mtu });
        self
    }

    pub fn vips(mut self, vips: Vec<IpAddr>) -> Self {
        self.vips = vips;
        self
    }

    pub fn router_pass(mut self, on: bool) -> Self {
        self.router_pass = on;
        self
    }

    pub fn forwarding(mut self, on: bool) -> Self {
        self.forwarding = on;
        self
    }

    pub fn count(&self, role: Role) -> usize {
        match role {
            Role::Client => self.clients,
            Role::Lb => self.lbs,
            Role::Backend => self.backends,
        }
    }

    pub fn mtu_of(&self, role: Role, index: usize) -> u32 {
        self.link_mtus
            .iter()
            .find(|l| l.role == role && l.index == index)
            .map_or(self.mtu, |l| l.mtu)
    }

    fn validate(&self) -> Result<()> {
        for role in Role::ALL {
            ensure!(
                self.count(role) <= 250,
                "at most 250 {role:?} nodes (one /24 each)"
            );
        }
        for l in &self.link_mtus {
            ensure!(
                l.index < self.count(l.role),
                "MTU for {:?} {} which does not exist",
                l.role,
                l.index
            );
        }
        for role in Role::ALL {
            for i in 0..self.count(role) {
                let mtu = self.mtu_of(role, i);
                // Below 1280 the kernel turns IPv6 off on the link.
                ensure!(
                    (1280..=65535).contains(&mtu),
                    "MTU {mtu} of {role:?} {i}: must be 1280..=65535"
                );
            }
        }
        for vip in &self.vips {
            let inside = match vip {
                IpAddr::V4(v) => v.octets()[0] == 10 && (1..=3).contains(&v.octets()[1]),
                IpAddr::V6(v) => v.segments()[0] == 0xfd00 && (1..=3).contains(&v.segments()[1]),
            };
            ensure!(!inside, "VIP {vip} is inside the link subnets");
        }
        Ok(())
    }
}

/// A node's addresses on its link, per the plan in the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkPlan {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: Mac,
    pub router_v4: Ipv4Addr,
    pub router_v6: Ipv6Addr,
    pub router_mac: Mac,
}

impl LinkPlan {
    pub fn of(role: Role, index: usize) -> Self {
        let (r, i) = (role.code(), index as u8);
        let v6 = |h| Ipv6Addr::new(0xfd00, r.into(), i.into(), 0, 0, 0, 0, h);
        Self {
            v4: Ipv4Addr::new(10, r, i, 2),
            v6: v6(2),
            mac: [0x02, 0, 0, r, i, 0x02],
            router_v4: Ipv4Addr::new(10, r, i, 1),
            router_v6: v6(1),
            router_mac: [0x02, 0, 0, r, i, 0x01],
        }
    }
}

/// A client, load-balancer or backend namespace and its link to the router.
#[derive(Debug)]
pub struct Node {
    pub role: Role,
    pub index: usize,
    /// `c0`, `lb0`, `b0`, ...
    pub name: String,
    pub ns: Netns,
    /// The node's interface (`eth0`).
    pub ifname: String,
    pub mtu: u32,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: Mac,
    /// The router's end of the link, in the router namespace.
    pub router_ifname: String,
    pub router_v4: Ipv4Addr,
    pub router_v6: Ipv6Addr,
    pub router_mac: Mac,
}

/// The node's interface inside the node's namespace.
pub const NODE_IFNAME: &str = "eth0";

impl Node {
    /// Opens node `index` of `role` of the running topology `id` again (another process,
    /// such as a lab's servers, attaching to what `Topology::build` made).
    pub fn open(id: &str, role: Role, index: usize, mtu: u32) -> Result<Node> {
        let ns = Netns::open(&node_ns_name(id, role, index))?;
        Ok(Node::planned(role, index, mtu, ns))
    }

    /// Node `index` of `role` in namespace `ns`, addressed by the plan.
    fn planned(role: Role, index: usize, mtu: u32, ns: Netns) -> Node {
        let p = LinkPlan::of(role, index);
        Node {
            role,
            index,
            name: format!("{}{index}", role.short()),
            ns,
            ifname: NODE_IFNAME.to_owned(),
            mtu,
            v4: p.v4,
            v6: p.v6,
            mac: p.mac,
            router_ifname: format!("{}{index}", role.short()),
            router_v4: p.router_v4,
            router_v6: p.router_v6,
            router_mac: p.router_mac,
        }
    }

    /// The node's own address of the family of `v6`.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.v6.into()
        } else {
            self.v4.into()
        }
    }

    /// Both of the node's own addresses with `port`.
    pub fn sockaddrs(&self, port: u16) -> Vec<SocketAddr> {
        vec![
            SocketAddr::new(self.v4.into(), port),
            SocketAddr::new(self.v6.into(), port),
        ]
    }

    /// Attaches `lb_xdp` to the node's interface (native mode).
    pub fn attach_lb(&self) -> Result<XdpProgram> {
        let mut prog = XdpProgram::load(lb::ebpf::PROGRAM)?;
        prog.attach(&self.ns, &self.ifname)?;
        Ok(prog)
    }

    /// Attaches a loaded XDP program (e.g. `Dataplane::program()`) to the node's
    /// interface, native mode.
    pub fn attach(&self, prog: &mut aya::programs::Xdp) -> Result<()> {
        crate::xdp::attach_in(&self.ns, prog, &self.ifname).map(drop)
    }

    /// Sets the node's interface up or down (the router's end keeps its state).
    pub fn set_link(&self, up: bool) -> Result<()> {
        let ifname = self.ifname.clone();
        self.ns.netlink(|h| async move {
            let idx = link::index(&h, &ifname).await?;
            if up {
                link::set_up(&h, idx).await
            } else {
                link::set_down(&h, idx).await
            }
        })
    }
}

impl Deref for Node {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

/// A node's second link to the router ([`Topology::add_second_link`]).
#[derive(Clone, Debug)]
pub struct SecondLink {
    /// The node's end (`eth1`).
    pub ifname: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: Mac,
    /// The router's end.
    pub router_ifname: String,
    pub router_v4: Ipv4Addr,
    pub router_v6: Ipv6Addr,
    pub router_mac: Mac,
}

/// A built test network; everything is removed when it is dropped (also on panic).
#[derive(Debug)]
pub struct Topology {
    // Dropped first: detaches before the namespaces go.
    router_pass: Option<XdpProgram>,
    pub id: String,
    pub spec: Spec,
    pub clients: Vec<Node>,
    pub lbs: Vec<Node>,
    pub backends: Vec<Node>,
    pub router: Netns,
}

/// An id unique among the live processes: `<pid>-<counter>`. The sweep uses the PID to
/// tell leftovers of dead runs from running tests.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // A dead run with a reused PID may have left this very name behind.
        if !Path::new(crate::netns::NETNS_DIR)
            .join(router_ns_name(&id))
            .exists()
        {
            return id;
        }
    }
}

fn router_ns_name(id: &str) -> String {
    format!("{PREFIX}{id}-r")
}

/// The namespace name of a node of topology `id`.
pub fn node_ns_name(id: &str, role: Role, index: usize) -> String {
    format!("{PREFIX}{id}-{}{index}", role.short())
}

impl Topology {
    /// Builds `spec` under a fresh unique id.
    pub fn build(spec: Spec) -> Result<Self> {
        Self::build_with_id(&unique_id(), spec)
    }

    /// Builds `spec` with namespaces named `lbt-<id>-r`, `lbt-<id>-c0`, ...
    /// If anything fails, what was made so far is removed.
    pub fn build_with_id(id: &str, spec: Spec) -> Result<Self> {
        spec.validate()?;
        ensure!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "topology id {id:?}: use letters, digits and '-'"
        );
        let router = Netns::create(&router_ns_name(id))?;
        router.run(|| {
            host_sysctls()?;
            link::sysctl("net/ipv4/ip_forward", "1")?;
            link::sysctl("net/ipv6/conf/all/forwarding", "1")?;
            // ECMP by the L4 5-tuple, so flows to a VIP spread over the LB nodes.
            link::sysctl("net/ipv4/fib_multipath_hash_policy", "1")?;
            link::sysctl("net/ipv6/fib_multipath_hash_policy", "1")
        })?;

        let mut by_role: [Vec<Node>; 3] = Default::default();
        for (r, role) in Role::ALL.into_iter().enumerate() {
            for index in 0..spec.count(role) {
                let ns = Netns::create(&node_ns_name(id, role, index))?;
                ns.run(host_sysctls)?;
                by_role[r].push(Node::planned(role, index, spec.mtu_of(role, index), ns));
            }
        }
        let [clients, lbs, backends] = by_role;
        let mut topo = Topology {
            router_pass: None,
            id: id.to_owned(),
            spec,
            clients,
            lbs,
            backends,
            router,
        };
        topo.wire()?;
        if topo.spec.router_pass {
            topo.attach_router_pass()?;
        }
        Ok(topo)
    }

    /// Creates the links and configures both ends, then the VIP routes.
    fn wire(&self) -> Result<()> {
        let nodes: Vec<&Node> = self.nodes().collect();
        self.router.netlink(|h| async move {
            up_lo(&h).await?;
            for n in &nodes {
                link::add_veth(
                    &h,
                    VethEnd {
                        name: &n.router_ifname,
                        mac: n.router_mac,
                        mtu: n.mtu,
                    },
                    VethEnd {
                        name: &n.ifname,
                        mac: n.mac,
                        mtu: n.mtu,
                    },
                    n.ns.fd(),
                )
                .await?;
                let local = (n.router_v4, n.router_v6);
                configure_end(&h, &n.router_ifname, local, (n.v4, n.v6), n.mac).await?;
            }
            Ok(())
        })?;

        let vips = &self.spec.vips;
        let forwarding = self.spec.forwarding;
        let lbs_serve = self.spec.lbs_serve;
        for n in self.nodes() {
            let role = n.role;
            n.ns.netlink(|h| async move {
                if forwarding && role != Role::Client {
                    link::sysctl("net/ipv4/conf/all/forwarding", "1")?;
                    link::sysctl("net/ipv6/conf/all/forwarding", "1")?;
                }
                up_lo(&h).await?;
                let peer = (n.router_v4, n.router_v6);
                let idx = configure_end(&h, &n.ifname, (n.v4, n.v6), peer, n.router_mac).await?;
                let gw4 = [(IpAddr::from(n.router_v4), idx)];
                let gw6 = [(IpAddr::from(n.router_v6), idx)];
                link::add_route(&h, Ipv4Addr::UNSPECIFIED.into(), 0, &gw4).await?;
                link::add_route(&h, Ipv6Addr::UNSPECIFIED.into(), 0, &gw6).await?;
                for &vip in vips {
                    let prefix = if vip.is_ipv4() { 32 } else { 128 };
                    match role {
                        Role::Backend | Role::Lb if role == Role::Backend || lbs_serve => {
                            let lo = link::index(&h, "lo").await?;
                            link::add_addr(&h, lo, vip, prefix).await?;
                        }
                        Role::Lb if forwarding => link::add_blackhole(&h, vip, prefix).await?,
                        _ => {}
                    }
                }
                Ok(())
            })?;
        }

        if self.lbs.is_empty() {
            return Ok(());
        }
        let lbs = &self.lbs;
        self.router.netlink(|h| async move {
            let mut gw4 = Vec::new();
            let mut gw6 = Vec::new();
            for n in lbs {
                let idx = link::index(&h, &n.router_ifname).await?;
                gw4.push((IpAddr::from(n.v4), idx));
                gw6.push((IpAddr::from(n.v6), idx));
            }
            for &vip in vips {
                let (prefix, gws) = if vip.is_ipv4() {
                    (32, &gw4)
                } else {
                    (128, &gw6)
                };
                link::add_route(&h, vip, prefix, gws).await?;
            }
            Ok(())
        })
    }

    /// Attaches `lb_pass` to the router's ends of the LB and backend links (done by
    /// [`Topology::build`] when `spec.router_pass`).
    pub fn attach_router_pass(&mut self) -> Result<()> {
        if self.router_pass.is_some() {
            return Ok(());
        }
        let mut prog = XdpProgram::load(lb::ebpf::PASS_PROGRAM)?;
        for n in self.lbs.iter().chain(&self.backends) {
            prog.attach(&self.router, &n.router_ifname)?;
        }
        self.router_pass = Some(prog);
        Ok(())
    }

    /// Pins the router's `lb_pass` links under `dir` (bpffs), so they outlive this
    /// process; see [`Topology::keep`].
    pub fn pin_router_pass(&mut self, dir: &Path) -> Result<()> {
        let Some(prog) = self.router_pass.as_mut() else {
            bail!("no lb_pass attached on the router");
        };
        prog.pin_links(dir)
    }

    /// Adds a second link between a node and the router: `eth1` on the node, `<name>x`
    /// on the router (with `lb_pass` when the router has it on the other links), subnet
    /// 10.(R+3).I.0/24 and fd00:(R+3):I::/64, router .1 / ::1, node .2 / ::2, MACs
    /// 02:00:01:R:I:01 / :02. No static neighbour entries and no routes through it: the
    /// caller decides what goes that way.
    pub fn add_second_link(&mut self, role: Role, index: usize) -> Result<SecondLink> {
        let n = self.node(role, index);
        let (r, i) = (role.code(), index as u8);
        let v6 = |h| Ipv6Addr::new(0xfd00, (r + 3).into(), i.into(), 0, 0, 0, 0, h);
        let l = SecondLink {
            ifname: "eth1".to_owned(),
            v4: Ipv4Addr::new(10, r + 3, i, 2),
            v6: v6(2),
            mac: [0x02, 0, 1, r, i, 0x02],
            router_ifname: format!("{}x", n.name),
            router_v4: Ipv4Addr::new(10, r + 3, i, 1),
            router_v6: v6(1),
            router_mac: [0x02, 0, 1, r, i, 0x01],
        };
        let mtu = n.mtu;
        let link = &l;
        self.router.netlink(|h| async move {
            let (router_end, node_end) = (
                VethEnd {
                    name: &link.router_ifname,
                    mac: link.router_mac,
                    mtu,
                },
                VethEnd {
                    name: &link.ifname,
                    mac: link.mac,
                    mtu,
                },
            );
            link::add_veth(&h, router_end, node_end, n.ns.fd()).await?;
            let idx = link::index(&h, &link.router_ifname).await?;
            link::tx_checksum_off(&link.router_ifname)?;
            link::set_up(&h, idx).await?;
            link::add_addr(&h, idx, link.router_v4.into(), 24).await?;
            link::add_addr(&h, idx, link.router_v6.into(), 64).await
        })?;
        n.ns.netlink(|h| async move {
            let idx = link::index(&h, &link.ifname).await?;
            link::tx_checksum_off(&link.ifname)?;
            link::set_up(&h, idx).await?;
            link::add_addr(&h, idx, link.v4.into(), 24).await?;
            link::add_addr(&h, idx, link.v6.into(), 64).await
        })?;
        if let Some(prog) = self.router_pass.as_mut() {
            prog.attach(&self.router, &l.router_ifname)?;
        }
        Ok(l)
    }

    /// Every node: clients, then LB nodes, then backends.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.clients.iter().chain(&self.lbs).chain(&self.backends)
    }

    pub fn node(&self, role: Role, index: usize) -> &Node {
        match role {
            Role::Client => &self.clients[index],
            Role::Lb => &self.lbs[index],
            Role::Backend => &self.backends[index],
        }
    }

    /// Names of all namespaces, the router's first.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.router.name().to_owned())
            .chain(self.nodes().map(|n| n.ns.name().to_owned()))
            .collect()
    }

    pub fn vips_v4(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.spec.vips.iter().filter_map(|v| match v {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
    }

    pub fn vips_v6(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.spec.vips.iter().filter_map(|v| match v {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        })
    }

    /// The first IPv4 VIP; panics when there is none.
    pub fn vip_v4(&self) -> Ipv4Addr {
        self.vips_v4().next().expect("the spec has an IPv4 VIP")
    }

    /// The first IPv6 VIP; panics when there is none.
    pub fn vip_v6(&self) -> Ipv6Addr {
        self.vips_v6().next().expect("the spec has an IPv6 VIP")
    }

    /// What a backend serves on: its own addresses and every VIP, with `port`.
    pub fn backend_sockaddrs(&self, backend: &Node, port: u16) -> Vec<SocketAddr> {
        let mut v = backend.sockaddrs(port);
        v.extend(self.spec.vips.iter().map(|&ip| SocketAddr::new(ip, port)));
        v
    }

    /// Leaves every namespace in place when dropped (`lab up`). Unpinned XDP links are
    /// still detached.
    pub fn keep(mut self) {
        self.router.keep();
        for n in self
            .clients
            .iter_mut()
            .chain(&mut self.lbs)
            .chain(&mut self.backends)
        {
            n.ns.keep();
        }
    }
}

/// Settings every namespace gets before its links exist, so the links inherit them.
fn host_sysctls() -> Result<()> {
    for conf in ["all", "default"] {
        // The VIP path is asymmetric (in through an LB node, out directly).
        link::sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
        // IPv6 addresses usable at once.
        link::sysctl(&format!("net/ipv6/conf/{conf}/accept_dad"), "0")?;
    }
    Ok(())
}

/// Sets up one end of a link: checksum offload off, up, its addresses, and permanent
/// neighbour entries for the other end. Returns the interface index.
async fn configure_end(
    h: &rtnetlink::Handle,
    ifname: &str,
    (v4, v6): (Ipv4Addr, Ipv6Addr),
    (peer_v4, peer_v6): (Ipv4Addr, Ipv6Addr),
    peer_mac: Mac,
) -> Result<u32> {
    let idx = link::index(h, ifname).await?;
    link::tx_checksum_off(ifname)?;
    link::set_up(h, idx).await?;
    link::add_addr(h, idx, v4.into(), 24).await?;
    link::add_addr(h, idx, v6.into(), 64).await?;
    link::add_neigh(h, idx, peer_v4.into(), peer_mac).await?;
    link::add_neigh(h, idx, peer_v6.into(), peer_mac).await?;
    Ok(idx)
}

async fn up_lo(h: &rtnetlink::Handle) -> Result<()> {
    let lo = link::index(h, "lo").await.context("loopback")?;
    link::set_up(h, lo).await
}
