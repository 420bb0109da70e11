//! A fleet on one etcd: three LB agents in namespaces take their services from the store,
//! vote on health, and report their tables. One command on one node reaches every node;
//! a backend that fails as seen from one node only changes no table; an agent restarted
//! moves no bucket; etcd killed and restarted during traffic breaks nothing. Long-lived
//! TCP connections and UDP sessions run through all of it and none may break, but those
//! whose bucket changed owner twice (a known limit: the tables say which). Last, a
//! majority's verdict takes a backend out everywhere, and a node that dies stops voting
//! when its lease ends, and one that comes back with another flow hash seed is flagged.
//! Load-driven weights run through it: the backends publish their
//! reports to the store, one LB node leads the loop and every node builds the same tables
//! from its corrections; the leader killed, another one takes over within the lease.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tests::{
    can_run,
    churn::{Fate, FlowPlan, Flows, Lab, LabPlan},
    etcd::Etcd,
    Role,
};

/// The store's prefix, and the load loop's period on the LB nodes.
const PREFIX: &str = "/lbt/fleet";
const LOAD_PERIOD_MS: u64 = 500;

/// One client, three LB nodes, three backends (all in the services), small tables.
fn plan() -> LabPlan {
    LabPlan {
        clients: 1,
        lbs: 3,
        backends: 3,
        weights: vec![100, 100, 100],
        interval_ms: 200,
        fall: 2,
        table_bits: 12,
        ipv6: false,
        unimog: false,
    }
}

