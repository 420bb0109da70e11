//! Properties of the table builder. Debug builds check them at sizes that run in seconds;
//! the figures the design promises (2^16 buckets, 10 to 4,096 backends) are checked by the
//! release-only tests at the end (`cargo test --release -p lb-userspace --lib table`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    limits::{MAX_BACKENDS_PER_SERVICE, MAX_TABLE_BITS, MAX_WEIGHT, MIN_TABLE_BITS},
    maps::{Bucket, NO_BACKEND},
};
use proptest::prelude::*;

use super::{
    build, builder, default_table_bits, first_column, maglev, plan, report, BackendState,
    Candidate, TableError,
};

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// `n` active backends of weight 1, slot = index.
fn equal(n: u32) -> Vec<Candidate> {
    (0..n).map(|i| Candidate::new(v4(i), 1, i)).collect()
}

/// Buckets per slot.
fn counts(first: &[u32]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for &s in first {
        *m.entry(s).or_default() += 1;
    }
    m
}

fn moved(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn firsts(t: &[Bucket]) -> Vec<u32> {
    t.iter().map(|b| b.first).collect()
}

/// The least share of buckets any table with exact shares must move between two states:
/// the sum of the share gains.
fn optimum(before: &[Candidate], after: &[Candidate]) -> f64 {
    let share = |set: &[Candidate], addr: IpAddr| {
        let active = |b: &&Candidate| b.state == BackendState::Active;
        let total: f64 = set.iter().filter(active).map(|b| f64::from(b.weight)).sum();
        set.iter()
            .filter(active)
            .find(|b| b.addr == addr)
            .map_or(0.0, |b| f64::from(b.weight) / total)
    };
    after
        .iter()
        .map(|b| (share(after, b.addr) - share(before, b.addr)).max(0.0))
        .sum()
}

// ---------------------------------------------------------------------------------------
// Edge cases and errors.

#[test]
fn no_backends_gives_empty_buckets() {
    let t = build(&[], 4, 0, None).unwrap();
    assert_eq!(t, vec![Bucket::EMPTY; 16]);
}

#[test]
fn one_backend_owns_everything() {
    let t = build(&[Candidate::new(v4(1), 7, 3)], 10, 9, None).unwrap();
    assert!(t.iter().all(|b| b.first == 3 && b.second == NO_BACKEND));
}

#[test]
fn all_draining_owns_nothing_but_keeps_second_hops() {
    let mut set = equal(4);
    let before = build(&set, 8, 1, None).unwrap();
    set[0].weight = 0;
    set[1].state = BackendState::Draining;
    set[2].state = BackendState::Draining;
    set[3].weight = 0;
    let after = build(&set, 8, 1, Some(&before)).unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(b.first, NO_BACKEND);
        assert_eq!(b.second, a.first);
    }
}

#[test]
fn down_backend_appears_nowhere() {
    let mut set = equal(5);
    let t0 = build(&set, 10, 2, None).unwrap();
    set[1].state = BackendState::Draining;
    let t1 = build(&set, 10, 2, Some(&t0)).unwrap();
    assert!(t1.iter().any(|b| b.second == 1));
    set[1].state = BackendState::Down;
    let t2 = build(&set, 10, 2, Some(&t1)).unwrap();
    assert!(t2.iter().all(|b| b.first != 1 && b.second != 1));
    // Removing it altogether is the same.
    let t3 = build(&set[..1], 10, 2, Some(&t1)).unwrap();
    assert!(t3.iter().all(|b| b.first == 0 && b.second != 1));
}

#[test]
fn huge_weight_ratio_is_exact() {
    let set = [
        Candidate::new(v4(1), 1, 0),
        Candidate::new(v4(2), MAX_WEIGHT, 1),
    ];
    let c = counts(&first_column(&set, 16, 5).unwrap());
    assert_eq!((c[&0], c[&1]), (1, 65535));
    // Too small a table for the light one's share: it gets none, the rest is the heavy one's.
    let c = counts(&first_column(&set, MIN_TABLE_BITS, 5).unwrap());
    assert_eq!(c.get(&0), None);
    assert_eq!(c[&1], 16);
}

