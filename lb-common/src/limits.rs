//! Limits of the data plane. Map sizes follow from these; userspace checks configs and
//! commands against them before it touches a map (see docs/limits.md).

/// Services (VIP, port, protocol) one node can serve.
pub const MAX_SERVICES: u32 = 1024;
/// Backend slots on one node, over all services.
pub const MAX_BACKENDS: u32 = 16384;
/// Backends of one service.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4096;
/// (service, backend) pairs on one node, over all services: the entries of the
/// per-(service, backend) counters.
pub const MAX_SERVICE_BACKENDS: u32 = 65536;
/// Smallest and largest table of one service, as powers of two.
pub const MIN_TABLE_BITS: u32 = 4;
pub const MAX_TABLE_BITS: u32 = 20;
/// The table size when a service names none.
pub const DEFAULT_TABLE_BITS: u32 = 16;
/// Buckets in the shared bucket map when the agent's config names no size: room for
/// 16 services with default tables, each double-buffered.
pub const DEFAULT_BUCKET_SLOTS: u32 = 1 << 21;
/// The largest weight of a backend.
pub const MAX_WEIGHT: u32 = 65535;
/// Headers are looked for only this far into a packet: a header starting further in counts
/// as missing. The bound also tells the verifier that an offset which went through memory
/// (and lost its known range) is small.
pub const MAX_HEADER_OFFSET: usize = 1024;
/// IPv6 extension headers walked before giving up on finding the transport header (the
/// verifier needs a fixed trip count).
pub const MAX_EXT_HEADERS: usize = 3;
