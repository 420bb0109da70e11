//! `lb agent`: attaches the XDP program, keeps its maps true to the configured services,
//! backend health and weights, and serves the operator API and metrics.
//!
//! One task owns all state; the API server, the health checker, the metrics server and
//! signals send it messages, so every change is applied in order, whole or not at all.

pub mod desired;
mod fleet;
mod fleet_load;
mod load;
mod lock;
mod netlink;
pub mod nexthop;
mod persist;
pub mod programmer;
mod reload;
mod server;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode as AyaXdpMode;
use lb_common::{
    addr,
    hash::{FlowHash, FlowHashKey},
    maps::{NextHopEntry, ServiceBackendKey, ServiceKey, NEXTHOP_VALID},
    stats::Reason,
};
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};
use tracing::{error, info, warn};

pub use self::programmer::{Desired, Member};
use self::{
    nexthop::NextHops,
    persist::ConfigFile,
    programmer::{ProgramError, Programmer},
    server::Caller,
};
use crate::{
    api::{
        ApiError, BackendStatus, Change, ErrorKind, Health, PlanSummary, ReasonCount, ReloadReport,
        Request, Response, ServiceStatus, Status,
    },
    config::{AgentConfig, Config, ServiceConfig, XdpMode},
    dataplane::{Dataplane, LoadOptions, Node},
    health::{self, Checker, HealthEvent},
};

/// A request from the API or metrics server, who sent it, and where to send the answer.
pub type Call = (Request, Caller, oneshot::Sender<Response>);

