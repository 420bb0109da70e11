//! Keeps the data plane's maps true to the desired services: backend slots, one region
//! of the bucket map per service (two halves: the live table and the next one), tables
//! built by `crate::table`, and the atomic flip from one half to the other.
//!
//! Everything it needs to continue after a restart is read back from the (pinned) maps,
//! so a new agent takes over the running tables and their second hops.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    addr,
    maps::{Bucket, ServiceBackendKey, ServiceKey, ServiceValue, NO_BACKEND},
};

use crate::{
    api::{Move, PlanSummary, TableShare, TableSummary},
    config::ServiceConfig,
    dataplane::{Dataplane, DataplaneError},
    table,
};

/// The live half of a service's region is the upper one.
const SERVICE_UPPER_HALF: u32 = 1;

/// A table in backend addresses: (first, second) per bucket, `None` for an empty slot.
type Owners = Vec<(Option<IpAddr>, Option<IpAddr>)>;

/// A service's backend as the table builder sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub address: IpAddr,
    pub weight: u32,
    pub state: table::BackendState,
}

/// A service as it should be in the data plane.
#[derive(Clone, Debug)]
pub struct Desired {
    pub name: String,
    pub key: ServiceKey,
    pub bits: u32,
    pub members: Vec<Member>,
}

/// What a service has in the maps now.
#[derive(Clone, Debug)]
struct Live {
    id: u32,
    /// First bucket of the service's region (two halves of `1 << bits`).
    base: u32,
    bits: u32,
    upper: bool,
    /// The live table.
    table: Owners,
    /// The bytes of the live half, and of the other half when known: a flip then
    /// writes only the buckets that differ from what that half already holds.
    live_raw: Vec<Bucket>,
    spare_raw: Option<Vec<Bucket>>,
    /// `digest(&table)`, kept to answer status calls cheaply.
    digest: u64,
    /// Buckets whose first hop changed in rebuilds since the agent started.
    moved: u64,
}

