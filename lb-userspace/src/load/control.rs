//! The controller in the agent: per service that opts in (`load.services`), every period
//! the law turns the backends' latest reports into effective weights, which the tables
//! are built from. Frozen (`load.frozen`, `lb load freeze`), it keeps the effective
//! weights as they are. The corrections are kept in `load.state_file` so that an agent
//! restart keeps the tables where the loop had brought them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    fleet::{Corrected, LoadDoc},
    law::{Decision, Gains, Input, Law, Report},
};
use crate::config::Config;

/// What `lb list` shows of a backend whose service follows load.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct BackendLoad {
    /// The weight the table is built from (the configured one times the correction).
    pub effective_weight: u32,
    pub correction: f64,
    /// The smoothed utilisation the law used, when the backend had a fresh report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
    /// The latest report's figure and age, when one arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_age_ms: Option<u64>,
    /// Why the latest fetch failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_error: Option<String>,
}

/// The loop as a whole, in `lb list --json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct LoadStatus {
    pub frozen: bool,
    pub period_ms: u64,
    /// Periods run and effective-weight changes made since the agent started (in a
    /// fleet: by the leaders, as the store has it).
    pub steps: u64,
    pub changes: u64,
    /// In a fleet: the node that runs the law.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// The controller's next step (`lb plan load`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct LoadPlan {
    pub frozen: bool,
    pub services: Vec<ServiceStep>,
}

/// One service's next step: the weights it would set and the buckets that would move.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ServiceStep {
    pub backends: Vec<NextWeight>,
    pub plan: crate::api::PlanSummary,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NextWeight {
    pub address: IpAddr,
    pub configured: u32,
    pub effective: u32,
    pub next: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
}

/// One effective weight that a period changed.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightChange {
    pub service: String,
    pub backend: IpAddr,
    pub configured: u32,
    pub from: u32,
    pub to: u32,
    pub utilisation: Option<f64>,
}

/// The corrections as `load.state_file` keeps them.
#[derive(Debug, Default, Deserialize, Serialize)]
struct Saved {
    corrections: BTreeMap<String, BTreeMap<IpAddr, f64>>,
}

#[derive(Clone, Debug)]
pub struct Controller {
    gains: Gains,
    laws: BTreeMap<String, Law>,
    /// Each backend's latest report, or why the latest fetch failed.
    reports: BTreeMap<IpAddr, Result<Report, String>>,
    /// Last good report per backend (kept when a fetch fails: it ages into staleness).
    last_good: BTreeMap<IpAddr, Report>,
    decisions: BTreeMap<(String, IpAddr), Decision>,
    pub steps: u64,
    pub changes: u64,
}

impl Controller {
    pub fn new(gains: Gains) -> Self {
        Controller {
            gains,
            laws: BTreeMap::new(),
            reports: BTreeMap::new(),
            last_good: BTreeMap::new(),
            decisions: BTreeMap::new(),
            steps: 0,
            changes: 0,
        }
    }

    /// A controller that starts from the corrections `state` (a state file's bytes)
    /// holds for the services `config` drives; unreadable state is ignored.
    pub fn restore(config: &Config, state: Option<&[u8]>) -> Self {
        let load = config.load.clone().unwrap_or_default();
        let mut c = Controller::new(load.gains.clone());
        let saved: Saved = state
            .and_then(|s| serde_json::from_slice(s).ok())
            .unwrap_or_default();
        for s in config.services.iter().filter(|s| load.drives(&s.name)) {
            let Some(corr) = saved.corrections.get(&s.name) else {
                continue;
            };
            let law = c.law(&s.name);
            for b in &s.backends {
                if let Some(k) = corr.get(&b.address) {
                    law.seed(b.address, *k);
                }
            }
            for b in &s.backends {
                let k = corr.get(&b.address).copied().unwrap_or(1.0);
                c.decisions.insert(
                    (s.name.clone(), b.address),
                    Decision {
                        backend: b.address,
                        configured: b.weight,
                        effective: super::law::effective(b.weight, k),
                        correction: k,
                        utilisation: None,
                    },
                );
            }
        }
        c
    }