/// Runs the agent until SIGTERM/SIGINT (forwarding stays) or `lb detach`. `api_socket`,
/// when given (`lb --socket`), replaces `agent.api_socket` of the file.
pub async fn run(config_path: PathBuf, api_socket: Option<PathBuf>) -> Result<()> {
    let (file, mut config) = ConfigFile::load(&config_path)?;
    let file_agent = config.agent.clone();
    if let Some(s) = api_socket {
        config.agent.api_socket = s;
    }
    let pin_dir = config.agent.pin_dir.clone();
    // Handled from here on: a SIGTERM during the start takes effect once the start is
    // complete, instead of killing the process with half its pins made.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    crate::bpffs::ensure_mounted(&pin_dir)?;
    // Before anything is touched: one agent per pin directory.
    let lock = lock::acquire(&pin_dir)?;
    // Then the listeners: a socket or port in use fails the start while nothing moved.
    let (call_tx, mut calls) = mpsc::channel::<Call>(64);
    let listening = listen(&config, call_tx.clone()).await;
    let server = match listening {
        Ok(s) => s,
        Err(e) => {
            if lock.created {
                let _ = std::fs::remove_dir(&pin_dir);
            }
            return Err(e);
        }
    };
    let had_pins = std::fs::read_dir(pin_dir.join("maps")).is_ok_and(|mut d| d.next().is_some());
    let mut agent = match start_dataplane(file, file_agent, config).await {
        Ok(a) => a,
        Err(e) => {
            if !had_pins {
                // Nothing ran from these pins: remove what this start made, so the next
                // start is a fresh one again.
                let removed = Dataplane::unpin_all(&pin_dir).map_or(0, |r| r.len());
                error!(pins = removed, pin_dir = %pin_dir.display(), "start failed; removed the pins it created");
            }
            return Err(e);
        }
    };
    // Next hops: resolved by a task of their own, written by this one (as every map).
    let (hop_addrs, hop_addrs_rx) = watch::channel(Vec::new());
    let (hop_tx, mut hop_updates) = mpsc::channel::<NextHops>(16);
    tokio::spawn(nexthop::watch(hop_addrs_rx, hop_tx));
    agent.hop_addrs = Some(hop_addrs);
    agent.write_nexthops();
    // Load reports: fetched by a task of their own, each round stepped here.
    let (load_targets, load_targets_rx) = watch::channel(Default::default());
    let (round_tx, mut load_rounds) = mpsc::channel(4);
    tokio::spawn(crate::load::report::fetch_loop(load_targets_rx, round_tx));
    agent.load_targets = Some(load_targets);
    agent.update_load_targets();
    server.ready();
    info!("agent ready");
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let (event_tx, mut events) = mpsc::channel::<HealthEvent>(256);
    agent.checker = Some(Checker::new(event_tx));
    // In a fleet, services and health come from the store from here on.
    let mut fleet_updates = None;
    if let Some(fc) = agent.config.fleet.clone() {
        info!(endpoints = ?fc.endpoints, prefix = %fc.prefix, node = %fc.node, "joining the fleet");
        let load = agent
            .config
            .load
            .as_ref()
            .filter(|l| !l.services.is_empty())
            .map(|l| l.gains.period());
        let n = &agent.config.node;
        let hash = crate::fleet::doc::flow_hash_id(n.flow_hash, n.hash_seed);
        let (f, rx) = fleet::Fleet::start(fc, load, hash);
        agent.fleet = Some(f);
        fleet_updates = Some(rx);
    }
    agent.update_health_targets();
    loop {
        tokio::select! {
            Some((req, caller, reply)) = calls.recv() => {
                if let (Request::Apply { change }, true) = (&req, agent.in_fleet()) {
                    agent.fleet_apply(change, caller, reply);
                    continue;
                }
                if let (Request::LoadFreeze { frozen }, true) = (&req, agent.in_fleet()) {
                    agent.fleet_load_freeze(*frozen, caller, reply);
                    continue;
                }
                let detach = matches!(req, Request::Detach {});
                let resp = agent.handle(req, caller);
                let failed = matches!(resp, Response::Error { .. });
                let _ = reply.send(resp);
                if detach && !failed {
                    notify(&[NotifyState::Stopping]);
                    break;
                }
            }
            Some(ev) = events.recv() => {
                // Verdicts that arrived together are applied together: one rebuild per
                // service they touch.
                let mut verdicts = vec![ev];
                while let Ok(ev) = events.try_recv() {
                    verdicts.push(ev);
                }
                agent.health_changed(verdicts);
            }
            Some(hops) = hop_updates.recv() => agent.nexthops_changed(hops),
            Some(round) = load_rounds.recv() => agent.load_round(round),
            Some(u) = fleet::next(&mut fleet_updates) => agent.fleet_update(u),
            _ = hup.recv() => {
                let _ = agent.reload(Caller::default(), "SIGHUP");
            }
            _ = term.recv() => { agent.stopping("SIGTERM"); break; }
            _ = int.recv() => { agent.stopping("SIGINT"); break; }
        }
    }
    // Answers taken are written before the process ends (`lb detach` gets its answer).
    server.finish().await;
    drop(lock);
    Ok(())
}

/// The API socket and the metrics listener.
async fn listen(config: &Config, calls: mpsc::Sender<Call>) -> Result<server::Server> {
    let read_only_gid = match &config.agent.api_read_only_group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    let server = server::start(
        &config.agent.api_socket,
        server::Access { read_only_gid },
        calls.clone(),
    )?;
    if let Some(addr) = config.agent.metrics {
        server::start_metrics(addr, calls).await?;
    }
    if let Some(r) = config.load.as_ref().and_then(|l| l.report.as_ref()) {
        crate::load::report::serve(r).await?;
    }
    Ok(server)
}

