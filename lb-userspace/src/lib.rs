//! The userspace of lb: loading and attaching the XDP program, writing its maps, the
//! forwarding-table builder, the agent and the operator commands.

pub mod api;
pub mod api_client;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod ebpf;
pub mod fleet;
pub mod health;
pub mod kernel_btf;
pub mod load;
pub mod metrics;
pub mod open_index;
pub mod pair_index;
pub mod top;

pub mod agent;
pub mod bpffs;
pub mod table;
