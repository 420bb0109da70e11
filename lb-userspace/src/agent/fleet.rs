//! The agent in a fleet (a `fleet` section in its file): services from the store, health
//! by the fleet's vote, commands written to the store, tables reported back.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{desired, key_of, reload, serve_vips, Agent};
use crate::{
    api::{Change, ErrorKind, PlanSummary, Response},
    fleet::{
        doc::{self, FleetState, NodeReport, ServicesDoc},
        link::{Doc, Link, Role, Update},
        status::FleetStatus,
        store::FleetConfig,
        vote::{self, Verdict, View},
    },
};

/// What the agent knows of its fleet.
pub struct Fleet {
    config: FleetConfig,
    pub(super) link: Link,
    /// The documents as last read.
    pub(super) state: FleetState,
    connected: bool,
    /// Whether a state has been applied since the start.
    synced: bool,
    /// The services document's revision the running services come from (or were refused
    /// at): commands are written against it.
    services_revision: i64,
    /// The inputs' revision the tables are built from.
    applied: i64,
    /// An empty store was seeded with the file's services (once).
    seeded: bool,
    /// The load loop's leader, as last read (when this node drives load).
    pub load_leader: Option<String>,
    /// The live nodes' flow hashes differed when their reports were last read.
    hashes_differ: bool,
}

impl Fleet {
    /// Starts the link to the store; `load`: the law's period, when this node drives
    /// load; `flow_hash`: this node's (`doc::flow_hash_id`).
    pub fn start(
        config: FleetConfig,
        load: Option<std::time::Duration>,
        flow_hash: String,
    ) -> (Fleet, mpsc::Receiver<Update>) {
        let role = Role {
            follow_reports: true,
            load,
            flow_hash: Some(flow_hash),
        };
        let (link, rx) = Link::start(config.clone(), role);
        (
            Fleet {
                config,
                link,
                state: FleetState::default(),
                connected: false,
                synced: false,
                services_revision: 0,
                applied: 0,
                seeded: false,
                load_leader: None,
                hashes_differ: false,
            },
            rx,
        )
    }

    /// This node's name in the fleet.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn status(&self) -> FleetStatus {
        let mut s = FleetStatus::of(&self.config.prefix, &self.state);
        s.this_node = Some(self.config.node.clone());
        s.connected = self.connected;
        s.applied = self.applied;
        s
    }
}

