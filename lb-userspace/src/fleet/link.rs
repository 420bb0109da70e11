//! A node's link to the store: a task that reads the fleet's documents, follows the
//! services and the health views with a watch and hands the agent a new [`FleetState`]
//! for every revision that changes them; that publishes the node's own view, report and
//! flow hash under its lease; and that writes the services for the agent's commands.
//!
//! The other nodes' reports and flow hashes are read every few seconds rather than
//! watched: a fleet of N nodes would otherwise send every node N reports per change. A
//! document that does not parse (another version's) is left out and said once.
//!
//! A node that drives load (`load.services`) also stands for the load loop's leader once
//! a law period and reads the backends' published reports (docs/load.md).
//!
//! When etcd cannot be reached the task says so, retries every second and, once it is
//! back, reads everything again (a new lease, its own documents written again). The
//! agent meanwhile keeps its tables: losing the store freezes changes, not forwarding.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{
    doc::{
        FleetState, LoadDoc, NodeReport, ServicesDoc, Wire, CONTROLLER, HASHES, HEALTH, LOAD,
        SERVICES, TABLES, USAGE,
    },
    store::{FleetConfig, Listed, Store, StoreError},
    vote::View,
};
use crate::api::{ApiError, ErrorKind};

/// A node's leased documents go this long after it stops renewing them.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// Wait between attempts to reach the store.
const RETRY: Duration = Duration::from_secs(1);
/// How often the other nodes' reports are read (for the metrics).
const REPORTS_EVERY: Duration = Duration::from_secs(2);

/// What the link tells the agent.
#[derive(Debug)]
pub enum Update {
    /// The documents as of a revision that changed the tables' inputs.
    State(FleetState),
    /// The nodes' reports or flow hashes changed (nothing the tables depend on).
    Reports {
        reports: BTreeMap<String, NodeReport>,
        hashes: BTreeMap<String, String>,
    },
    /// The store can (true) or cannot (false) be reached.
    Connected(bool),
    /// Once a law period, when this node drives load: the load loop's leader and the
    /// backends' published reports, by address.
    Load {
        leader: String,
        usage: BTreeMap<String, Wire>,
    },
}

/// A shared document to write: the services or the load loop's corrections.
#[derive(Debug)]
pub enum Doc {
    Services(ServicesDoc),
    Load(LoadDoc),
}

/// A write of a shared document: at the revision given, answered with the new one.
type Write = (Doc, i64, oneshot::Sender<Result<i64, ApiError>>);

/// The agent's end of the link.
pub struct Link {
    view: watch::Sender<Option<View>>,
    report: watch::Sender<Option<NodeReport>>,
    writes: mpsc::Sender<Write>,
}

/// What a link does besides following the services and views.
#[derive(Clone, Debug, Default)]
pub struct Role {
    /// Read the other nodes' reports and flow hashes every few seconds too.
    pub follow_reports: bool,
    /// The law's period, when this node drives load (it stands for leader).
    pub load: Option<Duration>,
    /// This node's flow hash (`doc::flow_hash_id`), published under `hashes/NODE`: set
    /// for the agent's life, as `node` settings change only with a restart.
    pub flow_hash: Option<String>,
}

impl Link {
    /// Starts the link's task (within a tokio runtime); updates arrive on the receiver.
    pub fn start(config: FleetConfig, role: Role) -> (Link, mpsc::Receiver<Update>) {
        let (updates, rx) = mpsc::channel(1024);
        let (view, view_rx) = watch::channel(None);
        let (report, report_rx) = watch::channel(None);
        let (writes, writes_rx) = mpsc::channel(64);
        tokio::spawn(run(
            config,
            updates,
            Published {
                view: view_rx,
                report: report_rx,
                writes: writes_rx,
                role,
            },
        ));
        (
            Link {
                view,
                report,
                writes,
            },
            rx,
        )
    }

    /// Publishes this node's health view (when it changed).
    pub fn publish_view(&self, v: View) {
        self.view.send_if_modified(|old| {
            let changed = old.as_ref() != Some(&v);
            *old = Some(v);
            changed
        });
    }

    /// Publishes this node's report (when it changed).
    pub fn publish_report(&self, r: NodeReport) {
        self.report.send_if_modified(|old| {
            let changed = old.as_ref() != Some(&r);
            *old = Some(r);
            changed
        });
    }