impl Live {
    fn size(&self) -> u32 {
        1 << self.bits
    }
    fn live_offset(&self) -> u32 {
        self.base + if self.upper { self.size() } else { 0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("service {service}")]
    Table {
        service: String,
        #[source]
        source: table::TableError,
    },
    #[error("no room in the bucket map for service {service} ({buckets} buckets twice)")]
    NoRoom { service: String, buckets: u32 },
    #[error("all {max} backend slots are in use")]
    NoSlot { max: u32 },
    #[error("all {max} service ids are in use")]
    NoServiceId { max: u32 },
}

pub struct Programmer {
    dp: Dataplane,
    seed: u32,
    bucket_slots: u32,
    slots: BTreeMap<IpAddr, u32>,
    live: BTreeMap<ServiceKey, Live>,
    /// (service, backend) pairs with counters in `SERVICE_BACKEND_STATS`.
    pairs: BTreeSet<ServiceBackendKey>,
    /// How many tables were written since the start.
    pub rebuilds: u64,
}

impl Programmer {
    /// Takes over whatever the maps hold (nothing, on a fresh start).
    pub fn adopt(mut dp: Dataplane, seed: u32, bucket_slots: u32) -> Result<Self, ProgramError> {
        let slots: BTreeMap<IpAddr, u32> =
            dp.backends()?.into_iter().map(|(i, a)| (a, i)).collect();
        let by_slot: BTreeMap<u32, IpAddr> = slots.iter().map(|(a, i)| (*i, *a)).collect();
        let mut live = BTreeMap::new();
        for (key, v) in dp.services()? {
            let upper = v.flags & SERVICE_UPPER_HALF != 0;
            let size = 1u32 << v.table_bits;
            let base = if upper {
                v.table_offset - size
            } else {
                v.table_offset
            };
            let raw = dp.read_table(v.table_offset, size)?;
            let table = raw
                .iter()
                .map(|b| {
                    (
                        by_slot.get(&b.first).copied(),
                        by_slot.get(&b.second).copied(),
                    )
                })
                .collect();
            live.insert(
                key,
                Live {
                    id: v.id,
                    base,
                    bits: v.table_bits,
                    upper,
                    digest: digest(&table),
                    table,
                    live_raw: raw,
                    spare_raw: None,
                    moved: 0,
                },
            );
        }
        let pairs = dp.service_backend_counters()?.into_keys().collect();
        Ok(Programmer {
            dp,
            seed,
            bucket_slots,
            slots,
            live,
            pairs,
            rebuilds: 0,
        })
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// The table `want` would get now, in addresses (first, second). Backends without a
    /// slot yet get provisional numbers: only addresses leave this function.
    fn compute(&self, want: &Desired) -> Result<Owners, ProgramError> {
        const PROVISIONAL: u32 = 1 << 24;
        let mut slot_of = self.slots.clone();
        let mut next = PROVISIONAL;
        let mut backends = Vec::with_capacity(want.members.len());
        for m in &want.members {
            let slot = *slot_of.entry(m.address).or_insert_with(|| {
                next += 1;
                next
            });
            backends.push(table::Backend {
                addr: m.address,
                weight: m.weight,
                state: m.state,
                slot,
            });
        }
        let prev: Option<Vec<Bucket>> = self.live.get(&want.key).map(|l| {
            let slot = |a: &Option<IpAddr>| {
                a.and_then(|a| slot_of.get(&a).copied())
                    .unwrap_or(NO_BACKEND)
            };
            l.table
                .iter()
                .map(|(f, s)| Bucket {
                    first: slot(f),
                    second: slot(s),
                })
                .collect()
        });
        let built =
            table::build(&backends, want.bits, self.seed, prev.as_deref()).map_err(|source| {
                ProgramError::Table {
                    service: want.name.clone(),
                    source,
                }
            })?;
        let addr_of: BTreeMap<u32, IpAddr> = slot_of.iter().map(|(a, s)| (*s, *a)).collect();
        let addr = |s: u32| addr_of.get(&s).copied();
        Ok(built
            .iter()
            .map(|b| (addr(b.first), addr(b.second)))
            .collect())
    }

    /// What applying `wanted` would move in the table of service `name` at `key`;
    /// writes nothing. A service absent from `wanted` loses every bucket.
    pub fn plan(
        &self,
        wanted: &[Desired],
        name: &str,
        key: &ServiceKey,
    ) -> Result<PlanSummary, ProgramError> {
        let prev = self.live.get(key).map(|l| l.table.as_slice());
        let next = match wanted.iter().find(|d| d.key == *key) {
            Some(want) => self.compute(want)?,
            None => vec![(None, None); prev.map_or(0, <[_]>::len)],
        };
        Ok(summarize(name, prev, &next))
    }

    /// Makes the maps match `wanted`. Returns, per service whose table changed, what
    /// moved. Tables are flipped one map update each; slots no table refers to any more
    /// are freed last.
    pub fn sync(&mut self, wanted: &[Desired]) -> Result<Vec<PlanSummary>, ProgramError> {
        let keep: BTreeSet<ServiceKey> = wanted.iter().map(|d| d.key).collect();
        let gone: Vec<ServiceKey> = self
            .live
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.dp.remove_service(&key)?;
            self.live.remove(&key);
            tracing::info!(vip = %addr::from_bytes(key.addr), port = u16::from_be(key.port_be), "service removed from the data plane");
        }
        let mut summaries = Vec::new();
        for want in wanted {
            let next = self.compute(want)?;
            let prev = self.live.get(&want.key).filter(|l| l.bits == want.bits);
            if prev.is_some_and(|l| l.table == next) {
                continue;
            }
            let summary = summarize(&want.name, prev.map(|l| l.table.as_slice()), &next);
            // A first table (or one of a new size) moves nothing that was forwarded.
            let moved = if prev.is_some() {
                u64::from(summary.moved)
            } else {
                0
            };
            summaries.push(summary);
            self.write(want, next, moved)?;
        }
        self.free_unused_slots(wanted)?;
        self.close_unused_pairs(wanted)?;
        Ok(summaries)
    }

    /// Writes `table` into the spare half and flips to it; `moved` buckets changed owner.
    fn write(&mut self, want: &Desired, table: Owners, moved: u64) -> Result<(), ProgramError> {
        let mut buckets = Vec::with_capacity(table.len());
        for (first, second) in &table {
            let first = match first {
                Some(a) => self.slot(*a)?,
                None => NO_BACKEND,
            };
            let second = match second {
                Some(a) => self.slot(*a)?,
                None => NO_BACKEND,
            };
            buckets.push(Bucket { first, second });
        }
        // A new region is found while the old one still counts as taken: it stays live
        // until the flip below.
        let (id, base, upper) = match self.live.get(&want.key) {
            Some(l) if l.bits == want.bits => (l.id, l.base, !l.upper),
            Some(l) => (l.id, self.region(want)?, false),
            None => {
                let id = self.service_id()?;
                // The id may have been another service's.
                self.dp.zero_service_counters(id)?;
                (id, self.region(want)?, false)
            }
        };
        // Counters for every backend the table sends to, before it goes live.
        let firsts: BTreeSet<u32> = buckets
            .iter()
            .map(|b| b.first)
            .filter(|f| *f != NO_BACKEND)
            .collect();
        for backend in firsts {
            self.open_pair(ServiceBackendKey {
                service: id,
                backend,
            })?;
        }
        let (spare, old_live) = match self.live.get(&want.key) {
            Some(l) if l.bits == want.bits => (l.spare_raw.clone(), Some(l.live_raw.clone())),
            _ => (None, None),
        };
        let moved = self.live.get(&want.key).map_or(0, |l| l.moved) + moved;
        let live = Live {
            id,
            base,
            bits: want.bits,
            upper,
            digest: digest(&table),
            table,
            live_raw: buckets,
            spare_raw: old_live,
            moved,
        };
        self.dp
            .write_table_changes(live.live_offset(), &live.live_raw, spare.as_deref())?;
        let value = ServiceValue {
            id,
            table_offset: live.live_offset(),
            table_bits: want.bits,
            flags: if upper { SERVICE_UPPER_HALF } else { 0 },
        };
        self.dp.set_service(&want.key, &value)?;
        self.live.insert(want.key, live);
        self.rebuilds += 1;
        Ok(())
    }

