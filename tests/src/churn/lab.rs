//! The churn lab: LB and backend agents (or Unimog nodes that are both), their services
//! and servers, and the changes and checks the churn tests and the demo make.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::{
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    stats::Reason,
};
use serde_json::{json, Value};

use super::{Fate, Flow, Kind, LiveTable, Ran, UdpSessionServer, HEALTH_PORT, TCP_PORT, UDP_PORT};
use crate::{
    agent::{node_config, remove_run_dir, Agent},
    Netns, Node, Spec, TcpConn, TcpServer, Topology,
};

/// A lab's shape.
#[derive(Clone, Debug)]
pub struct LabPlan {
    pub clients: usize,
    pub lbs: usize,
    /// Backend nodes, all running agents and servers.
    pub backends: usize,
    /// Backends in the services at the start (the first ones), with their weights.
    pub weights: Vec<u32>,
    /// Health checks: interval in ms and fall count.
    pub interval_ms: u64,
    pub fall: u32,
    /// Forwarding-table size of the services.
    pub table_bits: u32,
    /// Serve the TCP services on IPv6 too (service `web6`).
    pub ipv6: bool,
    /// Unimog mode: `backends` nodes that are all both LB nodes and backends (`lbs` is
    /// not used); each runs one agent with the services and the servers.
    pub unimog: bool,
}

/// The lab's services: `web` (TCP, IPv4 VIP), `web6` (TCP, IPv6 VIP) when `ipv6`,
/// `quic` (UDP, IPv4 VIP).
pub fn lab_services(topo: &Topology, ipv6: bool) -> Vec<LabService> {
    let mut services = vec![LabService {
        name: "web",
        vip: topo.vip_v4().into(),
        port: TCP_PORT,
        proto: IPPROTO_TCP,
    }];
    if ipv6 {
        services.push(LabService {
            name: "web6",
            vip: topo.vip_v6().into(),
            port: TCP_PORT,
            proto: IPPROTO_TCP,
        });
    }
    services.push(LabService {
        name: "quic",
        vip: topo.vip_v4().into(),
        port: UDP_PORT,
        proto: IPPROTO_UDP,
    });
    services
}

/// The config of `services` with `members` (node, weight) as backends, each checked by
/// a TCP connect to [`HEALTH_PORT`] every `interval_ms`, down after `fall` failures.
pub fn service_configs(
    services: &[LabService],
    members: &[(&Node, u32)],
    (interval_ms, fall): (u64, u32),
    table_bits: u32,
) -> Vec<Value> {
    let health = json!({ "kind": "tcp", "port": HEALTH_PORT, "interval_ms": interval_ms,
                         "timeout_ms": interval_ms / 2, "rise": 2, "fall": fall });
    services
        .iter()
        .map(|s| {
            let backends: Vec<Value> = members
                .iter()
                .map(|&(n, w)| json!({ "address": s.backend_addr(n), "weight": w, "health": health }))
                .collect();
            let proto = if s.proto == IPPROTO_TCP { "tcp" } else { "udp" };
            json!({ "name": s.name, "vip": s.vip, "port": s.port, "protocol": proto,
                    "table_bits": table_bits, "backends": backends })
        })
        .collect()
}

/// A node's servers: a TCP echo server on port 80 (every address), a connected-UDP
/// server on port 443 of every VIP, and a health server on port 8080 of its addresses.
/// Each answers with the node's name.
pub fn start_servers(
    node: &Node,
    vips: &[IpAddr],
) -> Result<(TcpServer, UdpSessionServer, TcpServer)> {
    let any: SocketAddr = SocketAddr::new("::".parse()?, TCP_PORT);
    let tcp = TcpServer::start(node, &node.name, &[any])?;
    let udp_addrs: Vec<SocketAddr> = vips.iter().map(|&v| SocketAddr::new(v, UDP_PORT)).collect();
    let udp = UdpSessionServer::start(node, &node.name, &udp_addrs)?;
    let health = TcpServer::start(node, &node.name, &node.sockaddrs(HEALTH_PORT))?;
    Ok((tcp, udp, health))
}

/// A service of the lab.
#[derive(Clone, Debug)]
pub struct LabService {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl LabService {
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }

    /// The backend's address of this service's family.
    pub fn backend_addr(&self, b: &Node) -> IpAddr {
        b.addr(self.vip.is_ipv6())
    }
}

