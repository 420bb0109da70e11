//! Userspace's copy of an index in front of a hash map (`lb_common::open_index`: the
//! service index, the next-hop index) and the slot writes that keep the kernel's array
//! equal to the hash map, in an order that packets being forwarded meanwhile never see
//! half done.

use std::collections::BTreeMap;

use lb_common::open_index::{self, Probe, Slot, EMPTY, REMOVED, VALID};

/// One slot write, to be applied in order.
pub type Write<S> = (u32, S);

/// An index as written to the kernel.
pub struct OpenIndex<S> {
    slots: Vec<S>,
}

impl<S: Slot> OpenIndex<S> {
    /// The index as read back from the kernel's array (`S::SLOTS` slots).
    pub fn new(slots: Vec<S>) -> Self {
        assert_eq!(
            slots.len(),
            S::SLOTS as usize,
            "the index has {} slots",
            S::SLOTS
        );
        OpenIndex { slots }
    }

    /// What a packet's search finds for `key`.
    pub fn probe(&self, key: &S::Key) -> Probe<'_, S::Value> {
        open_index::probe(key, |i| self.slots.get(i as usize))
    }

    /// The slot holding `key`, if the index holds it.
    fn position(&self, key: &S::Key) -> Option<u32> {
        self.window_until_empty(key).find(|&i| {
            let s = &self.slots[i as usize];
            s.state() == VALID && s.key() == key
        })
    }

    /// The writes that make searches for `key` find `value`: a new slot written while it
    /// is not live, then made live, then the old slot removed. When the key's window has
    /// no free slot, searches go to the hash map (which the caller has already updated)
    /// and only the old slot is removed. Returns whether the key is indexed.
    pub fn set(&mut self, key: &S::Key, value: &S::Value) -> (Vec<Write<S>>, bool) {
        if self.probe(key) == Probe::Found(value) {
            return (Vec::new(), true);
        }
        let old = self.position(key);
        let free = self
            .window_until_empty(key)
            .find(|&i| self.slots[i as usize].state() != VALID);
        let mut writes = Vec::new();
        if let Some(n) = free {
            writes.push((n, S::new(*key, *value, self.slots[n as usize].state())));
            writes.push((n, S::new(*key, *value, VALID)));
        }
        if let Some(o) = old {
            writes.push((o, self.removed(o)));
        }
        self.apply(&writes);
        (writes, free.is_some())
    }

    /// The writes that take `key` out of the index (the caller removes it from the hash
    /// map afterwards).
    pub fn remove(&mut self, key: &S::Key) -> Vec<Write<S>> {
        let writes: Vec<Write<S>> = self
            .position(key)
            .map(|o| (o, self.removed(o)))
            .into_iter()
            .collect();
        self.apply(&writes);
        writes
    }

    /// The writes that make the index agree with `all` (the whole hash map), for an index
    /// left by an earlier version or another run. Returns the writes and the keys that are
    /// not indexed.
    pub fn reconcile(&mut self, all: &BTreeMap<S::Key, S::Value>) -> (Vec<Write<S>>, Vec<S::Key>)
    where
        S::Key: Ord,
    {
        let mut writes = Vec::new();
        for i in 0..S::SLOTS {
            let s = self.slots[i as usize];
            let stale = s.state() == VALID && all.get(s.key()) != Some(s.value());
            if stale {
                let w = (i, self.removed(i));
                self.apply(std::slice::from_ref(&w));
                writes.push(w);
            }
        }
        let mut unindexed = Vec::new();
        for (k, v) in all {
            let (w, indexed) = self.set(k, v);
            writes.extend(w);
            if !indexed {
                unindexed.push(*k);
            }
        }
        (writes, unindexed)
    }

    fn removed(&self, i: u32) -> S {
        let s = &self.slots[i as usize];
        S::new(*s.key(), *s.value(), REMOVED)
    }

    fn apply(&mut self, writes: &[Write<S>]) {
        for (i, s) in writes {
            self.slots[*i as usize] = *s;
        }
    }

    /// The key's window up to and with its first empty slot: where a search can find it.
    fn window_until_empty<'a>(&'a self, key: &S::Key) -> impl Iterator<Item = u32> + 'a {
        let mut ended = false;
        open_index::window::<S>(key).take_while(move |&i| {
            let go = !ended;
            ended = self.slots[i as usize].state() == EMPTY;
            go
        })
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        addr::v4_mapped,
        maps::{ServiceKey, ServiceValue},
        service_index::{self, ServiceSlot, SLOTS},
    };
    use proptest::prelude::*;

    use super::*;

    type ServiceIndex = OpenIndex<ServiceSlot>;
    type Write = super::Write<ServiceSlot>;

    fn key(vip: u16, port: u16) -> ServiceKey {
        ServiceKey {
            addr: v4_mapped([10, 100, (vip >> 8) as u8, vip as u8]),
            port_be: port.to_be(),
            proto: 6,
            _pad: 0,
        }
    }

    fn value(id: u32) -> ServiceValue {
        ServiceValue {
            id,
            table_offset: id * 64,
            table_bits: 6,
            flags: 0,
        }
    }

    fn empty() -> ServiceIndex {
        ServiceIndex::new(vec![ServiceSlot::EMPTY; SLOTS as usize])
    }

    /// Keys sharing one home slot, found by search.
    fn colliding(n: usize) -> Vec<ServiceKey> {
        let h = service_index::home(&key(0, 1));
        (0..u16::MAX)
            .flat_map(|vip| (1..64).map(move |p| key(vip, p)))
            .filter(|k| service_index::home(k) == h)
            .take(n)
            .collect()
    }

    /// Every write's slot, as a packet searching `key` during the writes would see it
    /// after each one: the old value, the new one or (before the first insert) none.
    fn answers_during(
        index: &ServiceIndex,
        writes: &[Write],
        key: &ServiceKey,
    ) -> Vec<Option<u32>> {
        let mut slots = index.slots.clone();
        let mut seen = Vec::new();
        for (i, s) in writes {
            slots[*i as usize] = *s;
            let copy = ServiceIndex {
                slots: slots.clone(),
            };
            seen.push(match copy.probe(key) {
                Probe::Found(v) => Some(v.id),
                Probe::Absent => None,
                Probe::Unindexed => Some(u32::MAX),
            });
        }
        seen
    }

    #[test]
    fn a_moved_service_is_found_throughout_with_the_old_or_new_value() {
        let mut index = empty();
        let k = key(1, 80);
        index.set(&k, &value(1));
        let before = ServiceIndex {
            slots: index.slots.clone(),
        };
        let (writes, indexed) = index.set(&k, &value(2));
        assert!(indexed);
        assert_eq!(writes.len(), 3);
        for seen in answers_during(&before, &writes, &k) {
            assert!(seen == Some(1) || seen == Some(2), "{seen:?}");
        }
        assert_eq!(index.probe(&k), Probe::Found(&value(2)));
        // Each write to a live slot changes its state alone.
        for (i, s) in &writes {
            let was = before.slots[*i as usize];
            if was.state == VALID {
                assert_eq!(ServiceSlot { state: VALID, ..*s }, was);
            }
        }
    }

    #[test]
    fn a_full_window_leaves_the_key_to_the_hash_map() {
        let keys = colliding(service_index::PROBES as usize + 1);
        let mut index = empty();
        for (n, k) in keys.iter().enumerate() {
            let (_, indexed) = index.set(k, &value(n as u32));
            assert_eq!(indexed, n < service_index::PROBES as usize);
        }
        let last = keys.last().unwrap();
        assert_eq!(index.probe(last), Probe::Unindexed);
        // A removal frees a slot; the next write of the key indexes it again.
        index.remove(&keys[0]);
        assert_eq!(index.probe(&keys[0]), Probe::Unindexed);
        let (_, indexed) = index.set(last, &value(99));
        assert!(indexed);
        assert_eq!(index.probe(last), Probe::Found(&value(99)));
    }

    #[test]
    fn reconcile_drops_stale_slots_and_adds_missing_ones() {
        let mut index = empty();
        index.set(&key(1, 80), &value(1));
        index.set(&key(2, 80), &value(2));
        let want = BTreeMap::from([(key(2, 80), value(3)), (key(3, 443), value(4))]);
        let (_, unindexed) = index.reconcile(&want);
        assert!(unindexed.is_empty());
        assert_eq!(index.probe(&key(1, 80)), Probe::Absent);
        assert_eq!(index.probe(&key(2, 80)), Probe::Found(&value(3)));
        assert_eq!(index.probe(&key(3, 443)), Probe::Found(&value(4)));
        let (writes, _) = index.reconcile(&want);
        assert!(writes.is_empty(), "already in agreement");
    }

    proptest! {
        /// Any sequence of sets and removals: every key answers as a map would, or is
        /// left to the hash map.
        #[test]
        fn the_index_agrees_with_a_map(ops in prop::collection::vec((0u16..40, 0u16..3, 0u32..5, any::<bool>()), 1..300)) {
            let mut index = empty();
            let mut map = BTreeMap::new();
            for (vip, port, v, remove) in ops {
                let k = key(vip % 8, 80 + port);
                if remove {
                    index.remove(&k);
                    map.remove(&k);
                } else {
                    index.set(&k, &value(v));
                    map.insert(k, value(v));
                }
            }
            for vip in 0..8 {
                for port in 0..3 {
                    let k = key(vip, 80 + port);
                    match (index.probe(&k), map.get(&k)) {
                        (Probe::Found(a), Some(b)) => prop_assert_eq!(a, b),
                        (Probe::Absent, None) | (Probe::Unindexed, _) => {}
                        (got, want) => prop_assert!(false, "{:?} for {:?}", got, want),
                    }
                }
            }
        }
    }
}
