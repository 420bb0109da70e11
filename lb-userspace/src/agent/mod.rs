//! `lb agent`: attaches the XDP program, keeps its maps true to the configured services,
//! backend health and weights, and serves the operator API and metrics.
//!
//! One task owns all state; the API server, the health checker, the metrics server and
//! signals send it messages, so every change is applied in order, whole or not at all.

mod desired;
mod netlink;
pub mod nexthop;
mod programmer;
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
    maps::{names, NextHopEntry, ServiceKey, NEXTHOP_VALID},
    stats::Reason,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};
use tracing::{error, info, warn};

pub use self::programmer::{Desired, Member};
use self::{nexthop::NextHops, programmer::Programmer};
use crate::{
    api::{BackendStatus, Change, Health, ReasonCount, Request, Response, ServiceStatus, Status},
    config::{Config, ServiceConfig, XdpMode},
    dataplane::{Dataplane, LoadOptions, Node},
    health::{self, Checker, HealthEvent},
    table::BackendState,
};

/// A request from the API or metrics server, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Response>);

/// Runs the agent until SIGTERM/SIGINT (forwarding stays) or `lb detach`.
pub async fn run(config_path: PathBuf) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb agent must run as root (it loads BPF programs and configures interfaces)");
    }
    let config = Config::load(&config_path)?;
    crate::bpffs::ensure_mounted(&config.agent.pin_dir)?;
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
    let mut agent = Agent::new(config_path, config, dp)?;
    agent.apply_node()?;
    let (hop_addrs, hop_addrs_rx) = watch::channel(Vec::new());
    let (hop_tx, mut hop_updates) = mpsc::channel::<NextHops>(16);
    tokio::spawn(nexthop::watch(hop_addrs_rx, hop_tx));
    agent.hop_addrs = Some(hop_addrs);
    agent.resync("start");
    agent.attach_all()?;

    let (call_tx, mut calls) = mpsc::channel::<Call>(64);
    let (event_tx, mut events) = mpsc::channel::<HealthEvent>(256);
    agent.checker = Some(Checker::new(event_tx));
    agent.update_health_targets();
    let server = server::start(&agent.config.agent.api_socket, call_tx.clone())?;
    if let Some(addr) = agent.config.agent.metrics {
        server::start_metrics(addr, call_tx.clone()).await?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    info!("agent ready");
    loop {
        tokio::select! {
            Some((req, reply)) = calls.recv() => {
                let detach = matches!(req, Request::Detach {});
                let resp = agent.handle(req);
                let failed = matches!(resp, Response::Error { .. });
                let _ = reply.send(resp);
                if detach && !failed {
                    break;
                }
            }
            Some(ev) = events.recv() => agent.health_changed(ev),
            Some(hops) = hop_updates.recv() => agent.nexthops_changed(hops),
            _ = hup.recv() => {
                if let Response::Error { message } = agent.reload() {
                    error!("reload refused: {message}");
                }
            }
            _ = term.recv() => { agent.stopping("SIGTERM"); break; }
            _ = int.recv() => { agent.stopping("SIGINT"); break; }
        }
    }
    drop(server);
    Ok(())
}

struct Agent {
    config_path: PathBuf,
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
}

impl Agent {
    fn new(config_path: PathBuf, config: Config, dp: Dataplane) -> Result<Self> {
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
        Ok(Agent {
            config_path,
            config,
            programmer,
            checker: None,
            health,
            hops: NextHops::new(),
            hops_written: BTreeMap::new(),
            hop_addrs: None,
        })
    }

    fn apply_node(&mut self) -> Result<()> {
        let n = &self.config.node;
        self.programmer.dataplane().set_node(&Node {
            hash_seed: n.hash_seed,
            gue_port: n.gue_port,
            addr_v4: n.address_v4,
            addr_v6: n.address_v6,
        })?;
        for ifname in &n.interfaces {
            netlink::enable_forwarding(ifname)?;
        }
        netlink::ensure_vips_on_lo(&self.config.backend_vips)?;
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
        info!(
            signal,
            pin_dir = %self.config.agent.pin_dir.display(),
            "agent stopping; the XDP program stays attached and keeps forwarding with the \
             current tables (run `lb detach` to remove it)"
        );
    }

