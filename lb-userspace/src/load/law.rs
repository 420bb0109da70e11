//! The control law that turns the backends' measured utilisation into effective weights,
//! so that every backend of a service runs at the same utilisation whatever its capacity.
//!
//! Each period, for every backend that is in the table and has a fresh report:
//! 1. a new report `u` (each report counts once, however often it is fetched) updates the
//!    expected utilisation: `s += alpha * (u - s)`; the square of the surprise `u - s`
//!    is averaged the same way into the backend's noise;
//! 2. the mean `m` of the expected figures, weighted by the configured weights, is the
//!    target;
//! 3. outside the backend's dead band its correction `c` is multiplied by `(m / s)^gain`,
//!    the factor held within `1 / (1 + max_step) ..= 1 + max_step`; the band is
//!    `noise_band` times the typical error of `s` given the measured noise, within
//!    `dead_band ..= dead_band_max`, so noise alone does not move weights;
//! 4. the corrections are scaled so that the configured weights' total is kept (only the
//!    ratios decide the table, so this moves nothing), then held within
//!    `floor ..= ceiling`;
//! 5. the effective weight is `round(configured * c)`, at least 1;
//! 6. each expectation `s` is moved by the backend's change of share (`s * new / old`,
//!    at most 1): the law knows what its own step does, so smoothing does not lag
//!    behind it and does not make it overshoot.
//!
//! A saturated report (95% or more: a cgroup held to its quota reads 96 to 99%, not 100%)
//! against a lower expectation counts for 0.3 of `alpha`: the backend may be working off
//! its queue after its share was lowered, and taking that at face value lowered its weight
//! well below where it ended.
//!
//! Why multiplicative: a backend's utilisation is its share of the traffic over its
//! capacity, so with a steady total load `m / s` is exactly the factor that would level it,
//! and `gain < 1` takes part of that step per period, which keeps noise and the delay of a
//! measurement from turning into oscillation. A saturated backend reports 100% however
//! overloaded it is: the law still lowers its weight, by at most `max_step` a period.
//!
//! A backend without a fresh report (none yet, or older than `stale_after`) keeps its
//! correction and takes no part in the mean; one that is down or draining is left out.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The law's constants. The defaults settle a 4:1 spread of capacities in about ten
/// periods (see the tests), moving at most a quarter of a backend's weight per period,
/// and let reports with the noise of a few hundred requests leave weights at rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gains {
    /// How often the law runs, milliseconds.
    pub period_ms: u64,
    /// Exponent of the correction step, in (0, 1].
    pub gain: f64,
    /// Weight of a new measurement in the smoothed utilisation, in (0, 1].
    pub alpha: f64,
    /// Distance from the mean, in utilisation (0.02 = 2 points), within which a backend's
    /// correction stays as it is: the least band.
    pub dead_band: f64,
    /// The band of a backend is `noise_band` times the typical error of its smoothed
    /// figure (measured from its reports' noise), within `dead_band ..= dead_band_max`.
    pub noise_band: f64,
    pub dead_band_max: f64,
    /// Largest relative change of a correction in one period (0.25 = 25%).
    pub max_step: f64,
    /// Bounds of the correction.
    pub floor: f64,
    pub ceiling: f64,
    /// A report older than this is ignored, milliseconds.
    pub stale_after_ms: u64,
}

impl Default for Gains {
    fn default() -> Self {
        Gains {
            period_ms: 3_000,
            gain: 0.6,
            alpha: 0.5,
            dead_band: 0.02,
            noise_band: 2.0,
            dead_band_max: 0.04,
            max_step: 0.25,
            floor: 0.1,
            ceiling: 10.0,
            stale_after_ms: 10_000,
        }
    }
}

impl Gains {
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms)
    }

    /// Why these gains cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let unit = |x: f64| x > 0.0 && x <= 1.0;
        if self.period_ms == 0 {
            return Err("period_ms must be above 0".into());
        }
        if !unit(self.gain) || !unit(self.alpha) {
            return Err("gain and alpha must lie in (0, 1]".into());
        }
        if !(0.0..0.5).contains(&self.dead_band) || !(0.0..0.5).contains(&self.dead_band_max) {
            return Err("dead_band and dead_band_max must lie in [0, 0.5)".into());
        }
        if !(0.0..=10.0).contains(&self.noise_band) {
            return Err("noise_band must lie in [0, 10]".into());
        }
        if !(self.max_step > 0.0 && self.max_step <= 1.0) {
            return Err("max_step must lie in (0, 1]".into());
        }
        if !(self.floor > 0.0 && self.floor <= 1.0 && self.ceiling >= 1.0) {
            return Err("floor must lie in (0, 1] and ceiling be at least 1".into());
        }
        Ok(())
    }
}

