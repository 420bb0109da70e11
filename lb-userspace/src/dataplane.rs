//! The data plane as userspace sees it: the loaded XDP object, its programs and maps.
//! Everything that writes the maps goes through here so the layout rules (see
//! `lb_common::maps`) live in one place. The maps are taken from the object once, at
//! load, as typed handles: no write looks a map up by name.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr,
    hash::{FlowHash, FlowHashKey},
    maps::{
        names, vip_filter_bit, Backend, Bucket, Counters, NextHopEntry, NodeConfig,
        ServiceBackendKey, ServiceKey, ServiceValue, VipRefs, NODE_CONFIGURED, VIP_FILTER_WORDS,
    },
    nexthop_index::{self, NextHopSlot},
    pair_index::{self, PairSlot},
    service_index::{self, ServiceSlot},
    stats::Reason,
    tcp_window::{self, TcpSockLayout},
};

use crate::{
    ebpf, kernel_btf,
    open_index::{OpenIndex, Write},
    pair_index::PairIndex,
};

/// Errors from loading the program or touching its maps.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching to {ifname} failed")]
    Attach {
        ifname: String,
        #[source]
        source: ProgramError,
    },
    #[error("pin {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

/// How to load the object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the shared bucket map (all services' tables, double-buffered).
    pub bucket_slots: u32,
    /// bpffs directory to pin maps (`maps/`) and links (`links/`) in. Maps already
    /// pinned there are reused, so a restarted agent continues with the live state.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            bucket_slots: lb_common::limits::DEFAULT_BUCKET_SLOTS,
            pin_dir: None,
        }
    }
}

/// The maps of the object, typed; taken from it once at load.
struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vips: HashMap<MapData, [u8; 16], VipRefs>,
    vip_filter: Array<MapData, u64>,
    buckets: Array<MapData, Bucket>,
    backends: Array<MapData, Backend>,
    node: Array<MapData, NodeConfig>,
    flow_hash: Array<MapData, FlowHashKey>,
    reason_stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    service_backend_stats: PerCpuHashMap<MapData, ServiceBackendKey, Counters>,
    service_local_stats: PerCpuArray<MapData, Counters>,
    nexthops: Array<MapData, NextHopEntry>,
    nexthops_by_addr: HashMap<MapData, [u8; 16], NextHopEntry>,
    service_index: Array<MapData, ServiceSlot>,
    nexthop_index: Array<MapData, NextHopSlot>,
    pair_index: Array<MapData, PairSlot>,
    pair_stats: PerCpuArray<MapData, Counters>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Maps, DataplaneError> {
        Ok(Maps {
            services: take(ebpf, names::SERVICES)?,
            vips: take(ebpf, names::VIPS)?,
            vip_filter: take(ebpf, names::VIP_FILTER)?,
            buckets: take(ebpf, names::BUCKETS)?,
            backends: take(ebpf, names::BACKENDS)?,
            node: take(ebpf, names::NODE)?,
            flow_hash: take(ebpf, names::FLOW_HASH)?,
            reason_stats: take(ebpf, names::REASON_STATS)?,
            service_stats: take(ebpf, names::SERVICE_STATS)?,
            service_backend_stats: take(ebpf, names::SERVICE_BACKEND_STATS)?,
            service_local_stats: take(ebpf, names::SERVICE_LOCAL_STATS)?,
            nexthops: take(ebpf, names::NEXTHOPS)?,
            nexthops_by_addr: take(ebpf, names::NEXTHOPS_BY_ADDR)?,
            service_index: take(ebpf, names::SERVICE_INDEX)?,
            nexthop_index: take(ebpf, names::NEXTHOP_INDEX)?,
            pair_index: take(ebpf, names::PAIR_INDEX)?,
            pair_stats: take(ebpf, names::PAIR_STATS)?,
        })
    }

    /// Every map with its name, in the order of `names::ALL`.
    fn all(&self) -> [(&'static str, &MapData); names::ALL.len()] {
        [
            (names::SERVICES, self.services.map()),
            (names::VIPS, self.vips.map()),
            (names::VIP_FILTER, self.vip_filter.map()),
            (names::BUCKETS, self.buckets.map()),
            (names::BACKENDS, self.backends.map()),
            (names::NODE, self.node.map()),
            (names::REASON_STATS, self.reason_stats.map()),
            (names::SERVICE_STATS, self.service_stats.map()),
            (
                names::SERVICE_BACKEND_STATS,
                self.service_backend_stats.map(),
            ),
            (names::SERVICE_LOCAL_STATS, self.service_local_stats.map()),
            (names::NEXTHOPS, self.nexthops.map()),
            (names::NEXTHOPS_BY_ADDR, self.nexthops_by_addr.map()),
            (names::SERVICE_INDEX, self.service_index.map()),
            (names::NEXTHOP_INDEX, self.nexthop_index.map()),
            (names::PAIR_INDEX, self.pair_index.map()),
            (names::PAIR_STATS, self.pair_stats.map()),
            (names::FLOW_HASH, self.flow_hash.map()),
        ]
    }
}

