//! The agent's configuration: JSON, unknown fields rejected, validated as a whole so that
//! one run names every problem and an invalid file changes nothing.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    encap::DEFAULT_GUE_PORT,
    hash::FlowHash,
    limits::{
        DEFAULT_BUCKET_SLOTS, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, MAX_TABLE_BITS,
        MAX_WEIGHT, MIN_TABLE_BITS,
    },
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSettings,
    #[serde(default)]
    pub agent: AgentConfig,
    /// Services this node load-balances (empty on a pure backend).
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// VIPs this node serves as a backend: put on `lo` so the stack accepts them.
    #[serde(default)]
    pub backend_vips: Vec<IpAddr>,
    /// The largest MSS this node advertises on connections to its backend VIPs, so that
    /// clients' full-size segments fit the load balancer's encapsulation (docs/mtu.md);
    /// `null` leaves the stack's own.
    #[serde(default = "default_vip_mss")]
    pub vip_mss: Option<VipMss>,
    /// Load reports and load-driven weights (docs/load.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<crate::load::config::LoadConfig>,
    /// Share services, health and tables with the other nodes of a fleet through etcd
    /// (docs/fleet.md): the services then come from the store, the file's seed an empty
    /// one. Absent: this node alone, from this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::store::FleetConfig>,
}

/// MSS per VIP family (see `Config::vip_mss`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VipMss {
    #[serde(default = "default_vip_mss_v4")]
    pub ipv4: u16,
    #[serde(default = "default_vip_mss_v6")]
    pub ipv6: u16,
}

/// 1500-byte links, the IPv6 outer overhead (72, the larger), IPv4 and TCP headers (40).
fn default_vip_mss_v4() -> u16 {
    1500 - 72 - 40
}

/// As for IPv4, with IPv6 and TCP headers (60).
fn default_vip_mss_v6() -> u16 {
    1500 - 72 - 60
}

fn default_vip_mss() -> Option<VipMss> {
    Some(VipMss {
        ipv4: default_vip_mss_v4(),
        ipv6: default_vip_mss_v6(),
    })
}

/// This node's place in the network.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Interfaces the XDP program is attached to.
    pub interfaces: Vec<String>,
    /// The node's addresses for GUE: source of what it sends, destination of what it
    /// receives. At least one.
    #[serde(default)]
    pub address_v4: Option<Ipv4Addr>,
    #[serde(default)]
    pub address_v6: Option<Ipv6Addr>,
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// The flow hash seed: the same on every LB node of a fleet.
    #[serde(default)]
    pub hash_seed: u32,
    /// The flow hash: `murmur3` (the default, every earlier version's) or
    /// `multiply-shift` (cheaper per packet). The same on every LB node of a fleet; a
    /// change, like one of the seed, moves nearly every flow to another bucket.
    #[serde(default)]
    pub flow_hash: FlowHash,
    #[serde(default)]
    pub xdp_mode: XdpMode,
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fast; needs driver support, which veth and most NICs have).
    #[default]
    Native,
    /// Generic mode, after the skb is built (works everywhere, slower).
    Skb,
}

/// Where the agent keeps its state and serves its API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The operator API's Unix socket (mode 0600, root only).
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Prometheus metrics address; `null` turns metrics off.
    #[serde(default = "default_metrics")]
    pub metrics: Option<SocketAddr>,
    /// bpffs directory where maps and links are pinned.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Entries of the shared bucket map (all tables, double-buffered).
    #[serde(default = "default_bucket_slots")]
    pub bucket_slots: u32,
    /// A group whose members (by primary group) may use the API's read-only requests
    /// (list, table, plan); the socket is then mode 0660 and owned by that group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_read_only_group: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            api_socket: default_api_socket(),
            metrics: default_metrics(),
            pin_dir: default_pin_dir(),
            bucket_slots: default_bucket_slots(),
            api_read_only_group: None,
        }
    }
}

/// Transport protocol of a service.
#[derive(
    Clone,
    Copy,
    Debug,
    Deserialize,
    Serialize,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol {s:?} (tcp or udp)")),
        }
    }
}

/// One service: a VIP, port and protocol, and its backends.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// A name operators use in commands; unique.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// log2 of the table size.
    /// log2 of the table size; by default 16, growing with the backend count (see
    /// `ServiceConfig::bits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_bits: Option<u32>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// The table size in use: `table_bits`, or 2^16 growing with the backend count so
    /// that each backend keeps enough buckets for low movement (`table::default_table_bits`).
    pub fn bits(&self) -> u32 {
        self.table_bits
            .unwrap_or_else(|| crate::table::default_table_bits(self.backends.len()))
    }
}

