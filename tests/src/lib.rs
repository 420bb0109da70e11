//! The test bed of lb's end-to-end tests: network namespaces wired into a small network
//! (clients, a router, load-balancer nodes, backends), lb's XDP program attached inside
//! them, and traffic helpers. See `tests/tests/` for its use, `lab` for a manual one.
//!
//! A client reaching a VIP through an LB node (see `tests/e2e_forwarding.rs` for the
//! whole of it):
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//!
//! use lb::dataplane::{Dataplane, LoadOptions, Node as NodeConfig};
//! use tests::{can_run, tcp_request, Node, Spec, TcpServer, Topology};
//!
//! fn dataplane(node: &Node) -> Dataplane {
//!     let mut dp = Dataplane::load(&LoadOptions::default()).unwrap();
//!     dp.set_node(&NodeConfig {
//!         hash_seed: 7,
//!         flow_hash: Default::default(),
//!         gue_port: lb_common::encap::DEFAULT_GUE_PORT,
//!         addr_v4: Some(node.v4),
//!         addr_v6: Some(node.v6),
//!     })
//!     .unwrap();
//!     node.attach(dp.program()).unwrap(); // native XDP on the node's eth0
//!     dp
//! }
//!
//! if !can_run("vip_example") {
//!     return;
//! }
//! // 1 client, 1 LB node, 2 backends; VIPs 10.100.0.1 and fd00:100::1 on the backends'
//! // lo, routed by the router through the LB node; lb_pass on the router's ends.
//! let topo = Topology::build(Spec::new(1, 1, 2)).unwrap();
//! let mut lb = dataplane(&topo.lbs[0]);
//! // ... lb.set_backend / write_table / set_service for (VIP, 80, TCP) ...
//! let _backends: Vec<Dataplane> = topo.backends.iter().map(dataplane).collect();
//! let any: SocketAddr = "[::]:80".parse().unwrap();
//! let _servers: Vec<TcpServer> = topo
//!     .backends
//!     .iter()
//!     .map(|b| TcpServer::start(b, &b.name, &[any]).unwrap())
//!     .collect();
//! let vip = SocketAddr::new(topo.vip_v4().into(), 80);
//! let backend = tcp_request(&topo.clients[0], vip, Duration::from_secs(3)).unwrap();
//! assert!(backend == "b0" || backend == "b1");
//! // The LB node's reason counters, summed over CPUs, show what its program did.
//! let seen: u64 = lb.reason_counts().unwrap().iter().map(|(_, n)| n).sum();
//! assert!(seen > 0);
//! // Dropping `topo` (also on panic) kills what runs inside and deletes the namespaces.
//! ```
//!
//! Errors are `anyhow`: this is test harness code whose errors end in a test failure or
//! on an operator's terminal, never matched on.

pub mod agent;
pub mod bench;
pub mod churn;
pub mod cleanup;
pub mod etcd;
pub mod fixture;
pub mod link;
pub mod netns;
pub mod timeline;
pub mod topology;
pub mod traffic;
pub mod xdp;

pub use cleanup::{sweep, sweep_all, sweep_stale, Swept};
pub use netns::{Netns, NsChild};
pub use topology::{LinkPlan, Node, Role, SecondLink, Spec, Topology, VIP_V4, VIP_V6};
pub use traffic::{tcp_request, udp_request, udp_send, TcpConn, TcpServer, UdpServer};
pub use xdp::{attach_in, reason_counts, ReasonCounts, XdpProgram};

/// Set to make tests that need root fail instead of skipping (CI runs as root).
pub const REQUIRE_ROOT_ENV: &str = "LB_TESTS_REQUIRE_ROOT";

/// Whether tests that need network namespaces and BPF can run: true as root. Otherwise
/// prints why the test `name` is skipped and returns false, or panics when
/// `LB_TESTS_REQUIRE_ROOT` is set.
pub fn can_run(name: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("{name}: needs root (network namespaces, XDP, BPF maps)");
    if std::env::var_os(REQUIRE_ROOT_ENV).is_some() {
        panic!("{msg}, and {REQUIRE_ROOT_ENV} is set");
    }
    // Straight to stderr: libtest captures `eprintln!`, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
    false
}
