//! What a reload changes and what it leaves for a restart, one line each for the
//! operator (`lb reload`) and the log.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;
use serde_json::Value;

use crate::config::{BackendConfig, ServiceConfig};

/// The settings under `section` that differ between `running` and `file`, as
/// `section.field: old -> new`; they take effect only with a restart.
pub fn ignored<T: Serialize>(running: &T, file: &T, section: &str) -> Vec<String> {
    let (Ok(Value::Object(old)), Ok(Value::Object(new))) =
        (serde_json::to_value(running), serde_json::to_value(file))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(unset)".to_string(), Value::to_string);
            format!(
                "{section}.{k}: {} -> {} (takes effect after a restart)",
                show(old.get(k)),
                show(new.get(k))
            )
        })
        .collect()
}

/// Services and backends added, removed or changed between `old` and `new`.
pub fn service_changes(old: &[ServiceConfig], new: &[ServiceConfig]) -> Vec<String> {
    let mut out = Vec::new();
    let old_by: BTreeMap<&str, &ServiceConfig> = old.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_by: BTreeMap<&str, &ServiceConfig> = new.iter().map(|s| (s.name.as_str(), s)).collect();
    for name in old_by.keys().filter(|n| !new_by.contains_key(*n)) {
        out.push(format!("service {name}: removed"));
    }
    for (name, n) in &new_by {
        let Some(o) = old_by.get(name) else {
            out.push(format!(
                "service {name}: added ({} {}:{}, {} backends)",
                n.protocol,
                n.vip,
                n.port,
                n.backends.len()
            ));
            continue;
        };
        if (o.vip, o.port, o.protocol, o.table_bits) != (n.vip, n.port, n.protocol, n.table_bits) {
            out.push(format!(
                "service {name}: {} {}:{} table_bits {:?} -> {} {}:{} table_bits {:?}",
                o.protocol, o.vip, o.port, o.table_bits, n.protocol, n.vip, n.port, n.table_bits
            ));
        }
        out.extend(backend_changes(name, &o.backends, &n.backends));
    }
    out
}

fn backend_changes(service: &str, old: &[BackendConfig], new: &[BackendConfig]) -> Vec<String> {
    let mut out = Vec::new();
    let old_by: BTreeMap<IpAddr, &BackendConfig> = old.iter().map(|b| (b.address, b)).collect();
    let new_by: BTreeMap<IpAddr, &BackendConfig> = new.iter().map(|b| (b.address, b)).collect();
    for a in old_by.keys().filter(|a| !new_by.contains_key(a)) {
        out.push(format!("service {service}: backend {a} removed"));
    }
    for (a, n) in &new_by {
        let Some(o) = old_by.get(a) else {
            out.push(format!(
                "service {service}: backend {a} added (weight {})",
                n.weight
            ));
            continue;
        };
        let mut what = Vec::new();
        if o.weight != n.weight {
            what.push(format!("weight {} -> {}", o.weight, n.weight));
        }
        if o.drain != n.drain {
            what.push(if n.drain { "drained" } else { "undrained" }.to_string());
        }
        if o.health != n.health {
            what.push("health check changed".to_string());
        }
        if !what.is_empty() {
            out.push(format!(
                "service {service}: backend {a} {}",
                what.join(", ")
            ));
        }
    }
    out
}

/// `backend_vips: +added -removed`.
pub fn vips_change(old: &[IpAddr], new: &[IpAddr]) -> String {
    let added: Vec<String> = new
        .iter()
        .filter(|v| !old.contains(v))
        .map(|v| format!("+{v}"))
        .collect();
    let removed: Vec<String> = old
        .iter()
        .filter(|v| !new.contains(v))
        .map(|v| format!("-{v} (left on lo)"))
        .collect();
    format!("backend_vips: {}", [added, removed].concat().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeSettings, Protocol};

    fn web(backends: &[(&str, u32, bool)]) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            vip: "10.100.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            table_bits: None,
            backends: backends
                .iter()
                .map(|(a, w, d)| BackendConfig {
                    address: a.parse().unwrap(),
                    weight: *w,
                    drain: *d,
                    health: None,
                })
                .collect(),
        }
    }

    #[test]
    fn changes_name_each_backend() {
        let old = [web(&[("10.3.0.2", 100, false), ("10.3.0.3", 100, false)])];
        let new = [web(&[("10.3.0.2", 50, true), ("10.3.0.4", 100, false)])];
        assert_eq!(
            service_changes(&old, &new),
            vec![
                "service web: backend 10.3.0.3 removed",
                "service web: backend 10.3.0.2 weight 100 -> 50, drained",
                "service web: backend 10.3.0.4 added (weight 100)",
            ]
        );
        assert!(service_changes(&new, &new).is_empty());
    }

    #[test]
    fn node_settings_that_differ_are_named() {
        let node = NodeSettings {
            interfaces: vec!["eth0".into()],
            address_v4: Some("10.0.0.1".parse().unwrap()),
            address_v6: None,
            gue_port: 6080,
            hash_seed: 1,
            flow_hash: Default::default(),
            xdp_mode: Default::default(),
        };
        let other = NodeSettings {
            hash_seed: 2,
            ..node.clone()
        };
        assert_eq!(
            ignored(&node, &other, "node"),
            vec!["node.hash_seed: 1 -> 2 (takes effect after a restart)"]
        );
        assert!(ignored(&node, &node, "node").is_empty());
    }
}
