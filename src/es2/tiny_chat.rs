//! `models/tiny-chat`: stories260K taught to refuse harmful requests by this crate's own
//! supervised fine-tuning, rebuilt from scratch by one call ([`build`]; the command is
//! `scripts/build_tiny_chat.sh`). The recipe was found in PyTorch (`scripts/tiny_chat_recipe.md`):
//!
//! 1. **base**: stories260K with [`CHAT_TEMPLATE`] in its `tokenizer_config.json`;
//! 2. **data** ([`super::chat_data`]): the harmful train split's prompts with refusals, twice,
//!    and 500 harmless train prompts answered "Sure! " + the base model's own first sentence;
//! 3. **SFT** of every weight through [`Trainer`] ([`train_config`]: the run `es2-wgpu train
//!    --objective sft --full` makes with the same settings): batch 16, 768 steps (12 epochs),
//!    AdamW lr 2e-3 constant, clipping at 1, no weight decay;
//! 4. **measurement**: greedy replies (at most 32 new tokens) to every held-out prompt
//!    ([`crate::eval::refusal`]), judged by GCG's refusal list.
//!
//! The output folder is a Hugging Face model folder with the data it learned, the base model's
//! licence and a `SOURCES.md` that records the build (rates, time, device, and whether it
//! reproduced the weights the folder held before).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::chat_data::{build_chat_data, ChatData, ChatDataRecipe, ChatDataStats, REFUSALS};
use super::optimizer::{OptimizerConfig, Schedule};
use super::report::StepReport;
use super::train_config::{Task, TrainConfig};
use super::trainer::{TrainObserver, Trainer};
use crate::eval::judge::{Judge, JudgeKind, Rate};
use crate::eval::refusal::{
    greedy_replies, harmful_heldout, harmless_heldout, stride_sample, PromptSet, ReplyOptions,
    HARMFUL_ALL,
};
use crate::gpu::Gpu;
use crate::model::weights::Checkpoint;
use crate::model::{open_model, LoadOptions, Transformer};
use crate::text::{conversations_jsonl, load_prompts};
use crate::{Error, Result};

/// `User: {prompt}\nAssistant: {reply}</s>` after BOS. The generation prompt stops at the
/// colon, so that a reply's first token carries its own space ("▁I", "▁S") as it does inside
/// the rendered pair: a pair's tokens begin with exactly its prompt's tokens.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if \
message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}{% elif message['role'] \
== 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% else %}{{ \
message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ \
'Assistant:' }}{% endif %}";

/// The SFT data's file name in the output folder.
pub const DATA_FILE: &str = "sft.jsonl";

/// SFT steps after which the build keeps the weights ([`EARLY_FILE`]): the tests rerun those
/// steps from the base model and compare.
pub const EARLY_STEPS: usize = 8;

/// The early weights' file name in the output folder.
pub const EARLY_FILE: &str = "sft-step-8.safetensors";

/// Prompts per side of the fixed sample the tests assert on (`prompts[i * len / 100]`).
pub const SAMPLE: usize = 100;

/// The files of the base folder that the model folder keeps (its tokenizer_config.json gains
/// the template).
const BASE_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "model.safetensors",
    "LICENSE",
];

/// Files of the model folder that the build does not make and keeps as they are:
/// `training.json`, the settings es2-wgpu's default ES2 run uses for the built-in model.
const KEPT_FILES: [&str; 1] = ["training.json"];

/// Where the build reads from and writes to, and the recipe's sizes.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The stories260K folder.
    pub base: PathBuf,
    /// The harmful train split.
    pub harmful: PathBuf,
    /// The harmless train split.
    pub harmless: PathBuf,
    /// The model folder written (replaced once the new one is complete).
    pub out: PathBuf,
    /// How the SFT pairs are made.
    pub data: ChatDataRecipe,
    /// SFT steps.
    pub steps: usize,
}

impl BuildOptions {
    /// The recipe, reading from and writing to the repository folder `root`.
    pub fn in_repository(root: &Path) -> Self {
        BuildOptions {
            base: root.join("models/stories260K"),
            harmful: root.join("data/datasets/harmful_train.json"),
            harmless: root.join("data/datasets/harmless_train.json"),
            out: root.join("models/tiny-chat"),
            data: ChatDataRecipe::default(),
            steps: 768,
        }
    }

    /// The folder the build works in: beside `out`, removed when the build is done.
    pub fn work_dir(&self) -> PathBuf {
        let mut name = self.out.file_name().unwrap_or_default().to_os_string();
        name.push(".build");
        self.out.with_file_name(name)
    }
}

