//! A training run's settings ([`TrainConfig`]): the model and data, the objective and its
//! task, the optimizer and schedule, adapters, memory and output options, with the defaults a
//! bare `es2-wgpu train` uses and the checks that turn a bad setting into an error before any
//! weight loads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::objective::Es2Config;
use super::optimizer::OptimizerConfig;
use crate::model::{LoraConfig, SavePolicy, Trainable, WeightsDtype};
use crate::{Error, Result};

/// What a run trains for.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Embedding Space Separation on harmful and harmless prompts (`objective` holds its
    /// options).
    #[default]
    Es2,
    /// Supervised fine-tuning: cross-entropy on the assistant turns of the conversations in
    /// `data`.
    Sft,
}

/// Everything a run is configured with (stored in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TrainConfig {
    /// A model folder or the name of an embedded model.
    pub model: String,
    /// The objective trained: ES2 (the default) or supervised fine-tuning.
    pub task: Task,
    /// Harmful prompt file (ES2); `None` uses the built-in set.
    pub harmful: Option<PathBuf>,
    /// Harmless prompt file (ES2); `None` uses the built-in set.
    pub harmless: Option<PathBuf>,
    /// The conversations supervised fine-tuning learns (JSON, JSONL or CSV; see
    /// [`load_conversations`](crate::text::load_conversations)); required by [`Task::Sft`].
    pub data: Option<PathBuf>,
    /// The output folder: adapter or model, metrics, checkpoints, curves, summary.
    pub out: PathBuf,
    /// The ES2 objective's options.
    pub objective: Es2Config,
    /// LoRA settings; `None` is full fine-tuning.
    pub lora: Option<LoraConfig>,
    /// AdamW and the learning-rate schedule.
    pub optimizer: OptimizerConfig,
    /// Training steps in all (a resumed run's new total).
    pub steps: usize,
    /// Harmful prompts per ES2 step.
    pub harmful_batch: usize,
    /// Harmless prompts per ES2 step.
    pub harmless_batch: usize,
    /// Conversations per SFT step.
    pub sft_batch: usize,
    /// SFT: draw each batch from conversations of similar length, so that batches carry
    /// little padding (transformers' `group_by_length`; see
    /// [`Sampler::next_by_length`](super::data::Sampler::next_by_length)).
    pub group_by_length: bool,
    /// Prompts longer than this many tokens keep their last `max_len` tokens; longer
    /// conversations are cut as [`tokenize_conversations`](super::data::tokenize_conversations)
    /// says.
    pub max_len: usize,
    /// Seed of the adapters' initialisation, the data order and dropout.
    pub seed: u64,
    /// Steps whose loss or gradient is NaN or infinite that the run may skip (each logged in
    /// `metrics.jsonl`) before it stops; 0: stop at the first. A skipped step changes nothing
    /// on the model: the GPU applies no update whose gradient norm is not finite.
    pub skip_nonfinite: usize,
    /// Fraction of each data set held out for evaluation.
    pub val_fraction: f32,
    /// Held-out evaluation every this many steps (and at the start and end); 0: start/end.
    pub eval_every: usize,
    /// A checkpoint every this many steps; 0: none.
    pub save_every: usize,
    /// Checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Training prompts per side used to measure the base statistics.
    pub base_prompts: usize,
    /// Held-out prompts per side (or held-out conversations) used by an evaluation.
    pub eval_prompts: usize,
    /// Prompts per side of the built-in held-out sets (a fixed sample, see
    /// [`heldout_sample`](crate::eval::refusal::heldout_sample)) whose greedy replies measure
    /// the refusal rates before the first step and after the last; 0 (the default, but not the
    /// built-in chat model's) measures none.
    pub refusal_sample: usize,
    /// Wrap prompts and conversations in the model's chat template (when it has one).
    pub chat: bool,
    /// Also write a merged Hugging Face model folder (LoRA runs).
    pub merge: bool,
    /// Replace the results of an earlier run in `out` instead of refusing to.
    pub overwrite: bool,
    /// The element type of the frozen weights' matrices (block projections, embedding, LM
    /// head; see [`LoadOptions::weights`](crate::model::LoadOptions::weights)): the whole
    /// model of a LoRA run, the frozen reference copy of a full ES2 fine-tune (whose trained
    /// copy stays f32). A full SFT run has no frozen weights. Read from the `f16-weights` flag
    /// of runs saved before it.
    #[serde(
        alias = "f16-weights",
        deserialize_with = "WeightsDtype::deserialize_or_flag"
    )]
    pub weights_dtype: WeightsDtype,
    /// Refuse model weights holding NaN or ±Inf (see
    /// [`LoadOptions::strict`](crate::model::LoadOptions::strict)).
    pub strict: bool,
    /// Activation recomputation: the forwards keep only each block's input and the backward
    /// runs each block again ([`SavePolicy::BlockInputs`](crate::model::SavePolicy)), for
    /// the same gradients at a fraction of the memory. Turned on by the run itself when its
    /// memory plan fits only with it.
    pub recompute: bool,
    /// The GPU memory the run may use, in bytes, when known (wgpu does not report it): the
    /// memory plan is checked against it before anything loads.
    pub gpu_memory: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: crate::model::embedded::DEFAULT.to_owned(),
            task: Task::Es2,
            harmful: None,
            harmless: None,
            data: None,
            out: PathBuf::from("es2-out"),
            objective: Es2Config::default(),
            lora: Some(LoraConfig::default()),
            optimizer: OptimizerConfig::default(),
            steps: 200,
            harmful_batch: 8,
            harmless_batch: 8,
            sft_batch: 8,
            group_by_length: false,
            max_len: 128,
            seed: 0,
            skip_nonfinite: 0,
            val_fraction: 0.1,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 2,
            base_prompts: 128,
            eval_prompts: 64,
            refusal_sample: 0,
            chat: true,
            merge: false,
            overwrite: false,
            weights_dtype: WeightsDtype::F32,
            strict: false,
            recompute: false,
            gpu_memory: None,
        }
    }
}

