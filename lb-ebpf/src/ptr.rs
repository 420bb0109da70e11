//! Bounds-checked access to packet bytes: the verifier accepts a packet access only after
//! a comparison against `data_end`, and this is the one place that makes it.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Headers are looked for only this far into a packet. The bound also tells the verifier
/// that an offset which went through memory (and lost its known range) is small.
pub const MAX_HEADER_OFFSET: usize = 1024;

/// A pointer to a `T` at `off` bytes into the packet, or `None` when the packet is shorter.
#[inline(always)]
pub fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if off > MAX_HEADER_OFFSET {
        return None;
    }
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a `T` at `off` (unaligned: headers sit at any offset).
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `at` checked the bounds.
    at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// Reads a big-endian u16 at `off`.
#[inline(always)]
pub fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}
