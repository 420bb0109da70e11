//! A fleet of nodes that share configuration, health and tables through etcd.
//! `store` is the typed access to the store, `doc` its documents, `vote` the rule that
//! turns the nodes' health views into one verdict, `link` a node's live link to the
//! store, `status` whether the fleet agrees, `command` the `lb fleet` commands.

pub mod command;
pub mod doc;
pub mod link;
pub mod status;
pub mod store;
pub mod vote;
