//! A fleet of nodes that share configuration, health and tables through etcd.
//! `store` is the typed access to the store; the agent's use of it comes on top.

pub mod store;
