//! The agent's side of the load loop in a fleet (docs/load.md, "In a fleet"): every
//! period the link says who leads and brings the backends' published reports; the leader
//! runs the law and writes the corrections to the store, revision-checked; every node,
//! the leader too, takes them from there with the rest of the tables' inputs.

use std::{collections::BTreeMap, time::Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{server::Caller, Agent};
use crate::{
    api::{ErrorKind, Response},
    config::Config,
    fleet::{doc::Wire, link::Doc},
    load::{config::LoadConfig, control::LoadStatus, fleet::round},
};

impl Agent {
    /// A period's news from the link: the reports are shown on every node; the leader
    /// steps the law and writes what it decides.
    pub(super) fn fleet_load(&mut self, leader: String, usage: BTreeMap<String, Wire>) {
        let Some(f) = self.fleet.as_mut() else { return };
        if f.load_leader.as_deref() != Some(leader.as_str()) {
            info!(%leader, this_node = leader == f.node(), "load: the loop's leader");
            f.load_leader = Some(leader.clone());
        }
        let me = leader == f.node();
        let current = f.state.load.clone();
        let at = f.state.load_revision;
        self.load.record(round(&usage));
        if !me || current.as_ref().is_some_and(|d| d.frozen) {
            return;
        }
        // The switch is the store's in a fleet; the file's `frozen` is not used.
        let config = Config {
            load: self
                .config
                .load
                .clone()
                .map(|l| LoadConfig { frozen: false, ..l }),
            ..self.config.clone()
        };
        let Some((doc, changes)) = self.load.propose(
            Instant::now(),
            &config,
            &self.health,
            current.as_ref(),
            &leader,
        ) else {
            return;
        };
        let Some(f) = self.fleet.as_ref() else { return };
        let answer = f.link.write(Doc::Load(doc), at);
        let n = changes.len();
        tokio::spawn(async move {
            match answer.await {
                Ok(Ok(revision)) => info!(
                    changes = n,
                    revision, "load: weights written to the fleet store"
                ),
                // Another leader wrote meanwhile (a handover): its document counts.
                Ok(Err(e)) => warn!("load: weights not written: {e}"),
                Err(_) => {}
            }
        });
    }

    /// The store's corrections as this node's effective weights (each change logged);
    /// before the tables are built from a new state of the store.
    pub(super) fn fleet_adopt_load(&mut self) {
        let Some(f) = self.fleet.as_ref() else { return };
        let Some(doc) = f.state.load.clone() else {
            return;
        };
        let leader = doc.leader.clone();
        for c in self.load.adopt(&doc, &self.config) {
            super::load::log_change(&c, Some(&leader));
        }
    }

    /// `lb load freeze|resume` in a fleet: the switch in the store's document, written if
    /// nobody wrote it since this node read it.
    pub(super) fn fleet_load_freeze(
        &mut self,
        frozen: bool,
        caller: Caller,
        reply: oneshot::Sender<Response>,
    ) {
        let Some(f) = self.fleet.as_ref() else { return };
        let mut doc = f.state.load.clone().unwrap_or_default();
        if doc.frozen == frozen && f.state.load.is_some() {
            let _ = reply.send(Response::Done {
                message: format!(
                    "the fleet's load loop is already {}",
                    super::load::word(frozen)
                ),
            });
            return;
        }
        doc.frozen = frozen;
        if doc.leader.is_empty() {
            doc.leader = f.load_leader.clone().unwrap_or_default();
        }
        let answer = f.link.write(Doc::Load(doc), f.state.load_revision);
        tokio::spawn(async move {
            let resp = match answer.await {
                Ok(Ok(revision)) => {
                    info!(%caller, revision, "load: the fleet's loop {}", super::load::word(frozen));
                    Response::Done {
                        message: format!(
                            "the fleet's load loop is {} (revision {revision})",
                            super::load::word(frozen)
                        ),
                    }
                }
                Ok(Err(e)) => {
                    warn!(%caller, "load {} refused: {e}", super::load::word(frozen));
                    e.into()
                }
                Err(_) => Response::error(ErrorKind::Unavailable, "the agent is stopping"),
            };
            let _ = reply.send(resp);
        });
    }

    /// The loop's status in a fleet: the store's switch and counts, and the leader.
    pub(super) fn fleet_load_status(&self, status: LoadStatus) -> LoadStatus {
        let Some(f) = self.fleet.as_ref() else {
            return status;
        };
        LoadStatus {
            frozen: f.state.load.as_ref().is_some_and(|d| d.frozen),
            leader: f.load_leader.clone(),
            ..status
        }
    }
}
