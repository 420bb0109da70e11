//! Whether the fleet agrees: every live node's applied revision, lag, table digests and
//! flow hash, the services whose digests differ between nodes and the nodes of each flow
//! hash (`lb fleet status`, the metrics).

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use serde::{Deserialize, Serialize};

use super::doc::FleetState;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub prefix: String,
    /// The services document's revision (0: none in the store).
    pub services_revision: i64,
    /// The newest revision of a change to the services or the health views.
    pub revision: i64,
    /// The live nodes (their leases run), by name.
    pub nodes: Vec<NodeRow>,
    /// Services whose table digest is not the same on every live node.
    pub disagree: Vec<String>,
    /// The live nodes by the flow hash they publish (one entry when they agree; nodes
    /// that publish none, agents before the flow hash was published, are left out).
    #[serde(default)]
    pub flow_hashes: BTreeMap<String, Vec<String>>,
    /// Set by an agent: its own name, and whether it reaches the store now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub this_node: Option<String>,
    #[serde(default)]
    pub connected: bool,
    /// Set by an agent: the newest services or health revision its tables include.
    #[serde(default)]
    pub applied: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    /// The newest services or health revision its tables include.
    pub revision: i64,
    /// Revisions of services or health it has not applied yet.
    pub lag: i64,
    /// Whether it publishes a health view.
    pub health_view: bool,
    /// Each service's table digest on it.
    pub tables: BTreeMap<String, u64>,
    /// The flow hash it runs with (`fleet::doc::flow_hash_id`), if it publishes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_hash: Option<String>,
}

impl FleetStatus {
    pub fn of(prefix: &str, s: &FleetState) -> Self {
        let newest = s
            .revision
            .max(s.reports.values().map(|r| r.revision).max().unwrap_or(0));
        let nodes: Vec<NodeRow> = s
            .reports
            .iter()
            .map(|(node, r)| NodeRow {
                node: node.clone(),
                revision: r.revision,
                lag: (newest - r.revision).max(0),
                health_view: s.views.contains_key(node),
                tables: r.tables.clone(),
                flow_hash: s.hashes.get(node).cloned(),
            })
            .collect();
        let mut flow_hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for n in &nodes {
            if let Some(h) = &n.flow_hash {
                flow_hashes
                    .entry(h.clone())
                    .or_default()
                    .push(n.node.clone());
            }
        }
        let services: BTreeSet<&String> = nodes.iter().flat_map(|n| n.tables.keys()).collect();
        let disagree = services
            .into_iter()
            .filter(|svc| {
                let digests: BTreeSet<Option<&u64>> =
                    nodes.iter().map(|n| n.tables.get(*svc)).collect();
                digests.len() > 1
            })
            .cloned()
            .collect();
        FleetStatus {
            prefix: prefix.to_owned(),
            services_revision: s.services_revision,
            revision: newest,
            nodes,
            disagree,
            flow_hashes,
            this_node: None,
            connected: false,
            applied: 0,
        }
    }

    /// Whether the live nodes agree: the same tables, none lagging, one flow hash (what
    /// `lb fleet status` exits 0 on).
    pub fn agrees(&self) -> bool {
        self.disagree.is_empty() && self.max_lag() == 0 && !self.hashes_differ()
    }

    /// Whether live nodes report different flow hashes.
    pub fn hashes_differ(&self) -> bool {
        self.flow_hashes.len() > 1
    }

    /// Each flow hash with its nodes: "murmur3 seed 7 on lb0, lb2; ...".
    pub fn hashes_by_node(&self) -> String {
        let each: Vec<String> = self
            .flow_hashes
            .iter()
            .map(|(h, nodes)| format!("{h} on {}", nodes.join(", ")))
            .collect();
        each.join("; ")
    }

    /// The largest lag of any live node.
    pub fn max_lag(&self) -> i64 {
        self.nodes.iter().map(|n| n.lag).max().unwrap_or(0)
    }
}

/// The fleet's metrics: an agent's link and revision, and what it sees of the others.
pub struct FleetMetrics {
    connected: Gauge,
    applied: Gauge,
    newest: Gauge,
    lag: Gauge,
    nodes: Gauge,
    disagree: Gauge,
    flow_hashes: Gauge,
}

impl FleetMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let mut g = |name: &str, help: &str| {
            let m = Gauge::default();
            r.register(name, help, m.clone());
            m
        };
        FleetMetrics {
            connected: g(
                "fleet_connected",
                "1 while the fleet's store can be reached",
            ),
            applied: g(
                "fleet_applied_revision",
                "Newest store revision of services or health this node's tables include",
            ),
            newest: g(
                "fleet_revision",
                "Newest store revision of services or health this node knows of",
            ),
            lag: g(
                "fleet_lag_revisions",
                "Largest lag of a live node of the fleet, in revisions",
            ),
            nodes: g("fleet_nodes", "Live nodes of the fleet (leases running)"),
            disagree: g(
                "fleet_disagreeing_services",
                "Services whose table digest differs between live nodes",
            ),
            flow_hashes: g(
                "fleet_flow_hashes",
                "Distinct flow hashes (node.flow_hash and node.hash_seed) among live nodes: \
                 1 when they agree",
            ),
        }
    }

    pub fn set(&self, s: &FleetStatus) {
        self.connected.set(i64::from(s.connected));
        self.applied.set(s.applied);
        self.newest.set(s.revision);
        self.lag.set(s.max_lag());
        self.nodes.set(s.nodes.len() as i64);
        self.disagree.set(s.disagree.len() as i64);
        self.flow_hashes.set(s.flow_hashes.len() as i64);
    }
}

