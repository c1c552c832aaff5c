//! `metrics.jsonl`: one JSON object per step and per evaluation, flushed as it is written so a
//! crashed run keeps everything up to the crash; a resumed run drops the lines past its
//! checkpoint and continues the file. `curves.svg` is drawn from it at the end of a run.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::report::{Evaluation, HeldOut, StepReport};
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

    /// A skipped step's line: the step, the term that was not finite and its value (as text:
    /// JSON has no NaN).
    pub fn skipped(&mut self, step: usize, term: &str, value: f64) -> Result<()> {
        self.write(json!({"step": step, "skipped": term, "value": value.to_string()}))
    }

    /// A training step's line: the report's fields (the objective's own terms among them),
    /// the learning rate, the speed and the step's peak GPU memory in bytes.
    pub fn step(
        &mut self,
        step: usize,
        r: &StepReport,
        lr: f64,
        tokens_per_s: f64,
        peak_bytes: u64,
    ) -> Result<()> {
        let mut line = serde_json::to_value(r)
            .map_err(|e| Error::InvalidArgument(format!("a step report as JSON: {e}")))?;
        if let Value::Object(fields) = &mut line {
            fields.insert("step".into(), json!(step));
            fields.insert("lr".into(), json!(lr));
            fields.insert("tokens_per_s".into(), json!(tokens_per_s));
            fields.insert("peak_bytes".into(), json!(peak_bytes));
        }
        self.write(line)
    }

    /// A held-out evaluation's line.
    pub fn evaluation(&mut self, e: &Evaluation) -> Result<()> {
        self.write(match &e.held_out {
            HeldOut::Es2(h) => json!({
                "eval_step": e.step,
                "val_distance": h.distance,
                "val_kl": h.kl,
            }),
            HeldOut::Sft(h) => json!({
                "eval_step": e.step,
                "val_loss": h.loss,
            }),
        })
    }
}

/// Draws `svg` from the ES2 run log `metrics`: the loss, L_sep and L_KL at every step, and the
/// held-out separation D_l of each of `layers` and the held-out KL at every evaluation.
pub fn write_es2_curves(metrics: &Path, svg: &Path, layers: &[usize]) -> Result<()> {
    let log = read_log(metrics)?;
    let layer_lines = layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let points = series(&log, "eval_step", |l| {
                l.get("val_distance")?.get(i)?.as_f64()
            });
            Series::line(format!("layer {layer}"), points)
        })
        .collect();
    let charts = [
        chart(
            "Training objective",
            "loss",
            vec![
                Series::line("loss = L_sep + λ·L_KL", step_series(&log, "loss")),
                Series::line("L_sep", step_series(&log, "sep")),
            ],
        ),
        chart(
            "KL to the base model (training batches)",
            "L_KL (nats per token)",
            vec![Series::line("L_KL", step_series(&log, "kl"))],
        ),
        chart(
            "Held-out separation per layer",
            "D_l (normalised by the base ν_l)",
            layer_lines,
        ),
        chart(
            "Held-out KL to the base model",
            "KL (nats per token)",
            vec![Series::line("held-out KL", eval_series(&log, "val_kl"))],
        ),
    ];
    write_svg(svg, &charts, 2)
}

/// Draws `svg` from the SFT run log `metrics`: the training loss at every step and the
/// held-out loss at every evaluation.
pub fn write_sft_curves(metrics: &Path, svg: &Path) -> Result<()> {
    let log = read_log(metrics)?;
    let charts = [
        chart(
            "Supervised fine-tuning",
            "cross-entropy (nats per learned token)",
            vec![Series::line("training loss", step_series(&log, "loss"))],
        ),
        chart(
            "Held-out conversations",
            "cross-entropy (nats per learned token)",
            vec![Series::line("held-out loss", eval_series(&log, "val_loss"))],
        ),
    ];
    write_svg(svg, &charts, 2)
}

fn chart(title: &str, y_label: &str, series: Vec<Series>) -> Chart {
    Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: y_label.into(),
        series,
    }
}

/// The lines of `metrics.jsonl`.
fn read_log(metrics: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .map_err(|e| Error::format(metrics, format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// `(x, y)` over the lines that have the number `x_key`, with `y` read by `value`.
fn series(log: &[Value], x_key: &str, value: impl Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|line| Some((line.get(x_key)?.as_f64()?, value(line)?)))
        .collect()
}

/// A step line's `key` over the steps.
fn step_series(log: &[Value], key: &str) -> Vec<(f64, f64)> {
    series(log, "step", |l| l.get(key)?.as_f64())
}

/// An evaluation line's `key` over the evaluations.
fn eval_series(log: &[Value], key: &str) -> Vec<(f64, f64)> {
    series(log, "eval_step", |l| l.get(key)?.as_f64())
}
