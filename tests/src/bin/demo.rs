//! `demo`: lb end to end in network namespaces, narrated. `cargo xtask demo` runs it.
//!
//! Two clients reach a VIP through a router that spreads flows over two LB nodes (ECMP);
//! the LB nodes' XDP programs send each flow, encapsulated, to one of three backends,
//! which answer the clients directly. With TCP connections and UDP sessions open, a
//! backend is added, one drained and one failed, and the demo counts the established
//! flows that break at each step. Everything is removed at the end, also on Ctrl-C.
//!
//! `demo --unimog`: the same in Unimog mode, where four nodes behind the router's ECMP
//! each balance and serve, and a node hands the flows it owns to its own stack.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Result};
use tests::{
    churn::{broken_in, per_server, Fate, Flow, FlowPlan, Flows, Lab, LabPlan, Ran},
    tcp_request,
    timeline::Timeline,
    udp_request,
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// Initial backends and their weights.
const WEIGHTS: [u32; 3] = [100, 100, 200];
/// New connections opened to measure a share.
const SAMPLE: usize = 200;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C sets a flag that the demo checks between steps, so it stops and cleans up.
fn catch_sigint() {
    // SAFETY: installs an async-signal-safe handler (one atomic store).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("demo: needs root (network namespaces, XDP); try: sudo cargo xtask demo");
        return ExitCode::FAILURE;
    }
    catch_sigint();
    let started = Instant::now();
    let mut lab = None;
    let result = if std::env::args().any(|a| a == "--unimog") {
        run_unimog(&mut lab)
    } else {
        run(&mut lab)
    };
    let id = lab.as_ref().map(|l| l.topo.id.clone());
    if lab.is_some() {
        println!("\nCleaning up: stopping agents and servers, removing namespaces ...");
        drop(lab);
    }
    let left: Vec<String> = match id {
        Some(id) => tests::netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}{id}-", tests::topology::PREFIX)))
            .collect(),
        None => Vec::new(),
    };
    if !left.is_empty() {
        eprintln!("left behind: {left:?} (cargo xtask lab down --stale removes them)");
    }
    match result {
        Ok(()) => {
            println!("Done in {:.0?}.", started.elapsed());
            ExitCode::SUCCESS
        }
        Err(_) if INTERRUPTED.load(Ordering::Relaxed) => {
            println!("Interrupted; everything removed.");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn header(title: &str) {
    println!("\n== {title}");
}

/// Where the timeline chart goes: `LB_DEMO_CHART`, else `target/demo-timeline.png`.
fn chart_path() -> PathBuf {
    std::env::var_os("LB_DEMO_CHART").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/demo-timeline.png"),
        PathBuf::from,
    )
}

/// Prints every command that ran and where, with the first line of what it printed.
fn show_commands(ran: &[Ran]) {
    for r in ran {
        println!("  {}$ {}", r.node, r.command);
        println!("       {}", r.output.lines().next().unwrap_or_default());
    }
}

/// Prints `lb <args>` as run on LB node `lb`, indented.
fn show_lb(lab: &Lab, lb: usize, args: &[&str], when: &str) -> Result<()> {
    println!("  lb{lb}$ lb {}   ({when})", args.join(" "));
    for line in lab.lb_agents[lb].ok(args)?.lines() {
        println!("    {line}");
    }
    Ok(())
}

/// Seconds since midnight UTC of `t`.
fn day_seconds(t: SystemTime) -> f64 {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// Seconds from `since` to the time stamp that starts an agent's log line
/// ("2026-12-03T22:20:01.123456Z  INFO ...").
fn log_offset(line: &str, since: SystemTime) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    let at =
        h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?;
    let mut d = at - day_seconds(since);
    if d < -43_200.0 {
        d += 86_400.0;
    }
    Some(d)
}

/// What an LB agent logged about a backend going down, in seconds after the failure.
struct DownTimes {
    node: String,
    /// When its checker declared the backend down, per service.
    seen: Vec<(String, f64)>,
    /// When its last table rebuild for a backend going down was done.
    rebuilt: f64,
}

/// What each LB agent logged about `addr` going down after `since`.
fn down_times(lab: &Lab, addr: &str, since: SystemTime) -> Vec<DownTimes> {
    lab.lb_agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let log = agent.log();
            let mut seen = Vec::new();
            let mut rebuilt: f64 = 0.0;
            for line in log.lines() {
                let Some(at) = log_offset(line, since).filter(|d| *d >= 0.0) else {
                    continue;
                };
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{name}=")))
                        .map(|v| v.trim_matches('"').to_string())
                };
                if line.contains("lb::health: backend down")
                    && field("backend").as_deref() == Some(addr)
                {
                    seen.push((field("service").unwrap_or_default(), at));
                }
                if line.contains("table rebuilt") && line.contains("backend down") {
                    rebuilt = rebuilt.max(at);
                }
            }
            DownTimes {
                node: format!("lb{i}"),
                seen,
                rebuilt,
            }
        })
        .collect()
}

