//! A fleet of nodes that share configuration, health and tables through etcd.
//! `store` is the typed access to the store, `vote` the rule that turns the nodes' health
//! views into one verdict; the agent's use of them comes on top.

pub mod store;
pub mod vote;
