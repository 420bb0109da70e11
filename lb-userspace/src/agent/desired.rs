//! The operator's intent: the configured services as changed by `lb` commands, and the
//! tables they ask of the data plane.
//!
//! A change is applied to a copy of the configuration, and the copy passes the same
//! validation as a file (`Config::problems`) before anything is written: a refused
//! command changes nothing, and says why as a file would.

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    key_of,
    programmer::{Desired, Member},
};
use crate::{
    api::{ApiError, Change, ErrorKind},
    config::{Config, ServiceConfig},
    table::BackendState,
};

/// Returns `config` with `change` applied, or why it cannot be.
pub fn apply(config: &Config, change: &Change) -> Result<Config, ApiError> {
    let mut next = config.clone();
    let services = &mut next.services;
    let find = |services: &[ServiceConfig], name: &str| -> Result<usize, ApiError> {
        services
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no service named {name:?}")))
    };
    let conflict = |m: String| Err(ApiError::new(ErrorKind::Conflict, m));
    match change {
        Change::ServiceAdd { service } => {
            if services.iter().any(|s| s.name == service.name) {
                return conflict(format!("a service named {:?} exists", service.name));
            }
            if let Some(s) = services.iter().find(|s| {
                (s.vip, s.port, s.protocol) == (service.vip, service.port, service.protocol)
            }) {
                return conflict(format!(
                    "{} {}:{} is already service {:?}",
                    service.protocol, service.vip, service.port, s.name
                ));
            }
            services.push(service.clone());
        }
        Change::ServiceRemove { service } => {
            let i = find(services, service)?;
            services.remove(i);
            if let Some(l) = &mut next.load {
                l.services.retain(|s| s != service);
            }
        }
        Change::BackendAdd { service, backend } => {
            let i = find(services, service)?;
            let s = &mut services[i];
            if s.backends.iter().any(|b| b.address == backend.address) {
                return conflict(format!(
                    "backend {} is already in service {service:?}",
                    backend.address
                ));
            }
            s.backends.push(backend.clone());
        }
        Change::BackendRemove { service, address }
        | Change::SetWeight {
            service, address, ..
        }
        | Change::Drain {
            service, address, ..
        } => {
            let i = find(services, service)?;
            let s = &mut services[i];
            let Some(j) = s.backends.iter().position(|b| b.address == *address) else {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("service {service:?} has no backend {address}"),
                ));
            };
            match change {
                Change::BackendRemove { .. } => {
                    s.backends.remove(j);
                }
                Change::SetWeight { weight, .. } => s.backends[j].weight = *weight,
                Change::Drain { drain, .. } => s.backends[j].drain = *drain,
                _ => unreachable!("matched above"),
            }
        }
    }
    let problems = next.problems();
    if problems.is_empty() {
        return Ok(next);
    }
    // Capacity only when nothing else is wrong: an invalid change is that first.
    let capacity = next.capacity_problems();
    let kind = if problems.iter().all(|p| capacity.contains(p)) {
        ErrorKind::Capacity
    } else {
        ErrorKind::Invalid
    };
    Err(ApiError::new(kind, problems.join("; ")))
}

/// The tables `services` ask for, with the backends `health` has down out of them.
pub fn wanted(
    services: &[ServiceConfig],
    health: &BTreeMap<(String, IpAddr), bool>,
) -> Vec<Desired> {
    wanted_weighted(services, health, &BTreeMap::new())
}

/// As `wanted`, each backend at its `effective` weight where the load controller set one
/// (docs/load.md).
pub fn wanted_weighted(
    services: &[ServiceConfig],
    health: &BTreeMap<(String, IpAddr), bool>,
    effective: &BTreeMap<(String, IpAddr), u32>,
) -> Vec<Desired> {
    services
        .iter()
        .map(|s| Desired {
            name: s.name.clone(),
            key: key_of(s),
            bits: s.bits(),
            members: s
                .backends
                .iter()
                .map(|b| Member {
                    address: b.address,
                    weight: effective
                        .get(&(s.name.clone(), b.address))
                        .copied()
                        .unwrap_or(b.weight),
                    state: if health.get(&(s.name.clone(), b.address)) == Some(&false) {
                        BackendState::Down
                    } else if b.drain || b.weight == 0 {
                        BackendState::Draining
                    } else {
                        BackendState::Active
                    },
                })
                .collect(),
        })
        .collect()
}

/// A change in a few words, for the log.
pub fn describe(change: &Change) -> String {
    match change {
        Change::ServiceAdd { service: s } => format!(
            "service add {} {} {}:{} ({} backends)",
            s.name,
            s.protocol,
            s.vip,
            s.port,
            s.backends.len()
        ),
        Change::ServiceRemove { service } => format!("service remove {service}"),
        Change::BackendAdd { service, backend } => format!(
            "backend add {service} {} weight {}",
            backend.address, backend.weight
        ),
        Change::BackendRemove { service, address } => {
            format!("backend remove {service} {address}")
        }
        Change::SetWeight {
            service,
            address,
            weight,
        } => format!("backend set-weight {service} {address} {weight}"),
        Change::Drain {
            service,
            address,
            drain,
        } => format!(
            "backend {} {service} {address}",
            if *drain { "drain" } else { "undrain" }
        ),
    }
}

