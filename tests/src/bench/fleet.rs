//! The fleet's reaction time: from a change committed to the store until every node's
//! data plane has it, seen as every node's report naming the change's revision with the
//! same table digests. Three real LB agents (the lab's namespaces, etcd in the router's
//! namespace); then the same with `WATCHERS` more control planes watching: the agent's
//! store link, services validation, health vote and table builder, without a data plane.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb::{
    agent::desired,
    config::Config,
    fleet::{
        doc::{self, NodeReport, ServicesDoc, SERVICES, TABLES},
        link::{Link, Role, Update},
        store::{FleetConfig, Store},
        vote,
    },
    table::{self, Candidate},
};
use lb_common::maps::{Bucket, NO_BACKEND};
use serde_json::json;

use crate::{
    churn::{Lab, LabPlan},
    etcd::Etcd,
};

/// Control planes without a data plane in the second case.
pub const WATCHERS: usize = 500;
const PREFIX: &str = "/lbt/bench";

/// One case: nodes that had to apply each change, and the times.
#[derive(Clone, Debug)]
pub struct FleetFigures {
    pub nodes: usize,
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `changes` changes with the three LB nodes alone, then with `WATCHERS` more.
pub fn measure(changes: usize) -> Result<Vec<FleetFigures>> {
    use_release_agent()?;
    let plan = LabPlan {
        clients: 1,
        lbs: 3,
        backends: 2,
        weights: vec![100, 100],
        interval_ms: 1000,
        fall: 3,
        table_bits: 16,
        ipv6: false,
        unimog: false,
    };
    eprintln!("bench: fleet: starting three LB nodes and etcd ...");
    let mut etcd = None;
    let lab = Lab::start_with(plan, |topo| {
        let e = Etcd::start_in("bench", topo.router.name(), topo.lbs[0].router_v4)?;
        let section = json!({ "endpoints": [e.endpoint()], "prefix": PREFIX });
        etcd = Some(e);
        Ok(Some(section))
    })?;
    let etcd = etcd.context("etcd started")?;
    let endpoint = etcd.endpoint();
    let lb0 = &lab.topo.lbs[0];
    let base: Config = serde_json::from_value(json!({
        "node": { "interfaces": ["eth0"], "address_v4": lb0.v4, "hash_seed": 42 }
    }))?;
    let real: Vec<String> = lab.topo.lbs.iter().map(|n| n.name.clone()).collect();
    // Everything runs where etcd is reachable: lb0's namespace.
    lb0.ns.run(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let cfg = |node: &str| FleetConfig {
                endpoints: vec![endpoint.clone()],
                prefix: PREFIX.into(),
                node: node.into(),
                tls: None,
            };
            let me = cfg("bench");
            let mut store = Store::connect(&me).await?;
            eprintln!("bench: fleet: {changes} changes, {} nodes ...", real.len());
            let alone = changes_timed(&mut store, &me, &real, &[], changes).await?;
            eprintln!("bench: fleet: {alone:?}");
            eprintln!("bench: fleet: starting {WATCHERS} control planes ...");
            let watchers: Vec<String> = (0..WATCHERS).map(|i| format!("w{i}")).collect();
            for w in &watchers {
                tokio::spawn(control_plane(cfg(w), base.clone()));
            }
            eprintln!(
                "bench: fleet: {changes} changes, {} nodes ...",
                real.len() + WATCHERS
            );
            let crowd = changes_timed(&mut store, &me, &real, &watchers, changes).await?;
            eprintln!("bench: fleet: {crowd:?}");
            Ok(vec![alone, crowd])
        })
    })
}

/// The bench is a release build; its agents are too (unless `LB_BIN` names one).
fn use_release_agent() -> Result<()> {
    if std::env::var_os("LB_BIN").is_some() {
        return Ok(());
    }
    eprintln!("bench: fleet: building the lb binary (release) ...");
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "lb-userspace",
            "--bin",
            "lb",
        ])
        .args(["--message-format=json"])
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "building the lb binary failed");
    let bin = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(String::from))
        .find(|p| p.ends_with("/lb"))
        .context("cargo named no lb executable")?;
    std::env::set_var("LB_BIN", bin);
    Ok(())
}

