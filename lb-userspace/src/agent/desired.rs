//! The operator's intent: the configured services as changed by `lb` commands. Changes
//! are checked here, before anything is written, so a refused command changes nothing.

use crate::{
    api::Change,
    config::{backend_problems, service_problems, ServiceConfig},
};

/// Returns the services with `change` applied, or why it cannot be.
pub fn apply(services: &[ServiceConfig], change: &Change) -> Result<Vec<ServiceConfig>, String> {
    let mut next = services.to_vec();
    let find = |next: &mut Vec<ServiceConfig>, name: &str| -> Result<usize, String> {
        next.iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("no service named {name:?}"))
    };
    match change {
        Change::ServiceAdd { service } => {
            let problems = service_problems(service);
            if !problems.is_empty() {
                return Err(format!("service {}: {}", service.name, problems.join("; ")));
            }
            if next.iter().any(|s| s.name == service.name) {
                return Err(format!("a service named {:?} exists", service.name));
            }
            if let Some(s) = next.iter().find(|s| {
                (s.vip, s.port, s.protocol) == (service.vip, service.port, service.protocol)
            }) {
                return Err(format!(
                    "{} {}:{} is already service {:?}",
                    service.protocol, service.vip, service.port, s.name
                ));
            }
            if next.len() >= lb_common::limits::MAX_SERVICES as usize {
                return Err(format!(
                    "at most {} services",
                    lb_common::limits::MAX_SERVICES
                ));
            }
            next.push(service.clone());
        }
        Change::ServiceRemove { service } => {
            let i = find(&mut next, service)?;
            next.remove(i);
        }
        Change::BackendAdd { service, backend } => {
            let i = find(&mut next, service)?;
            let problems = backend_problems(backend);
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            let s = &mut next[i];
            if s.backends.iter().any(|b| b.address == backend.address) {
                return Err(format!(
                    "backend {} is already in service {service:?}",
                    backend.address
                ));
            }
            s.backends.push(backend.clone());
            let problems = service_problems(s);
            if !problems.is_empty() {
                return Err(format!("service {service}: {}", problems.join("; ")));
            }
        }
        Change::BackendRemove { service, address }
        | Change::SetWeight {
            service, address, ..
        }
        | Change::Drain {
            service, address, ..
        } => {
            let i = find(&mut next, service)?;
            let s = &mut next[i];
            let Some(j) = s.backends.iter().position(|b| b.address == *address) else {
                return Err(format!("service {service:?} has no backend {address}"));
            };
            match change {
                Change::BackendRemove { .. } => {
                    s.backends.remove(j);
                }
                Change::SetWeight { weight, .. } => {
                    let mut b = s.backends[j].clone();
                    b.weight = *weight;
                    let problems = backend_problems(&b);
                    if !problems.is_empty() {
                        return Err(problems.join("; "));
                    }
                    s.backends[j] = b;
                }
                Change::Drain { drain, .. } => s.backends[j].drain = *drain,
                _ => unreachable!("matched above"),
            }
        }
    }
    Ok(next)
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
    use crate::config::{BackendConfig, Protocol};

    fn web() -> Vec<ServiceConfig> {
        vec![ServiceConfig {
            name: "web".into(),
            vip: "10.100.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            table_bits: Some(8),
            backends: vec![BackendConfig {
                address: "10.0.3.2".parse().unwrap(),
                weight: 100,
                drain: false,
                health: None,
            }],
        }]
    }

    #[test]
    fn refused_changes_name_the_problem_and_change_nothing() {
        let s = web();
        let addr = "10.0.3.2".parse().unwrap();
        let cases: Vec<(Change, &str)> = vec![
            (
                Change::SetWeight {
                    service: "nope".into(),
                    address: addr,
                    weight: 1,
                },
                "no service named \"nope\"",
            ),
            (
                Change::SetWeight {
                    service: "web".into(),
                    address: addr,
                    weight: 70000,
                },
                "weight 70000 is above the maximum 65535",
            ),
            (
                Change::Drain {
                    service: "web".into(),
                    address: "10.9.9.9".parse().unwrap(),
                    drain: true,
                },
                "has no backend 10.9.9.9",
            ),
            (
                Change::BackendAdd {
                    service: "web".into(),
                    backend: s[0].backends[0].clone(),
                },
                "backend 10.0.3.2 is already in service",
            ),
            (
                Change::ServiceAdd {
                    service: ServiceConfig {
                        name: "web2".into(),
                        ..s[0].clone()
                    },
                },
                "is already service \"web\"",
            ),
            (
                Change::ServiceAdd {
                    service: ServiceConfig {
                        table_bits: Some(2),
                        name: "x".into(),
                        port: 81,
                        ..s[0].clone()
                    },
                },
                "table_bits: 2 is out of range",
            ),
        ];
        for (c, want) in cases {
            let e = apply(&s, &c).unwrap_err();
            assert!(e.contains(want), "{c:?}: {e}");
        }
        assert_eq!(s, web());
    }

    #[test]
    fn accepted_changes() {
        let addr = "10.0.3.2".parse().unwrap();
        let s = apply(
            &web(),
            &Change::SetWeight {
                service: "web".into(),
                address: addr,
                weight: 7,
            },
        )
        .unwrap();
        assert_eq!(s[0].backends[0].weight, 7);
        let s = apply(
            &s,
            &Change::Drain {
                service: "web".into(),
                address: addr,
                drain: true,
            },
        )
        .unwrap();
        assert!(s[0].backends[0].drain);
        let s = apply(
            &s,
            &Change::BackendRemove {
                service: "web".into(),
                address: addr,
            },
        )
        .unwrap();
        assert!(s[0].backends.is_empty());
        let s = apply(
            &s,
            &Change::ServiceRemove {
                service: "web".into(),
            },
        )
        .unwrap();
        assert!(s.is_empty());
    }
}
