//! `lb agent` on a load-balancer node and on backends, driven by the `lb` CLI: health
//! checks, weights, agent restarts under load, and refused input.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::MapData;
use lb::dataplane::map_pin_path;
use lb_common::maps::names;
use serde_json::{json, Value};
use tests::{
    agent::{node_config, remove_run_dir, Agent},
    can_run, tcp_request, Spec, TcpConn, TcpServer, Topology, UdpServer,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const HEALTH_PORT: u16 = 8080;
const EXTRA_VIP: &str = "10.100.0.77";

/// A lab: LB and backend agents, TCP servers on the VIP (port 80) and health servers
/// (port 8080) on every backend.
struct Lab {
    agents: Vec<Agent>,
    servers: Vec<Option<TcpServer>>,
    health: Vec<Option<TcpServer>>,
    topo: Topology,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.agents.clear();
        remove_run_dir(&self.topo.id);
    }
}

fn service(topo: &Topology, interval_ms: u64, fall: u32) -> Value {
    let backends: Vec<Value> = topo
        .backends
        .iter()
        .map(|b| {
            json!({
                "address": b.v4,
                "weight": 100,
                "health": { "kind": "tcp", "port": HEALTH_PORT, "interval_ms": interval_ms,
                            "timeout_ms": interval_ms / 2, "rise": 2, "fall": fall }
            })
        })
        .collect();
    json!({ "name": "web", "vip": topo.vip_v4(), "port": 80, "protocol": "tcp",
            "table_bits": 10, "backends": backends })
}

fn lb_config(topo: &Topology, interval_ms: u64, fall: u32) -> Value {
    json!({ "node": node_config(&topo.lbs[0]), "services": [service(topo, interval_ms, fall)] })
}

fn lab(backends: usize, interval_ms: u64, fall: u32) -> Lab {
    let topo = Topology::build(Spec::new(1, 1, backends)).unwrap();
    let mut lab = Lab {
        agents: Vec::new(),
        servers: Vec::new(),
        health: Vec::new(),
        topo,
    };
    let topo = &lab.topo;
    for b in &topo.backends {
        // The test bed put the VIPs on lo already; the agent adds one more itself.
        let vips: Vec<IpAddr> = vec![
            topo.vip_v4().into(),
            topo.vip_v6().into(),
            EXTRA_VIP.parse().unwrap(),
        ];
        let config = json!({ "node": node_config(b), "backend_vips": vips });
        lab.agents.push(Agent::start(&topo.id, b, config).unwrap());
        let any: SocketAddr = "[::]:80".parse().unwrap();
        lab.servers
            .push(Some(TcpServer::start(b, &b.name, &[any]).unwrap()));
        let hc: SocketAddr = SocketAddr::new(b.v4.into(), HEALTH_PORT);
        lab.health
            .push(Some(TcpServer::start(b, &b.name, &[hc]).unwrap()));
    }
    let lb = Agent::start(&topo.id, &topo.lbs[0], lb_config(topo, interval_ms, fall)).unwrap();
    lab.agents.insert(0, lb);
    lab
}

impl Lab {
    fn lb(&self) -> &Agent {
        &self.agents[0]
    }
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip_v4().into(), 80)
    }
    /// Opens `n` new connections and counts them per backend.
    fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let who = tcp_request(&self.topo.clients[0], self.vip(), TIMEOUT)
                .unwrap_or_else(|e| panic!("new connection through the LB failed: {e:#}"));
            *seen.entry(who).or_default() += 1;
        }
        seen
    }
}