/// A service whose index window is full: its packets take the hash lookup, correct but
/// slower (`lb_common::service_index`).
fn warn_unindexed(key: &ServiceKey) {
    tracing::warn!(
        vip = %addr::from_bytes(key.addr),
        port = u16::from_be(key.port_be),
        proto = key.proto,
        "service not in the service index (its slots are taken): its packets use the slower hash lookup"
    );
}

/// The map under any of aya's map types.
fn map_data(map: &Map) -> &MapData {
    use Map::*;
    match map {
        Array(d)
        | ArrayOfMaps(d)
        | BloomFilter(d)
        | CgroupArray(d)
        | CgroupStorage(d)
        | CgrpStorage(d)
        | CpuMap(d)
        | DevMap(d)
        | DevMapHash(d)
        | HashMap(d)
        | HashOfMaps(d)
        | InodeStorage(d)
        | LpmTrie(d)
        | LruHashMap(d)
        | PerCpuArray(d)
        | PerCpuCgroupStorage(d)
        | PerCpuHashMap(d)
        | PerCpuLruHashMap(d)
        | PerfEventArray(d)
        | ProgramArray(d)
        | Queue(d)
        | ReusePortSockArray(d)
        | RingBuf(d)
        | SockHash(d)
        | SockMap(d)
        | SkStorage(d)
        | Stack(d)
        | StackTraceMap(d)
        | Unsupported(d)
        | XskMap(d) => d,
    }
}

/// Map `name` of `ebpf`, taken out of it as a `T`.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(|source| map_err(name, source))
}

/// The loaded object: the main program verified and loaded, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    index: OpenIndex<ServiceSlot>,
    nexthop_index: OpenIndex<NextHopSlot>,
    pairs: PairIndex,
    pin_dir: Option<PathBuf>,
    adopted: bool,
}

