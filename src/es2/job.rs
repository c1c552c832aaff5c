//! What a run trains for: ES2 or supervised fine-tuning, each with its engine, its data and its
//! samplers. The trainer's loop, schedule, checkpoints, metrics and outputs are shared; this
//! file holds what differs: how data load, what one step draws and measures, and what a
//! held-out evaluation measures.

use std::path::{Path, PathBuf};

use super::checkpoint::CheckpointState;
use super::data::{
    read_prompts, split, tokenize_conversations, tokenize_prompts, Example, Sampler, Side, Split,
};
use super::engine::{measure_base_stats, Es2Engine, ModelPair};
use super::metrics::{write_es2_curves, write_sft_curves};
use super::objective::{embedding_index, BaseStats};
use super::optimizer::AdamW;
use super::report::{Es2HeldOut, Evaluation, HeldOut, SftHeldOut, StepReport};
use super::sft::SftEngine;
use super::train_config::{Task, TrainConfig};
use super::trainer::TrainObserver;
use crate::eval::heldout::{heldout_kl, heldout_loss, heldout_separation, SeparationSpec};
use crate::gpu::Gpu;
use crate::model::{Batch, Gradients, Output, Pass};
use crate::text::{load_conversations, Tokenizer};
use crate::{Error, Result};

/// The objective of a run with its engine and data.
// A run holds one; boxing a variant would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Job {
    /// Embedding Space Separation.
    Es2(Es2Job),
    /// Supervised fine-tuning.
    Sft(SftJob),
}

/// ES2: harmful and harmless prompts, one sampler each, the base statistics in the engine.
#[derive(Debug)]
pub struct Es2Job {
    /// The ES2 training step.
    pub engine: Es2Engine,
    harmful: Split,
    harmless: Split,
    samplers: [Sampler; 2],
}

/// Supervised fine-tuning: conversations with their learned tokens, one sampler.
#[derive(Debug)]
pub struct SftJob {
    /// The SFT training step.
    pub engine: SftEngine,
    conversations: Split<Example>,
    /// The token count of each training conversation.
    lengths: Vec<usize>,
    sampler: Sampler,
}

/// What a job needs to start: the run's model, tokenizer and configuration, and the
/// checkpoint it resumes from, if any.
pub(crate) struct Start<'a> {
    pub gpu: &'a Gpu,
    pub config: &'a TrainConfig,
    pub models: &'a ModelPair,
    pub tokenizer: &'a Tokenizer,
    pub resumed: Option<&'a CheckpointState>,
}

impl Job {
    /// Loads the data of `config.task` and builds its engine: fresh, or as `start.resumed`
    /// left it (its samplers and base statistics; the tensors are restored by the caller).
    pub(crate) fn start(start: &Start, observer: &mut dyn TrainObserver) -> Result<Job> {
        match start.config.task {
            Task::Es2 => Es2Job::start(start, observer).map(Job::Es2),
            Task::Sft => SftJob::start(start, observer).map(Job::Sft),
        }
    }

    /// One step on the next batches at learning rate `lr`, with LoRA dropout masks drawn
    /// from `seed`.
    pub(crate) fn step(
        &mut self,
        gpu: &Gpu,
        models: &ModelPair,
        config: &TrainConfig,
        lr: f64,
        seed: u32,
    ) -> Result<StepReport> {
        let vocab = models.tuned.config.vocab_size;
        match self {
            Job::Es2(job) => {
                let [h, s] = &mut job.samplers;
                let h = h.next(&job.harmful.train, config.harmful_batch);
                let s = s.next(&job.harmless.train, config.harmless_batch);
                // One length for both sides, so that their activations share the pool's
                // buffers (as the memory plan assumes) whatever the prompts' lengths.
                let seq = h.iter().chain(&s).map(Vec::len).max().unwrap_or(1);
                let harmful = Batch::padded(gpu, &h, vocab, seq)?;
                let harmless = Batch::padded(gpu, &s, vocab, seq)?;
                job.engine.step(gpu, models, &harmful, &harmless, lr, seed)
            }
            Job::Sft(job) => {
                let train = &job.conversations.train;
                let rows = if config.group_by_length {
                    job.sampler
                        .next_by_length(train, &job.lengths, config.sft_batch)
                } else {
                    job.sampler.next(train, config.sft_batch)
                };
                let batch = sft_batch(gpu, &rows, vocab)?;
                job.engine.step(gpu, &models.tuned, &batch, lr, seed)
            }
        }
    }

