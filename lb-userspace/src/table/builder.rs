//! The first column (who owns each bucket) and the second (who owned it before).
//!
//! First column: every bucket ranks the backends by score (see `score`), every backend ranks
//! the buckets by the same scores, and every backend takes exactly its quota of buckets (its
//! weight's share, rounded by largest remainder). The table is the stable matching of buckets
//! and backends under these rankings: no bucket and backend both prefer each other over what
//! they got. Because both sides rank by one global order of (bucket, backend) pairs, that
//! matching is unique, so it depends on the service state alone, not on the order of the
//! input, the order of the work or any earlier table. It is what pure weighted rendezvous
//! hashing gives, bent only where a backend is over its quota, so a change moves few buckets
//! beyond the ones it must.
//!
//! It is found by deferred acceptance with backends proposing: each backend walks its buckets
//! best first and takes a bucket that is free or held by a worse-scored backend, which then
//! walks on. A walk never has to start over, so the work is the number of buckets times the
//! number of offers per bucket (5 to 12 measured, from 10 to 4,096 backends), not times the
//! number of backends.

use std::{collections::HashSet, net::IpAddr};

use lb_common::{
    addr::to_bytes,
    limits::{MAX_BACKENDS_PER_SERVICE, MAX_TABLE_BITS, MAX_WEIGHT, MIN_TABLE_BITS},
    maps::{Bucket, NO_BACKEND},
};

use super::{
    error::TableError,
    score::{backend_key, score, weight_factor, Walk},
    Backend, BackendState,
};

/// Checks an input as a whole. Nothing here depends on the backends' states.
pub(super) fn validate(backends: &[Backend], bits: u32) -> Result<(), TableError> {
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

pub(super) fn owners(backends: &[Backend], seed: u32) -> Vec<Owner> {
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

/// The stable matching (see the module docs): the owner index of every bucket.
///
/// A claim is a score with the owner's index in its low bits: comparing claims compares
/// scores and breaks ties by canonical order, in one integer. Along a walk, scores grow by far
/// more than the bits given up (see `score`), so each backend still ranks buckets strictly.
fn assign(owners: &[Owner], quotas: &[u32], bits: u32) -> Vec<u32> {
    if bits >= PREFETCH_BITS {
        match_buckets::<true>(owners, quotas, bits)
    } else {
        match_buckets::<false>(owners, quotas, bits)
    }
}

pub(super) fn match_buckets<const PREFETCH: bool>(
    owners: &[Owner],
    quotas: &[u32],
    bits: u32,
) -> Vec<u32> {
    let size = 1usize << bits;
    let mask = (size - 1) as u32;
    let walks: Vec<Walk> = owners.iter().map(|o| Walk::new(o.key, bits)).collect();
    let factors: Vec<u64> = owners.iter().map(|o| weight_factor(o.weight)).collect();
    let mut claims = vec![FREE; size];
    let mut next = vec![0u32; owners.len()];
    let mut count = vec![0u32; owners.len()];
    let mut todo: Vec<u32> = (0..owners.len() as u32).rev().collect();
    while let Some(b) = todo.pop() {
        let bi = b as usize;
        let (walk, factor, quota) = (&walks[bi], factors[bi], quotas[bi]);
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
        while c < quota {
            // A backend short of its quota has not yet been offered a free bucket, and free
            // buckets stay free until offered, so its walk cannot run out.
            assert!((p as usize) < size, "walk ran out");
            let k = if PREFETCH {
                let slot = (p % AHEAD) as usize;
                let k = ahead[slot];
                ahead[slot] = walk.bucket((p + AHEAD) & mask);
                prefetch(&claims, ahead[slot] as usize);
                k
            } else {
                walk.bucket(p)
            } as usize;
            if p % FLOOR_EVERY == 0 {
                floor = score(p, bits, factor) & !INDEX_MASK;
            }
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
                if held != FREE {
                    let h = (held & INDEX_MASK) as usize;
                    count[h] -= 1;
                    todo.push(h as u32);
                }
            }
        }
        next[bi] = p;
        count[bi] = c;
    }
    claims
        .into_iter()
        .map(|c| (c & INDEX_MASK) as u32)
        .collect()
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
pub fn first_column(backends: &[Backend], bits: u32, seed: u32) -> Result<Vec<u32>, TableError> {
    validate(backends, bits)?;
    let size = 1usize << bits;
    let owners = owners(backends, seed);
    if owners.is_empty() {
        return Ok(vec![NO_BACKEND; size]);
    }
    let quotas = quotas(&owners, size as u32);
    Ok(assign(&owners, &quotas, bits)
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
    backends: &[Backend],
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