#[test]
fn table_size_limits() {
    let set = equal(16);
    let small = first_column(&set, MIN_TABLE_BITS, 0).unwrap();
    assert!(counts(&small).values().all(|&c| c == 1));
    let big = first_column(&[Candidate::new(v4(1), 1, 0)], MAX_TABLE_BITS, 0).unwrap();
    assert_eq!(big.len(), 1 << MAX_TABLE_BITS);
    for bits in [MIN_TABLE_BITS - 1, MAX_TABLE_BITS + 1] {
        assert_eq!(
            build(&set, bits, 0, None),
            Err(TableError::BadTableBits { bits })
        );
    }
    assert_eq!(
        build(&equal(17), MIN_TABLE_BITS, 0, None),
        Err(TableError::TableTooSmall {
            count: 17,
            buckets: 16
        })
    );
}

#[test]
fn invalid_input_is_refused_with_a_clear_error() {
    let err = |set: &[Candidate]| build(set, 8, 0, None).unwrap_err();

    let e = err(&[Candidate::new(v4(1), MAX_WEIGHT + 1, 0)]);
    assert_eq!(
        e,
        TableError::WeightOutOfRange {
            addr: v4(1),
            weight: MAX_WEIGHT + 1
        }
    );
    assert_eq!(
        e.to_string(),
        "backend 10.0.0.1 has weight 65536, above the maximum 65535"
    );

    let e = err(&[Candidate::new(v4(1), 1, 0), Candidate::new(v4(1), 2, 1)]);
    assert_eq!(e, TableError::DuplicateBackend { addr: v4(1) });
    assert_eq!(e.to_string(), "backend 10.0.0.1 is listed twice");

    // IPv4 and its mapped IPv6 form are the same backend.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
    let e = err(&[Candidate::new(v4(1), 1, 0), Candidate::new(mapped, 1, 1)]);
    assert_eq!(e, TableError::DuplicateBackend { addr: mapped });

    let e = err(&[Candidate::new(v4(1), 1, 4), Candidate::new(v4(2), 1, 4)]);
    assert_eq!(
        e.to_string(),
        "backends 10.0.0.1 and 10.0.0.2 both use slot 4"
    );

    let e = err(&[Candidate::new(v4(1), 1, NO_BACKEND)]);
    assert!(matches!(e, TableError::ReservedSlot { .. }));

    let many = equal(MAX_BACKENDS_PER_SERVICE + 1);
    let e = build(&many, MAX_TABLE_BITS, 0, None).unwrap_err();
    assert_eq!(e, TableError::TooManyBackends { count: 4097 });
    assert_eq!(
        e.to_string(),
        "4097 backends, above the maximum 4096 of one service"
    );

    let e = build(&equal(2), 8, 0, Some(&[Bucket::EMPTY; 100])).unwrap_err();
    assert_eq!(e, TableError::BadPreviousTable { len: 100 });

    // States do not matter to validity.
    let mut down = equal(17);
    down.iter_mut().for_each(|b| b.state = BackendState::Down);
    assert!(matches!(
        build(&down, MIN_TABLE_BITS, 0, None),
        Err(TableError::TableTooSmall { .. })
    ));
}

#[test]
fn ipv6_backends_work() {
    let set: Vec<Candidate> = (0..8u16)
        .map(|i| {
            Candidate::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)),
                1,
                u32::from(i),
            )
        })
        .collect();
    let c = counts(&first_column(&set, 12, 0).unwrap());
    assert_eq!(c.len(), 8);
    assert!(c.values().all(|&c| within_bounds(c, 512.0)), "{c:?}");
}

