//! Does a TCP segment belong to the connection a local socket carries? The backend path
//! asks before it lets a socket own a flow: a socket left over from an earlier connection
//! on the same addresses and ports (its peer gone, or reset elsewhere) has sequence
//! numbers unrelated to the new connection's, so the new one's segments fall outside its
//! windows.
//!
//! The check is looser than the stack's own (`tcp_sequence`, `tcp_ack`): a segment it
//! refuses is one the socket would discard anyway, never one it would use, since a
//! refused segment goes on to the next hop, whose stack resets the connection.
//!
//! The XDP program reads the socket's fields from `struct tcp_sock` at offsets that differ
//! between kernels: userspace finds them in the kernel's BTF and hands them over in
//! `TcpSockLayout`, a read-only global set when the program loads.
//!
//! The program views the socket the lookup returns as a `struct tcp_sock` through a call
//! that the loader rewrites (`CAST_CALL`): into the kernel's `bpf_rdonly_cast` kfunc,
//! which the verifier turns into a register move, or, on a kernel without it, into the
//! `bpf_skc_to_tcp_sock` helper. A helper call costs a call and a return (about 9 ns on
//! a CPU whose returns go through a mitigation thunk); aya cannot emit a kfunc call.

/// Symbol of the `TcpSockLayout` global in the XDP object.
pub const LAYOUT_GLOBAL: &str = "TCP_SOCK_LAYOUT";

/// The helper number of the call the loader rewrites: no kernel has a helper of this
/// number, so an object loaded without the rewrite fails the verifier rather than run.
pub const CAST_CALL: i32 = 0x6c62_0001;

/// `BPF_FUNC_skc_to_tcp_sock`: the rewrite's target where the kernel has no
/// `bpf_rdonly_cast`.
pub const SKC_TO_TCP_SOCK_HELPER: i32 = 137;

/// The kernel's `struct tcp_sock` as the program needs it: its BTF type id (the cast's
/// argument) and the byte offsets of the `u32` fields the check reads, `UNKNOWN` for all
/// of them when the kernel's BTF did not tell; and, for a listener
/// (`syn_cookies_may_be_valid`), where it keeps the time of its last SYN-queue overflow,
/// its reuseport group pointer and where the group keeps that time, `UNKNOWN` when the
/// BTF did not tell.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSockLayout {
    pub btf_id: u32,
    pub rcv_nxt: u32,
    pub rcv_wup: u32,
    pub rcv_wnd: u32,
    pub snd_una: u32,
    pub snd_nxt: u32,
    pub max_window: u32,
    /// `rx_opt.ts_recent_stamp` (a listener's last SYN-queue overflow, in jiffies).
    pub overflow_stamp: u32,
    /// `sk_reuseport_cb` (8 bytes: null when the listener is in no reuseport group).
    pub reuseport_cb: u32,
    /// `synq_overflow_ts` of `struct sock_reuseport`: a group's last SYN-queue overflow,
    /// which the kernel keeps there instead of in each member.
    pub group_overflow_stamp: u32,
}

const _: () = assert!(core::mem::size_of::<TcpSockLayout>() == 40);

impl TcpSockLayout {
    /// An offset no field has: the program then checks the socket's state only.
    pub const UNKNOWN_OFFSET: u32 = u32::MAX;

    pub const UNKNOWN: TcpSockLayout = TcpSockLayout {
        btf_id: 0,
        rcv_nxt: Self::UNKNOWN_OFFSET,
        rcv_wup: Self::UNKNOWN_OFFSET,
        rcv_wnd: Self::UNKNOWN_OFFSET,
        snd_una: Self::UNKNOWN_OFFSET,
        snd_nxt: Self::UNKNOWN_OFFSET,
        max_window: Self::UNKNOWN_OFFSET,
        overflow_stamp: Self::UNKNOWN_OFFSET,
        reuseport_cb: Self::UNKNOWN_OFFSET,
        group_overflow_stamp: Self::UNKNOWN_OFFSET,
    };

    /// The `struct tcp_sock` member names, in field order.
    pub const FIELDS: [&'static str; 6] = [
        "rcv_nxt",
        "rcv_wup",
        "rcv_wnd",
        "snd_una",
        "snd_nxt",
        "max_window",
    ];