/// LB agents on every LB node (same config, same hash seed), backend agents, TCP echo
/// servers (port 80), connected-UDP servers (port 443) and health servers (port 8080) on
/// every backend. In Unimog mode every node is both: one agent, with the services, and
/// the servers. Services: `web` (TCP, IPv4 VIP), `web6` (TCP, IPv6 VIP) when asked,
/// `quic` (UDP, IPv4 VIP). Dropping it stops everything and removes the namespaces.
pub struct Lab {
    pub lb_agents: Vec<Agent>,
    pub backend_agents: Vec<Agent>,
    pub tcp: Vec<Option<TcpServer>>,
    pub udp: Vec<Option<UdpSessionServer>>,
    pub health: Vec<Option<TcpServer>>,
    pub services: Vec<LabService>,
    pub plan: LabPlan,
    pub topo: Topology,
    pub started: Instant,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.lb_agents.clear();
        self.backend_agents.clear();
        self.udp.clear();
        self.tcp.clear();
        self.health.clear();
        remove_run_dir(&self.topo.id);
    }
}

impl Lab {
    /// Builds the topology and starts agents and servers.
    pub fn start(plan: LabPlan) -> Result<Self> {
        Lab::start_with(plan, |_| Ok(None))
    }

    /// As `start`; `fleet` is called once the network exists, before the LB agents
    /// start: a `fleet` section it returns (without `node`) makes the LB agents one fleet,
    /// each named after its node (`lb0`, ...).
    pub fn start_with(
        plan: LabPlan,
        fleet: impl FnOnce(&Topology) -> Result<Option<Value>>,
    ) -> Result<Self> {
        Lab::start_configured(plan, fleet, |_, _| {})
    }

    /// As `start_with`; `edit` may change each agent's config (backends' first, then the
    /// LB nodes') before it starts.
    pub fn start_configured(
        plan: LabPlan,
        fleet: impl FnOnce(&Topology) -> Result<Option<Value>>,
        edit: impl Fn(&Node, &mut Value),
    ) -> Result<Self> {
        let started = Instant::now();
        let spec = if plan.unimog {
            Spec::unimog(plan.clients, plan.backends)
        } else {
            Spec::new(plan.clients, plan.lbs, plan.backends)
        };
        let topo = Topology::build(spec)?;
        let services = lab_services(&topo, plan.ipv6);
        let mut lab = Lab {
            lb_agents: Vec::new(),
            backend_agents: Vec::new(),
            tcp: Vec::new(),
            udp: Vec::new(),
            health: Vec::new(),
            services,
            plan,
            topo,
            started,
        };
        for i in 0..lab.servers().len() {
            lab.start_servers(i)?;
        }
        let topo = &lab.topo;
        let fleet = fleet(topo)?;
        if !lab.plan.unimog {
            for b in &topo.backends {
                let vips: Vec<IpAddr> = topo.spec.vips.clone();
                let mut config = json!({ "node": node_config(b), "backend_vips": vips });
                edit(b, &mut config);
                lab.backend_agents.push(Agent::start(&topo.id, b, config)?);
            }
        }
        let services = lab.service_configs(&lab.initial_members());
        for n in &topo.lbs {
            let mut config = json!({ "node": node_config(n), "services": services });
            if let Some(f) = &fleet {
                config["fleet"] = f.clone();
                config["fleet"]["node"] = json!(n.name);
            }
            edit(n, &mut config);
            lab.lb_agents.push(Agent::start(&topo.id, n, config)?);
        }
        Ok(lab)
    }

    /// The nodes that run servers: the backends, or in Unimog mode every node.
    pub fn servers(&self) -> &[Node] {
        if self.plan.unimog {
            &self.topo.lbs
        } else {
            &self.topo.backends
        }
    }

    /// The agents of the server nodes (in Unimog mode, every node's agent).
    pub fn server_agents(&self) -> &[Agent] {
        if self.plan.unimog {
            &self.lb_agents
        } else {
            &self.backend_agents
        }
    }