    /// The state file's bytes for the current corrections.
    pub fn state(&self) -> Vec<u8> {
        let mut saved = Saved::default();
        for ((s, b), d) in &self.decisions {
            saved
                .corrections
                .entry(s.clone())
                .or_default()
                .insert(*b, d.correction);
        }
        let mut v = serde_json::to_vec_pretty(&saved).expect("state serializes");
        v.push(b'\n');
        v
    }

    /// New gains (a reload): the laws start again from their current corrections.
    pub fn set_gains(&mut self, gains: Gains) {
        if gains != self.gains {
            self.gains = gains;
            self.laws.clear();
            for ((s, b), d) in &self.decisions {
                let mut law = self
                    .laws
                    .remove(s)
                    .unwrap_or_else(|| Law::new(self.gains.clone()));
                law.seed(*b, d.correction);
                self.laws.insert(s.clone(), law);
            }
        }
    }

    pub fn gains(&self) -> &Gains {
        &self.gains
    }

    fn law(&mut self, service: &str) -> &mut Law {
        let g = &self.gains;
        self.laws
            .entry(service.to_string())
            .or_insert_with(|| Law::new(g.clone()))
    }

    /// The backends whose reports the driven services need.
    pub fn wanted_reports(config: &Config) -> Vec<IpAddr> {
        let Some(load) = &config.load else {
            return Vec::new();
        };
        let mut v: Vec<IpAddr> = config
            .services
            .iter()
            .filter(|s| load.drives(&s.name))
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Takes in a round of fetched reports.
    pub fn record(&mut self, reports: Vec<(IpAddr, Result<Report, String>)>) {
        for (b, r) in reports {
            if let Ok(r) = &r {
                self.last_good.insert(b, *r);
            }
            self.reports.insert(b, r);
        }
    }

    /// One period of every driven service: the effective weights that changed. Frozen,
    /// nothing changes (but services no longer driven are let go).
    pub fn step(
        &mut self,
        now: Instant,
        config: &Config,
        health: &BTreeMap<(String, IpAddr), bool>,
    ) -> Vec<WeightChange> {
        let load = config.load.clone().unwrap_or_default();
        let driven: Vec<_> = config
            .services
            .iter()
            .filter(|s| load.drives(&s.name))
            .collect();
        self.laws
            .retain(|name, _| driven.iter().any(|s| s.name == *name));
        self.decisions.retain(|(name, b), _| {
            driven
                .iter()
                .any(|s| s.name == *name && s.backends.iter().any(|x| x.address == *b))
        });
        let wanted = Self::wanted_reports(config);
        self.reports.retain(|b, _| wanted.contains(b));
        self.last_good.retain(|b, _| wanted.contains(b));
        if load.frozen {
            return Vec::new();
        }
        self.steps += 1;
        let mut changes = Vec::new();
        for s in driven {
            let inputs: Vec<Input> = s
                .backends
                .iter()
                .map(|b| Input {
                    backend: b.address,
                    configured: b.weight,
                    in_table: !b.drain
                        && b.weight > 0
                        && health.get(&(s.name.clone(), b.address)) != Some(&false),
                    report: self.last_good.get(&b.address).copied(),
                })
                .collect();
            let decisions = self.law(&s.name).step(now, &inputs);
            for d in decisions {
                let key = (s.name.clone(), d.backend);
                let from = self
                    .decisions
                    .get(&key)
                    .map_or(d.configured, |p| p.effective);
                if from != d.effective {
                    changes.push(WeightChange {
                        service: s.name.clone(),
                        backend: d.backend,
                        configured: d.configured,
                        from,
                        to: d.effective,
                        utilisation: d.utilisation,
                    });
                }
                self.decisions.insert(key, d);
            }
        }
        self.changes += changes.len() as u64;
        changes
    }

    /// The effective weights now, by (service, backend).
    pub fn effective(&self) -> BTreeMap<(String, IpAddr), u32> {
        self.decisions
            .iter()
            .map(|(k, d)| (k.clone(), d.effective))
            .collect()
    }

    /// The effective weights of `services`' backends: each one's configured weight now
    /// times its correction, so a new configured weight counts at once, corrected.
    pub fn effective_of(
        &self,
        services: &[crate::config::ServiceConfig],
    ) -> BTreeMap<(String, IpAddr), u32> {
        let mut w = BTreeMap::new();
        for s in services {
            for b in &s.backends {
                let key = (s.name.clone(), b.address);
                if let Some(d) = self.decisions.get(&key) {
                    w.insert(key, super::law::effective(b.weight, d.correction));
                }
            }
        }
        w
    }

    /// What `lb list` shows of a backend of a driven service.
    pub fn backend(&self, service: &str, backend: IpAddr, configured: u32) -> BackendLoad {
        let d = self.decisions.get(&(service.to_string(), backend));
        let report = self.reports.get(&backend);
        BackendLoad {
            effective_weight: d.map_or(configured, |d| d.effective),
            correction: d.map_or(1.0, |d| d.correction),
            utilisation: d.and_then(|d| d.utilisation),
            reported: self.last_good.get(&backend).map(|r| r.utilisation),
            report_age_ms: self
                .last_good
                .get(&backend)
                .map(|r| r.at.elapsed().as_millis() as u64),
            report_error: report.and_then(|r| r.as_ref().err().cloned()),
        }
    }

    pub fn status(&self, frozen: bool) -> LoadStatus {
        LoadStatus {
            frozen,
            period_ms: self.gains.period_ms,
            steps: self.steps,
            changes: self.changes,
            leader: None,
        }
    }

    /// In a fleet, as the leader: one period of the law, as a document to write, when a
    /// weight changes (or the store has none yet). The tables do not take it from here:
    /// every node, this one too, takes it from the store ([`Controller::adopt`]).
    pub fn propose(
        &mut self,
        now: Instant,
        config: &Config,
        health: &BTreeMap<(String, IpAddr), bool>,
        current: Option<&LoadDoc>,
        leader: &str,
    ) -> Option<(LoadDoc, Vec<WeightChange>)> {
        let mut next = self.clone();
        let changes = next.step(now, config, health);
        // The laws move on (their smoothing); the decisions wait for the store.
        self.laws = next.laws;
        if changes.is_empty() && current.is_some() {
            return None;
        }
        let mut doc = current.cloned().unwrap_or_default();
        doc.leader = leader.to_string();
        doc.steps += 1;
        doc.changes += changes.len() as u64;
        doc.services.clear();
        for ((s, b), d) in &next.decisions {
            doc.services.entry(s.clone()).or_default().insert(
                *b,
                Corrected {
                    correction: d.correction,
                    utilisation: d.utilisation,
                },
            );
        }
        Some((doc, changes))
    }

    /// In a fleet: the corrections the leader wrote become this node's effective weights
    /// (and the laws' starting point, should this node lead next). Returns the effective
    /// weights that changed.
    pub fn adopt(&mut self, doc: &LoadDoc, config: &Config) -> Vec<WeightChange> {
        let load = config.load.clone().unwrap_or_default();
        let mut changes = Vec::new();
        let mut decisions = BTreeMap::new();
        for s in config.services.iter().filter(|s| load.drives(&s.name)) {
            let corrected = doc.services.get(&s.name);
            for b in &s.backends {
                let c = corrected.and_then(|c| c.get(&b.address));
                let correction = c.map_or(1.0, |c| c.correction);
                let d = Decision {
                    backend: b.address,
                    configured: b.weight,
                    effective: super::law::effective(b.weight, correction),
                    correction,
                    utilisation: c.and_then(|c| c.utilisation),
                };
                let key = (s.name.clone(), b.address);
                let from = self.decisions.get(&key).map_or(b.weight, |p| p.effective);
                if from != d.effective {
                    changes.push(WeightChange {
                        service: s.name.clone(),
                        backend: b.address,
                        configured: b.weight,
                        from,
                        to: d.effective,
                        utilisation: d.utilisation,
                    });
                }
                self.law(&s.name).correct(b.address, correction);
                decisions.insert(key, d);
            }
        }
        self.decisions = decisions;
        self.steps = doc.steps;
        self.changes = doc.changes;
        changes
    }

    /// How long a fetch may take: within a period, and never long.
    pub fn fetch_timeout(&self) -> Duration {
        (self.gains.period() / 2).min(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(frozen: bool) -> Config {
        let text = format!(
            r#"{{"node": {{"interfaces": ["eth0"], "address_v4": "10.0.0.1"}},
            "services": [{{"name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
                "backends": [{{"address": "10.3.0.2"}}, {{"address": "10.3.0.3"}}]}}],
            "load": {{"services": ["web"], "frozen": {frozen}}}}}"#
        );
        Config::parse(std::path::Path::new("lb.json"), text.as_bytes()).unwrap()
    }

    fn reports(c: &mut Controller, busy: f64, idle: f64) {
        let at = Instant::now();
        let (a, b) = ("10.3.0.2".parse().unwrap(), "10.3.0.3".parse().unwrap());
        c.record(vec![
            (
                a,
                Ok(Report {
                    utilisation: busy,
                    at,
                }),
            ),
            (
                b,
                Ok(Report {
                    utilisation: idle,
                    at,
                }),
            ),
        ]);
    }

    #[test]
    fn the_busier_backend_loses_weight_and_a_frozen_loop_changes_nothing() {
        let cfg = config(false);
        let mut c = Controller::restore(&cfg, None);
        let health = BTreeMap::new();
        reports(&mut c, 0.9, 0.3);
        let changes = c.step(Instant::now(), &cfg, &health);
        assert_eq!(changes.len(), 2, "{changes:?}");
        let w = c.effective();
        let busy = w[&("web".to_string(), "10.3.0.2".parse().unwrap())];
        let idle = w[&("web".to_string(), "10.3.0.3".parse().unwrap())];
        assert!(busy < 100 && idle > 100, "{busy} {idle}");
        // Kept across a restart through the state file.
        let again = Controller::restore(&cfg, Some(&c.state()));
        assert_eq!(again.effective(), w);
        assert_eq!(c.effective_of(&cfg.services), w);
        // A new configured weight counts at once, with the backend's correction.
        let mut doubled = cfg.services.clone();
        doubled[0].backends[0].weight = 200;
        let busy_key = ("web".to_string(), "10.3.0.2".parse().unwrap());
        assert_eq!(c.effective_of(&doubled)[&busy_key], 2 * busy);
        // Frozen: reports go on, weights stay.
        let frozen = config(true);
        reports(&mut c, 0.95, 0.1);
        assert!(c.step(Instant::now(), &frozen, &health).is_empty());
        assert_eq!(c.effective(), w);
    }

    #[test]
    fn in_a_fleet_the_leader_proposes_and_every_node_adopts_the_store_s_weights() {
        let cfg = config(false);
        let health = BTreeMap::new();
        let mut leader = Controller::restore(&cfg, None);
        reports(&mut leader, 0.9, 0.3);
        let (doc, changes) = leader
            .propose(Instant::now(), &cfg, &health, None, "lb0")
            .expect("a first document");
        assert_eq!(
            (changes.len(), doc.leader.as_str(), doc.steps),
            (2, "lb0", 1)
        );
        // Nothing applied until the store brings it back.
        assert!(leader.effective().is_empty());
        let mut follower = Controller::restore(&cfg, None);
        let adopted = follower.adopt(&doc, &cfg);
        assert_eq!(adopted.len(), 2);
        assert_eq!(leader.adopt(&doc, &cfg).len(), 2);
        assert_eq!(follower.effective(), leader.effective());
        let busy = ("web".to_string(), "10.3.0.2".parse().unwrap());
        assert!(follower.effective()[&busy] < 100);
        // The leader's law goes on from the store's corrections.
        reports(&mut leader, 0.9, 0.3);
        let (next, _) = leader
            .propose(
                Instant::now() + Duration::from_secs(3),
                &cfg,
                &health,
                Some(&doc),
                "lb0",
            )
            .expect("still apart: another step");
        let c = |d: &LoadDoc| d.services["web"][&busy.1].correction;
        assert!(c(&next) < c(&doc), "{} then {}", c(&doc), c(&next));
        assert_eq!(next.steps, 2);
    }

    #[test]
    fn a_missing_or_failed_report_leaves_the_weights() {
        let cfg = config(false);
        let mut c = Controller::restore(&cfg, None);
        let a: IpAddr = "10.3.0.2".parse().unwrap();
        c.record(vec![(a, Err("connection refused".into()))]);
        assert!(c.step(Instant::now(), &cfg, &BTreeMap::new()).is_empty());
        let b = c.backend("web", a, 100);
        assert_eq!(b.effective_weight, 100);
        assert_eq!(b.report_error.as_deref(), Some("connection refused"));
    }
}
