//! Keeps the data plane's maps true to the desired services: backend slots, one region
//! of the bucket map per service (two halves: the live table and the next one), tables
//! built by `crate::table`, and the atomic flip from one half to the other.
//!
//! A change costs what it touches: each service's table remembers the inputs it was built
//! from (size, members, their weights and states), and a service whose inputs are the same
//! is neither rebuilt nor written. Tables are built in backend slots; a backend new to the
//! data plane gets a provisional number until the table is written, where it receives its
//! slot.
//!
//! Everything it needs to continue after a restart is read back from the (pinned) maps,
//! so a new agent takes over the running tables and their second hops.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    addr,
    limits::MAX_BACKENDS,
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

/// Numbers from here on stand for backends that have no slot yet (slots are below
/// `MAX_BACKENDS`, `NO_BACKEND` is `u32::MAX`).
const PROVISIONAL: u32 = MAX_BACKENDS;

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
    /// The live half as the map holds it, in backend slots.
    live_raw: Vec<Bucket>,
    /// The other half when known: a flip then writes only the buckets that differ from
    /// what that half already holds.
    spare_raw: Option<Vec<Bucket>>,
    /// The members the live table was built from; `None` for a table taken over from a
    /// previous agent, which is rebuilt once and kept if it comes out the same.
    inputs: Option<Vec<Member>>,
    /// Facts of the live table, kept so that status calls and slot bookkeeping need not
    /// walk it.
    facts: Facts,
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

/// What a table says about its backends, by slot.
#[derive(Clone, Debug, Default)]
struct Facts {
    /// Buckets per first hop.
    owned: BTreeMap<u32, u32>,
    /// Every slot the table names (first or second hop).
    named: BTreeSet<u32>,
    /// `digest` of the table in addresses.
    digest: u64,
}

impl Facts {
    fn of(buckets: &[Bucket], addr_of: impl Fn(u32) -> Option<IpAddr>) -> Facts {
        let mut owned = BTreeMap::new();
        let mut named = BTreeSet::new();
        for b in buckets {
            if b.first != NO_BACKEND {
                *owned.entry(b.first).or_default() += 1;
                named.insert(b.first);
            }
            if b.second != NO_BACKEND {
                named.insert(b.second);
            }
        }
        // The few backends of one table, looked up once each.
        let addrs: BTreeMap<u32, IpAddr> = named
            .iter()
            .filter_map(|s| addr_of(*s).map(|a| (*s, a)))
            .collect();
        let hop = |s: u32| addrs.get(&s).copied();
        let digest = digest(buckets.iter().map(|b| (hop(b.first), hop(b.second))));
        Facts {
            owned,
            named,
            digest,
        }
    }
}