/// A backend of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend's GUE address (where encapsulated packets go).
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Draining: keeps its connections, gets no new ones.
    #[serde(default)]
    pub drain: bool,
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// A backend's health check.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: CheckKind,
    /// The HTTP path (`http` only).
    #[serde(default)]
    pub path: Option<String>,
    /// Port to check; the service port when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// The datagram a `udp` check sends (text; `lb-health-check` when unset). Any answer
    /// is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// Check through the tunnel: the probe goes to the backend GUE-encapsulated, to the
    /// VIP, as client packets do (`tcp`: IPv4 VIPs, needs CAP_NET_RAW; `udp`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tunnel: bool,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Successes in a row that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take a backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

/// What a health check does.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET whose status must be 2xx or 3xx.
    Http,
    /// A UDP datagram (`send`) that must be answered; an ICMP port unreachable or no
    /// answer within the timeout is a failure.
    Udp,
}

impl HealthConfig {
    /// The datagram a `udp` check sends.
    pub fn udp_payload(&self) -> &[u8] {
        self.send.as_deref().unwrap_or("lb-health-check").as_bytes()
    }

    /// The HTTP path to get (`/` when unset).
    pub fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}
/// Where the API socket is unless `agent.api_socket` says otherwise.
pub const DEFAULT_API_SOCKET: &str = "/run/lb/lb.sock";

fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}
fn default_metrics() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9640)))
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}
fn default_bucket_slots() -> u32 {
    DEFAULT_BUCKET_SLOTS
}
fn default_weight() -> u32 {
    100
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Everything wrong with a configuration, one line each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The JSON does not fit the format: `field` is where (`services[0].backends[1].weight`),
    /// `error` says what is wrong there, with the value it found (it is in the message,
    /// so it is not also a `source`).
    #[error("{path}: {field}: {error}")]
    Parse {
        path: PathBuf,
        field: String,
        error: serde_json::Error,
    },
    #[error("{path}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates the contents of `path`.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = match e.path().to_string() {
                p if p == "." => "(top level)".to_string(),
                p => p,
            };
            ConfigError::Parse {
                path: path.into(),
                field,
                error: e.into_inner(),
            }
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.into(),
                problems,
            })
        }
    }

    /// Whether `a` is one of this node's own addresses: a backend at it is this node
    /// itself, which serves the service's traffic from its local stack.
    pub fn is_local(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(v4) => self.node.address_v4 == Some(v4),
            IpAddr::V6(v6) => self.node.address_v6 == Some(v6),
        }
    }

    /// The VIPs this node's stack must accept: `backend_vips`, and the VIP of every
    /// service that has this node itself as a backend.
    pub fn served_vips(&self) -> Vec<IpAddr> {
        let mut vips: BTreeSet<IpAddr> = self.backend_vips.iter().copied().collect();
        for s in &self.services {
            if s.backends.iter().any(|b| self.is_local(b.address)) {
                vips.insert(s.vip);
            }
        }
        vips.into_iter().collect()
    }

    /// Where the configuration asks for more than the data plane holds: services,
    /// backends, buckets (part of `problems`).
    pub fn capacity_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.services.len() > MAX_SERVICES as usize {
            p.push(format!(
                "services: {} services, at most {MAX_SERVICES}",
                self.services.len()
            ));
        }
        let mut all_backends = BTreeSet::new();
        let mut slots_needed = 0u64;
        for (i, s) in self.services.iter().enumerate() {
            if s.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
                p.push(format!(
                    "services[{i}] ({}): backends: {} backends, at most \
                     {MAX_BACKENDS_PER_SERVICE}",
                    s.name,
                    s.backends.len()
                ));
            }
            all_backends.extend(s.backends.iter().map(|b| b.address));
            slots_needed += 2u64 << s.bits().min(MAX_TABLE_BITS);
        }
        if all_backends.len() > MAX_BACKENDS as usize {
            p.push(format!(
                "services: {} distinct backends, at most {MAX_BACKENDS}",
                all_backends.len()
            ));
        }
        let slots = self.agent.bucket_slots;
        if slots_needed > u64::from(slots) {
            p.push(format!(
                "services: the tables need {slots_needed} buckets (each double-buffered), \
                 agent.bucket_slots is {slots}"
            ));
        }
        p
    }

    /// Every problem of the configuration as a whole (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let n = &self.node;
        if n.interfaces.is_empty() {
            p.push("node.interfaces: name at least one interface".into());
        }
        for i in &n.interfaces {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                p.push(format!(
                    "node.interfaces: {i:?} is not a valid interface name"
                ));
            }
        }
        if n.address_v4.is_none() && n.address_v6.is_none() {
            p.push("node: set address_v4 or address_v6 (the node's GUE address)".into());
        }
        if let Some(a) = n.address_v4 {
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                p.push(format!("node.address_v4: {a} cannot be a node address"));
            }
        }
        if let Some(a) = n.address_v6 {
            if a.is_unspecified() || a.is_multicast() {
                p.push(format!("node.address_v6: {a} cannot be a node address"));
            }
        }
        if n.gue_port == 0 {
            p.push("node.gue_port: 0 is not a port".into());
        }
        let a = &self.agent;
        if a.bucket_slots == 0 || a.bucket_slots > 1 << 26 {
            p.push(format!(
                "agent.bucket_slots: {} is out of range (1 to {})",
                a.bucket_slots,
                1u32 << 26
            ));
        }
        let mut names = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", s.name);
            p.extend(
                service_problems(s)
                    .into_iter()
                    .map(|m| format!("{at}: {m}")),
            );
            if !names.insert(s.name.clone()) {
                p.push(format!("{at}: the name {:?} is used twice", s.name));
            }
            if !keys.insert((s.vip, s.port, s.protocol)) {
                p.push(format!(
                    "{at}: {} {}:{} is defined twice",
                    s.protocol, s.vip, s.port
                ));
            }
            for b in &s.backends {
                if b.address.is_ipv4() && n.address_v4.is_none() {
                    p.push(format!(
                        "{at}: backend {} is IPv4 but the node has no address_v4",
                        b.address
                    ));
                }
                let tunnel = b.health.as_ref().is_some_and(|h| h.tunnel);
                if tunnel
                    && (s.vip.is_ipv4() && n.address_v4.is_none()
                        || s.vip.is_ipv6() && n.address_v6.is_none())
                {
                    p.push(format!(
                        "{at}: backend {}: a tunnel check needs the node's address of the VIP's \
                         family (the probe's source)",
                        b.address
                    ));
                }
                if b.address.is_ipv6() && n.address_v6.is_none() {
                    p.push(format!(
                        "{at}: backend {} is IPv6 but the node has no address_v6",
                        b.address
                    ));
                }
            }
        }
        p.extend(self.capacity_problems());
        p.extend(crate::load::config::problems(self));
        if let Some(f) = &self.fleet {
            p.extend(f.problems());
        }
        let mut vips = BTreeSet::new();
        for v in &self.backend_vips {
            if !vips.insert(v) {
                p.push(format!("backend_vips: {v} is listed twice"));
            }
            if v.is_unspecified() || v.is_multicast() {
                p.push(format!("backend_vips: {v} cannot be a VIP"));
            }
        }
        // The smallest MSS each family must take (576 - 40, 1280 - 60).
        if let Some(m) = self.vip_mss {
            if m.ipv4 < 536 {
                p.push(format!("vip_mss.ipv4: {} is below 536", m.ipv4));
            }
            if m.ipv6 < 1220 {
                p.push(format!("vip_mss.ipv6: {} is below 1220", m.ipv6));
            }
        }
        p
    }
}

