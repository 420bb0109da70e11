//! Load-driven weights end to end: real agents in namespaces. Each backend's agent
//! serves the utilisation its file says (`load.report`); the LB node's agent fetches
//! the reports and moves buckets away from the busier backend. `lb load freeze` stops
//! that, across an agent restart too, and `lb load resume` lets it go on.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tests::{
    agent::{node_config, remove_run_dir, Agent},
    can_run, Spec, Topology,
};

const PERIOD_MS: u64 = 200;

/// Backend address -> (effective weight, buckets) from `lb list --json`.
fn shares(lb: &Agent) -> BTreeMap<String, (u64, u64)> {
    let s = lb.status().unwrap();
    s["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let w = b["load"]["effective_weight"].as_u64().unwrap();
            (
                b["address"].as_str().unwrap().to_string(),
                (w, b["buckets"].as_u64().unwrap()),
            )
        })
        .collect()
}

/// Waits up to `within` for `ok` to hold of the LB's shares.
fn wait_for(
    lb: &Agent,
    within: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<String, (u64, u64)>) -> bool,
) -> BTreeMap<String, (u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let s = shares(lb);
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}: {s:?}\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The LB agent's metrics page (run in its namespace).
fn scrape() -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect("127.0.0.1:9640")?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")?;
    let mut page = String::new();
    c.read_to_string(&mut page)?;
    Ok(page)
}

#[test]
fn a_busier_backend_loses_buckets_and_freeze_holds_them() {
    if !can_run("a_busier_backend_loses_buckets_and_freeze_holds_them") {
        return;
    }
    let topo = Topology::build(Spec::new(0, 1, 2)).unwrap();
    let dir = PathBuf::from("/run/lbt").join(&topo.id);
    std::fs::create_dir_all(&dir).unwrap();
    let file = |i: usize| dir.join(format!("b{i}.load"));
    let report = |i: usize, u: f64| std::fs::write(file(i), format!("{u}\n")).unwrap();
    for (i, u) in [0.9, 0.3].into_iter().enumerate() {
        report(i, u);
    }
    let mut agents = Vec::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let config = json!({ "node": node_config(b),
            "load": { "report": { "source": { "file": file(i) }, "interval_ms": 50 } } });
        agents.push(Agent::start(&topo.id, b, config).unwrap());
    }
    let addr = |i: usize| topo.backends[i].v4.to_string();
    let backends: Vec<Value> = topo
        .backends
        .iter()
        .map(|b| json!({ "address": b.v4, "weight": 100 }))
        .collect();
    let lb_config = json!({
        "node": node_config(&topo.lbs[0]),
        "services": [{ "name": "web", "vip": topo.vip_v4(), "port": 80, "protocol": "tcp",
                       "table_bits": 10, "backends": backends }],
        "load": { "services": ["web"], "state_file": dir.join("lb-load.json"),
                  "gains": { "period_ms": PERIOD_MS, "stale_after_ms": 2000 } },
    });
    let mut lb = Agent::start(&topo.id, &topo.lbs[0], lb_config).unwrap();

    // b0 says it is three times as busy as b1: its weight and buckets fall (of 1024).
    let s = wait_for(&lb, Duration::from_secs(10), "b0 loses buckets", |s| {
        s[&addr(0)].1 < 400 && s[&addr(1)].1 > 624
    });
    assert!(s[&addr(0)].0 < 100, "{s:?}");
    assert!(lb.log().contains("load: effective weight changed"));
    let list = lb.ok(&["list"]).unwrap();
    println!("{list}");
    assert!(
        list.contains("effective") && list.contains("util 90.0%"),
        "{list}"
    );
    assert!(list.contains("load loop: running"), "{list}");
    let metrics = topo.lbs[0].run(scrape).unwrap();
    let line = format!(
        "lb_backend_effective_weight{{service=\"web\",backend=\"{}\"}}",
        addr(0)
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(metrics.contains("lb_backend_utilisation{"), "{metrics}");

    // Frozen: the reports turn round, the weights stay, also across a restart.
    lb.ok(&["load", "freeze"]).unwrap();
    let frozen = shares(&lb);
    report(0, 0.1);
    report(1, 0.95);
    let plan = lb.ok(&["plan", "load"]).unwrap();
    assert!(
        plan.contains("frozen") && plan.contains("would move"),
        "{plan}"
    );
    std::thread::sleep(Duration::from_millis(PERIOD_MS * 6));
    assert_eq!(shares(&lb), frozen, "frozen weights moved");
    let saved: Value = serde_json::from_slice(&std::fs::read(&lb.config_path).unwrap()).unwrap();
    assert_eq!(
        saved["load"]["frozen"],
        json!(true),
        "the switch is in the file"
    );
    lb.kill().unwrap();
    lb.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(PERIOD_MS * 4));
    assert_eq!(shares(&lb), frozen, "a restart kept the frozen weights");

    // Resumed: b1 is now the busy one and gives buckets away.
    lb.ok(&["load", "resume"]).unwrap();
    let s = wait_for(&lb, Duration::from_secs(10), "b1 loses buckets", |s| {
        s[&addr(1)].1 < 400 && s[&addr(0)].1 > frozen[&addr(0)].1
    });
    println!("after resume: {s:?}");
    drop(lb);
    drop(agents);
    remove_run_dir(&topo.id);
}
