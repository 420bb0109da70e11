//! A per-second timeline of long-lived flows per backend (requests answered, flows
//! broken), with the moments of changes marked: printed compactly for a terminal and
//! drawn as a PNG chart (plotters, DejaVu Sans from Debian's fonts-dejavu-core).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Once,
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use plotters::{coord::types::RangedCoordf64, prelude::*};

use crate::churn::{Fate, Flow};

/// The font the chart is written in; `cargo xtask setup` installs it.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Line colours that stay apart on white.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Sparkline levels, lowest first; `·` is a second with nothing answered.
const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Per-second counts per backend, second 0 being when the flows started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Answered requests per backend, one entry per second.
    pub answered: BTreeMap<String, Vec<u64>>,
    /// Flows that broke per backend (the one they began on), one entry per second.
    pub broken: BTreeMap<String, Vec<u64>>,
    /// Changes: (second, label); the label's first character marks it in `render`.
    pub marks: Vec<(f64, String)>,
}

impl Timeline {
    /// From `Flows::answered` (keyed by second and backend), the flows' fates and the
    /// moments of changes; `started` is `Flows::started`, `seconds` the length.
    pub fn new(
        started: Instant,
        answered: &BTreeMap<(u64, String), u64>,
        flows: &[Flow],
        marks: &[(Instant, String)],
        seconds: usize,
    ) -> Timeline {
        let backends: BTreeSet<&String> = answered
            .keys()
            .map(|(_, b)| b)
            .chain(flows.iter().map(|f| &f.server))
            .collect();
        let zero = || vec![0u64; seconds];
        let mut t = Timeline {
            answered: backends.iter().map(|b| ((*b).clone(), zero())).collect(),
            broken: backends.iter().map(|b| ((*b).clone(), zero())).collect(),
            marks: marks
                .iter()
                .map(|(at, what)| ((*at - started).as_secs_f64(), what.clone()))
                .collect(),
        };
        for ((second, b), n) in answered {
            if let Some(v) = t
                .answered
                .get_mut(b)
                .and_then(|v| v.get_mut(*second as usize))
            {
                *v += n;
            }
        }
        for f in flows {
            if let Fate::Broken { at, .. } = &f.fate {
                let second = at.saturating_duration_since(started).as_secs() as usize;
                if let Some(v) = t.broken.get_mut(&f.server).and_then(|v| v.get_mut(second)) {
                    *v += 1;
                }
            }
        }
        t
    }

    fn seconds(&self) -> usize {
        self.answered.values().map(Vec::len).max().unwrap_or(0)
    }

    /// The timeline in a few lines: one sparkline of answered requests per backend (its
    /// peak per second after the name), a line marking the changes, and every second in
    /// which flows broke.
    pub fn render(&self) -> String {
        let n = self.seconds();
        let mut out = String::new();
        let mut ruler: Vec<char> = vec![' '; n];
        for (at, what) in &self.marks {
            if let Some(c) = ruler.get_mut(*at as usize) {
                *c = what.chars().next().unwrap_or('^');
            }
        }
        let mut scale = String::new();
        for s in (0..n).step_by(10) {
            scale.push_str(&format!("{:<10}", format!("{s}s")));
        }
        out.push_str(&format!("  {:<16} {}\n", "second", scale.trim_end()));
        for (b, v) in &self.answered {
            let peak = v.iter().copied().max().unwrap_or(0);
            let line: String = v
                .iter()
                .map(|&x| match x {
                    0 => '·',
                    _ => LEVELS[((x * 8 - 1) / peak.max(1)).min(7) as usize],
                })
                .collect();
            out.push_str(&format!("  {:<16} {line}\n", format!("{b} (max {peak}/s)")));
        }
        out.push_str(&format!(
            "  {:<16} {}\n",
            "changes",
            ruler.iter().collect::<String>().trim_end()
        ));
        for (at, what) in &self.marks {
            out.push_str(&format!("    {what} (at {at:.1}s)\n"));
        }
        let mut breaks = Vec::new();
        for s in 0..n {
            let at: Vec<String> = self
                .broken
                .iter()
                .filter(|(_, v)| v[s] > 0)
                .map(|(b, v)| format!("{b} {}", v[s]))
                .collect();
            if !at.is_empty() {
                breaks.push(format!("{s}s: {}", at.join(", ")));
            }
        }
        if breaks.is_empty() {
            out.push_str("  broken flows per second: none\n");
        } else {
            out.push_str(&format!(
                "  broken flows per second: {}\n",
                breaks.join("; ")
            ));
        }
        out
    }

