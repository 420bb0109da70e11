//! The fleet's documents under the prefix, and what a node reads from them.
//!
//! | key | document |
//! |---|---|
//! | `services` | [`ServicesDoc`]: the services, their backends and weights |
//! | `health/NODE` | [`View`]: NODE's own checks' verdicts, under NODE's lease |
//! | `tables/NODE` | [`NodeReport`]: the revision NODE applied and its tables' digests, leased |
//! | `hashes/NODE` | the flow hash NODE forwards with ([`flow_hash_id`]), under its lease |
//! | `load` | [`LoadDoc`]: the load loop's corrections, written by its leader |
//! | `controller` | the name of the load loop's leader, under its lease |
//! | `usage/ADDRESS` | [`Wire`]: backend ADDRESS's utilisation, under its lease |

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::hash::FlowHash;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    store::Change,
    vote::{Verdict, View},
};
use crate::config::{Config, ServiceConfig};
pub use crate::load::{fleet::LoadDoc, report::Wire};

pub const SERVICES: &str = "services";
pub const HEALTH: &str = "health";
pub const TABLES: &str = "tables";
/// Polled with the reports, like them not watched.
pub const HASHES: &str = "hashes";
/// Watched with the services and views (it sorts between them): the weights are an input
/// of the tables. The leader's key sorts before, the reports after: neither is watched.
pub const LOAD: &str = "load";
pub const CONTROLLER: &str = "controller";
pub const USAGE: &str = "usage";

/// `PREFIX/services`: what every node balances. The format of `lb fleet export` and
/// `lb fleet import`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesDoc {
    pub services: Vec<ServiceConfig>,
}

/// `PREFIX/tables/NODE`: what NODE's data plane holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// The newest store revision of a services or health change its tables include.
    pub revision: i64,
    /// Each service's live table digest (as `lb list --json` shows it).
    pub tables: BTreeMap<String, u64>,
}

/// How a node names its flow hash under `hashes/NODE`: the hash and `node.hash_seed`.
/// Nodes that hash alike put a flow in the same bucket. A key of its own rather than a
/// field of [`NodeReport`]: agents that do not know it read reports whole, and would
/// refuse a report with a field they do not know.
pub fn flow_hash_id(hash: FlowHash, seed: u32) -> String {
    format!("{} seed {seed}", hash.name())
}

/// The key of a backend in a [`View`].
pub fn view_key(service: &str, backend: IpAddr) -> String {
    format!("{service}/{backend}")
}

/// Effective verdicts as the agent's health map: (service, backend) -> up.
pub fn health_map(verdicts: &BTreeMap<String, Verdict>) -> BTreeMap<(String, IpAddr), bool> {
    verdicts
        .iter()
        .filter_map(|(k, v)| {
            let (service, addr) = k.rsplit_once('/')?;
            Some(((service.to_owned(), addr.parse().ok()?), *v == Verdict::Up))
        })
        .collect()
}

/// The services of document `bytes`, validated as a file with this node's other
/// settings (`base`) would be: every problem named, nothing taken when one is found.
pub fn parse_services(bytes: &[u8], base: &Config) -> Result<Vec<ServiceConfig>, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let doc: ServicesDoc =
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let whole = Config {
        services: doc.services,
        ..base.clone()
    };
    let problems = whole.problems();
    if problems.is_empty() {
        Ok(whole.services)
    } else {
        Err(problems.join("; "))
    }
}

/// The fleet's documents as one node last read them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetState {
    /// The services document as stored (`None`: there is none) and its revision.
    pub services: Option<Vec<u8>>,
    pub services_revision: i64,
    /// The live nodes' health views, by node.
    pub views: BTreeMap<String, View>,
    /// The live nodes' reports, by node.
    pub reports: BTreeMap<String, NodeReport>,
    /// The live nodes' flow hashes (`flow_hash_id`), by node.
    pub hashes: BTreeMap<String, String>,
    /// The load loop's corrections and the revision that wrote them (0: none yet).
    pub load: Option<LoadDoc>,
    pub load_revision: i64,
    /// The newest revision of a change to the services or the views taken in.
    pub revision: i64,
}