    /// The held-out measurements after `step` steps.
    pub(crate) fn evaluate(
        &self,
        gpu: &Gpu,
        models: &ModelPair,
        config: &TrainConfig,
        step: usize,
    ) -> Result<Evaluation> {
        let held_out = match self {
            Job::Es2(job) => HeldOut::Es2(job.evaluate(gpu, models, config)?),
            Job::Sft(job) => HeldOut::Sft(job.evaluate(gpu, models, config)?),
        };
        Ok(Evaluation { step, held_out })
    }

    /// The trained parameters' gradients.
    pub fn grads(&self) -> &Gradients {
        match self {
            Job::Es2(job) => &job.engine.grads,
            Job::Sft(job) => &job.engine.grads,
        }
    }

    /// The optimizer (its moments and step count).
    pub fn optimizer(&self) -> &AdamW {
        match self {
            Job::Es2(job) => &job.engine.optimizer,
            Job::Sft(job) => &job.engine.optimizer,
        }
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut AdamW {
        match self {
            Job::Es2(job) => &mut job.engine.optimizer,
            Job::Sft(job) => &mut job.engine.optimizer,
        }
    }

    /// The samplers' state, for a checkpoint.
    pub(crate) fn samplers(&self) -> Vec<Sampler> {
        match self {
            Job::Es2(job) => job.samplers.to_vec(),
            Job::Sft(job) => vec![job.sampler.clone()],
        }
    }

    /// ES2's base statistics, for a checkpoint.
    pub(crate) fn base_stats(&self) -> Option<&BaseStats> {
        match self {
            Job::Es2(job) => Some(&job.engine.base_stats),
            Job::Sft(_) => None,
        }
    }

    /// The layers ES2 separates (none under SFT).
    pub fn layers(&self) -> &[usize] {
        match self {
            Job::Es2(job) => &job.engine.layers,
            Job::Sft(_) => &[],
        }
    }

    /// Draws the run's `curves.svg` from its `metrics.jsonl`.
    pub(crate) fn write_curves(&self, metrics: &Path, svg: &Path) -> Result<()> {
        match self {
            Job::Es2(job) => write_es2_curves(metrics, svg, &job.engine.layers),
            Job::Sft(_) => write_sft_curves(metrics, svg),
        }
    }
}

/// The samplers a checkpoint holds, checked against how many the task draws from.
fn saved_samplers<const N: usize>(state: &CheckpointState) -> Result<[Sampler; N]> {
    state
        .samplers
        .clone()
        .try_into()
        .map_err(|found: Vec<Sampler>| {
            Error::InvalidArgument(format!(
                "the checkpoint holds {} data samplers; its objective draws from {N}",
                found.len()
            ))
        })
}

impl Es2Job {
    fn start(s: &Start, observer: &mut dyn TrainObserver) -> Result<Self> {
        let config = s.config;
        let (harmful, harmless, truncated) = load_prompt_sets(config, s.tokenizer)?;
        if truncated > 0 {
            observer.message(&format!(
                "{truncated} prompts are longer than --max-len {} tokens: each keeps its last {} \
                 tokens",
                config.max_len, config.max_len
            ));
        }
        observer.message(&format!(
            "{} prompts: {} harmful + {} harmless for training, {} + {} held out",
            config.model,
            harmful.train.len(),
            harmless.train.len(),
            harmful.val.len(),
            harmless.val.len()
        ));
        let (stats, samplers) = match s.resumed {
            Some(state) => {
                let stats = state.base_stats.clone().ok_or_else(|| {
                    Error::InvalidArgument("the ES2 checkpoint holds no base statistics".into())
                })?;
                (stats, saved_samplers(state)?)
            }
            None => {
                let stats = base_stats(s.gpu, s.models, config, &harmful, &harmless)?;
                observer.message(&format!(
                    "base model over layers {:?}: D = {:?}, margins {:?}",
                    stats.layers,
                    round(&stats.distance),
                    round(&stats.margin)
                ));
                let seeds = [config.seed ^ 0x4841_524D, config.seed ^ 0x5341_4645];
                (stats, seeds.map(Sampler::new))
            }
        };
        let mut engine = Es2Engine::new(
            s.gpu,
            &s.models.tuned,
            config.trainable(),
            config.objective.clone(),
            config.optimizer.clone(),
            stats,
            config.lora_dropout(),
        )?;
        engine.save = config.save_policy();
        Ok(Es2Job {
            engine,
            harmful,
            harmless,
            samplers,
        })
    }