    /// From the type's BTF id and offsets in `FIELDS` order; the listener's offsets
    /// `UNKNOWN` (see `with_listener`).
    pub const fn new(btf_id: u32, o: [u32; 6]) -> Self {
        TcpSockLayout {
            btf_id,
            rcv_nxt: o[0],
            rcv_wup: o[1],
            rcv_wnd: o[2],
            snd_una: o[3],
            snd_nxt: o[4],
            max_window: o[5],
            overflow_stamp: Self::UNKNOWN_OFFSET,
            reuseport_cb: Self::UNKNOWN_OFFSET,
            group_overflow_stamp: Self::UNKNOWN_OFFSET,
        }
    }

    /// With the listener's offsets: `rx_opt.ts_recent_stamp` and `sk_reuseport_cb`.
    pub const fn with_listener(self, overflow_stamp: u32, reuseport_cb: u32) -> Self {
        TcpSockLayout {
            overflow_stamp,
            reuseport_cb,
            ..self
        }
    }

    /// With the reuseport group's offset: `sock_reuseport.synq_overflow_ts`.
    pub const fn with_group(self, group_overflow_stamp: u32) -> Self {
        TcpSockLayout {
            group_overflow_stamp,
            ..self
        }
    }
}

/// How long after a listener's last SYN-queue overflow the kernel still checks an ACK for
/// a SYN cookie, in jiffies, at the largest `HZ` (1000): `TCP_SYNCOOKIE_VALID`, two
/// minutes. An ACK to a listener whose last overflow is older (the listener's own, or its
/// reuseport group's, which the kernel keeps instead) carries no valid cookie: the
/// kernel's own check (`tcp_synq_no_recent_overflow`, first thing in
/// `bpf_tcp_check_syncookie`) says so, so the program skips that helper call. A smaller `HZ` makes the real window shorter, and
/// this one only errs towards asking the helper.
pub const SYN_COOKIE_WINDOW_JIFFIES: u32 = 2 * 60 * 1000;

/// How far before its stamp the kernel's check still counts an overflow as recent, at the
/// largest `HZ`: one second. An overflow on another CPU may stamp a later time than the
/// `now` read here.
pub const SYN_COOKIE_EARLY_JIFFIES: u32 = 1000;

/// Whether a listener whose last SYN-queue overflow was at `stamp` (jiffies, as the
/// kernel's 32-bit `tcp_jiffies32`) may still accept SYN cookies at `now`: false only when
/// `now` is outside the kernel's window, from `SYN_COOKIE_EARLY_JIFFIES` before the stamp
/// to `SYN_COOKIE_WINDOW_JIFFIES` after it.
#[inline(always)]
pub fn syn_cookies_may_be_valid(stamp: u32, now: u32) -> bool {
    let from = stamp.wrapping_sub(SYN_COOKIE_EARLY_JIFFIES);
    now.wrapping_sub(from) <= SYN_COOKIE_EARLY_JIFFIES + SYN_COOKIE_WINDOW_JIFFIES
}

/// A socket's sequence state, as `struct tcp_sock` holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqState {
    /// Next sequence number expected from the peer.
    pub rcv_nxt: u32,
    /// `rcv_nxt` when the receive window was last announced.
    pub rcv_wup: u32,
    /// The receive window last announced.
    pub rcv_wnd: u32,
    /// Oldest sequence number sent and not acknowledged.
    pub snd_una: u32,
    /// Next sequence number to send.
    pub snd_nxt: u32,
    /// Largest window the peer ever announced.
    pub max_window: u32,
}

/// How far below the window's left edge a segment may start and still be one the
/// socket answers (a segment carries at most 64 KiB, and keepalive and window probes
/// start one byte below it), and how far an acknowledgment may run ahead of the
/// `snd_nxt` the program reads (see `ack_in_window`).
pub const SEQ_SLACK: u32 = 0x1_0000;

/// `a` comes before `b` in sequence space.
#[inline(always)]
const fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Whether a segment with sequence number `seq` (and acknowledgment `ack` when `has_ack`)
/// can be the socket's: see `seq_in_window` and `ack_in_window`.
#[inline(always)]
pub fn in_window(s: &SeqState, seq: u32, ack: u32, has_ack: bool) -> bool {
    seq_in_window(seq, s.rcv_nxt, s.rcv_wup, s.rcv_wnd)
        && (!has_ack || ack_in_window(ack, s.snd_una, s.snd_nxt, s.max_window))
}

