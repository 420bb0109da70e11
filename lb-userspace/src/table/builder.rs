//! The first column (who owns each bucket) and the second (who owned it before).
//!
//! First column: every bucket ranks the backends by score (see `score`), every backend ranks
//! the buckets by the same scores, and every backend may take up to 1% more than its weight's
//! share of the buckets (exactly its share below [`BOUNDED_MIN_SHARE`] buckets per backend,
//! see there). The table is the stable matching of buckets and backends under these
//! rankings: no bucket and backend both prefer each other over what they got. Because both
//! sides rank by one global order of (bucket, backend) pairs, that matching is unique, so it
//! depends on the service state alone, not on the order of the input, the order of the work
//! or any earlier table. It is what pure weighted rendezvous hashing gives, bent only where a
//! backend would pass its cap.
//!
//! Why bounds and not exact quotas: rendezvous hashing moves only the buckets a change must
//! move, but its shares wander by chance. Exact quotas straighten them, and each change then
//! also shifts a few buckets at the edges of the unchanged backends' shares; a bucket shifted
//! in two successive changes strands the connections of its first owner, because a bucket
//! remembers one previous owner. Between 3% below and 1% above the share, chance alone
//! decides, and those shifts mostly vanish where a backend has thousands of buckets. A backend
//! that chance leaves more than 3% short (many backends, few buckets each) is brought up to
//! that floor by a second matching with exact quotas, the buckets taken from the fullest.
//!
//! It is found by deferred acceptance with backends proposing: each backend walks its buckets
//! best first and takes a bucket that is free or held by a worse-scored backend, which then
//! walks on. A walk never has to start over, so the work is the number of buckets times the
//! number of offers per bucket, not times the number of backends.

use std::{
    collections::{BinaryHeap, HashSet},
    net::IpAddr,
};

use lb_common::{
    addr::to_bytes,
    limits::{MAX_BACKENDS_PER_SERVICE, MAX_TABLE_BITS, MAX_WEIGHT, MIN_TABLE_BITS},
    maps::{Bucket, NO_BACKEND},
};

use super::{
    error::TableError,
    score::{backend_key, score, weight_factor, Walk},
    BackendState, Candidate,
};

/// Checks an input as a whole. Nothing here depends on the backends' states.
pub(super) fn validate(backends: &[Candidate], bits: u32) -> Result<(), TableError> {
    if !(MIN_TABLE_BITS..=MAX_TABLE_BITS).contains(&bits) {
        return Err(TableError::BadTableBits { bits });
    }
    if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
        return Err(TableError::TooManyBackends {
            count: backends.len(),
        });
    }
    let mut addrs = HashSet::with_capacity(backends.len());
    let mut slots: Vec<(u32, IpAddr)> = Vec::with_capacity(backends.len());
    for b in backends {
        if b.weight > MAX_WEIGHT {
            return Err(TableError::WeightOutOfRange {
                addr: b.addr,
                weight: b.weight,
            });
        }
        if b.slot == NO_BACKEND {
            return Err(TableError::ReservedSlot {
                addr: b.addr,
                slot: b.slot,
            });
        }
        // IPv4 and its mapped IPv6 form are one backend.
        if !addrs.insert(to_bytes(b.addr)) {
            return Err(TableError::DuplicateBackend { addr: b.addr });
        }
        slots.push((b.slot, b.addr));
    }
    slots.sort_by_key(|&(slot, _)| slot);
    if let Some(w) = slots.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(TableError::DuplicateSlot {
            slot: w[0].0,
            first: w[0].1,
            second: w[1].1,
        });
    }
    let buckets = 1usize << bits;
    if backends.len() > buckets {
        return Err(TableError::TableTooSmall {
            count: backends.len(),
            buckets,
        });
    }
    Ok(())
}

/// A backend that may own buckets, in canonical order (by key, then address).
pub(super) struct Owner {
    pub(super) key: u64,
    pub(super) addr: [u8; 16],
    pub(super) weight: u32,
    pub(super) slot: u32,
}

pub(super) fn owners(backends: &[Candidate], seed: u32) -> Vec<Owner> {
    let mut v: Vec<Owner> = backends
        .iter()
        .filter(|b| b.state == BackendState::Active && b.weight > 0)
        .map(|b| {
            let addr = to_bytes(b.addr);
            Owner {
                key: backend_key(&addr, seed),
                addr,
                weight: b.weight,
                slot: b.slot,
            }
        })
        .collect();
    v.sort_unstable_by_key(|o| (o.key, o.addr));
    v
}

