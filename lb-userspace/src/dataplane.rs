//! The data plane as userspace sees it: the loaded XDP object, its programs and maps.
//! Everything that writes the maps goes through here so the layout rules (see
//! `lb_common::maps`) live in one place.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr,
    maps::{
        names, vip_filter_bit, Backend, Bucket, Counters, NextHopEntry, NodeConfig,
        ServiceBackendKey, ServiceKey, ServiceValue, VipRefs, NODE_CONFIGURED, VIP_FILTER_WORDS,
    },
    stats::Reason,
    tcp_window::{self, TcpSockOffsets},
};

use crate::{ebpf, kernel_btf};

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

/// Every map of the object (also the pin names under `maps/`).
pub const MAP_NAMES: [&str; 11] = [
    names::SERVICES,
    names::VIPS,
    names::VIP_FILTER,
    names::BUCKETS,
    names::BACKENDS,
    names::NODE,
    names::REASON_STATS,
    names::SERVICE_STATS,
    names::SERVICE_BACKEND_STATS,
    names::NEXTHOPS,
    names::NEXTHOPS_BY_ADDR,
];

/// The loaded object: the main program verified and loaded, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
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
                adopted = maps.join(names::SERVICES).exists();
                MAP_NAMES.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // Without the kernel's BTF the program checks a socket's state but not its
        // windows (`lb_common::tcp_window`).
        let tcp_sock = kernel_btf::tcp_sock_offsets().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no struct tcp_sock layout: socket windows unchecked");
            TcpSockOffsets::UNKNOWN
        });
        loader.override_global(tcp_window::OFFSETS_GLOBAL, &tcp_sock, true);
        let mut ebpf = loader.load(ebpf::object()).map_err(DataplaneError::Load)?;
        load_program(&mut ebpf, ebpf::PROGRAM)?;
        Ok(Dataplane {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            adopted,
        })
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

    /// The object, for callers that need other programs or raw map access.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
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
        let mut m: Array<&mut MapData, NodeConfig> = self.map_mut(names::NODE)?;
        m.set(0, cfg, 0)
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
        let mut m: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
        m.set(index, value, 0)
            .map_err(|source| map_err(names::BACKENDS, source))
    }

    /// Writes `buckets` at `offset` of the bucket map. Not visible to the data plane until a
    /// service points at it (see `set_service`).
    pub fn write_table(&mut self, offset: u32, buckets: &[Bucket]) -> Result<(), DataplaneError> {
        let mut m: Array<&mut MapData, Bucket> = self.map_mut(names::BUCKETS)?;
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
        let mut m: Array<&mut MapData, Bucket> = self.map_mut(names::BUCKETS)?;
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
        let vips: HashMap<&mut MapData, [u8; 16], VipRefs> = self.map_mut(names::VIPS)?;
        let refs = vips.get(&key.addr, 0).unwrap_or(0);
        let is_new = {
            let services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
                self.map_mut(names::SERVICES)?;
            services.get(key, 0).is_err()
        };
        if is_new {
            // The filter first: the VIP must not be filtered out once its service is live.
            self.refresh_vip_filter(Some(key.addr))?;
            let mut vips: HashMap<&mut MapData, [u8; 16], VipRefs> = self.map_mut(names::VIPS)?;
            vips.insert(key.addr, refs + 1, 0)
                .map_err(|source| map_err(names::VIPS, source))?;
        }
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(names::SERVICES)?;
        services
            .insert(key, value, 0)
            .map_err(|source| map_err(names::SERVICES, source))
    }

    /// Removes a service (the data plane passes its packets again) and, with its last
    /// service, its VIP.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(names::SERVICES)?;
        if services.remove(key).is_err() {
            return Ok(());
        }
        let mut vips: HashMap<&mut MapData, [u8; 16], VipRefs> = self.map_mut(names::VIPS)?;
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
        let vips: HashMap<&mut MapData, [u8; 16], VipRefs> = self.map_mut(names::VIPS)?;
        let mut want = vec![0u64; VIP_FILTER_WORDS as usize];
        let keys: Vec<[u8; 16]> = vips.keys().filter_map(Result::ok).chain(extra).collect();
        for k in &keys {
            let (word, bit) = vip_filter_bit(k);
            want[word as usize] |= bit;
        }
        let mut filter: Array<&mut MapData, u64> = self.map_mut(names::VIP_FILTER)?;
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
        let services: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            self.map_mut(names::SERVICES)?;
        services
            .iter()
            .map(|r| r.map_err(|source| map_err(names::SERVICES, source)))
            .collect()
    }

    /// The occupied backend slots.
    pub fn backends(&mut self) -> Result<Vec<(u32, IpAddr)>, DataplaneError> {
        let m: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
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
        let mut m: Array<&mut MapData, NextHopEntry> = self.map_mut(names::NEXTHOPS)?;
        m.set(index, entry, 0)
            .map_err(|source| map_err(names::NEXTHOPS, source))
    }

    /// Writes the next-hop entry of address `ip`, or removes it with `None`.
    pub fn set_nexthop_of(
        &mut self,
        ip: IpAddr,
        entry: Option<NextHopEntry>,
    ) -> Result<(), DataplaneError> {
        let mut m: HashMap<&mut MapData, [u8; 16], NextHopEntry> =
            self.map_mut(names::NEXTHOPS_BY_ADDR)?;
        let key = addr::to_bytes(ip);
        match entry {
            Some(e) => m.insert(key, e, 0),
            None if m.get(&key, 0).is_err() => Ok(()),
            None => m.remove(&key),
        }
        .map_err(|source| map_err(names::NEXTHOPS_BY_ADDR, source))
    }

    /// Empties backend slot `index`.
    pub fn clear_backend(&mut self, index: u32) -> Result<(), DataplaneError> {
        let empty = Backend {
            addr: [0; 16],
            flags: 0,
        };
        let mut m: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
        m.set(index, empty, 0)
            .map_err(|source| map_err(names::BACKENDS, source))
    }

    /// Reads `len` buckets at `offset`.
    pub fn read_table(&mut self, offset: u32, len: u32) -> Result<Vec<Bucket>, DataplaneError> {
        let m: Array<&mut MapData, Bucket> = self.map_mut(names::BUCKETS)?;
        (offset..offset + len)
            .map(|i| {
                m.get(&i, 0)
                    .map_err(|source| map_err(names::BUCKETS, source))
            })
            .collect()
    }

    /// The per-reason counters, summed over CPUs.
    pub fn reason_counts(&mut self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let m: PerCpuArray<&mut MapData, u64> = self.map_mut(names::REASON_STATS)?;
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
        let m: PerCpuArray<&mut MapData, Counters> = self.map_mut(names::SERVICE_STATS)?;
        let per_cpu = m
            .get(&id, 0)
            .map_err(|source| map_err(names::SERVICE_STATS, source))?;
        Ok(sum(&per_cpu))
    }

    /// Sets the counters of service `id` to zero: a new service taking a freed id.
    pub fn zero_service_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zero = zeroed_per_cpu().map_err(|source| map_err(names::SERVICE_STATS, source))?;
        let mut m: PerCpuArray<&mut MapData, Counters> = self.map_mut(names::SERVICE_STATS)?;
        m.set(id, zero, 0)
            .map_err(|source| map_err(names::SERVICE_STATS, source))
    }

    /// What each service forwarded to each of its backends, summed over CPUs, by
    /// (service id, backend slot).
    pub fn service_backend_counters(
        &mut self,
    ) -> Result<std::collections::BTreeMap<ServiceBackendKey, Counters>, DataplaneError> {
        let name = names::SERVICE_BACKEND_STATS;
        let m: PerCpuHashMap<&mut MapData, ServiceBackendKey, Counters> = self.map_mut(name)?;
        m.iter()
            .map(|r| {
                let (k, v) = r.map_err(|source| map_err(name, source))?;
                Ok((k, sum(&v)))
            })
            .collect()
    }

    /// Starts the counters of a (service, backend) pair at zero, replacing any.
    pub fn open_service_backend(&mut self, key: ServiceBackendKey) -> Result<(), DataplaneError> {
        let name = names::SERVICE_BACKEND_STATS;
        let zero = zeroed_per_cpu().map_err(|source| map_err(name, source))?;
        let mut m: PerCpuHashMap<&mut MapData, ServiceBackendKey, Counters> = self.map_mut(name)?;
        m.insert(key, zero, 0)
            .map_err(|source| map_err(name, source))
    }

    /// Drops the counters of a (service, backend) pair.
    pub fn close_service_backend(&mut self, key: ServiceBackendKey) -> Result<(), DataplaneError> {
        let name = names::SERVICE_BACKEND_STATS;
        let mut m: PerCpuHashMap<&mut MapData, ServiceBackendKey, Counters> = self.map_mut(name)?;
        match m.remove(&key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(source) => Err(map_err(name, source)),
        }
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        T::try_from(map).map_err(|source| map_err(name, source))
    }
}

/// This node's identity as the data plane needs it.
#[derive(Clone, Debug)]
pub struct Node {
    pub hash_seed: u32,
    pub gue_port: u16,
    pub addr_v4: Option<std::net::Ipv4Addr>,
    pub addr_v6: Option<std::net::Ipv6Addr>,
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
