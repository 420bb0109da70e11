//! Keys and values of the BPF maps. All `#[repr(C)]` with explicit padding; sizes are
//! asserted because the kernel and userspace must agree byte for byte.

/// Key of the `SERVICES` map. Aligned to 4 bytes (its size stays 20) so that the data
/// plane copies the address into it a word at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The VIP (see `addr`).
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `SERVICES` map. Userspace replaces the whole value to flip a service to
/// a newly written table, so the data plane sees either the old table or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into the per-service counters.
    pub id: u32,
    /// First bucket of this service's live table in `BUCKETS`.
    pub table_offset: u32,
    /// The table holds `1 << table_bits` buckets.
    pub table_bits: u32,
    /// `SERVICE_*` flags.
    pub flags: u32,
}

/// Value of the `VIPS` map (key: the VIP as 16 bytes): how many services use the VIP.
/// Consulted only for packets whose ports cannot be read (fragments, cut-short headers),
/// to tell "for lb, drop" from "not for lb, pass".
pub type VipRefs = u32;

/// The VIP filter: a bitmap over all VIPs (`VIP_FILTER`, `VIP_FILTER_WORDS` u64 words),
/// so traffic to other addresses is passed after one array read instead of parsing and
/// two hash lookups. A set bit only means "maybe a VIP"; the full path decides.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The bit of `addr` in the VIP filter (word index, bit in the word).
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16]) -> (u32, u64) {
    vip_filter_bit_of_words(crate::addr::words(addr))
}

/// `vip_filter_bit` of an address given as its four words in memory order.
#[inline(always)]
pub fn vip_filter_bit_of_words(w: [u32; 4]) -> (u32, u64) {
    // Little-endian words, as the filter was first laid out (BPF is little-endian here).
    let w = w.map(u32::from_le);
    let h = crate::hash::fmix32(
        w[0] ^ w[1].rotate_left(8) ^ w[2].rotate_left(16) ^ w[3].rotate_left(24),
    );
    let bit = h % (VIP_FILTER_WORDS * 64);
    (bit / 64, 1u64 << (bit % 64))
}

/// One bucket of a forwarding table: backend indices into `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Bucket {
    /// The backend that owns the bucket now.
    pub first: u32,
    /// The backend that owned it before (daisy chaining), or [`NO_BACKEND`].
    pub second: u32,
}

/// An empty slot in a [`Bucket`].
pub const NO_BACKEND: u32 = u32::MAX;

impl Bucket {
    pub const EMPTY: Bucket = Bucket {
        first: NO_BACKEND,
        second: NO_BACKEND,
    };
}

/// Value of the `BACKENDS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The backend's GUE address (see `addr`).
    pub addr: [u8; 16],
    /// `BACKEND_*` flags.
    pub flags: u32,
}

/// The slot holds a backend.
pub const BACKEND_PRESENT: u32 = 1;

impl Backend {
    /// `addr` as words (`Backend` is 4-aligned, its address first).
    #[inline(always)]
    pub fn addr_words(&self) -> [u32; 4] {
        // SAFETY: `addr` is at offset 0 of a 4-aligned struct.
        unsafe { crate::addr::aligned_words(self.addr.as_ptr()) }
    }

    /// Whether the backend's address is IPv4 (see `addr`).
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        let w = self.addr_words();
        w[0] == 0 && w[1] == 0 && w[2] == crate::addr::V4_MAPPED_WORD
    }
}

impl NodeConfig {
    /// Whether backend `b` is this node itself (one of its GUE addresses).
    #[inline(always)]
    pub fn is_own(&self, b: &Backend) -> bool {
        let w = b.addr_words();
        if b.is_v4() {
            let mine = self.addr_v4_word();
            return mine != 0 && w[3] == mine;
        }
        let mine = self.addr_v6_words();
        mine != [0; 4] && w == mine
    }

    /// `addr_v4` in one aligned load.
    #[inline(always)]
    pub fn addr_v4_word(&self) -> u32 {
        // SAFETY: `addr_v4` is at a 4-aligned offset (asserted below) of a 4-aligned
        // struct.
        let [w] = unsafe { crate::addr::aligned_words::<1>(self.addr_v4.as_ptr()) };
        w
    }

    /// `addr_v6` in four aligned loads.
    #[inline(always)]
    pub fn addr_v6_words(&self) -> [u32; 4] {
        // SAFETY: as `addr_v4_word`.
        unsafe { crate::addr::aligned_words(self.addr_v6.as_ptr()) }
    }
}
const _: () = assert!(core::mem::offset_of!(NodeConfig, addr_v4) % 4 == 0);
const _: () = assert!(core::mem::offset_of!(NodeConfig, addr_v6) % 4 == 0);

/// The one value of the `NODE` array: this node's identity and settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Fleet-wide flow hash seed. The data plane hashes with `FLOW_HASH`, which the agent
    /// writes from it.
    pub hash_seed: u32,
    /// The UDP port GUE packets are sent to and received on, network byte order.
    pub gue_port_be: u16,
    pub _pad: u16,
    /// This node's IPv4 address for GUE (source of what it sends, destination of what it
    /// decapsulates); all zero when it has none.
    pub addr_v4: [u8; 4],
    /// The same for IPv6.
    pub addr_v6: [u8; 16],
    /// `NODE_*` flags.
    pub flags: u32,
}

/// The node has been configured; until then the program passes everything.
pub const NODE_CONFIGURED: u32 = 1;

