//! BPF map memory of a node: every map of the object loaded as the agent loads it, at the
//! default config and at the documented limits (`agent.bucket_slots` at its largest; the
//! other maps are sized by constants), as the kernel accounts it (`memlock` in the map's
//! fdinfo). Per-CPU maps grow with the machine's possible CPUs.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::maps::MapData;
use lb::dataplane::{Dataplane, LoadOptions};
use lb_common::limits::DEFAULT_BUCKET_SLOTS;

/// The largest `agent.bucket_slots` the config accepts (docs/limits.md).
pub const MAX_BUCKET_SLOTS: u32 = 1 << 26;

/// The maps of one configuration.
#[derive(Clone, Debug)]
pub struct MapBytes {
    /// `default` or `limits`.
    pub config: &'static str,
    pub bucket_slots: u32,
    /// Bytes of every map, by name, and their sum.
    pub maps: Vec<(String, u64)>,
    pub total: u64,
}

/// Loads the object at both configurations and reads each map's memory.
pub fn measure() -> Result<Vec<MapBytes>> {
    [
        ("default", DEFAULT_BUCKET_SLOTS),
        ("limits", MAX_BUCKET_SLOTS),
    ]
    .into_iter()
    .map(|(config, bucket_slots)| {
        let dp = Dataplane::load(&LoadOptions {
            bucket_slots,
            pin_dir: None,
        })
        .with_context(|| format!("loading with {bucket_slots} bucket slots"))?;
        let maps = dp
            .maps()
            .map(|(name, data)| Ok((name.to_string(), memlock(data, name)?)))
            .collect::<Result<Vec<_>>>()?;
        let total = maps.iter().map(|(_, b)| b).sum();
        Ok(MapBytes {
            config,
            bucket_slots,
            maps,
            total,
        })
    })
    .collect()
}

/// The `memlock` line of the map's fdinfo: the kernel's figure for its memory.
fn memlock(data: &MapData, name: &str) -> Result<u64> {
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in the fdinfo of map {name}"))
}
