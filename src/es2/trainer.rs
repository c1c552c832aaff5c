//! The training loop: data, base-model statistics, steps with a learning-rate schedule,
//! held-out evaluation, the metrics log, atomic checkpoints with exact resume, and the final
//! outputs (a PEFT adapter, optionally merged, or a full model folder).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::checkpoint::{self, CheckpointState};
use super::engine::ModelPair;
use super::job::{Job, Start};
use super::metrics::MetricsLog;
use super::plan::{self, human_bytes, DeviceLimits, MemoryPlan};
use super::report::{Evaluation, StepReport};
use crate::eval::refusal::{heldout_sample, refusal_rates, RefusalRates, ReplyOptions};
use crate::gpu::{DType, Gpu};
use crate::model::{open_config, open_model, LoadOptions};
use crate::text::Tokenizer;
use crate::{Error, Result};

pub use super::train_config::{Task, TrainConfig};

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The objective trained.
    pub task: Task,
    /// The layers whose embeddings ES2 separated (none under SFT).
    #[serde(skip_serializing_if = "Vec::is_empty")]
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
    /// The run's charts (`curves.svg` in the output folder): losses per step and the held-out
    /// measurements per evaluation.
    pub curves: PathBuf,
    /// The most GPU memory the run's buffers took at once ([`Gpu::peak_bytes`]: weights,
    /// optimizer state and the largest step or evaluation), in bytes. The replies generated
    /// for [`Summary::refusals`] are not counted: generation is outside the plan.
    pub peak_bytes: u64,
    /// What the memory plan made before the run predicted for its peak, in bytes.
    pub planned_bytes: u64,
    /// Refusal rates on a fixed sample of held-out prompts before the first step and after the
    /// last (when `refusal_sample` is not 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusals: Option<RefusalChange>,
}

/// How the refusal rates moved over a run.
#[derive(Debug, Clone, Serialize)]
pub struct RefusalChange {
    /// Prompts per side: [`heldout_sample`] of the built-in held-out harmful and harmless
    /// sets.
    pub sample: usize,
    /// How the replies were generated (greedy) and judged (GCG's refusal list).
    pub replies: ReplyOptions,
    /// The rates of the model before the first step.
    pub before: RefusalRates,
    /// The rates of the trained model.
    pub after: RefusalRates,
}

/// Progress callbacks, so the library stays free of terminal output. Every method has a
/// default that does nothing.
pub trait TrainObserver {
    /// A line worth showing: the weights' memory, the data split, the base statistics,
    /// checkpoints and output paths.
    fn message(&mut self, _text: &str) {}
    /// Step `step` of `total` is done; `report` holds its loss and the objective's terms.
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
    /// The run's configuration.
    pub config: TrainConfig,
    /// The model in training and its reference (see [`ModelPair`]).
    pub models: ModelPair,
    /// The model's tokenizer (with its chat template).
    pub tokenizer: Tokenizer,
    /// The objective with its engine and data.
    pub job: Job,
    /// Steps completed.
    pub step: usize,
    /// The steps skipped for a non-finite loss or gradient.
    pub skipped: Vec<usize>,
    /// The run's memory plan, made before the model loaded.
    pub plan: MemoryPlan,
    /// The most GPU memory the run's buffers have taken so far ([`Gpu::peak_bytes`]).
    pub peak_bytes: u64,
    /// The last step's own peak, for its metrics line.
    step_peak: u64,
    evaluations: Vec<Evaluation>,
    refusals_before: Option<RefusalRates>,
    metrics: MetricsLog,
}