/// Loads (or takes over) the data plane, brings it in line with the configuration and
/// attaches it.
async fn start_dataplane(
    file: ConfigFile,
    file_agent: AgentConfig,
    config: Config,
) -> Result<Agent> {
    let dp = Dataplane::load(&LoadOptions {
        bucket_slots: config.agent.bucket_slots,
        pin_dir: Some(config.agent.pin_dir.clone()),
    })
    .context("loading the XDP program")?;
    if dp.adopted() {
        info!(pin_dir = %config.agent.pin_dir.display(), "taking over the running data plane (pinned maps found)");
    } else {
        info!(pin_dir = %config.agent.pin_dir.display(), "starting a fresh data plane");
    }
    for w in config.warnings() {
        warn!("{w}");
    }
    let mut agent = Agent::new(file, file_agent, config, dp)?;
    agent.apply_node()?;
    if agent.config.fleet.is_some() {
        // The store, not the file, says what the tables are: the running ones are kept
        // until it answers.
        agent.attach_all()?;
        return Ok(agent);
    }
    // Tables that already match what the configuration gives are left as they are.
    let rebuilt = agent.resync("start");
    info!(
        services = agent.config.services.len(),
        rebuilt,
        unchanged = agent.config.services.len().saturating_sub(rebuilt),
        "running tables compared with the configuration"
    );
    agent.attach_all()?;
    Ok(agent)
}

/// Tells systemd (`Type=notify`) where the agent is; nothing without `NOTIFY_SOCKET`.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("telling systemd: {e}");
    }
}

/// The id of group `name`.
fn group_id(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed out struct filled by getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid pointers and buffer length.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("agent.api_read_only_group: no group named {name:?}");
    }
    Ok(grp.gr_gid)
}

struct Agent {
    /// The file, the truth that commands write back to.
    file: ConfigFile,
    /// The file's `agent` section (the running one may have `--socket` in it).
    file_agent: AgentConfig,
    config: Config,
    programmer: Programmer,
    checker: Option<Checker>,
    /// Health by (service, backend), from the checker's events.
    health: BTreeMap<(String, IpAddr), bool>,
    /// The next hops as last resolved (`nexthop`), by backend address.
    hops: NextHops,
    /// What the next-hop maps hold, by backend slot.
    hops_written: BTreeMap<u32, (IpAddr, NextHopEntry)>,
    /// The backend addresses whose next hops are to be resolved.
    hop_addrs: Option<watch::Sender<Vec<IpAddr>>>,
    /// The load controller, the fetcher's targets and the backends whose reports fail.
    load: crate::load::control::Controller,
    load_targets: Option<watch::Sender<crate::load::report::Targets>>,
    load_failing: Vec<IpAddr>,
    /// The fleet this node is part of (`fleet` in the file).
    fleet: Option<fleet::Fleet>,
}

impl Agent {
    fn new(
        file: ConfigFile,
        file_agent: AgentConfig,
        config: Config,
        dp: Dataplane,
    ) -> Result<Self> {
        let programmer = Programmer::adopt(dp, config.node.hash_seed, config.agent.bucket_slots)
            .context("reading the data plane's state")?;
        // A checked backend missing from a table the data plane already had was down (or
        // drained away) when the previous agent stopped: it stays out until it passes its
        // checks, rather than returning for a moment on every restart.
        let mut health = BTreeMap::new();
        for s in &config.services {
            for b in s.backends.iter().filter(|b| b.health.is_some()) {
                if programmer.in_table(&key_of(s), &b.address) == Some(false) {
                    health.insert((s.name.clone(), b.address), false);
                }
            }
        }
        let load = Agent::restore_load(&config);
        Ok(Agent {
            load,
            load_targets: None,
            load_failing: Vec::new(),
            file,
            file_agent,
            config,
            programmer,
            checker: None,
            health,
            hops: NextHops::new(),
            hops_written: BTreeMap::new(),
            hop_addrs: None,
            fleet: None,
        })
    }