/// The service a change is about.
pub fn service_of(change: &Change) -> &str {
    match change {
        Change::ServiceAdd { service } => &service.name,
        Change::ServiceRemove { service }
        | Change::BackendAdd { service, .. }
        | Change::BackendRemove { service, .. }
        | Change::SetWeight { service, .. }
        | Change::Drain { service, .. } => service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, ConfigError, Protocol};

    fn web() -> Config {
        let node = r#"{ "node": { "interfaces": ["eth0"], "address_v4": "10.0.0.2" } }"#;
        let mut c: Config = serde_json::from_str(node).unwrap();
        c.services = vec![ServiceConfig {
            name: "web".into(),
            vip: "10.100.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            table_bits: Some(8),
            backends: vec![backend("10.0.3.2")],
        }];
        c
    }

    fn backend(a: &str) -> BackendConfig {
        BackendConfig {
            address: a.parse().unwrap(),
            weight: 100,
            drain: false,
            health: None,
        }
    }

    #[test]
    fn refused_changes_name_the_problem_and_change_nothing() {
        let c = web();
        let s = &c.services[0];
        let addr = "10.0.3.2".parse().unwrap();
        let cases: Vec<(Change, ErrorKind, &str)> = vec![
            (
                Change::SetWeight {
                    service: "nope".into(),
                    address: addr,
                    weight: 1,
                },
                ErrorKind::NotFound,
                "no service named \"nope\"",
            ),
            (
                Change::SetWeight {
                    service: "web".into(),
                    address: addr,
                    weight: 70000,
                },
                ErrorKind::Invalid,
                "weight 70000 is above the maximum 65535",
            ),
            (
                Change::Drain {
                    service: "web".into(),
                    address: "10.9.9.9".parse().unwrap(),
                    drain: true,
                },
                ErrorKind::NotFound,
                "has no backend 10.9.9.9",
            ),
            (
                Change::BackendAdd {
                    service: "web".into(),
                    backend: s.backends[0].clone(),
                },
                ErrorKind::Conflict,
                "backend 10.0.3.2 is already in service",
            ),
            (
                Change::BackendAdd {
                    service: "web".into(),
                    backend: backend("2001:db8::5"),
                },
                ErrorKind::Invalid,
                "services[0] (web): backend 2001:db8::5 is IPv6 but the node has no address_v6",
            ),
            (
                Change::ServiceAdd {
                    service: ServiceConfig {
                        name: "web2".into(),
                        ..s.clone()
                    },
                },
                ErrorKind::Conflict,
                "is already service \"web\"",
            ),
            (
                Change::ServiceAdd {
                    service: ServiceConfig {
                        table_bits: Some(2),
                        name: "x".into(),
                        port: 81,
                        ..s.clone()
                    },
                },
                ErrorKind::Invalid,
                "table_bits: 2 is out of range",
            ),
            (
                Change::ServiceAdd {
                    service: ServiceConfig {
                        table_bits: Some(20),
                        name: "big".into(),
                        port: 81,
                        ..s.clone()
                    },
                },
                ErrorKind::Capacity,
                "the tables need 2097664 buckets (each double-buffered), agent.bucket_slots \
                 is 2097152",
            ),
        ];
        for (change, kind, want) in cases {
            let e = apply(&c, &change).unwrap_err();
            assert_eq!(e.kind, kind, "{change:?}: {e}");
            assert!(e.message.contains(want), "{change:?}: {e}");
        }
        assert_eq!(c, web());
    }

    #[test]
    fn a_command_is_refused_with_the_message_a_file_gets() {
        let mut file = web();
        file.services[0].backends.push(backend("2001:db8::5"));
        let text = serde_json::to_vec(&file).unwrap();
        let Err(ConfigError::Invalid { problems, .. }) =
            Config::parse(std::path::Path::new("lb.json"), &text)
        else {
            panic!("the file is refused")
        };
        let e = apply(
            &web(),
            &Change::BackendAdd {
                service: "web".into(),
                backend: backend("2001:db8::5"),
            },
        )
        .unwrap_err();
        assert_eq!(e.message, problems.join("; "));
    }

    #[test]
    fn accepted_changes() {
        let addr = "10.0.3.2".parse().unwrap();
        let c = apply(
            &web(),
            &Change::SetWeight {
                service: "web".into(),
                address: addr,
                weight: 7,
            },
        )
        .unwrap();
        assert_eq!(c.services[0].backends[0].weight, 7);
        let c = apply(
            &c,
            &Change::Drain {
                service: "web".into(),
                address: addr,
                drain: true,
            },
        )
        .unwrap();
        assert!(c.services[0].backends[0].drain);
        let c = apply(
            &c,
            &Change::BackendRemove {
                service: "web".into(),
                address: addr,
            },
        )
        .unwrap();
        assert!(c.services[0].backends.is_empty());
        let c = apply(
            &c,
            &Change::ServiceRemove {
                service: "web".into(),
            },
        )
        .unwrap();
        assert!(c.services.is_empty());
    }

    #[test]
    fn a_removed_service_leaves_the_load_loop_and_effective_weights_go_into_tables() {
        let mut c = web();
        c.load = Some(crate::load::config::LoadConfig {
            services: vec!["web".into()],
            ..Default::default()
        });
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let addr: IpAddr = "10.0.3.2".parse().unwrap();
        let effective = BTreeMap::from([(("web".to_string(), addr), 37)]);
        let w = wanted_weighted(&c.services, &BTreeMap::new(), &effective);
        assert_eq!(w[0].members[0].weight, 37);
        assert_eq!(
            wanted(&c.services, &BTreeMap::new())[0].members[0].weight,
            100
        );
        let next = apply(
            &c,
            &Change::ServiceRemove {
                service: "web".into(),
            },
        )
        .unwrap();
        assert!(next.load.unwrap().services.is_empty());
    }
}