/// Buckets per owner: the weight's share of `buckets`, rounded down, plus one for the largest
/// remainders (ties to the canonical order, which does not depend on the other backends, so a
/// change shifts few of these extra buckets).
pub(super) fn quotas(owners: &[Owner], buckets: u32) -> Vec<u32> {
    let total: u64 = owners.iter().map(|o| u64::from(o.weight)).sum();
    let mut q = Vec::with_capacity(owners.len());
    let mut rem = Vec::with_capacity(owners.len());
    for (i, o) in owners.iter().enumerate() {
        let exact = u64::from(buckets) * u64::from(o.weight);
        q.push((exact / total) as u32);
        rem.push((exact % total, i));
    }
    let left = buckets - q.iter().sum::<u32>();
    rem.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in &rem[..left as usize] {
        q[i] += 1;
    }
    q
}

/// How far a backend's share may pass its weight's, in hundredths: chance decides within it
/// (see the module docs), and it keeps max/mean within 1.01 at equal weights.
pub(super) const OVER_PERCENT: u64 = 1;
/// How far it may fall short. Wider than [`OVER_PERCENT`]: a backend a little short harms
/// nobody, while every correction shifts buckets between changes. At a few backends and 2^16
/// buckets, chance rarely strays this far.
pub(super) const UNDER_PERCENT: u64 = 3;

/// The least and the most buckets each owner may hold: its share -3% and +1%, widened to
/// include its exact quota, so the bounds always admit a table.
pub(super) fn bounds(owners: &[Owner], q: &[u32], buckets: u32) -> (Vec<u32>, Vec<u32>) {
    let total = u128::from(owners.iter().map(|o| u64::from(o.weight)).sum::<u64>()) * 100;
    let share =
        |o: &Owner, percent: u64| u128::from(buckets) * u128::from(o.weight) * u128::from(percent);
    let lo = owners
        .iter()
        .zip(q)
        .map(|(o, &q)| q.min(share(o, 100 - UNDER_PERCENT).div_ceil(total) as u32))
        .collect();
    let hi = owners
        .iter()
        .zip(q)
        .map(|(o, &q)| q.max((share(o, 100 + OVER_PERCENT) / total) as u32))
        .collect();
    (lo, hi)
}

/// Raises the owners that hold fewer than `lo` buckets to `lo` and takes what that costs from
/// the owners fullest for their weight (ties to the canonical order), never below `lo`: the
/// exact quotas of the second matching.
fn settle(owners: &[Owner], held: &[u32], lo: &[u32]) -> Vec<u32> {
    let mut q: Vec<u32> = held.iter().zip(lo).map(|(&h, &l)| h.max(l)).collect();
    let raised: u32 = q.iter().zip(held).map(|(q, h)| q - h).sum();
    // Fullness q/weight, compared exactly: larger first, then lower index.
    let mut heap: BinaryHeap<Fullness> = (0..owners.len())
        .filter(|&i| q[i] > lo[i])
        .map(|i| Fullness::new(i, q[i], owners[i].weight))
        .collect();
    for _ in 0..raised {
        let f = heap
            .pop()
            .expect("the upper bounds leave room above the lower ones");
        q[f.index] -= 1;
        if q[f.index] > lo[f.index] {
            heap.push(Fullness::new(f.index, q[f.index], f.weight));
        }
    }
    q
}

/// An owner in [`settle`]'s heap.
#[derive(PartialEq, Eq)]
struct Fullness {
    index: usize,
    held: u32,
    weight: u32,
}

impl Fullness {
    fn new(index: usize, held: u32, weight: u32) -> Self {
        Fullness {
            index,
            held,
            weight,
        }
    }
}

