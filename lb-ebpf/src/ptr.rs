//! Bounds-checked access to packet bytes: the verifier accepts a packet access only after
//! a comparison against `data_end`, and this is the one place that makes it. The parser in
//! `lb_common::parse` reads through it too ([`Xdp`]).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{encap::WordSink, limits::MAX_HEADER_OFFSET, parse::Frame, proto::ETH_LEN};

/// The XDP context as the parser's byte source. The references it hands out are valid
/// until the packet is resized (`bpf_xdp_adjust_head`): read what is needed before.
#[derive(Clone, Copy)]
pub struct Xdp<'a>(pub &'a XdpContext);

// SAFETY: `span` compares against `data_end` before it returns a pointer.
unsafe impl<'a> Frame<'a> for Xdp<'a> {
    #[inline(always)]
    fn len(self) -> usize {
        frame_len(self.0)
    }

    #[inline(always)]
    fn span(self, off: usize, size: usize) -> Option<*const u8> {
        let start = self.0.data();
        if start + off + size > self.0.data_end() {
            return None;
        }
        Some((start + off) as *const u8)
    }

    /// One load (`load_word`): LLVM splits an unaligned load into bytes.
    #[inline(always)]
    fn word<const M: usize>(self, bytes: &'a [u8; M], at: usize) -> u32 {
        if at + 4 > M {
            return 0;
        }
        // Inside the `M` bytes, which the packet holds (`at` checked them).
        load_word(bytes.as_ptr().wrapping_add(at))
    }
}

/// The word at `p`, in memory order, with one BPF load whatever its alignment (see
/// `PacketWords`).
#[inline(always)]
fn load_word(p: *const u8) -> u32 {
    let w: u64;
    // SAFETY: the caller's bounds check covers the four bytes at `p`.
    unsafe {
        core::arch::asm!(
            "{w} = *(u32 *)({p} + 0)",
            p = in(reg) p,
            w = out(reg) w,
            options(nostack, preserves_flags, readonly),
        );
    }
    w as u32
}

/// The frame's length, as an opaque value: with 32-bit ALU instructions LLVM would
/// otherwise fold a later truncation (`as u16`) into 32-bit arithmetic on the packet
/// pointers themselves, which the verifier refuses.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    core::hint::black_box(ctx.data_end() - ctx.data())
}

/// `x`, which LLVM can no longer relate to anything else: one register move in assembly
/// (`core::hint::black_box` goes through the stack). For offsets that LLVM would
/// otherwise rebuild from another value, of a range the verifier cannot follow.
#[inline(always)]
pub fn opaque(mut x: usize) -> usize {
    // SAFETY: a register moved to itself.
    unsafe {
        core::arch::asm!("{x} = {x}", x = inout(reg) x, options(pure, nomem, nostack, preserves_flags));
    }
    x
}

/// A pointer to a `T` at `off` bytes into the packet, or `None` when the packet is shorter.
#[inline(always)]
pub fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if off > MAX_HEADER_OFFSET {
        return None;
    }
    Xdp(ctx)
        .span(off, size_of::<T>())
        .map(|p| p.cast::<T>().cast_mut())
}

/// Reads a `T` at `off` (unaligned: headers sit at any offset).
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `at` checked the bounds.
    at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// `N` bytes of packet, bounds-checked by `ptr::at`, read and written a 32-bit word at a
/// time (`WordSink`). Rust has no unaligned word store that LLVM's BPF backend does not split
/// into bytes, and packet headers sit at any offset, so the store is one BPF instruction
/// in inline assembly: x86-64 and arm64 load and store unaligned words, and the verifier
/// allows unaligned packet access there. It checks the constant offsets against the
/// bounds as it checks any packet access.
pub struct PacketWords<const N: usize>(*mut [u8; N]);

impl<const N: usize> PacketWords<N> {
    /// The `N` bytes at `off`, or `None` when the packet is shorter.
    #[inline(always)]
    pub fn at(ctx: &XdpContext, off: usize) -> Option<Self> {
        at::<[u8; N]>(ctx, off).map(PacketWords)
    }

    /// The word at bytes `4 * i..4 * i + 4`, in memory order (as `u32::from_ne_bytes`).
    #[inline(always)]
    pub fn get(&self, i: usize) -> u32 {
        if 4 * i + 4 > N {
            return 0;
        }
        // The word lies inside the `N` bytes `at` checked.
        load_word(self.0.cast::<u8>().wrapping_add(4 * i))
    }

    /// Stores `v` big-endian at bytes `off..off + 2`.
    #[inline(always)]
    pub fn put_u16(&mut self, off: usize, v: u16) {
        if off + 2 > N {
            return;
        }
        let p = self.0.cast::<u8>().wrapping_add(off);
        // SAFETY: the two bytes lie inside the `N` bytes `at` checked.
        unsafe {
            core::arch::asm!(
                "*(u16 *)({p} + 0) = {v}",
                p = in(reg) p,
                v = in(reg) u64::from(v.to_be()),
                options(nostack, preserves_flags),
            );
        }
    }
}

impl<const N: usize> WordSink for PacketWords<N> {
    #[inline(always)]
    fn put(&mut self, i: usize, w: u32) {
        if 4 * i + 4 > N {
            return;
        }
        let p = self.0.cast::<u8>().wrapping_add(4 * i);
        // SAFETY: the word lies inside the `N` bytes `at` checked.
        unsafe {
            core::arch::asm!(
                "*(u32 *)({p} + 0) = {w}",
                p = in(reg) p,
                w = in(reg) u64::from(w.to_be()),
                options(nostack, preserves_flags),
            );
        }
    }
}

/// Writes the Ethernet header at the start of the packet: `macs`, the destination and
/// source MAC as three words in memory order, then `ether_type`. `None` when the packet
/// is shorter than the header.
#[inline(always)]
pub fn write_ethernet(ctx: &XdpContext, macs: &[u32; 3], ether_type: u16) -> Option<()> {
    let mut eth = PacketWords::<ETH_LEN>::at(ctx, 0)?;
    for (i, w) in macs.iter().enumerate() {
        eth.put(i, u32::from_be(*w));
    }
    eth.put_u16(12, ether_type);
    Some(())
}