#[test]
fn agent_forwards_lists_and_refuses_bad_commands() {
    if !can_run("agent_forwards_lists_and_refuses_bad_commands") {
        return;
    }
    let lab = lab(2, 200, 2);
    let seen = lab.spread(40);
    assert_eq!(seen.len(), 2, "both backends get connections: {seen:?}");

    let list = lab.lb().ok(&["list"]).unwrap();
    println!("{list}");
    assert!(
        list.contains("TCP") && list.contains(":80") && list.contains("web"),
        "{list}"
    );
    for b in &lab.topo.backends {
        assert!(list.contains(&b.v4.to_string()), "{list}");
    }
    let before = lab.lb().status().unwrap();

    let web = "web";
    let b0 = lab.topo.backends[0].v4.to_string();
    let bad: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["backend", "set-weight", "nope", &b0, "5"],
            "no service named \"nope\"",
        ),
        (
            vec!["backend", "set-weight", web, &b0, "70000"],
            "weight 70000 is above the maximum 65535",
        ),
        (
            vec!["backend", "drain", web, "10.9.9.9"],
            "has no backend 10.9.9.9",
        ),
        (vec!["backend", "add", web, &b0], "is already in service"),
        (
            vec!["backend", "add", web, "127.0.0.1"],
            "not a usable backend address",
        ),
        (vec!["service", "remove", "nope"], "no service named"),
        (
            vec![
                "service",
                "add",
                "--name",
                "web",
                "--vip",
                "10.100.0.9",
                "--port",
                "80",
            ],
            "a service named \"web\" exists",
        ),
        (
            vec![
                "service",
                "add",
                "--name",
                "dup",
                "--vip",
                "10.100.0.1",
                "--port",
                "80",
            ],
            "is already service \"web\"",
        ),
        (
            vec![
                "service",
                "add",
                "--name",
                "big",
                "--vip",
                "10.100.0.9",
                "--port",
                "80",
                "--table-bits",
                "25",
            ],
            "table_bits: 25 is out of range",
        ),
        (
            vec!["backend", "set-weight", web, "10.0.0.300", "5"],
            "invalid value '10.0.0.300'",
        ),
        (vec!["table", "nope"], "no service named"),
    ];
    for (args, want) in bad {
        let out = lab.lb().lb(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lb {args:?} should fail");
        assert!(err.contains(want), "lb {args:?}: {err}");
        println!("refused: lb {} -> {}", args.join(" "), err.trim());
    }
    let after = lab.lb().status().unwrap();
    assert_eq!(
        shape(&before),
        shape(&after),
        "refused commands changed nothing"
    );

    // A plan moves nothing; its figure matches what applying then moves.
    let plan = lab
        .lb()
        .ok(&["plan", "backend", "set-weight", web, &b0, "50"])
        .unwrap();
    let applied = lab
        .lb()
        .ok(&["backend", "set-weight", web, &b0, "50"])
        .unwrap();
    println!("{plan}{applied}");
    let moved = |s: &str| {
        s.split_whitespace()
            .skip_while(|w| *w != "move" && *w != "moved")
            .nth(1)
            .map(str::to_string)
    };
    assert_eq!(moved(&plan), moved(&applied), "plan and apply agree");
    let table = lab.lb().ok(&["table", web]).unwrap();
    println!("{table}");

    // The backend agents put their VIPs on lo.
    let lo = lab.topo.backends[0]
        .exec(&["ip", "addr", "show", "lo"])
        .unwrap();
    assert!(lo.contains(EXTRA_VIP), "{lo}");

    // Metrics, on the LB node's loopback.
    let metrics = lab.topo.lbs[0]
        .run(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9640")?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap();
    assert!(
        metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"),
        "{metrics}"
    );
    for needle in [
        "lb_backend_packets_total",
        "lb_dataplane_packets_total{reason=\"encapsulated\"}",
        "lb_backend_up",
        "lb_table_rebuilds_total",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
}

#[test]
fn failed_health_check_removes_a_backend_and_recovery_returns_it() {
    if !can_run("failed_health_check_removes_a_backend_and_recovery_returns_it") {
        return;
    }
    let (interval, fall) = (200u64, 2u32);
    let mut lab = lab(3, interval, fall);
    let seen = lab.spread(60);
    assert_eq!(seen.len(), 3, "all three backends serve at first: {seen:?}");

    let victim = lab.topo.backends[1].name.clone();
    lab.health[1] = None; // its health port now refuses connections
    let failed_at = Instant::now();
    let limit = Duration::from_millis(interval * u64::from(fall)) + Duration::from_secs(1);
    // New connections stop reaching it within interval x fall + 1 s: connections are
    // opened one by one until 60 in a row miss it (odds (2/3)^60 if it were still in
    // the table), and the last one that reached it must be within the limit.
    let mut last_hit = Duration::ZERO;
    let mut misses = 0;
    while misses < 60 {
        let who = tcp_request(&lab.topo.clients[0], lab.vip(), TIMEOUT).unwrap();
        if who == victim {
            last_hit = failed_at.elapsed();
            misses = 0;
        } else {
            misses += 1;
        }
        assert!(
            failed_at.elapsed() < limit + Duration::from_secs(5),
            "{victim} still gets connections"
        );
    }
    println!(
        "{victim}: last new connection {last_hit:?} after its health port closed (limit {limit:?})"
    );
    assert!(last_hit <= limit, "took {last_hit:?}, limit {limit:?}");
    let st = lab.lb().status().unwrap();
    let health = &st["services"][0]["backends"][1]["health"];
    assert_eq!(health, "down", "{st}");

    // A restarted agent keeps it out until it passes its checks again.
    lab.agents[0].kill().unwrap();
    lab.agents[0].spawn().unwrap();
    let st = lab.lb().status().unwrap();
    assert_eq!(st["services"][0]["backends"][1]["health"], "down", "{st}");
    let s = lab.spread(30);
    assert!(
        !s.contains_key(&victim),
        "{victim} came back with the restart: {s:?}"
    );

    let b = &lab.topo.backends[1];
    lab.health[1] =
        Some(TcpServer::start(b, &b.name, &[SocketAddr::new(b.v4.into(), HEALTH_PORT)]).unwrap());
    let back = Instant::now();
    loop {
        if lab.spread(30).contains_key(&victim) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "{victim} did not come back"
        );
    }
    println!("{victim} back after {:?}", back.elapsed());
    let log = lab.lb().log();
    assert!(
        log.contains("backend down") && log.contains("backend up"),
        "transitions logged:\n{log}"
    );
}

#[test]
fn set_weight_changes_the_share_of_new_connections() {
    if !can_run("set_weight_changes_the_share_of_new_connections") {
        return;
    }
    let lab = lab(2, 500, 3);
    let (b0, b1) = (&lab.topo.backends[0], &lab.topo.backends[1]);
    lab.lb()
        .ok(&["backend", "set-weight", "web", &b0.v4.to_string(), "300"])
        .unwrap();
    let n = 400;
    let seen = lab.spread(n);
    let share = seen.get(&b0.name).copied().unwrap_or(0) as f64 / n as f64;
    println!(
        "weights 300:100 -> {seen:?}, share of {} {share:.2}",
        b0.name
    );
    // Expected 0.75; 400 flows give a standard deviation near 0.02.
    assert!(
        (0.65..=0.85).contains(&share),
        "share {share:.2}, expected about 0.75"
    );

    lab.lb()
        .ok(&["backend", "set-weight", "web", &b0.v4.to_string(), "0"])
        .unwrap();
    let seen = lab.spread(60);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec![&b1.name],
        "weight 0 takes no new connections: {seen:?}"
    );
}

