//! What the program does with a packet and why: every path returns one `Verdict`, and the
//! entry point counts its reason, so every packet is counted exactly once.
//!
//! A verdict is one u64 (action in the low half, reason in the high half) because BPF
//! functions may return only scalars: a struct would come back through a stack pointer,
//! which the verifier refuses.

use aya_ebpf::bindings::xdp_action;
use lb_common::stats::Reason;

#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub fn new(action: u32, reason: Reason) -> Self {
        Verdict(((reason as u64) << 32) | action as u64)
    }

    #[inline(always)]
    pub fn action(self) -> u32 {
        self.0 as u32
    }

    /// The reason's index in `REASON_STATS`.
    #[inline(always)]
    pub fn reason_index(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

#[inline(always)]
pub fn pass(reason: Reason) -> Verdict {
    Verdict::new(xdp_action::XDP_PASS, reason)
}

#[inline(always)]
pub fn drop(reason: Reason) -> Verdict {
    Verdict::new(xdp_action::XDP_DROP, reason)
}
