//! The `load` section of the configuration: what a backend reports, and which services'
//! weights the agent drives by the reports of their backends.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{law::Gains, measure::Source};
use crate::{config::Config, fleet::store::FleetConfig};

/// Where backends serve their reports unless `load.report_port` says otherwise.
pub const DEFAULT_REPORT_PORT: u16 = 9641;

/// `load`: both roles are optional; a node can report, control, or both.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// This node as a backend: measure its utilisation and serve it to the LB nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportConfig>,
    /// Services whose backends' effective weights follow their reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The port the backends serve their reports on (`http://BACKEND:PORT/load`).
    #[serde(default = "default_report_port")]
    pub report_port: u16,
    /// The control law's constants (docs/load.md).
    #[serde(default)]
    pub gains: Gains,
    /// The loop is frozen: effective weights stay as they are (`lb load freeze`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
    /// Where the effective weights are kept across agent restarts.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
}

/// As an empty `load` section reads.
impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            report: None,
            services: Vec::new(),
            report_port: default_report_port(),
            gains: Gains::default(),
            frozen: false,
            state_file: default_state_file(),
        }
    }
}

/// `load.report`: what this node measures and where it serves it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// `"host"`, `{"cgroup": "lb/web"}` or `{"file": "/run/app/load"}`.
    pub source: Source,
    /// Address of the report listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often the source is sampled, milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Publish the report to this fleet's store too (`usage/NODE` under a lease), `node`
    /// being this backend's address as the services name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
}

fn default_report_port() -> u16 {
    DEFAULT_REPORT_PORT
}
fn default_state_file() -> PathBuf {
    PathBuf::from("/run/lb/load.json")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_REPORT_PORT))
}
fn default_interval_ms() -> u64 {
    1000
}

impl LoadConfig {
    /// Whether `service`'s weights follow load.
    pub fn drives(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == service)
    }
}

/// Problems of the `load` section (part of `Config::problems`).
pub fn problems(config: &Config) -> Vec<String> {
    let Some(l) = &config.load else {
        return Vec::new();
    };
    let mut p = Vec::new();
    if let Err(e) = l.gains.check() {
        p.push(format!("load.gains: {e}"));
    }
    if l.report_port == 0 {
        p.push("load.report_port: 0 is not a port".into());
    }
    let names: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    let mut seen = BTreeSet::new();
    for s in &l.services {
        // In a fleet the services are the store's, and a store without one of these
        // must not be refused on every node: a name it lacks drives nothing.
        if config.fleet.is_none() && !names.contains(s.as_str()) {
            p.push(format!("load.services: no service named {s:?}"));
        }
        if !seen.insert(s) {
            p.push(format!("load.services: {s:?} is listed twice"));
        }
    }
    if let Some(r) = &l.report {
        if r.interval_ms == 0 {
            p.push("load.report.interval_ms: must be above 0".into());
        }
        if let Some(f) = &r.fleet {
            // The node's name is the key's last part; an address the LB nodes know.
            let named = f.node.parse::<std::net::IpAddr>().is_ok();
            let mut fp: Vec<String> = f
                .problems()
                .into_iter()
                .filter(|m| !m.starts_with("fleet.node"))
                .collect();
            if !named {
                fp.push(format!(
                    "fleet.node: {:?} must be this backend's address as the services name it",
                    f.node
                ));
            }
            p.extend(fp.into_iter().map(|m| format!("load.report.{m}")));
        }
        if let Source::Cgroup(name) = &r.source {
            if name.is_empty() || name.split('/').any(|c| c == "..") {
                p.push(format!(
                    "load.report.source: cgroup {name:?} is not a cgroup path"
                ));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_an_empty_section() {
        let empty: LoadConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, LoadConfig::default());
    }

    #[test]
    fn load_driven_services_work_in_a_fleet_and_a_published_report_names_its_address() {
        let mut v = serde_json::json!({
            "node": {"interfaces": ["eth0"], "address_v4": "10.0.0.1"},
            "services": [{"name": "web", "vip": "192.0.2.1", "port": 80, "protocol": "tcp",
                          "backends": [{"address": "10.0.1.1"}]}],
            "load": {"services": ["web"],
                     "report": {"source": "host", "fleet": {"endpoints": ["http://127.0.0.1:2379"],
                                "prefix": "/lb/t", "node": "10.0.1.1"}}},
            "fleet": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/lb/t", "node": "n1"}
        });
        let config: Config = serde_json::from_value(v.clone()).unwrap();
        assert!(problems(&config).is_empty(), "{:?}", problems(&config));
        let store_without_web = Config {
            services: Vec::new(),
            ..config.clone()
        };
        assert!(problems(&store_without_web).is_empty());
        let alone = Config {
            fleet: None,
            ..store_without_web
        };
        assert!(problems(&alone)
            .iter()
            .any(|m| m.contains("no service named")));
        v["load"]["report"]["fleet"]["node"] = "b1".into();
        v["load"]["report"]["fleet"]["prefix"] = "lb".into();
        let config: Config = serde_json::from_value(v).unwrap();
        let p = problems(&config);
        assert!(
            p.iter()
                .any(|m| m.starts_with("load.report.fleet.node: \"b1\" must be")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.starts_with("load.report.fleet.prefix")),
            "{p:?}"
        );
    }
}