/// The sequence number lies in the receive window, or less than `SEQ_SLACK` below it.
#[inline(always)]
pub fn seq_in_window(seq: u32, rcv_nxt: u32, rcv_wup: u32, rcv_wnd: u32) -> bool {
    let right = rcv_nxt.wrapping_add(rcv_wnd);
    let left = rcv_wup.wrapping_sub(SEQ_SLACK);
    !before(seq, left) && !before(right, seq)
}

/// The acknowledgment is less than `SEQ_SLACK` beyond what the socket sent, and no older
/// than the peer's largest window behind what was acknowledged.
///
/// The slack is there because the program reads `snd_nxt` without the socket's lock: the
/// kernel advances it only after the segment has been handed to the device, and on a
/// veth the peer's stack can receive that segment, and its answer reach this program on
/// another CPU, before the sender's CPU gets there. One segment (at most 64 KiB) is
/// unaccounted at a time; the kernel itself, holding the lock, never sees the gap.
#[inline(always)]
pub fn ack_in_window(ack: u32, snd_una: u32, snd_nxt: u32, max_window: u32) -> bool {
    let oldest = snd_una.wrapping_sub(max_window);
    !before(snd_nxt.wrapping_add(SEQ_SLACK), ack) && !before(ack, oldest)
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data, no padding, every bit pattern valid.
unsafe impl aya::Pod for TcpSockLayout {}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(rcv_nxt: u32, snd_nxt: u32) -> SeqState {
        SeqState {
            rcv_nxt,
            rcv_wup: rcv_nxt,
            rcv_wnd: 65_535,
            snd_una: snd_nxt,
            snd_nxt,
            max_window: 65_535,
        }
    }

    #[test]
    fn the_next_segment_and_retransmissions_are_in() {
        let s = state(1000, 5000);
        assert!(in_window(&s, 1000, 5000, true));
        assert!(in_window(&s, 1000 + 65_535, 5000, true));
        // A keepalive probe, and an old ACK of data acknowledged since.
        assert!(in_window(&s, 999, 5000, true));
        assert!(in_window(&s, 1000, 5000u32.wrapping_sub(60_000), true));
        // RST without ACK.
        assert!(in_window(&s, 1000, 0, false));
        // The answer to a segment being sent while `snd_nxt` is read.
        assert!(in_window(&s, 1000, 5000 + 1448, true));
        assert!(in_window(&s, 1000, 5000 + SEQ_SLACK, true));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let s = state(u32::MAX - 10, 3);
        assert!(in_window(&s, 5, 3, true));
        assert!(in_window(&s, u32::MAX - 20, u32::MAX, true));
        assert!(!in_window(&s, u32::MAX - 10 - SEQ_SLACK - 1, 3, true));
    }

    #[test]
    fn syn_cookies_are_checked_from_a_second_before_an_overflow_to_two_minutes_after() {
        for stamp in [0, 5_000, u32::MAX - 1_000] {
            assert!(syn_cookies_may_be_valid(stamp, stamp));
            assert!(syn_cookies_may_be_valid(stamp, stamp.wrapping_add(120_000)));
            assert!(!syn_cookies_may_be_valid(
                stamp,
                stamp.wrapping_add(120_001)
            ));
            // Up to a second before the stamp is inside, as the kernel counts it.
            assert!(syn_cookies_may_be_valid(stamp, stamp.wrapping_sub(1)));
            assert!(syn_cookies_may_be_valid(stamp, stamp.wrapping_sub(1_000)));
            assert!(!syn_cookies_may_be_valid(stamp, stamp.wrapping_sub(1_001)));
        }
    }

    #[test]
    fn another_connections_segments_are_out() {
        let s = state(1000, 5000);
        assert!(
            !in_window(&s, 1000 + 65_536, 5000, true),
            "beyond the window"
        );
        assert!(
            !in_window(&s, 1000u32.wrapping_sub(SEQ_SLACK + 1), 5000, true),
            "far behind"
        );
        assert!(
            !in_window(&s, 1000, 5000 + SEQ_SLACK + 1, true),
            "acknowledges data never sent"
        );
        assert!(
            !in_window(&s, 1000, 5000u32.wrapping_sub(65_536), true),
            "too old an ACK"
        );
        assert!(!in_window(&s, 0x8000_0000, 0x9000_0000, true));
    }
}