/// Waits for the next update of an optional link (never, without one).
pub async fn next(rx: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Takes in what the link reports.
    pub(super) fn fleet_update(&mut self, u: Update) {
        let Some(f) = self.fleet.as_mut() else { return };
        match u {
            Update::Connected(c) => {
                if c != f.connected {
                    info!(connected = c, "fleet store link");
                }
                f.connected = c;
            }
            Update::Reports { reports, hashes } => self.fleet_reports(reports, hashes),
            Update::State(s) => self.fleet_state(s),
            Update::Load { leader, usage } => self.fleet_load(leader, usage),
        }
    }

    /// The live nodes' reports: said in the log when their flow hashes come to differ,
    /// as then a flow's bucket depends on the node the routers pick.
    fn fleet_reports(
        &mut self,
        reports: BTreeMap<String, NodeReport>,
        hashes: BTreeMap<String, String>,
    ) {
        let Some(f) = self.fleet.as_mut() else { return };
        f.state.reports = reports;
        f.state.hashes = hashes;
        let status = FleetStatus::of(&f.config.prefix, &f.state);
        let differ = status.hashes_differ();
        if differ && !f.hashes_differ {
            warn!(
                hashes = %status.hashes_by_node(),
                "fleet: nodes hash flows differently; a flow that reaches another node goes to \
                 another backend, and its connection breaks. Set node.flow_hash and \
                 node.hash_seed alike and restart the odd nodes"
            );
        } else if !differ && f.hashes_differ {
            info!("fleet: every node hashes flows alike again");
        }
        f.hashes_differ = differ;
    }

    /// A new state of the documents: the services (validated as a file), the health
    /// vote, then the tables, and the report of what they now are.
    fn fleet_state(&mut self, s: FleetState) {
        let Some(f) = self.fleet.as_mut() else { return };
        let services_changed = !f.synced || s.services_revision != f.services_revision;
        let revision = s.services_revision;
        let doc = s.services.clone();
        f.state = s;
        f.services_revision = revision;
        if services_changed {
            match doc {
                None => self.fleet_seed(),
                Some(bytes) => match doc::parse_services(&bytes, &self.config) {
                    Ok(services) => {
                        if services != self.config.services {
                            for c in reload::service_changes(&self.config.services, &services) {
                                info!(revision, "fleet: {c}");
                            }
                            self.config.services = services;
                            if let Err(e) = serve_vips(&self.config) {
                                error!("putting the VIPs this node serves on lo failed: {e:#}");
                            }
                            self.update_health_targets();
                        }
                    }
                    Err(e) => error!(
                        revision,
                        "fleet: the services document is refused, nothing changed: {e}"
                    ),
                },
            }
        }
        let Some(f) = self.fleet.as_mut() else { return };
        let first = !f.synced;
        f.synced = true;
        self.health = doc::health_map(&vote::effective(&f.state.views));
        let applied = f.state.revision;
        self.fleet_adopt_load();
        let rebuilt = self.resync(if first { "fleet start" } else { "fleet" });
        if first {
            info!(
                services = self.config.services.len(),
                rebuilt,
                unchanged = self.config.services.len().saturating_sub(rebuilt),
                revision = applied,
                "running tables compared with the fleet store"
            );
        }
        let tables = self
            .config
            .services
            .iter()
            .map(|s| {
                let digest = self.programmer.table_facts(&key_of(s)).map_or(0, |t| t.0);
                (s.name.clone(), digest)
            })
            .collect();
        let Some(f) = self.fleet.as_mut() else { return };
        f.applied = applied;
        f.link.publish_report(NodeReport {
            revision: applied,
            tables,
        });
    }

    /// An empty store gets this node's file's services (if no other node was first).
    fn fleet_seed(&mut self) {
        let Some(f) = self.fleet.as_mut() else { return };
        if f.seeded {
            return;
        }
        f.seeded = true;
        let doc = ServicesDoc {
            services: self.config.services.clone(),
        };
        let n = doc.services.len();
        let answer = f.link.write(Doc::Services(doc), 0);
        tokio::spawn(async move {
            match answer.await {
                Ok(Ok(revision)) => {
                    info!(
                        services = n,
                        revision,
                        "fleet: the store had no services; seeded it with this node's file"
                    )
                }
                Ok(Err(e)) => info!("fleet: not seeding the store: {e}"),
                Err(_) => {}
            }
        });
    }

    /// This node's own checks' verdicts, published as its view; the tables follow the
    /// fleet's vote when it comes back through the store.
    pub(super) fn fleet_publish_view(&mut self) {
        let (Some(f), Some(c)) = (self.fleet.as_ref(), self.checker.as_ref()) else {
            return;
        };
        let view: View = c
            .snapshot()
            .into_iter()
            .map(|t| {
                let v = if t.up { Verdict::Up } else { Verdict::Down };
                (doc::view_key(&t.service, t.backend), v)
            })
            .collect();
        f.link.publish_view(view);
    }

    /// A command's change in a fleet: validated here as a file would be, then written to
    /// the store if nobody wrote the services since this node read them. Every node,
    /// this one too, applies it when its watch brings it. `reply` gets what it moves here.
    pub(super) fn fleet_apply(
        &mut self,
        change: &Change,
        caller: super::Caller,
        reply: oneshot::Sender<Response>,
    ) {
        let Some(f) = self.fleet.as_ref() else { return };
        let what = desired::describe(change);
        let next = match desired::apply(&self.config, change) {
            Ok(n) => n,
            Err(e) => {
                warn!(%caller, change = %what, kind = e.kind.name(), "change refused: {e}");
                let _ = reply.send(e.into());
                return;
            }
        };
        let name = desired::service_of(change).to_string();
        let wanted = desired::wanted_weighted(
            &next.services,
            &self.health,
            &self.load.effective_of(&next.services),
        );
        let plan = next
            .services
            .iter()
            .chain(self.config.services.iter())
            .find(|s| s.name == name)
            .and_then(|s| self.programmer.plan(&wanted, &name, &key_of(s)).ok())
            .unwrap_or_else(|| PlanSummary {
                service: name.clone(),
                ..PlanSummary::default()
            });
        let at = f.services_revision;
        let answer = f.link.write(
            Doc::Services(ServicesDoc {
                services: next.services,
            }),
            at,
        );
        tokio::spawn(async move {
            let resp = match answer.await {
                Ok(Ok(revision)) => {
                    info!(%caller, change = %what, revision, "change written to the fleet store");
                    Response::Applied(plan)
                }
                Ok(Err(e)) => {
                    warn!(%caller, change = %what, kind = e.kind.name(), "change refused: {e}");
                    e.into()
                }
                Err(_) => Response::error(ErrorKind::Unavailable, "the agent is stopping"),
            };
            let _ = reply.send(resp);
        });
    }

    /// Whether this agent takes its services from a fleet store.
    pub(super) fn in_fleet(&self) -> bool {
        self.fleet.is_some()
    }
}