impl TrainConfig {
    /// The defaults for `model`: the global ones, overridden by an embedded model's preset.
    pub fn for_model(model: &str) -> Result<Self> {
        let mut config = TrainConfig {
            model: model.to_owned(),
            ..TrainConfig::default()
        };
        let is_folder = Path::new(model).is_dir();
        if let Some(embedded) = crate::model::embedded::find(model).filter(|_| !is_folder) {
            let p = embedded.training_preset()?;
            config.steps = p.steps.unwrap_or(config.steps);
            config.optimizer.lr = p.lr.unwrap_or(config.optimizer.lr);
            config.harmful_batch = p.harmful_batch.unwrap_or(config.harmful_batch);
            config.harmless_batch = p.harmless_batch.unwrap_or(config.harmless_batch);
            config.max_len = p.max_len.unwrap_or(config.max_len);
            config.eval_every = p.eval_every.unwrap_or(config.eval_every);
            config.refusal_sample = p.refusal_sample.unwrap_or(config.refusal_sample);
        }
        Ok(config)
    }

    /// An error naming the first field that is out of range or missing for the objective.
    pub fn validate(&self) -> Result<()> {
        let at_least = |field, min: usize, value: usize| {
            if value < min {
                return Err(Error::config(
                    field,
                    format!("must be at least {min}, got {value}"),
                ));
            }
            Ok(())
        };
        at_least("steps", 1, self.steps)?;
        at_least("max_len", 2, self.max_len)?;
        match self.task {
            Task::Es2 => {
                at_least("harmful_batch", 1, self.harmful_batch)?;
                at_least("harmless_batch", 1, self.harmless_batch)?;
                if self.data.is_some() {
                    return Err(Error::config(
                        "data",
                        "conversations are what the sft objective learns; es2 reads the harmful \
                         and harmless prompts",
                    ));
                }
                if self.group_by_length {
                    return Err(Error::config(
                        "group_by_length",
                        "groups the sft objective's conversations; es2 draws its prompts in \
                         plain shuffled batches",
                    ));
                }
                self.objective.validate()?;
            }
            Task::Sft => {
                at_least("sft_batch", 1, self.sft_batch)?;
                let narrow = matches!(self.weights_dtype, WeightsDtype::F16 | WeightsDtype::Bf16);
                if narrow && self.lora.is_none() {
                    return Err(Error::config(
                        "weights_dtype",
                        "a full fine-tune under sft trains every weight in f32 and keeps no \
                         frozen copy to store in 16 bits",
                    ));
                }
                self.data_path()?;
                for (field, given) in [("harmful", &self.harmful), ("harmless", &self.harmless)] {
                    if given.is_some() {
                        return Err(Error::config(
                            field,
                            "prompt sets are what the es2 objective reads; sft learns the \
                             conversations in data",
                        ));
                    }
                }
            }
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        self.optimizer.validate()
    }

    /// The conversations file of an SFT run.
    pub fn data_path(&self) -> Result<&Path> {
        self.data.as_deref().ok_or_else(|| {
            Error::config(
                "data",
                "the sft objective needs conversations to learn: a JSON, JSONL or CSV file of \
                 {\"prompt\", \"response\"} or {\"messages\": [...]} rows",
            )
        })
    }

    pub(crate) fn trainable(&self) -> Trainable {
        if self.lora.is_some() {
            Trainable::Lora
        } else {
            Trainable::Full
        }
    }

    /// What the training forwards keep for the backward: with [`TrainConfig::recompute`],
    /// only the blocks' inputs.
    pub fn save_policy(&self) -> SavePolicy {
        if self.recompute {
            SavePolicy::BlockInputs
        } else {
            SavePolicy::Everything
        }
    }

    /// Dropout on the adapters' inputs (0 without adapters).
    pub(crate) fn lora_dropout(&self) -> f32 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout)
    }
}