/// What is allowed but likely wrong in a service: a check of the service's own port with
/// the other protocol (a TCP check of a UDP service fails forever, and the reverse).
pub fn service_warnings(s: &ServiceConfig) -> Vec<String> {
    let mut w = Vec::new();
    for b in &s.backends {
        let Some(h) = &b.health else { continue };
        let check_proto = match h.kind {
            CheckKind::Tcp | CheckKind::Http => Protocol::Tcp,
            CheckKind::Udp => Protocol::Udp,
        };
        if h.port.is_none() && check_proto != s.protocol {
            w.push(format!(
                "service {}: backend {}: a {} check of the {} service's own port {} fails \
                 unless something answers {} there; use kind {:?} or set health.port",
                s.name,
                b.address,
                format!("{:?}", h.kind).to_lowercase(),
                s.protocol,
                s.port,
                check_proto,
                if s.protocol == Protocol::Udp {
                    "udp"
                } else {
                    "tcp"
                }
            ));
        }
    }
    w
}

impl Config {
    /// Every warning of `service_warnings`, for all services.
    pub fn warnings(&self) -> Vec<String> {
        self.services.iter().flat_map(service_warnings).collect()
    }
}

/// What a name of a service or of a fleet's node may be (they end up in keys and labels).
pub const NAME_RULE: &str = "use 1 to 64 letters, digits, '-', '_' or '.'";