#[test]
fn first_column_is_pinned() {
    // The same state must give the same table on every node and every version of lb in a
    // fleet; a change here moves flows during a rolling upgrade.
    let t = first_column(&equal(5), 6, 0x5eed).unwrap();
    let expect = [
        3, 0, 0, 3, 1, 4, 0, 2, 0, 2, 0, 2, 4, 3, 2, 3, 4, 0, 1, 1, 2, 4, 2, 3, 3, 1, 0, 1, 1, 3,
        3, 2, 4, 1, 4, 1, 0, 2, 1, 2, 3, 1, 0, 2, 3, 2, 3, 4, 2, 0, 4, 4, 3, 0, 4, 1, 1, 3, 1, 0,
        4, 0, 4, 2,
    ];
    assert_eq!(t, expect);
    let weighted = [
        Candidate::new(v4(7), 1, 0),
        Candidate::new(v4(8), 2, 1),
        Candidate::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            5,
            2,
        ),
    ];
    let t = first_column(&weighted, 4, 1).unwrap();
    assert_eq!(t, [2, 2, 1, 2, 2, 2, 0, 1, 1, 1, 2, 2, 2, 0, 2, 2]);
}

#[test]
fn prefetching_walks_match_plain_ones() {
    let set = equal(3);
    let owners = builder::owners(&set, 7);
    let quotas = builder::quotas(&owners, 1 << 18);
    let (_, hi) = builder::bounds(&owners, &quotas, 1 << 18);
    for caps in [hi, quotas] {
        assert_eq!(
            builder::match_buckets::<true>(&owners, &caps, 18),
            builder::match_buckets::<false>(&owners, &caps, 18)
        );
    }
}

#[test]
fn table_grows_with_many_backends() {
    assert_eq!(default_table_bits(0), 16);
    assert_eq!(default_table_bits(1000), 16);
    assert_eq!(default_table_bits(1024), 16);
    assert_eq!(default_table_bits(1025), 17);
    assert_eq!(default_table_bits(4096), 18);
}

#[test]
fn resizing_keeps_second_hops_where_the_flows_go() {
    let set = equal(6);
    let small = build(&set, 8, 3, None).unwrap();
    let big = build(&set, 10, 3, Some(&small)).unwrap();
    for (i, b) in big.iter().enumerate() {
        let old = small[i % 256].first;
        assert_eq!(b.second, if old == b.first { NO_BACKEND } else { old });
    }
    let back = build(&set, 8, 3, Some(&big)).unwrap();
    assert_eq!(firsts(&back), firsts(&small));
    for (i, b) in back.iter().enumerate() {
        let group: Vec<u32> = (0..4).map(|j| big[i + 256 * j].first).collect();
        if group.iter().any(|&f| f != b.first) {
            assert!(group.contains(&b.second) && b.second != b.first);
        }
    }
}

#[test]
fn plan_counts_moves_per_pair() {
    let mk = |v: &[u32]| -> Vec<Bucket> {
        v.iter()
            .map(|&first| Bucket {
                first,
                second: NO_BACKEND,
            })
            .collect()
    };
    let p = plan(&mk(&[1, 1, 2, 2]), &mk(&[1, 3, 3, 2]));
    assert_eq!(p.buckets, 4);
    assert_eq!(p.changed, 2);
    assert_eq!(
        p.moves,
        vec![
            super::Move {
                from: 1,
                to: 3,
                buckets: 1
            },
            super::Move {
                from: 2,
                to: 3,
                buckets: 1
            }
        ]
    );
    assert_eq!(p.changed_share(), 0.5);
    // Sizes differ: compared as the flow hash indexes them.
    let p = plan(&mk(&[1, 2]), &mk(&[1, 2, 1, 1]));
    assert_eq!((p.buckets, p.changed), (4, 1));
    let p = plan(&[], &mk(&[5, 5]));
    assert_eq!(
        p.moves,
        vec![super::Move {
            from: NO_BACKEND,
            to: 5,
            buckets: 2
        }]
    );
}

#[test]
fn plan_matches_a_real_change() {
    let set = equal(20);
    let before = build(&set, 12, 0, None).unwrap();
    let after = build(&set[..19], 12, 0, Some(&before)).unwrap();
    let p = plan(&before, &after);
    assert_eq!(p.changed, moved(&firsts(&before), &firsts(&after)));
    let from_removed: usize = p
        .moves
        .iter()
        .filter(|m| m.from == 19)
        .map(|m| m.buckets)
        .sum();
    assert_eq!(from_removed, counts(&firsts(&before))[&19]);
    assert!(p.moves.iter().all(|m| m.to != 19));
}