#[test]
fn restarting_the_agent_loses_no_connection() {
    if !can_run("restarting_the_agent_loses_no_connection") {
        return;
    }
    let mut lab = lab(2, 500, 3);
    // Long-lived connections that keep talking, and a stream of new ones.
    let stop = Arc::new(AtomicBool::new(false));
    let broken = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let mut conns: Vec<TcpConn> = (0..20)
        .map(|_| TcpConn::connect(&lab.topo.clients[0], lab.vip(), TIMEOUT).unwrap())
        .collect();
    let client = tests::Netns::open(lab.topo.clients[0].ns.name()).unwrap();
    let vip = lab.vip();
    let (s2, b2, o2) = (stop.clone(), broken.clone(), opened.clone());
    let opener = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            match tcp_request(&client, vip, TIMEOUT) {
                Ok(_) => o2.fetch_add(1, Ordering::Relaxed),
                Err(_) => b2.fetch_add(1, Ordering::Relaxed),
            };
        }
    });
    let mut rounds = 0;
    let talk = |conns: &mut Vec<TcpConn>| {
        for c in conns.iter_mut() {
            c.echo(b"still here")
                .expect("an established connection broke");
        }
    };
    // Where an earlier version pinned the service index (its first layout).
    let old_index = lab.lb().pin_dir.join("maps").join(names::SERVICE_INDEX);
    for restart in 0..3 {
        talk(&mut conns);
        lab.agents[0].kill().unwrap();
        if restart == 0 {
            // As after an upgrade from that version: its pin is left, and must be
            // neither adopted nor kept.
            let current = map_pin_path(&lab.lb().pin_dir, names::SERVICE_INDEX);
            MapData::from_pin(&current)
                .unwrap()
                .pin(&old_index)
                .unwrap();
        }
        // The program keeps forwarding with no agent at all.
        for _ in 0..5 {
            talk(&mut conns);
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.agents[0].spawn().unwrap();
        talk(&mut conns);
        rounds += 1;
        println!("restart {restart}: ok");
    }
    stop.store(true, Ordering::Relaxed);
    opener.join().unwrap();
    let (ok, failed) = (
        opened.load(Ordering::Relaxed),
        broken.load(Ordering::Relaxed),
    );
    println!("{rounds} agent restarts; 20 long-lived connections intact; new connections: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "new connections failed during restarts");
    assert!(ok > 0);
    let log = lab.lb().log();
    assert!(log.contains("taking over the running data plane"));
    assert!(log.contains("removed a map pin this version does not use"));
    assert!(!old_index.exists(), "the earlier version's pin is gone");
}

#[test]
fn bad_configs_are_refused_and_change_nothing() {
    if !can_run("bad_configs_are_refused_and_change_nothing") {
        return;
    }
    let lab = lab(2, 500, 3);
    let good = lb_config(&lab.topo, 500, 3);
    let mut bad_cases: Vec<(Value, &str)> = Vec::new();
    let mut c = good.clone();
    c["services"][0]["backends"][0]["wieght"] = json!(5);
    bad_cases.push((c, "unknown field `wieght`"));
    let mut c = good.clone();
    c["services"][0].as_object_mut().unwrap().remove("port");
    bad_cases.push((c, "missing field `port`"));
    let mut c = good.clone();
    c["services"][0]["vip"] = json!("10.100.0.300");
    bad_cases.push((c, "invalid IP address"));
    let mut c = good.clone();
    let first = c["services"][0]["backends"][0].clone();
    c["services"][0]["backends"]
        .as_array_mut()
        .unwrap()
        .push(first);
    bad_cases.push((c, "is listed twice"));
    let mut c = good.clone();
    c["services"][0]["backends"][0]["weight"] = json!(100000);
    bad_cases.push((c, "weight 100000 is above the maximum 65535"));
    let mut c = good.clone();
    c["services"][0]["table_bits"] = json!(21);
    bad_cases.push((c, "table_bits: 21 is out of range"));

    let before = lab.lb().status().unwrap();
    let dir = tempdir(&lab.topo.id);
    for (i, (config, want)) in bad_cases.iter().enumerate() {
        // `lb config check` names the problem.
        let path = dir.join(format!("bad{i}.json"));
        std::fs::write(&path, serde_json::to_vec(config).unwrap()).unwrap();
        let out = lab
            .lb()
            .lb(&["config", "check", path.to_str().unwrap()])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "config check: {err}"
        );
        println!(
            "config check refused: {}",
            err.trim().lines().last().unwrap_or("")
        );
        // A reload of the same refuses it and keeps running as before.
        lab.lb().write_config(config).unwrap();
        let out = lab.lb().lb(&["reload"]).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && err.contains("nothing changed"),
            "reload: {err}"
        );
    }
    let after = lab.lb().status().unwrap();
    assert_eq!(
        shape(&before),
        shape(&after),
        "refused configs changed nothing"
    );
    assert_eq!(lab.spread(40).len(), 2, "still forwarding to both backends");

    // A good reload applies.
    let mut c = good.clone();
    c["services"][0]["backends"][0]["weight"] = json!(7);
    lab.lb().write_config(&c).unwrap();
    lab.lb().ok(&["reload"]).unwrap();
    let st = lab.lb().status().unwrap();
    assert_eq!(st["services"][0]["backends"][0]["weight"], 7);
}