/// Whether `name` follows [`NAME_RULE`].
pub fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Problems of one service on its own (also used for `lb service add`).
pub fn service_problems(s: &ServiceConfig) -> Vec<String> {
    let mut p = Vec::new();
    if !is_name(&s.name) {
        p.push(format!("name {:?}: {NAME_RULE}", s.name));
    }
    if s.vip.is_unspecified() || s.vip.is_multicast() {
        p.push(format!("vip: {} cannot be a VIP", s.vip));
    }
    if s.port == 0 {
        p.push("port: 0 is not a port".into());
    }
    if !(MIN_TABLE_BITS..=MAX_TABLE_BITS).contains(&s.bits()) {
        p.push(format!(
            "table_bits: {} is out of range ({MIN_TABLE_BITS} to {MAX_TABLE_BITS})",
            s.bits()
        ));
    }
    if s.backends.len() > (1usize << s.bits().min(MAX_TABLE_BITS)) {
        p.push(format!(
            "backends: {} backends do not fit a table of {} buckets",
            s.backends.len(),
            1u32 << s.bits().min(MAX_TABLE_BITS)
        ));
    }
    let mut seen = BTreeSet::new();
    for b in &s.backends {
        p.extend(backend_problems(b));
        let tunnel = b.health.as_ref().filter(|h| h.tunnel);
        if tunnel.is_some_and(|h| h.kind == CheckKind::Tcp) && s.vip.is_ipv6() {
            p.push(format!(
                "backend {}: TCP tunnel checks are for IPv4 VIPs (use kind \"udp\" or no tunnel)",
                b.address
            ));
        }
        if !seen.insert(b.address) {
            p.push(format!("backend {} is listed twice", b.address));
        }
    }
    p
}

