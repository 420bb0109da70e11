//! Forwarding rate with real frames: `BPF_PROG_TEST_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`), where every run gets a frame of its own and what the
//! program returns XDP_TX for is really transmitted.
//!
//! The node is the data-plane benchmark's (same namespace setup, services and next hops),
//! with `lb_xdp` attached to `fx0` and `lb_drop` on its veth peer `fx1`, which takes
//! what `fx0` transmits (native XDP on veth delivers only to a peer with a program). The
//! frames are run as if received on `fx0`, from one thread pinned to one core.
//!
//! The kernel recycles live frames resetting their pointers but not their bytes, so a
//! program that rewrites a frame would see its own output again: as in the data-plane
//! suite, the harness `lb_bench` restores each frame (cycling through the case's flows)
//! and tail-calls the program, and its own cost is taken out by running it with `lb_tx`
//! (returns XDP_TX, nothing else) as the target. The floor is `lb_tx` run directly.
//! Per frame: `lb_xdp` = harness with `lb_xdp` - harness with `lb_tx` + floor; Mpps are
//! frames per microsecond of the thread's CPU time.

use anyhow::{ensure, Context, Result};
use aya::programs::{Xdp, XdpMode};
use lb::{
    dataplane::{load_program, Dataplane, LoadOptions},
    ebpf,
};
use lb_common::stats::Reason;

use super::{
    dataplane::{cases, check_counts, configure, median, Case, Established, BUCKET_SLOTS, XDP_TX},
    harness::{Harness, Target},
};
use crate::{fixture, link};

/// The cases of the live suite: those the program transmits.
pub const CASES: [&str; 6] = [
    "tcp_syn_vip_v4",
    "tcp_ack_vip_v4",
    "udp_vip_v4",
    "tcp_syn_vip_v6",
    "gue_second_hop_v4",
    "icmp_too_big_v4",
];

/// Settings of the live suite.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Frames per test run.
    pub frames: u32,
    /// Test runs per figure; the median is reported.
    pub rounds: usize,
    /// Distinct flows per case.
    pub flows: usize,
    /// The core the measuring thread is pinned to.
    pub cpu: usize,
    /// The node's flow hash.
    pub flow_hash: lb_common::hash::FlowHash,
}

/// One case's rate next to the floor's, both medians over the rounds.
#[derive(Clone, Debug)]
pub struct LiveResult {
    pub name: &'static str,
    pub mpps: f64,
    pub floor_mpps: f64,
    /// Frames confirmed by the counters to have taken the case's path.
    pub frames_checked: u64,
}

/// Measures the cases of [`CASES`] that `names` holds.
pub fn measure(s: Settings, names: &[&str]) -> Result<Vec<LiveResult>> {
    let ns = fixture::namespace("live")?;
    ns.run(|| {
        pin_to(s.cpu)?;
        let fx0 = link::if_index(fixture::IF)?;
        let mut dp = Dataplane::load(&LoadOptions {
            bucket_slots: BUCKET_SLOTS,
            pin_dir: None,
        })?;
        configure(&mut dp, s.flow_hash)?;
        let mut harness = Harness::load(dp.ebpf(), fx0)?;
        load_program(dp.ebpf(), ebpf::DROP_PROGRAM)?;
        // Both detached when the object is dropped at the end.
        attach(dp.ebpf(), ebpf::DROP_PROGRAM, "fx1")?;
        attach(dp.ebpf(), ebpf::PROGRAM, fixture::IF)?;
        // Established connections matter only to the cases that pass to the stack, which
        // do not transmit.
        let none = Established {
            port: 1,
            seq: 0,
            ack: 0,
        };
        let est = vec![none; s.flows];
        let list: Vec<Case> = cases(s.flows, [&est, &est, &est])
            .into_iter()
            .filter(|c| CASES.contains(&c.name) && names.contains(&c.name))
            .collect();
        ensure!(!list.is_empty(), "no live case selected");
        let mut out = Vec::new();
        for c in &list {
            ensure!(c.verdict == XDP_TX, "{}: not a transmitting case", c.name);
            harness.set_frames(&c.frames)?;
            let first = &c.frames[0];
            let (mut per_frame, mut floors) = (Vec::new(), Vec::new());
            let mut checked = 0;
            for _ in 0..s.rounds {
                let floor =
                    harness.run_direct_live(dp.ebpf(), ebpf::TX_PROGRAM, first, s.frames)?;
                let base = harness.run_live(dp.ebpf(), Target::Tx, first, s.frames)?;
                let before = dp.reason_counts()?;
                let t = harness.run_live(dp.ebpf(), Target::Lb, first, s.frames)?;
                let after = dp.reason_counts()?;
                // The program is attached to the veth, so the kernel's own traffic on it
                // (IPv6 neighbour discovery and the like) is counted too, as not for lb.
                let strays = [Reason::PassNotService, Reason::PassNotIp];
                check_counts(c, &before, &after, u64::from(s.frames), &strays)?;
                checked += u64::from(s.frames);
                per_frame.push(t.ns_per_run - base.ns_per_run + floor.ns_per_run);
                floors.push(floor.ns_per_run);
            }
            out.push(LiveResult {
                name: c.name,
                mpps: 1e3 / median(&per_frame),
                floor_mpps: 1e3 / median(&floors),
                frames_checked: checked,
            });
        }
        Ok(out)
    })
}

fn attach(ebpf: &mut aya::Ebpf, name: &str, ifname: &str) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    prog.attach(ifname, XdpMode::Default)
        .with_context(|| format!("attaching {name} to {ifname}"))?;
    Ok(())
}

/// Pins the calling thread to core `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the macros write within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("pinning to core {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