#[test]
fn commands_survive_restart_and_reload_and_one_agent_runs_per_pin_dir() {
    if !can_run("commands_survive_restart_and_reload_and_one_agent_runs_per_pin_dir") {
        return;
    }
    let mut lab = lab(2, 200, 2);
    let b0 = lab.topo.backends[0].v4.to_string();
    let out = lab.lb().ok(&["backend", "drain", "web", &b0]).unwrap();
    println!("lb backend drain web {b0}: {}", out.trim());
    let file: Value =
        serde_json::from_slice(&std::fs::read(&lab.lb().config_path).unwrap()).unwrap();
    assert_eq!(
        file["services"][0]["backends"][0]["drain"], true,
        "the drain is in the file: {file}"
    );
    let table = lab.lb().ok(&["table", "web", "--json"]).unwrap();

    // A second agent on the same pin directory refuses before touching anything, and
    // names the first; the first keeps its socket and answers.
    let first = lab.lb().pid().unwrap();
    let config = lab.lb().config_path.to_str().unwrap().to_string();
    let out = lab.lb().run_in_ns(&["agent", "--config", &config]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("second agent: {}", err.trim());
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("another lb agent (PID {first}) runs")),
        "{err}"
    );
    assert_eq!(lab.lb().ok(&["table", "web", "--json"]).unwrap(), table);

    // Another pin directory but the same socket: refused, the socket stays the first's.
    let dir = tempdir(&lab.topo.id);
    let mut other: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    other["agent"]["pin_dir"] = json!(format!("/sys/fs/bpf/{}-other", lab.topo.id));
    other["agent"]["metrics"] = Value::Null;
    let other_path = dir.join("other.json");
    std::fs::write(&other_path, serde_json::to_vec(&other).unwrap()).unwrap();
    let out = lab
        .lb()
        .run_in_ns(&["agent", "--config", other_path.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("agent on a live socket: {}", err.trim());
    assert!(
        !out.status.success() && err.contains("another agent answers on"),
        "{err}"
    );
    let other_pins = other["agent"]["pin_dir"].as_str().unwrap();
    assert!(
        !std::path::Path::new(other_pins).exists(),
        "the refused agent left {other_pins}"
    );
    assert_eq!(lab.lb().ok(&["table", "web", "--json"]).unwrap(), table);

    // `ip netns exec` gives a mount namespace of its own: refused, with the way that works.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.topo.lbs[0].ns.name()])
        .arg(tests::agent::lb_binary())
        .args(["agent", "--config", &config])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("ip netns exec: {}", err.trim());
    assert!(
        !out.status.success() && err.contains("nsenter --net=/run/netns/NAME"),
        "{err}"
    );
    assert_eq!(lab.lb().ok(&["table", "web", "--json"]).unwrap(), table);

    // Restart: the drain holds and no bucket moves.
    lab.agents[0].terminate().unwrap();
    let logged = lab.lb().log().len();
    lab.agents[0].spawn().unwrap();
    let st = lab.lb().status().unwrap();
    assert_eq!(st["services"][0]["backends"][0]["drain"], true, "{st}");
    assert_eq!(
        lab.lb().ok(&["table", "web", "--json"]).unwrap(),
        table,
        "the restart moved buckets"
    );
    let log = lab.lb().log()[logged..].to_string();
    assert!(!log.contains("table rebuilt"), "{log}");
    assert!(log.contains("rebuilt=0"), "{log}");

    // A reload of the file as the agent saved it changes nothing.
    let out = lab.lb().ok(&["reload"]).unwrap();
    println!("lb reload: {}", out.trim());
    assert!(out.contains("no change"), "{out}");
    assert_eq!(lab.lb().ok(&["table", "web", "--json"]).unwrap(), table);
    let seen = lab.spread(20);
    assert_eq!(
        seen.len(),
        1,
        "only the undrained backend gets new connections: {seen:?}"
    );

    // A failed start leaves no pins behind.
    let pin_dir = format!("/sys/fs/bpf/{}-failed", lab.topo.id);
    let bad = json!({
        "node": { "interfaces": ["nosuchif0"], "address_v4": "10.9.9.9" },
        "agent": { "pin_dir": pin_dir, "metrics": null,
                   "api_socket": dir.join("failed.sock") },
    });
    let path = dir.join("failed.json");
    std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = lab
        .lb()
        .run_in_ns(&["agent", "--config", path.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("failed start: {}", err.trim().lines().last().unwrap_or(""));
    assert!(!out.status.success() && err.contains("nosuchif0"), "{err}");
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "the failed start left {pin_dir}: {err}"
    );
}

#[test]
fn the_agent_runs_without_root_with_three_capabilities() {
    if !can_run("the_agent_runs_without_root_with_three_capabilities") {
        return;
    }
    let mut lab = lab(2, 200, 2);
    // The root agent goes with its pins; one as `nobody` takes its place.
    lab.agents.remove(0);
    const NOBODY: u32 = 65534;
    let lb = Agent::start_as(
        &lab.topo.id,
        &lab.topo.lbs[0],
        lb_config(&lab.topo, 200, 2),
        Some(NOBODY),
    )
    .unwrap();
    lab.agents.insert(0, lb);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", lab.lb().pid().unwrap())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .to_string()
    };
    println!("{}\n{}", field("Uid:"), field("CapEff:"));
    assert!(field("Uid:").contains(&NOBODY.to_string()), "{status}");
    assert_eq!(lab.spread(20).len(), 2, "forwards to both backends");
    let b0 = lab.topo.backends[0].v4.to_string();
    lab.lb().ok(&["backend", "drain", "web", &b0]).unwrap();
    let file: Value =
        serde_json::from_slice(&std::fs::read(&lab.lb().config_path).unwrap()).unwrap();
    assert_eq!(
        file["services"][0]["backends"][0]["drain"], true,
        "saved: {file}"
    );
    assert_eq!(
        lab.spread(20).len(),
        1,
        "the drained backend gets no new connections"
    );
}

#[test]
fn tunnel_check_marks_down_a_backend_that_cannot_decapsulate() {
    if !can_run("tunnel_check_marks_down_a_backend_that_cannot_decapsulate") {
        return;
    }
    let lab = lab(2, 200, 2);
    // The same service, checked through the tunnel: a SYN to the VIP, GUE-encapsulated;
    // and a UDP service checked through the tunnel with a datagram to the VIP. The LB
    // node routes the VIP into a blackhole, as the test bed sets it up.
    let mut c = lb_config(&lab.topo, 200, 2);
    for b in c["services"][0]["backends"].as_array_mut().unwrap() {
        b["health"] = json!({ "kind": "tcp", "tunnel": true, "interval_ms": 200,
                              "timeout_ms": 150, "rise": 1, "fall": 2 });
    }
    let mut udp = c["services"][0].clone();
    udp["name"] = json!("quic");
    udp["port"] = json!(443);
    udp["protocol"] = json!("udp");
    for b in udp["backends"].as_array_mut().unwrap() {
        b["health"] = json!({ "kind": "udp", "tunnel": true, "interval_ms": 200,
                              "timeout_ms": 150, "rise": 1, "fall": 2 });
    }
    c["services"].as_array_mut().unwrap().push(udp);
    let quic = SocketAddr::new(lab.topo.vip_v4().into(), 443);
    let _udp_servers: Vec<UdpServer> = lab
        .topo
        .backends
        .iter()
        .map(|b| UdpServer::start(b, &b.name, &[quic]).unwrap())
        .collect();
    lab.lb().write_config(&c).unwrap();
    let out = lab.lb().ok(&["reload"]).unwrap();
    println!("{}", out.trim());
    // (service, backend) -> (health, checks, last failure).
    let health = |svc: usize, i: usize| -> (String, u64, String) {
        let st = lab.lb().status().unwrap();
        let b = &st["services"][svc]["backends"][i];
        (
            b["health"].as_str().unwrap_or("").to_string(),
            b["checks"].as_u64().unwrap_or(0),
            b["last_failure"].as_str().unwrap_or("").to_string(),
        )
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {}",
                lab.lb().ok(&["list", "--stats"]).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("tunnel checks to pass", &|| {
        (0..2).all(|svc| {
            (0..2).all(|i| {
                let (h, checks, fail) = health(svc, i);
                h == "up" && checks >= 3 && fail.is_empty()
            })
        })
    });
    // Backend 0's program goes away: direct connections to it would still work, client
    // packets (encapsulated) no longer reach its stack.
    lab.agents[1].ok(&["detach"]).unwrap();
    wait("backend 0 down", &|| {
        health(0, 0).0 == "down" && health(1, 0).0 == "down"
    });
    let list = lab.lb().ok(&["list"]).unwrap();
    println!("{list}");
    for svc in 0..2 {
        let (_, _, reason) = health(svc, 0);
        assert!(reason.contains("does not decapsulate"), "{reason}");
        assert_eq!(health(svc, 1).0, "up", "backend 1 still decapsulates");
    }
    assert!(
        list.contains("last failure: GUE port unreachable"),
        "{list}"
    );
    assert_eq!(
        lab.spread(20).len(),
        1,
        "new connections go to backend 1 only"
    );
}

/// The services of a status without its counters, which move with traffic and checks.
fn shape(status: &Value) -> Value {
    let mut s = status["services"].clone();
    for svc in s.as_array_mut().unwrap() {
        let o = svc.as_object_mut().unwrap();
        o.remove("packets");
        o.remove("bytes");
        for b in o["backends"].as_array_mut().unwrap() {
            let b = b.as_object_mut().unwrap();
            for k in [
                "packets",
                "bytes",
                "checks",
                "check_failures",
                "health_transitions",
            ] {
                b.remove(k);
            }
        }
    }
    s
}

fn tempdir(id: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from("/run/lbt").join(id).join("cfg");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A backend row: address, packets, bytes.
type Row = (String, u64, u64);

/// Per service: (packets, bytes) of its line and its backend rows.
fn counter_rows(status: &Value) -> BTreeMap<String, ((u64, u64), Vec<Row>)> {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let rows = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    let a = b["address"].as_str().unwrap_or_default().to_string();
                    (a, n(&b["packets"]), n(&b["bytes"]))
                })
                .collect();
            let name = s["name"].as_str().unwrap_or_default().to_string();
            (name, ((n(&s["packets"]), n(&s["bytes"])), rows))
        })
        .collect()
}