/// `lb fleet ARGS --config <lb0's file>` in lb0's namespace (where etcd is reachable).
fn fleet(lab: &Lab, args: &[&str]) -> Output {
    let a = &lab.lb_agents[0];
    let config = a.config_path.to_string_lossy().into_owned();
    let mut all = vec!["fleet"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", &config]);
    a.run_in_ns(&all).unwrap()
}

fn fleet_status(lab: &Lab) -> Value {
    let out = fleet(lab, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lb fleet status: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until every LB node reports, none lags, their digests and flow hashes agree,
/// and their live tables (read from the maps) are bucket for bucket the same.
fn wait_agreement(lab: &Lab, what: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let s = fleet_status(lab);
        let nodes = s["nodes"].as_array().map_or(0, Vec::len);
        let lagging = s["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["lag"] != 0);
        // Every node reports the one flow hash the lab configures.
        let hashes = s["flow_hashes"].as_object().cloned().unwrap_or_default();
        let one_hash = hashes.len() == 1
            && hashes
                .values()
                .all(|n| n.as_array().map(Vec::len) == Some(lab.lb_agents.len()));
        let agree = nodes == lab.lb_agents.len()
            && !lagging
            && one_hash
            && s["disagree"].as_array().is_some_and(Vec::is_empty);
        if agree {
            let differ = lab.tables_differ().unwrap();
            if differ.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                panic!("{what}: digests agree but tables differ: {differ:?}");
            }
        }
        if started.elapsed() > timeout {
            panic!(
                "{what}: no agreement after {timeout:?}:\n{}",
                String::from_utf8_lossy(&fleet(lab, &["status"]).stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Weight of backend `addr` of service `service` as LB node `lb` runs it.
fn weight(lab: &Lab, lb: usize, service: &str, addr: &str) -> u64 {
    let s = lab.lb_agents[lb].status().unwrap();
    s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .find(|b| b["address"] == addr)
        .and_then(|b| b["weight"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_fleet_on_one_etcd_agrees_and_survives_its_store() {
    if !can_run("a_fleet_on_one_etcd_agrees_and_survives_its_store") {
        return;
    }
    let mut etcd = None;
    let endpoint = std::cell::OnceCell::new();
    let run_dir = std::cell::OnceCell::new();
    // Each backend reports the figure in its file (all equal at first: no weight moves).
    let load_file =
        |b: &str| std::path::Path::new(run_dir.get().unwrap()).join(format!("{b}.load"));
    let mut lab = Lab::start_configured(
        plan(),
        |topo| {
            // In the router's namespace, on its end of lb0's link: every node routes there.
            let e = Etcd::start_in("fleet", topo.router.name(), topo.lbs[0].router_v4)?;
            let section = json!({ "endpoints": [e.endpoint()], "prefix": PREFIX });
            endpoint.set(e.endpoint()).unwrap();
            let dir = std::path::PathBuf::from("/run/lbt").join(&topo.id);
            std::fs::create_dir_all(&dir)?;
            run_dir.set(dir).unwrap();
            etcd = Some(e);
            Ok(Some(section))
        },
        |node, config| match node.role {
            Role::Backend => {
                let file = load_file(&node.name);
                std::fs::write(&file, "0.5\n").unwrap();
                config["load"] = json!({"report": {
                    "source": {"file": file}, "interval_ms": 200,
                    "fleet": {"endpoints": [endpoint.get().unwrap()], "prefix": PREFIX,
                              "node": node.v4.to_string()}}});
            }
            _ => {
                config["load"] = json!({"services": ["web"],
                    "gains": {"period_ms": LOAD_PERIOD_MS}});
            }
        },
    )
    .unwrap();
    let mut etcd = etcd.unwrap();
    let took = wait_agreement(&lab, "start", Duration::from_secs(30));
    println!("start: the three nodes agree ({took:?} after the last agent answered)");
    let exported: Value =
        serde_json::from_slice(&fleet(&lab, &["export"]).stdout).expect("lb fleet export");
    assert_eq!(
        exported["services"].as_array().map(Vec::len),
        Some(2),
        "the first agent seeded the store with its file's services"
    );

    let web = lab.service("web").dst();
    let quic = lab.service("quic").dst();
    let flows = Flows::open(
        &lab.clients(),
        &FlowPlan {
            tcp: vec![(web, 30)],
            udp: vec![(quic, 20)],
            period: Duration::from_millis(10),
            workers: 2,
            timeout: Duration::from_secs(3),
        },
    )
    .unwrap();
    flows.settle(5, Duration::from_secs(10));

    // One command on lb0 reaches every node.
    let b0 = lab.topo.backends[0].v4.to_string();
    lab.lb_agents[0]
        .ok(&["backend", "set-weight", "web", &b0, "50"])
        .unwrap();
    let took = wait_agreement(&lab, "set-weight on lb0", Duration::from_secs(10));
    for lb in 0..3 {
        assert_eq!(weight(&lab, lb, "web", &b0), 50, "lb{lb}");
    }
    println!("one command on lb0: every node's tables identical after {took:?}");

    // b2 fails as seen from lb0 only: its answers to lb0 are dropped.
    let lb0_addr = format!("{}/32", lab.topo.lbs[0].v4);
    let b2 = &lab.topo.backends[2];
    b2.ns
        .exec(&["ip", "route", "add", "blackhole", &lb0_addr])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.lb_agents[0]
        .log()
        .lines()
        .any(|l| l.contains("backend down (this node's view)") && l.contains(&b2.v4.to_string()))
    {
        assert!(Instant::now() < deadline, "lb0 never saw b2 down");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    wait_agreement(&lab, "b2 down from lb0 only", Duration::from_secs(10));
    for (i, agent) in lab.lb_agents.iter().enumerate() {
        let s = agent.status().unwrap();
        for svc in s["services"].as_array().unwrap() {
            for b in svc["backends"].as_array().unwrap() {
                assert_eq!(
                    b["health"], "up",
                    "lb{i}: {b}: one view of three is no majority"
                );
            }
        }
    }
    println!("b2 down as seen from lb0 only: every node keeps it, tables identical");
    b2.ns
        .exec(&["ip", "route", "del", "blackhole", &lb0_addr])
        .unwrap();

    // An agent restarted takes its state from the store and rebuilds nothing.
    let agent = &mut lab.lb_agents[1];
    agent.terminate().unwrap();
    let logged = agent.log().len();
    agent.spawn().unwrap();
    wait_agreement(&lab, "lb1 restarted", Duration::from_secs(20));
    let log = lab.lb_agents[1].log()[logged..].to_owned();
    let compared = log
        .lines()
        .find(|l| l.contains("running tables compared with the fleet store"))
        .expect("lb1 compared its tables with the store");
    assert!(compared.contains("rebuilt=0"), "{compared}");
    assert!(
        !log.contains("table rebuilt"),
        "lb1's restart rebuilt a table:\n{log}"
    );
    println!(
        "lb1 restarted: {}",
        compared.split("INFO ").last().unwrap_or(compared)
    );

    // etcd killed during traffic: forwarding and tables go on, changes are refused.
    etcd.kill();
    std::thread::sleep(Duration::from_secs(2));
    let refused = lab.lb_agents[1]
        .lb(&["backend", "set-weight", "web", &b0, "70"])
        .unwrap();
    assert!(
        !refused.status.success(),
        "a change went through without the store"
    );
    println!(
        "etcd down: change refused: {}",
        String::from_utf8_lossy(&refused.stderr).trim()
    );
    assert_eq!(lab.tables_differ().unwrap(), Vec::<String>::new());
    std::thread::sleep(Duration::from_secs(2));
    etcd.restart().unwrap();
    let took = wait_agreement(&lab, "etcd restarted", Duration::from_secs(30));
    println!("etcd restarted on its data: agreement again after {took:?}");
    assert_eq!(weight(&lab, 2, "web", &b0), 50, "the store kept the change");
    // The tables agreed all along; each node's store client reconnects on its own
    // schedule, and until it has, a change is refused as unavailable.
    let asked = Instant::now();
    loop {
        let out = lab.lb_agents[2]
            .lb(&["backend", "set-weight", "web", &b0, "100"])
            .unwrap();
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("unavailable") && asked.elapsed() < Duration::from_secs(15),
            "lb2 refused a change {:?} after etcd came back: {stderr}",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "lb2 took a change {:?} after the store came back",
        asked.elapsed()
    );
    let took = wait_agreement(&lab, "set-weight on lb2", Duration::from_secs(10));
    println!("one command on lb2 after the restart: identical after {took:?}");

    load_phase(&mut lab, &load_file);
    println!(
        "{}",
        String::from_utf8_lossy(&fleet(&lab, &["status"]).stdout)
    );

    let ended = flows.stop();
    let broken: Vec<_> = ended
        .iter()
        .filter(|f| matches!(f.fate, Fate::Broken { .. }))
        .collect();
    // The load loop moves weights more than once while the flows run: a bucket that
    // changes owner twice keeps only the second owner as its second hop, and loses the
    // way to its first owner's connections (docs/agent.md, "Known limits"). The tables
    // say which flows that happened to; no other may break.
    let stranded = lab.stranded(&ended, 0).unwrap();
    let unexpected: Vec<_> = broken
        .iter()
        .filter(|f| !stranded.iter().any(|(s, _)| s.local == f.local))
        .collect();
    println!(
        "flows: {} ({} exchanges), broken: {}, of them stranded by two owner changes of \
         their bucket: {} {:?}",
        ended.len(),
        ended.iter().map(|f| f.exchanges).sum::<u64>(),
        broken.len(),
        broken.len() - unexpected.len(),
        stranded
            .iter()
            .map(|(f, why)| (f.local, why))
            .collect::<Vec<_>>()
    );
    assert!(
        unexpected.is_empty(),
        "flows broke that the tables still lead to: {unexpected:#?}"
    );

    // A majority sees b2 down: it leaves every node's tables. Then lb1 dies: when its
    // lease ends its vote goes, one against one keeps b2 up, and it comes back.
    let b2 = &lab.topo.backends[2];
    let b2_addr = b2.v4.to_string();
    for lb in [0, 1] {
        let a = format!("{}/32", lab.topo.lbs[lb].v4);
        b2.ns
            .exec(&["ip", "route", "add", "blackhole", &a])
            .unwrap();
    }
    let took = wait_health(&lab, &[0, 1, 2], &b2_addr, "down", Duration::from_secs(15));
    wait_agreement(&lab, "b2 down from lb0 and lb1", Duration::from_secs(10));
    println!("b2 down as seen from lb0 and lb1: out of every node's tables after {took:?}");
    let died = Instant::now();
    lab.lb_agents[1].kill().unwrap();
    wait_health(&lab, &[0, 2], &b2_addr, "up", Duration::from_secs(30));
    let s = fleet_status(&lab);
    let live: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(live, ["lb0", "lb2"], "lb1's documents went with its lease");
    println!(
        "lb1 killed: its lease ended and its vote with it; b2 back on lb0 and lb2 after {:?}",
        died.elapsed()
    );

    // lb1 comes back with another seed: it would hash flows to other buckets, and the
    // fleet says so (the flows have ended: such a node breaks connections).
    let agent = &mut lab.lb_agents[1];
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(&agent.config_path).unwrap()).unwrap();
    let seed = config["node"]["hash_seed"].as_u64().unwrap_or(0);
    config["node"]["hash_seed"] = json!(seed + 1);
    std::fs::write(
        &agent.config_path,
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let logged = lab.lb_agents[0].log().len();
    lab.lb_agents[1].spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = fleet_status(&lab);
        if s["flow_hashes"].as_object().map_or(0, |h| h.len()) == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "no flow hash disagreement: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let odd = format!("seed {}", seed + 1);
    let lb1: Vec<&str> = s["flow_hashes"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(h, _)| h.ends_with(&odd))
        .flat_map(|(_, n)| n.as_array().unwrap().iter().filter_map(Value::as_str))
        .collect();
    assert_eq!(lb1, ["lb1"], "{s}");
    let out = fleet(&lab, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("DISAGREEMENT: the nodes hash flows differently"),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.lb_agents[0].log()[logged..].contains("nodes hash flows differently") {
        assert!(
            Instant::now() < deadline,
            "lb0 logged no flow hash disagreement"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("lb1 back with another seed: flagged by lb fleet status (exit 3) and in lb0's log");
}

/// Each LB node's load loop as `lb list --json` shows it: (leader, effective weight and
/// reported figure of every backend of `web`).
fn load_view(lab: &Lab, lb: usize) -> (String, Vec<(u64, Option<f64>)>) {
    let s = lab.lb_agents[lb].status().unwrap();
    let web = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()
        .clone();
    let weights = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["load"]["effective_weight"].as_u64().unwrap_or(0),
                b["load"]["reported"].as_f64(),
            )
        })
        .collect();
    (
        s["load"]["leader"].as_str().unwrap_or_default().to_string(),
        weights,
    )
}

/// lb0's effective weights of `web`'s backends.
fn weights(lab: &Lab, lb: usize) -> Vec<u64> {
    load_view(lab, lb).1.iter().map(|w| w.0).collect()
}

/// Waits until lb0's weights have not moved for 8 periods (the reports level); returns
/// them.
fn wait_rest(lab: &Lab) -> Vec<u64> {
    let started = Instant::now();
    let mut last = (weights(lab, 0), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(LOAD_PERIOD_MS / 2));
        let now = weights(lab, 0);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(8 * LOAD_PERIOD_MS) {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "weights never rest: {last:?}"
        );
    }
}

/// Waits until the live LB nodes `lbs` agree on one leader and `ok` holds of the weights
/// they show; returns the leader.
fn wait_load(
    lab: &Lab,
    lbs: &[usize],
    what: &str,
    timeout: Duration,
    ok: impl Fn(&[(u64, Option<f64>)]) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let views: Vec<_> = lbs.iter().map(|&lb| load_view(lab, lb)).collect();
        let leader = &views[0].0;
        let one = !leader.is_empty() && views.iter().all(|v| &v.0 == leader);
        let same = views
            .iter()
            .all(|v| v.1.iter().map(|w| w.0).eq(views[0].1.iter().map(|w| w.0)));
        if one && same && ok(&views[0].1) {
            return leader.clone();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Load-driven weights in the fleet: reports reach the store, one leader moves weights
/// on every node alike; its agent killed, another leads within the lease.
fn load_phase(lab: &mut Lab, load_file: &dyn Fn(&str) -> std::path::PathBuf) {
    let all = [0, 1, 2];
    // Equal reports so far: the reports are in the store, seen by every node (the fleet's
    // LB nodes fetch nothing from the backends), and no weight moved.
    let leader = wait_load(
        lab,
        &all,
        "reports in the store",
        Duration::from_secs(10),
        |w| w.iter().all(|b| b.1 == Some(0.5) && b.0 == 100),
    );
    println!("load: every node sees the published reports; leader {leader}");
    // b0 busy, b1 idle: the leader moves buckets, every node the same.
    std::fs::write(load_file("b0"), "0.9\n").unwrap();
    std::fs::write(load_file("b1"), "0.3\n").unwrap();
    let started = Instant::now();
    wait_load(
        lab,
        &all,
        "weights after b0 got busy",
        Duration::from_secs(15),
        |w| w[0].0 < 90 && w[1].0 > 110,
    );
    let took = wait_agreement(lab, "load-driven weights", Duration::from_secs(10));
    println!(
        "load: b0 busy, b1 idle: weights {:?} on every node after {:?}, tables identical \
         ({took:?})",
        load_view(lab, 0).1.iter().map(|w| w.0).collect::<Vec<_>>(),
        started.elapsed()
    );
    // Equal figures again: the weights rest where they are (a node that misses changes
    // while it is down would come back with other second hops: docs/fleet.md).
    std::fs::write(load_file("b0"), "0.5\n").unwrap();
    std::fs::write(load_file("b1"), "0.5\n").unwrap();
    let resting = wait_rest(lab);
    // The leader's agent killed: its lease ends and another node leads.
    let dead: usize = leader.trim_start_matches("lb").parse().unwrap();
    let live: Vec<usize> = all.into_iter().filter(|&i| i != dead).collect();
    lab.lb_agents[dead].kill().unwrap();
    let killed = Instant::now();
    let mut next = leader.clone();
    while next == leader {
        next = wait_load(lab, &live, "a new leader", Duration::from_secs(20), |_| {
            true
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    // Within the lease (10 s from its last renewal) and a period to claim the key; a
    // second of slack for the polling here.
    let bound = Duration::from_secs(10) + Duration::from_millis(2 * LOAD_PERIOD_MS + 1000);
    assert!(took < bound, "no new leader within {bound:?}: {took:?}");
    assert_eq!(
        weights(lab, live[0]),
        resting,
        "weights moved without cause"
    );
    println!("load: {leader}'s agent killed; {next} leads after {took:?} (lease 10 s)");
    lab.lb_agents[dead].spawn().unwrap();
    wait_agreement(lab, "the old leader back", Duration::from_secs(30));
    // The new leader moves the weights the other way, on every node alike.
    std::fs::write(load_file("b0"), "0.3\n").unwrap();
    std::fs::write(load_file("b1"), "0.9\n").unwrap();
    let started = Instant::now();
    let now = wait_load(
        lab,
        &all,
        "weights under the new leader",
        Duration::from_secs(15),
        |w| w[0].0 > resting[0] && w[1].0 < resting[1],
    );
    assert_eq!(now, next, "{leader} back as a follower");
    std::fs::write(load_file("b0"), "0.5\n").unwrap();
    std::fs::write(load_file("b1"), "0.5\n").unwrap();
    wait_rest(lab);
    let took = wait_agreement(lab, "weights under the new leader", Duration::from_secs(10));
    println!(
        "load: {leader} back as a follower; {next} moved the weights to {:?} on every node \
         after {:?}, tables identical ({took:?})",
        load_view(lab, 0).1.iter().map(|w| w.0).collect::<Vec<_>>(),
        started.elapsed()
    );
}

/// Waits until the LB nodes `lbs` all show backend `addr` with health `want` in every
/// service; returns how long it took.
fn wait_health(lab: &Lab, lbs: &[usize], addr: &str, want: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let all = lbs.iter().all(|&lb| {
            let s = lab.lb_agents[lb].status().unwrap();
            s["services"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|svc| svc["backends"].as_array().cloned().unwrap_or_default())
                .filter(|b| b["address"] == addr)
                .all(|b| b["health"] == want)
        });
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{addr} not {want} on {lbs:?} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