    /// The slot of backend `a`, given one if it has none.
    fn slot(&mut self, a: IpAddr) -> Result<u32, ProgramError> {
        if let Some(s) = self.slots.get(&a) {
            return Ok(*s);
        }
        let used: BTreeSet<u32> = self.slots.values().copied().collect();
        let max = lb_common::limits::MAX_BACKENDS;
        let s = (0..max)
            .find(|i| !used.contains(i))
            .ok_or(ProgramError::NoSlot { max })?;
        self.dp.set_backend(s, a)?;
        self.slots.insert(a, s);
        Ok(s)
    }

    /// Starts the counters of `key` at zero unless it has them already.
    fn open_pair(&mut self, key: ServiceBackendKey) -> Result<(), ProgramError> {
        if !self.pairs.contains(&key) {
            self.dp.open_service_backend(key)?;
            self.pairs.insert(key);
        }
        Ok(())
    }

    /// Drops the counters of pairs whose backend is no longer a member of the service
    /// (or whose service is gone): a later pair with the same numbers starts at zero.
    fn close_unused_pairs(&mut self, wanted: &[Desired]) -> Result<(), ProgramError> {
        let mut keep = BTreeSet::new();
        for want in wanted {
            let Some(l) = self.live.get(&want.key) else {
                continue;
            };
            for m in &want.members {
                if let Some(&backend) = self.slots.get(&m.address) {
                    keep.insert(ServiceBackendKey {
                        service: l.id,
                        backend,
                    });
                }
            }
        }
        let gone: Vec<ServiceBackendKey> = self.pairs.difference(&keep).copied().collect();
        for key in gone {
            self.dp.close_service_backend(key)?;
            self.pairs.remove(&key);
        }
        Ok(())
    }

    /// Frees the slots of backends no table refers to and no service has as a member:
    /// a member out of every table (failed, say) keeps its slot, so its counters go on.
    fn free_unused_slots(&mut self, wanted: &[Desired]) -> Result<(), ProgramError> {
        let used: BTreeSet<IpAddr> = self
            .live
            .values()
            .flat_map(|l| l.table.iter())
            .flat_map(|(f, s)| [*f, *s])
            .flatten()
            .chain(
                wanted
                    .iter()
                    .flat_map(|w| w.members.iter().map(|m| m.address)),
            )
            .collect();
        let unused: Vec<(IpAddr, u32)> = self
            .slots
            .iter()
            .filter(|(a, _)| !used.contains(a))
            .map(|(a, s)| (*a, *s))
            .collect();
        for (a, s) in unused {
            self.dp.clear_backend(s)?;
            self.slots.remove(&a);
        }
        Ok(())
    }

    fn service_id(&self) -> Result<u32, ProgramError> {
        let used: BTreeSet<u32> = self.live.values().map(|l| l.id).collect();
        let max = lb_common::limits::MAX_SERVICES;
        (0..max)
            .find(|i| !used.contains(i))
            .ok_or(ProgramError::NoServiceId { max })
    }

    /// First fit for a region of two tables of `want`'s size, aligned to its size. A
    /// service changing size keeps its old region until the flip, so it counts as taken.
    fn region(&self, want: &Desired) -> Result<u32, ProgramError> {
        let size = 1u32 << want.bits;
        let mut taken: Vec<(u32, u32)> = self
            .live
            .values()
            .map(|l| (l.base, l.base + 2 * l.size()))
            .collect();
        taken.sort();
        let mut at = 0u32;
        for (start, end) in taken {
            if at + 2 * size <= start {
                break;
            }
            at = at.max(end.next_multiple_of(size));
        }
        if u64::from(at) + 2 * u64::from(size) > u64::from(self.bucket_slots) {
            return Err(ProgramError::NoRoom {
                service: want.name.clone(),
                buckets: size,
            });
        }
        Ok(at)
    }