    /// Draws the timeline as a PNG: answered requests per second per backend above,
    /// broken flows per second per backend below, changes as labelled vertical lines.
    pub fn write_png(&self, path: &Path, title: &str) -> Result<()> {
        register_font()?;
        let n = self.seconds().max(1) as f64;
        let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 24))?;
        let (top, bottom) = root.split_vertically(460);
        let peak = self
            .answered
            .values()
            .flatten()
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let broken_peak = self.broken.values().flatten().copied().max().unwrap_or(0);
        let colour = |i: usize| PALETTE[i % PALETTE.len()].to_rgba();

        let mut chart = panel(&top, n, peak * 1.15, "requests answered per second")?;
        // Each line thinner than the one drawn before it: backends that answer alike stay
        // visible as a line inside a line instead of one hiding the other.
        let lines = self.answered.len() as u32;
        for (i, (b, v)) in self.answered.iter().enumerate() {
            let c = colour(i);
            let width = 2 + 2 * (lines - 1 - i as u32);
            chart
                .draw_series(LineSeries::new(
                    v.iter()
                        .enumerate()
                        .map(|(s, x)| (s as f64 + 0.5, *x as f64)),
                    c.stroke_width(width),
                ))?
                .label(b.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        }
        for (at, what) in &self.marks {
            chart.draw_series(std::iter::once(PathElement::new(
                [(*at, 0.0), (*at, peak * 1.15)],
                BLACK.mix(0.5).stroke_width(1),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                what.clone(),
                (*at + 0.3, peak * 1.1),
                ("sans-serif", 15).into_font().color(&BLACK),
            )))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;

        let mut chart = panel(
            &bottom,
            n,
            broken_peak.max(1) as f64 * 1.2,
            "flows broken per second",
        )?;
        let backends = self.broken.len().max(1) as f64;
        for (i, (b, v)) in self.broken.iter().enumerate() {
            let c = colour(i);
            // Side by side within each second, so backends breaking together all show.
            let w = 0.8 / backends;
            chart
                .draw_series(v.iter().enumerate().filter(|(_, x)| **x > 0).map(|(s, x)| {
                    let x0 = s as f64 + 0.1 + w * i as f64;
                    Rectangle::new([(x0, 0.0), (x0 + w, *x as f64)], c.filled())
                }))?
                .label(b.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        for (at, _) in &self.marks {
            chart.draw_series(std::iter::once(PathElement::new(
                [(*at, 0.0), (*at, broken_peak.max(1) as f64 * 1.2)],
                BLACK.mix(0.5).stroke_width(1),
            )))?;
        }
        if broken_peak == 0 {
            chart.draw_series(std::iter::once(Text::new(
                "no flow broke",
                (n / 2.0, 0.6),
                ("sans-serif", 18).into_font().color(&BLACK),
            )))?;
        }
        root.present()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart over `area`: seconds 0 to `seconds` across, 0 to `top` up, axes drawn.
fn panel<'a>(area: &Area<'a>, seconds: f64, top: f64, what: &str) -> Result<Chart<'a>> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..top)?;
    chart
        .configure_mesh()
        .y_desc(what)
        .x_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        // Counts: ticks between whole numbers stay unlabelled.
        .y_label_formatter(&|y| {
            if y.fract() == 0.0 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    Ok(chart)
}

/// Registers DejaVu Sans as "sans-serif" for plotters, once.
pub fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = std::fs::read(FONT)
            .with_context(|| format!("reading {FONT} (Debian's fonts-dejavu-core)"))
            .and_then(|bytes| {
                plotters::style::register_font(
                    "sans-serif",
                    FontStyle::Normal,
                    Box::leak(bytes.into_boxed_slice()),
                )
                .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))
            });
    });
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::churn::{Break, Kind};

    fn timeline() -> Timeline {
        let started = Instant::now();
        let mut answered = BTreeMap::new();
        for s in 0..20u64 {
            answered.insert((s, "b0".to_string()), 300 + s);
            answered.insert((s, "b1".to_string()), if s < 12 { 150 } else { 0 });
        }
        let flow = |server: &str, fate| Flow {
            kind: Kind::Tcp,
            local: "10.0.0.1:4000".parse().unwrap(),
            dst: "10.100.0.1:80".parse().unwrap(),
            server: server.into(),
            exchanges: 1,
            fate,
        };
        let broke = Fate::Broken {
            step: 5,
            why: Break::Reset,
            at: started + Duration::from_millis(12_300),
        };
        let flows = vec![
            flow("b0", Fate::Open),
            flow("b1", broke.clone()),
            flow("b1", broke),
        ];
        let marks = vec![(started + Duration::from_millis(11_500), "5 fail b1".into())];
        Timeline::new(started, &answered, &flows, &marks, 20)
    }

    #[test]
    fn timeline_counts_per_second_and_backend() {
        let t = timeline();
        assert_eq!(t.answered["b0"][3], 303);
        assert_eq!(t.answered["b1"][12], 0);
        assert_eq!(t.broken["b1"][12], 2);
        assert_eq!(t.broken["b0"].iter().sum::<u64>(), 0);
        let text = t.render();
        assert!(text.contains("b0 (max 319/s)"), "{text}");
        assert!(
            text.contains("broken flows per second: 12s: b1 2\n"),
            "{text}"
        );
        assert!(text.contains("    5 fail b1 (at 11.5s)\n"), "{text}");
        assert!(text.contains(&format!("{}5\n", " ".repeat(11))), "{text}");
        // b1's line: full until second 12, then nothing answered.
        let b1 = text.lines().find(|l| l.contains("b1 (max")).unwrap();
        let want = format!("{}{}", "█".repeat(12), "·".repeat(8));
        assert!(b1.ends_with(&want), "{b1:?}");
    }

    #[test]
    fn chart_is_a_png_with_text() {
        let t = timeline();
        let path = std::env::temp_dir().join(format!("lb-timeline-{}.png", std::process::id()));
        t.write_png(&path, "test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        if std::env::var_os("LB_KEEP_CHART").is_some() {
            println!("chart kept at {}", path.display());
        } else {
            let _ = std::fs::remove_file(&path);
        }
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    }
}
