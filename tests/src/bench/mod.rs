//! `cargo xtask bench`: what lb's data plane costs per packet on each path, next to an
//! XDP program that only returns XDP_PASS, and how the forwarding-table builder behaves
//! as services grow, how long the control plane takes to put a change in the maps, and
//! a fleet to put a change in every node's maps.
//! docs/benchmarks.md explains every figure.

pub mod compare;
pub mod control;
pub mod dataplane;
pub mod fleet;
pub mod harness;
pub mod live;
pub mod load;
pub mod load_chart;
pub mod memory;
pub mod report;
pub mod table;