/// A table built but not written: in slots, with provisional numbers for the members
/// that have no slot yet.
struct Built {
    buckets: Vec<Bucket>,
    provisional: Vec<(u32, IpAddr)>,
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

impl ProgramError {
    /// Whether the error is a limit of the maps reached (rather than a failure).
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            ProgramError::NoRoom { .. }
                | ProgramError::NoSlot { .. }
                | ProgramError::NoServiceId { .. }
        )
    }
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
    /// How many tables were built (written or found unchanged) since the start.
    pub builds: u64,
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
            let facts = Facts::of(&raw, |s| by_slot.get(&s).copied());
            live.insert(
                key,
                Live {
                    id: v.id,
                    base,
                    bits: v.table_bits,
                    upper,
                    live_raw: raw,
                    spare_raw: None,
                    inputs: None,
                    facts,
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
            builds: 0,
        })
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// The table `want` would get now, built on the live one.
    fn compute(&self, want: &Desired) -> Result<Built, ProgramError> {
        let mut provisional = Vec::new();
        let backends: Vec<table::Candidate> = want
            .members
            .iter()
            .map(|m| {
                let slot = self.slots.get(&m.address).copied().unwrap_or_else(|| {
                    let s = PROVISIONAL + provisional.len() as u32;
                    provisional.push((s, m.address));
                    s
                });
                table::Candidate {
                    addr: m.address,
                    weight: m.weight,
                    state: m.state,
                    slot,
                }
            })
            .collect();
        let prev = self.live.get(&want.key).map(|l| l.live_raw.as_slice());
        let buckets = table::build(&backends, want.bits, self.seed, prev).map_err(|source| {
            ProgramError::Table {
                service: want.name.clone(),
                source,
            }
        })?;
        Ok(Built {
            buckets,
            provisional,
        })
    }

    /// The address behind slot `s`, or behind a provisional number of `built`.
    fn addr_of(&self, built: Option<&Built>, s: u32) -> Option<IpAddr> {
        if s >= PROVISIONAL {
            return built
                .and_then(|b| b.provisional.iter().find(|(p, _)| *p == s).map(|(_, a)| *a));
        }
        // Slots are few; a service's table names a handful of them.
        self.slots.iter().find(|(_, v)| **v == s).map(|(a, _)| *a)
    }

    /// What applying `wanted` would move in the table of service `name` at `key`;
    /// writes nothing. A service absent from `wanted` loses every bucket.
    pub fn plan(
        &self,
        wanted: &[Desired],
        name: &str,
        key: &ServiceKey,
    ) -> Result<PlanSummary, ProgramError> {
        let prev = self.live.get(key);
        match wanted.iter().find(|d| d.key == *key) {
            Some(want) => {
                let built = self.compute(want)?;
                let prev = prev.filter(|l| l.bits == want.bits);
                Ok(self.summarize(name, prev.map(|l| l.live_raw.as_slice()), &built))
            }
            None => {
                let prev = prev.map(|l| l.live_raw.as_slice()).unwrap_or_default();
                let empty = Built {
                    buckets: vec![Bucket::EMPTY; prev.len()],
                    provisional: Vec::new(),
                };
                Ok(self.summarize(name, Some(prev), &empty))
            }
        }
    }

    /// What changed owner between `prev` and `next`.
    fn summarize(&self, service: &str, prev: Option<&[Bucket]>, next: &Built) -> PlanSummary {
        let prev = prev.filter(|p| p.len() == next.buckets.len());
        let mut moves: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let mut moved = 0;
        for (i, b) in next.buckets.iter().enumerate() {
            let from = prev.map_or(NO_BACKEND, |p| p[i].first);
            if from != b.first {
                moved += 1;
                *moves.entry((from, b.first)).or_default() += 1;
            }
        }
        let addr = |s: u32| {
            (s != NO_BACKEND)
                .then(|| self.addr_of(Some(next), s))
                .flatten()
        };
        let mut by_addr: BTreeMap<(Option<IpAddr>, Option<IpAddr>), u32> = BTreeMap::new();
        for ((from, to), n) in moves {
            *by_addr.entry((addr(from), addr(to))).or_default() += n;
        }
        PlanSummary {
            service: service.to_string(),
            buckets: next.buckets.len() as u32,
            moved,
            moves: by_addr
                .into_iter()
                .map(|((from, to), buckets)| Move { from, to, buckets })
                .collect(),
            warnings: Vec::new(),
        }
    }

    /// Makes the maps match `wanted`. Returns, per service whose table changed, what
    /// moved. Only services whose inputs changed are built, each once; tables are
    /// flipped one map update each; slots no table refers to any more are freed last.
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
            let prev = self.live.get(&want.key).filter(|l| l.bits == want.bits);
            if prev.is_some_and(|l| l.inputs.as_ref() == Some(&want.members)) {
                continue;
            }
            let built = self.compute(want)?;
            self.builds += 1;
            let prev = self.live.get_mut(&want.key).filter(|l| l.bits == want.bits);
            if let Some(l) = prev {
                if l.live_raw == built.buckets {
                    l.inputs = Some(want.members.clone());
                    continue;
                }
            }
            let prev = self.live.get(&want.key).filter(|l| l.bits == want.bits);
            let summary = self.summarize(&want.name, prev.map(|l| l.live_raw.as_slice()), &built);
            // A first table (or one of a new size) moves nothing that was forwarded.
            let moved = if prev.is_some() {
                u64::from(summary.moved)
            } else {
                0
            };
            summaries.push(summary);
            self.write(want, built, moved)?;
        }
        self.free_unused_slots(wanted)?;
        self.close_unused_pairs(wanted)?;
        Ok(summaries)
    }

    /// Gives the backends new to the data plane their slots, writes `built` into the
    /// spare half and flips to it; `moved` buckets changed owner.
    fn write(&mut self, want: &Desired, built: Built, moved: u64) -> Result<(), ProgramError> {
        let Built {
            mut buckets,
            provisional,
        } = built;
        if !provisional.is_empty() {
            let named: BTreeSet<u32> = buckets
                .iter()
                .flat_map(|b| [b.first, b.second])
                .filter(|s| *s >= PROVISIONAL && *s != NO_BACKEND)
                .collect();
            let mut real = BTreeMap::new();
            for (p, a) in provisional {
                if named.contains(&p) {
                    real.insert(p, self.slot(a)?);
                }
            }
            let to_slot = |s: u32| real.get(&s).copied().unwrap_or(s);
            for b in &mut buckets {
                b.first = to_slot(b.first);
                b.second = to_slot(b.second);
            }
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
        let facts = Facts::of(&buckets, |s| self.addr_of(None, s));
        // Counters for every backend the table sends to, before it goes live.
        for &backend in facts.owned.keys() {
            self.open_pair(ServiceBackendKey {
                service: id,
                backend,
            })?;
        }
        let mut old = self.live.remove(&want.key);
        let same_size = old.as_ref().filter(|l| l.bits == want.bits);
        let spare = same_size.and_then(|l| l.spare_raw.as_deref());
        let live = Live {
            id,
            base,
            bits: want.bits,
            upper,
            live_raw: buckets,
            spare_raw: same_size.map(|l| l.live_raw.clone()),
            inputs: Some(want.members.clone()),
            facts,
            moved: old.as_ref().map_or(0, |l| l.moved) + moved,
        };
        let offset = live.live_offset();
        let value = ServiceValue {
            id,
            table_offset: offset,
            table_bits: want.bits,
            flags: if upper { SERVICE_UPPER_HALF } else { 0 },
        };
        let flipped = self
            .dp
            .write_table_changes(offset, &live.live_raw, spare)
            .and_then(|()| self.dp.set_service(&want.key, &value));
        if let Err(e) = flipped {
            // The service still runs on its previous table; what its other half holds
            // is unknown now.
            if let Some(mut l) = old.take() {
                l.spare_raw = None;
                l.inputs = None;
                self.live.insert(want.key, l);
            }
            return Err(e.into());
        }
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
        let max = MAX_BACKENDS;
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
        let named: BTreeSet<u32> = self
            .live
            .values()
            .flat_map(|l| l.facts.named.iter().copied())
            .collect();
        let members: BTreeSet<IpAddr> = wanted
            .iter()
            .flat_map(|w| w.members.iter().map(|m| m.address))
            .collect();
        let unused: Vec<(IpAddr, u32)> = self
            .slots
            .iter()
            .filter(|(a, s)| !named.contains(s) && !members.contains(a))
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
        let mut second: BTreeMap<u32, u32> = BTreeMap::new();
        let mut buckets = 0;
        let mut empty = 0;
        if let Some(l) = self.live.get(key) {
            buckets = l.size();
            empty = buckets - l.facts.owned.values().sum::<u32>();
            for b in &l.live_raw {
                if b.second != NO_BACKEND {
                    *second.entry(b.second).or_default() += 1;
                }
            }
        }
        let owned = self.owned(key);
        let count = |m: &BTreeMap<u32, u32>, a: &IpAddr| {
            self.slot_of(a)
                .and_then(|s| m.get(&s).copied())
                .unwrap_or(0)
        };
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
                    first: owned.get(&b.address).copied().unwrap_or(0),
                    second: count(&second, &b.address),
                })
                .collect(),
        }
    }

    /// Buckets each backend owns in the live table of `key`.
    pub fn owned(&self, key: &ServiceKey) -> BTreeMap<IpAddr, u32> {
        let Some(l) = self.live.get(key) else {
            return BTreeMap::new();
        };
        l.facts
            .owned
            .iter()
            .filter_map(|(s, n)| self.addr_of(None, *s).map(|a| (a, *n)))
            .collect()
    }

    /// Whether `a` appears in the live table of `key` (first or second hop); `None` when
    /// the service has no table.
    pub fn in_table(&self, key: &ServiceKey, a: &IpAddr) -> Option<bool> {
        self.live
            .get(key)
            .map(|l| self.slot_of(a).is_some_and(|s| l.facts.named.contains(&s)))
    }

    /// The per-service counters index of `key`.
    pub fn service_id_of(&self, key: &ServiceKey) -> Option<u32> {
        self.live.get(key).map(|l| l.id)
    }

    /// The live table's digest (see `digest`) and the buckets moved in it since the
    /// agent started; `None` when the service has no table.
    pub fn table_facts(&self, key: &ServiceKey) -> Option<(u64, u64)> {
        self.live.get(key).map(|l| (l.facts.digest, l.moved))
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
fn digest(table: impl Iterator<Item = (Option<IpAddr>, Option<IpAddr>)>) -> u64 {
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

#[cfg(test)]
mod tests {
    use lb_common::addr;

    use super::*;
    use crate::{dataplane::LoadOptions, table::BackendState};

    #[test]
    fn digest_sees_every_hop_and_fits_a_float() {
        let a: IpAddr = "10.0.3.2".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        let table = vec![(Some(a), None), (Some(b), Some(a)), (None, None)];
        let d = |t: &Vec<(Option<IpAddr>, Option<IpAddr>)>| digest(t.iter().copied());
        assert_eq!(d(&table), d(&table.clone()));
        assert!(d(&table) < 1 << 53);
        for changed in [
            vec![(Some(a), None), (Some(b), Some(b)), (None, None)],
            vec![(Some(b), None), (Some(b), Some(a)), (None, None)],
            vec![(Some(a), None), (Some(b), Some(a))],
        ] {
            assert_ne!(d(&table), d(&changed), "{changed:?}");
        }
    }

    /// A programmer on a freshly loaded data plane (real maps in the kernel), or `None`
    /// when this process may not load BPF programs.
    fn programmer(test: &str) -> Option<Programmer> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping {test}: loading the data plane needs root");
            return None;
        }
        let dp = Dataplane::load(&LoadOptions {
            bucket_slots: 1 << 16,
            pin_dir: None,
        })
        .expect("loading the data plane");
        Some(Programmer::adopt(dp, 7, 1 << 16).unwrap())
    }

    const BITS: u32 = 8;

    /// `n` services of four backends each; service `i`'s backends are its own, but for
    /// `shared`, which every service has.
    fn services(n: u8, shared: IpAddr) -> Vec<Desired> {
        (0..n)
            .map(|i| {
                let mut members: Vec<Member> = (1..4)
                    .map(|j| Member {
                        address: IpAddr::from([10, 1, i, j]),
                        weight: 100,
                        state: BackendState::Active,
                    })
                    .collect();
                members.push(Member {
                    address: shared,
                    weight: 100,
                    state: BackendState::Active,
                });
                Desired {
                    name: format!("s{i}"),
                    key: ServiceKey {
                        addr: addr::to_bytes(IpAddr::from([10, 100, 0, i])),
                        port_be: 80u16.to_be(),
                        proto: 6,
                        _pad: 0,
                    },
                    bits: BITS,
                    members,
                }
            })
            .collect()
    }

    /// The live table of `key` as the bucket map holds it, in addresses.
    fn live_owners(p: &mut Programmer, key: &ServiceKey) -> BTreeSet<IpAddr> {
        let by_slot: BTreeMap<u32, IpAddr> = p.slots().iter().map(|(a, s)| (*s, *a)).collect();
        let (_, v) = p
            .dataplane()
            .services()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == key)
            .expect("the service is in the map");
        let raw = p
            .dataplane()
            .read_table(v.table_offset, 1 << v.table_bits)
            .unwrap();
        raw.iter()
            .flat_map(|b| [b.first, b.second])
            .filter_map(|s| by_slot.get(&s).copied())
            .collect()
    }

    #[test]
    fn a_change_rebuilds_only_the_tables_whose_inputs_changed() {
        let Some(mut p) = programmer("a_change_rebuilds_only_the_tables_whose_inputs_changed")
        else {
            return;
        };
        let shared: IpAddr = "10.2.0.1".parse().unwrap();
        let mut want = services(32, shared);
        assert_eq!(p.sync(&want).unwrap().len(), 32);
        assert_eq!((p.builds, p.rebuilds), (32, 32));

        // Nothing changed: nothing built.
        assert!(p.sync(&want).unwrap().is_empty());
        assert_eq!((p.builds, p.rebuilds), (32, 32));

        // One backend of one service down: that table alone, once, and it is live.
        let down = want[5].members[0].address;
        want[5].members[0].state = BackendState::Down;
        let changed = p.sync(&want).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].service, "s5");
        assert!(changed[0].moved > 0);
        assert_eq!((p.builds, p.rebuilds), (33, 33));
        assert!(!live_owners(&mut p, &want[5].key).contains(&down));
        assert_eq!(p.in_table(&want[5].key, &down), Some(false));

        // A new weight: that table alone.
        want[9].members[1].weight = 20;
        assert_eq!(p.sync(&want).unwrap().len(), 1);
        assert_eq!((p.builds, p.rebuilds), (34, 34));

        // Two verdicts on one service applied together: one rebuild.
        want[3].members[0].state = BackendState::Down;
        want[3].members[1].state = BackendState::Down;
        assert_eq!(p.sync(&want).unwrap().len(), 1);
        assert_eq!((p.builds, p.rebuilds), (35, 35));

        // A backend every service has goes down: every table, each once.
        for w in &mut want {
            let m = w.members.iter_mut().find(|m| m.address == shared).unwrap();
            m.state = BackendState::Down;
        }
        assert_eq!(p.sync(&want).unwrap().len(), 32);
        assert_eq!((p.builds, p.rebuilds), (67, 67));
        for w in &want {
            assert!(!live_owners(&mut p, &w.key).contains(&shared), "{}", w.name);
        }
    }

    #[test]
    fn new_backends_get_slots_when_written_and_taken_over_tables_are_kept() {
        let Some(mut p) =
            programmer("new_backends_get_slots_when_written_and_taken_over_tables_are_kept")
        else {
            return;
        };
        let shared: IpAddr = "10.2.0.1".parse().unwrap();
        let mut want = services(2, shared);
        p.sync(&want).unwrap();
        let new: IpAddr = "10.3.0.1".parse().unwrap();
        // A draining newcomer owns nothing: no table changes, no slot is taken.
        want[0].members.push(Member {
            address: new,
            weight: 100,
            state: BackendState::Draining,
        });
        let plan = p.plan(&want, "s0", &want[0].key).unwrap();
        assert_eq!(plan.moved, 0);
        assert!(p.sync(&want).unwrap().is_empty());
        assert_eq!(p.slot_of(&new), None);
        // Active, it gets a slot and its buckets; the plan named it before it had one.
        want[0].members.last_mut().unwrap().state = BackendState::Active;
        let plan = p.plan(&want, "s0", &want[0].key).unwrap();
        assert!(plan.moves.iter().any(|m| m.to == Some(new)), "{plan:?}");
        let applied = p.sync(&want).unwrap();
        assert_eq!(applied, vec![plan]);
        assert!(p.slot_of(&new).is_some());
        assert!(live_owners(&mut p, &want[0].key).contains(&new));
        assert_eq!(p.owned(&want[0].key).values().sum::<u32>(), 1 << BITS);

        // A programmer taking over these maps builds each table once, writes none.
        let facts: Vec<_> = want.iter().map(|w| p.table_facts(&w.key)).collect();
        let Programmer { dp, .. } = p;
        let mut q = Programmer::adopt(dp, 7, 1 << 16).unwrap();
        assert!(q.sync(&want).unwrap().is_empty());
        assert_eq!((q.builds, q.rebuilds), (2, 0));
        let digests: Vec<_> = want
            .iter()
            .map(|w| q.table_facts(&w.key).map(|f| f.0))
            .collect();
        assert_eq!(
            digests,
            facts.iter().map(|f| f.map(|f| f.0)).collect::<Vec<_>>()
        );
    }
}
