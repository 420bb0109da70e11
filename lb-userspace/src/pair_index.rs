//! Userspace's copy of the pair index (`lb_common::pair_index`) and the slot writes that
//! open and close (service, backend) pairs, in the order the service index uses, so that
//! packets being counted meanwhile never see a slot half written.

use lb_common::{
    maps::ServiceBackendKey,
    pair_index::{self, PairSlot, Probe, SLOTS},
    service_index::{EMPTY, REMOVED, VALID},
};

/// One slot write, to be applied in order.
pub type Write = (u32, PairSlot);

/// The index as written to the kernel.
pub struct PairIndex {
    slots: Vec<PairSlot>,
}

impl PairIndex {
    /// The index as read back from the kernel's array (`SLOTS` slots).
    pub fn new(slots: Vec<PairSlot>) -> Self {
        assert_eq!(slots.len(), SLOTS as usize, "the index has {SLOTS} slots");
        PairIndex { slots }
    }

    /// The slot whose `PAIR_STATS` entry counts `key`, if the index holds it.
    pub fn slot_of(&self, key: &ServiceBackendKey) -> Option<u32> {
        match pair_index::probe(key, |i| self.slots.get(i as usize)) {
            Probe::Slot(i) => Some(i),
            Probe::Absent | Probe::Unindexed => None,
        }
    }

    /// The slot for `key` and the writes that make packets find it there: the key
    /// written while the slot is not live, then the slot made live. `None` when the key's
    /// window has no free slot (the pair is counted in `SERVICE_BACKEND_STATS`). The
    /// caller zeroes the slot's counters before it applies the writes.
    pub fn open(&mut self, key: &ServiceBackendKey) -> Option<(u32, Vec<Write>)> {
        if let Some(i) = self.slot_of(key) {
            return Some((i, Vec::new()));
        }
        let free = self.window_until_empty(key).find(|&i| !self.live(i))?;
        let hidden = PairSlot {
            key: *key,
            state: self.slots[free as usize].state,
        };
        let live = PairSlot {
            state: u32::from(VALID),
            ..hidden
        };
        let writes = vec![(free, hidden), (free, live)];
        self.apply(&writes);
        Some((free, writes))
    }

    /// The write that takes `key` out of the index, if it is there.
    pub fn close(&mut self, key: &ServiceBackendKey) -> Vec<Write> {
        let writes: Vec<Write> = self
            .slot_of(key)
            .map(|i| {
                let removed = PairSlot {
                    state: u32::from(REMOVED),
                    ..self.slots[i as usize]
                };
                (i, removed)
            })
            .into_iter()
            .collect();
        self.apply(&writes);
        writes
    }

    /// Every pair in the index, with its slot.
    pub fn pairs(&self) -> impl Iterator<Item = (ServiceBackendKey, u32)> + '_ {
        (0..SLOTS)
            .filter(|&i| self.live(i))
            .map(|i| (self.slots[i as usize].key, i))
    }

    fn live(&self, i: u32) -> bool {
        self.slots[i as usize].state == u32::from(VALID)
    }

    /// The key's window up to and with its first empty slot: where a search can find it.
    fn window_until_empty(&self, key: &ServiceBackendKey) -> impl Iterator<Item = u32> + '_ {
        let mut ended = false;
        pair_index::window(key).take_while(move |&i| {
            let go = !ended;
            ended = self.slots[i as usize].state == u32::from(EMPTY);
            go
        })
    }

    fn apply(&mut self, writes: &[Write]) {
        for (i, s) in writes {
            self.slots[*i as usize] = *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: u32, backend: u32) -> ServiceBackendKey {
        ServiceBackendKey { service, backend }
    }

    fn index() -> PairIndex {
        PairIndex::new(vec![PairSlot::EMPTY; SLOTS as usize])
    }

    #[test]
    fn an_opened_pair_is_found_at_its_slot_until_closed() {
        let mut x = index();
        let (slot, writes) = x.open(&key(3, 7)).expect("room");
        assert_eq!(writes.len(), 2);
        assert_eq!(
            writes[0].1.state,
            u32::from(EMPTY),
            "written while not live"
        );
        assert_eq!(x.slot_of(&key(3, 7)), Some(slot));
        assert_eq!(x.open(&key(3, 7)), Some((slot, Vec::new())), "opened once");
        assert_eq!(x.pairs().collect::<Vec<_>>(), vec![(key(3, 7), slot)]);
        let closed = x.close(&key(3, 7));
        assert_eq!(closed.len(), 1);
        assert_eq!(x.slot_of(&key(3, 7)), None);
        assert!(x.close(&key(3, 7)).is_empty());
    }

    #[test]
    fn a_full_window_leaves_the_pair_to_the_hash_map() {
        let mut x = index();
        let target = key(1, 1);
        // Fill every slot of the target's window with other live pairs.
        for i in pair_index::window(&target) {
            x.slots[i as usize] = PairSlot {
                key: key(1_000_000 + i, 0),
                state: u32::from(VALID),
            };
        }
        assert_eq!(x.open(&target), None);
        assert_eq!(x.slot_of(&target), None);
    }

    #[test]
    fn a_pair_past_a_removed_slot_is_still_found() {
        let mut x = index();
        let a = key(5, 1);
        let (first, _) = x.open(&a).expect("room");
        // Another pair with the same home lands after it; removing the first must not
        // hide it.
        let b = (0..u32::MAX)
            .map(|s| key(s, 2))
            .find(|k| pair_index::window(k).next() == pair_index::window(&a).next())
            .expect("a pair with the same home");
        let (second, _) = x.open(&b).expect("room");
        assert_ne!(first, second);
        x.close(&a);
        assert_eq!(x.slot_of(&b), Some(second));
        // The removed slot is reused for the next pair of that window.
        assert_eq!(x.open(&a).map(|(s, _)| s), Some(first));
    }
}