impl<'g> Trainer<'g> {
    /// Prepares a fresh run: loads the model (adding LoRA adapters, or a frozen copy for full
    /// fine-tuning) and the data, and (ES2) measures the base statistics.
    pub fn new(
        gpu: &'g Gpu,
        config: TrainConfig,
        observer: &mut dyn TrainObserver,
    ) -> Result<Self> {
        config.validate()?;
        check_out_dir(&config.out, config.overwrite)?;
        let (config, plan) = plan_memory(gpu, config, observer)?;
        let (models, tokenizer) = load_models(gpu, &config)?;
        observer.message(&weights_message(&models));
        let start = Start {
            gpu,
            config: &config,
            models: &models,
            tokenizer: &tokenizer,
            resumed: None,
        };
        let job = Job::start(&start, observer)?;
        // Only once the model and the data have loaded does the run touch `out`.
        checkpoint::recover(&config.out)?;
        if config.overwrite {
            checkpoint::remove_all(&config.out)?;
        }
        let metrics = MetricsLog::create(&config.out.join("metrics.jsonl"))?;
        Ok(Trainer {
            gpu,
            config,
            models,
            tokenizer,
            job,
            step: 0,
            skipped: Vec::new(),
            plan,
            peak_bytes: gpu.peak_bytes(),
            step_peak: 0,
            evaluations: Vec::new(),
            refusals_before: None,
            metrics,
        })
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
        let mut config = state.config.clone();
        checkpoint::recover(&config.out)?;
        if let Some(steps) = steps {
            config.steps = steps;
        }
        config.validate()?;
        let (config, plan) = plan_memory(gpu, config, observer)?;
        let (models, tokenizer) = load_models(gpu, &config)?;
        observer.message(&weights_message(&models));
        let start = Start {
            gpu,
            config: &config,
            models: &models,
            tokenizer: &tokenizer,
            resumed: Some(&state),
        };
        let mut job = Job::start(&start, observer)?;
        checkpoint::restore_tensors(gpu, &dir, &models.tuned, job.grads(), job.optimizer())?;
        job.optimizer_mut().step = state.step as u64;
        let metrics = MetricsLog::resume(&config.out.join("metrics.jsonl"), state.step)?;
        observer.message(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.step
        ));
        Ok(Trainer {
            gpu,
            config,
            models,
            tokenizer,
            job,
            step: state.step,
            skipped: state.skipped,
            plan,
            peak_bytes: gpu.peak_bytes(),
            step_peak: 0,
            evaluations: state.evaluations,
            refusals_before: state.refusals_before,
            metrics,
        })
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
        self.job.write_curves(&out.join("metrics.jsonl"), &curves)?;
        observer.message(&format!("curves: {}", curves.display()));
        let (Some(before), Some(after)) = (self.evaluations.first(), self.evaluations.last())
        else {
            return Err(Error::Numerical("no evaluation".into()));
        };
        let refusals = match self.refusals_before {
            Some(before) => Some(RefusalChange {
                sample: self.config.refusal_sample,
                replies: self.refusal_replies(),
                before,
                after: self.measure_refusals()?,
            }),
            None => None,
        };
        let summary = Summary {
            task: self.config.task,
            layers: self.job.layers().to_vec(),
            before: before.clone(),
            after: after.clone(),
            steps: self.step,
            seconds: started.elapsed().as_secs_f64(),
            out: self.config.out.clone(),
            curves,
            peak_bytes: self.peak_bytes,
            planned_bytes: self.plan.total,
            refusals,
        };
        crate::io::write_json(&self.config.out.join("summary.json"), &summary)?;
        Ok(summary)
    }

    /// One logged step: the held-out evaluation before the first step, the step, its metrics
    /// line, and the evaluation and checkpoint when they fall due.
    pub fn advance(&mut self, observer: &mut dyn TrainObserver) -> Result<StepReport> {
        if self.evaluations.is_empty() {
            self.record_evaluation(observer)?;
            if self.config.refusal_sample > 0 {
                self.refusals_before = Some(self.measure_refusals()?);
            }
        }
        let total = self.config.steps;
        let started = Instant::now();
        let report = self.train_step()?;
        let tokens_per_s = report.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let lr = self.config.optimizer.lr_at(self.step, total);
        match report.nonfinite_term() {
            Some((term, value)) => {
                self.metrics.skipped(self.step, term, value)?;
                observer.message(&format!(
                    "step {}: {term} is not finite ({value}); step skipped ({} of at most {})",
                    self.step,
                    self.skipped.len(),
                    self.config.skip_nonfinite
                ));
            }
            None => {
                let peak = self.step_peak;
                self.metrics
                    .step(self.step, &report, lr, tokens_per_s, peak)?
            }
        }
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
        self.start_measuring();
        let eval = self.evaluate()?;
        self.peak_bytes = self.peak_bytes.max(self.gpu.peak_bytes());
        observer.evaluation(&eval);
        self.metrics.evaluation(&eval)?;
        self.evaluations.push(eval);
        Ok(())
    }

    /// One step on the next batches (not logged; see [`Trainer::advance`]).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let lr = self
            .config
            .optimizer
            .lr_at(self.step + 1, self.config.steps);
        let seed = (self.config.seed as u32) ^ ((self.step as u32 + 1).wrapping_mul(0x85EB_CA6B));
        self.start_measuring();
        let report = self
            .job
            .step(self.gpu, &self.models, &self.config, lr, seed)?;
        self.step_peak = self.gpu.peak_bytes();
        self.peak_bytes = self.peak_bytes.max(self.step_peak);
        self.step += 1;
        if let Some((term, value)) = report.nonfinite_term() {
            self.skip_or_stop(&report, term, value)?;
        }
        Ok(report)
    }

    /// Releases the idle buffers of earlier steps and evaluations, whose shapes the next one
    /// may not share (the pool reuses a buffer only for a tensor of its size, and batches
    /// differ in length), and starts a new high-water mark.
    fn start_measuring(&self) {
        self.gpu.trim_pool();
        self.gpu.reset_peak_bytes();
    }

    /// Skips the step just taken, whose `term` is not finite, when the update was not applied
    /// and the run may skip another; otherwise an error naming the step and the term.
    fn skip_or_stop(&mut self, report: &StepReport, term: &str, value: f64) -> Result<()> {
        let may_skip = self.skipped.len() < self.config.skip_nonfinite;
        if may_skip && !report.update_applied() {
            self.job.optimizer_mut().unstep();
            self.skipped.push(self.step);
            return Ok(());
        }
        let last = checkpoint::resolve(&self.config.out)
            .ok()
            .map_or("no checkpoint was written yet".to_owned(), |dir| {
                format!("the last checkpoint, {}, is intact", dir.display())
            });
        let why = if may_skip {
            "its update was already applied, so it cannot be skipped"
        } else if self.config.skip_nonfinite > 0 {
            "the run already skipped as many steps as skip_nonfinite allows"
        } else {
            "skip_nonfinite is 0"
        };
        Err(Error::Numerical(format!(
            "step {}: {term} is not finite ({value}); {why}. {last}: lower the learning rate \
             (lr) or clip the gradient norm (clip), and resume from it",
            self.step
        )))
    }

    /// The held-out measurements of the objective at the current step.
    pub fn evaluate(&self) -> Result<Evaluation> {
        self.job
            .evaluate(self.gpu, &self.models, &self.config, self.step)
    }

    /// Refusal rates of the model as it is now, on [`heldout_sample`] of `refusal_sample`
    /// prompts per side: greedy replies judged by GCG's list.
    pub fn measure_refusals(&self) -> Result<RefusalRates> {
        let (harmful, harmless) = heldout_sample(self.config.refusal_sample)?;
        refusal_rates(
            self.gpu,
            &self.models.tuned,
            &self.tokenizer,
            &harmful,
            &harmless,
            self.refusal_replies(),
        )
    }

    fn refusal_replies(&self) -> ReplyOptions {
        ReplyOptions {
            chat: self.config.chat,
            ..ReplyOptions::default()
        }
    }

    /// Writes a checkpoint of the current step; returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = CheckpointState {
            step: self.step,
            config: self.config.clone(),
            base_stats: self.job.base_stats().cloned(),
            samplers: self.job.samplers(),
            skipped: self.skipped.clone(),
            evaluations: self.evaluations.clone(),
            refusals_before: self.refusals_before,
        };
        checkpoint::save(
            self.gpu,
            &self.config.out,
            &state,
            &self.models.tuned,
            (self.job.grads(), self.job.optimizer()),
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

/// The run's memory plan on `gpu`, from `config.json` alone, before any weight loads:
/// recomputation turned on when only that makes the run fit, an error when nothing does.
fn plan_memory(
    gpu: &Gpu,
    mut config: TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(TrainConfig, MemoryPlan)> {
    let model = open_config(&config.model)?;
    let device = DeviceLimits {
        memory: config.gpu_memory,
        ..DeviceLimits::of(gpu)
    };
    let (plan, message) = plan::fit(&model, &mut config, &device)?;
    observer.message(&message);
    Ok((config, plan))
}

/// The model (with fresh adapters, or, for full fine-tuning under ES2, with a frozen copy for
/// the KL's reference logits) and its tokenizer. The frozen weights are stored as
/// `config.weights_dtype` says.
fn load_models(gpu: &Gpu, config: &TrainConfig) -> Result<(ModelPair, Tokenizer)> {
    let options = LoadOptions {
        strict: config.strict,
        ..LoadOptions::default()
    };
    let frozen_options = LoadOptions {
        weights: config.weights_dtype,
        ..options.clone()
    };
    match &config.lora {
        Some(lora) => {
            let (mut model, tokenizer) = open_model(gpu, &config.model, &frozen_options)?;
            model.attach_lora(gpu, lora, config.seed)?;
            let models = ModelPair {
                tuned: model,
                frozen: None,
            };
            Ok((models, tokenizer))
        }
        None => {
            let (model, tokenizer) = open_model(gpu, &config.model, &options)?;
            // Supervised fine-tuning compares with no reference model.
            let frozen = match config.task {
                Task::Es2 => Some(open_model(gpu, &config.model, &frozen_options)?.0),
                Task::Sft => None,
            };
            let models = ModelPair {
                tuned: model,
                frozen,
            };
            Ok((models, tokenizer))
        }
    }
}

/// One line on the GPU memory the weights take.
fn weights_message(models: &ModelPair) -> String {
    let mut bytes = models.tuned.parameter_bytes();
    let mut what = "weights";
    if let Some(frozen) = &models.frozen {
        bytes += frozen.parameter_bytes();
        what = "weights (trained and frozen copies)";
    }
    if models.frozen.is_none() && !models.tuned.has_lora() {
        return format!(
            "{what}: {} on the GPU, every one trained, in f32",
            human_bytes(bytes)
        );
    }
    let narrow = models.base_model().weights_in_16_bits();
    format!(
        "{what}: {} on the GPU, the frozen base's matrices in {}",
        human_bytes(bytes),
        narrow.first().map_or(DType::F32, |(_, dtype)| *dtype)
    )
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