/// `lb fleet status`: a line per node, a column per service (digests in hex), then the
/// verdict.
pub fn render(s: &FleetStatus) -> String {
    let services: BTreeSet<&String> = s.nodes.iter().flat_map(|n| n.tables.keys()).collect();
    let mut out = format!(
        "fleet {}: services at revision {}, newest change {}, {} live nodes\n",
        s.prefix,
        s.services_revision,
        s.revision,
        s.nodes.len()
    );
    out.push_str(&format!(
        "{:<16} {:>9} {:>5} {:<6}",
        "NODE", "REVISION", "LAG", "HEALTH"
    ));
    for svc in &services {
        out.push_str(&format!(" {svc:<14}"));
    }
    out.push('\n');
    for n in &s.nodes {
        out.push_str(&format!(
            "{:<16} {:>9} {:>5} {:<6}",
            n.node,
            n.revision,
            n.lag,
            if n.health_view { "view" } else { "-" }
        ));
        for svc in &services {
            let d = n
                .tables
                .get(*svc)
                .map_or("-".to_string(), |d| format!("{d:014x}"));
            out.push_str(&format!(" {d:<14}"));
        }
        out.push('\n');
    }
    if s.agrees() {
        out.push_str("agreement: every live node has the same tables and flow hash\n");
    } else {
        if s.hashes_differ() {
            out.push_str(&format!(
                "DISAGREEMENT: the nodes hash flows differently ({}): a flow's backend \
                 depends on the node it reaches\n",
                s.hashes_by_node()
            ));
        }
        if !s.disagree.is_empty() {
            out.push_str(&format!(
                "DISAGREEMENT: the tables of {} differ between nodes\n",
                s.disagree.join(", ")
            ));
        }
        if s.max_lag() > 0 {
            out.push_str("LAG: some nodes have not applied the newest change yet\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::doc::NodeReport;

    #[test]
    fn a_node_with_another_digest_is_flagged_and_lag_counts_from_the_newest() {
        let mut s = FleetState {
            revision: 12,
            services_revision: 10,
            ..FleetState::default()
        };
        for (node, rev, digest) in [("lb0", 12, 7), ("lb1", 12, 7), ("lb2", 9, 5)] {
            s.reports.insert(
                node.into(),
                NodeReport {
                    revision: rev,
                    tables: [("web".to_string(), digest)].into(),
                },
            );
        }
        let st = FleetStatus::of("/lb/x", &s);
        assert_eq!(st.disagree, ["web"]);
        assert_eq!(
            st.nodes.iter().map(|n| n.lag).collect::<Vec<_>>(),
            [0, 0, 3]
        );
        let text = render(&st);
        assert!(text.contains("DISAGREEMENT: the tables of web"), "{text}");
        s.reports
            .get_mut("lb2")
            .unwrap()
            .tables
            .insert("web".into(), 7);
        s.reports.get_mut("lb2").unwrap().revision = 12;
        let st = FleetStatus::of("/lb/x", &s);
        assert!(st.disagree.is_empty());
        assert!(render(&st).contains("agreement"), "{}", render(&st));
    }

    #[test]
    fn nodes_that_hash_differently_are_named_and_those_that_publish_none_are_left_out() {
        let mut s = FleetState::default();
        for (node, hash) in [
            ("lb0", Some("murmur3 seed 7")),
            ("lb1", Some("multiply-shift seed 7")),
            ("lb2", Some("murmur3 seed 7")),
            ("lb3", None),
        ] {
            s.reports.insert(
                node.into(),
                NodeReport {
                    revision: 1,
                    tables: [("web".to_string(), 5)].into(),
                },
            );
            if let Some(h) = hash {
                s.hashes.insert(node.into(), h.into());
            }
        }
        let st = FleetStatus::of("/lb/x", &s);
        assert!(st.disagree.is_empty());
        assert!(st.hashes_differ());
        assert_eq!(st.flow_hashes["murmur3 seed 7"], ["lb0", "lb2"]);
        assert_eq!(st.flow_hashes["multiply-shift seed 7"], ["lb1"]);
        let text = render(&st);
        assert!(
            text.contains(
                "DISAGREEMENT: the nodes hash flows differently (multiply-shift seed 7 on lb1; \
                 murmur3 seed 7 on lb0, lb2)"
            ),
            "{text}"
        );
        assert!(!text.contains("agreement:"), "{text}");

        s.hashes.insert("lb1".into(), "murmur3 seed 7".into());
        let st = FleetStatus::of("/lb/x", &s);
        assert!(!st.hashes_differ());
        assert!(
            render(&st).contains("agreement: every live node has the same tables and flow hash")
        );
    }
}
