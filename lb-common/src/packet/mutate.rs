//! Header-aware mutation of frames, for the model's tests and the data-plane tests that
//! throw hostile packets at the program: cuts, bad lengths and header lengths, bad GUE
//! versions and hop counts, hop lists naming the receiver itself, IPv6 extension headers.
//! Deterministic for a given seed, so a failure reproduces.

use core::mem::offset_of;

use super::{ethernet, ip, Ip};
use crate::{
    encap::{Gue, GUE_LEN},
    proto::{
        ETH_LEN, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_IPV6, IPPROTO_ROUTING,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, UDP_LEN,
    },
};

/// Where the GUE fields the mutations aim at lie, from the start of the GUE header.
const GUE_PROTO: usize = offset_of!(Gue, header.proto);
const HOP_LIST_KIND: usize = offset_of!(Gue, hops.kind);
const HOPS_LEFT: usize = offset_of!(Gue, hops.hops_left);
const HOP_FLAGS: usize = offset_of!(Gue, hops.flags);
const NEXT_HOP: usize = offset_of!(Gue, hops.next_hop);

/// The largest frame handled (BPF_PROG_TEST_RUN takes a little under a page).
pub const CAPACITY: usize = 2048;

/// A frame of at most [`CAPACITY`] bytes, without allocation.
#[derive(Clone)]
pub struct Frame {
    bytes: [u8; CAPACITY],
    len: usize,
}

impl Frame {
    pub const EMPTY: Frame = Frame {
        bytes: [0; CAPACITY],
        len: 0,
    };