    fn apply_node(&mut self) -> Result<()> {
        let n = &self.config.node;
        let dp = self.programmer.dataplane();
        let running = dp.flow_hash_key()?;
        let wanted = FlowHashKey::new(n.flow_hash, n.hash_seed);
        // A map the agent never wrote is all zero; `v4_head` is zero for one seed in 2^32
        // only, whose change would go unwarned.
        if dp.adopted() && running.v4_head != 0 && running != wanted {
            warn!(
                running = FlowHash::from_kind(running.kind).map_or("unknown", FlowHash::name),
                configured = n.flow_hash.name(),
                "node.flow_hash or node.hash_seed differs from the running data plane's: nearly \
                 every flow moves to another bucket, and connections through this node break \
                 unless every node of the fleet changes alike"
            );
        }
        dp.set_node(&Node {
            hash_seed: n.hash_seed,
            flow_hash: n.flow_hash,
            gue_port: n.gue_port,
            addr_v4: n.address_v4,
            addr_v6: n.address_v6,
        })?;
        info!(flow_hash = n.flow_hash.name(), "node settings written");
        for ifname in &n.interfaces {
            netlink::enable_forwarding(ifname)?;
        }
        serve_vips(&self.config)?;
        Ok(())
    }

    fn attach_all(&mut self) -> Result<()> {
        let mode = match self.config.node.xdp_mode {
            XdpMode::Native => AyaXdpMode::Default,
            XdpMode::Skb => AyaXdpMode::Skb,
        };
        for ifname in self.config.node.interfaces.clone() {
            self.programmer
                .dataplane()
                .attach(&ifname, mode)
                .with_context(|| format!("attaching to {ifname}"))?;
            info!(interface = %ifname, mode = ?self.config.node.xdp_mode, "XDP program attached");
        }
        Ok(())
    }

    fn stopping(&self, signal: &str) {
        notify(&[NotifyState::Stopping]);
        info!(
            signal,
            pin_dir = %self.config.agent.pin_dir.display(),
            "agent stopping; the XDP program stays attached and keeps forwarding with the \
             current tables (run `lb detach` to remove it)"
        );
    }

    /// Brings the maps in line with the configuration; logs what moved. Returns how many
    /// tables were rewritten.
    fn resync(&mut self, why: &str) -> usize {
        self.sync_services(why).map_or(0, |c| c.len())
    }

    /// As `resync`, returning what moved per rewritten table.
    fn sync_services(&mut self, why: &str) -> Result<Vec<PlanSummary>, ProgramError> {
        let wanted = desired::wanted_weighted(
            &self.config.services,
            &self.health,
            &self.load.effective_of(&self.config.services),
        );
        let synced = self.programmer.sync(&wanted);
        self.write_nexthops();
        match synced {
            Ok(changes) => {
                for c in &changes {
                    info!(service = %c.service, moved = c.moved, buckets = c.buckets, why, "table rebuilt");
                }
                Ok(changes)
            }
            Err(e) => {
                error!("applying the services failed ({why}): {}", chain(&e));
                Err(e)
            }
        }
    }

    fn nexthops_changed(&mut self, changes: NextHops) {
        self.hops.extend(changes);
        self.write_nexthops();
    }

    /// Brings the next-hop maps in line with the backend slots and the resolved next hops,
    /// and tells the resolver which addresses to follow. An unresolved hop is written as
    /// an invalid entry: the data plane then asks `bpf_fib_lookup`.
    fn write_nexthops(&mut self) {
        let slots: BTreeMap<IpAddr, u32> = self.programmer.slots().clone();
        let gone: Vec<(u32, IpAddr)> = self
            .hops_written
            .iter()
            .filter(|(s, (a, _))| slots.get(a) != Some(s))
            .map(|(s, (a, _))| (*s, *a))
            .collect();
        let dp = self.programmer.dataplane();
        for (s, a) in gone {
            // The slot's own entry was cleared with the slot (`Dataplane::clear_backend`).
            self.hops_written.remove(&s);
            if !slots.contains_key(&a) {
                if let Err(e) = dp.set_nexthop_of(a, None) {
                    error!("removing the next hop of {a}: {e:#}");
                }
            }
        }
        for (a, s) in &slots {
            let e = self.hops.get(a).copied().flatten().unwrap_or_default();
            if self.hops_written.get(s) == Some(&(*a, e)) {
                continue;
            }
            let by_addr = (e.flags & NEXTHOP_VALID != 0).then_some(e);
            match dp
                .set_nexthop(*s, e)
                .and_then(|()| dp.set_nexthop_of(*a, by_addr))
            {
                Ok(()) => {
                    self.hops_written.insert(*s, (*a, e));
                }
                Err(e) => error!("writing the next hop of {a}: {e:#}"),
            }
        }
        if let Some(tx) = &self.hop_addrs {
            let want: Vec<IpAddr> = slots.keys().copied().collect();
            tx.send_if_modified(|v| {
                let changed = *v != want;
                *v = want;
                changed
            });
        }
    }

