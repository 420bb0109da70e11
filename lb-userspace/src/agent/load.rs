//! The agent's side of load-driven weights (docs/load.md): rounds of backend reports go
//! through the controller, whose effective weights the tables are built from; the freeze
//! switch is kept in the config file as the rest of the operator's intent is.

use std::time::Instant;

use tracing::{error, info, warn};

use super::{chain, desired, key_of, persist, server::Caller, Agent};
use crate::{
    api::{ErrorKind, Response},
    config::Config,
    load::{
        config::LoadConfig,
        control::{Controller, LoadPlan, NextWeight, ServiceStep, WeightChange},
        report::{Round, Targets},
    },
};

impl Agent {
    /// The controller as the state file left it.
    pub(super) fn restore_load(config: &Config) -> Controller {
        if config.fleet.is_some() {
            // In a fleet the store has the corrections (and the first tables are built
            // once it answers), not this node's file.
            return Controller::restore(config, None);
        }
        let state = config
            .load
            .as_ref()
            .and_then(|l| std::fs::read(&l.state_file).ok());
        let c = Controller::restore(config, state.as_deref());
        if state.is_some() && !c.effective().is_empty() {
            info!(
                weights = c.effective().len(),
                "load: effective weights restored"
            );
        }
        c
    }

    /// Tells the fetcher which backends to ask, how and how often.
    pub(super) fn update_load_targets(&mut self) {
        let Some(tx) = &self.load_targets else {
            return;
        };
        let load = self.config.load.clone().unwrap_or_default();
        // In a fleet the reports come from the store.
        let backends = if self.config.fleet.is_some() {
            Vec::new()
        } else {
            Controller::wanted_reports(&self.config)
        };
        let want = Targets {
            backends,
            port: load.report_port,
            period: load.gains.period(),
            timeout: self.load.fetch_timeout(),
        };
        tx.send_if_modified(|t| {
            let changed = *t != want;
            *t = want;
            changed
        });
    }

    /// A round of reports: one period of the law; changed weights are logged, kept and
    /// put into the tables.
    pub(super) fn load_round(&mut self, round: Round) {
        for (b, r) in &round {
            if let Err(e) = r {
                // Logged when it starts failing, not every period.
                if !self.load_failing.contains(b) {
                    warn!(backend = %b, "load: no report: {e}");
                }
            }
        }
        self.load_failing = round
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(b, _)| *b)
            .collect();
        self.load.record(round);
        let changes = self.load.step(Instant::now(), &self.config, &self.health);
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            log_change(c, None);
        }
        self.save_load_state();
        self.resync("load");
    }

    fn save_load_state(&self) {
        let Some(l) = &self.config.load else { return };
        if let Some(dir) = l.state_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = persist::write_atomic(&l.state_file, &self.load.state()) {
            error!(
                "load: keeping the effective weights in {}: {e}",
                l.state_file.display()
            );
        }
    }

    /// `lb load freeze|resume`: written to the config file first, as every change.
    pub(super) fn load_freeze(&mut self, frozen: bool, caller: Caller) -> Response {
        let load = self.config.load.clone().unwrap_or_default();
        if load.frozen == frozen {
            return Response::Done {
                message: format!("the load loop is already {}", word(frozen)),
            };
        }
        let next = Some(LoadConfig { frozen, ..load });
        let after = Config {
            load: next.clone(),
            ..self.file_config()
        };
        if let Err(e) = self.file.save(&after) {
            let kind = match e {
                persist::PersistError::EditedMeanwhile { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            };
            let e = chain(&e);
            warn!(%caller, "load {} refused: {e}", word(frozen));
            return Response::error(kind, format!("not applied: {e}"));
        }
        self.config.load = next;
        info!(%caller, file = %self.file.path().display(), "load: loop {}", word(frozen));
        Response::Done {
            message: format!(
                "the load loop is {}{}",
                word(frozen),
                if frozen {
                    "; effective weights stay as they are"
                } else {
                    ""
                }
            ),
        }
    }

    /// `lb plan load`: the next period as if the loop ran now (also when frozen).
    pub(super) fn load_plan(&mut self) -> Response {
        let mut config = self.config.clone();
        let frozen = config.load.as_ref().is_some_and(|l| l.frozen);
        if let Some(l) = &mut config.load {
            l.frozen = false;
        }
        let mut next = self.load.clone();
        next.step(Instant::now(), &config, &self.health);
        let now = self.load.effective_of(&config.services);
        let after = next.effective_of(&config.services);
        let wanted = desired::wanted_weighted(&config.services, &self.health, &after);
        let mut services = Vec::new();
        let load = config.load.unwrap_or_default();
        for s in config.services.iter().filter(|s| load.drives(&s.name)) {
            let plan = match self.programmer.plan(&wanted, &s.name, &key_of(s)) {
                Ok(p) => p,
                Err(e) => return super::program_error(&e).into(),
            };
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let key = (s.name.clone(), b.address);
                    NextWeight {
                        address: b.address,
                        configured: b.weight,
                        effective: now.get(&key).copied().unwrap_or(b.weight),
                        next: after.get(&key).copied().unwrap_or(b.weight),
                        utilisation: next.backend(&s.name, b.address, b.weight).utilisation,
                    }
                })
                .collect();
            services.push(ServiceStep { backends, plan });
        }
        Response::LoadPlan(LoadPlan { frozen, services })
    }
}

pub(super) fn word(frozen: bool) -> &'static str {
    if frozen {
        "frozen"
    } else {
        "running"
    }
}

/// Logs one effective weight's change; `leader`: in a fleet, the node whose law made it.
pub(super) fn log_change(c: &WeightChange, leader: Option<&str>) {
    info!(
        service = %c.service,
        backend = %c.backend,
        configured = c.configured,
        from = c.from,
        to = c.to,
        utilisation = c.utilisation.map(|u| format!("{:.1}%", u * 100.0)).unwrap_or_default(),
        leader,
        "load: effective weight changed"
    );
}