/// Problems of one backend on its own (also used for `lb backend add`).
pub fn backend_problems(b: &BackendConfig) -> Vec<String> {
    let mut p = Vec::new();
    let a = b.address;
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
        p.push(format!("backend {a}: not a usable backend address"));
    }
    if b.weight > MAX_WEIGHT {
        p.push(format!(
            "backend {a}: weight {} is above the maximum {MAX_WEIGHT}",
            b.weight
        ));
    }
    if let Some(h) = &b.health {
        if h.interval_ms < 10 || h.interval_ms > 3_600_000 {
            p.push(format!(
                "backend {a}: health.interval_ms {} is out of range (10 to 3600000)",
                h.interval_ms
            ));
        }
        if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
            p.push(format!(
                "backend {a}: health.timeout_ms {} must be above 0 and at most interval_ms",
                h.timeout_ms
            ));
        }
        if h.rise == 0 || h.rise > 100 || h.fall == 0 || h.fall > 100 {
            p.push(format!(
                "backend {a}: health.rise and health.fall must be 1 to 100"
            ));
        }
        match (&h.kind, &h.path) {
            (CheckKind::Http, Some(path))
                if !path.starts_with('/') || path.contains(char::is_whitespace) =>
            {
                p.push(format!(
                    "backend {a}: health.path {path:?} must start with '/' and hold no spaces"
                ));
            }
            (CheckKind::Tcp | CheckKind::Udp, Some(_)) => {
                p.push(format!(
                    "backend {a}: health.path is for kind \"http\" only"
                ));
            }
            _ => {}
        }
        if h.tunnel && h.kind == CheckKind::Http {
            p.push(format!(
                "backend {a}: health.tunnel is for kinds \"tcp\" and \"udp\""
            ));
        }
        if h.send.is_some() && h.kind != CheckKind::Udp {
            p.push(format!("backend {a}: health.send is for kind \"udp\" only"));
        }
        if h.send
            .as_ref()
            .is_some_and(|s| s.is_empty() || s.len() > 1024)
        {
            p.push(format!("backend {a}: health.send must be 1 to 1024 bytes"));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use lb_common::limits::DEFAULT_TABLE_BITS;

    use super::*;

    const GOOD: &str = r#"{
        "node": { "interfaces": ["eth0"], "address_v4": "10.0.0.2" },
        "services": [
            { "name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
              "backends": [
                { "address": "10.0.3.2", "weight": 100,
                  "health": { "kind": "http", "path": "/health", "interval_ms": 500 } },
                { "address": "10.0.4.2" }
              ] }
        ]
    }"#;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = serde_json::from_str(s).map_err(|e| e.to_string())?;
        let p = c.problems();
        if p.is_empty() {
            Ok(c)
        } else {
            Err(p.join("\n"))
        }
    }

    #[test]
    fn a_node_that_is_its_own_backend_serves_the_vip() {
        let mut c = parse(GOOD).unwrap();
        assert!(c.served_vips().is_empty());
        assert!(c.is_local("10.0.0.2".parse().unwrap()));
        assert!(!c.is_local("10.0.3.2".parse().unwrap()));
        c.services[0].backends[1].address = "10.0.0.2".parse().unwrap();
        c.backend_vips = vec!["10.100.0.9".parse().unwrap()];
        let want: Vec<IpAddr> = vec!["10.100.0.1".parse().unwrap(), "10.100.0.9".parse().unwrap()];
        assert_eq!(c.served_vips(), want);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.gue_port, DEFAULT_GUE_PORT);
        assert_eq!(c.services[0].bits(), DEFAULT_TABLE_BITS);
        assert_eq!(c.services[0].backends[1].weight, 100);
        let h = c.services[0].backends[0].health.as_ref().unwrap();
        assert_eq!((h.kind, h.http_path()), (CheckKind::Http, "/health"));
        assert_eq!((h.rise, h.fall, h.timeout_ms), (2, 3, 500));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = GOOD.replace("\"weight\": 100", "\"wieght\": 100");
        let e = parse(&bad).unwrap_err();
        assert!(e.contains("unknown field `wieght`"), "{e}");
        let bad = GOOD.replace("\"interfaces\"", "\"colour\": 1, \"interfaces\"");
        assert!(parse(&bad).unwrap_err().contains("unknown field `colour`"));
    }

    #[test]
    fn every_problem_is_named() {
        let bad = r#"{
            "node": { "interfaces": [] },
            "services": [
                { "name": "a", "vip": "0.0.0.0", "port": 0, "protocol": "tcp", "table_bits": 30,
                  "backends": [ { "address": "10.0.0.9", "weight": 70000 },
                                { "address": "10.0.0.9" } ] },
                { "name": "a", "vip": "0.0.0.0", "port": 0, "protocol": "tcp" }
            ]
        }"#;
        let e = parse(bad).unwrap_err();
        for needle in [
            "node.interfaces: name at least one",
            "set address_v4 or address_v6",
            "vip: 0.0.0.0 cannot be a VIP",
            "port: 0 is not a port",
            "table_bits: 30 is out of range",
            "weight 70000 is above the maximum 65535",
            "backend 10.0.0.9 is listed twice",
            "the name \"a\" is used twice",
            "is defined twice",
            "backend 10.0.0.9 is IPv4 but the node has no address_v4",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
    }

    #[test]
    fn bad_addresses_and_missing_fields_are_parse_errors() {
        let e = parse(&GOOD.replace("10.0.3.2", "10.0.3.256")).unwrap_err();
        assert!(e.contains("invalid IP address"), "{e}");
        let e = parse(&GOOD.replace("\"port\": 80, ", "")).unwrap_err();
        assert!(e.contains("missing field `port`"), "{e}");
        let e = parse(&GOOD.replace("\"tcp\"", "\"sctp\"")).unwrap_err();
        assert!(e.contains("unknown variant `sctp`"), "{e}");
    }

    #[test]
    fn a_fleet_section_is_validated_with_the_rest() {
        let fleet = GOOD.replace(
            "\"services\"",
            r#""fleet": { "endpoints": ["http://10.0.9.1:2379"], "prefix": "/lb/site1",
                          "node": "lb0" },
               "services""#,
        );
        let c = parse(&fleet).unwrap();
        assert_eq!(c.fleet.unwrap().node, "lb0");
        let bad = fleet
            .replace("http://10.0.9.1:2379", "10.0.9.1:2379")
            .replace("/lb/site1", "lb")
            .replace("\"lb0\"", "\"lb 0\"");
        let e = parse(&bad).unwrap_err();
        for needle in [
            "fleet.endpoints: \"10.0.9.1:2379\" is not an http:// or https:// URL",
            "fleet.prefix: \"lb\" must start with '/'",
            "fleet.node: \"lb 0\"",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        let e = parse(&fleet.replace("\"node\": \"lb0\"", "\"node\": \"lb0\", \"ttl\": 3"))
            .unwrap_err();
        assert!(e.contains("unknown field `ttl`"), "{e}");
    }

    #[test]
    fn health_check_limits() {
        let bad = GOOD.replace(
            "\"interval_ms\": 500",
            "\"interval_ms\": 500, \"timeout_ms\": 900, \"rise\": 0",
        );
        let e = parse(&bad).unwrap_err();
        assert!(
            e.contains("timeout_ms 900 must be above 0 and at most interval_ms"),
            "{e}"
        );
        assert!(e.contains("rise and health.fall must be 1 to 100"), "{e}");
    }
}
