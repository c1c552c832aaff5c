//! The training loop: data, base-model statistics, steps with a learning-rate schedule,
//! held-out evaluation, the metrics log, atomic checkpoints with exact resume, and the final
//! outputs (a PEFT adapter, optionally merged, or a full model folder).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointState};
use super::data::{read_prompts, split, tokenize_prompts, Sampler, Side, Split};
use super::engine::{measure_base_stats, Es2Engine, ModelPair, StepReport};
use super::metrics::{write_curves, MetricsLog};
use super::objective::{embedding_index, BaseStats, Es2Config};
use super::optimizer::OptimizerConfig;
use crate::eval::heldout::{heldout_kl, heldout_separation, SeparationSpec};
use crate::gpu::Gpu;
use crate::model::{open_model, Batch, LoadOptions, LoraConfig, Output, Pass, Trainable};
use crate::text::Tokenizer;
use crate::{Error, Result};

/// Everything a run is configured with (stored in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TrainConfig {
    /// A model folder or the name of an embedded model.
    pub model: String,
    /// Harmful / harmless prompt files; `None` uses the built-in sets.
    pub harmful: Option<PathBuf>,
    pub harmless: Option<PathBuf>,
    pub out: PathBuf,
    pub objective: Es2Config,
    /// LoRA settings; `None` is full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub optimizer: OptimizerConfig,
    pub steps: usize,
    pub harmful_batch: usize,
    pub harmless_batch: usize,
    /// Prompts longer than this many tokens keep their last `max_len` tokens.
    pub max_len: usize,
    pub seed: u64,
    pub val_fraction: f32,
    /// Held-out evaluation every this many steps (and at the start and end); 0: start/end.
    pub eval_every: usize,
    /// A checkpoint every this many steps; 0: none.
    pub save_every: usize,
    /// Checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Training prompts per side used to measure the base statistics.
    pub base_prompts: usize,
    /// Held-out prompts per side used by an evaluation.
    pub eval_prompts: usize,
    /// Wrap prompts in the model's chat template (when it has one).
    pub chat: bool,
    /// Also write a merged Hugging Face model folder (LoRA runs).
    pub merge: bool,
    /// Replace the results of an earlier run in `out` instead of refusing to.
    pub overwrite: bool,
    /// Store the frozen base weights' block projections in f16 (half their memory; see
    /// [`LoadOptions::f16_weights`]): the whole model of a LoRA run, the frozen reference copy
    /// of a full fine-tune (whose trained copy stays f32).
    pub f16_weights: bool,
    /// Refuse model weights holding NaN or ±Inf (see [`LoadOptions::strict`]).
    pub strict: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: crate::model::embedded::DEFAULT.to_owned(),
            harmful: None,
            harmless: None,
            out: PathBuf::from("es2-out"),
            objective: Es2Config::default(),
            lora: Some(LoraConfig::default()),
            optimizer: OptimizerConfig::default(),
            steps: 200,
            harmful_batch: 8,
            harmless_batch: 8,
            max_len: 128,
            seed: 0,
            val_fraction: 0.1,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 2,
            base_prompts: 128,
            eval_prompts: 64,
            chat: true,
            merge: false,
            overwrite: false,
            f16_weights: false,
            strict: false,
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
        }
        Ok(config)
    }

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
        at_least("harmful_batch", 1, self.harmful_batch)?;
        at_least("harmless_batch", 1, self.harmless_batch)?;
        at_least("max_len", 2, self.max_len)?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        self.objective.validate()?;
        self.optimizer.validate()
    }

    fn trainable(&self) -> Trainable {
        if self.lora.is_some() {
            Trainable::Lora
        } else {
            Trainable::Full
        }
    }
}

/// Held-out measurements at one point of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub step: usize,
    /// D_l on held-out prompts (normalised by the training ν_l as in the objective).
    pub distance: Vec<f64>,
    /// T²·KL(base ‖ tuned) per held-out harmless token (the objective's direction and T).
    pub kl: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The layers whose embeddings were separated.
    pub layers: Vec<usize>,
    /// The held-out evaluation before the first step.
    pub before: Evaluation,
    /// The held-out evaluation after the last step.
    pub after: Evaluation,
    /// Steps completed.
    pub steps: usize,
    /// Wall time of this `run` call (a resumed run counts from its resumption).
    pub seconds: f64,
    /// The output folder.
    pub out: PathBuf,
    /// The run's charts (`curves.svg` in the output folder): losses per step, held-out
    /// separation per layer and KL per evaluation.
    pub curves: PathBuf,
}

