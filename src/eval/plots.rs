//! The report's SVG plots, drawn from `report.json`'s data with [`crate::plot`]:
//!
//! - `layers.svg`: per hidden state, the normalised centroid distance and the probe's held-out
//!   accuracy, one line per model (base against hardened);
//! - `pca.svg`: the 2-D PCA of harmful and harmless embeddings at one hidden state, one panel
//!   per model side by side — the picture of what hardening did;
//! - `repe.svg`: the headline DSR against the RepE coefficient c, one line per model.

use std::path::Path;

use super::judge::JudgeKind;
use super::report::Report;
use crate::plot::{write_svg, Chart, Series};
use crate::Result;

/// Writes every plot the report has data for into `dir`; returns the files' names.
pub fn write_plots(report: &Report, dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    let plots = [
        ("layers.svg", layer_charts(report), 2),
        ("pca.svg", projection_charts(report), report.geometry.len()),
        ("repe.svg", repe_charts(report), 1),
    ];
    for (name, charts, columns) in plots {
        if charts
            .iter()
            .any(|c| c.series.iter().any(|s| !s.points.is_empty()))
        {
            write_svg(&dir.join(name), &charts, columns)?;
            written.push(name.to_owned());
        }
    }
    Ok(written)
}

/// Distance and probe accuracy per hidden state, a line per model.
pub fn layer_charts(report: &Report) -> Vec<Chart> {
    let line = |pick: &dyn Fn(&super::report::LayerRow) -> Option<f64>| {
        report
            .geometry
            .iter()
            .map(|g| {
                let points = g
                    .layers
                    .iter()
                    .filter_map(|r| pick(r).map(|v| (r.layer as f64, v)))
                    .collect();
                Series::line(&g.model, points)
            })
            .collect()
    };
    vec![
        Chart {
            title: "Centroid distance of harmful and harmless embeddings".into(),
            x_label: "hidden state".into(),
            y_label: "L2 / ν".into(),
            series: line(&|r| Some(r.geometry.centroid_normalised.l2)),
        },
        Chart {
            title: "Held-out accuracy of a linear probe".into(),
            x_label: "hidden state".into(),
            y_label: "accuracy".into(),
            series: line(&|r| r.probe_accuracy),
        },
    ]
}

/// One scatter panel per model: harmful and harmless prompts on their two principal axes.
pub fn projection_charts(report: &Report) -> Vec<Chart> {
    report
        .geometry
        .iter()
        .filter_map(|g| {
            let p = g.projection.as_ref()?;
            let points = |rows: &[[f64; 2]]| rows.iter().map(|r| (r[0], r[1])).collect();
            Some(Chart {
                title: format!("{}: hidden state {}", g.model, p.layer),
                x_label: format!(
                    "PC1 ({:.0}% of variance)",
                    100.0 * p.projection.explained[0]
                ),
                y_label: format!("PC2 ({:.0}%)", 100.0 * p.projection.explained[1]),
                series: vec![
                    Series::points("harmful", points(&p.projection.harmful)),
                    Series::points("harmless", points(&p.projection.harmless)),
                ],
            })
        })
        .collect()
}

/// The headline DSR of every `repe` row against its coefficient, a line per model.
pub fn repe_charts(report: &Report) -> Vec<Chart> {
    let series = report
        .models
        .iter()
        .map(|m| {
            let mut points: Vec<(f64, f64)> = report
                .attacks
                .iter()
                .filter(|row| row.attack == "repe")
                .filter_map(|row| {
                    let c = row
                        .settings
                        .iter()
                        .find(|f| f.name == "c")?
                        .value
                        .as_f64()?;
                    let dsr = row.result(&m.label)?.dsr.get(&JudgeKind::HEADLINE)?;
                    Some((c, 100.0 * dsr.fraction()?))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series::line(&m.label, points)
        })
        .collect();
    vec![Chart {
        title: "RepE steering: refusals left".into(),
        x_label: "c (units of the hidden state's mean harmless norm ν)".into(),
        y_label: format!("DSR, {} list (%)", JudgeKind::HEADLINE.label()),
        series,
    }]
}