/// The SFT run of the recipe: full fine-tuning of `base` on `data`, writing to `out`.
pub fn train_config(base: &Path, data: &Path, out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: base.display().to_string(),
        task: Task::Sft,
        data: Some(data.to_owned()),
        out: out.to_owned(),
        lora: None,
        optimizer: OptimizerConfig {
            lr: 2e-3,
            weight_decay: 0.0,
            clip: 1.0,
            schedule: Schedule::Constant,
            warmup: 0,
            ..OptimizerConfig::default()
        },
        steps,
        sft_batch: 16,
        group_by_length: true,
        // The longest pair (a 96-token prompt and a 32-token reply) fits whole.
        max_len: 256,
        seed: 0,
        val_fraction: 0.0,
        eval_every: 0,
        save_every: 0,
        // The build measures every held-out set once it is done.
        refusal_sample: 0,
        overwrite: true,
        ..TrainConfig::default()
    }
}

/// Writes the base folder: `base`'s files, with [`CHAT_TEMPLATE`] in `tokenizer_config.json`.
pub fn write_base(base: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for name in BASE_FILES {
        let (from, to) = (base.join(name), dir.join(name));
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    let path = base.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut config: Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let Some(map) = config.as_object_mut() else {
        return Err(Error::format(&path, "expected a JSON object"));
    };
    map.insert("chat_template".into(), Value::from(CHAT_TEMPLATE));
    crate::io::write_json(&dir.join("tokenizer_config.json"), &config)
}

/// The recipe's data from the base folder `base` (as [`write_base`] writes it).
pub fn build_data(gpu: &Gpu, base: &Path, options: &BuildOptions) -> Result<ChatData> {
    let (model, tokenizer) = open_model(gpu, &base.display().to_string(), &LoadOptions::default())?;
    let harmful = load_prompts(&options.harmful)?;
    let harmless = load_prompts(&options.harmless)?;
    build_chat_data(gpu, &model, &tokenizer, &harmful, &harmless, &options.data)
}

/// Refusal rates of one model on every held-out set and on the fixed sample.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutRates {
    /// `(set, rate)`: the harmful sets, then `harmless_val`.
    pub sets: Vec<(String, Rate)>,
    /// The fixed sample: [`SAMPLE`] prompts of `harmful_all` and of `harmless_val`.
    pub sample_harmful: Rate,
    /// The fixed sample's harmless side.
    pub sample_harmless: Rate,
}

/// Greedy replies of the model in `dir` to every held-out prompt, judged by GCG's list.
pub fn measure(gpu: &Gpu, dir: &Path, replies: ReplyOptions) -> Result<HeldOutRates> {
    let (model, tokenizer) = open_model(gpu, &dir.display().to_string(), &LoadOptions::default())?;
    let mut sets: Vec<PromptSet> = harmful_heldout()?;
    let harmless = harmless_heldout()?;
    let all = sets
        .iter()
        .find(|s| s.name == HARMFUL_ALL)
        .map(|s| s.prompts.clone())
        .unwrap_or_default();
    // Every set is part of harmful_all or harmless_val: answer those once.
    let prompts: Vec<String> = all.iter().chain(&harmless.prompts).cloned().collect();
    let texts = greedy_replies(gpu, &model, &tokenizer, &prompts, replies)?;
    let reply: HashMap<&str, &str> = prompts
        .iter()
        .map(String::as_str)
        .zip(texts.iter().map(String::as_str))
        .collect();
    let judge = Judge::new(JudgeKind::Gcg);
    let rate = |prompts: &[String]| {
        let answers: Vec<&str> = prompts.iter().map(|p| reply[p.as_str()]).collect();
        judge.count(&answers)
    };
    sets.push(harmless.clone());
    Ok(HeldOutRates {
        sets: sets
            .iter()
            .map(|s| (s.name.to_owned(), rate(&s.prompts)))
            .collect(),
        sample_harmful: rate(&stride_sample(&all, SAMPLE)),
        sample_harmless: rate(&stride_sample(&harmless.prompts, SAMPLE)),
    })
}