/// Progress callbacks, so the library stays free of terminal output. Every method has a
/// default that does nothing.
pub trait TrainObserver {
    /// A line worth showing: the weights' memory, the data split, the base statistics,
    /// checkpoints and output paths.
    fn message(&mut self, _text: &str) {}
    /// Step `step` of `total` is done; `report` holds its losses and separation.
    fn step(&mut self, _step: usize, _total: usize, _report: &StepReport, _tokens_per_s: f64) {}
    /// A held-out evaluation is done (before the first step, every `eval_every` steps, at the
    /// end).
    fn evaluation(&mut self, _eval: &Evaluation) {}
    /// Asked after every step of [`Trainer::run`]: `true` ends the run there, which is then
    /// evaluated and written out as a run of that many steps would be.
    fn stop(&mut self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl TrainObserver for Quiet {}

/// A training run in progress.
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    pub config: TrainConfig,
    /// The model in training and its reference (see [`ModelPair`]).
    pub models: ModelPair,
    pub tokenizer: Tokenizer,
    harmful: Split,
    harmless: Split,
    samplers: [Sampler; 2],
    pub engine: Es2Engine,
    /// Steps completed.
    pub step: usize,
    evaluations: Vec<Evaluation>,
    metrics: MetricsLog,
}

impl<'g> Trainer<'g> {
    /// Prepares a fresh run: loads the model (adding LoRA adapters, or a frozen copy for full
    /// fine-tuning), the data, and measures the base statistics.
    pub fn new(
        gpu: &'g Gpu,
        config: TrainConfig,
        observer: &mut dyn TrainObserver,
    ) -> Result<Self> {
        config.validate()?;
        check_out_dir(&config.out, config.overwrite)?;
        let setup = Setup::load(gpu, &config)?;
        checkpoint::recover(&config.out)?;
        if config.overwrite {
            checkpoint::remove_all(&config.out)?;
        }
        for line in setup.messages(&config) {
            observer.message(&line);
        }
        observer.message(&format!(
            "{} prompts: {} harmful + {} harmless for training, {} + {} held out",
            config.model,
            setup.harmful.train.len(),
            setup.harmless.train.len(),
            setup.harmful.val.len(),
            setup.harmless.val.len()
        ));
        let stats = setup.measure_base_stats(gpu, &config)?;
        observer.message(&format!(
            "base model over layers {:?}: D = {:?}, margins {:?}",
            stats.layers,
            round(&stats.distance),
            round(&stats.margin)
        ));
        let metrics = MetricsLog::create(&config.out.join("metrics.jsonl"))?;
        let seeds = [config.seed ^ 0x4841_524D, config.seed ^ 0x5341_4645];
        setup.into_trainer(gpu, config, stats, seeds.map(Sampler::new), metrics)
    }

    /// Continues the run saved in checkpoint folder `dir` (or the latest checkpoint of an
    /// output folder). `steps` extends the run when given.
    pub fn resume(
        gpu: &'g Gpu,
        dir: &Path,
        steps: Option<usize>,
        observer: &mut dyn TrainObserver,
    ) -> Result<Self> {
        checkpoint::recover(dir)?;
        let dir = checkpoint::resolve(dir)?;
        let state = CheckpointState::read(&dir)?;
        let mut config = state.config;
        checkpoint::recover(&config.out)?;
        if let Some(steps) = steps {
            config.steps = steps;
        }
        config.validate()?;
        let setup = Setup::load(gpu, &config)?;
        for line in setup.messages(&config) {
            observer.message(&line);
        }
        let metrics = MetricsLog::resume(&config.out.join("metrics.jsonl"), state.step)?;
        let mut trainer =
            setup.into_trainer(gpu, config, state.base_stats, state.samplers, metrics)?;
        checkpoint::restore_tensors(gpu, &dir, &trainer.models.tuned, &mut trainer.engine)?;
        trainer.engine.optimizer.step = state.step as u64;
        trainer.step = state.step;
        trainer.evaluations = state.evaluations;
        observer.message(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.step
        ));
        Ok(trainer)
    }

