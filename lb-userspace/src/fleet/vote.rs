//! Shared health: every node publishes its own checks' verdicts (its view), and every node
//! derives the same effective state from all views by one rule, so tables stay identical
//! while views differ.
//!
//! The rule: a backend is down when more than half of the nodes that have a view of it
//! see it down. A node's view counts while its lease lives (the store deletes it after);
//! a node that checks no such backend has no vote on it. A tie keeps the backend up: one
//! node's false alarm in a pair must not break the backend's connections everywhere.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One node's verdict on one backend of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Up,
    Down,
}

/// A node's view: its verdict per (service, backend address), keyed as `"web/10.0.0.2"`.
pub type View = BTreeMap<String, Verdict>;

/// The effective verdict of every backend some node has a view of, from the live nodes'
/// views (by node name). The result does not depend on the order of anything.
pub fn effective(views: &BTreeMap<String, View>) -> BTreeMap<String, Verdict> {
    let mut tally: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for view in views.values() {
        for (backend, v) in view {
            let t = tally.entry(backend).or_default();
            match v {
                Verdict::Up => t.0 += 1,
                Verdict::Down => t.1 += 1,
            }
        }
    }
    tally
        .into_iter()
        .map(|(b, (up, down))| {
            let v = if down > up {
                Verdict::Down
            } else {
                Verdict::Up
            };
            (b.to_owned(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn views(v: &[(&str, &[(&str, Verdict)])]) -> BTreeMap<String, View> {
        v.iter()
            .map(|(node, view)| {
                let view = view.iter().map(|(b, v)| (b.to_string(), *v)).collect();
                (node.to_string(), view)
            })
            .collect()
    }

    use Verdict::{Down, Up};

    #[test]
    fn one_nodes_false_alarm_does_not_take_a_backend_down() {
        let e = effective(&views(&[
            ("lb0", &[("web/b0", Down), ("web/b1", Up)]),
            ("lb1", &[("web/b0", Up), ("web/b1", Up)]),
            ("lb2", &[("web/b0", Up), ("web/b1", Down)]),
        ]));
        assert_eq!(e["web/b0"], Up);
        assert_eq!(e["web/b1"], Up);
    }

    #[test]
    fn a_majority_takes_it_down_and_a_tie_keeps_it_up() {
        let e = effective(&views(&[
            ("lb0", &[("web/b0", Down), ("web/b1", Down)]),
            ("lb1", &[("web/b0", Down), ("web/b1", Up)]),
            ("lb2", &[("web/b0", Up)]),
        ]));
        assert_eq!(e["web/b0"], Down, "two of three");
        assert_eq!(e["web/b1"], Up, "one against one: lb2 has no vote on b1");
    }

    #[test]
    fn a_node_whose_lease_ended_no_longer_votes() {
        let mut v = views(&[
            ("lb0", &[("web/b0", Down)]),
            ("lb1", &[("web/b0", Down)]),
            ("lb2", &[("web/b0", Up)]),
        ]);
        assert_eq!(effective(&v)["web/b0"], Down);
        v.remove("lb1");
        assert_eq!(effective(&v)["web/b0"], Up);
    }

    proptest! {
        /// Every node computes the same result from the same views, whatever order it
        /// learnt them in, and a backend everyone sees down is down.
        #[test]
        fn same_views_same_result(
            raw in prop::collection::vec(
                prop::collection::vec((0u8..6, any::<bool>()), 0..6), 1..7),
            rotate in 0usize..7,
        ) {
            let build = |order: &[usize]| -> BTreeMap<String, View> {
                order.iter().map(|&i| {
                    let view = raw[i].iter()
                        .map(|(b, up)| (format!("s/b{b}"), if *up { Up } else { Down }))
                        .collect();
                    (format!("lb{i}"), view)
                }).collect()
            };
            let mut order: Vec<usize> = (0..raw.len()).collect();
            let a = effective(&build(&order));
            order.rotate_left(rotate % raw.len());
            order.reverse();
            prop_assert_eq!(&a, &effective(&build(&order)));
            let all = build(&order);
            for (b, v) in &a {
                let votes: Vec<Verdict> = all.values().filter_map(|w| w.get(b).copied()).collect();
                if votes.iter().all(|x| *x == Down) {
                    prop_assert_eq!(*v, Down);
                }
                if votes.iter().all(|x| *x == Up) {
                    prop_assert_eq!(*v, Up);
                }
            }
        }
    }
}
