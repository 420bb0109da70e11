//! Long-lived traffic while the backend set changes: a lab with LB and backend agents,
//! TCP connections and connected-UDP sessions that keep talking through the load
//! balancer and record how they end, a UDP server that gives every client a connected
//! socket of its own (as QUIC servers do), and a host-side reader of an LB node's live
//! forwarding table that predicts where a flow goes.
//!
//! Used by `tests/e2e_churn.rs` and the `demo` binary.

/// The port backends answer health checks on.
pub const HEALTH_PORT: u16 = 8080;
/// The TCP services' port (on the IPv4 and the IPv6 VIP).
pub const TCP_PORT: u16 = 80;
/// The UDP service's port (IPv4 VIP).
pub const UDP_PORT: u16 = 443;

mod flows;
mod lab;
mod live_table;
mod udp_session;

pub use flows::*;
pub use lab::*;
pub use live_table::*;
pub use udp_session::*;
