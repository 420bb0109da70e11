//! The test bed of lb's end-to-end tests: network namespaces wired into a small network
//! (clients, a router, load-balancer nodes, backends), lb's XDP program attached inside
//! them, and traffic helpers. See `tests/tests/` for its use, `lab` for a manual one.
//!
//! Errors are `anyhow`: this is test harness code whose errors end in a test failure or
//! on an operator's terminal, never matched on.

pub mod cleanup;
pub mod link;
pub mod netns;
pub mod topology;
pub mod traffic;
pub mod xdp;

pub use cleanup::{sweep, sweep_all, sweep_stale, Swept};
pub use netns::{Netns, NsChild};
pub use topology::{LinkPlan, Node, Role, Spec, Topology, VIP_V4, VIP_V6};
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
    eprintln!("SKIPPED {msg}");
    false
}