    /// Writes a shared document if it is still at `revision` (0: absent).
    pub fn write(&self, doc: Doc, revision: i64) -> oneshot::Receiver<Result<i64, ApiError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(
            mpsc::error::TrySendError::Full((_, _, tx))
            | mpsc::error::TrySendError::Closed((_, _, tx)),
        ) = self.writes.try_send((doc, revision, tx))
        {
            let _ = tx.send(Err(ApiError::new(
                ErrorKind::Unavailable,
                "the link to the fleet store is busy; try again",
            )));
        }
        rx
    }
}

struct Published {
    view: watch::Receiver<Option<View>>,
    report: watch::Receiver<Option<NodeReport>>,
    writes: mpsc::Receiver<Write>,
    role: Role,
}

async fn run(config: FleetConfig, updates: mpsc::Sender<Update>, mut published: Published) {
    let mut failures = 0u64;
    loop {
        match session(&config, &updates, &mut published).await {
            Ok(()) => return,
            Err(e) => {
                // Said once per outage, then quietly retried.
                if failures == 0 {
                    warn!(endpoints = ?config.endpoints, "fleet store unreachable: {e}; tables kept, retrying every {RETRY:?}");
                }
                failures += 1;
                if updates.send(Update::Connected(false)).await.is_err() {
                    return;
                }
            }
        }
        // Writes asked for meanwhile are refused; views and reports wait in their
        // channels for the next session.
        let until = tokio::time::Instant::now() + RETRY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                w = published.writes.recv() => match w {
                    None => return,
                    Some((_, _, reply)) => {
                        let _ = reply.send(Err(unreachable_error()));
                    }
                },
            }
        }
        if failures > 0 && failures.is_multiple_of(60) {
            warn!(
                attempts = failures,
                "fleet store still unreachable; tables kept"
            );
        }
    }
}

fn unreachable_error() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the fleet store cannot be reached: changes wait until it can (forwarding goes on \
         with the current tables)",
    )
}

/// One connection's life: read everything, publish, follow. `Ok` when the agent is gone.
async fn session(
    config: &FleetConfig,
    updates: &mpsc::Sender<Update>,
    published: &mut Published,
) -> Result<(), StoreError> {
    let mut store = Store::connect(config).await?;
    let mut lease = store.lease(LEASE_TTL).await?;
    let (revision, docs) = store.read_all().await?;
    let mut state = FleetState::default();
    for d in &docs {
        state.take(d);
    }
    let view_key = format!("{HEALTH}/{}", config.node);
    let report_key = format!("{TABLES}/{}", config.node);
    // What this node published before is written again, under the new lease.
    let view = published.view.borrow_and_update().clone();
    if let Some(v) = view {
        store.put_leased(&view_key, &v, &lease).await?;
    }
    let report = published.report.borrow_and_update().clone();
    if let Some(r) = report {
        store.put_leased(&report_key, &r, &lease).await?;
    }
    if let Some(h) = &published.role.flow_hash {
        store
            .put_leased(&format!("{HASHES}/{}", config.node), h, &lease)
            .await?;
    }
    // The services and the views ("health/..." sorts before "services", the reports'
    // "tables/..." after).
    let mut watch = store
        .watch_between(revision, &format!("{HEALTH}/"), SERVICES)
        .await?;
    info!(
        revision,
        services = state.services_revision,
        nodes = state.reports.len(),
        "fleet store reached; following it"
    );
    if updates.send(Update::Connected(true)).await.is_err()
        || updates.send(Update::State(state.clone())).await.is_err()
    {
        return Ok(());
    }
    let mut renew = tokio::time::interval(LEASE_TTL / 3);
    let mut reports = tokio::time::interval(REPORTS_EVERY);
    let mut load = tokio::time::interval(published.role.load.unwrap_or(REPORTS_EVERY));
    let mut unreadable = Unreadable::default();
    loop {
        tokio::select! {
            _ = load.tick(), if published.role.load.is_some() => {
                let leader: String = store.hold(CONTROLLER, &config.node, &lease).await?;
                let usage: BTreeMap<String, Wire> =
                    unreadable.take(USAGE, store.list(USAGE).await?);
                if updates.send(Update::Load { leader, usage }).await.is_err() {
                    return Ok(());
                }
            }
            _ = reports.tick(), if published.role.follow_reports => {
                let reports: BTreeMap<String, NodeReport> =
                    unreadable.take(TABLES, store.list(TABLES).await?);
                let hashes: BTreeMap<String, String> =
                    unreadable.take(HASHES, store.list(HASHES).await?);
                if reports != state.reports || hashes != state.hashes {
                    state.reports = reports.clone();
                    state.hashes = hashes.clone();
                    if updates.send(Update::Reports { reports, hashes }).await.is_err() {
                        return Ok(());
                    }
                }
            }
            _ = renew.tick() => lease.renew().await?,
            changed = published.view.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let view = published.view.borrow_and_update().clone();
                if let Some(v) = view {
                    store.put_leased(&view_key, &v, &lease).await?;
                }
            }
            changed = published.report.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let report = published.report.borrow_and_update().clone();
                if let Some(r) = report {
                    store.put_leased(&report_key, &r, &lease).await?;
                }
            }
            w = published.writes.recv() => {
                let Some((doc, at, reply)) = w else { return Ok(()) };
                // Its own task: a slow write does not hold the watch up.
                let mut store = store.clone();
                tokio::spawn(async move {
                    let r = match &doc {
                        Doc::Services(d) => store.put_if(SERVICES, d, at).await,
                        Doc::Load(d) => store.put_if(LOAD, d, at).await,
                    };
                    let r = r.map_err(|e| match e {
                        StoreError::Conflict { .. } => ApiError::new(ErrorKind::Conflict, e.to_string()),
                        e => ApiError::new(ErrorKind::Unavailable, format!("writing to the fleet store: {e}")),
                    });
                    let _ = reply.send(r);
                });
            }
            batch = watch.next() => {
                let changes = batch?.ok_or(StoreError::WatchEnded)?;
                if !follow(&mut state, &changes, updates).await {
                    return Ok(());
                }
            }
        }
    }
}