impl Ord for Fullness {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let a = u64::from(self.held) * u64::from(other.weight);
        let b = u64::from(other.held) * u64::from(self.weight);
        a.cmp(&b).then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Fullness {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A bucket nobody holds yet (above every real claim).
const FREE: u64 = u64::MAX;
/// Owner indices live in a claim's low bits; scores keep their bits above.
const INDEX_BITS: u32 = 12;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const _: () = assert!(MAX_BACKENDS_PER_SERVICE as u64 <= 1 << INDEX_BITS);
/// Tables at least this large outgrow the caches, so walks fetch buckets ahead.
const PREFETCH_BITS: u32 = 18;
/// How far ahead.
const AHEAD: u32 = 8;
/// Positions between refreshes of a walk's score floor.
const FLOOR_EVERY: u32 = 32;

/// Buckets per owner from which chance keeps shares close enough to their weights' to be
/// left to it (see the module docs). Below, shares wander further than the bounds, the second
/// matching is needed anyway, and walks that must prove nothing is left for them would cost
/// several times an exact build; exact quotas are used instead.
const BOUNDED_MIN_SHARE: usize = 4096;

/// The first column as owner indices (see the module docs). With at least
/// [`BOUNDED_MIN_SHARE`] buckets per owner: the stable matching under the upper bounds, and if
/// that leaves an owner below its lower bound, the one under the exact quotas [`settle`]
/// gives. With fewer: the one under the exact quotas of the weights.
fn assign(owners: &[Owner], buckets: u32, bits: u32) -> Vec<u32> {
    let quotas = quotas(owners, buckets);
    if (buckets as usize) < owners.len() * BOUNDED_MIN_SHARE {
        return match_caps(owners, &quotas, bits);
    }
    let (lo, hi) = bounds(owners, &quotas, buckets);
    let first = match_caps(owners, &hi, bits);
    let mut held = vec![0u32; owners.len()];
    for &i in &first {
        held[i as usize] += 1;
    }
    if held.iter().zip(&lo).all(|(h, l)| h >= l) {
        return first;
    }
    match_caps(owners, &settle(owners, &held, &lo), bits)
}

fn match_caps(owners: &[Owner], caps: &[u32], bits: u32) -> Vec<u32> {
    if bits >= PREFETCH_BITS {
        match_buckets::<true>(owners, caps, bits)
    } else {
        match_buckets::<false>(owners, caps, bits)
    }
}

/// The stable matching in which owner `i` holds at most `caps[i]` buckets (the caps add up to
/// at least the table size): the owner index of every bucket.
///
/// A claim is a score with the owner's index in its low bits: comparing claims compares
/// scores and breaks ties by canonical order, in one integer. Along a walk, scores grow by far
/// more than the bits given up (see `score`), so each backend still ranks buckets strictly.
///
/// A walk below its cap ends once every bucket is held and its scores have passed the worst
/// claim held: claims only improve after that, so nothing is left for it.
pub(super) fn match_buckets<const PREFETCH: bool>(
    owners: &[Owner],
    caps: &[u32],
    bits: u32,
) -> Vec<u32> {
    let size = 1usize << bits;
    let mask = (size - 1) as u32;
    let walks: Vec<Walk> = owners.iter().map(|o| Walk::new(o.key, bits)).collect();
    let factors: Vec<u64> = owners.iter().map(|o| weight_factor(o.weight)).collect();
    let mut claims = vec![FREE; size];
    let mut free = size;
    let mut held_levels = Levels::default();
    let mut next = vec![0u32; owners.len()];
    let mut count = vec![0u32; owners.len()];
    let mut todo: Vec<u32> = (0..owners.len() as u32).rev().collect();
    while let Some(b) = todo.pop() {
        let bi = b as usize;
        let (walk, factor, cap) = (&walks[bi], factors[bi], caps[bi]);
        let (mut p, mut c) = (next[bi], count[bi]);
        // Buckets at positions p.. of the walk, when prefetching.
        let mut ahead = [0u32; AHEAD as usize];
        if PREFETCH {
            for i in p..p + AHEAD {
                ahead[(i % AHEAD) as usize] = walk.bucket(i & mask);
            }
        }
        // No claim of this walk from here on is below `floor`: late in a walk most buckets
        // are held by far better claims, and this settles them without scoring.
        let mut floor = if (p as usize) < size {
            score(p, bits, factor) & !INDEX_MASK
        } else {
            0
        };
        while c < cap && (p as usize) < size {
            if p % FLOOR_EVERY == 0 {
                floor = score(p, bits, factor) & !INDEX_MASK;
            }
            if free == 0 && level(floor) > held_levels.top() {
                break;
            }
            let k = if PREFETCH {
                let slot = (p % AHEAD) as usize;
                let k = ahead[slot];
                ahead[slot] = walk.bucket((p + AHEAD) & mask);
                prefetch(&claims, ahead[slot] as usize);
                k
            } else {
                walk.bucket(p)
            } as usize;
            let held = claims[k];
            if held < floor {
                p += 1;
                continue;
            }
            let claim = (score(p, bits, factor) & !INDEX_MASK) | u64::from(b);
            p += 1;
            if claim < held {
                claims[k] = claim;
                c += 1;
                held_levels.add(claim);
                if held == FREE {
                    free -= 1;
                } else {
                    held_levels.remove(held);
                    let h = (held & INDEX_MASK) as usize;
                    count[h] -= 1;
                    todo.push(h as u32);
                }
            }
        }
        next[bi] = p;
        count[bi] = c;
    }
    assert_eq!(free, 0, "caps below the table size");
    claims
        .into_iter()
        .map(|c| (c & INDEX_MASK) as u32)
        .collect()
}

/// Claims sorted by magnitude into levels of 1/64 of a power of two: the worst claim held is
/// known to that precision without a scan.
struct Levels {
    count: Vec<u32>,
    top: usize,
}

impl Default for Levels {
    fn default() -> Self {
        Levels {
            count: vec![0; 64 * 64],
            top: 0,
        }
    }
}

/// The level of a claim: grows with the claim, so a claim of a higher level is the larger.
fn level(claim: u64) -> usize {
    if claim == 0 {
        return 0;
    }
    let exp = 63 - claim.leading_zeros();
    let mantissa = ((claim << claim.leading_zeros()) >> 57) & 63;
    (exp * 64) as usize + mantissa as usize
}

impl Levels {
    fn add(&mut self, claim: u64) {
        let l = level(claim);
        self.count[l] += 1;
        self.top = self.top.max(l);
    }

    fn remove(&mut self, claim: u64) {
        self.count[level(claim)] -= 1;
    }

    /// The level of the worst claim held.
    fn top(&mut self) -> usize {
        while self.top > 0 && self.count[self.top] == 0 {
            self.top -= 1;
        }
        self.top
    }
}

/// Asks the cache for `v[i]`; random reads into a table of megabytes wait on memory
/// otherwise.
#[inline(always)]
fn prefetch(v: &[u64], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = v.get(i) {
        // SAFETY: a prefetch only hints the cache; it never faults or changes memory, and the
        // pointer is in bounds anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (x as *const u64).cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, i);
}

/// The first column: the slot of every bucket's owner, [`NO_BACKEND`] when no backend may
/// own buckets.
pub fn first_column(backends: &[Candidate], bits: u32, seed: u32) -> Result<Vec<u32>, TableError> {
    validate(backends, bits)?;
    let size = 1usize << bits;
    let owners = owners(backends, seed);
    if owners.is_empty() {
        return Ok(vec![NO_BACKEND; size]);
    }
    Ok(assign(&owners, size as u32, bits)
        .into_iter()
        .map(|i| owners[i as usize].slot)
        .collect())
}

/// Builds a service's table of `2^bits` buckets.
///
/// `first` depends only on `backends` (as a set), `bits` and `seed`. `second` comes from
/// `previous`, this node's table before the change, in the same slot numbers (a slot must not
/// pass to another backend while a table still names it):
/// - a bucket whose `first` changed records the previous `first` as `second`, if that backend
///   is still listed and not down; else it keeps its previous `second` under the same
///   condition, so connections daisy-chained before still find their backend;
/// - a bucket whose `first` did not change keeps its `second` under the same condition:
///   connections that moved in an earlier change may still live there, and clearing it on an
///   unrelated rebuild would break them, while a stale second hop only costs packets no
///   backend owns one more hop;
/// - a `second` never equals the bucket's `first`, and a down or removed backend appears
///   nowhere.
///
/// A previous table of another size is read as the flow hash indexes it: bucket `i` of the new
/// table takes the flows of old bucket `i mod old` when growing, and of the old buckets
/// `i + j * new` when shrinking, of which the first whose owner is still listed and differs
/// from the new owner supplies the second hop.
pub fn build(
    backends: &[Candidate],
    bits: u32,
    seed: u32,
    previous: Option<&[Bucket]>,
) -> Result<Vec<Bucket>, TableError> {
    if let Some(prev) = previous {
        let len = prev.len();
        let ok = len.is_power_of_two()
            && (MIN_TABLE_BITS..=MAX_TABLE_BITS).contains(&len.trailing_zeros());
        if !ok {
            return Err(TableError::BadPreviousTable { len });
        }
    }
    let first = first_column(backends, bits, seed)?;
    let Some(prev) = previous else {
        return Ok(first
            .into_iter()
            .map(|first| Bucket {
                first,
                second: NO_BACKEND,
            })
            .collect());
    };
    // Slots of backends that may still hold connections. Lookups only: no iteration order.
    let live: HashSet<u32> = backends
        .iter()
        .filter(|b| b.state != BackendState::Down)
        .map(|b| b.slot)
        .collect();
    let is_live = |slot: u32| slot != NO_BACKEND && live.contains(&slot);
    let size = first.len();
    Ok(first
        .iter()
        .enumerate()
        .map(|(i, &first)| {
            let old = if prev.len() <= size {
                prev[i & (prev.len() - 1)]
            } else {
                (i..prev.len())
                    .step_by(size)
                    .map(|j| prev[j])
                    .find(|o| o.first != first && is_live(o.first))
                    .unwrap_or(prev[i])
            };
            let keep = |slot: u32| slot != first && is_live(slot);
            let second = if old.first != first && keep(old.first) {
                old.first
            } else if keep(old.second) {
                old.second
            } else {
                NO_BACKEND
            };
            Bucket { first, second }
        })
        .collect())
}

/// The table size for a service of `backends` backends: the default 2^16 up to 1,024
/// backends, then growing so each backend keeps at least 64 buckets, up to the maximum.
pub fn default_table_bits(backends: usize) -> u32 {
    let want = (backends.max(1) * 64).next_power_of_two().trailing_zeros();
    want.clamp(lb_common::limits::DEFAULT_TABLE_BITS, MAX_TABLE_BITS)
}