    /// Starts server node `i`'s TCP, connected-UDP and health servers.
    fn start_servers(&mut self, i: usize) -> Result<()> {
        let (tcp, udp, health) = start_servers(&self.servers()[i], &self.topo.spec.vips)?;
        if self.tcp.len() <= i {
            self.tcp.resize_with(i + 1, || None);
            self.udp.resize_with(i + 1, || None);
            self.health.resize_with(i + 1, || None);
        }
        self.tcp[i] = Some(tcp);
        self.udp[i] = Some(udp);
        self.health[i] = Some(health);
        Ok(())
    }

    /// Stops server node `backend`'s TCP, UDP and health servers: its flows break and
    /// its checks fail.
    pub fn stop_servers(&mut self, backend: &str) {
        let i = self.backend(backend).index;
        self.tcp[i] = None;
        self.udp[i] = None;
        self.health[i] = None;
    }

    /// The services' members at the start: (server index, weight).
    fn initial_members(&self) -> Vec<(usize, u32)> {
        self.plan.weights.iter().copied().enumerate().collect()
    }

    /// The services' config with `members` (server index, weight) as backends.
    fn service_configs(&self, members: &[(usize, u32)]) -> Vec<Value> {
        let members: Vec<(&Node, u32)> = members
            .iter()
            .map(|&(i, w)| (&self.servers()[i], w))
            .collect();
        let p = &self.plan;
        service_configs(
            &self.services,
            &members,
            (p.interval_ms, p.fall),
            p.table_bits,
        )
    }

