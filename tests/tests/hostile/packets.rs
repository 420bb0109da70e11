//! The data plane: random and mutated frames through BPF_PROG_TEST_RUN, each checked
//! against the invariants.

use std::{collections::BTreeMap, path::Path, time::Instant};

use anyhow::{bail, Context, Result};
use lb::dataplane::{Dataplane, LoadOptions};
use lb_common::{
    addr::{is_v4_mapped, v4_mapped},
    encap::{ENCAP_LEN_V4, ENCAP_LEN_V6},
    hash::FlowHash,
    packet::{
        check::{self, RoundTrip},
        classify, ethernet, example, ip,
        mutate::{mutate, random_frame, Frame, Mutation, Rng},
        Class, NodeView, UNTOUCHED,
    },
    proto::{ETH_LEN, ETH_P_IP},
    stats::Reason,
};
use tests::{
    can_run,
    fixture::{
        self,
        configure::{round_robin, Service},
        GW_MAC, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX,
    },
};

/// The most bytes the program may add: an IPv6 outer header, UDP, GUE and the hop list.
const MAX_GROWTH: usize = ENCAP_LEN_V6;
const TABLE_BITS: u32 = 4;
const SEED: u64 = 0xc0ff_ee1b;

/// Service `i` of the example node has IPv6 backends when its VIP is IPv6, and the last
/// one (an IPv4 VIP) too, so IPv4 in IPv6 is exercised.
fn v6_backends(i: usize) -> bool {
    !is_v4_mapped(&example::SERVICES[i].vip) || i == example::SERVICES.len() - 1
}

/// The example node, six backends, and every service with a round-robin table.
fn configure(dp: &mut Dataplane) -> Result<()> {
    let services: Vec<Service> = example::SERVICES
        .iter()
        .enumerate()
        .map(|(i, &addr)| Service {
            addr,
            id: i as u32,
            v6_backends: v6_backends(i),
            empty: false,
        })
        .collect();
    round_robin(dp, (FlowHash::MultiplyShift, 0x5eed), TABLE_BITS, &services)
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
    let started = Instant::now();
    let opts = LoadOptions {
        bucket_slots: 1 << 10,
        pin_dir: None,
    };
    let tally = fixture::with_dataplane("hostile", &opts, |dp, ifindex| {
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
                dp,
                ifindex,
                &format!("unconfigured {i} {kinds:?}"),
                f.as_slice(),
                false,
            );
        }
        configure(dp)?;
        for (name, seed) in &seeds {
            t.send(dp, ifindex, name, seed, true);
        }
        for round in 0..160 {
            for (name, seed) in &seeds {
                let (f, kinds) = mutated(&mut rng, &mut t, seed);
                t.send(
                    dp,
                    ifindex,
                    &format!("{name} round {round} {kinds:?}"),
                    f.as_slice(),
                    true,
                );
            }
        }
        for i in 0..2000 {
            let f = random_frame(&mut rng, 300);
            t.send(dp, ifindex, &format!("random {i}"), f.as_slice(), true);
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
