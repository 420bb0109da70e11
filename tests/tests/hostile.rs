//! Hostile and broken input.
//!
//! - The data plane: thousands of random and mutated frames (from the seed corpus of
//!   lb-common/fuzz) through BPF_PROG_TEST_RUN, each checked against the invariants: never
//!   XDP_ABORTED; counted under exactly one reason; traffic for neither a VIP nor this
//!   node passed untouched; no output longer than the input plus 72 bytes; the reason one
//!   the host model (`lb_common::packet`) allows; and what the program sends or accepts
//!   read back and compared with the input.
//! - The agent: over-limit configs and commands refused with their reasons and changing
//!   nothing; the API refusing non-root peers; metrics read-only; health-check targets
//!   that hang, refuse or answer garbage; SIGKILL leaving forwarding in place.

use std::{
    collections::BTreeMap,
    io::{BufRead, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb::dataplane::{Dataplane, LoadOptions, Node};
use lb_common::{
    addr::{from_bytes, is_v4_mapped, v4_mapped},
    encap::{ENCAP_LEN_V4, ENCAP_LEN_V6},
    maps::Bucket,
    packet::{
        check::{self, RoundTrip},
        classify, ethernet, example, ip,
        mutate::{mutate, random_frame, Frame, Mutation, Rng},
        Class, NodeView, UNTOUCHED,
    },
    proto::{ETH_LEN, ETH_P_IP},
    stats::Reason,
};
use serde_json::{json, Value};
use tests::{
    agent::{lb_binary, node_config, remove_run_dir, Agent},
    can_run,
    fixture::{self, install_service, GW_MAC},
    tcp_request, Spec, TcpServer, Topology,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The most bytes the program may add: an IPv6 outer header, UDP, GUE and the hop list.
const MAX_GROWTH: usize = ENCAP_LEN_V6;
const TABLE_BITS: u32 = 4;
const SEED: u64 = 0xc0ff_ee1b;

// ---- the data plane -------------------------------------------------------------------

fn backend_addr(v6: bool, i: u32) -> [u8; 16] {
    if v6 {
        Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1 + i as u16).octets()
    } else {
        v4_mapped([10, 1, 0, 1 + i as u8])
    }
}

/// Backend slots 0..3 are IPv4 (10.1.0.1-3), 3..6 IPv6 (fd01::1-3).
fn slot(v6: bool, i: u32) -> u32 {
    i + if v6 { 3 } else { 0 }
}

/// Service `i` of the example node has IPv6 backends when its VIP is IPv6, and the last
/// one (an IPv4 VIP) too, so IPv4 in IPv6 is exercised.
fn v6_backends(i: usize) -> bool {
    !is_v4_mapped(&example::SERVICES[i].vip) || i == example::SERVICES.len() - 1
}

/// The example node: its addresses, six backends, and every service with a table whose
/// bucket `b` belongs to backend `b % 3` and before to `(b + 1) % 3`.
fn configure(dp: &mut Dataplane) -> Result<()> {
    dp.set_node(&Node {
        hash_seed: 0x5eed,
        gue_port: example::GUE_PORT,
        addr_v4: Some(Ipv4Addr::from(example::NODE_V4)),
        addr_v6: Some(Ipv6Addr::from(example::NODE_V6)),
    })?;
    for s in 0..6 {
        dp.set_backend(s, from_bytes(backend_addr(s >= 3, s % 3)))?;
    }
    for (i, svc) in example::SERVICES.iter().enumerate() {
        let v6 = v6_backends(i);
        let table: Vec<Bucket> = (0..1u32 << TABLE_BITS)
            .map(|b| Bucket {
                first: slot(v6, b % 3),
                second: slot(v6, (b + 1) % 3),
            })
            .collect();
        install_service(dp, (svc.vip, svc.port, svc.proto), i as u32, &table)?;
    }
    Ok(())
}

/// The seed corpus of the fuzz target, by name.
fn corpus() -> Result<Vec<(String, Vec<u8>)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-common/fuzz/corpus/classify");
    let mut seeds = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Only the committed seeds (libFuzzer adds files named by their hash).
        if name.contains('-') {
            seeds.push((name, std::fs::read(e.path())?));
        }
    }
    seeds.sort();
    if seeds.len() < 40 {
        bail!("only {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(seeds)
}

fn reasons(dp: &mut Dataplane) -> Result<Vec<u64>> {
    Ok(dp.reason_counts()?.into_iter().map(|(_, n)| n).collect())
}

fn expected_verdict(r: Reason) -> u32 {
    match r {
        Reason::Encapsulated
        | Reason::IcmpForwarded
        | Reason::SecondHop
        | Reason::ReturnedToFirstHop
        | Reason::IcmpTooBigSent => XDP_TX,
        r if r.name().starts_with("drop_") => XDP_DROP,
        _ => XDP_PASS,
    }
}

/// A node that is `addr` and nothing else: how the receiver of what the program sent
/// reads it.
fn receiver(addr: [u8; 16]) -> NodeView<'static> {
    NodeView {
        configured: true,
        addr_v4: if is_v4_mapped(&addr) {
            [addr[12], addr[13], addr[14], addr[15]]
        } else {
            [0; 4]
        },
        addr_v6: if is_v4_mapped(&addr) { [0; 16] } else { addr },
        gue_port: example::GUE_PORT,
        services: &[],
    }
}

/// The outer destination of a frame the program sent.
fn outer_dst(frame: &[u8]) -> Option<[u8; 16]> {
    let (l3, v6) = ethernet(frame).ok()??;
    Some(ip(frame, l3, v6).ok()?.dst)
}

/// Runs `input` through the program and checks every invariant. Returns the reason.
fn check_packet(
    dp: &mut Dataplane,
    ifindex: u32,
    input: &[u8],
    configured: bool,
) -> Result<Reason> {
    let before = reasons(dp)?;
    let run = fixture::test_run(dp, ifindex, input)?;
    let after = reasons(dp)?;
    if run.verdict == XDP_ABORTED {
        bail!("XDP_ABORTED");
    }
    let moved: Vec<(usize, u64)> = after
        .iter()
        .zip(&before)
        .enumerate()
        .map(|(i, (a, b))| (i, a - b))
        .filter(|(i, d)| *d != 0 && Reason::ALL[*i].is_outcome())
        .collect();
    let [(reason, 1)] = moved[..] else {
        bail!("reason counters moved by {moved:?}, expected one counter by one");
    };
    let reason = Reason::ALL[reason];
    if run.verdict != expected_verdict(reason) {
        bail!("verdict {} with reason {}", run.verdict, reason.name());
    }
    if run.output.len() > input.len() + MAX_GROWTH {
        bail!("{} bytes out of {} in", run.output.len(), input.len());
    }
    if UNTOUCHED.contains(reason) && run.output != input {
        bail!(
            "{} but the frame changed:\n out {:02x?}",
            reason.name(),
            run.output
        );
    }
    let node = NodeView {
        configured,
        ..example::NODE
    };
    let class = classify(&node, input);
    if !class.reasons().contains(reason) {
        bail!(
            "the program says {}, the model {:?} ({:?})",
            reason.name(),
            class.reasons().iter().map(Reason::name).collect::<Vec<_>>(),
            class
        );
    }
    // Traffic for neither a VIP nor this node passes untouched.
    if let Ok(Some((l3, v6))) = ethernet(input) {
        if let Ok(o) = ip(input, l3, v6) {
            let mine = o.dst == v4_mapped(example::NODE_V4) || o.dst == example::NODE_V6;
            if !example::NODE.is_vip(&o.dst) && !mine && !UNTOUCHED.contains(reason) {
                bail!("not for a VIP nor this node, yet {}", reason.name());
            }
        }
    }
    match (class, reason) {
        (Class::Service(s), Reason::Encapsulated | Reason::IcmpForwarded) => {
            let encap = match u16::from_be_bytes([run.output[12], run.output[13]]) {
                ETH_P_IP => ENCAP_LEN_V4,
                _ => ENCAP_LEN_V6,
            };
            if run.output.len() != input.len() - s.l3_off + ETH_LEN + encap {
                bail!("encapsulated to {} bytes", run.output.len());
            }
            if run.output[..6] != GW_MAC || run.output[14 + encap..] != input[s.l3_off..] {
                bail!("encapsulated frame wrong:\n out {:02x?}", run.output);
            }
            let to = outer_dst(&run.output).context("no outer header")?;
            match classify(&receiver(to), &run.output) {
                Class::Gue(g) if g.flow == Some(s.tuple) && g.hops_left == 1 => {}
                Class::Decided(Reason::DropMalformed)
                    if check::invariants(&example::NODE, input)
                        .is_ok_and(|(_, rt)| rt == Some(RoundTrip::PastHeaderLimit)) => {}
                other => bail!("the backend would read {other:?} for {s:?}"),
            }
        }
        (Class::Gue(g), Reason::SecondHop) => {
            let (l3, _) = ethernet(input).ok().flatten().context("no l3")?;
            if run.output.len() != input.len() - (l3 - 14) {
                bail!("passed on with {} bytes", run.output.len());
            }
            if outer_dst(&run.output) != Some(g.next_hop) {
                bail!("passed on, but not to {:02x?}", g.next_hop);
            }
            match classify(&receiver(g.next_hop), &run.output) {
                Class::Gue(h) if h.hops_left == 0 && h.flow == g.flow => {}
                other => bail!("the next hop would read {other:?}"),
            }
        }
        (Class::Gue(_), Reason::ReturnedToFirstHop) => {
            let (l3, v6) = ethernet(input).ok().flatten().context("no l3")?;
            let src = ip(input, l3, v6).ok().context("no outer")?.src;
            if outer_dst(&run.output) != Some(src) {
                bail!("returned, but not to the first hop {src:02x?}");
            }
            match classify(&receiver(src), &run.output) {
                Class::Decided(Reason::AcceptReturned) => {}
                other => bail!("the first hop would read {other:?}"),
            }
        }
        (Class::Gue(g), Reason::AcceptSyn | Reason::AcceptSocket | Reason::AcceptLastHop) => {
            let mut want = input[..12].to_vec();
            want.extend_from_slice(if g.inner_v6 {
                &[0x86, 0xdd]
            } else {
                &[0x08, 0x00]
            });
            want.extend_from_slice(&input[g.inner_off..]);
            if run.output != want {
                bail!(
                    "accepted, but the inner packet is not what came:\n out {:02x?}",
                    run.output
                );
            }
        }
        _ => {}
    }
    Ok(reason)
}

struct Tally {
    packets: u64,
    too_short: u64,
    reasons: BTreeMap<&'static str, u64>,
    mutations: BTreeMap<Mutation, u64>,
    failures: Vec<String>,
}

impl Tally {
    fn send(&mut self, dp: &mut Dataplane, ifindex: u32, what: &str, f: &[u8], configured: bool) {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        if f.len() < 14 {
            self.too_short += 1;
            return;
        }
        self.packets += 1;
        match check_packet(dp, ifindex, f, configured) {
            Ok(r) => *self.reasons.entry(r.name()).or_default() += 1,
            Err(e) => {
                if self.failures.len() < 20 {
                    self.failures.push(format!("{what}: {e:#}\n in  {f:02x?}"));
                }
            }
        }
    }
}

/// Seeds as they are, then each mutated 1 to 4 times per round; random frames.
#[test]
fn hostile_packets_keep_the_invariants() {
    if !can_run("hostile_packets_keep_the_invariants") {
        return;
    }
    let seeds = corpus().expect("seed corpus");
    let ns = fixture::namespace("hostile").expect("fixture namespace");
    let started = Instant::now();
    let tally = ns
        .run(|| {
            let ifindex = tests::link::if_index(fixture::IF)?;
            let mut dp = Dataplane::load(&LoadOptions {
                bucket_slots: 1 << 10,
                pin_dir: None,
            })?;
            let mut t = Tally {
                packets: 0,
                too_short: 0,
                reasons: BTreeMap::new(),
                mutations: BTreeMap::new(),
                failures: Vec::new(),
            };
            let mut rng = Rng(SEED);
            let ports: Vec<u16> = example::SERVICES
                .iter()
                .map(|s| s.port)
                .chain([example::GUE_PORT])
                .collect();
            let mutated = |rng: &mut Rng, t: &mut Tally, seed: &[u8]| {
                let mut f = Frame::new(seed).expect("seed fits a frame");
                let mut kinds = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let m = mutate(rng, &mut f, &ports);
                    *t.mutations.entry(m).or_default() += 1;
                    kinds.push(m);
                }
                (f, kinds)
            };
            // Unconfigured: everything passes untouched.
            for i in 0..300 {
                let (_, seed) = &seeds[i % seeds.len()];
                let (f, kinds) = mutated(&mut rng, &mut t, seed);
                t.send(
                    &mut dp,
                    ifindex,
                    &format!("unconfigured {i} {kinds:?}"),
                    f.as_slice(),
                    false,
                );
            }
            configure(&mut dp)?;
            for (name, seed) in &seeds {
                t.send(&mut dp, ifindex, name, seed, true);
            }
            for round in 0..160 {
                for (name, seed) in &seeds {
                    let (f, kinds) = mutated(&mut rng, &mut t, seed);
                    t.send(
                        &mut dp,
                        ifindex,
                        &format!("{name} round {round} {kinds:?}"),
                        f.as_slice(),
                        true,
                    );
                }
            }
            for i in 0..2000 {
                let f = random_frame(&mut rng, 300);
                t.send(&mut dp, ifindex, &format!("random {i}"), f.as_slice(), true);
            }
            Ok(t)
        })
        .expect("running the program");
    println!(
        "hostile: {} packets through the program in {:.1?} ({} seeds, mutated and random; \
         {} frames under 14 bytes not sendable), {} failed",
        tally.packets,
        started.elapsed(),
        seeds.len(),
        tally.too_short,
        tally.failures.len()
    );
    println!("reasons: {:?}", tally.reasons);
    println!("mutations: {:?}", tally.mutations);
    for f in &tally.failures {
        println!("FAIL {f}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} packets broke an invariant",
        tally.failures.len()
    );
    assert!(tally.packets >= 10_000);
    for r in [
        Reason::PassUnconfigured,
        Reason::PassNotIp,
        Reason::PassUnparsed,
        Reason::PassNotService,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropBadGue,
        Reason::Encapsulated,
        Reason::IcmpForwarded,
        Reason::AcceptSyn,
        Reason::AcceptLastHop,
        Reason::SecondHop,
    ] {
        assert!(
            tally.reasons.contains_key(r.name()),
            "never reached {}",
            r.name()
        );
    }
}

// ---- limits and bad configuration -------------------------------------------------------

fn backend_list(n: usize, base: u32) -> Vec<Value> {
    (0..n as u32)
        .map(|i| json!({ "address": Ipv4Addr::from(base + i) }))
        .collect()
}

fn config_with(services: Vec<Value>) -> Value {
    json!({
        "node": { "interfaces": ["eth0"], "address_v4": "10.0.0.2" },
        "services": services,
    })
}

fn service(name: &str, port: u16, table_bits: u32, backends: Vec<Value>) -> Value {
    json!({ "name": name, "vip": "10.100.0.1", "port": port, "protocol": "tcp",
            "table_bits": table_bits, "backends": backends })
}

/// `lb config check` on a file with `text`: (success, stdout + stderr).
fn config_check(dir: &Path, name: &str, text: &str) -> (bool, String) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, text).expect("writing a config");
    let out = Command::new(lb_binary())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("running lb config check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every limit of docs/limits.md, one past it, through `lb config check`: refused, with
/// the limit named.
#[test]
fn over_limit_configs_are_refused_with_their_reasons() {
    let dir = std::env::temp_dir().join(format!("lb-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = u32::from(Ipv4Addr::new(10, 8, 0, 0));
    let good = config_with(vec![service("web", 80, 12, backend_list(4096, base))]);
    let (ok, text) = config_check(&dir, "good", &good.to_string());
    assert!(ok, "a config at the limits is accepted: {text}");

    let mut weighted = good.clone();
    weighted["services"][0]["backends"][0]["weight"] = json!(65536);
    let mut slots = good.clone();
    slots["agent"] = json!({ "bucket_slots": 4096 });
    let mut no_slots = good.clone();
    no_slots["agent"] = json!({ "bucket_slots": (1u64 << 26) + 1 });
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "1025 services",
            config_with(
                (0..1025)
                    .map(|i| service(&format!("s{i}"), 1 + i as u16, 4, vec![]))
                    .collect(),
            )
            .to_string(),
            "services: 1025 services, at most 1024",
        ),
        (
            "4097 backends in one service",
            config_with(vec![service("web", 80, 13, backend_list(4097, base))]).to_string(),
            "backends: 4097 backends, at most 4096",
        ),
        (
            "16500 distinct backends over 5 services",
            config_with(
                (0..5u32)
                    .map(|i| {
                        service(
                            &format!("s{i}"),
                            80 + i as u16,
                            12,
                            backend_list(3300, base + i * 3300),
                        )
                    })
                    .collect(),
            )
            .to_string(),
            "services: 16500 distinct backends, at most 16384",
        ),
        (
            "table_bits 21",
            config_with(vec![service("web", 80, 21, vec![])]).to_string(),
            "table_bits: 21 is out of range (4 to 20)",
        ),
        (
            "table_bits 3",
            config_with(vec![service("web", 80, 3, vec![])]).to_string(),
            "table_bits: 3 is out of range (4 to 20)",
        ),
        (
            "17 backends in a table of 16",
            config_with(vec![service("web", 80, 4, backend_list(17, base))]).to_string(),
            "backends: 17 backends do not fit a table of 16 buckets",
        ),
        (
            "weight 65536",
            weighted.to_string(),
            "weight 65536 is above the maximum 65535",
        ),
        (
            "tables larger than agent.bucket_slots",
            slots.to_string(),
            "the tables need 8192 buckets (each double-buffered), agent.bucket_slots is 4096",
        ),
        (
            "agent.bucket_slots 2^26 + 1",
            no_slots.to_string(),
            "agent.bucket_slots: 67108865 is out of range",
        ),
        (
            "truncated JSON",
            good.to_string()[..200].to_string(),
            "EOF while parsing",
        ),
        (
            "unknown field",
            good.to_string()
                .replacen("\"table_bits\"", "\"table_size\"", 1),
            "unknown field `table_size`",
        ),
        (
            "port 65536",
            config_with(vec![service("web", 80, 4, vec![])])
                .to_string()
                .replace("80", "65536"),
            "invalid value: integer `65536`",
        ),
    ];
    let mut failed = Vec::new();
    for (what, text, want) in &cases {
        let (ok, out) = config_check(&dir, "bad", text);
        let first = out.lines().find(|l| l.contains(want)).unwrap_or(out.trim());
        println!("refused: {what}: {}", first.trim());
        if ok || !out.contains(want) {
            failed.push(format!("{what}: ok={ok}, want {want:?}, got:\n{out}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

// ---- the agent: API access, refused input, hostile health-check targets, SIGKILL --------

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