    /// Whether every LB node's live table of every service is the same (both hops of
    /// every bucket); otherwise which node and service differ from lb0's.
    pub fn tables_differ(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for svc in &self.services {
            let reference = self.table(0, svc)?;
            for lb in 1..self.lb_agents.len() {
                let t = self.table(lb, svc)?;
                let differ = (0..reference.buckets.len())
                    .filter(|&b| reference.buckets[b] != t.buckets[b])
                    .count();
                if differ > 0 {
                    out.push(format!(
                        "{}: lb{lb} differs from lb0 in {differ} buckets",
                        svc.name
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The server node named `name` (`b0`, ..., or `lb0`, ... in Unimog mode).
    pub fn backend(&self, name: &str) -> &Node {
        self.servers()
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The name of the server node with address `a`.
    pub fn backend_name(&self, a: IpAddr) -> Option<&str> {
        self.servers()
            .iter()
            .find(|b| IpAddr::from(b.v4) == a || IpAddr::from(b.v6) == a)
            .map(|b| b.name.as_str())
    }

    /// The lab's clients' namespaces.
    pub fn clients(&self) -> Vec<&Netns> {
        self.topo.clients.iter().map(|c| &c.ns).collect()
    }

    /// The service of `kind` and family.
    pub fn service(&self, name: &str) -> &LabService {
        self.services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The service a flow belongs to.
    pub fn service_of(&self, f: &Flow) -> &LabService {
        let proto = if f.kind == Kind::Tcp { 6 } else { 17 };
        self.services
            .iter()
            .find(|s| s.dst() == f.dst && s.proto == proto)
            .expect("a flow to a lab service")
    }

    /// Runs `lb <args>` on every LB agent, for every service: `{service}` and `{addr}` in
    /// `args` are replaced by the service's name and the backend's address of its
    /// family. Returns the first LB's output per service.
    pub fn apply(&self, backend: &str, args: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .apply_each(backend, args)?
            .into_iter()
            .filter(|r| r.node == "lb0")
            .map(|r| r.output)
            .collect())
    }

    /// As `apply`, with every command that ran, where, and what it printed, in order.
    pub fn apply_each(&self, backend: &str, args: &[&str]) -> Result<Vec<Ran>> {
        let b = self.backend(backend);
        let mut out = Vec::new();
        for s in &self.services {
            let a = s.backend_addr(b).to_string();
            let args: Vec<String> = args
                .iter()
                .map(|x| x.replace("{service}", s.name).replace("{addr}", &a))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            for (i, agent) in self.lb_agents.iter().enumerate() {
                out.push(Ran {
                    node: format!("lb{i}"),
                    command: format!("lb {}", args.join(" ")),
                    output: agent.ok(&args)?,
                });
            }
        }
        Ok(out)
    }

    /// The backend path's counters of every backend node that are not zero, one line per
    /// node ("b0: accept_socket 1234, second_hop 56, ...").
    pub fn backend_paths(&self) -> Vec<String> {
        const PATH: [Reason; 8] = [
            Reason::DeliveredLocally,
            Reason::SentOnFromLocal,
            Reason::AcceptSyn,
            Reason::AcceptSocket,
            Reason::AcceptLastHop,
            Reason::SecondHop,
            Reason::ReturnedToFirstHop,
            Reason::AcceptReturned,
        ];
        let on_path = |name: &str| PATH.iter().any(|r| r.name() == name);
        self.server_agents()
            .iter()
            .zip(self.servers())
            .map(|(agent, node)| {
                let counts = agent.status().map(|s| {
                    s["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| on_path(r["reason"].as_str().unwrap_or_default()))
                        .filter(|r| r["packets"].as_u64().unwrap_or(0) > 0)
                        .map(|r| {
                            format!("{} {}", r["reason"].as_str().unwrap_or("?"), r["packets"])
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                format!(
                    "{}: {}",
                    node.name,
                    counts.unwrap_or_else(|e| format!("({e:#})"))
                )
            })
            .collect()
    }

    /// What every backend's UDP server did with client `peer`'s sessions, in order, with
    /// seconds since the lab started.
    pub fn session_history(&self, peer: SocketAddr) -> Vec<String> {
        let mut out: Vec<(Instant, String)> = Vec::new();
        for (b, server) in self.servers().iter().zip(&self.udp) {
            if let Some(server) = server {
                out.extend(
                    server
                        .history(peer)
                        .into_iter()
                        .map(|(at, what)| (at, format!("{}: {what}", b.name))),
                );
            }
        }
        out.sort();
        out.into_iter()
            .map(|(at, what)| format!("{} {what}", self.since(at)))
            .collect()
    }

    /// `at` as seconds since the lab started ("12.345s"), how the diagnostics tell time.
    pub fn since(&self, at: Instant) -> String {
        format!("{:.3}s", (at - self.started).as_secs_f64())
    }

    /// Health verdicts the LB agents logged so far ("lb0: ... backend down"), in order.
    pub fn health_flips(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, agent) in self.lb_agents.iter().enumerate() {
            out.extend(
                agent
                    .log()
                    .lines()
                    .filter(|l| l.contains("lb::health: backend "))
                    .map(|l| format!("lb{i}: {l}")),
            );
        }
        out
    }

    /// `lb backend add` for `backend` on every service, with the lab's health check.
    pub fn add_backend(&self, backend: &str, weight: u32) -> Result<Vec<String>> {
        let args = self.add_backend_args(weight);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.apply(backend, &args)
    }

    /// The arguments of `lb backend add` (with `{service}` and `{addr}` for `apply`) that
    /// give a backend the lab's health check.
    pub fn add_backend_args(&self, weight: u32) -> Vec<String> {
        let p = &self.plan;
        [
            "backend",
            "add",
            "{service}",
            "{addr}",
            "--weight",
            &weight.to_string(),
            "--health",
            "tcp",
            "--health-port",
            &HEALTH_PORT.to_string(),
            "--health-interval-ms",
            &p.interval_ms.to_string(),
            "--health-timeout-ms",
            &(p.interval_ms / 2).to_string(),
            "--health-fall",
            &p.fall.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Closes `backend`'s health port, so its checks fail.
    pub fn fail_health(&mut self, backend: &str) {
        let i = self.backend(backend).index;
        self.health[i] = None;
    }

    /// Restarts every LB agent (SIGTERM, then a new process with the same file), one after
    /// the other; returns what each logged about its tables at the start.
    pub fn restart_lbs(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for agent in &mut self.lb_agents {
            agent.terminate()?;
            let logged = agent.log().len();
            agent.spawn()?;
            let log = agent.log();
            out.extend(
                log[logged..]
                    .lines()
                    .filter(|l| l.contains("table rebuilt") || l.contains("running tables"))
                    .map(|l| format!("{}: {}", agent.name, l.split("INFO ").last().unwrap_or(l))),
            );
        }
        Ok(out)
    }

    /// Lines of each of `sizes` bytes echoed through the TCP services (IPv4 and, when the
    /// lab serves it, IPv6) on a new connection each: full-size packets make it through
    /// the encapsulation (path-MTU discovery, MSS clamping). Returns one line per echo.
    pub fn large_echoes(&self, sizes: &[usize], timeout: Duration) -> Result<Vec<String>> {
        let client = &self.topo.clients[0];
        let mut done = Vec::new();
        for svc in self.services.iter().filter(|s| s.proto == 6) {
            let mut conn = TcpConn::connect(client, svc.dst(), timeout)?;
            for &size in sizes {
                let mut line: Vec<u8> = (0..size - 1).map(|i| b'a' + (i % 26) as u8).collect();
                line.push(b'\n');
                let started = Instant::now();
                conn.echo(&line).with_context(|| {
                    format!(
                        "{size}-byte line to {} ({}) via {}\n  backend paths:\n    {}",
                        svc.name,
                        svc.dst(),
                        conn.server,
                        self.backend_paths().join("\n    ")
                    )
                })?;
                done.push(format!(
                    "{size} bytes to {} ({}) on {}: echoed in {:.1?}",
                    svc.name,
                    svc.dst(),
                    conn.server,
                    started.elapsed()
                ));
            }
        }
        Ok(done)
    }

    /// Opens `backend`'s health port again, so its checks pass.
    pub fn restore_health(&mut self, backend: &str) -> Result<()> {
        let b = self.backend(backend);
        let server = TcpServer::start(b, &b.name, &b.sockaddrs(HEALTH_PORT))?;
        let i = b.index;
        self.health[i] = Some(server);
        Ok(())
    }

    /// Waits until every LB agent reports `backend` with health `want` ("up"/"down") in
    /// every service, at most `timeout`.
    pub fn wait_health(&self, backend: &str, want: &str, timeout: Duration) -> Result<Duration> {
        let b = self.backend(backend);
        let started = Instant::now();
        loop {
            let mut all = true;
            for agent in &self.lb_agents {
                let st = agent.status()?;
                for s in st["services"].as_array().into_iter().flatten() {
                    let svc = self.service(s["name"].as_str().unwrap_or_default());
                    let a = svc.backend_addr(b).to_string();
                    for be in s["backends"].as_array().into_iter().flatten() {
                        if be["address"].as_str() == Some(a.as_str()) && be["health"] != want {
                            all = false;
                        }
                    }
                }
            }
            if all {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("{backend} not {want} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The live table of `service` on LB node `lb`.
    pub fn table(&self, lb: usize, service: &LabService) -> Result<LiveTable> {
        LiveTable::read(
            &self.lb_agents[lb].pin_dir,
            service.vip,
            service.port,
            service.proto,
        )
    }

    /// Flows open, or broken in step `step` or the one before (a break seen after a step's
    /// check counts in that step), that the live tables (of every LB node) do not lead to
    /// their backend: it is neither the first nor the second hop of the flow's bucket.
    /// These are the flows the design cannot keep.
    pub fn stranded(&self, flows: &[Flow], step: usize) -> Result<Vec<(Flow, String)>> {
        let mut tables = BTreeMap::new();
        let mut out = Vec::new();
        let live = |f: &&Flow| match &f.fate {
            Fate::Open => true,
            Fate::Broken { step: s, .. } => *s + 1 >= step,
            Fate::Closed { .. } => false,
        };
        for f in flows.iter().filter(live) {
            let svc = self.service_of(f);
            let backend = svc.backend_addr(self.backend(&f.server));
            for lb in 0..self.lb_agents.len() {
                let key = (lb, svc.name);
                let table = match tables.entry(key) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(self.table(lb, svc)?),
                };
                let (first, second) = table.hops(&f.tuple());
                if first != Some(backend) && second != Some(backend) {
                    let show = |a: Option<IpAddr>| {
                        a.and_then(|a| self.backend_name(a))
                            .unwrap_or("-")
                            .to_owned()
                    };
                    out.push((
                        f.clone(),
                        format!("lb{lb}: hops {} / {}", show(first), show(second)),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// Open flows per backend name.
pub fn per_server(flows: &[Flow]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in flows.iter().filter(|f| f.fate == Fate::Open) {
        *m.entry(f.server.clone()).or_default() += 1;
    }
    m
}

/// Flows broken during step `step`.
pub fn broken_in(flows: &[Flow], step: usize) -> Vec<&Flow> {
    flows
        .iter()
        .filter(|f| matches!(&f.fate, Fate::Broken { step: s, .. } if *s == step))
        .collect()
}