/// A backend's measured utilisation: busy time over available time, 1.0 = saturated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    pub utilisation: f64,
    pub at: Instant,
}

/// What the law knows of a backend this period.
#[derive(Clone, Copy, Debug)]
pub struct Input {
    pub backend: IpAddr,
    pub configured: u32,
    /// Active and healthy: in the table by weight.
    pub in_table: bool,
    pub report: Option<Report>,
}

/// What the law decided for a backend this period.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub backend: IpAddr,
    pub configured: u32,
    pub effective: u32,
    pub correction: f64,
    /// The smoothed utilisation, when the backend had a fresh report.
    pub utilisation: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
struct Memory {
    /// The utilisation expected under the current weights: the smoothed reports, moved
    /// by the law's own changes of the backend's share.
    smoothed: Option<f64>,
    /// Mean square of the reports' surprise (report minus expectation): their noise.
    noise: f64,
    /// When the latest report taken in was measured: a report counts once.
    taken: Option<Instant>,
    correction: f64,
}

impl Memory {
    fn new(correction: f64) -> Self {
        Memory {
            smoothed: None,
            noise: 0.0,
            taken: None,
            correction,
        }
    }
}

/// A report at or above this says only that demand reached capacity. Below 1: a CPU
/// cgroup held to its quota reads 96 to 99% of it (the benchmark's 10% backend, saturated).
/// At 0.98 most such reports counted in full, and the weakest backend's weight fell to
/// 0.76 to 0.84 of its final value before its queue was worked off.
const SATURATED: f64 = 0.95;
/// How much a saturated report counts (of `alpha`) when the expectation is below
/// saturation.
const SATURATED_TRUST: f64 = 0.3;

/// The law's state: per backend, the smoothed utilisation and the correction.
#[derive(Clone, Debug)]
pub struct Law {
    gains: Gains,
    memory: BTreeMap<IpAddr, Memory>,
}

impl Law {
    pub fn new(gains: Gains) -> Self {
        Law {
            gains,
            memory: BTreeMap::new(),
        }
    }

    pub fn gains(&self) -> &Gains {
        &self.gains
    }

    /// Starts `backend` at `correction` (kept from an earlier run) instead of 1.
    pub fn seed(&mut self, backend: IpAddr, correction: f64) {
        let g = &self.gains;
        if correction.is_finite() {
            self.memory
                .insert(backend, Memory::new(correction.clamp(g.floor, g.ceiling)));
        }
    }

    /// Sets `backend`'s correction (as the fleet's store has it), keeping what the law
    /// measured of it.
    pub fn correct(&mut self, backend: IpAddr, correction: f64) {
        let g = &self.gains;
        if correction.is_finite() {
            self.memory
                .entry(backend)
                .or_insert_with(|| Memory::new(1.0))
                .correction = correction.clamp(g.floor, g.ceiling);
        }
    }

    /// The dead band of a backend whose reports' surprises have mean square `noise`: the
    /// typical error of its smoothed figure times `noise_band`, within
    /// `dead_band ..= dead_band_max`.
    fn band(&self, noise: f64) -> f64 {
        let g = &self.gains;
        // An exponential average with weight `alpha` keeps `alpha / (2 - alpha)` of the
        // variance of what it averages.
        let sd = (noise * g.alpha / (2.0 - g.alpha)).sqrt();
        (g.noise_band * sd).clamp(g.dead_band, g.dead_band_max.max(g.dead_band))
    }