    /// `lb table`: the live table's shares.
    pub fn table_summary(&self, key: &ServiceKey, svc: &ServiceConfig) -> TableSummary {
        let mut first: BTreeMap<IpAddr, u32> = BTreeMap::new();
        let mut second: BTreeMap<IpAddr, u32> = BTreeMap::new();
        let mut empty = 0;
        let mut buckets = 0;
        if let Some(l) = self.live.get(key) {
            buckets = l.size();
            for (f, s) in &l.table {
                match f {
                    Some(a) => *first.entry(*a).or_default() += 1,
                    None => empty += 1,
                }
                if let Some(a) = s {
                    *second.entry(*a).or_default() += 1;
                }
            }
        }
        TableSummary {
            service: svc.name.clone(),
            buckets,
            empty,
            backends: svc
                .backends
                .iter()
                .map(|b| TableShare {
                    address: b.address,
                    weight: b.weight,
                    first: first.get(&b.address).copied().unwrap_or(0),
                    second: second.get(&b.address).copied().unwrap_or(0),
                })
                .collect(),
        }
    }

    /// Buckets each backend owns in the live table of `key`.
    pub fn owned(&self, key: &ServiceKey) -> BTreeMap<IpAddr, u32> {
        let mut m = BTreeMap::new();
        if let Some(l) = self.live.get(key) {
            for (f, _) in &l.table {
                if let Some(a) = f {
                    *m.entry(*a).or_default() += 1;
                }
            }
        }
        m
    }

    /// Whether `a` appears in the live table of `key` (first or second hop); `None` when
    /// the service has no table.
    pub fn in_table(&self, key: &ServiceKey, a: &IpAddr) -> Option<bool> {
        self.live.get(key).map(|l| {
            l.table
                .iter()
                .any(|(f, s)| *f == Some(*a) || *s == Some(*a))
        })
    }

    /// The per-service counters index of `key`.
    pub fn service_id_of(&self, key: &ServiceKey) -> Option<u32> {
        self.live.get(key).map(|l| l.id)
    }

    /// The live table's digest (see `digest`) and the buckets moved in it since the
    /// agent started; `None` when the service has no table.
    pub fn table_facts(&self, key: &ServiceKey) -> Option<(u64, u64)> {
        self.live.get(key).map(|l| (l.digest, l.moved))
    }

    /// The backend slot of `a`.
    pub fn slot_of(&self, a: &IpAddr) -> Option<u32> {
        self.slots.get(a).copied()
    }

    /// Every backend with a slot, and its slot.
    pub fn slots(&self) -> &BTreeMap<IpAddr, u32> {
        &self.slots
    }
}

/// A fingerprint of a table in backend addresses (first and second hop of every bucket):
/// equal on every node that forwards alike, whatever backend slots the nodes gave. FNV-1a,
/// cut to 53 bits so that a metric's float carries it exactly.
fn digest(table: &Owners) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
        }
    };
    for (first, second) in table {
        for hop in [first, second] {
            match hop {
                None => eat(&[0]),
                Some(IpAddr::V4(a)) => {
                    eat(&[4]);
                    eat(&a.octets());
                }
                Some(IpAddr::V6(a)) => {
                    eat(&[6]);
                    eat(&a.octets());
                }
            }
        }
    }
    h & ((1 << 53) - 1)
}

/// What changed owner between `prev` and `next`.
fn summarize(
    service: &str,
    prev: Option<&[(Option<IpAddr>, Option<IpAddr>)]>,
    next: &[(Option<IpAddr>, Option<IpAddr>)],
) -> PlanSummary {
    let mut moves: BTreeMap<(Option<IpAddr>, Option<IpAddr>), u32> = BTreeMap::new();
    let mut moved = 0;
    for (i, (to, _)) in next.iter().enumerate() {
        let from = prev.filter(|p| p.len() == next.len()).and_then(|p| p[i].0);
        if from != *to {
            moved += 1;
            *moves.entry((from, *to)).or_default() += 1;
        }
    }
    PlanSummary {
        service: service.to_string(),
        buckets: next.len() as u32,
        moved,
        moves: moves
            .into_iter()
            .map(|((from, to), buckets)| Move { from, to, buckets })
            .collect(),
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_every_hop_and_fits_a_float() {
        let a: IpAddr = "10.0.3.2".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        let table: Owners = vec![(Some(a), None), (Some(b), Some(a)), (None, None)];
        assert_eq!(digest(&table), digest(&table.clone()));
        assert!(digest(&table) < 1 << 53);
        for changed in [
            vec![(Some(a), None), (Some(b), Some(b)), (None, None)],
            vec![(Some(b), None), (Some(b), Some(a)), (None, None)],
            vec![(Some(a), None), (Some(b), Some(a))],
        ] {
            assert_ne!(digest(&table), digest(&changed), "{changed:?}");
        }
    }
}