/// Waits until the reports are settled, then makes `n` changes one after the other (a
/// weight of `web`'s first backend, 50 and 100 in turn: every change moves buckets) and
/// times each from its commit until every node in `real` and `watchers` reported its
/// revision, the real nodes with one digest per service and the watchers with another.
/// The watchers' digests are of the first hops only: they joined later, and one whose
/// link was restarted under the load skipped states, so their second hops have other
/// histories.
async fn changes_timed(
    store: &mut Store,
    cfg: &FleetConfig,
    real: &[String],
    watchers: &[String],
    n: usize,
) -> Result<FleetFigures> {
    let mut times = Vec::new();
    let now = store.get::<ServicesDoc>(SERVICES).await?;
    settled(store, cfg, real, watchers, now.revision).await?;
    for i in 0..n {
        let weight = if i % 2 == 0 { 50 } else { 100 };
        let mut tries = 0;
        let revision = loop {
            match change(store, weight).await {
                Ok(r) => break r,
                Err(e) if tries < 5 => {
                    tries += 1;
                    eprintln!("bench: fleet: writing the change: {e:#}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(s) = Store::connect(cfg).await {
                        *store = s;
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let committed = Instant::now();
        settled(store, cfg, real, watchers, revision).await?;
        times.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(FleetFigures {
        nodes: real.len() + watchers.len(),
        changes: n,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    })
}

/// Sets the weight of `web`'s first backend; returns the revision of the commit.
async fn change(store: &mut Store, weight: u32) -> Result<i64> {
    let cur = store.get::<ServicesDoc>(SERVICES).await?;
    let mut doc = cur.value.context("no services in the store")?;
    let web = doc
        .services
        .iter_mut()
        .find(|s| s.name == "web")
        .context("no service web")?;
    web.backends[0].weight = weight;
    Ok(store.put_if(SERVICES, &doc, cur.revision).await?)
}

/// Polls the reports until every node has applied `revision` and the digests agree.
async fn settled(
    store: &mut Store,
    cfg: &FleetConfig,
    real: &[String],
    watchers: &[String],
    revision: i64,
) -> Result<()> {
    let started = Instant::now();
    loop {
        // Under the load of hundreds of control planes a connection may time out: the
        // bench reconnects, as the agents' links do.
        let reports: BTreeMap<String, NodeReport> = match store.list(TABLES).await {
            Ok(r) => r.docs,
            Err(e) => {
                eprintln!("bench: fleet: reading the reports: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(s) = Store::connect(cfg).await {
                    *store = s;
                }
                continue;
            }
        };
        let agree = |names: &[String]| {
            let mine: Vec<Option<&NodeReport>> = names.iter().map(|n| reports.get(n)).collect();
            mine.iter()
                .all(|r| r.is_some_and(|r| r.revision >= revision))
                && mine
                    .windows(2)
                    .all(|w| w[0].map(|r| &r.tables) == w[1].map(|r| &r.tables))
        };
        if agree(real) && agree(watchers) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("revision {revision} not applied by every node within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A node's control plane without a data plane: the agent's store link, the services
/// validated as a file, the health vote, every table built on the previous one, and a
/// report of the revision with the digests of the tables' first hops.
async fn control_plane(cfg: FleetConfig, base: Config) {
    let (link, mut updates) = Link::start(cfg, Role::default());
    let mut tables: BTreeMap<String, Vec<Bucket>> = BTreeMap::new();
    while let Some(u) = updates.recv().await {
        let Update::State(s) = u else { continue };
        let Some(services) = s
            .services
            .as_deref()
            .and_then(|b| doc::parse_services(b, &base).ok())
        else {
            continue;
        };
        let health = doc::health_map(&vote::effective(&s.views));
        let mut digests = BTreeMap::new();
        for d in desired::wanted(&services, &health) {
            let cands: Vec<Candidate> = d
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| Candidate {
                    addr: m.address,
                    weight: m.weight,
                    state: m.state,
                    slot: i as u32,
                })
                .collect();
            let prev = tables.get(&d.name).filter(|t| t.len() == 1 << d.bits);
            let Ok(built) = table::build(&cands, d.bits, 42, prev.map(Vec::as_slice)) else {
                continue;
            };
            let addr = |s: u32| {
                (s != NO_BACKEND)
                    .then(|| cands.get(s as usize).map(|c| c.addr))
                    .flatten()
            };
            digests.insert(d.name.clone(), digest(&built, addr));
            tables.insert(d.name, built);
        }
        link.publish_report(NodeReport {
            revision: s.revision,
            tables: digests,
        });
    }
}

/// FNV-1a over the first hop of every bucket, by address.
fn digest(t: &[Bucket], addr: impl Fn(u32) -> Option<IpAddr>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t {
        for hop in [addr(b.first)] {
            let bytes = match hop {
                None => vec![0],
                Some(IpAddr::V4(a)) => a.octets().to_vec(),
                Some(IpAddr::V6(a)) => a.octets().to_vec(),
            };
            for x in bytes {
                h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    h & ((1 << 53) - 1)
}