/// Percent of `n` in `total`.
fn pct(n: usize, total: usize) -> f64 {
    100.0 * n as f64 / total.max(1) as f64
}

/// Opens `SAMPLE` new connections (and as many UDP flows when `udp`) from the clients
/// and counts them per backend.
fn sample(lab: &Lab, udp: bool) -> Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let (web, quic) = (lab.service("web").dst(), lab.service("quic").dst());
    let mut tcp_seen = BTreeMap::new();
    let mut udp_seen = BTreeMap::new();
    for i in 0..SAMPLE {
        check()?;
        let c = &lab.topo.clients[i % lab.topo.clients.len()];
        *tcp_seen.entry(tcp_request(c, web, TIMEOUT)?).or_default() += 1;
        if udp {
            *udp_seen
                .entry(udp_request(c, quic, b"hello", TIMEOUT)?)
                .or_default() += 1;
        }
    }
    Ok((tcp_seen, udp_seen))
}

/// The share line of new TCP connections.
fn shares(seen: &BTreeMap<String, usize>) -> String {
    seen.iter()
        .map(|(b, n)| format!("{b} {:.0}%", pct(*n, SAMPLE)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Established flows per backend, TCP and UDP together.
fn open_line(flows: &[Flow]) -> String {
    per_server(flows)
        .iter()
        .map(|(b, n)| format!("{b} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one step did to the established flows; returns how many broke.
fn report_step(lab: &Lab, flows: &Flows, step: usize, failed: Option<&str>) -> Result<usize> {
    flows.settle(5, Duration::from_secs(10));
    check()?;
    let now = flows.snapshot();
    let broken = broken_in(&now, step);
    let open = now.iter().filter(|f| f.fate == Fate::Open).count();
    println!(
        "  established flows still working: {open} ({})",
        open_line(&now)
    );
    let on_failed = broken
        .iter()
        .filter(|f| Some(f.server.as_str()) == failed)
        .count();
    let elsewhere = broken.len() - on_failed;
    match failed {
        Some(b) => println!(
            "  established flows broken: {} ({on_failed} on the failed {b}, {elsewhere} elsewhere)",
            broken.len()
        ),
        None => println!("  established flows broken: {}", broken.len()),
    }
    if elsewhere > 0 {
        let stranded = lab.stranded(&now, step)?;
        let explained = broken
            .iter()
            .filter(|f| Some(f.server.as_str()) != failed)
            .filter(|f| stranded.iter().any(|(s, _)| s.local == f.local))
            .count();
        println!(
            "  ({explained} of them sat in a bucket that moved in two changes in a row; \
             a bucket remembers one previous owner)"
        );
    }
    Ok(broken.len())
}

/// The demo's lab: 2 clients, 4 nodes of which the first 3 serve at `WEIGHTS`, behind 2
/// LB nodes, or in Unimog mode all 4 balancing.
fn plan(unimog: bool) -> LabPlan {
    LabPlan {
        clients: 2,
        lbs: if unimog { 0 } else { 2 },
        backends: 4,
        weights: WEIGHTS.to_vec(),
        interval_ms: 200,
        fall: 2,
        table_bits: 16,
        ipv6: false,
        unimog,
    }
}

fn run(slot: &mut Option<Lab>) -> Result<()> {
    println!("lb demo: an XDP layer-4 load balancer, in network namespaces on this machine");
    header("Building the lab");
    let t = Instant::now();
    let lab = slot.insert(Lab::start(plan(false))?);
    check()?;
    let vip = lab.topo.vip_v4();
    println!("  clients c0, c1 -> router -> lb0, lb1 (ECMP by 5-tuple) -> b0, b1, b2");
    println!("  VIP {vip}: TCP port 80 (service web), UDP port 443 (service quic)");
    println!("  each LB node runs `lb agent`; its XDP program picks a backend per flow");
    println!("  and sends the packet to it in GUE; backends answer clients directly");
    println!("  b3 runs servers too but is not in the services yet");
    println!("  ready in {:.1?}; lb0's view (`lb list`):", t.elapsed());
    for line in lab.lb_agents[0].ok(&["list"])?.lines() {
        println!("    {line}");
    }
    println!(
        "  (to watch lb0 live from another terminal: lb top --socket {})",
        lab.lb_agents[0].socket.display()
    );

    header("1. New connections follow the weights");
    let (tcp, udp) = sample(lab, true)?;
    let total: u32 = WEIGHTS.iter().sum();
    println!("  {SAMPLE} new TCP connections and {SAMPLE} new UDP flows:");
    println!("    backend  weight  expected  TCP   UDP");
    for (i, w) in WEIGHTS.iter().enumerate() {
        let b = format!("b{i}");
        println!(
            "    {b:<8} {w:>6} {:>8.0}% {:>4.0}% {:>4.0}%",
            100.0 * f64::from(*w) / f64::from(total),
            pct(tcp.get(&b).copied().unwrap_or(0), SAMPLE),
            pct(udp.get(&b).copied().unwrap_or(0), SAMPLE),
        );
    }
    let carried: Vec<u64> = lab
        .lb_agents
        .iter()
        .map(|a| {
            let st = a.status()?;
            Ok(st["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["packets"].as_u64())
                .sum())
        })
        .collect::<Result<_>>()?;
    println!(
        "  ECMP used both LB nodes: lb0 forwarded {} packets, lb1 {}",
        carried[0], carried[1]
    );

    header("2. Long-lived traffic");
    let (web, quic): (SocketAddr, SocketAddr) =
        (lab.service("web").dst(), lab.service("quic").dst());
    let flows = Flows::open(
        &lab.clients(),
        &FlowPlan {
            tcp: vec![(web, 90)],
            udp: vec![(quic, 30)],
            period: Duration::from_millis(10),
            workers: 4,
            timeout: TIMEOUT,
        },
    )?;
    let total_flows = flows.snapshot().len();
    flows.settle(5, Duration::from_secs(10));
    check()?;
    println!("  90 TCP connections and 30 UDP sessions (a connected socket per client on");
    println!("  the server, as QUIC servers do), each sending a request every 10 ms or so");
    println!(
        "  and checking the echo; on {}",
        open_line(&flows.snapshot())
    );
    let mut broken_total = 0;
    let mut broken_outside_failed = 0;

    let mut marks: Vec<(Instant, String)> = Vec::new();

    header("3. Add backend b3 (weight 100)");
    println!("  lb0's `lb list` before: as at the start");
    flows.set_step(3);
    marks.push((Instant::now(), "3 add b3".into()));
    let t = Instant::now();
    let args = lab.add_backend_args(100);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    show_commands(&lab.apply_each("b3", &args)?);
    println!(
        "  (4 commands: 2 services on 2 LB nodes, {:.1?})",
        t.elapsed()
    );
    let n = report_step(lab, &flows, 3, None)?;
    broken_total += n;
    broken_outside_failed += n;
    let (tcp, _) = sample(lab, false)?;
    println!("  new connections: {} (b3 expected 20%)", shares(&tcp));
    show_lb(lab, 0, &["list"], "after")?;

    header("4. Drain b1");
    println!("  lb0's `lb list` before: as after step 3");
    flows.set_step(4);
    marks.push((Instant::now(), "4 drain b1".into()));
    let t = Instant::now();
    show_commands(&lab.apply_each("b1", &["backend", "drain", "{service}", "{addr}"])?);
    println!(
        "  (4 commands: 2 services on 2 LB nodes, {:.1?})",
        t.elapsed()
    );
    let before = flows.snapshot();
    let n = report_step(lab, &flows, 4, None)?;
    broken_total += n;
    broken_outside_failed += n;
    let after = flows.snapshot();
    let talking = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.server == "b1" && a.fate == Fate::Open && a.exchanges > b.exchanges)
        .count();
    println!("  b1 owns no bucket now, yet its {talking} established flows keep talking:");
    println!("  their packets reach the new owner, which hands them on to b1 (second hop)");
    let (tcp, _) = sample(lab, false)?;
    println!("  new connections: {} (none to b1)", shares(&tcp));
    show_lb(lab, 0, &["list"], "after: b1 drain")?;
    show_lb(
        lab,
        0,
        &["table", "web"],
        "b1 owns no first hop, but is second hop of the buckets it had",
    )?;

    header("5. Fail b2's health check");
    println!("  lb0's `lb list` before: as after step 4");
    flows.set_step(5);
    println!("  b2's health server (port 8080 on b2) stops; its TCP and UDP servers keep");
    println!("  running. No lb command runs: each LB agent's own checks notice.");
    let failed_at = SystemTime::now();
    marks.push((Instant::now(), "5 fail b2".into()));
    lab.fail_health("b2");
    let took = lab.wait_health("b2", "down", Duration::from_secs(10))?;
    let b2 = lab.backend("b2").v4.to_string();
    println!("  checks every 200 ms, down after 2 failures in a row: each checker should say");
    println!("  so 0.2 to 0.4 s after the failure (plus scheduling on a busy machine)");
    for DownTimes {
        node,
        seen,
        rebuilt,
    } in down_times(lab, &b2, failed_at)
    {
        let seen: Vec<String> = seen
            .iter()
            .map(|(s, at)| format!("{s} {at:.2} s"))
            .collect();
        println!(
            "    {node}: checks failed b2 at {}; tables rebuilt by {rebuilt:.2} s",
            seen.join(", ")
        );
    }
    println!(
        "  `lb list` showed b2 down on both nodes after {:.2} s: the rest is each agent",
        took.as_secs_f64()
    );
    println!("  rebuilding both services' 65,536-bucket tables and writing the changed buckets");
    println!("  (this debug build), one verdict after the other, before it answers a status");
    println!("  a down backend leaves the tables: its flows now reach others, which reset");
    println!("  TCP and answer UDP themselves");
    let n = report_step(lab, &flows, 5, Some("b2"))?;
    broken_total += n;
    let now = flows.snapshot();
    broken_outside_failed += broken_in(&now, 5)
        .iter()
        .filter(|f| f.server != "b2")
        .count();
    let (tcp, _) = sample(lab, false)?;
    println!("  new connections: {} (none to b2)", shares(&tcp));
    show_lb(lab, 0, &["list"], "after: b2 down")?;

    header("Timeline: requests answered per second by each backend's established flows");
    let started = flows.started();
    // Whole seconds only: the last, cut short, would look like a drop.
    let seconds = started.elapsed().as_secs() as usize;
    let answered = flows.answered();
    let end = flows.stop();
    let timeline = Timeline::new(started, &answered, &end, &marks, seconds);
    print!("{}", timeline.render());
    let chart = chart_path();
    timeline.write_png(
        &chart,
        "lb demo: requests answered and flows broken per second, by backend",
    )?;
    println!("  chart: {}", chart.display());

    header("Summary");
    let held = end.iter().filter(|f| f.fate == Fate::Open).count();
    let exchanges: u64 = end.iter().map(|f| f.exchanges).sum();
    println!("  {total_flows} established flows, 3 changes, {exchanges} requests answered");
    println!("  held to the end: {held}; broken: {broken_total}, of which {broken_outside_failed} not on the failed backend");
    Ok(())
}

/// Counters of the client and backend paths on each node, from `lb list --json`: how
/// the packets went (delivered to the node's own stack, sent on, encapsulated, accepted).
fn path_counts(lab: &Lab) -> Result<Vec<String>> {
    const SHOWN: [&str; 6] = [
        "delivered_locally",
        "sent_on_from_local",
        "encapsulated",
        "accept_syn",
        "accept_socket",
        "accept_last_hop",
    ];
    lab.lb_agents
        .iter()
        .zip(&lab.topo.lbs)
        .map(|(a, n)| {
            let st = a.status()?;
            let counts: Vec<String> = SHOWN
                .iter()
                .map(|name| {
                    let v = st["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|r| r["reason"] == *name)
                        .and_then(|r| r["packets"].as_u64())
                        .unwrap_or(0);
                    format!("{name} {v}")
                })
                .collect();
            Ok(format!("{}: {}", n.name, counts.join(", ")))
        })
        .collect()
}

/// Unimog mode: every node is both an LB node and a backend.
fn run_unimog(slot: &mut Option<Lab>) -> Result<()> {
    println!("lb demo, Unimog mode: every node both balances and serves");
    header("Building the lab");
    let t = Instant::now();
    let lab = slot.insert(Lab::start(plan(true))?);
    check()?;
    let vip = lab.topo.vip_v4();
    println!("  clients c0, c1 -> router -> lb0, lb1, lb2, lb3 (ECMP by 5-tuple)");
    println!("  every node runs `lb agent` and servers; VIP {vip} is on every node's lo");
    println!("  services web (TCP 80) and quic (UDP 443) list lb0, lb1, lb2 themselves as");
    println!("  backends: a node that owns a flow's bucket hands it to its own stack; any");
    println!("  other node sends it there in GUE; lb3 only balances for now");
    println!("  ready in {:.1?}; lb0's view (`lb list`):", t.elapsed());
    for line in lab.lb_agents[0].ok(&["list"])?.lines() {
        println!("    {line}");
    }

    header("1. New flows follow the weights, whichever node ECMP picks");
    let (tcp, udp) = sample(lab, true)?;
    let total: u32 = WEIGHTS.iter().sum();
    println!("  {SAMPLE} new TCP connections and {SAMPLE} new UDP flows:");
    println!("    node  weight  expected  TCP   UDP");
    for (i, w) in WEIGHTS.iter().enumerate() {
        let b = format!("lb{i}");
        println!(
            "    {b:<5} {w:>6} {:>8.0}% {:>4.0}% {:>4.0}%",
            100.0 * f64::from(*w) / f64::from(total),
            pct(tcp.get(&b).copied().unwrap_or(0), SAMPLE),
            pct(udp.get(&b).copied().unwrap_or(0), SAMPLE),
        );
    }
    println!("  how each node's XDP program handled them:");
    for line in path_counts(lab)? {
        println!("    {line}");
    }

    header("2. Long-lived traffic");
    let (web, quic) = (lab.service("web").dst(), lab.service("quic").dst());
    let flows = Flows::open(
        &lab.clients(),
        &FlowPlan {
            tcp: vec![(web, 90)],
            udp: vec![(quic, 30)],
            period: Duration::from_millis(10),
            workers: 4,
            timeout: TIMEOUT,
        },
    )?;
    flows.settle(5, Duration::from_secs(10));
    check()?;
    println!(
        "  90 TCP connections and 30 UDP sessions; on {}",
        open_line(&flows.snapshot())
    );

    header("3. Add lb3 as a backend (weight 100), then drain lb1");
    flows.set_step(3);
    let lb3 = lab.backend("lb3").v4;
    println!("  $ lb backend add web {lb3} --weight 100 --health tcp ...   (on every node)");
    for line in lab.add_backend("lb3", 100)? {
        println!("  {}", line.lines().next().unwrap_or_default());
    }
    let mut broken = report_step(lab, &flows, 3, None)?;
    flows.set_step(4);
    let lb1 = lab.backend("lb1").v4;
    println!("  $ lb backend drain web {lb1}   (on every node)");
    for line in lab.apply("lb1", &["backend", "drain", "{service}", "{addr}"])? {
        println!("  {}", line.lines().next().unwrap_or_default());
    }
    broken += report_step(lab, &flows, 4, None)?;
    let differ = lab.tables_differ()?;
    println!(
        "  the four nodes' tables: {}",
        if differ.is_empty() {
            "identical".to_owned()
        } else {
            differ.join("; ")
        }
    );
    let (tcp, _) = sample(lab, false)?;
    println!("  new connections: {} (none to lb1)", shares(&tcp));

    header("Summary");
    let end = flows.stop();
    let held = end.iter().filter(|f| f.fate == Fate::Open).count();
    println!(
        "  {} established flows, 2 changes; held to the end: {held}; broken: {broken}",
        end.len()
    );
    for line in path_counts(lab)? {
        println!("    {line}");
    }
    Ok(())
}