impl Dataplane {
    /// Loads the embedded object and the main program (runs the verifier).
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::BUCKETS, opts.bucket_slots);
        let mut adopted = false;
        let map_paths: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                std::fs::create_dir_all(&maps).map_err(|e| DataplaneError::Pin {
                    path: maps.clone(),
                    message: e.to_string(),
                })?;
                adopted = map_pin_path(dir, names::SERVICES).exists();
                names::ALL
                    .iter()
                    .map(|n| (*n, map_pin_path(dir, n)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // Without the kernel's BTF the program checks a socket's state but not its
        // windows (`lb_common::tcp_window`).
        let tcp_sock = kernel_btf::tcp_sock_layout().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no struct tcp_sock layout: socket windows unchecked");
            TcpSockLayout::UNKNOWN
        });
        loader.override_global(tcp_window::LAYOUT_GLOBAL, &tcp_sock, true);
        let mut ebpf = loader.load(ebpf::object()).map_err(DataplaneError::Load)?;
        load_program(&mut ebpf, ebpf::PROGRAM)?;
        let maps = Maps::take(&mut ebpf)?;
        let slots = (0..service_index::SLOTS)
            .map(|i| maps.service_index.get(&i, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_err(names::SERVICE_INDEX, source))?;
        let nexthop_slots = (0..nexthop_index::SLOTS)
            .map(|i| maps.nexthop_index.get(&i, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_err(names::NEXTHOP_INDEX, source))?;
        let pair_slots = (0..pair_index::SLOTS)
            .map(|i| maps.pair_index.get(&i, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_err(names::PAIR_INDEX, source))?;
        let mut dp = Dataplane {
            ebpf,
            maps,
            index: OpenIndex::new(slots),
            nexthop_index: OpenIndex::new(nexthop_slots),
            pairs: PairIndex::new(pair_slots),
            pin_dir: opts.pin_dir.clone(),
            adopted,
        };
        // Pinned maps may come from a version without the index, or a run that stopped
        // between two writes: the index is made to agree with `SERVICES`.
        let services = dp.services()?.into_iter().collect();
        let (writes, unindexed) = dp.index.reconcile(&services);
        dp.write_index(&writes)?;
        for key in &unindexed {
            warn_unindexed(key);
        }
        // The same for the next-hop index and `NEXTHOPS_BY_ADDR`.
        let nexthops = dp
            .maps
            .nexthops_by_addr
            .iter()
            .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
            .map_err(|source| map_err(names::NEXTHOPS_BY_ADDR, source))?;
        let (writes, _) = dp.nexthop_index.reconcile(&nexthops);
        write_slots(&mut dp.maps.nexthop_index, names::NEXTHOP_INDEX, &writes)?;
        // Pairs opened by a version without the pair index are only in the hash map,
        // which the program no longer looks at for a pair it cannot find in the index:
        // they get slots (their counts so far stay in the hash map and are added).
        let hashed: Vec<ServiceBackendKey> = dp
            .maps
            .service_backend_stats
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| map_err(names::SERVICE_BACKEND_STATS, source))?;
        for key in hashed {
            if dp.pairs.slot_of(&key).is_none() {
                dp.open_pair_slot(key)?;
            }
        }
        // A map pinned by an earlier version that this one does not use stays alive while
        // a program still uses it (the earlier program, until `attach` replaces it); only
        // its pin goes.
        if let Some(dir) = &opts.pin_dir {
            for path in stale_pins(dir) {
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                tracing::info!(path = %path.display(), "removed a map pin this version does not use");
            }
        }
        Ok(dp)
    }

    /// Whether the maps were already pinned (a running data plane was taken over).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches the program to `ifname` (in the calling thread's network namespace).
    /// With a pin directory, the link is pinned there; a link already pinned for that
    /// interface gets the new program swapped in atomically, so forwarding never stops.
    pub fn attach(&mut self, ifname: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            ifname: ifname.to_string(),
            source,
        };
        let Some(dir) = self.pin_dir.clone() else {
            self.program().attach(ifname, mode).map_err(attach_err)?;
            return Ok(());
        };
        let links = dir.join("links");
        std::fs::create_dir_all(&links).map_err(|e| pin_err(&links, e))?;
        let path = links.join(ifname);
        let prog = self.program();
        let id = if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| pin_err(&path, e))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(&path, e))?;
            prog.attach_to_link(link).map_err(attach_err)?
        } else {
            let id = prog.attach(ifname, mode).map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd = FdLink::try_from(link).map_err(|e| pin_err(&path, e))?;
            fd.pin(&path).map_err(|e| pin_err(&path, e))?;
            return Ok(());
        };
        // The pin keeps the link (and so the program) alive; this handle may go.
        let link = prog.take_link(id).map_err(attach_err)?;
        drop(link);
        Ok(())
    }

    /// Removes the pinned links (detaching the program) and the pinned maps.
    pub fn unpin_all(pin_dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
        let mut removed = Vec::new();
        for sub in ["links", "maps"] {
            let dir = pin_dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                removed.push(path);
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(pin_dir);
        Ok(removed)
    }

    /// The main XDP program.
    pub fn program(&mut self) -> &mut Xdp {
        xdp(&mut self.ebpf, ebpf::PROGRAM)
    }

    /// The object, for callers that need its other programs (its maps are taken out).
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Every map of the object with its name (for its memory, say): the agent's, then
    /// those the object keeps (per-CPU scratch values, globals, the benchmark's), which
    /// the kernel holds as long as the program is loaded.
    pub fn maps(&self) -> impl Iterator<Item = (&str, &MapData)> {
        let kept = self.ebpf.maps().map(|(name, map)| (name, map_data(map)));
        self.maps.all().into_iter().chain(kept)
    }

    /// The flow hash the program runs with; all zero until `set_node` wrote it.
    pub fn flow_hash_key(&self) -> Result<FlowHashKey, DataplaneError> {
        self.maps
            .flow_hash
            .get(&0, 0)
            .map_err(|source| map_err(names::FLOW_HASH, source))
    }

    /// Writes the node's settings; until this is done the program passes everything.
    pub fn set_node(&mut self, node: &Node) -> Result<(), DataplaneError> {
        let mut cfg = NodeConfig {
            hash_seed: node.hash_seed,
            gue_port_be: node.gue_port.to_be(),
            _pad: 0,
            addr_v4: [0; 4],
            addr_v6: [0; 16],
            flags: NODE_CONFIGURED,
        };
        if let Some(v4) = node.addr_v4 {
            cfg.addr_v4 = v4.octets();
        }
        if let Some(v6) = node.addr_v6 {
            cfg.addr_v6 = v6.octets();
        }
        // Before `NODE`, whose flag makes the program forward: no packet is hashed with a
        // key not yet written.
        self.maps
            .flow_hash
            .set(0, FlowHashKey::new(node.flow_hash, node.hash_seed), 0)
            .map_err(|source| map_err(names::FLOW_HASH, source))?;
        self.maps
            .node
            .set(0, cfg, 0)
            .map_err(|source| map_err(names::NODE, source))
    }

    /// Writes backend slot `index`. Its next-hop entry is cleared first, so a reused slot
    /// never sends to the previous backend's next hop (the agent writes the new one).
    pub fn set_backend(&mut self, index: u32, ip: IpAddr) -> Result<(), DataplaneError> {
        self.set_nexthop(index, NextHopEntry::default())?;
        let value = Backend {
            addr: addr::to_bytes(ip),
            flags: lb_common::maps::BACKEND_PRESENT,
        };
        self.maps
            .backends
            .set(index, value, 0)
            .map_err(|source| map_err(names::BACKENDS, source))
    }

    /// Writes `buckets` at `offset` of the bucket map. Not visible to the data plane until a
    /// service points at it (see `set_service`).
    pub fn write_table(&mut self, offset: u32, buckets: &[Bucket]) -> Result<(), DataplaneError> {
        let m = &mut self.maps.buckets;
        for (i, b) in buckets.iter().enumerate() {
            m.set(offset + i as u32, *b, 0)
                .map_err(|source| map_err(names::BUCKETS, source))?;
        }
        Ok(())
    }

    /// Writes the buckets of `buckets` that differ from `old`, what the map holds at
    /// `offset` already (everything when `old` is unknown).
    pub fn write_table_changes(
        &mut self,
        offset: u32,
        buckets: &[Bucket],
        old: Option<&[Bucket]>,
    ) -> Result<(), DataplaneError> {
        let Some(old) = old.filter(|o| o.len() == buckets.len()) else {
            return self.write_table(offset, buckets);
        };
        let m = &mut self.maps.buckets;
        for (i, (b, o)) in buckets.iter().zip(old).enumerate() {
            if b != o {
                m.set(offset + i as u32, *b, 0)
                    .map_err(|source| map_err(names::BUCKETS, source))?;
            }
        }
        Ok(())
    }

    /// Points a service at a table: one map update, so packets see the old table or the
    /// new one, never a mix. Also registers its VIP.
    pub fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        let refs = self.maps.vips.get(&key.addr, 0).unwrap_or(0);
        let is_new = self.maps.services.get(key, 0).is_err();
        if is_new {
            // The filter first: the VIP must not be filtered out once its service is live.
            self.refresh_vip_filter(Some(key.addr))?;
            self.maps
                .vips
                .insert(key.addr, refs + 1, 0)
                .map_err(|source| map_err(names::VIPS, source))?;
        }
        self.maps
            .services
            .insert(key, value, 0)
            .map_err(|source| map_err(names::SERVICES, source))?;
        let (writes, indexed) = self.index.set(key, value);
        if !indexed {
            warn_unindexed(key);
        }
        self.write_index(&writes)
    }

    /// Whether the service index holds `key` (else its packets take the hash lookup).
    pub fn service_indexed(&self, key: &ServiceKey) -> bool {
        matches!(self.index.probe(key), service_index::Probe::Found(_))
    }

    /// Applies slot writes of the service index, in order.
    fn write_index(&mut self, writes: &[Write<ServiceSlot>]) -> Result<(), DataplaneError> {
        write_slots(&mut self.maps.service_index, names::SERVICE_INDEX, writes)
    }

    /// Removes a service (the data plane passes its packets again) and, with its last
    /// service, its VIP.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        let writes = self.index.remove(key);
        self.write_index(&writes)?;
        if self.maps.services.remove(key).is_err() {
            return Ok(());
        }
        let vips = &mut self.maps.vips;
        match vips.get(&key.addr, 0) {
            Ok(n) if n > 1 => vips
                .insert(key.addr, n - 1, 0)
                .map_err(|source| map_err(names::VIPS, source)),
            _ => {
                let _ = vips.remove(&key.addr);
                self.refresh_vip_filter(None)
            }
        }
    }

    /// Rewrites the words of the VIP filter that differ from the bits of the VIPs in
    /// `VIPS` (and `extra`).
    fn refresh_vip_filter(&mut self, extra: Option<[u8; 16]>) -> Result<(), DataplaneError> {
        let mut want = vec![0u64; VIP_FILTER_WORDS as usize];
        let keys: Vec<[u8; 16]> = self
            .maps
            .vips
            .keys()
            .filter_map(Result::ok)
            .chain(extra)
            .collect();
        for k in &keys {
            let (word, bit) = vip_filter_bit(k);
            want[word as usize] |= bit;
        }
        let filter = &mut self.maps.vip_filter;
        for (i, w) in want.iter().enumerate() {
            let i = i as u32;
            let have = filter
                .get(&i, 0)
                .map_err(|source| map_err(names::VIP_FILTER, source))?;
            if have != *w {
                filter
                    .set(i, *w, 0)
                    .map_err(|source| map_err(names::VIP_FILTER, source))?;
            }
        }
        Ok(())
    }

    /// The services in the map.
    pub fn services(&mut self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError> {
        self.maps
            .services
            .iter()
            .map(|r| r.map_err(|source| map_err(names::SERVICES, source)))
            .collect()
    }

    /// The occupied backend slots.
    pub fn backends(&mut self) -> Result<Vec<(u32, IpAddr)>, DataplaneError> {
        let m = &self.maps.backends;
        let mut out = Vec::new();
        for i in 0..m.len() {
            let b = m
                .get(&i, 0)
                .map_err(|source| map_err(names::BACKENDS, source))?;
            if b.flags & lb_common::maps::BACKEND_PRESENT != 0 {
                out.push((i, addr::from_bytes(b.addr)));
            }
        }
        Ok(out)
    }

    /// Writes the next-hop entry of backend slot `index`.
    pub fn set_nexthop(&mut self, index: u32, entry: NextHopEntry) -> Result<(), DataplaneError> {
        self.maps
            .nexthops
            .set(index, entry, 0)
            .map_err(|source| map_err(names::NEXTHOPS, source))
    }

    /// Writes the next-hop entry of address `ip`, or removes it with `None`.
    pub fn set_nexthop_of(
        &mut self,
        ip: IpAddr,
        entry: Option<NextHopEntry>,
    ) -> Result<(), DataplaneError> {
        let m = &mut self.maps.nexthops_by_addr;
        let key = addr::to_bytes(ip);
        // The hash map first on a write and last on a removal: a packet that finds no
        // slot asks it, so it never lacks what the index had.
        match entry {
            Some(e) => {
                m.insert(key, e, 0)
                    .map_err(|source| map_err(names::NEXTHOPS_BY_ADDR, source))?;
                // A full window leaves the address to the hash map, correct but slower.
                let (writes, _) = self.nexthop_index.set(&key, &e);
                write_slots(&mut self.maps.nexthop_index, names::NEXTHOP_INDEX, &writes)
            }
            None => {
                let writes = self.nexthop_index.remove(&key);
                write_slots(&mut self.maps.nexthop_index, names::NEXTHOP_INDEX, &writes)?;
                if m.get(&key, 0).is_err() {
                    return Ok(());
                }
                m.remove(&key)
                    .map_err(|source| map_err(names::NEXTHOPS_BY_ADDR, source))
            }
        }
    }

    /// Empties backend slot `index`.
    pub fn clear_backend(&mut self, index: u32) -> Result<(), DataplaneError> {
        let empty = Backend {
            addr: [0; 16],
            flags: 0,
        };
        self.maps
            .backends
            .set(index, empty, 0)
            .map_err(|source| map_err(names::BACKENDS, source))
    }

    /// Reads `len` buckets at `offset`.
    pub fn read_table(&mut self, offset: u32, len: u32) -> Result<Vec<Bucket>, DataplaneError> {
        let m = &self.maps.buckets;
        (offset..offset + len)
            .map(|i| {
                m.get(&i, 0)
                    .map_err(|source| map_err(names::BUCKETS, source))
            })
            .collect()
    }

    /// The per-reason counters, summed over CPUs.
    pub fn reason_counts(&mut self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let m = &self.maps.reason_stats;
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = m
                    .get(&(*r as u32), 0)
                    .map_err(|source| map_err(names::REASON_STATS, source))?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The counters of service `id` (`SERVICE_STATS`), summed over CPUs.
    pub fn service_counters(&mut self, id: u32) -> Result<Counters, DataplaneError> {
        summed(&self.maps.service_stats, names::SERVICE_STATS, id)
    }

    /// Sets the counters of service `id` to zero: a new service taking a freed id.
    pub fn zero_service_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zero = zeroed_per_cpu().map_err(|source| map_err(names::SERVICE_STATS, source))?;
        self.maps
            .service_stats
            .set(id, zero, 0)
            .map_err(|source| map_err(names::SERVICE_STATS, source))?;
        self.zero_local_counters(id)
    }

    fn zero_local_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        let name = names::SERVICE_LOCAL_STATS;
        let zero = zeroed_per_cpu().map_err(|source| map_err(name, source))?;
        self.maps
            .service_local_stats
            .set(id, zero, 0)
            .map_err(|source| map_err(name, source))
    }

    /// What each service forwarded to each of its backends, summed over CPUs, by
    /// (service id, backend slot). The pairs of this node's own backend include what the
    /// data plane counts for them by service id (`SERVICE_LOCAL_STATS`).
    pub fn service_backend_counters(
        &mut self,
    ) -> Result<std::collections::BTreeMap<ServiceBackendKey, Counters>, DataplaneError> {
        let name = names::SERVICE_BACKEND_STATS;
        let mut pairs = self
            .maps
            .service_backend_stats
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(|source| map_err(name, source))?;
                Ok((k, sum(&v)))
            })
            .collect::<Result<std::collections::BTreeMap<_, _>, DataplaneError>>()?;
        let indexed: Vec<(ServiceBackendKey, u32)> = self.pairs.pairs().collect();
        for (k, slot) in indexed {
            let c = summed(&self.maps.pair_stats, names::PAIR_STATS, slot)?;
            let total = pairs.entry(k).or_default();
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        let mut own = std::collections::BTreeMap::new();
        for (k, c) in &mut pairs {
            let is_own = match own.get(&k.backend) {
                Some(&o) => o,
                None => {
                    let o = self.is_own_slot(k.backend)?;
                    own.insert(k.backend, o);
                    o
                }
            };
            if is_own {
                let local = self.local_counters(k.service)?;
                c.packets += local.packets;
                c.bytes += local.bytes;
            }
        }
        Ok(pairs)
    }

    fn local_counters(&mut self, id: u32) -> Result<Counters, DataplaneError> {
        summed(
            &self.maps.service_local_stats,
            names::SERVICE_LOCAL_STATS,
            id,
        )
    }

    /// Whether backend slot `slot` holds one of this node's own addresses.
    fn is_own_slot(&mut self, slot: u32) -> Result<bool, DataplaneError> {
        let b = self
            .maps
            .backends
            .get(&slot, 0)
            .map_err(|source| map_err(names::BACKENDS, source))?;
        let n = self
            .maps
            .node
            .get(&0, 0)
            .map_err(|source| map_err(names::NODE, source))?;
        Ok(b.flags & lb_common::maps::BACKEND_PRESENT != 0 && n.is_own(&b))
    }

    /// Starts the counters of a (service, backend) pair at zero, replacing any (for this
    /// node's own backend, its counters by service id too).
    pub fn open_service_backend(&mut self, key: ServiceBackendKey) -> Result<(), DataplaneError> {
        self.remove_hashed_pair(&key)?;
        if !self.open_pair_slot(key)? {
            let name = names::SERVICE_BACKEND_STATS;
            let zero = zeroed_per_cpu().map_err(|source| map_err(name, source))?;
            self.maps
                .service_backend_stats
                .insert(key, zero, 0)
                .map_err(|source| map_err(name, source))?;
        }
        if self.is_own_slot(key.backend)? {
            self.zero_local_counters(key.service)?;
        }
        Ok(())
    }

    /// Gives `key` a slot of the pair index with zeroed counters (zeroed again when it
    /// has one). False when its window is full.
    fn open_pair_slot(&mut self, key: ServiceBackendKey) -> Result<bool, DataplaneError> {
        let Some((slot, writes)) = self.pairs.open(&key) else {
            tracing::warn!(
                service = key.service,
                backend = key.backend,
                "pair not in the pair index (its slots are taken): counted in the slower hash map"
            );
            return Ok(false);
        };
        let name = names::PAIR_STATS;
        let zero = zeroed_per_cpu().map_err(|source| map_err(name, source))?;
        self.maps
            .pair_stats
            .set(slot, zero, 0)
            .map_err(|source| map_err(name, source))?;
        self.write_pairs(&writes)?;
        Ok(true)
    }

    /// Drops the counters of a (service, backend) pair.
    pub fn close_service_backend(&mut self, key: ServiceBackendKey) -> Result<(), DataplaneError> {
        let writes = self.pairs.close(&key);
        self.write_pairs(&writes)?;
        self.remove_hashed_pair(&key)
    }

    fn write_pairs(&mut self, writes: &[crate::pair_index::Write]) -> Result<(), DataplaneError> {
        write_slots(&mut self.maps.pair_index, names::PAIR_INDEX, writes)
    }

    fn remove_hashed_pair(&mut self, key: &ServiceBackendKey) -> Result<(), DataplaneError> {
        match self.maps.service_backend_stats.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(source) => Err(map_err(names::SERVICE_BACKEND_STATS, source)),
        }
    }
}

