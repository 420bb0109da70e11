//! The load loop in a fleet (docs/load.md, docs/fleet.md): backends publish their reports
//! to the store under a lease (`usage/ADDRESS`); the LB nodes elect one controller (the
//! holder of the leased key `controller`), which alone runs the law and writes the
//! corrections (`load`) in a revision-checked transaction; every node, the leader too,
//! builds its tables from that document when its watch brings it, so all tables agree.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    law,
    report::{Latest, Wire},
};
use crate::fleet::{
    doc::USAGE,
    link::LEASE_TTL,
    store::{FleetConfig, Store, StoreError},
};

/// `PREFIX/load`: what the leader decided, which every node builds its tables from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadDoc {
    /// The node that wrote it.
    pub leader: String,
    /// `lb load freeze` on any node: the leader changes nothing while it is set.
    #[serde(default)]
    pub frozen: bool,
    /// Periods the leaders ran and weight changes they made.
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub changes: u64,
    /// Per service and backend: the correction and the utilisation the law used.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<IpAddr, Corrected>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corrected {
    pub correction: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A backend's side: publishes its latest sample as `usage/ADDRESS` every `every`, under
/// a lease, so the report goes when the backend does. `fleet.node` is the backend's
/// address as the services name it. Retries every second while the store is away.
pub async fn publish(fleet: FleetConfig, source: String, latest: Latest, every: Duration) {
    let name = format!("{USAGE}/{}", fleet.node);
    let mut failing = false;
    loop {
        match publish_session(&fleet, &name, &source, &latest, every).await {
            Ok(()) => return,
            Err(e) => {
                if !failing {
                    warn!(key = %name, "load: publishing the report to the fleet store failed: {e}; retrying every 1s");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn publish_session(
    fleet: &FleetConfig,
    name: &str,
    source: &str,
    latest: &Latest,
    every: Duration,
) -> Result<(), StoreError> {
    let mut store = Store::connect(fleet).await?;
    let mut lease = store.lease(LEASE_TTL).await?;
    info!(key = %name, prefix = %fleet.prefix, "load: publishing reports to the fleet store");
    let mut tick = tokio::time::interval(every.min(LEASE_TTL / 3));
    loop {
        tick.tick().await;
        lease.renew().await?;
        let sample = *latest.lock().expect("not poisoned");
        if let Some((u, at, wall)) = sample {
            store
                .put_leased(name, &Wire::of(u, source, at, wall), &lease)
                .await?;
        }
    }
}

/// The published reports as a round for the controller, dated on this node's clock from
/// their measuring time (the fleet's clocks must agree to well within `stale_after_ms`).
/// A key that does not name an address is left out.
pub fn round(usage: &BTreeMap<String, Wire>) -> super::report::Round {
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    usage
        .iter()
        .filter_map(|(addr, w)| {
            let age = Duration::from_millis(now_ms.saturating_sub(w.measured_unix_ms));
            let report = if w.utilisation.is_finite() {
                Ok(law::Report {
                    utilisation: w.utilisation,
                    at: now.checked_sub(age).unwrap_or(now),
                })
            } else {
                Err(format!("invalid figure {}", w.utilisation))
            };
            Some((addr.parse().ok()?, report))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_reports_are_dated_by_their_measuring_time() {
        let old = unix_ms(SystemTime::now()) - 30_000;
        let usage = BTreeMap::from([
            (
                "10.0.3.2".to_string(),
                Wire {
                    utilisation: 0.5,
                    source: "host".into(),
                    measured_unix_ms: old,
                    age_ms: 0,
                },
            ),
            (
                "not-an-address".to_string(),
                Wire {
                    utilisation: 0.5,
                    source: "host".into(),
                    measured_unix_ms: old,
                    age_ms: 0,
                },
            ),
        ]);
        let r = round(&usage);
        assert_eq!(r.len(), 1);
        let report = r[0].1.as_ref().unwrap();
        let age = report.at.elapsed();
        assert!(
            age >= Duration::from_secs(29) && age < Duration::from_secs(40),
            "{age:?}"
        );
    }
}