#[test]
fn backend_counters_are_per_service_and_start_at_zero() {
    if !can_run("backend_counters_are_per_service_and_start_at_zero") {
        return;
    }
    let lab = lab(3, 200, 2);
    let b0 = lab.topo.backends[0].v4.to_string();
    let b1 = lab.topo.backends[1].v4.to_string();
    let b2 = lab.topo.backends[2].v4.to_string();
    // A second service, port 81 of the same VIP, shares b0 and b1 with `web`.
    let any81: SocketAddr = "[::]:81".parse().unwrap();
    let _servers81: Vec<TcpServer> = lab
        .topo
        .backends
        .iter()
        .map(|b| TcpServer::start(b, &b.name, &[any81]).unwrap())
        .collect();
    let vip = lab.topo.vip_v4().to_string();
    lab.lb()
        .ok(&[
            "service", "add", "--name", "alt", "--vip", &vip, "--port", "81",
        ])
        .unwrap();
    for b in [&b0, &b1] {
        lab.lb().ok(&["backend", "add", "alt", b]).unwrap();
    }
    let alt = SocketAddr::new(lab.topo.vip_v4().into(), 81);
    let seen = lab.spread(30);
    assert_eq!(seen.len(), 3, "web's backends all serve: {seen:?}");
    for _ in 0..12 {
        tcp_request(&lab.topo.clients[0], alt, TIMEOUT).unwrap();
    }

    let rows = counter_rows(&lab.lb().status().unwrap());
    for (name, ((packets, bytes), backends)) in &rows {
        let sum_p: u64 = backends.iter().map(|b| b.1).sum();
        let sum_b: u64 = backends.iter().map(|b| b.2).sum();
        println!("{name}: {packets} packets, {bytes} bytes; backends {backends:?}");
        assert!(*packets > 0, "{name} forwarded nothing");
        assert_eq!(
            (sum_p, sum_b),
            (*packets, *bytes),
            "{name}: backend rows do not add up to the service line"
        );
    }
    let list = lab.lb().ok(&["list", "--stats", "--exact"]).unwrap();
    println!("{list}");

    // b2 leaves web, its only service, and comes back: it starts from zero, not from
    // what it had.
    let before = rows["web"].1.iter().find(|b| b.0 == b2).map_or(0, |b| b.1);
    assert!(before > 0, "b2 got no traffic from web");
    lab.lb().ok(&["backend", "remove", "web", &b2]).unwrap();
    lab.lb().ok(&["backend", "add", "alt", &b2]).unwrap();
    lab.lb().ok(&["backend", "add", "web", &b2]).unwrap();
    let rows = counter_rows(&lab.lb().status().unwrap());
    for svc in ["web", "alt"] {
        let again = rows[svc].1.iter().find(|b| b.0 == b2).expect("b2 listed");
        assert_eq!(
            (again.1, again.2),
            (0, 0),
            "b2 back in {svc} inherited counters (it had {before} packets in web)"
        );
    }
}