    /// Runs the remaining steps (or until [`TrainObserver::stop`] says so), evaluating and
    /// checkpointing as configured, and writes the outputs: the adapter (or model), the merged
    /// folder when asked, `curves.svg` and `summary.json`.
    pub fn run(&mut self, observer: &mut dyn TrainObserver) -> Result<Summary> {
        let started = Instant::now();
        while self.step < self.config.steps {
            self.advance(observer)?;
            if observer.stop() {
                break;
            }
        }
        if self.evaluations.last().is_none_or(|e| e.step != self.step) {
            self.record_evaluation(observer)?;
        }
        self.write_outputs(observer)?;
        let out = &self.config.out;
        let curves = out.join("curves.svg");
        write_curves(&out.join("metrics.jsonl"), &curves, &self.engine.layers)?;
        observer.message(&format!("curves: {}", curves.display()));
        let before = self
            .evaluations
            .first()
            .cloned()
            .ok_or_else(|| Error::Numerical("no evaluation".into()))?;
        let after = self
            .evaluations
            .last()
            .cloned()
            .ok_or_else(|| Error::Numerical("no evaluation".into()))?;
        let summary = Summary {
            layers: self.engine.layers.clone(),
            before,
            after,
            steps: self.step,
            seconds: started.elapsed().as_secs_f64(),
            out: self.config.out.clone(),
            curves,
        };
        crate::io::write_json(&self.config.out.join("summary.json"), &summary)?;
        Ok(summary)
    }

    /// One logged step: the held-out evaluation before the first step, the step, its metrics
    /// line, and the evaluation and checkpoint when they fall due.
    pub fn advance(&mut self, observer: &mut dyn TrainObserver) -> Result<StepReport> {
        if self.evaluations.is_empty() {
            self.record_evaluation(observer)?;
        }
        let total = self.config.steps;
        let started = Instant::now();
        let report = self.train_step()?;
        let tokens_per_s = report.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let lr = self.config.optimizer.lr_at(self.step, total);
        self.metrics.step(self.step, &report, lr, tokens_per_s)?;
        crate::failpoint::hit("step", &self.step.to_string());
        observer.step(self.step, total, &report, tokens_per_s);
        let every = self.config.eval_every;
        if (every > 0 && self.step % every == 0) || self.step == total {
            self.record_evaluation(observer)?;
        }
        let save = self.config.save_every;
        if save > 0 && self.step % save == 0 && self.step < total {
            let dir = self.save_checkpoint()?;
            observer.message(&format!("checkpoint {}", dir.display()));
        }
        Ok(report)
    }

    fn record_evaluation(&mut self, observer: &mut dyn TrainObserver) -> Result<()> {
        let eval = self.evaluate()?;
        observer.evaluation(&eval);
        self.metrics.evaluation(&eval)?;
        self.evaluations.push(eval);
        Ok(())
    }

