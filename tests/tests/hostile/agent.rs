//! The agent: API access, refused input, hostile health-check targets, SIGKILL.

use std::{
    io::{BufRead, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::packet::mutate::Rng;
use serde_json::{json, Value};
use tests::{
    agent::{lb_binary, node_config, remove_run_dir, Agent},
    can_run, tcp_request, Spec, TcpServer, Topology,
};

/// How a hostile health-check target behaves.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Accepts, reads, never answers.
    Hang,
    /// Answers random bytes, then closes.
    Garbage,
    /// Answers an endless line of bytes (no status line ever ends).
    Flood,
}

/// Hostile servers on a backend; stopped when dropped.
struct Hostile {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hostile {
    fn start(ns: &tests::Netns, targets: &[(SocketAddr, Target)]) -> Result<Hostile> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &(addr, kind) in targets {
            // Bound inside the namespace; served from any thread.
            let l = ns.run(|| Ok(TcpListener::bind(addr)?))?;
            l.set_nonblocking(true)?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve_hostile(l, kind, &stop)));
        }
        Ok(Hostile { stop, threads })
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_hostile(l: TcpListener, kind: Target, stop: &AtomicBool) {
    let mut held = Vec::new();
    let mut rng = Rng(7);
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut req = [0u8; 512];
        let _ = s.read(&mut req);
        match kind {
            Target::Hang => held.push(s),
            Target::Garbage => {
                let junk: Vec<u8> = (0..300).map(|_| rng.byte()).collect();
                let _ = s.write_all(b"\x00\xffHTTP/9 banana\r\n");
                let _ = s.write_all(&junk);
            }
            Target::Flood => {
                let chunk = [b'A'; 4096];
                while !stop.load(Ordering::Relaxed) && s.write_all(&chunk).is_ok() {}
            }
        }
    }
}

/// What must not change when input is refused: the services, backends, weights and
/// table shares (not the counters, which move on their own).
fn shape(agent: &Agent) -> Value {
    let st = agent.status().expect("lb list --json");
    let services: Vec<Value> = st["services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let backends: Vec<Value> = s["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|b| json!([b["address"], b["weight"], b["drain"], b["buckets"]]))
                .collect();
            json!([
                s["name"],
                s["vip"],
                s["port"],
                s["protocol"],
                s["table_bits"],
                backends
            ])
        })
        .collect();
    json!(services)
}

/// One line to the API socket, one answer back.
fn raw_request(socket: &Path, line: &str) -> Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer)?;
    Ok(answer)
}

/// `lb --socket S args...` as uid/gid 65534 (nobody): (success, stderr + stdout).
fn lb_as_nobody(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(lb_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running lb as nobody");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    )
}

/// An HTTP request to the metrics endpoint from inside `ns`: the status line.
fn http(ns: &tests::Netns, addr: SocketAddr, request: &str) -> Result<String> {
    let request = request.to_string();
    ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        Ok(answer.lines().next().unwrap_or("").to_string())
    })
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const METRICS: &str = "127.0.0.1:9640";

