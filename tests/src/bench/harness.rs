//! Timing programs through `BPF_PROG_TEST_RUN`, and the userspace side of the harness
//! `lb_bench` (lb-ebpf/src/bench.rs): its maps' layouts are mirrored here.
//!
//! Time is the calling thread's CPU time around the test run divided by the repeat: it
//! has sub-nanosecond resolution (the kernel's own figure is whole nanoseconds) and
//! leaves out time the thread spent scheduled out, which matters on a shared machine.
//! The test run's setup (buffer, dispatcher) is spread over the repeat and vanishes.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf, Pod,
};
use lb::{dataplane, ebpf};

/// The harness program.
pub const PROGRAM: &str = "lb_bench";
/// The largest frame the harness stores (`FRAME_MAX` in lb-ebpf/src/bench.rs).
pub const FRAME_MAX: usize = 128;
/// Frames the harness can cycle through (`MAX_FRAMES`).
pub const MAX_FRAMES: usize = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct Frame {
    len: u32,
    _pad: u32,
    data: [u8; FRAME_MAX],
}
const _: () = assert!(size_of::<Frame>() == 136);
// SAFETY: plain integers and bytes, no padding.
unsafe impl Pod for Frame {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct State {
    origin: u64,
    armed: u32,
    next: u32,
    frames: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<State>() == 24);
// SAFETY: as above.
unsafe impl Pod for State {}

/// What the harness calls after restoring the frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// `lb_xdp`, the program under test.
    Lb,
    /// `lb_pass`: the harness's own cost.
    Pass,
    /// `lb_tx`: the harness's own cost when frames are transmitted (live frames).
    Tx,
}

/// One timed test run.
pub struct Timed {
    pub ns_per_run: f64,
    pub return_value: u32,
    /// The frame the last run left.
    pub output: Vec<u8>,
}

/// The harness loaded next to the data plane's programs, with its maps.
pub struct Harness {
    frames: Array<MapData, Frame>,
    state: Array<MapData, State>,
    target: ProgramArray<MapData>,
    target_now: Option<Target>,
    ifindex: u32,
}

impl Harness {
    /// Loads `lb_pass`, `lb_tx` and the harness into `ebpf` (the data plane's object, `lb_xdp`
    /// already loaded). Runs see `ifindex` as their ingress interface.
    pub fn load(ebpf: &mut Ebpf, ifindex: u32) -> Result<Self> {
        dataplane::load_program(ebpf, ebpf::PASS_PROGRAM)?;
        dataplane::load_program(ebpf, ebpf::TX_PROGRAM)?;
        dataplane::load_program(ebpf, PROGRAM)?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the XDP object has no map {name}"))
        };
        let frames = Array::try_from(take("BENCH_FRAMES")?)?;
        let state = Array::try_from(take("BENCH_STATE")?)?;
        let target = ProgramArray::try_from(take("BENCH_TARGET")?)?;
        Ok(Harness {
            frames,
            state,
            target,
            target_now: None,
            ifindex,
        })
    }

    /// Stores the frames the harness cycles through, in order.
    pub fn set_frames(&mut self, frames: &[Vec<u8>]) -> Result<()> {
        ensure!(
            !frames.is_empty() && frames.len() <= MAX_FRAMES,
            "1 to {MAX_FRAMES} frames, not {}",
            frames.len()
        );
        for (i, f) in frames.iter().enumerate() {
            ensure!(
                f.len() <= FRAME_MAX,
                "frame {i}: {} bytes, at most {FRAME_MAX}",
                f.len()
            );
            let mut v = Frame {
                len: f.len() as u32,
                _pad: 0,
                data: [0; FRAME_MAX],
            };
            v.data[..f.len()].copy_from_slice(f);
            self.frames.set(i as u32, v, 0)?;
        }
        let state = State {
            frames: frames.len() as u32,
            ..State::default()
        };
        self.state.set(0, state, 0)?;
        Ok(())
    }

    /// Starts the next test run from the first frame, with the origin to be recorded.
    fn rearm(&mut self) -> Result<()> {
        let mut s = self.state.get(&0, 0)?;
        s.armed = 0;
        s.next = 0;
        self.state.set(0, s, 0)?;
        Ok(())
    }

    fn set_target(&mut self, ebpf: &Ebpf, target: Target) -> Result<()> {
        if self.target_now == Some(target) {
            return Ok(());
        }
        let name = match target {
            Target::Lb => ebpf::PROGRAM,
            Target::Pass => ebpf::PASS_PROGRAM,
            Target::Tx => ebpf::TX_PROGRAM,
        };
        let fd = xdp(ebpf, name)?.fd()?;
        self.target.set(0, fd, 0)?;
        self.target_now = Some(target);
        Ok(())
    }

    /// Runs the harness `repeat` times over the stored frames, calling `target`.
    /// `first` must be the first stored frame (the test run's input).
    pub fn run(&mut self, ebpf: &Ebpf, target: Target, first: &[u8], repeat: u32) -> Result<Timed> {
        self.set_target(ebpf, target)?;
        self.rearm()?;
        run(xdp(ebpf, PROGRAM)?, self.ifindex, first, repeat, false)
    }

    /// Runs program `name` directly (no harness) `repeat` times on `frame`.
    pub fn run_direct(&self, ebpf: &Ebpf, name: &str, frame: &[u8], repeat: u32) -> Result<Timed> {
        run(xdp(ebpf, name)?, self.ifindex, frame, repeat, false)
    }

    /// As `run`, with live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): every run gets a frame
    /// of its own and what the program transmits is sent. The kernel resets a recycled
    /// frame's pointers but not its bytes, so the harness is needed here too for a
    /// program that rewrites them. No output comes back.
    pub fn run_live(
        &mut self,
        ebpf: &Ebpf,
        target: Target,
        first: &[u8],
        frames: u32,
    ) -> Result<Timed> {
        self.set_target(ebpf, target)?;
        self.rearm()?;
        run(xdp(ebpf, PROGRAM)?, self.ifindex, first, frames, true)
    }

    /// As `run_direct`, with live frames.
    pub fn run_direct_live(
        &self,
        ebpf: &Ebpf,
        name: &str,
        frame: &[u8],
        frames: u32,
    ) -> Result<Timed> {
        run(xdp(ebpf, name)?, self.ifindex, frame, frames, true)
    }
}

/// Frames per kernel batch in live mode (the kernel's largest).
const LIVE_BATCH: u32 = 256;

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    let prog = ebpf
        .program(name)
        .with_context(|| format!("the XDP object has no program {name}"))?;
    Ok(prog.try_into()?)
}

fn run(prog: &Xdp, ifindex: u32, frame: &[u8], repeat: u32, live: bool) -> Result<Timed> {
    let ctx = crate::fixture::xdp_md(frame.len(), ifindex);
    let mut out = vec![0u8; 4096];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    if live {
        opts.attrs = TestRunAttrs::new().xdp_live_frames(LIVE_BATCH);
    } else {
        opts.data_out = Some(&mut out);
    }
    let start = thread_cpu_time()?;
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let spent = thread_cpu_time()? - start;
    out.truncate(if live { 0 } else { res.data_size_out as usize });
    Ok(Timed {
        ns_per_run: spent.as_nanos() as f64 / f64::from(repeat),
        return_value: res.return_value,
        output: out,
    })
}

/// CPU time of the calling thread, user and system.
pub fn thread_cpu_time() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        bail!("clock_gettime: {}", std::io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}
