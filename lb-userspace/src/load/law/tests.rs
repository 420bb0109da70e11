//! The law against a simulated plant: backends of different capacities sharing a load by
//! their effective weights, measured with noise.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::*;

/// A backend of the plant: capacity in cores, configured weight.
#[derive(Clone, Copy)]
struct Server {
    id: u8,
    capacity: f64,
    weight: u32,
}

fn addr(id: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, id))
}

/// The plant: a demand in cores spread by effective weight; a server's utilisation is its
/// part over its capacity, saturating at 1.
struct Plant {
    servers: Vec<Server>,
    demand: f64,
    /// Amplitude of the measurement noise, in utilisation.
    noise: f64,
    rng: u64,
}

impl Plant {
    fn new(capacities: &[f64], demand: f64, noise: f64) -> Self {
        let servers = capacities
            .iter()
            .enumerate()
            .map(|(i, &capacity)| Server {
                id: i as u8 + 1,
                capacity,
                weight: 100,
            })
            .collect();
        Plant {
            servers,
            demand,
            noise,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Utilisation of each server under `weights` (same order), without noise.
    fn utilisation(&self, weights: &[u32]) -> Vec<f64> {
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        self.servers
            .iter()
            .zip(weights)
            .map(|(s, &w)| (self.demand * f64::from(w) / total / s.capacity).min(1.0))
            .collect()
    }

    /// Uniform in [-1, 1), from a fixed-seed xorshift: runs are reproducible.
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A run of the loop: per period, the true utilisations and the effective weights.
struct Run {
    utilisation: Vec<Vec<f64>>,
    weights: Vec<Vec<u32>>,
    corrections: Vec<Vec<f64>>,
}

impl Run {
    /// Max minus min utilisation in period `k`, in percentage points.
    fn spread(&self, k: usize) -> f64 {
        let u = &self.utilisation[k];
        let max = u.iter().cloned().fold(f64::MIN, f64::max);
        let min = u.iter().cloned().fold(f64::MAX, f64::min);
        (max - min) * 100.0
    }

    /// The first period from which the spread stays within `points` to the end.
    fn settled_at(&self, points: f64) -> Option<usize> {
        let n = self.utilisation.len();
        (0..n).find(|&k| (k..n).all(|j| self.spread(j) <= points))
    }
}

/// Runs `periods` periods; `change` may alter the plant before each one.
fn run(
    law: &mut Law,
    plant: &mut Plant,
    periods: usize,
    mut change: impl FnMut(usize, &mut Plant),
) -> Run {
    let start = Instant::now();
    // Effective weights by server id; a server that joins starts at its configured weight.
    let mut effective: BTreeMap<u8, u32> = BTreeMap::new();
    let mut out = Run {
        utilisation: Vec::new(),
        weights: Vec::new(),
        corrections: Vec::new(),
    };
    for k in 0..periods {
        change(k, plant);
        let weights: Vec<u32> = plant
            .servers
            .iter()
            .map(|s| *effective.get(&s.id).unwrap_or(&s.weight))
            .collect();
        let now = start + law.gains().period() * k as u32;
        let truth = plant.utilisation(&weights);
        let mut inputs = Vec::new();
        for (s, &u) in plant.servers.clone().iter().zip(&truth) {
            let measured = (u + plant.noise * plant.jitter()).clamp(0.0, 1.0);
            inputs.push(Input {
                backend: addr(s.id),
                configured: s.weight,
                in_table: true,
                report: Some(Report {
                    utilisation: measured,
                    at: now,
                }),
            });
        }
        out.utilisation.push(truth);
        let decisions = law.step(now, &inputs);
        effective = plant
            .servers
            .iter()
            .zip(&decisions)
            .map(|(s, d)| (s.id, d.effective))
            .collect();
        out.weights
            .push(decisions.iter().map(|d| d.effective).collect());
        out.corrections
            .push(decisions.iter().map(|d| d.correction).collect());
    }
    out
}

/// The experiment's plant: 40%, 20% and 10% of a core at 60% of their total capacity.
fn experiment(noise: f64) -> Plant {
    Plant::new(&[0.4, 0.2, 0.1], 0.6 * 0.7, noise)
}

#[test]
fn levels_backends_of_different_capacities() {
    let mut law = Law::new(Gains::default());
    let mut plant = experiment(0.02);
    let r = run(&mut law, &mut plant, 60, |_, _| {});
    assert!(r.spread(0) > 50.0, "equal weights start far apart");
    let settled = r.settled_at(10.0).expect("never settled");
    let secs = settled as u64 * Gains::default().period_ms / 1000;
    println!(
        "spread {:.1} points at the start, within 10 from period {settled} ({secs} s), {:.1} at \
         the end; weights {:?}",
        r.spread(0),
        r.spread(59),
        r.weights.last().unwrap()
    );
    assert!(secs <= 45, "settled after {settled} periods ({secs} s)");
    // Shares end near the capacities' (4:2:1).
    let w = r.weights.last().unwrap();
    let share = |i: usize| f64::from(w[i]) / f64::from(w.iter().sum::<u32>());
    for (i, want) in [4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0].into_iter().enumerate() {
        assert!(
            (share(i) - want).abs() < 0.05,
            "share {i}: {:.3}, want {want:.3}",
            share(i)
        );
    }
}

#[test]
fn does_not_overshoot_or_oscillate() {
    // Without noise the loop must come to rest: no weight changes once levelled.
    let mut law = Law::new(Gains::default());
    let mut plant = experiment(0.0);
    let r = run(&mut law, &mut plant, 60, |_, _| {});
    let mean: f64 = 0.6;
    for (k, u) in r.utilisation.iter().enumerate() {
        // The weakest server starts saturated; it must never fall well below the mean.
        assert!(u[2] >= mean - 0.05, "period {k}: overshoot to {:.3}", u[2]);
    }
    let last_move = r
        .weights
        .windows(2)
        .rposition(|w| w[0] != w[1])
        .map_or(0, |k| k + 1);
    assert!(
        last_move <= 15,
        "weights still moving at period {last_move}: {:?}",
        r.weights
    );
    assert!(
        r.spread(59) <= 4.0,
        "at rest {:.1} points apart",
        r.spread(59)
    );

    // With noise, the weights may move, but only by small steps with no trend.
    let mut law = Law::new(Gains::default());
    let mut plant = experiment(0.03);
    let r = run(&mut law, &mut plant, 100, |_, _| {});
    let rest = r.settled_at(10.0).unwrap();
    for w in r.weights[rest..].windows(2) {
        for (a, b) in w[0].iter().zip(&w[1]) {
            let change = (f64::from(*b) / f64::from(*a) - 1.0).abs();
            assert!(
                change < 0.10,
                "a settled weight moved {:.1}%",
                change * 100.0
            );
        }
    }
}

#[test]
fn follows_a_step_in_load() {
    let mut law = Law::new(Gains::default());
    let mut plant = experiment(0.02);
    let r = run(&mut law, &mut plant, 80, |k, p| {
        if k == 40 {
            p.demand = 0.3 * 0.7;
        }
    });
    assert!(
        r.settled_at(10.0).is_some_and(|k| k <= 45),
        "lost the level"
    );
    let low = r.utilisation.last().unwrap();
    assert!(low.iter().all(|u| (u - 0.3).abs() < 0.06), "{low:?}");
}

#[test]
fn takes_in_a_joining_backend_and_lets_one_leave() {
    let mut law = Law::new(Gains::default());
    let mut plant = experiment(0.02);
    let r = run(&mut law, &mut plant, 90, |k, p| {
        if k == 30 {
            p.servers.push(Server {
                id: 9,
                capacity: 0.3,
                weight: 100,
            });
        }
        if k == 60 {
            p.servers.remove(0);
        }
    });
    // Each change restarts the count: the phase must settle before the next one.
    for (from, to) in [(30, 60), (60, 90)] {
        let k = (from..to)
            .find(|&k| (k..to).all(|j| r.spread(j) <= 10.0))
            .unwrap_or_else(|| panic!("the phase from period {from} never settled"));
        assert!(
            k - from <= 15,
            "phase at {from} settled after {} periods",
            k - from
        );
    }
}

#[test]
fn a_stale_report_freezes_that_backend_only() {
    let gains = Gains::default();
    let mut law = Law::new(gains.clone());
    let t0 = Instant::now();
    let input = |id: u8, u: f64, at: Instant| Input {
        backend: addr(id),
        configured: 100,
        in_table: true,
        report: Some(Report { utilisation: u, at }),
    };
    law.step(
        t0,
        &[input(1, 0.2, t0), input(2, 0.8, t0), input(3, 0.5, t0)],
    );
    let later = t0 + Duration::from_millis(gains.stale_after_ms * 2);
    let d = law.step(
        later,
        &[
            input(1, 0.2, later),
            input(2, 0.8, t0),
            input(3, 0.5, later),
        ],
    );
    assert_eq!(d[1].utilisation, None, "a stale report is ignored");
    assert!(d[0].correction > 1.0 && d[2].correction < d[0].correction);
    let frozen = d[1].correction;
    let d = law.step(
        later + gains.period(),
        &[
            input(1, 0.2, later),
            input(2, 0.8, t0),
            input(3, 0.5, later),
        ],
    );
    assert_eq!(d[1].correction, frozen);
}

#[test]
fn a_period_moves_weights_by_at_most_max_step() {
    let gains = Gains::default();
    let mut law = Law::new(gains.clone());
    let mut plant = Plant::new(&[1.0, 0.05], 0.5, 0.0);
    let r = run(&mut law, &mut plant, 20, |_, _| {});
    // Each correction moves by at most `max_step`; the rescaling keeps their ratio.
    let bound = (1.0 + gains.max_step).powi(2) * (1.0 + 1e-9);
    for c in r.corrections.windows(2) {
        let ratio = |v: &Vec<f64>| v[0] / v[1];
        let change = ratio(&c[1]) / ratio(&c[0]);
        assert!(change <= bound && change >= 1.0 / bound, "{c:?}");
    }
    // The correction's floor and ceiling hold against a 20:1 capacity spread.
    let last = r.weights.last().unwrap();
    assert!(f64::from(last[1]) >= 100.0 * gains.floor - 1.0, "{last:?}");
}

#[test]
fn bad_gains_are_refused() {
    assert!(Gains::default().check().is_ok());
    for bad in [
        Gains {
            gain: 0.0,
            ..Gains::default()
        },
        Gains {
            alpha: 1.5,
            ..Gains::default()
        },
        Gains {
            dead_band: 0.6,
            ..Gains::default()
        },
        Gains {
            max_step: 0.0,
            ..Gains::default()
        },
        Gains {
            floor: 0.0,
            ..Gains::default()
        },
        Gains {
            ceiling: 0.5,
            ..Gains::default()
        },
        Gains {
            period_ms: 0,
            ..Gains::default()
        },
    ] {
        assert!(bad.check().is_err(), "{bad:?}");
    }
}

mod queued;