/// One LB agent with a forwarding service and services whose single backend's health
/// target hangs, refuses, answers garbage or floods; then API access, refused input and
/// SIGKILL.
#[test]
fn agent_refuses_outsiders_and_bad_input_and_survives_hostile_backends() {
    if !can_run("agent_refuses_outsiders_and_bad_input_and_survives_hostile_backends") {
        return;
    }
    let topo = Topology::build(Spec::new(1, 1, 2)).unwrap();
    let _cleanup = RunDir(topo.id.clone());
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    for b in &topo.backends {
        let vips: Vec<IpAddr> = vec![topo.vip_v4().into(), topo.vip_v6().into()];
        let config = json!({ "node": node_config(b), "backend_vips": vips });
        agents.push(Agent::start(&topo.id, b, config).unwrap());
        let any: SocketAddr = "[::]:80".parse().unwrap();
        servers.push(TcpServer::start(b, &b.name, &[any]).unwrap());
    }
    let b0 = &topo.backends[0];
    let probe = |kind: &str, port: u16| {
        json!({ "address": b0.v4, "health": { "kind": kind, "port": port, "interval_ms": 200,
                "timeout_ms": 150, "rise": 1, "fall": 1 } })
    };
    let plain = |b: &tests::Node| json!({ "address": b.v4 });
    let vip = topo.vip_v4();
    let svc = |name: &str, port: u16, backends: Vec<Value>| {
        json!({ "name": name, "vip": vip, "port": port, "protocol": "tcp", "table_bits": 8,
                "backends": backends })
    };
    let config = json!({
        "node": node_config(&topo.lbs[0]),
        "services": [
            svc("web", 80, topo.backends.iter().map(plain).collect()),
            svc("hang", 81, vec![probe("http", 9001)]),
            svc("refuse", 82, vec![probe("tcp", 9002)]),
            svc("garbage", 83, vec![probe("http", 9003)]),
            svc("flood", 84, vec![probe("http", 9004)]),
        ],
    });
    let _hostile = Hostile::start(
        b0,
        &[
            (SocketAddr::new(b0.v4.into(), 9001), Target::Hang),
            (SocketAddr::new(b0.v4.into(), 9003), Target::Garbage),
            (SocketAddr::new(b0.v4.into(), 9004), Target::Flood),
        ],
    )
    .unwrap();
    let mut lb = Agent::start(&topo.id, &topo.lbs[0], config.clone()).unwrap();
    // Metrics on (the harness turns them off): rewrite the file and restart.
    let mut file: Value = serde_json::from_slice(&std::fs::read(&lb.config_path).unwrap()).unwrap();
    file["agent"]["metrics"] = json!(METRICS);
    std::fs::write(&lb.config_path, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    lb.kill().unwrap();
    lb.spawn().unwrap();
    let client = &topo.clients[0];
    let web = SocketAddr::new(vip.into(), 80);
    let timeout = Duration::from_secs(3);

    // Hostile health targets: each backend goes down, the agent keeps serving.
    wait_for(
        "hostile targets marked down",
        Duration::from_secs(5),
        || {
            let st = lb.status().unwrap();
            st["services"].as_array().unwrap()[1..]
                .iter()
                .all(|s| s["backends"][0]["health"] == "down")
        },
    );
    for _ in 0..5 {
        let t = Instant::now();
        lb.ok(&["list"]).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "lb list took {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    tcp_request(client, web, timeout).expect("web still forwards");
    let st = lb.status().unwrap();
    for s in &st["services"].as_array().unwrap()[1..] {
        let b = &s["backends"][0];
        println!(
            "health target {}: {} after {} checks, {} failed",
            s["name"], b["health"], b["checks"], b["check_failures"]
        );
        assert!(b["checks"].as_u64().unwrap() >= 3, "{s}");
    }

    // API access: the socket is 0600; a non-root peer is refused by the file mode, and
    // by its credentials once the mode would let it in.
    let mode = std::fs::metadata(&lb.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");
    let before = shape(&lb);
    let (ok, out) = lb_as_nobody(&lb.socket, &["list"]);
    println!("uid 65534, socket 0600: {}", out.trim());
    assert!(!ok && out.contains("Permission denied"), "{out}");
    std::fs::set_permissions(&lb.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let b1 = topo.backends[1].v4.to_string();
    for args in [
        vec!["list"],
        vec!["backend", "set-weight", "web", &b1, "1"],
        vec!["detach"],
    ] {
        let (ok, out) = lb_as_nobody(&lb.socket, &args);
        println!(
            "uid 65534, socket 0666, lb {}: {}",
            args.join(" "),
            out.trim()
        );
        assert!(
            !ok && out.contains("permission denied: the lb API is for root only"),
            "{out}"
        );
    }
    std::fs::set_permissions(&lb.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(shape(&lb), before, "refused peers changed nothing");
    assert!(lb.log().contains("API connection refused: not root"));

    // Metrics are read-only.
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let lb_ns = &topo.lbs[0].ns;
    let get = http(lb_ns, metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let req = format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}");
        let line = http(lb_ns, metrics, &req).unwrap();
        println!("metrics {method}: {line}");
        assert!(line.starts_with("HTTP/1.1 405"), "{method}: {line}");
    }

    // Refused commands, requests and reloads change nothing.
    let bad: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "service",
                "add",
                "--name",
                "huge",
                "--vip",
                "10.100.0.9",
                "--port",
                "90",
                "--table-bits",
                "18",
            ],
            "bucket",
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
                "90",
                "--table-bits",
                "21",
            ],
            "table_bits: 21 is out of range (4 to 20)",
        ),
        (
            vec![
                "service",
                "add",
                "--name",
                "tiny",
                "--vip",
                "10.100.0.9",
                "--port",
                "90",
                "--table-bits",
                "3",
            ],
            "table_bits: 3 is out of range (4 to 20)",
        ),
        (
            vec![
                "service",
                "add",
                "--name",
                "p0",
                "--vip",
                "10.100.0.9",
                "--port",
                "0",
            ],
            "port: 0 is not a port",
        ),
        (
            vec![
                "service", "add", "--name", "v0", "--vip", "0.0.0.0", "--port", "90",
            ],
            "0.0.0.0 cannot be a VIP",
        ),
        (
            vec![
                "service",
                "add",
                "--name",
                "bad name!",
                "--vip",
                "10.100.0.9",
                "--port",
                "90",
            ],
            "use 1 to 64 letters",
        ),
        (
            vec!["backend", "add", "web", "10.0.3.9", "--weight", "65536"],
            "weight 65536 is above the maximum 65535",
        ),
        (
            vec!["backend", "set-weight", "web", &b1, "4294967295"],
            "weight 4294967295 is above the maximum 65535",
        ),
        (
            vec!["backend", "add", "web", "224.0.0.1"],
            "not a usable backend address",
        ),
        (
            vec![
                "backend",
                "add",
                "web",
                "10.0.3.9",
                "--health",
                "tcp",
                "--health-interval-ms",
                "5",
            ],
            "health.interval_ms 5 is out of range",
        ),
        (
            vec![
                "backend",
                "add",
                "web",
                "10.0.3.9",
                "--health",
                "tcp",
                "--health-path",
                "/x",
            ],
            "health.path is for kind \"http\" only",
        ),
        (
            vec![
                "backend",
                "add",
                "web",
                "10.0.3.9",
                "--health",
                "http",
                "--health-timeout-ms",
                "0",
            ],
            "health.timeout_ms 0 must be above 0",
        ),
    ];
    let mut failed = Vec::new();
    for (args, want) in &bad {
        let out = lb.lb(args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        println!("refused: lb {} -> {err}", args.join(" "));
        if out.status.success() || !err.contains(want) {
            failed.push(format!("lb {}: {err} (want {want:?})", args.join(" ")));
        }
    }
    for (line, want) in [
        ("{\"op\":\"apply\"", "bad request: EOF while parsing"),
        (
            "{\"op\":\"detach\",\"now\":true}",
            "bad request: unknown field `now`",
        ),
        (
            "{\"op\":\"format_disk\"}",
            "bad request: unknown variant `format_disk`",
        ),
        ("\u{0}\u{1}garbage", "bad request"),
    ] {
        let answer = raw_request(&lb.socket, line).unwrap();
        println!("refused: raw request {line:?} -> {}", answer.trim());
        if !answer.contains(want) {
            failed.push(format!("raw {line:?}: {answer} (want {want:?})"));
        }
    }
    // Reload (command and SIGHUP) with an invalid file: refused, nothing changes.
    let good_file = std::fs::read(&lb.config_path).unwrap();
    let mut broken = file.clone();
    broken["services"][0]["table_bits"] = json!(30);
    std::fs::write(&lb.config_path, serde_json::to_vec_pretty(&broken).unwrap()).unwrap();
    let out = lb.lb(&["reload"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    println!("refused: lb reload (table_bits 30) -> {err}");
    if out.status.success() || !err.contains("table_bits: 30 is out of range") {
        failed.push(format!("lb reload: {err}"));
    }
    let pid = lb_pid(&lb);
    // SAFETY: signalling the agent this test started, by its PID.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_for("reload refused in the log", Duration::from_secs(3), || {
        lb.log().contains("reload refused")
    });
    std::fs::write(&lb.config_path, &good_file).unwrap();
    assert!(
        failed.is_empty(),
        "not refused as expected:\n{}",
        failed.join("\n")
    );
    assert_eq!(shape(&lb), before, "refused input changed nothing");

    // SIGKILL: the program stays attached and forwards new connections.
    lb.kill().unwrap();
    let mut fresh = 0;
    for _ in 0..10 {
        tcp_request(client, web, timeout).expect("a new connection after the agent was killed");
        fresh += 1;
    }
    let link = topo.lbs[0]
        .ns
        .exec(&["ip", "-d", "link", "show", &topo.lbs[0].ifname])
        .unwrap();
    assert!(link.contains("xdp"), "program still attached: {link}");
    println!("agent SIGKILLed: {fresh} new connections forwarded, XDP still attached");
    drop(agents);
}

/// The PID of the agent's process: the one process whose command line names its config
/// file (unique to the test).
fn lb_pid(agent: &Agent) -> i32 {
    let out = Command::new("pgrep")
        .args(["-f", &agent.config_path.display().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("agent pid")
}

/// Removes a test's agent directory when dropped.
struct RunDir(String);

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_run_dir(&self.0);
    }
}