/// Where a packet to one next hop leaves this node, resolved by the agent from the kernel's
/// routes, neighbours and links: the value of `NEXTHOPS` (by backend slot, for the client
/// path) and of `NEXTHOPS_BY_ADDR` (by address, for hops named in a hop list). The data
/// plane falls back to `bpf_fib_lookup` when the entry is missing or not `NEXTHOP_VALID`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHopEntry {
    /// The egress interface.
    pub ifindex: u32,
    /// The largest outer packet (from the IP header on) the egress takes: the route's
    /// MTU if it has one, else the interface's.
    pub mtu: u16,
    /// `NEXTHOP_*` flags.
    pub flags: u16,
    /// The neighbour's MAC (the gateway's, or the hop's own on a connected route).
    pub dmac: [u8; 6],
    /// The egress interface's MAC.
    pub smac: [u8; 6],
}

/// The entry is resolved and may be used.
pub const NEXTHOP_VALID: u16 = 1;

/// Packet and byte counters (per CPU in the maps; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// A (service, backend) pair: what one service forwarded to one backend, counted in
/// `PAIR_STATS` at the pair's slot of `PAIR_INDEX` (`pair_index`), or in
/// `SERVICE_BACKEND_STATS` when the index has no room for it. The agent opens the pair
/// (zeroed) before a table of the service sends anything to the slot, and closes it when
/// the backend leaves the service, so a reused slot or service id starts from zero. What a service's buckets owned by this node itself carry is counted
/// in `SERVICE_LOCAL_STATS` instead, by service id: an array, cheaper per packet than
/// this hash, and a service has one such backend at most. Userspace adds it to this
/// node's own pair (`Dataplane::service_backend_counters`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceBackendKey {
    /// `ServiceValue::id`.
    pub service: u32,
    /// The backend's slot in `BACKENDS`.
    pub backend: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceBackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<Bucket>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 32);
const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::size_of::<NextHopEntry>() == 20);

/// Names of the maps in the object file (also their pin names).
pub mod names {
    pub const SERVICES: &str = "SERVICES";
    pub const VIPS: &str = "VIPS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const BUCKETS: &str = "BUCKETS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const NODE: &str = "NODE";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SERVICE_BACKEND_STATS: &str = "SERVICE_BACKEND_STATS";
    pub const SERVICE_LOCAL_STATS: &str = "SERVICE_LOCAL_STATS";
    pub const NEXTHOPS: &str = "NEXTHOPS";
    pub const NEXTHOPS_BY_ADDR: &str = "NEXTHOPS_BY_ADDR";
    pub const SERVICE_INDEX: &str = "SERVICE_INDEX";
    pub const NEXTHOP_INDEX: &str = "NEXTHOP_INDEX";
    pub const PAIR_INDEX: &str = "PAIR_INDEX";
    pub const PAIR_STATS: &str = "PAIR_STATS";
    pub const FLOW_HASH: &str = "FLOW_HASH";

    /// Every map userspace knows (pinned under these names).
    pub const ALL: [&str; 17] = [
        SERVICES,
        VIPS,
        VIP_FILTER,
        BUCKETS,
        BACKENDS,
        NODE,
        REASON_STATS,
        SERVICE_STATS,
        SERVICE_BACKEND_STATS,
        SERVICE_LOCAL_STATS,
        NEXTHOPS,
        NEXTHOPS_BY_ADDR,
        SERVICE_INDEX,
        NEXTHOP_INDEX,
        PAIR_INDEX,
        PAIR_STATS,
        FLOW_HASH,
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // Each: plain `repr(C)` data with explicit padding and no invalid bit patterns.
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceBackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NextHopEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::service_index::ServiceSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::nexthop_index::NextHopSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::pair_index::PairSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::hash::FlowHashKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    #[test]
    fn a_node_owns_its_own_addresses_only() {
        let node = NodeConfig {
            hash_seed: 0,
            gue_port_be: 0,
            _pad: 0,
            addr_v4: [10, 0, 0, 1],
            addr_v6: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            flags: 0,
        };
        let b = |addr| Backend { addr, flags: 1 };
        assert!(node.is_own(&b(v4_mapped([10, 0, 0, 1]))));
        assert!(!node.is_own(&b(v4_mapped([10, 0, 0, 2]))));
        assert!(node.is_own(&b(node.addr_v6)));
        assert!(!node.is_own(&b([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])));
        // An IPv6 address whose last word is the node's IPv4 address is not the node.
        let mut tricky = [0u8; 16];
        tricky[12..].copy_from_slice(&node.addr_v4);
        assert!(!node.is_own(&b(tricky)));
        assert!(b(v4_mapped([192, 0, 2, 1])).is_v4() && !b(node.addr_v6).is_v4());
        // A node without an address of a family owns no backend of it.
        let bare = NodeConfig {
            addr_v4: [0; 4],
            addr_v6: [0; 16],
            ..node
        };
        assert!(!bare.is_own(&b(v4_mapped([0, 0, 0, 0]))));
        assert!(!bare.is_own(&b([0; 16])));
    }

    #[test]
    fn vip_filter_bits_spread() {
        // 1,024 VIPs in a 65,536-bit filter: few share a bit, so foreign addresses
        // mostly miss.
        let mut seen = [0u64; VIP_FILTER_WORDS as usize];
        let mut collisions = 0;
        for i in 0..1024u32 {
            let (w, b) = vip_filter_bit(&v4_mapped((0x0a64_0000 + i).to_be_bytes()));
            assert!(w < VIP_FILTER_WORDS);
            collisions += u32::from(seen[w as usize] & b != 0);
            seen[w as usize] |= b;
        }
        assert!(collisions < 32, "{collisions} collisions");
    }
}