    /// Held-out separation per layer and KL to the base model.
    fn evaluate(&self, gpu: &Gpu, models: &ModelPair, cfg: &TrainConfig) -> Result<Es2HeldOut> {
        let model = &models.tuned;
        let vocab = model.config.vocab_size;
        let h = batches(
            gpu,
            self.harmful.eval_set(cfg.eval_prompts),
            cfg.harmful_batch,
            vocab,
        )?;
        let s = batches(
            gpu,
            self.harmless.eval_set(cfg.eval_prompts),
            cfg.harmless_batch,
            vocab,
        )?;
        let stats = &self.engine.base_stats;
        let hidden: Vec<usize> = self
            .engine
            .layers
            .iter()
            .map(|&l| embedding_index(l))
            .collect();
        let spec = SeparationSpec {
            hidden: &hidden,
            pool: cfg.objective.pool,
            options: cfg.objective.separation_options(),
            nu: &stats.nu,
            base_centroid: &stats.centroid,
        };
        let tuned = (model, Pass::new(Output::Hidden(model.layers())));
        let kl = heldout_kl(gpu, tuned, models.base(), &s, &cfg.objective.kl_options())?;
        Ok(Es2HeldOut {
            distance: heldout_separation(gpu, model, &h, &s, &spec)?,
            kl,
        })
    }
}

impl SftJob {
    fn start(s: &Start, observer: &mut dyn TrainObserver) -> Result<Self> {
        let config = s.config;
        let path = config.data_path()?;
        let chat = config.chat && s.tokenizer.has_chat_template();
        let conversations = load_conversations(path)?;
        let (examples, truncated) =
            tokenize_conversations(s.tokenizer, &conversations, chat, config.max_len)
                .map_err(|e| in_file(path, e))?;
        if truncated > 0 {
            observer.message(&format!(
                "{truncated} conversations are longer than --max-len {} tokens: each keeps its \
                 whole replies that fit (see the README's Training section)",
                config.max_len
            ));
        }
        let conversations = split(examples, config.val_fraction, config.seed ^ 3)?;
        if conversations.train.is_empty() {
            return Err(Error::config(
                "val_fraction",
                "leaves no training conversations: hold out fewer, or give more conversations",
            ));
        }
        let learned: usize = conversations.train.iter().map(learned_targets).sum();
        observer.message(&format!(
            "{}: {} conversations for training ({learned} learned tokens), {} held out{}",
            path.display(),
            conversations.train.len(),
            conversations.val.len(),
            if chat {
                ""
            } else {
                " (plain text, no chat template)"
            }
        ));
        let sampler = match s.resumed {
            Some(state) => {
                let [sampler] = saved_samplers(state)?;
                sampler
            }
            None => Sampler::new(config.seed ^ 0x5346_5421),
        };
        let mut engine = SftEngine::new(
            s.gpu,
            &s.models.tuned,
            config.trainable(),
            config.optimizer.clone(),
            config.lora_dropout(),
        )?;
        engine.save = config.save_policy();
        Ok(SftJob {
            engine,
            lengths: conversations.train.iter().map(|e| e.ids.len()).collect(),
            conversations,
            sampler,
        })
    }

