//! The userspace of lb: loading and attaching the XDP program, writing its maps, the
//! forwarding-table builder, the agent and the operator commands.

pub mod ebpf;
pub mod api;
pub mod config;
pub mod dataplane;
pub mod cli;
pub mod client;
pub mod health;
pub mod metrics;

pub mod bpffs;
pub mod table;
pub mod agent;
