//! Checkpoints: `out/checkpoints/step-NNNNNN/` holding `trainable.safetensors` (the trainable
//! parameters and their AdamW moments) and `state.json` (step, configuration, ES2's base
//! statistics, data samplers, evaluations). Each folder is built aside and renamed into place, so a crash
//! leaves either the previous checkpoint or the complete new one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::Sampler;
use super::objective::BaseStats;
use super::optimizer::AdamW;
use super::report::Evaluation;
use super::train_config::TrainConfig;
use crate::eval::refusal::RefusalRates;
use crate::gpu::{Gpu, Tensor};
use crate::io::{atomic_dir, write_json, write_safetensors, SaveTensor};
use crate::model::{Checkpoint, Gradients, NamedParam, Transformer};
use crate::{Error, Result};

const STATE: &str = "state.json";
const TENSORS: &str = "trainable.safetensors";
const FOLDER: &str = "checkpoints";

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps completed when the checkpoint was written.
    pub step: usize,
    /// The run's configuration (a resumed run continues with it).
    pub config: TrainConfig,
    /// ES2's constants measured on the base model (none under SFT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_stats: Option<BaseStats>,
    /// One per data set the objective draws from (ES2: harmful, harmless; SFT: one).
    pub samplers: Vec<Sampler>,
    /// Every held-out evaluation so far.
    pub evaluations: Vec<Evaluation>,
    /// Refusal rates on the held-out sample before the first step, when the run measures them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusals_before: Option<RefusalRates>,
    /// The steps skipped so far for a non-finite loss or gradient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<usize>,
}

impl CheckpointState {
    /// Reads the `state.json` of checkpoint folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not a checkpoint state: {e}")))
    }
}

/// The checkpoint folder for `step` under output folder `out`.
pub fn folder(out: &Path, step: usize) -> PathBuf {
    out.join(FOLDER).join(format!("step-{step:06}"))
}

/// Writes the checkpoint and keeps the newest `keep` (at least this one).
pub fn save(
    gpu: &Gpu,
    out: &Path,
    state: &CheckpointState,
    model: &Transformer,
    (grads, optimizer): (&Gradients, &AdamW),
    keep: usize,
) -> Result<PathBuf> {
    let dir = folder(out, state.step);
    atomic_dir(&dir, |tmp| {
        let tensors = trained_tensors(&grads.named(model), optimizer)
            .map(|(name, t)| {
                let tensor = t.clone();
                (name, SaveTensor::Device { gpu, tensor })
            })
            .collect();
        write_safetensors(&tmp.join(TENSORS), tensors, None)?;
        write_json(&tmp.join(STATE), state)
    })?;
    prune(out, keep.max(1))?;
    Ok(dir)
}

fn checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let root = out.join(FOLDER);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join(STATE).exists()
        })
        .collect();
    found.sort();
    Ok(found)
}

fn prune(out: &Path, keep: usize) -> Result<()> {
    let all = checkpoints(out)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

/// Cleans up output folder `out` after a run was killed while writing a checkpoint or an
/// output (see [`crate::io::recover`]).
pub fn recover(out: &Path) -> Result<()> {
    crate::io::recover(out)?;
    crate::io::recover(&out.join(FOLDER))
}

/// Removes the checkpoints of an earlier run in `out`, which a new run replaces: left in
/// place, `--resume` could continue the earlier run and pruning could keep its checkpoints
/// over the new run's.
pub fn remove_all(out: &Path) -> Result<()> {
    let root = out.join(FOLDER);
    match std::fs::remove_dir_all(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&root, e)),
        _ => Ok(()),
    }
}

/// `dir` itself when it is a checkpoint, else the newest checkpoint of output folder `dir`.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE).exists() {
        return Ok(dir.to_owned());
    }
    checkpoints(dir)?.pop().ok_or_else(|| {
        Error::format(
            dir,
            format!("no checkpoint to resume: neither {STATE} nor {FOLDER}/step-*/ is here"),
        )
    })
}

/// Loads the trainable parameters of `model` (those `grads` covers) and the AdamW moments
/// saved in `dir`.
pub fn restore_tensors(
    gpu: &Gpu,
    dir: &Path,
    model: &Transformer,
    grads: &Gradients,
    optimizer: &AdamW,
) -> Result<()> {
    let checkpoint = Checkpoint::open_file(&dir.join(TENSORS))?;
    for (name, t) in trained_tensors(&grads.named(model), optimizer) {
        t.write_f32(gpu, &checkpoint.load_f32(&name, t.dims())?)?;
    }
    Ok(())
}

/// Every tensor a checkpoint holds, by its name there: each trained parameter and its two
/// AdamW moments.
fn trained_tensors<'a>(
    params: &'a [NamedParam],
    optimizer: &'a AdamW,
) -> impl Iterator<Item = (String, &'a Tensor)> {
    params
        .iter()
        .zip(optimizer.m.iter().zip(&optimizer.v))
        .flat_map(|(p, (m, v))| {
            [("param", &p.param), ("adam_m", m), ("adam_v", v)]
                .map(|(kind, t)| (format!("{kind}/{}", p.name), t))
        })
}