    /// One step on the next batches (not logged; see [`Trainer::advance`]).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let vocab = self.models.tuned.config.vocab_size;
        let [h_sampler, s_sampler] = &mut self.samplers;
        let harmful = Batch::new(
            self.gpu,
            &h_sampler.next(&self.harmful.train, self.config.harmful_batch),
            vocab,
        )?;
        let harmless = Batch::new(
            self.gpu,
            &s_sampler.next(&self.harmless.train, self.config.harmless_batch),
            vocab,
        )?;
        let lr = self
            .config
            .optimizer
            .lr_at(self.step + 1, self.config.steps);
        let seed = (self.config.seed as u32) ^ ((self.step as u32 + 1).wrapping_mul(0x85EB_CA6B));
        let report = self
            .engine
            .step(self.gpu, &self.models, &harmful, &harmless, lr, seed)?;
        self.step += 1;
        Ok(report)
    }

    /// Held-out separation per layer and KL to the base model.
    pub fn evaluate(&self) -> Result<Evaluation> {
        let cfg = &self.config;
        let model = &self.models.tuned;
        let vocab = model.config.vocab_size;
        let h = batches(
            self.gpu,
            eval_set(&self.harmful, cfg.eval_prompts),
            cfg.harmful_batch,
            vocab,
        )?;
        let s = batches(
            self.gpu,
            eval_set(&self.harmless, cfg.eval_prompts),
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
        let tuned = (model, Pass::new(Output::Logits));
        let kl = heldout_kl(
            self.gpu,
            tuned,
            self.models.base(),
            &s,
            &cfg.objective.kl_options(),
        )?;
        Ok(Evaluation {
            step: self.step,
            distance: heldout_separation(self.gpu, model, &h, &s, &spec)?,
            kl,
        })
    }

    /// Writes a checkpoint of the current step; returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = CheckpointState {
            step: self.step,
            config: self.config.clone(),
            base_stats: self.engine.base_stats.clone(),
            samplers: self.samplers.clone(),
            evaluations: self.evaluations.clone(),
        };
        checkpoint::save(
            self.gpu,
            &self.config.out,
            &state,
            &self.models.tuned,
            &self.engine,
            self.config.keep_checkpoints,
        )
    }

    fn write_outputs(&mut self, observer: &mut dyn TrainObserver) -> Result<()> {
        let out = self.config.out.clone();
        match &self.config.lora {
            Some(lora) => {
                self.models
                    .tuned
                    .save_adapter(self.gpu, &out, lora, &self.config.model)?;
                observer.message(&format!("adapter: {}", out.display()));
                if self.config.merge {
                    // The base in f32 whatever the run used: merged weights keep the update
                    // that f16 would round away.
                    let options = LoadOptions {
                        strict: self.config.strict,
                        ..LoadOptions::default()
                    };
                    let mut merged = open_model(self.gpu, &self.config.model, &options)?.0;
                    merged.load_adapter(self.gpu, &out)?;
                    merged.merge_lora(self.gpu)?;
                    let dir = out.join("merged");
                    crate::model::save_pretrained(self.gpu, &merged, &self.config.model, &dir)?;
                    observer.message(&format!("merged model: {}", dir.display()));
                }
            }
            None => {
                let dir = out.join("model");
                crate::model::save_pretrained(
                    self.gpu,
                    &self.models.tuned,
                    &self.config.model,
                    &dir,
                )?;
                observer.message(&format!("model: {}", dir.display()));
            }
        }
        Ok(())
    }
}

/// What a fresh and a resumed run both load before training.
struct Setup {
    models: ModelPair,
    tokenizer: Tokenizer,
    harmful: Split,
    harmless: Split,
    /// Prompts longer than `max_len` tokens, which keep their last `max_len`.
    truncated: usize,
}

impl Setup {
    /// The model (with fresh adapters, or with a frozen copy for full fine-tuning) and the
    /// tokenised, split prompts. The frozen weights are f16 when `config.f16_weights`.
    fn load(gpu: &Gpu, config: &TrainConfig) -> Result<Self> {
        let options = LoadOptions {
            strict: config.strict,
            ..LoadOptions::default()
        };
        let frozen_options = LoadOptions {
            f16_weights: config.f16_weights,
            ..options.clone()
        };
        let (models, tokenizer) = match &config.lora {
            Some(lora) => {
                let (mut model, tokenizer) = open_model(gpu, &config.model, &frozen_options)?;
                model.attach_lora(gpu, lora, config.seed)?;
                let models = ModelPair {
                    tuned: model,
                    frozen: None,
                };
                (models, tokenizer)
            }
            None => {
                let (model, tokenizer) = open_model(gpu, &config.model, &options)?;
                let frozen = open_model(gpu, &config.model, &frozen_options)?.0;
                let models = ModelPair {
                    tuned: model,
                    frozen: Some(frozen),
                };
                (models, tokenizer)
            }
        };
        let (harmful, harmless, truncated) = load_data(config, &tokenizer)?;
        Ok(Setup {
            models,
            tokenizer,
            harmful,
            harmless,
            truncated,
        })
    }

    /// The setup's messages: the memory the weights take, the prompts truncated.
    fn messages(&self, config: &TrainConfig) -> Vec<String> {
        let mut lines = vec![self.weights_message()];
        if self.truncated > 0 {
            lines.push(format!(
                "{} prompts are longer than --max-len {} tokens: each keeps its last {} tokens",
                self.truncated, config.max_len, config.max_len
            ));
        }
        lines
    }

