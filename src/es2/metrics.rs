//! `metrics.jsonl`: one JSON object per step and per evaluation, flushed as it is written so a
//! crashed run keeps everything up to the crash; a resumed run drops the lines past its
//! checkpoint and continues the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::engine::StepReport;
use super::trainer::Evaluation;
use crate::{Error, Result};

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