    fn update_health_targets(&mut self) {
        let mut targets = Vec::new();
        for s in &self.config.services {
            for b in &s.backends {
                if let Some(h) = &b.health {
                    let mut t = health::Target::new(&s.name, b.address, s.port, h.clone());
                    let n = &self.config.node;
                    let node = match s.vip {
                        IpAddr::V4(_) => n.address_v4.map(IpAddr::V4),
                        IpAddr::V6(_) => n.address_v6.map(IpAddr::V6),
                    };
                    t.tunnel = node.filter(|_| h.tunnel).map(|node| health::Tunnel {
                        node,
                        gue_port: n.gue_port,
                        vip: s.vip,
                    });
                    t.initially_up = self.health.get(&(s.name.clone(), b.address)) != Some(&false);
                    targets.push(t);
                }
            }
        }
        // Health of backends no longer checked is forgotten.
        self.health
            .retain(|(s, a), _| targets.iter().any(|t| &t.service == s && &t.backend == a));
        if let Some(c) = &self.checker {
            c.set_targets(targets);
        }
        self.fleet_publish_view();
    }

    /// Takes in health verdicts; the tables of the services they change are rebuilt once.
    fn health_changed(&mut self, verdicts: Vec<HealthEvent>) {
        if self.in_fleet() {
            for ev in &verdicts {
                let why = if ev.up { "backend up" } else { "backend down" };
                info!(service = %ev.service, backend = %ev.backend, reason = %ev.reason, "{why} (this node's view)");
            }
            self.fleet_publish_view();
            return;
        }
        let (mut ups, mut downs) = (0, 0);
        for ev in verdicts {
            let key = (ev.service.clone(), ev.backend);
            if self.health.insert(key, ev.up) == Some(ev.up) {
                continue;
            }
            let why = if ev.up {
                ups += 1;
                "backend up"
            } else {
                downs += 1;
                "backend down"
            };
            info!(service = %ev.service, backend = %ev.backend, reason = %ev.reason, "{why}");
        }
        // The rebuilds' log names a failure when there is one among the verdicts.
        if downs > 0 {
            self.resync("backend down");
        } else if ups > 0 {
            self.resync("backend up");
        }
    }

    fn handle(&mut self, req: Request, caller: Caller) -> Response {
        match req {
            Request::Status {} => Response::Status(self.status()),
            Request::Table { service } => {
                match self.config.services.iter().find(|s| s.name == service) {
                    Some(s) => Response::Table(self.programmer.table_summary(&key_of(s), s)),
                    None => Response::error(
                        ErrorKind::NotFound,
                        format!("no service named {service:?}"),
                    ),
                }
            }
            Request::Plan { change } => self.plan(&change),
            Request::Apply { change } => self.apply(&change, caller),
            Request::Reload {} => self.reload(caller, "lb reload"),
            Request::Detach {} => self.detach(caller),
            Request::LoadFreeze { frozen } => self.load_freeze(frozen, caller),
            Request::LoadPlan {} => self.load_plan(),
        }
    }