    /// One line on the GPU memory the weights take.
    fn weights_message(&self) -> String {
        let mut bytes = self.models.tuned.parameter_bytes();
        let mut what = "weights";
        if let Some(frozen) = &self.models.frozen {
            bytes += frozen.parameter_bytes();
            what = "weights (trained and frozen copies)";
        }
        let f16 = !self.models.base_model().f16_weight_names().is_empty();
        format!(
            "{what}: {} on the GPU, block projections of the frozen base in {}",
            human_bytes(bytes),
            if f16 { "f16" } else { "f32" }
        )
    }

    /// ν, D(base), margins and centroid over (a capped number of) the training prompts.
    fn measure_base_stats(&self, gpu: &Gpu, config: &TrainConfig) -> Result<BaseStats> {
        let vocab = self.models.tuned.config.vocab_size;
        let take = |p: &[Vec<u32>]| p[..p.len().min(config.base_prompts)].to_vec();
        let h = batches(gpu, &take(&self.harmful.train), config.harmful_batch, vocab)?;
        let s = batches(
            gpu,
            &take(&self.harmless.train),
            config.harmless_batch,
            vocab,
        )?;
        measure_base_stats(gpu, self.models.base_model(), &config.objective, &h, &s)
    }

    fn into_trainer<'g>(
        self,
        gpu: &'g Gpu,
        config: TrainConfig,
        stats: BaseStats,
        samplers: [Sampler; 2],
        metrics: MetricsLog,
    ) -> Result<Trainer<'g>> {
        let engine = Es2Engine::new(
            gpu,
            &self.models.tuned,
            config.trainable(),
            config.objective.clone(),
            config.optimizer.clone(),
            stats,
            config.lora.as_ref().map_or(0.0, |l| l.dropout),
        )?;
        Ok(Trainer {
            gpu,
            models: self.models,
            tokenizer: self.tokenizer,
            harmful: self.harmful,
            harmless: self.harmless,
            samplers,
            engine,
            step: 0,
            evaluations: Vec::new(),
            metrics,
            config,
        })
    }
}

/// Files that mark `out` as holding an earlier run's results.
const RUN_FILES: [&str; 4] = [
    "metrics.jsonl",
    "summary.json",
    "adapter_model.safetensors",
    "checkpoints",
];

fn check_out_dir(out: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    if let Some(&found) = RUN_FILES.iter().find(|f| out.join(f).exists()) {
        return Err(Error::RunExists {
            out: out.to_owned(),
            found,
        });
    }
    Ok(())
}

/// `bytes` in KiB, MiB or GiB.
fn human_bytes(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.2} GiB")
}

fn round(xs: &[f32]) -> Vec<f32> {
    xs.iter().map(|x| (x * 1e4).round() / 1e4).collect()
}

/// The held-out prompts, or (without any) the training prompts, capped at `n`.
fn eval_set(split: &Split, n: usize) -> &[Vec<u32>] {
    let set = if split.val.is_empty() {
        &split.train
    } else {
        &split.val
    };
    &set[..set.len().min(n)]
}

/// Both sides' prompts, tokenised and split, and how many were truncated to `max_len`.
fn load_data(config: &TrainConfig, tokenizer: &Tokenizer) -> Result<(Split, Split, usize)> {
    let chat = config.chat && tokenizer.has_chat_template();
    let mut truncated = 0;
    let mut side = |path: &Option<PathBuf>, side: Side, salt: u64| -> Result<Split> {
        let prompts = read_prompts(path.as_deref(), side)?;
        let (ids, cut) =
            tokenize_prompts(tokenizer, &prompts, chat, config.max_len).map_err(|e| {
                match (path, e) {
                    (Some(path), Error::InvalidArgument(message)) => Error::format(path, message),
                    (_, e) => e,
                }
            })?;
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

/// `prompts` in batches of at most `size`.
fn batches(gpu: &Gpu, prompts: &[Vec<u32>], size: usize, vocab: usize) -> Result<Vec<Batch>> {
    prompts
        .chunks(size.max(1))
        .map(|chunk| Batch::new(gpu, chunk, vocab))
        .collect()
}