    /// The services as the data plane should have them now.
    fn desired(&self, services: &[ServiceConfig]) -> Vec<Desired> {
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
                        weight: b.weight,
                        state: if self.health.get(&(s.name.clone(), b.address)) == Some(&false) {
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

    /// Brings the maps in line with the configuration; logs what moved.
    fn resync(&mut self, why: &str) {
        let wanted = self.desired(&self.config.services);
        match self.programmer.sync(&wanted) {
            Ok(changes) => {
                for c in changes {
                    info!(service = %c.service, moved = c.moved, buckets = c.buckets, why, "table rebuilt");
                }
            }
            Err(e) => error!("applying the services failed ({why}): {e:#}"),
        }
        self.write_nexthops();
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
    }

    fn health_changed(&mut self, ev: HealthEvent) {
        let key = (ev.service.clone(), ev.backend);
        if self.health.insert(key, ev.up) == Some(ev.up) {
            return;
        }
        let why = if ev.up { "backend up" } else { "backend down" };
        info!(service = %ev.service, backend = %ev.backend, reason = %ev.reason, "{why}");
        self.resync(why);
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status {} => Response::Status(self.status()),
            Request::Table { service } => {
                match self.config.services.iter().find(|s| s.name == service) {
                    Some(s) => Response::Table(self.programmer.table_summary(&key_of(s), s)),
                    None => error(format!("no service named {service:?}")),
                }
            }
            Request::Plan { change } => self.plan(&change),
            Request::Apply { change } => self.apply(&change),
            Request::Reload {} => self.reload(),
            Request::Detach {} => self.detach(),
        }
    }

    fn plan(&self, change: &Change) -> Response {
        let next = match desired::apply(&self.config.services, change) {
            Ok(n) => n,
            Err(e) => return error(e),
        };
        let name = desired::service_of(change);
        let Some(svc) = next
            .iter()
            .chain(self.config.services.iter())
            .find(|s| s.name == name)
        else {
            return error(format!("no service named {name:?}"));
        };
        match self
            .programmer
            .plan(&self.desired(&next), name, &key_of(svc))
        {
            Ok(p) => Response::Plan(p),
            Err(e) => error(chain(&e)),
        }
    }

    fn apply(&mut self, change: &Change) -> Response {
        let next = match desired::apply(&self.config.services, change) {
            Ok(n) => n,
            Err(e) => {
                warn!("change refused: {e}");
                return error(e);
            }
        };
        let name = desired::service_of(change).to_string();
        let wanted = self.desired(&next);
        let key = next
            .iter()
            .chain(self.config.services.iter())
            .find(|s| s.name == name)
            .map(key_of);
        let plan = key.and_then(|k| self.programmer.plan(&wanted, &name, &k).ok());
        if let Err(e) = self.programmer.sync(&wanted) {
            error!("change {change:?} failed: {e:#}");
            // Put the maps back in line with the unchanged services.
            self.resync("rollback");
            return error(chain(&e));
        }
        self.config.services = next;
        self.write_nexthops();
        self.update_health_targets();
        info!(?change, "change applied");
        Response::Applied(plan.unwrap_or_default())
    }

    fn reload(&mut self) -> Response {
        let config = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => return error(chain(&e)),
        };
        if config.node != self.config.node || config.agent != self.config.agent {
            warn!(
                "reload: node and agent settings change only with a restart; services are reloaded"
            );
        }
        if config.backend_vips != self.config.backend_vips {
            if let Err(e) = netlink::ensure_vips_on_lo(&config.backend_vips) {
                return error(format!("{e:#}"));
            }
        }
        self.config.services = config.services;
        self.config.backend_vips = config.backend_vips;
        self.update_health_targets();
        self.resync("reload");
        info!(file = %self.config_path.display(), "configuration reloaded");
        Response::Done {
            message: format!("reloaded {}", self.config_path.display()),
        }
    }

    fn detach(&mut self) -> Response {
        match Dataplane::unpin_all(&self.config.agent.pin_dir) {
            Ok(removed) => {
                info!(
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
            Err(e) => error(chain(&e)),
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
        for s in &self.config.services {
            let key = key_of(s);
            let owned = self.programmer.owned(&key);
            let counters = self
                .programmer
                .service_id_of(&key)
                .and_then(|id| {
                    self.programmer
                        .dataplane()
                        .counters(names::SERVICE_STATS, id)
                        .ok()
                })
                .unwrap_or_default();
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let c = self
                        .programmer
                        .slot_of(&b.address)
                        .and_then(|slot| {
                            self.programmer
                                .dataplane()
                                .counters(names::BACKEND_STATS, slot)
                                .ok()
                        })
                        .unwrap_or_default();
                    let check = checks.get(&(s.name.clone(), b.address));
                    BackendStatus {
                        address: b.address,
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
                    }
                })
                .collect();
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                table_bits: s.bits(),
                packets: counters.packets,
                bytes: counters.bytes,
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
        Status {
            services,
            reasons,
            table_rebuilds: self.programmer.rebuilds,
        }
    }
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

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

/// Validates a configuration file without touching anything (`lb config check`).
pub fn check_config(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}
