//! Charts as SVG files: panels of line or scatter series, laid out in a grid and written
//! atomically. Training writes its curves with it; reports can draw their own charts the same
//! way. (plotters draws; this module only decides ranges, colours and layout.)

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mark {
    /// Points joined in order by a line.
    #[default]
    Line,
    /// A dot at every point (a scatter plot).
    Points,
}

/// One named set of points in a chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The legend entry.
    pub label: String,
    /// `(x, y)` points; non-finite ones are left out.
    pub points: Vec<(f64, f64)>,
    /// Line or dots.
    pub mark: Mark,
}

impl Series {
    /// A line through `points`.
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            mark: Mark::Line,
        }
    }

    /// A dot at each of `points`.
    pub fn points(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            mark: Mark::Points,
        }
    }

    fn finite(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    }
}

/// One panel: a title, axis names and its series, which share the axes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chart {
    /// Shown above the panel.
    pub title: String,
    /// Name of the horizontal axis.
    pub x_label: String,
    /// Name of the vertical axis.
    pub y_label: String,
    /// What the panel shows.
    pub series: Vec<Series>,
}

/// Pixel size of one panel.
const PANEL: (u32, u32) = (640, 400);

/// Writes `charts` into one SVG file at `path`, `columns` panels per row, atomically: a reader
/// sees the old file or the whole new one.
pub fn write_svg(path: &Path, charts: &[Chart], columns: usize) -> Result<()> {
    let svg = render_svg(charts, columns).map_err(|e| Error::format(path, e))?;
    crate::io::atomic_write(path, |w| w.write_all(svg.as_bytes()))
}

/// The SVG text of `charts`, `columns` panels per row.
pub fn render_svg(charts: &[Chart], columns: usize) -> std::result::Result<String, String> {
    let columns = columns.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(columns).max(1);
    let size = (PANEL.0 * columns as u32, PANEL.1 * rows as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((rows, columns));
        for (panel, chart) in panels.iter().zip(charts) {
            draw_chart(panel, chart).map_err(|e| format!("drawing '{}': {e}", chart.title))?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_chart(panel: &Panel, chart: &Chart) -> std::result::Result<(), String> {
    let (x, y) = ranges(chart);
    let mut ctx = ChartBuilder::on(panel)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, series) in chart.series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let drawn = match series.mark {
            Mark::Line => ctx.draw_series(LineSeries::new(series.finite(), colour.stroke_width(2))),
            Mark::Points => {
                ctx.draw_series(series.finite().map(|p| Circle::new(p, 3, colour.filled())))
            }
        }
        .map_err(|e| e.to_string())?;
        drawn.label(&series.label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
        });
    }
    if chart.series.iter().any(|s| !s.label.is_empty()) {
        ctx.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The axes' ranges: every finite point with a margin of 5%, never empty.
fn ranges(chart: &Chart) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points: Vec<(f64, f64)> = chart.series.iter().flat_map(Series::finite).collect();
    let span = |values: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            return 0.0..1.0;
        }
        let pad = if hi > lo {
            0.05 * (hi - lo)
        } else {
            0.5 * lo.abs().max(1e-3)
        };
        (lo - pad)..(hi + pad)
    };
    (
        span(&mut points.iter().map(|p| p.0)),
        span(&mut points.iter().map(|p| p.1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_finite_point_and_are_never_empty() {
        let chart = Chart {
            series: vec![
                Series::line("a", vec![(0.0, 1.0), (10.0, f64::NAN), (4.0, -2.0)]),
                Series::points("b", vec![(f64::INFINITY, 5.0), (2.0, 3.0)]),
            ],
            ..Chart::default()
        };
        let (x, y) = ranges(&chart);
        assert!(x.start < 0.0 && x.end > 4.0 && x.end < 10.0, "{x:?}");
        assert!(y.start < -2.0 && y.end > 3.0 && y.end < 5.0, "{y:?}");
        let (x, y) = ranges(&Chart::default());
        assert!(x.start < x.end && y.start < y.end);
        let flat = Chart {
            series: vec![Series::line("c", vec![(3.0, 2.0)])],
            ..Chart::default()
        };
        let (x, y) = ranges(&flat);
        assert!(x.contains(&3.0) && y.contains(&2.0) && x.start < x.end);
    }
}