/// The listed documents that did not parse, each said once while it stays so.
#[derive(Default)]
struct Unreadable(BTreeSet<String>);

impl Unreadable {
    /// The documents below `dir` that parsed; a warning for each one newly unreadable.
    fn take<T>(&mut self, dir: &str, listed: Listed<T>) -> BTreeMap<String, T> {
        for key in self.newly(dir, &listed.unreadable) {
            let error = &listed.unreadable[&key];
            warn!(%key, "fleet: ignoring a document that does not parse: {error}");
        }
        listed.docs
    }

    /// Of the unreadable documents of a listing of `dir`, those that were not so at its
    /// last listing.
    fn newly(&mut self, dir: &str, unreadable: &BTreeMap<String, String>) -> Vec<String> {
        let below = format!("/{dir}/");
        self.0
            .retain(|k| !k.contains(&below) || unreadable.contains_key(k));
        unreadable
            .keys()
            .filter(|k| self.0.insert((*k).clone()))
            .cloned()
            .collect()
    }
}

/// Takes in a watch's batch revision by revision: every revision that changes the inputs
/// is a state of its own, so every node builds its tables through the same sequence of
/// inputs (and so gets the same second hops). False when the agent is gone.
async fn follow(
    state: &mut FleetState,
    changes: &[super::store::Change],
    updates: &mpsc::Sender<Update>,
) -> bool {
    let mut i = 0;
    while i < changes.len() {
        let rev = changes[i].revision;
        let mut input = false;
        while i < changes.len() && changes[i].revision == rev {
            input |= state.take(&changes[i]);
            i += 1;
        }
        if input && updates.send(Update::State(state.clone())).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_document_is_said_once_while_it_stays_so() {
        let mut u = Unreadable::default();
        let bad = |keys: &[&str]| -> BTreeMap<String, String> {
            keys.iter()
                .map(|k| (k.to_string(), "e".to_string()))
                .collect()
        };
        let lb1 = "/lb/x/tables/lb1";
        assert_eq!(u.newly(TABLES, &bad(&[lb1])), [lb1]);
        assert!(u.newly(TABLES, &bad(&[lb1])).is_empty());
        // Another directory's listing leaves it alone.
        assert!(u.newly(HASHES, &bad(&[])).is_empty());
        assert!(u.newly(TABLES, &bad(&[lb1])).is_empty());
        // Readable again, then not: said again.
        assert!(u.newly(TABLES, &bad(&[])).is_empty());
        assert_eq!(u.newly(TABLES, &bad(&[lb1])), [lb1]);
    }
}
