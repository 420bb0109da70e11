//! The benchmark harness (`cargo xtask bench`), not used in forwarding.
//!
//! `BPF_PROG_TEST_RUN` with a repeat runs a program again and again on one buffer without
//! restoring it, so a program that rewrites packets would see its own output from the
//! second run on. `lb_bench` puts the intended input back before every run: the packet
//! start where it was when the test run began, the length and bytes of the next of the
//! stored frames (round robin, so each run is another flow). Then it tail-calls the
//! program in `BENCH_TARGET`: `lb_xdp` to measure it, `lb_pass` to measure the harness.
//!
//! `lb_tx` and `lb_drop` serve the live-frames benchmark (tests/src/bench/live.rs).
//!
//! Userspace writes the frames, sets `frames` and clears `armed` before each test run.
//! Layouts are mirrored in the benchmark (tests/src/bench/harness.rs).

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};

use crate::ptr;

/// The largest stored frame (a power of two).
pub const FRAME_MAX: usize = 128;
const _: () = assert!(FRAME_MAX.is_power_of_two());
/// Stored frames.
pub const MAX_FRAMES: u32 = 256;

/// One input frame: `len` bytes of `data`.
#[repr(C)]
pub struct Frame {
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; FRAME_MAX],
}
const _: () = assert!(size_of::<Frame>() == 136);

/// The harness's state. One for all CPUs: a test run may move to another CPU when it
/// yields between runs, and must carry on with the same origin and frame sequence. Only
/// one test run of the harness may run at a time.
#[repr(C)]
pub struct State {
    /// The packet start's offset from the context at the first run of this test run.
    pub origin: u64,
    /// 0 until the first run of a test run has recorded `origin`.
    pub armed: u32,
    /// The frame for the next run.
    pub next: u32,
    /// Frames in use: `0..frames` of `BENCH_FRAMES`.
    pub frames: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<State>() == 24);

#[map]
static BENCH_FRAMES: Array<Frame> = Array::with_max_entries(MAX_FRAMES, 0);

#[map]
static BENCH_STATE: Array<State> = Array::with_max_entries(1, 0);

#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The floor of the live-frames benchmark: sends every frame back out, nothing else.
#[xdp]
pub fn lb_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The sink on the far end of the live-frames benchmark's veth: what the measured program
/// transmits is dropped there, the cheapest way for native XDP on veth to take it.
#[xdp]
pub fn lb_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn lb_bench(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a tail call does not return when it succeeds; on failure we fall through.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Puts the next frame in the buffer, starting where the test run's input started.
#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<()> {
    // SAFETY: only the one running test run touches the state.
    let state = unsafe { &mut *BENCH_STATE.get_ptr_mut(0)? };
    // The context stays put during a test run, so the packet start's distance from it
    // tells how far the previous run moved the head.
    let here = (ctx.data() as u64).wrapping_sub(ctx.ctx as u64);
    if state.armed == 0 {
        state.origin = here;
        state.armed = 1;
    }
    let delta = state.origin.wrapping_sub(here) as i64;
    if !(-1024..=1024).contains(&delta) {
        return None;
    }
    // Called also when the head is where it was (delta 0), and the tail below also when
    // the length is: the harness then costs the same whether the measured program moved
    // them or not, and subtracting its run with `lb_pass` leaves the program's own cost.
    // SAFETY: plain helper call; packet pointers are derived anew afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    let index = state.next;
    state.next = if index + 1 >= state.frames {
        0
    } else {
        index + 1
    };
    let frame = BENCH_FRAMES.get(index)?;
    // 1..=FRAME_MAX by construction, so the verifier sees the bounds the helper needs
    // (userspace stores only lengths in that range, which this leaves unchanged).
    let len = (frame.len.wrapping_sub(1) & (FRAME_MAX as u32 - 1)) + 1;
    let cur = ptr::frame_len(ctx) as i32;
    // SAFETY: plain helper call, as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - cur) } != 0 {
        return None;
    }
    // SAFETY: `len` bytes of the frame are readable, and the packet is `len` bytes long.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, frame.data.as_ptr() as *mut _, len) };
    (rc == 0).then_some(())
}