    fn plan(&self, change: &Change) -> Response {
        let next = match desired::apply(&self.config, change) {
            Ok(n) => n,
            Err(e) => return e.into(),
        };
        let name = desired::service_of(change);
        let Some(svc) = next
            .services
            .iter()
            .chain(self.config.services.iter())
            .find(|s| s.name == name)
        else {
            return Response::error(ErrorKind::NotFound, format!("no service named {name:?}"));
        };
        let wanted = desired::wanted_weighted(
            &next.services,
            &self.health,
            &self.load.effective_of(&next.services),
        );
        match self.programmer.plan(&wanted, name, &key_of(svc)) {
            Ok(mut p) => {
                p.warnings = next
                    .services
                    .iter()
                    .find(|s| s.name == name)
                    .map(crate::config::service_warnings)
                    .unwrap_or_default();
                Response::Plan(p)
            }
            Err(e) => program_error(&e).into(),
        }
    }

    /// Applies a command's change: the changed configuration is validated as a whole,
    /// written to the file, then to the maps; only tables whose inputs changed are built.
    fn apply(&mut self, change: &Change, caller: Caller) -> Response {
        let next = match desired::apply(&self.config, change) {
            Ok(n) => n,
            Err(e) => {
                warn!(%caller, change = %desired::describe(change), kind = e.kind.name(), "change refused: {e}");
                return e.into();
            }
        };
        let name = desired::service_of(change).to_string();
        let wanted = desired::wanted_weighted(
            &next.services,
            &self.health,
            &self.load.effective_of(&next.services),
        );
        // A removed service's plan needs no build: every bucket goes.
        let removed_plan = match change {
            Change::ServiceRemove { .. } => self
                .config
                .services
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| self.programmer.plan(&wanted, &name, &key_of(s)).ok()),
            _ => None,
        };
        // The file first: a change that cannot be kept is not made.
        let before = self.file_config();
        let after = Config {
            services: next.services.clone(),
            load: next.load.clone(),
            ..before.clone()
        };
        if let Err(e) = self.file.save(&after) {
            let kind = match e {
                persist::PersistError::EditedMeanwhile { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            };
            let e = chain(&e);
            warn!(%caller, change = %desired::describe(change), "change refused: {e}");
            return Response::error(kind, format!("not applied: {e}"));
        }
        let changed = match self.programmer.sync(&wanted) {
            Ok(c) => c,
            Err(e) => {
                error!(%caller, change = %desired::describe(change), "change failed: {}", chain(&e));
                // Put the file and the maps back in line with the unchanged services.
                if let Err(e) = self.file.save(&before) {
                    error!("restoring {}: {}", self.file.path().display(), chain(&e));
                }
                self.resync("rollback");
                return program_error(&e).into();
            }
        };
        self.config.services = next.services;
        self.config.load = next.load;
        self.write_nexthops();
        self.update_load_targets();
        // A service may have gained this node itself as a backend.
        if let Err(e) = serve_vips(&self.config) {
            error!("putting the VIPs this node serves on lo failed: {e:#}");
        }
        self.update_health_targets();
        for c in changed.iter().filter(|c| c.service != name) {
            info!(service = %c.service, moved = c.moved, buckets = c.buckets, "table rebuilt");
        }
        let svc = self.config.services.iter().find(|s| s.name == name);
        let mut plan = removed_plan
            .or_else(|| changed.into_iter().find(|c| c.service == name))
            .unwrap_or_else(|| PlanSummary {
                service: name.clone(),
                buckets: svc.map_or(0, |s| 1 << s.bits()),
                ..PlanSummary::default()
            });
        if let Some(s) = svc {
            plan.warnings = crate::config::service_warnings(s);
            for w in &plan.warnings {
                warn!(%caller, "{w}");
            }
        }
        info!(
            %caller,
            change = %desired::describe(change),
            service = %name,
            moved = plan.moved,
            buckets = plan.buckets,
            file = %self.file.path().display(),
            "change applied and saved"
        );
        Response::Applied(plan)
    }

    /// The configuration as the file should hold it: the running one with the file's own
    /// `agent` section.
    fn file_config(&self) -> Config {
        Config {
            agent: self.file_agent.clone(),
            ..self.config.clone()
        }
    }

