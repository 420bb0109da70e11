//! The control plane's reaction time: from a backend's health flip, and from a
//! `set-weight`, to the new tables being live in the maps. It drives the agent's own
//! control-plane code (`lb::agent::desired`, `lb::agent::programmer`) on a loaded data
//! plane (real maps in the kernel, not attached); health checks and the API socket are
//! left out, and so is the file write of `set-weight` (an fsync, whatever the tables).

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use anyhow::{ensure, Context, Result};
use lb::{
    agent::{desired, programmer::Programmer},
    api::Change,
    config::{BackendConfig, Config, Protocol, ServiceConfig},
    dataplane::{Dataplane, LoadOptions},
};

use super::dataplane::median;

/// (services, log2 of each table's buckets) measured.
pub const CASES: [(usize, u32); 4] = [(1, 16), (32, 16), (256, 16), (32, 20)];
/// Backends per service (each service has its own).
pub const BACKENDS: u8 = 10;

/// The figures of one case. Times are medians over the rounds, in milliseconds.
#[derive(Clone, Debug)]
pub struct ControlFigures {
    pub services: usize,
    pub bits: u32,
    /// Every table built and written from nothing (a start on empty maps).
    pub start_ms: f64,
    /// The first change to a service after its table was first written: its other half
    /// is unknown, so all of it is written.
    pub first_flip_ms: f64,
    pub health_flip_ms: f64,
    pub set_weight_ms: f64,
}

/// Health flips and weight changes, `rounds` of each, in every case.
pub fn measure(rounds: usize) -> Result<Vec<ControlFigures>> {
    CASES
        .iter()
        .map(|&(n, bits)| {
            eprintln!("bench: control plane, {n} services of 2^{bits} buckets ...");
            case(n, bits, rounds)
        })
        .collect()
}

/// A node with `n` services of `2^bits` buckets, each with `BACKENDS` backends of its own,
/// and a bucket map just large enough.
fn config(n: usize, bits: u32) -> Result<Config> {
    let node = r#"{ "node": { "interfaces": ["bench0"], "address_v4": "10.0.0.2" } }"#;
    let mut c: Config = serde_json::from_str(node)?;
    c.agent.bucket_slots = (2 * n as u32) << bits;
    c.services = (0..n)
        .map(|i| {
            let (hi, lo) = ((i >> 8) as u8, i as u8);
            ServiceConfig {
                name: format!("s{i}"),
                vip: IpAddr::from([10, 100 + hi, lo, 1]),
                port: 80,
                protocol: Protocol::Tcp,
                table_bits: Some(bits),
                backends: (1..=BACKENDS)
                    .map(|j| BackendConfig {
                        address: IpAddr::from([10, 1 + hi, lo, j]),
                        weight: 100,
                        drain: false,
                        health: None,
                    })
                    .collect(),
            }
        })
        .collect();
    let problems = c.problems();
    ensure!(problems.is_empty(), "bench config: {problems:?}");
    Ok(c)
}

fn case(n: usize, bits: u32, rounds: usize) -> Result<ControlFigures> {
    let mut config = config(n, bits)?;
    let slots = config.agent.bucket_slots;
    let dp = Dataplane::load(&LoadOptions {
        bucket_slots: slots,
        pin_dir: None,
    })
    .context("loading the data plane")?;
    let mut p = Programmer::adopt(dp, 0, slots)?;
    let mut health: BTreeMap<(String, IpAddr), bool> = BTreeMap::new();
    let t = Instant::now();
    let written = p.sync(&desired::wanted(&config.services, &health))?;
    let start_ms = ms(t);
    ensure!(
        written.len() == n,
        "{} of {n} tables written",
        written.len()
    );

    // The service in the middle; its third backend fails and recovers.
    let svc = config.services[n / 2].name.clone();
    let backend = config.services[n / 2].backends[2].address;
    let mut flip = |p: &mut Programmer, up: bool| -> Result<f64> {
        let t = Instant::now();
        health.insert((svc.clone(), backend), up);
        let changed = p.sync(&desired::wanted(&config.services, &health))?;
        let took = ms(t);
        ensure!(
            changed.len() == 1 && changed[0].service == svc && changed[0].moved > 0,
            "a flip changed {changed:?}"
        );
        Ok(took)
    };
    let first_flip_ms = flip(&mut p, false)?;
    flip(&mut p, true)?;
    let mut flips = Vec::new();
    for _ in 0..rounds {
        flips.push(flip(&mut p, false)?);
        flips.push(flip(&mut p, true)?);
    }

    let mut weights = Vec::new();
    for round in 0..2 * rounds {
        let change = Change::SetWeight {
            service: svc.clone(),
            address: backend,
            weight: if round % 2 == 0 { 50 } else { 100 },
        };
        let t = Instant::now();
        let next = desired::apply(&config, &change)?;
        let changed = p.sync(&desired::wanted(&next.services, &health))?;
        config = next;
        let took = ms(t);
        ensure!(
            changed.len() == 1 && changed[0].moved > 0,
            "a new weight changed {changed:?}"
        );
        weights.push(took);
    }
    Ok(ControlFigures {
        services: n,
        bits,
        start_ms,
        first_flip_ms,
        health_flip_ms: median(&flips),
        set_weight_ms: median(&weights),
    })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