/// This node's identity as the data plane needs it.
#[derive(Clone, Debug)]
pub struct Node {
    pub hash_seed: u32,
    pub flow_hash: FlowHash,
    pub gue_port: u16,
    pub addr_v4: Option<std::net::Ipv4Addr>,
    pub addr_v6: Option<std::net::Ipv6Addr>,
}

/// Writes `(slot, value)` pairs into the array `map` (named `name`), in order.
fn write_slots<T: aya::Pod>(
    map: &mut Array<MapData, T>,
    name: &'static str,
    writes: &[(u32, T)],
) -> Result<(), DataplaneError> {
    for (i, v) in writes {
        map.set(*i, *v, 0).map_err(|source| map_err(name, source))?;
    }
    Ok(())
}

/// Entry `id` of the per-CPU array `map` (named `name`), summed over CPUs.
fn summed(
    map: &PerCpuArray<MapData, Counters>,
    name: &'static str,
    id: u32,
) -> Result<Counters, DataplaneError> {
    let per_cpu = map.get(&id, 0).map_err(|source| map_err(name, source))?;
    Ok(sum(&per_cpu))
}

fn sum(per_cpu: &PerCpuValues<Counters>) -> Counters {
    per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

/// Zero counters for every possible CPU.
fn zeroed_per_cpu() -> Result<PerCpuValues<Counters>, aya::maps::MapError> {
    let io = |io_error| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error,
        })
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| io(e))?;
    PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(io)
}