    /// One period: the effective weight of every input. Backends no longer in `inputs`
    /// are forgotten; one that comes back starts again at correction 1.
    pub fn step(&mut self, now: Instant, inputs: &[Input]) -> Vec<Decision> {
        let g = self.gains.clone();
        let stale = Duration::from_millis(g.stale_after_ms);
        self.memory
            .retain(|b, _| inputs.iter().any(|i| i.backend == *b));
        // 1. Take in the new reports.
        let mut fresh: Vec<(IpAddr, f64, f64)> = Vec::new();
        for i in inputs {
            let m = self
                .memory
                .entry(i.backend)
                .or_insert_with(|| Memory::new(1.0));
            let report = i
                .report
                .filter(|r| now.saturating_duration_since(r.at) <= stale);
            let Some(r) = report.filter(|_| i.in_table) else {
                *m = Memory::new(m.correction);
                continue;
            };
            // The same report fetched again (its date moves only by the fetch's jitter)
            // is no new measurement.
            let new = m
                .taken
                .is_none_or(|t| r.at.saturating_duration_since(t) > g.period() / 2);
            if new {
                let u = r.utilisation.clamp(0.0, 1.0);
                m.smoothed = Some(match m.smoothed {
                    None => u,
                    Some(s) => {
                        let surprise = u - s;
                        if u >= SATURATED && s < SATURATED {
                            // Expected below capacity, reported at it: the law lowered its
                            // share already and the backend may still be working off its
                            // queue. Weighed lightly, not left out: it may be truly
                            // saturated still.
                            s + g.alpha * SATURATED_TRUST * surprise
                        } else {
                            m.noise += g.alpha * (surprise * surprise - m.noise);
                            s + g.alpha * surprise
                        }
                    }
                });
                m.taken = Some(r.at);
            }
            if let Some(s) = m.smoothed {
                fresh.push((i.backend, s, f64::from(i.configured)));
            }
        }
        // 2-3. Step the corrections towards the weighted mean.
        let total: f64 = fresh.iter().map(|f| f.2).sum();
        if fresh.len() < 2 || total <= 0.0 {
            return self.decisions(inputs);
        }
        let shares = |memory: &BTreeMap<IpAddr, Memory>| -> Vec<f64> {
            let weighted: Vec<f64> = fresh
                .iter()
                .map(|f| f.2 * memory[&f.0].correction)
                .collect();
            let sum: f64 = weighted.iter().sum();
            weighted.iter().map(|w| w / sum).collect()
        };
        let before = shares(&self.memory);
        let mean = fresh.iter().map(|f| f.1 * f.2).sum::<f64>() / total;
        for &(b, s, _) in &fresh {
            let band = self.band(self.memory[&b].noise);
            if (s - mean).abs() <= band {
                continue;
            }
            let factor = (mean / s.max(0.01))
                .powf(g.gain)
                .clamp(1.0 / (1.0 + g.max_step), 1.0 + g.max_step);
            if let Some(m) = self.memory.get_mut(&b) {
                m.correction *= factor;
            }
        }
        // 4. Keep the configured total, then the bounds.
        let weighted: f64 = fresh
            .iter()
            .map(|f| f.2 * self.memory[&f.0].correction)
            .sum();
        let scale = total / weighted;
        for f in &fresh {
            if let Some(m) = self.memory.get_mut(&f.0) {
                m.correction = (m.correction * scale).clamp(g.floor, g.ceiling);
            }
        }
        // The law's own change of a backend's share moves its utilisation in proportion
        // (up to saturation): expect it, so that smoothing does not lag behind the law.
        let after = shares(&self.memory);
        for (f, (b, a)) in fresh.iter().zip(before.iter().zip(&after)) {
            if let Some(m) = self.memory.get_mut(&f.0) {
                m.smoothed = m.smoothed.map(|s| (s * a / b).min(1.0));
            }
        }
        let mut d = self.decisions(inputs);
        // Shown: the smoothed figure the step used, not the expectation for the next one.
        for x in &mut d {
            if let Some(f) = fresh.iter().find(|f| f.0 == x.backend) {
                x.utilisation = Some(f.1);
            }
        }
        d
    }

    /// 5. Effective weights.
    fn decisions(&self, inputs: &[Input]) -> Vec<Decision> {
        inputs
            .iter()
            .map(|i| {
                let m = self.memory[&i.backend];
                Decision {
                    backend: i.backend,
                    configured: i.configured,
                    effective: effective(i.configured, m.correction),
                    correction: m.correction,
                    utilisation: m.smoothed,
                }
            })
            .collect()
    }
}

/// `configured * correction`, rounded, at least 1 for a backend with any weight.
pub fn effective(configured: u32, correction: f64) -> u32 {
    if configured == 0 {
        return 0;
    }
    let w = (f64::from(configured) * correction).round();
    w.clamp(1.0, f64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests;
