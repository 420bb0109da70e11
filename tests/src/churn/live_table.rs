//! A host-side reader of an LB node's live forwarding table that predicts where a flow
//! goes.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    addr,
    hash::{bucket_index, FlowHashKey, FlowTuple},
    maps::{names, Backend, Bucket, ServiceKey, ServiceValue, BACKEND_PRESENT},
};

/// A service's live forwarding table on one LB node, in backend addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveTable {
    /// The node's flow hash, as its data plane hashes with it.
    pub hash: FlowHashKey,
    pub bits: u32,
    /// (first, second) per bucket.
    pub buckets: Vec<(Option<IpAddr>, Option<IpAddr>)>,
}

fn pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = lb::dataplane::map_pin_path(pin_dir, name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl LiveTable {
    /// Reads the table of (`vip`, `port`, `proto`) from the maps pinned under `pin_dir`.
    pub fn read(pin_dir: &Path, vip: IpAddr, port: u16, proto: u8) -> Result<Self> {
        let hash: Array<MapData, FlowHashKey> = pinned(pin_dir, names::FLOW_HASH)?.try_into()?;
        let hash = hash.get(&0, 0)?;
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            pinned(pin_dir, names::SERVICES)?.try_into()?;
        let key = ServiceKey {
            addr: addr::to_bytes(vip),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let sv = services
            .get(&key, 0)
            .with_context(|| format!("no service {vip}:{port}/{proto} in {}", pin_dir.display()))?;
        let backends: Array<MapData, Backend> = pinned(pin_dir, names::BACKENDS)?.try_into()?;
        let mut slots = BTreeMap::new();
        let mut slot = |i: u32| -> Result<Option<IpAddr>> {
            if i == lb_common::maps::NO_BACKEND {
                return Ok(None);
            }
            if let Some(a) = slots.get(&i) {
                return Ok(*a);
            }
            let b = backends.get(&i, 0)?;
            let a = (b.flags & BACKEND_PRESENT != 0).then(|| addr::from_bytes(b.addr));
            slots.insert(i, a);
            Ok(a)
        };
        let table: Array<MapData, Bucket> = pinned(pin_dir, names::BUCKETS)?.try_into()?;
        let size = 1u32 << sv.table_bits;
        let mut buckets = Vec::with_capacity(size as usize);
        for i in sv.table_offset..sv.table_offset + size {
            let b = table.get(&i, 0)?;
            buckets.push((slot(b.first)?, slot(b.second)?));
        }
        Ok(Self {
            hash,
            bits: sv.table_bits,
            buckets,
        })
    }

    /// The bucket of a flow.
    pub fn bucket(&self, t: &FlowTuple) -> usize {
        bucket_index(self.hash.hash(t), self.bits) as usize
    }

    /// The first and second hop of a flow.
    pub fn hops(&self, t: &FlowTuple) -> (Option<IpAddr>, Option<IpAddr>) {
        self.buckets[self.bucket(t)]
    }

    /// Buckets whose first hop is `a`.
    pub fn owned_by(&self, a: IpAddr) -> usize {
        self.buckets.iter().filter(|(f, _)| *f == Some(a)).count()
    }
}