/// Maps whose layout changed since they were first pinned, with their layout's version:
/// such a map is pinned as `NAME_VVERSION` (bpffs allows no dots in names), so an agent
/// never adopts a map laid out for another version. The earlier program keeps the map it
/// was loaded with until the new one replaces it on the interface.
const LAYOUT_VERSIONS: [(&str, u32); 3] = [
    // Home slots from a multiplicative hash (`service_index::home`).
    (names::SERVICE_INDEX, 2),
    // The same for next hops (`nexthop_index::home_of`).
    (names::NEXTHOP_INDEX, 2),
    // The hash's kind and the `multiply-shift` keys (`hash::FlowHashKey`).
    (names::FLOW_HASH, 2),
];

/// Where map `name` is pinned in pin directory `pin_dir`.
pub fn map_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    let file = match LAYOUT_VERSIONS.iter().find(|(n, _)| *n == name) {
        Some((_, version)) => format!("{name}_V{version}"),
        None => name.to_string(),
    };
    pin_dir.join("maps").join(file)
}

/// The map pins in `pin_dir` that this version does not use.
fn stale_pins(pin_dir: &Path) -> Vec<PathBuf> {
    let used: Vec<PathBuf> = names::ALL
        .iter()
        .map(|n| map_pin_path(pin_dir, n))
        .collect();
    let Ok(entries) = std::fs::read_dir(pin_dir.join("maps")) else {
        return Vec::new();
    };
    let mut stale: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| !used.contains(p))
        .collect();
    stale.sort();
    stale
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn map_err(name: &'static str, source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map { name, source }
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> &'a mut Xdp {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("the embedded object has no XDP program {name}"))
}

/// Loads XDP program `name` of `ebpf` into the kernel.
pub fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError> {
    xdp(ebpf, name)
        .load()
        .map_err(|source| DataplaneError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_of_a_changed_layout_gets_a_pin_of_its_own_and_the_old_pin_is_stale() {
        let dir = std::env::temp_dir().join(format!("lb-pins-{}", std::process::id()));
        let maps = dir.join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        assert_eq!(map_pin_path(&dir, names::SERVICES), maps.join("SERVICES"));
        assert_eq!(
            map_pin_path(&dir, names::SERVICE_INDEX),
            maps.join("SERVICE_INDEX_V2")
        );
        // An earlier version's pins: SERVICE_INDEX in its first layout, and a map this
        // version does not know.
        for f in ["SERVICES", "SERVICE_INDEX", "SERVICE_INDEX_V2", "RETIRED"] {
            std::fs::write(maps.join(f), b"").unwrap();
        }
        let stale = stale_pins(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(stale, [maps.join("RETIRED"), maps.join("SERVICE_INDEX")]);
    }
}
