//! The report's plots, as SVG: demand with and without Halftime, target vs delivered, and the burden
//! histogram. The x axis counts the report's minutes (windows only, when the clock jumped between them) and is
//! labelled with their UTC times.

use super::report::Report;
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (1000, 520);

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Draws the legend in the upper right and writes the file.
fn legend_and_present<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    root: &DrawingArea<SVGBackend<'a>, Shift>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// "HH:MM", or "MM-DD HH:MM" when the report spans more than one day.
fn time_label(r: &Report, x: f64) -> String {
    let Some(m) = r.minutes.get(x.max(0.0) as usize) else { return String::new() };
    let multi_day = r.minutes.first().zip(r.minutes.last()).is_some_and(|(a, b)| a.t[..10] != b.t[..10]);
    if multi_day { format!("{} {}", &m.t[5..10], &m.t[11..16]) } else { m.t[11..16].to_string() }
}

fn y_range(series: &[&[f64]]) -> (f64, f64) {
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.iter().copied())
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-6);
    (lo - pad, hi + pad)
}

fn lines(
    r: &Report,
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(&str, Vec<f64>, RGBColor)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = r.minutes.len().max(2) as f64;
    let (lo, hi) = y_range(&series.iter().map(|s| s.1.as_slice()).collect::<Vec<_>>());
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n - 1.0, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time (UTC)")
        .y_desc(y_label)
        .x_labels(10)
        .x_label_formatter(&|x| time_label(r, *x))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(err)?;
    for (name, values, colour) in series {
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(i, v)| (i as f64, *v)),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    legend_and_present(&mut chart, &root)
}

pub fn demand(r: &Report, path: &Path) -> anyhow::Result<()> {
    let col = |f: fn(&super::report::Minute) -> f64| r.minutes.iter().map(f).collect::<Vec<_>>();
    lines(
        r,
        path,
        &format!("{}: demand with and without Halftime", r.scenario),
        "demand (MW, this population's share of GB)",
        &[
            ("without Halftime (baseline)", col(|m| m.baseline_mw), RGBColor(120, 120, 120)),
            ("with Halftime", col(|m| m.with_halftime_mw), BLUE),
        ],
    )
}

pub fn target(r: &Report, path: &Path) -> anyhow::Result<()> {
    let col = |f: fn(&super::report::Minute) -> f64| r.minutes.iter().map(f).collect::<Vec<_>>();
    lines(
        r,
        path,
        &format!("{}: target vs delivered reduction", r.scenario),
        "MW",
        &[
            ("target", col(|m| m.target_mw), BLACK),
            ("delivered (net reduction)", col(|m| m.delivered_mw), BLUE),
            ("rebound (net rise)", col(|m| m.rebound_mw), RED),
            ("engine estimate", col(|m| m.estimated_mw), RGBColor(0, 150, 0)),
            ("engine rebound estimate", col(|m| m.estimated_rebound_mw), RGBColor(230, 140, 0)),
        ],
    )
}

pub fn burden(r: &Report, path: &Path) -> anyhow::Result<()> {
    const BINS: usize = 30;
    let max = r.burden_minutes.iter().copied().fold(0.0, f64::max).max(1.0);
    let width = max / BINS as f64;
    let mut counts = [0u32; BINS];
    for &b in &r.burden_minutes {
        counts[((b / width) as usize).min(BINS - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: burden per household (Jain {:.3} among alike households)", r.scenario, r.jain_burden),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max * 1.0001, 0u32..top + top / 10 + 1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("minutes deferred over the run (all appliances of the household)")
        .y_desc("households")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0), (x0 + width * 0.95, c)], BLUE.mix(0.6).filled())
        }))
        .map_err(err)?
        .label(format!("{} participating enrolled households", r.burden_minutes.len()))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLUE.mix(0.6).filled()));
    legend_and_present(&mut chart, &root)
}