    /// Mean cross-entropy per learned token of the held-out conversations.
    fn evaluate(&self, gpu: &Gpu, models: &ModelPair, cfg: &TrainConfig) -> Result<SftHeldOut> {
        let vocab = models.tuned.config.vocab_size;
        let batches = self
            .conversations
            .eval_set(cfg.eval_prompts)
            .chunks(cfg.sft_batch.max(1))
            .map(|rows| sft_batch(gpu, rows, vocab))
            .collect::<Result<Vec<_>>>()?;
        let tuned = (
            &models.tuned,
            Pass::new(Output::Hidden(models.tuned.layers())),
        );
        Ok(SftHeldOut {
            loss: heldout_loss(gpu, tuned, &batches)?,
        })
    }
}

/// Tokens of `example` that are a target of the loss (learned, and not the first).
fn learned_targets(example: &Example) -> usize {
    example.learned.iter().skip(1).filter(|&&l| l).count()
}

/// A batch of conversations with their next-token targets.
fn sft_batch(gpu: &Gpu, rows: &[Example], vocab: usize) -> Result<Batch> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|e| e.ids.clone()).collect();
    let learned: Vec<Vec<bool>> = rows.iter().map(|e| e.learned.clone()).collect();
    Batch::with_targets(gpu, &ids, &learned, vocab)
}

/// A tokenising error told as a problem of the file it came from.
fn in_file(path: &Path, error: Error) -> Error {
    match error {
        Error::InvalidArgument(message) => Error::format(path, message),
        other => other,
    }
}

/// Both sides' prompts, tokenised and split, and how many were truncated to `max_len`.
fn load_prompt_sets(config: &TrainConfig, tokenizer: &Tokenizer) -> Result<(Split, Split, usize)> {
    let chat = config.chat && tokenizer.has_chat_template();
    let mut truncated = 0;
    let mut side = |path: &Option<PathBuf>, side: Side, salt: u64| -> Result<Split> {
        let prompts = read_prompts(path.as_deref(), side)?;
        let (ids, cut) = tokenize_prompts(tokenizer, &prompts, chat, config.max_len).map_err(
            |e| match path {
                Some(path) => in_file(path, e),
                None => e,
            },
        )?;
        truncated += cut;
        split(ids, config.val_fraction, config.seed ^ salt)
    };
    let harmful = side(&config.harmful, Side::Harmful, 1)?;
    let harmless = side(&config.harmless, Side::Harmless, 2)?;
    if harmful.train.is_empty() || harmless.train.is_empty() {
        return Err(Error::config(
            "val_fraction",
            "leaves no training prompts: hold out fewer, or give more prompts",
        ));
    }
    Ok((harmful, harmless, truncated))
}

/// ν, D(base), margins and centroid over (a capped number of) the training prompts.
fn base_stats(
    gpu: &Gpu,
    models: &ModelPair,
    config: &TrainConfig,
    harmful: &Split,
    harmless: &Split,
) -> Result<BaseStats> {
    let vocab = models.tuned.config.vocab_size;
    let take = |p: &[Vec<u32>]| p[..p.len().min(config.base_prompts)].to_vec();
    let h = batches(gpu, &take(&harmful.train), config.harmful_batch, vocab)?;
    let s = batches(gpu, &take(&harmless.train), config.harmless_batch, vocab)?;
    measure_base_stats(gpu, models.base_model(), &config.objective, &h, &s)
}

/// `prompts` in batches of at most `size`.
fn batches(gpu: &Gpu, prompts: &[Vec<u32>], size: usize, vocab: usize) -> Result<Vec<Batch>> {
    prompts
        .chunks(size.max(1))
        .map(|chunk| Batch::new(gpu, chunk, vocab))
        .collect()
}

fn round(xs: &[f32]) -> Vec<f32> {
    xs.iter().map(|x| (x * 1e4).round() / 1e4).collect()
}
