//! `metrics.jsonl`: one JSON object per step and per evaluation, flushed as it is written so a
//! crashed run keeps everything up to the crash; a resumed run drops the lines past its
//! checkpoint and continues the file. `curves.svg` is drawn from it at the end of a run.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::engine::StepReport;
use super::trainer::Evaluation;
use crate::plot::{write_svg, Chart, Series};
use crate::{Error, Result};

/// The open `metrics.jsonl` of a run.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a new log (replacing an old one).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_owned(),
            file,
        })
    }

    /// Keeps the lines of steps up to `step` and appends after them.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                let at = v
                    .get("step")
                    .or_else(|| v.get("eval_step"))
                    .and_then(|s| s.as_u64());
                at.is_some_and(|s| s as usize <= step)
            })
            .collect();
        crate::io::atomic_write(path, |w| {
            for line in &kept {
                writeln!(w, "{line}")?;
            }
            Ok(())
        })?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_owned(),
            file,
        })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}")
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// A training step's line.
    pub fn step(&mut self, step: usize, r: &StepReport, lr: f64, tokens_per_s: f64) -> Result<()> {
        self.write(json!({
            "step": step,
            "loss": r.values.loss,
            "sep": r.values.sep,
            "kl": r.values.kl,
            "distance": r.values.distance,
            "relative_distance": r.relative_distance,
            "lr": lr,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "tokens_per_s": tokens_per_s,
        }))
    }

    /// A held-out evaluation's line.
    pub fn evaluation(&mut self, e: &Evaluation) -> Result<()> {
        self.write(json!({
            "eval_step": e.step,
            "val_distance": e.distance,
            "val_kl": e.kl,
        }))
    }
}

/// Draws `svg` from the run log `metrics`: the loss, L_sep and L_KL at every step, and the
/// held-out separation D_l of each of `layers` and the held-out KL at every evaluation.
pub fn write_curves(metrics: &Path, svg: &Path, layers: &[usize]) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut curves = Curves::new(layers.len());
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Error::format(metrics, format!("line {}: {e}", n + 1)))?;
        curves.add(&value);
    }
    let layer_lines = curves
        .held_out_distance
        .into_iter()
        .zip(layers)
        .map(|(points, layer)| Series::line(format!("layer {layer}"), points))
        .collect();
    let chart = |title: &str, y_label: &str, series| Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: y_label.into(),
        series,
    };
    let charts = [
        chart(
            "Training objective",
            "loss",
            vec![
                Series::line("loss = L_sep + λ·L_KL", curves.loss),
                Series::line("L_sep", curves.sep),
            ],
        ),
        chart(
            "KL to the base model (training batches)",
            "L_KL (nats per token)",
            vec![Series::line("L_KL", curves.kl)],
        ),
        chart(
            "Held-out separation per layer",
            "D_l (normalised by the base ν_l)",
            layer_lines,
        ),
        chart(
            "Held-out KL to the base model",
            "KL (nats per token)",
            vec![Series::line("held-out KL", curves.held_out_kl)],
        ),
    ];
    write_svg(svg, &charts, 2)
}

/// The series of `curves.svg`, gathered line by line from `metrics.jsonl`.
struct Curves {
    loss: Vec<(f64, f64)>,
    sep: Vec<(f64, f64)>,
    kl: Vec<(f64, f64)>,
    held_out_distance: Vec<Vec<(f64, f64)>>,
    held_out_kl: Vec<(f64, f64)>,
}

impl Curves {
    fn new(layers: usize) -> Self {
        Curves {
            loss: Vec::new(),
            sep: Vec::new(),
            kl: Vec::new(),
            held_out_distance: vec![Vec::new(); layers],
            held_out_kl: Vec::new(),
        }
    }

    /// One line of the log: a step's losses or an evaluation's held-out numbers.
    fn add(&mut self, line: &Value) {
        let number = |key: &str| line.get(key).and_then(Value::as_f64);
        if let Some(step) = number("step") {
            for (series, key) in [
                (&mut self.loss, "loss"),
                (&mut self.sep, "sep"),
                (&mut self.kl, "kl"),
            ] {
                series.extend(number(key).map(|v| (step, v)));
            }
        } else if let Some(step) = number("eval_step") {
            let distances = line.get("val_distance").and_then(Value::as_array);
            for (series, d) in self
                .held_out_distance
                .iter_mut()
                .zip(distances.into_iter().flatten())
            {
                series.extend(d.as_f64().map(|v| (step, v)));
            }
            self.held_out_kl.extend(number("val_kl").map(|v| (step, v)));
        }
    }
}