impl FleetState {
    /// Takes in one document change; returns whether it changes the tables' inputs
    /// (the services or a view) rather than a report.
    pub fn take(&mut self, c: &Change) -> bool {
        let input =
            if c.name == SERVICES {
                self.services = c.value.clone();
                self.services_revision = if c.value.is_some() { c.revision } else { 0 };
                true
            } else if c.name == LOAD {
                self.load = c.value.as_deref().and_then(|v| match serde_json::from_slice(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!(key = %c.name, "fleet: ignoring a document that does not parse: {e}");
                    None
                }
            });
                self.load_revision = if c.value.is_some() { c.revision } else { 0 };
                true
            } else if let Some(node) = c.name.strip_prefix("health/") {
                take_doc(&mut self.views, node, c);
                true
            } else if let Some(node) = c.name.strip_prefix("tables/") {
                take_doc(&mut self.reports, node, c);
                false
            } else if let Some(node) = c.name.strip_prefix("hashes/") {
                take_doc(&mut self.hashes, node, c);
                false
            } else {
                false
            };
        if input {
            self.revision = self.revision.max(c.revision);
        }
        input
    }
}

/// A leased document of `node` put or gone; one that does not parse counts as gone.
fn take_doc<T: serde::de::DeserializeOwned>(
    docs: &mut BTreeMap<String, T>,
    node: &str,
    c: &Change,
) {
    match c.value.as_deref().map(serde_json::from_slice::<T>) {
        Some(Ok(doc)) => {
            docs.insert(node.to_owned(), doc);
        }
        Some(Err(e)) => {
            warn!(key = %c.name, "fleet: ignoring a document that does not parse: {e}");
            docs.remove(node);
        }
        None => {
            docs.remove(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, value: Option<&str>, revision: i64) -> Change {
        Change {
            name: name.into(),
            value: value.map(|v| v.as_bytes().to_vec()),
            revision,
        }
    }

    #[test]
    fn reports_are_not_inputs_and_leases_that_end_take_views_away() {
        let mut s = FleetState::default();
        assert!(s.take(&change("services", Some(r#"{"services":[]}"#), 3)));
        assert!(s.take(&change("health/lb0", Some(r#"{"web/10.0.3.2":"down"}"#), 4)));
        assert!(!s.take(&change(
            "tables/lb0",
            Some(r#"{"revision":4,"tables":{"web":7}}"#),
            5
        )));
        assert_eq!((s.revision, s.services_revision), (4, 3));
        assert_eq!(s.reports["lb0"].tables["web"], 7);
        assert!(!s.take(&change("hashes/lb0", Some(r#""murmur3 seed 7""#), 6)));
        assert_eq!(s.hashes["lb0"], "murmur3 seed 7");
        assert_eq!(s.revision, 4);
        let health = health_map(&super::super::vote::effective(&s.views));
        assert_eq!(
            health.get(&("web".to_string(), "10.0.3.2".parse().unwrap())),
            Some(&false)
        );
        assert!(s.take(&change("health/lb0", None, 9)));
        assert!(s.views.is_empty());
        assert_eq!(s.revision, 9);
    }

    #[test]
    fn a_services_document_is_validated_as_a_file() {
        let base: Config = serde_json::from_str(
            r#"{ "node": { "interfaces": ["eth0"], "address_v4": "10.0.0.2" } }"#,
        )
        .unwrap();
        let good = br#"{"services":[{"name":"web","vip":"10.100.0.1","port":80,
            "protocol":"tcp","backends":[{"address":"10.0.3.2"}]}]}"#;
        assert_eq!(parse_services(good, &base).unwrap()[0].name, "web");
        let e = parse_services(br#"{"services":[{"name":"web"}],"x":1}"#, &base).unwrap_err();
        assert!(e.contains("services[0]"), "{e}");
        let v6 = br#"{"services":[{"name":"web","vip":"10.100.0.1","port":80,
            "protocol":"tcp","backends":[{"address":"2001:db8::5"}]}]}"#;
        let e = parse_services(v6, &base).unwrap_err();
        assert!(e.contains("is IPv6 but the node has no address_v6"), "{e}");
    }
}
