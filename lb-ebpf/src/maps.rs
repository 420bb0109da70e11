//! The program's maps (names in `lb_common::maps::names`) and counter helpers.

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    hash::FlowHashKey,
    limits::{DEFAULT_BUCKET_SLOTS, MAX_BACKENDS, MAX_SERVICES, MAX_SERVICE_BACKENDS},
    maps::{
        vip_filter_bit_of_words, Backend, Bucket, Counters, NextHopEntry, NodeConfig,
        ServiceBackendKey, ServiceKey, ServiceValue, VipRefs, VIP_FILTER_WORDS,
    },
    nexthop_index::{self, NextHopSlot},
    open_index::Probe,
    pair_index::{self, PairSlot},
    parse::{Flow, Ip},
    service_index::{self, ServiceSlot},
    stats::Reason,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The services again, in an array read without a helper call (`lb_common::service_index`).
#[map]
pub static SERVICE_INDEX: Array<ServiceSlot> = Array::with_max_entries(service_index::SLOTS, 0);

/// The service with `key`: from the index, or from `SERVICES` when the index cannot tell.
#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<&'static ServiceValue> {
    match service_index::probe(key, |i| SERVICE_INDEX.get(i)) {
        Probe::Found(v) => Some(v),
        Probe::Absent => None,
        // SAFETY: the value is only read.
        Probe::Unindexed => unsafe { SERVICES.get(key) },
    }
}

/// All services' tables, each a slice at its `table_offset` (resized by the loader).
#[map]
pub static BUCKETS: Array<Bucket> = Array::with_max_entries(DEFAULT_BUCKET_SLOTS, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Next hops by backend slot, written by the agent (see `lb_common::maps::NextHopEntry`).
#[map]
pub static NEXTHOPS: Array<NextHopEntry> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The same by address, for hops the packet names (hop lists).
#[map]
pub static NEXTHOPS_BY_ADDR: HashMap<[u8; 16], NextHopEntry> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

/// `NEXTHOPS_BY_ADDR` again, in an array read without a helper call
/// (`lb_common::nexthop_index`).
#[map]
pub static NEXTHOP_INDEX: Array<NextHopSlot> = Array::with_max_entries(nexthop_index::SLOTS, 0);

/// The next hop for address `addr`, whose words (`addr::words`) are `w`: from the index,
/// or from `NEXTHOPS_BY_ADDR` when the index cannot tell.
#[inline(always)]
pub fn nexthop_of(w: [u32; 4], addr: &[u8; 16]) -> Option<&'static NextHopEntry> {
    match nexthop_index::probe(w, |i| NEXTHOP_INDEX.get(i)) {
        Probe::Found(e) => Some(e),
        Probe::Absent => None,
        // SAFETY: the value is only read.
        Probe::Unindexed => unsafe { NEXTHOPS_BY_ADDR.get(addr) },
    }
}

#[map]
pub static NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// The packet at hand's parsed facts, in a per-CPU value rather than on the stack: the
/// entry point's frame, which holds both paths, stays small enough for the frames of the
/// calls on top of it (BPF's 512 bytes for a call chain). One value, looked up once: each
/// lookup more cost every packet of the backend path about 1 ns.
#[repr(C)]
pub struct Scratch {
    /// The IP header (a GUE packet's outer one).
    pub ip: Ip,
    /// The flow: the client path's, or a GUE packet's inner one.
    pub flow: Flow,
    /// The socket lookup's tuple (`socket::owns`).
    pub tuple: bpf_sock_tuple,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The flow hash's seed and IPv4 head (`lb_common::hash::FlowHashKey`), written before
/// `NODE`.
#[map]
pub static FLOW_HASH: Array<FlowHashKey> = Array::with_max_entries(1, 0);

#[map]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT as u32, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// What each service forwarded to each of its backends, for the pairs the pair index has
/// no room for (entries made by the agent).
#[map]
pub static SERVICE_BACKEND_STATS: PerCpuHashMap<ServiceBackendKey, Counters> =
    PerCpuHashMap::with_max_entries(MAX_SERVICE_BACKENDS, 0);

/// The (service, backend) pairs the agent opened (`lb_common::pair_index`).
#[map]
pub static PAIR_INDEX: Array<PairSlot> = Array::with_max_entries(pair_index::SLOTS, 0);

/// What each pair of `PAIR_INDEX` forwarded, at the pair's slot.
#[map]
pub static PAIR_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(pair_index::SLOTS, 0);

/// What each service's buckets whose first hop is this node carried (delivered locally or
/// sent on from here), by service id: see `lb_common::maps::ServiceBackendKey`.
#[map]
pub static SERVICE_LOCAL_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Counts one packet under the reason with index `reason`.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Adds a packet of `bytes` to the counters of service `id` and of its backend in slot
/// `backend`.
#[inline(always)]
pub fn add(id: u32, backend: u32, bytes: u64) {
    bump(SERVICE_STATS.get_ptr_mut(id), bytes);
    let key = ServiceBackendKey {
        service: id,
        backend,
    };
    match pair_index::probe(&key, |i| PAIR_INDEX.get(i)) {
        pair_index::Probe::Slot(i) => bump(PAIR_STATS.get_ptr_mut(i), bytes),
        pair_index::Probe::Unindexed => bump(SERVICE_BACKEND_STATS.get_ptr_mut(key), bytes),
        pair_index::Probe::Absent => {}
    }
}

/// As `add`, for a packet of a bucket whose first hop is this node.
#[inline(always)]
pub fn add_local(id: u32, bytes: u64) {
    bump(SERVICE_STATS.get_ptr_mut(id), bytes);
    bump(SERVICE_LOCAL_STATS.get_ptr_mut(id), bytes);
}

#[inline(always)]
fn bump(c: Option<*mut Counters>, bytes: u64) {
    if let Some(c) = c {
        // SAFETY: a per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// VIPs of all services: see `lb_common::maps::VipRefs`.
#[map]
pub static VIPS: HashMap<[u8; 16], VipRefs> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// See `lb_common::maps::vip_filter_bit`.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// False when `addr` is certainly no VIP (its bit in the VIP filter is clear).
#[inline(always)]
pub fn maybe_vip(addr: [u32; 4]) -> bool {
    let (word, bit) = vip_filter_bit_of_words(addr);
    VIP_FILTER.get(word).is_some_and(|w| w & bit != 0)
}

/// Whether `addr` is the VIP of any service.
#[inline(always)]
pub fn is_vip(addr: &[u8; 16]) -> bool {
    VIPS.get_ptr(addr).is_some()
}