    /// Rereads the file: services, backends and `backend_vips` are applied, `node` and
    /// `agent` settings are reported as waiting for a restart.
    fn reload(&mut self, caller: Caller, via: &str) -> Response {
        notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
        ]);
        let resp = self.reload_file(caller, via);
        notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
        resp
    }

    fn reload_file(&mut self, caller: Caller, via: &str) -> Response {
        let path = self.file.path().to_path_buf();
        let (file, config) = match ConfigFile::load(&path) {
            Ok(c) => c,
            Err(e) => {
                let kind = match e {
                    crate::config::ConfigError::Read { .. } => ErrorKind::Internal,
                    _ => ErrorKind::Invalid,
                };
                let e = format!("reload refused, nothing changed: {}", chain(&e));
                warn!(%caller, via, "{e}");
                return Response::error(kind, e);
            }
        };
        for w in config.warnings() {
            warn!("{w}");
        }
        // In a fleet the services are the store's; the file's only seed an empty one.
        let mut config = config;
        if self.in_fleet() {
            config.services = self.config.services.clone();
        }
        let mut ignored = reload::ignored(&self.config.node, &config.node, "node");
        ignored.extend(reload::ignored(&self.file_agent, &config.agent, "agent"));
        let mut changed = reload::service_changes(&self.config.services, &config.services);
        // `backend_vips` and the VIPs of services that gain this node as a backend, with
        // their MSS clamped.
        if config.served_vips() != self.config.served_vips()
            || config.vip_mss != self.config.vip_mss
        {
            if let Err(e) = serve_vips(&config) {
                let e = format!("reload refused, nothing changed: {e:#}");
                warn!(%caller, via, "{e}");
                return Response::error(ErrorKind::Internal, e);
            }
        }
        if config.backend_vips != self.config.backend_vips {
            changed.push(reload::vips_change(
                &self.config.backend_vips,
                &config.backend_vips,
            ));
        }
        self.file = file;
        self.config.services = config.services;
        self.config.backend_vips = config.backend_vips;
        self.config.vip_mss = config.vip_mss;
        if config.load != self.config.load {
            changed.push("load: settings changed".into());
            self.load
                .set_gains(config.load.clone().unwrap_or_default().gains);
            self.config.load = config.load;
        }
        self.update_health_targets();
        self.update_load_targets();
        let mut moved = 0;
        match self.sync_services("reload") {
            Ok(tables) => {
                for t in tables {
                    moved += t.moved;
                    changed.push(format!(
                        "service {}: table rebuilt, {} of {} buckets moved",
                        t.service, t.moved, t.buckets
                    ));
                }
            }
            Err(e) => changed.push(format!("applying the services failed: {}", chain(&e))),
        }
        info!(
            %caller,
            via,
            file = %path.display(),
            changes = changed.len(),
            moved,
            ignored = %ignored.join("; "),
            "configuration reloaded"
        );
        for c in &changed {
            info!(%caller, "reload: {c}");
        }
        Response::Reloaded(ReloadReport {
            file: path.display().to_string(),
            changed,
            ignored,
        })
    }

    fn detach(&mut self, caller: Caller) -> Response {
        match Dataplane::unpin_all(&self.config.agent.pin_dir) {
            Ok(removed) => {
                info!(
                    %caller,
                    pins = removed.len(),
                    "detached: program removed from the interfaces, pins deleted; agent stopping"
                );
                Response::Done {
                    message: format!(
                        "detached from {} and removed {} pins; the agent stops",
                        self.config.node.interfaces.join(", "),
                        removed.len()
                    ),
                }
            }
            Err(e) => Response::error(ErrorKind::Internal, chain(&e)),
        }
    }

    fn status(&mut self) -> Status {
        let checks: BTreeMap<(String, IpAddr), health::TargetState> = self
            .checker
            .as_ref()
            .map(|c| {
                c.snapshot()
                    .into_iter()
                    .map(|t| ((t.service.clone(), t.backend), t))
                    .collect()
            })
            .unwrap_or_default();
        let mut services = Vec::new();
        let pairs = self
            .programmer
            .dataplane()
            .service_backend_counters()
            .unwrap_or_default();
        for s in &self.config.services {
            let key = key_of(s);
            let drives = self.config.load.as_ref().is_some_and(|l| l.drives(&s.name));
            let owned = self.programmer.owned(&key);
            let id = self.programmer.service_id_of(&key);
            let counters = id
                .and_then(|id| self.programmer.dataplane().service_counters(id).ok())
                .unwrap_or_default();
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    // What this service sent to the backend, not all its services.
                    let c = id
                        .zip(self.programmer.slot_of(&b.address))
                        .and_then(|(service, backend)| {
                            pairs.get(&ServiceBackendKey { service, backend })
                        })
                        .copied()
                        .unwrap_or_default();
                    let check = checks.get(&(s.name.clone(), b.address));
                    BackendStatus {
                        address: b.address,
                        local: self.config.is_local(b.address),
                        weight: b.weight,
                        drain: b.drain,
                        health: match (
                            b.health.is_some(),
                            self.health.get(&(s.name.clone(), b.address)),
                        ) {
                            (false, _) => Health::Unchecked,
                            (true, Some(false)) => Health::Down,
                            (true, _) => Health::Up,
                        },
                        buckets: owned.get(&b.address).copied().unwrap_or(0),
                        packets: c.packets,
                        bytes: c.bytes,
                        checks: check.map_or(0, |t| t.checks),
                        check_failures: check.map_or(0, |t| t.failures),
                        health_transitions: check.map_or(0, |t| t.transitions),
                        last_failure: check
                            .map(|t| t.last_failure.clone())
                            .filter(|f| !f.is_empty()),
                        load: drives.then(|| self.load.backend(&s.name, b.address, b.weight)),
                    }
                })
                .collect();
            let (table_digest, moved_buckets) =
                self.programmer.table_facts(&key).unwrap_or_default();
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                table_bits: s.bits(),
                packets: counters.packets,
                bytes: counters.bytes,
                moved_buckets,
                table_digest,
                backends,
            });
        }
        let reasons = self
            .programmer
            .dataplane()
            .reason_counts()
            .unwrap_or_default()
            .into_iter()
            .map(|(r, n): (Reason, u64)| ReasonCount {
                reason: r.name().to_string(),
                packets: n,
            })
            .collect();
        let load = self
            .config
            .load
            .as_ref()
            .filter(|l| !l.services.is_empty())
            .map(|l| self.fleet_load_status(self.load.status(l.frozen)));
        Status {
            services,
            reasons,
            table_rebuilds: self.programmer.rebuilds,
            // The running node settings: a reload leaves them for a restart.
            flow_hash: self.config.node.flow_hash,
            load,
            fleet: self.fleet.as_ref().map(fleet::Fleet::status),
        }
    }
}

/// Puts the VIPs `config` serves on `lo` (`Config::served_vips`), with the MSS advertised
/// on their connections clamped when `vip_mss` says so.
fn serve_vips(config: &Config) -> Result<()> {
    let vips = config.served_vips();
    netlink::ensure_vips_on_lo(&vips)?;
    if let Some(mss) = config.vip_mss {
        netlink::clamp_vip_mss(&vips, mss)?;
    }
    Ok(())
}

fn key_of(s: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: addr::to_bytes(s.vip),
        port_be: s.port.to_be(),
        proto: s.protocol.number(),
        _pad: 0,
    }
}

/// An error with its causes, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A programming failure as the API reports it.
fn program_error(e: &ProgramError) -> ApiError {
    let kind = if e.is_capacity() {
        ErrorKind::Capacity
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, chain(e))
}

/// Validates a configuration file without touching anything (`lb config check`).
pub fn check_config(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}