// ---------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
struct Spec {
    backends: Vec<Candidate>,
    bits: u32,
    seed: u32,
}

/// Backends with distinct addresses (IPv4 and IPv6) and slots, random weights and states.
fn backends(max: usize, weighted: bool, states: bool) -> impl Strategy<Value = Vec<Candidate>> {
    let one = (
        any::<bool>(),
        any::<u128>(),
        if weighted { 0..=MAX_WEIGHT } else { 1..=1 },
        if states { 0..6u8 } else { 0..1u8 },
    );
    prop::collection::vec(one, 0..=max).prop_map(|raw| {
        let mut seen = BTreeSet::new();
        raw.into_iter()
            .filter_map(|(is_v4, a, weight, st)| {
                let addr = if is_v4 {
                    IpAddr::V4(Ipv4Addr::from(a as u32))
                } else {
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                seen.insert(lb_common::addr::to_bytes(addr))
                    .then_some((addr, weight, st))
            })
            .enumerate()
            .map(|(i, (addr, weight, st))| Candidate {
                addr,
                weight,
                state: match st {
                    0..=3 => BackendState::Active,
                    4 => BackendState::Draining,
                    _ => BackendState::Down,
                },
                // Slots unrelated to order or address.
                slot: (i as u32).wrapping_mul(2_654_435_761) % 100_000,
            })
            .collect()
    })
}

fn spec(
    max: usize,
    bits: std::ops::RangeInclusive<u32>,
    weighted: bool,
) -> impl Strategy<Value = Spec> {
    (backends(max, weighted, true), bits, any::<u32>()).prop_map(|(backends, bits, seed)| {
        // Room for every backend.
        let bits = bits.max(backends.len().next_power_of_two().trailing_zeros());
        Spec {
            backends,
            bits,
            seed,
        }
    })
}

/// Whether a backend holding `got` buckets is within the builder's bounds around its exact
/// share `want`: 3% below to 1% above, widened to `want` rounded.
fn within_bounds(got: usize, want: f64) -> bool {
    let got = got as f64;
    let lo = want.floor().min((want * 0.97 - 1e-9).ceil());
    let hi = want.ceil().max((want * 1.01 + 1e-9).floor());
    lo <= got && got <= hi
}

fn exact_share(set: &[Candidate], b: &Candidate, size: usize) -> f64 {
    let total: u64 = set
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .map(|b| u64::from(b.weight))
        .sum();
    size as f64 * f64::from(b.weight) / total as f64
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Every active backend gets its weight's share, 3% below to 1% above; nothing else owns
    /// a bucket.
    #[test]
    fn shares_are_within_bounds(s in spec(60, 6..=12, true)) {
        let size = 1usize << s.bits;
        let first = first_column(&s.backends, s.bits, s.seed).unwrap();
        let c = counts(&first);
        let active: Vec<&Candidate> =
            s.backends.iter().filter(|b| b.state == BackendState::Active && b.weight > 0).collect();
        if active.is_empty() {
            prop_assert_eq!(c.get(&NO_BACKEND), Some(&size));
        }
        for b in &s.backends {
            let got = c.get(&b.slot).copied().unwrap_or(0) as f64;
            if active.iter().any(|a| a.slot == b.slot) {
                let want = exact_share(&s.backends, b, size);
                prop_assert!(within_bounds(got as usize, want), "{} got {got} want {want}", b.addr);
            } else {
                prop_assert_eq!(got, 0.0);
            }
        }
    }

    /// Input order and slot numbers change nothing but the slot values.
    #[test]
    fn order_and_slots_do_not_matter(s in spec(40, 4..=11, true), rot in any::<usize>()) {
        let a = first_column(&s.backends, s.bits, s.seed).unwrap();
        let mut other = s.backends.clone();
        other.reverse();
        if !other.is_empty() {
            let r = rot % other.len();
            other.rotate_left(r);
        }
        for b in &mut other {
            b.slot += 7;
        }
        let b = first_column(&other, s.bits, s.seed).unwrap();
        for (x, y) in a.iter().zip(&b) {
            prop_assert_eq!(if *x == NO_BACKEND { NO_BACKEND } else { x + 7 }, *y);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Equal weights: max/mean within 1.01 at up to 164 backends and 2^14 buckets; beyond,
    /// the rounding of 100 buckets or fewer each.
    #[test]
    fn equal_weights_balance(n in 1u32..=300, seed in any::<u32>()) {
        let first = first_column(&equal(n), 14, seed).unwrap();
        let c = counts(&first);
        let mean = (1u32 << 14) as f64 / f64::from(n);
        let max = *c.values().max().unwrap() as f64;
        prop_assert!(c.values().all(|&c| within_bounds(c, mean)));
        prop_assert!(max <= mean.ceil().max((mean * 1.01).floor()));
        prop_assert!(n > 164 || max / mean <= 1.01);
    }

}

proptest! {
    // A few builds of 2^14 buckets per case.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Adding, removing or reweighting one of 5..40 equal backends moves at most 1.4x the
    /// optimum at 2^14 buckets, and no more than Maglev give or take 5% of the optimum (8%
    /// where the change crosses into or out of bounded shares, between 4 and 5 backends).
    #[test]
    fn one_change_moves_little(n in 5u32..=40, seed in any::<u32>(), which in any::<u32>(), kind in 0..3u8) {
        let bits = 14;
        let before = equal(n);
        let mut after = before.clone();
        let i = (which % n) as usize;
        match kind {
            0 => after.push(Candidate::new(v4(1000), 1, 1000)),
            1 => { after.remove(i); }
            _ => after[i].weight = 3,
        }
        let opt = optimum(&before, &after) * f64::from(1u32 << bits);
        let ours = moved(&first_column(&before, bits, seed).unwrap(), &first_column(&after, bits, seed).unwrap()) as f64;
        let mag = moved(&maglev::first_column(&before, bits, seed).unwrap(), &maglev::first_column(&after, bits, seed).unwrap()) as f64;
        prop_assert!(ours <= 1.4 * opt, "moved {ours}, optimum {opt}");
        // With few backends both are within a few percent of the optimum and either may win
        // by chance: seen up to 3.3% (reweighting one of 12).
        let active = |set: &[Candidate]| set.iter().filter(|b| b.weight > 0).count();
        let crosses = (active(&before) <= 4) != (active(&after) <= 4);
        let margin = if crosses { 0.08 } else { 0.05 };
        prop_assert!(ours <= mag + margin * opt, "moved {ours}, maglev {mag}, optimum {opt}");
    }

    /// Convergence: two nodes that saw different histories agree on `first` once they see the
    /// same state, and their second hops hold the invariants whatever the history.
    #[test]
    fn histories_converge(
        end in backends(24, true, true),
        flaps_b in prop::collection::vec((any::<u16>(), 0..5u8, 0..=MAX_WEIGHT), 1..6),
        flaps_c in prop::collection::vec((any::<u16>(), 0..5u8, 0..=MAX_WEIGHT), 1..6),
        bits in 6u32..=10,
        seed in any::<u32>(),
    ) {
        // Node A builds once from the final state; nodes B and C each go through their own
        // changes (flaps, drains, reweights, removals, additions) and come back to it.
        let a = build(&end, bits, seed, None).unwrap();
        let b = through_history(&end, &flaps_b, bits, seed)?;
        let c = through_history(&end, &flaps_c, bits, seed)?;
        prop_assert_eq!(firsts(&a), firsts(&b));
        prop_assert_eq!(firsts(&a), firsts(&c));
    }
}

type Flap = (u16, u8, u32);

/// Applies `flaps` to `end`, one rebuild per change, then rebuilds for `end` again; checks the
/// second-hop rules at every step and returns the last table.
fn through_history(
    end: &[Candidate],
    flaps: &[Flap],
    bits: u32,
    seed: u32,
) -> Result<Vec<Bucket>, TestCaseError> {
    let mut state = end.to_vec();
    let mut table = build(&state, bits, seed, None).unwrap();
    for &(who, what, weight) in flaps {
        let i = usize::from(who) % state.len().max(1);
        match what {
            _ if state.is_empty() && what < 4 => continue,
            0 => state[i].state = BackendState::Down,
            1 => state[i].state = BackendState::Draining,
            2 => state[i].weight = weight,
            3 => {
                state.remove(i);
            }
            _ => {
                let new = Candidate::new(
                    v4(5000 + u32::from(who)),
                    weight.max(1),
                    200_000 + u32::from(who),
                );
                if !state
                    .iter()
                    .any(|b| b.addr == new.addr || b.slot == new.slot)
                {
                    state.push(new);
                }
            }
        }
        let next = build(&state, bits, seed, Some(&table)).unwrap();
        check_second_hops(&table, &next, &state)?;
        table = next;
    }
    let last = build(end, bits, seed, Some(&table)).unwrap();
    check_second_hops(&table, &last, end)?;
    Ok(last)
}

/// The second-hop rules for a table `new` built for `state` after `old`.
fn check_second_hops(
    old: &[Bucket],
    new: &[Bucket],
    state: &[Candidate],
) -> Result<(), TestCaseError> {
    let live: BTreeSet<u32> = state
        .iter()
        .filter(|b| b.state != BackendState::Down)
        .map(|b| b.slot)
        .collect();
    let owners: BTreeSet<u32> = state
        .iter()
        .filter(|b| b.state == BackendState::Active && b.weight > 0)
        .map(|b| b.slot)
        .collect();
    for (o, n) in old.iter().zip(new) {
        prop_assert!(n.first == NO_BACKEND || owners.contains(&n.first));
        prop_assert!(n.second == NO_BACKEND || live.contains(&n.second));
        prop_assert!(n.second != n.first || n.first == NO_BACKEND && n.second == NO_BACKEND);
        if n.first != o.first && live.contains(&o.first) {
            prop_assert_eq!(n.second, o.first);
        } else if n.first == o.first && live.contains(&o.second) && o.second != n.first {
            prop_assert_eq!(n.second, o.second);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The promised figures, at full size. Release only: a debug build takes minutes.

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: cargo test --release")]
fn figures_at_full_size() {
    for (n, bound) in [
        (10, 1.4),
        (100, 1.4),
        (1000, f64::INFINITY),
        (4096, f64::INFINITY),
    ] {
        let f = report::figures(n, 16).unwrap();
        assert!(f.max_over_mean <= 1.01, "{n}: {f:?}");
        for (ours, maglev) in f.ratios().iter().zip(f.maglev_ratios()) {
            assert!(*ours <= bound, "{n}: {f:?}");
            assert!(*ours <= maglev + 0.03, "{n}: {f:?}");
        }
    }
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: cargo test --release")]
fn equal_weights_balance_at_full_size() {
    for n in [10, 100, 500, 1000] {
        for seed in 0..4 {
            let c = counts(&first_column(&equal(n), 16, seed).unwrap());
            let mean = 65536.0 / f64::from(n);
            assert!(*c.values().max().unwrap() as f64 / mean <= 1.01);
        }
    }
}

/// The stable matching by its definition: all (bucket, owner) pairs in the global order of
/// claims, each taken when the bucket is free and the owner below its cap.
fn greedy(owners: &[builder::Owner], caps: &[u32], bits: u32) -> Vec<u32> {
    use super::score::{score, weight_factor, Walk};
    let size = 1u32 << bits;
    let mut pairs: Vec<(u64, u32, u32)> = Vec::new();
    for (i, o) in owners.iter().enumerate() {
        let (w, f) = (Walk::new(o.key, bits), weight_factor(o.weight));
        for p in 0..size {
            pairs.push((score(p, bits, f) & !0xfff | i as u64, w.bucket(p), i as u32));
        }
    }
    pairs.sort_unstable();
    let mut out = vec![NO_BACKEND; size as usize];
    let mut count = vec![0u32; owners.len()];
    for (_, k, i) in pairs {
        if out[k as usize] == NO_BACKEND && count[i as usize] < caps[i as usize] {
            out[k as usize] = i;
            count[i as usize] += 1;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The walks find the matching its definition gives, under exact quotas and under caps.
    #[test]
    fn walks_find_the_stable_matching(s in spec(30, 4..=10, true)) {
        let owners = builder::owners(&s.backends, s.seed);
        prop_assume!(!owners.is_empty());
        let quotas = builder::quotas(&owners, 1 << s.bits);
        let (_, hi) = builder::bounds(&owners, &quotas, 1 << s.bits);
        for caps in [hi, quotas] {
            prop_assert_eq!(
                builder::match_buckets::<false>(&owners, &caps, s.bits),
                greedy(&owners, &caps, s.bits)
            );
        }
    }
}

/// At a few backends, a change mostly moves only the buckets it must: few pass between two
/// backends the change left alone, so few are shifted twice by successive changes (which
/// strands the connections of their first owner). Exact quotas shift dozens each time. Chance
/// still shifts some where a backend reaches its bound (2 of these 24 changes, 18 buckets).
#[test]
fn few_backends_move_only_what_a_change_must() {
    let bits = 16;
    let exact = |set: &[Candidate], seed| {
        let owners = builder::owners(set, seed);
        let quotas = builder::quotas(&owners, 1 << bits);
        builder::match_buckets::<false>(&owners, &quotas, bits)
            .into_iter()
            .map(|i| owners[i as usize].slot)
            .collect::<Vec<u32>>()
    };
    let (mut ours_shifted, mut exact_shifted, mut clean) = (0, 0, 0);
    for seed in 0..8 {
        let three = equal(3);
        let mut four = three.clone();
        four.push(Candidate::new(v4(3), 1, 3));
        let mut heavier = four.clone();
        heavier[3].weight = 2;
        let mut drained = heavier.clone();
        drained[1].weight = 0;
        // (before, after, the backend the change is about)
        for (before, after, about) in [
            (&three, &four, 3),
            (&four, &heavier, 3),
            (&heavier, &drained, 1),
        ] {
            let shifted = |col: &dyn Fn(&[Candidate], u32) -> Vec<u32>| {
                let (a, b) = (col(before, seed), col(after, seed));
                a.iter()
                    .zip(&b)
                    .filter(|(x, y)| x != y && **x != about && **y != about)
                    .count()
            };
            let ours = shifted(&|set, seed| first_column(set, bits, seed).unwrap());
            ours_shifted += ours;
            clean += usize::from(ours == 0);
            exact_shifted += shifted(&exact);
        }
    }
    assert!(clean >= 20, "{clean} of 24 changes shifted nothing");
    assert!(
        ours_shifted * 20 <= exact_shifted,
        "shifted {ours_shifted}, exact quotas {exact_shifted}"
    );
}

/// The consequence for connections: through the churn test's changes (add a backend at half
/// weight, raise it, drain another, remove it), buckets whose first owner is neither hop at
/// the end, i.e. whose connections there would break. Measured over 40 seeds: 0.4 per run
/// (1.4 at 2^15 buckets, where exact shares strand 20.7).
#[test]
fn successive_changes_strand_few_buckets() {
    let bits = 16;
    let b = |i: u32, weight: u32| Candidate::new(v4(i), weight, i);
    let mut drained = b(1, 0);
    drained.state = BackendState::Draining;
    let states = [
        vec![b(0, 100), b(1, 100), b(2, 100)],
        vec![b(0, 100), b(1, 100), b(2, 100), b(3, 50)],
        vec![b(0, 100), b(1, 100), b(2, 100), b(3, 100)],
        vec![b(0, 100), drained, b(2, 100), b(3, 100)],
        vec![b(0, 100), b(2, 100), b(3, 100)],
    ];
    let seeds = 16;
    let mut stranded = 0;
    for seed in 0..seeds {
        let start = build(&states[0], bits, seed, None).unwrap();
        let mut t = start.clone();
        for set in &states[1..] {
            t = build(set, bits, seed, Some(&t)).unwrap();
        }
        // b1's connections closed before its removal.
        stranded += start
            .iter()
            .zip(&t)
            .filter(|(s, e)| s.first != 1 && e.first != s.first && e.second != s.first)
            .count();
    }
    println!("{stranded} buckets stranded in {seeds} runs of 4 changes");
    assert!(
        stranded <= seeds as usize,
        "{stranded} stranded in {seeds} runs"
    );
}