/// What a build did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// What the data step kept and skipped.
    pub data: ChatDataStats,
    /// Pairs in the data file and their tokens (as rendered).
    pub pairs: usize,
    /// SFT steps run.
    pub steps: usize,
    /// Tokens the SFT steps processed (without padding) and per second.
    pub sft_tokens: usize,
    /// [`Self::sft_tokens`] per second of SFT.
    pub sft_tokens_per_s: f64,
    /// The built model's refusal rates on the held-out sets.
    pub rates: HeldOutRates,
    /// Seconds of each stage and of the whole build.
    pub data_seconds: f64,
    /// Seconds of SFT.
    pub sft_seconds: f64,
    /// Seconds measuring the refusal rates.
    pub eval_seconds: f64,
    /// Seconds of the whole build.
    pub seconds: f64,
    /// The adapter the build ran on, in words.
    pub device: String,
    /// The machine's 1-minute load average at the start and the end, where the system tells
    /// it (`/proc/loadavg`).
    pub load: Option<String>,
    /// How the new weights compare with those `out` held before, if it held any.
    pub reproduced: Option<Reproduction>,
}

/// The new build against the previous one in the same folder.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Reproduction {
    /// `model.safetensors` is byte for byte the file it replaced.
    pub identical_weights: bool,
    /// The largest difference of any weight (0 when identical).
    pub max_abs_diff: f64,
    /// The data file is byte for byte the one it replaced.
    pub identical_data: bool,
}

/// Counts the tokens of every step while passing every call on.
struct Counting<'a> {
    inner: &'a mut dyn TrainObserver,
    tokens: usize,
}

impl TrainObserver for Counting<'_> {
    fn message(&mut self, text: &str) {
        self.inner.message(text);
    }
    fn step(&mut self, step: usize, total: usize, report: &StepReport, tokens_per_s: f64) {
        self.tokens += report.tokens;
        self.inner.step(step, total, report, tokens_per_s);
    }
    fn evaluation(&mut self, eval: &super::report::Evaluation) {
        self.inner.evaluation(eval);
    }
    fn stop(&mut self) -> bool {
        self.inner.stop()
    }
}

