//! The load experiment's chart: each backend's utilisation of its CPU quota per second
//! above, its effective weight below, the moment the loop was resumed marked.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::load::LoadFigures;
use crate::timeline::register_font;

const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// Writes the chart of `f` to `path`; `names` label the backends.
pub fn write(f: &LoadFigures, names: &[String], path: &Path) -> Result<()> {
    register_font()?;
    let (t0, t1) = (
        f.timeline.first().map_or(0.0, |s| s.t),
        f.timeline.last().map_or(1.0, |s| s.t),
    );
    let root = BitMapBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "lb load loop: {:.0} req/s of {} ms CPU; spread {:.0} -> {:.0} points",
        f.rate_rps, f.work_ms, f.spread_off, f.spread_on
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(470);
    let peak = f
        .timeline
        .iter()
        .flat_map(|s| s.util.iter().copied())
        .fold(100.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(t0..t1, 0f64..peak)?;
    chart
        .configure_mesh()
        .y_desc("utilisation of the quota, %")
        .x_desc("seconds since the loop was resumed")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, name) in names.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                f.timeline.iter().map(|s| (s.t, s.util[i])),
                c.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart.draw_series(std::iter::once(PathElement::new(
        [(0.0, 0.0), (0.0, peak)],
        BLACK.mix(0.6).stroke_width(1),
    )))?;
    chart.draw_series(std::iter::once(Text::new(
        "loop on",
        (0.5, peak * 0.95),
        ("sans-serif", 15).into_font().color(&BLACK),
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;

    let wpeak = f
        .timeline
        .iter()
        .flat_map(|s| s.weight.iter().copied())
        .max()
        .unwrap_or(100)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(t0..t1, 0f64..wpeak)?;
    chart
        .configure_mesh()
        .y_desc("effective weight")
        .x_desc("seconds since the loop was resumed")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for i in 0..names.len() {
        let c = COLOURS[i % COLOURS.len()];
        chart.draw_series(LineSeries::new(
            f.timeline.iter().map(|s| (s.t, s.weight[i] as f64)),
            c.stroke_width(2),
        ))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