    /// `None` when `b` is longer than [`CAPACITY`].
    pub fn new(b: &[u8]) -> Option<Frame> {
        let mut bytes = [0u8; CAPACITY];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Frame {
            bytes,
            len: b.len(),
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `b`; false (and no change) when it does not fit.
    pub fn extend(&mut self, b: &[u8]) -> bool {
        self.insert(self.len, b)
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Inserts `b` at `at`; false (and no change) when it does not fit.
    fn insert(&mut self, at: usize, b: &[u8]) -> bool {
        if at > self.len || self.len + b.len() > CAPACITY {
            return false;
        }
        self.bytes.copy_within(at..self.len, at + b.len());
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len();
        true
    }

    fn set(&mut self, at: usize, b: &[u8]) -> bool {
        match self.bytes[..self.len].get_mut(at..at + b.len()) {
            Some(d) => {
                d.copy_from_slice(b);
                true
            }
            None => false,
        }
    }

    fn get(&self, at: usize) -> Option<u8> {
        self.as_slice().get(at).copied()
    }
}

/// splitmix64: small, fast, and the same sequence everywhere for a seed.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// The kinds of mutation; [`mutate`] returns the one it applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mutation {
    /// Cut the frame short anywhere.
    Truncate,
    /// Cut the frame inside or right after a header.
    TruncateAtHeader,
    /// One random bit flipped.
    FlipBit,
    /// One byte set to a value parsers care about (0, 0xff, versions, protocols).
    InterestingByte,
    /// Random bytes appended (trailing data after the IP packet).
    Append,
    /// The EtherType changed, or a VLAN tag put in front.
    EtherType,
    /// IPv4 total length or IPv6 payload length set wrong.
    IpLength,
    /// IPv4 header length set to any value 0..15.
    Ihl,
    /// IPv4 options added (and the header length raised to match).
    Ipv4Options,
    /// IPv4 fragment bits (MF, offset) set.
    Fragment,
    /// An IPv6 extension header inserted (hop-by-hop, routing, destination, fragment).
    Ipv6ExtHeader,
    /// The IP version nibble changed.
    IpVersion,
    /// TCP data offset or UDP length set wrong.
    TransportLength,
    /// Source or destination port set to a service's, the GUE port's or another.
    Port,
    /// GUE version, control bit or header length changed.
    GueVersion,
    /// GUE inner protocol changed.
    GueProto,
    /// The hop list's count set to 0..=255.
    GueHops,
    /// The hop list's type or flags changed.
    GueHopList,
    /// The hop list's next hop set to the packet's own destination (or its source, or
    /// an address of the other family).
    GueNextHopSelf,
}

impl Mutation {
    pub const ALL: [Mutation; 19] = [
        Mutation::Truncate,
        Mutation::TruncateAtHeader,
        Mutation::FlipBit,
        Mutation::InterestingByte,
        Mutation::Append,
        Mutation::EtherType,
        Mutation::IpLength,
        Mutation::Ihl,
        Mutation::Ipv4Options,
        Mutation::Fragment,
        Mutation::Ipv6ExtHeader,
        Mutation::IpVersion,
        Mutation::TransportLength,
        Mutation::Port,
        Mutation::GueVersion,
        Mutation::GueProto,
        Mutation::GueHops,
        Mutation::GueHopList,
        Mutation::GueNextHopSelf,
    ];
}

const INTERESTING: [u8; 16] = [
    0, 1, 2, 4, 5, 6, 0x0f, 17, 41, 43, 44, 58, 60, 0x45, 0x60, 0xff,
];

/// The headers found in a frame: the outer IP header and, when the frame looks like
/// GUE (UDP with room for the GUE header), the GUE offset and the inner IP header.
struct Layout {
    outer: Option<Ip>,
    gue_off: Option<usize>,
    inner: Option<Ip>,
}

fn layout(f: &[u8]) -> Layout {
    let outer = match ethernet(f) {
        Ok(Some((l3, v6))) => ip(f, l3, v6).ok(),
        _ => None,
    };
    let mut gue_off = None;
    let mut inner = None;
    if let Some(o) = outer.filter(|o| o.proto == IPPROTO_UDP && !o.bad_ihl) {
        let g = o.l4_off + UDP_LEN;
        if f.len() >= g + GUE_LEN {
            gue_off = Some(g);
            let inner_v6 = f[g + GUE_PROTO] == IPPROTO_IPV6;
            inner = ip(f, g + GUE_LEN, inner_v6).ok();
        }
    }
    Layout {
        outer,
        gue_off,
        inner,
    }
}

/// Applies one random mutation to `f` and returns which. `ports` are ports worth aiming
/// at (the services' and the GUE port).
pub fn mutate(rng: &mut Rng, f: &mut Frame, ports: &[u16]) -> Mutation {
    let m = rng.pick(&Mutation::ALL);
    if apply(rng, f, m, ports) {
        m
    } else {
        // The frame has no such header: fall back to a flipped bit.
        flip_bit(rng, f);
        Mutation::FlipBit
    }
}

fn flip_bit(rng: &mut Rng, f: &mut Frame) {
    if !f.is_empty() {
        let i = rng.below(f.len);
        f.bytes[i] ^= 1 << rng.below(8);
    }
}

/// One of the IP headers of the frame, the inner one when there is one half the time.
fn some_ip(rng: &mut Rng, l: &Layout) -> Option<Ip> {
    match (l.outer, l.inner) {
        (Some(_), Some(i)) if rng.below(2) == 0 => Some(i),
        (o, _) => o,
    }
}

fn apply(rng: &mut Rng, f: &mut Frame, m: Mutation, ports: &[u16]) -> bool {
    let l = layout(f.as_slice());
    match m {
        Mutation::Truncate => {
            let n = rng.below(f.len + 1);
            f.truncate(n);
            true
        }
        Mutation::TruncateAtHeader => {
            let mut cuts = [ETH_LEN, ETH_LEN + 4, 0, 0, 0, 0, 0];
            if let Some(o) = l.outer {
                cuts[2] = o.l3_off;
                cuts[3] = o.l4_off;
            }
            if let Some(g) = l.gue_off {
                cuts[4] = g;
            }
            if let Some(i) = l.inner {
                cuts[5] = i.l3_off;
                cuts[6] = i.l4_off;
            }
            let at = rng.pick(&cuts) + rng.below(24);
            f.truncate(at);
            true
        }
        Mutation::FlipBit => {
            flip_bit(rng, f);
            true
        }
        Mutation::InterestingByte => {
            if f.is_empty() {
                return false;
            }
            let i = rng.below(f.len);
            f.bytes[i] = rng.pick(&INTERESTING);
            true
        }
        Mutation::Append => {
            let mut extra = [0u8; 64];
            let n = 1 + rng.below(extra.len());
            for b in &mut extra[..n] {
                *b = rng.byte();
            }
            f.insert(f.len, &extra[..n])
        }
        Mutation::EtherType => match rng.below(3) {
            0 => {
                let t = rng.pick(&[0x0800u16, 0x86dd, 0x0806, 0x8100, 0x88a8, 0]);
                f.set(12, &t.to_be_bytes())
            }
            1 => {
                // A VLAN tag in front of whatever follows.
                let Some(t) = f.as_slice().get(12..14).map(|t| [t[0], t[1]]) else {
                    return false;
                };
                let tpid = rng.pick(&[0x8100u16, 0x88a8]).to_be_bytes();
                f.set(12, &tpid) && f.insert(14, &[0, rng.byte(), t[0], t[1]])
            }
            _ => {
                // IPv4 and IPv6 swapped: the header does not match the EtherType.
                match f.as_slice().get(12..14) {
                    Some([0x08, 0x00]) => f.set(12, &[0x86, 0xdd]),
                    Some([0x86, 0xdd]) => f.set(12, &[0x08, 0x00]),
                    _ => false,
                }
            }
        },
        Mutation::IpLength => {
            let Some(h) = some_ip(rng, &l) else {
                return false;
            };
            let any = rng.next_u64() as u16;
            let v = rng.pick(&[0u16, 1, 19, 20, 39, 40, 0xffff, any]);
            let at = if h.v6 { h.l3_off + 4 } else { h.l3_off + 2 };
            f.set(at, &v.to_be_bytes())
        }
        Mutation::Ihl => {
            let Some(h) = some_ip(rng, &l).filter(|h| !h.v6) else {
                return false;
            };
            let ihl = rng.below(16) as u8;
            f.set(h.l3_off, &[0x40 | ihl])
        }
        Mutation::Ipv4Options => {
            let Some(h) = some_ip(rng, &l).filter(|h| !h.v6 && !h.bad_ihl) else {
                return false;
            };
            let ihl = (h.l4_off - h.l3_off) / 4;
            let words = 1 + rng.below(15 - ihl.min(14));
            let opts = [1u8; 40];
            f.set(h.l3_off, &[0x40 | (ihl + words).min(15) as u8])
                && f.insert(h.l4_off, &opts[..words * 4])
        }
        Mutation::Fragment => {
            let Some(h) = some_ip(rng, &l) else {
                return false;
            };
            if h.v6 {
                insert_ext(rng, f, &h, IPPROTO_FRAGMENT)
            } else {
                let v = rng.pick(&[0x2000u16, 0x0001, 0x1fff, 0x3fff, 0x4000, 0x8000]);
                f.set(h.l3_off + 6, &v.to_be_bytes())
            }
        }
        Mutation::Ipv6ExtHeader => {
            let Some(h) = some_ip(rng, &l).filter(|h| h.v6) else {
                return false;
            };
            let kind = rng.pick(&[IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS]);
            insert_ext(rng, f, &h, kind)
        }
        Mutation::IpVersion => {
            let Some(h) = some_ip(rng, &l) else {
                return false;
            };
            let Some(b) = f.get(h.l3_off) else {
                return false;
            };
            f.set(
                h.l3_off,
                &[(rng.pick(&[0u8, 4, 6, 5, 15]) << 4) | (b & 0x0f)],
            )
        }
        Mutation::TransportLength => {
            let Some(h) = some_ip(rng, &l) else {
                return false;
            };
            match h.proto {
                IPPROTO_TCP => {
                    let Some(b) = f.get(h.l4_off + 12) else {
                        return false;
                    };
                    f.set(h.l4_off + 12, &[(rng.below(16) as u8) << 4 | (b & 0x0f)])
                }
                IPPROTO_UDP => {
                    let any = rng.next_u64() as u16;
                    let v = rng.pick(&[0u16, 7, 8, 0xffff, any]);
                    f.set(h.l4_off + 4, &v.to_be_bytes())
                }
                _ => false,
            }
        }
        Mutation::Port => {
            let Some(h) = some_ip(rng, &l) else {
                return false;
            };
            let port = if ports.is_empty() || rng.below(4) == 0 {
                rng.next_u64() as u16
            } else {
                rng.pick(ports)
            };
            let at = h.l4_off + 2 * rng.below(2);
            f.set(at, &port.to_be_bytes())
        }
        Mutation::GueVersion => {
            let Some(g) = l.gue_off else {
                return false;
            };
            let any = rng.byte();
            let v = rng.pick(&[0x45u8, 0x85, 0xc5, 0x25, 0x00, 0x04, 0x06, 0x1f, any]);
            f.set(g, &[v])
        }
        Mutation::GueProto => {
            let Some(g) = l.gue_off else {
                return false;
            };
            let any = rng.byte();
            f.set(g + GUE_PROTO, &[rng.pick(&[4u8, 41, 0, 6, 17, 47, any])])
        }
        Mutation::GueHops => {
            let Some(g) = l.gue_off else {
                return false;
            };
            f.set(g + HOPS_LEFT, &[rng.pick(&[0u8, 1, 2, 3, 0x7f, 0xff])])
        }
        Mutation::GueHopList => {
            let Some(g) = l.gue_off else {
                return false;
            };
            if rng.below(2) == 0 {
                f.set(g + HOP_LIST_KIND + rng.below(2), &[rng.byte()])
            } else {
                f.set(g + HOP_FLAGS, &[rng.pick(&[0u8, 1, 2, 0x80, 0xff])])
            }
        }
        Mutation::GueNextHopSelf => {
            let (Some(g), Some(o)) = (l.gue_off, l.outer) else {
                return false;
            };
            let hop = match rng.below(4) {
                0 | 1 => o.dst,
                2 => o.src,
                _ => {
                    // The other family: the hop list cannot switch it.
                    let mut a = o.dst;
                    a[0] ^= 0xfd;
                    a
                }
            };
            f.set(g + NEXT_HOP, &hop) && f.set(g + HOPS_LEFT, &[1])
        }
    }
}

/// Inserts an IPv6 extension header of `kind` right after the fixed header of `h`.
fn insert_ext(rng: &mut Rng, f: &mut Frame, h: &Ip, kind: u8) -> bool {
    let fixed = h.l3_off + IPV6_LEN;
    let Some(next) = f.get(h.l3_off + 6) else {
        return false;
    };
    let mut ext = [0u8; 8 * 4];
    // Mostly short; sometimes a length that points past the packet or past what the
    // program looks at.
    let len8 = if kind == IPPROTO_FRAGMENT {
        0
    } else {
        rng.pick(&[0u8, 0, 1, 3, 0x7f, 0xff])
    };
    let size = (len8 as usize + 1) * 8;
    ext[0] = next;
    ext[1] = if kind == IPPROTO_FRAGMENT { 0 } else { len8 };
    if kind == IPPROTO_FRAGMENT {
        // Offset and M flag: first, middle or last fragment.
        let v = rng.pick(&[0x0001u16, 0x0008, 0x0009, 0x0000]);
        ext[2..4].copy_from_slice(&v.to_be_bytes());
    }
    let n = size.min(ext.len());
    f.set(h.l3_off + 6, &[kind]) && f.insert(fixed, &ext[..n])
}

/// A frame of random bytes, `max` long at most, with a plausible EtherType and IP
/// version nibble more often than chance would give.
pub fn random_frame(rng: &mut Rng, max: usize) -> Frame {
    let mut f = Frame::EMPTY;
    let len = rng.below(max.min(CAPACITY) + 1);
    for i in 0..len {
        f.bytes[i] = rng.byte();
    }
    f.len = len;
    if len > ETH_LEN && rng.below(4) != 0 {
        let v6 = rng.below(2) == 0;
        f.bytes[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        f.bytes[14] = if v6 {
            0x60 | (f.bytes[14] & 0x0f)
        } else {
            0x45
        };
        if !v6 && len >= ETH_LEN + IPV4_LEN {
            f.bytes[ETH_LEN + 9] = rng.pick(&[IPPROTO_TCP, IPPROTO_UDP, 1]);
        }
    }
    f
}