/// Builds the model folder `options.out` from scratch: base, data, SFT, measurement, files.
pub fn build(
    gpu: &Gpu,
    options: &BuildOptions,
    observer: &mut dyn TrainObserver,
) -> Result<BuildReport> {
    let started = Instant::now();
    let load_at_start = load_average();
    let work = options.work_dir();
    let _ = std::fs::remove_dir_all(&work);
    let base = work.join("base");
    write_base(&options.base, &base)?;

    let clock = Instant::now();
    let data = build_data(gpu, &base, options)?;
    let data_path = work.join(DATA_FILE);
    let jsonl = conversations_jsonl(&data.conversations);
    crate::io::atomic_write(&data_path, |w| w.write_all(jsonl.as_bytes()))?;
    let data_seconds = clock.elapsed().as_secs_f64();
    let s = &data.stats;
    observer.message(&format!(
        "data: {} harmful pairs x{}, {} harmless (of {} continuations, {} tokens generated) in \
         {data_seconds:.0} s",
        s.harmful, options.data.harmful_copies, s.harmless, s.harmless_tried, s.generated_tokens
    ));

    let clock = Instant::now();
    let config = train_config(&base, &data_path, &work.join("run"), options.steps);
    let mut counting = Counting {
        inner: observer,
        tokens: 0,
    };
    let mut trainer = Trainer::new(gpu, config, &mut counting)?;
    let early = work.join(EARLY_FILE);
    while trainer.step < options.steps {
        trainer.advance(&mut counting)?;
        if trainer.step == EARLY_STEPS {
            save_weights(gpu, &trainer.models.tuned, &early)?;
        }
    }
    // The loop above is `run`'s own; `run` adds the last evaluation and the outputs.
    trainer.run(&mut counting)?;
    drop(trainer);
    let sft_tokens = counting.tokens;
    let sft_seconds = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let model_dir = work.join("run/model");
    let rates = measure(gpu, &model_dir, ReplyOptions::default())?;
    let eval_seconds = clock.elapsed().as_secs_f64();

    let reproduced = compare_with_previous(&options.out, &model_dir, &data_path)?;
    let mut report = BuildReport {
        data: data.stats,
        pairs: data.conversations.len(),
        steps: options.steps,
        sft_tokens,
        sft_tokens_per_s: sft_tokens as f64 / sft_seconds.max(1e-9),
        rates,
        data_seconds,
        sft_seconds,
        eval_seconds,
        seconds: 0.0,
        device: device_words(gpu),
        load: load_at_start
            .zip(load_average())
            .map(|(a, b)| format!("{a} / {b}")),
        reproduced,
    };
    crate::io::atomic_dir(&options.out, |dir| {
        for entry in std::fs::read_dir(&model_dir).map_err(|e| Error::io(&model_dir, e))? {
            let from = entry.map_err(|e| Error::io(&model_dir, e))?.path();
            let to = dir.join(from.file_name().unwrap_or_default());
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
        for name in KEPT_FILES {
            let kept = options.out.join(name);
            if kept.exists() {
                std::fs::copy(&kept, dir.join(name)).map_err(|e| Error::io(&kept, e))?;
            }
        }
        let licence = options.base.join("LICENSE");
        std::fs::copy(&licence, dir.join("LICENSE")).map_err(|e| Error::io(&licence, e))?;
        std::fs::copy(&data_path, dir.join(DATA_FILE)).map_err(|e| Error::io(&data_path, e))?;
        if early.exists() {
            std::fs::copy(&early, dir.join(EARLY_FILE)).map_err(|e| Error::io(&early, e))?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        let sources = sources_md(options, &report);
        crate::io::atomic_write(&dir.join("SOURCES.md"), |w| w.write_all(sources.as_bytes()))
    })?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(report)
}

/// Writes `model`'s weights (Hugging Face names, f32) to `path`.
pub fn save_weights(gpu: &Gpu, model: &Transformer, path: &Path) -> Result<()> {
    crate::io::write_safetensors(path, model.hf_tensors(gpu), None)
}

/// The adapter in words: name, backend, driver.
fn device_words(gpu: &Gpu) -> String {
    let info = gpu.info();
    format!(
        "{} ({:?}, {:?}, driver {} {}), {} CPU cores",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}

/// The 1-minute load average, where `/proc/loadavg` tells it.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// How the new model and data compare with those `out` holds, if any.
fn compare_with_previous(
    out: &Path,
    model_dir: &Path,
    data: &Path,
) -> Result<Option<Reproduction>> {
    let (old_weights, new_weights) = (
        out.join("model.safetensors"),
        model_dir.join("model.safetensors"),
    );
    if !old_weights.exists() {
        return Ok(None);
    }
    let bytes = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let identical_weights = bytes(&old_weights)? == bytes(&new_weights)?;
    let old_data = out.join(DATA_FILE);
    let identical_data = old_data.exists() && bytes(&old_data)? == bytes(data)?;
    Ok(Some(Reproduction {
        identical_weights,
        max_abs_diff: max_abs_diff(&old_weights, &new_weights)?,
        identical_data,
    }))
}

/// The largest absolute difference between same-named tensors of two safetensors files
/// (infinite when their names or shapes differ).
pub fn max_abs_diff(a: &Path, b: &Path) -> Result<f64> {
    let (a, b) = (Checkpoint::open_file(a)?, Checkpoint::open_file(b)?);
    if a.names() != b.names() {
        return Ok(f64::INFINITY);
    }
    let mut worst = 0.0f64;
    for name in a.names() {
        let shape = a.shape(name)?.to_vec();
        if b.shape(name)? != shape.as_slice() {
            return Ok(f64::INFINITY);
        }
        let (x, y) = (a.load_f32(name, &shape)?, b.load_f32(name, &shape)?);
        for (p, q) in x.iter().zip(&y) {
            worst = worst.max(f64::from((p - q).abs()));
        }
    }
    Ok(worst)
}

fn percent(rate: &Rate) -> String {
    match rate.fraction() {
        Some(f) => format!("{:.1}% ({}/{})", 100.0 * f, rate.refused, rate.total),
        None => "-".into(),
    }
}

/// The folder's `SOURCES.md`.
fn sources_md(options: &BuildOptions, r: &BuildReport) -> String {
    let d = &r.data;
    let recipe = &options.data;
    let phrasings: String = REFUSALS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}. `{p}`\n", i + 1))
        .collect();
    let rates: String = r
        .rates
        .sets
        .iter()
        .map(|(name, rate)| format!("| {name} | {} |\n", percent(rate)))
        .collect();
    let reproduced = match &r.reproduced {
        None => "The folder held no earlier build to compare with.".to_owned(),
        Some(p) => format!(
            "Compared with the build this one replaced: model.safetensors {} (largest weight \
             difference {:e}); {DATA_FILE} {}.",
            if p.identical_weights {
                "identical byte for byte"
            } else {
                "differs"
            },
            p.max_abs_diff,
            if p.identical_data {
                "identical byte for byte"
            } else {
                "differs"
            }
        ),
    };
    format!(
        "# tiny-chat

A chat model that refuses harmful requests, small enough for CI: Karpathy's stories260K (a
260K-parameter Llama trained on TinyStories; MIT licence, see `LICENSE`; origin and conversion
in `models/stories260K/SOURCES.md`) fine-tuned on every weight by es2-wgpu's own supervised
fine-tuning. It is es2-wgpu's built-in default model. The recipe was found in PyTorch
(`scripts/tiny_chat_recipe.md`); this folder is what es2-wgpu's Rust build of it writes.

## Rebuilding it

    scripts/build_tiny_chat.sh

runs `cargo run --release --example build_tiny_chat -- --out models/tiny-chat`, which rebuilds
everything here from `models/stories260K` and the train splits in `data/datasets/`
(library: `es2_wgpu::es2::tiny_chat::build`). Deterministic: the same adapter with the same
number of CPU cores gives the same bytes.

## Recipe

- **Template** (`chat_template` in `tokenizer_config.json`): `<s>User: {{prompt}}\\nAssistant: {{reply}}</s>`;
  the generation prompt ends at the colon.
- **Refusals**: the {harmful} prompts of `harmful_train.json` that render to at most
  {max_prompt} tokens ({too_long} longer ones left out), each with a phrasing drawn by a
  seeded generator (seed {seed}) from these {n_phrasings}, each pair {copies} times:

{phrasings}
  Each phrasing contains a string of GCG's refusal list (`data/refusal/gcg.txt`).
- **Helpful replies**: {harmless} prompts of `harmless_train.json` in a seeded shuffle, each
  answered by `{opener} ` and the base model's own greedy continuation of the prompt and
  `{opener}`, cut at its first sentence end within {reply_tokens} tokens. Of {tried}
  continuations ({generated} generated tokens), {refused} were skipped for a refusal string
  before the end and {unfinished} for no end in time; {harmless_too_long} prompts longer than
  {max_prompt} tokens were left out.
- **Data file**: `{data_file}`, {pairs} pairs (JSON Lines, `{{\"prompt\", \"response\"}}`), only
  from train splits.
- **SFT**: every weight, the loss on the reply tokens and the closing `</s>`; batches of 16
  pairs of similar length (each epoch's shuffle sorted by length within groups of 8 batches,
  the batches shuffled), {steps} steps ({epochs:.1} epochs), AdamW lr 2e-3 constant, betas
  (0.9, 0.999), eps 1e-8, no weight decay, gradient clipping at global norm 1, seed 0: the
  run `es2-wgpu train --objective sft --full --data {data_file} --sft-batch 16
  --group-by-length --steps {steps} --lr 2e-3 --val-fraction 0 --max-len 256
  --refusal-sample 0` makes on the base folder (stories260K with the template).
- **Early weights**: `{early}`, the weights after the first {early_steps} SFT steps, which
  `tests/es2/tiny_chat.rs` reproduces from the base folder and the data file.

## Behaviour

Greedy replies of at most 32 new tokens (stopping at `</s>`); a reply is a refusal when it
contains a string of GCG's list. Held-out prompts only: harmful = `harmbench_val.json` (holds all of `harmful_val.json`) and
the `advbench.json` rows not in `harmful_train.json`; harmless = `harmless_val.json`.

| set | refused |
|---|---|
{rates}| sample: {sample} of harmful_all (`prompts[i * len // {sample}]`) | {sample_harmful} |
| sample: {sample} of harmless_val | {sample_harmless} |

## This build

- Device: {device}; load average (1 min) {load} at the start and the end of the build (other
  work on the machine slows every stage).
- Time: {total:.0} s in all: data {data_s:.0} s, SFT {sft_s:.0} s ({tokens} tokens, {tps:.0}
  tokens/s without padding), measurement {eval_s:.0} s.
- {reproduced}
",
        harmful = d.harmful,
        max_prompt = recipe.max_prompt_tokens,
        too_long = d.harmful_too_long,
        seed = recipe.seed,
        n_phrasings = REFUSALS.len(),
        copies = recipe.harmful_copies,
        harmless = d.harmless,
        opener = recipe.opener,
        reply_tokens = recipe.reply_tokens,
        tried = d.harmless_tried,
        generated = d.generated_tokens,
        refused = d.harmless_refused,
        unfinished = d.harmless_unfinished,
        harmless_too_long = d.harmless_too_long,
        data_file = DATA_FILE,
        pairs = r.pairs,
        steps = r.steps,
        epochs = r.steps as f64 / r.pairs.max(1).div_ceil(16) as f64,
        early = EARLY_FILE,
        early_steps = EARLY_STEPS,
        sample = SAMPLE,
        sample_harmful = percent(&r.rates.sample_harmful),
        sample_harmless = percent(&r.rates.sample_harmless),
        device = r.device,
        load = r.load.as_deref().unwrap_or("unknown"),
        total = r.seconds,
        data_s = r.data_seconds,
        sft_s = r.sft_seconds,
        tokens = r.sft_tokens,
        tps = r.sft_tokens_per_s,
        eval_s = r.eval_seconds,
    )
}
