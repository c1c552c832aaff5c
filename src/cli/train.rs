//! `es2-wgpu train`: flags → `TrainConfig`, a progress bar, and the closing summary table.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use es2_wgpu::es2::objective::{format_layers, parse_layers};
use es2_wgpu::es2::plan::{self, DeviceLimits, MemoryPlan};
use es2_wgpu::es2::{
    Es2Config, Evaluation, HeldOut, OptimizerConfig, Schedule, StepReport, Summary, Task, Terms,
    TrainConfig, TrainObserver, Trainer,
};
use es2_wgpu::eval::judge::Rate;
use es2_wgpu::model::embedded::{self, TrainingPreset};
use es2_wgpu::model::{open_config, LoraConfig, Projection};
use es2_wgpu::ops::kl::KlDirection;
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::ops::separation::{Distance, LossShape, Pair};
use es2_wgpu::{Error, Gpu, GpuOptions, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// `es2-wgpu train --help`'s closing example.
pub const EXAMPLE: &str = "Examples:
  es2-wgpu train
  es2-wgpu train --model models/stories260K --harmful data/datasets/harmful_train.json \\
      --harmless data/datasets/harmless_train.json --out stories-es2 --steps 100
  es2-wgpu train --objective sft --data chats.jsonl --model models/stories260K --full \\
      --lr 1e-3 --out stories-sft";

/// The help headings of the flags only one objective reads.
const ES2_HEADING: &str = "ES2 options (--objective es2)";
const SFT_HEADING: &str = "Supervised fine-tuning options (--objective sft)";

/// `train`'s flags. Every default is read from the library's `Default`s; `given` records which
/// flags the user set, so that an embedded model's preset fills the others.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A Hugging Face model folder, or the name of a model built into es2-wgpu.
    #[arg(long, default_value_t = TrainConfig::default().model)]
    model: String,
    /// What to train for: es2 (separate harmful from harmless embeddings) or sft (learn the
    /// assistant replies of --data).
    #[arg(long = "objective", value_enum, default_value_t = TrainConfig::default().task)]
    task: Task,
    /// ES2's harmful prompts: JSON array, JSONL or CSV with an
    /// instruction/prompt/goal/behavior/text field (default: the built-in set).
    #[arg(long, help_heading = ES2_HEADING)]
    harmful: Option<PathBuf>,
    /// ES2's harmless prompts, same formats (default: the built-in set).
    #[arg(long, help_heading = ES2_HEADING)]
    harmless: Option<PathBuf>,
    /// SFT's conversations: JSON array or JSONL of {"prompt", "response"} or {"messages":
    /// [{"role", "content"}, ...]} rows, or CSV with prompt and response columns. The loss
    /// covers the assistant turns only.
    #[arg(long, help_heading = SFT_HEADING, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Output folder: adapter, metrics.jsonl, curves.svg, checkpoints, summary.json.
    #[arg(long, default_value_os_t = TrainConfig::default().out)]
    out: PathBuf,
    /// Continue the run saved in this checkpoint (or output) folder; other options come from
    /// the checkpoint, except --steps.
    #[arg(long)]
    resume: Option<PathBuf>,

    /// Layers whose embeddings are separated: "all", or a list such as "2,4,6" or "8-12".
    #[arg(long, help_heading = ES2_HEADING, default_value_t = Layers(Es2Config::default().layers))]
    layers: Layers,
    /// Where a prompt's embedding is read: its last token, or the mean over its tokens.
    #[arg(long, help_heading = ES2_HEADING, value_enum, default_value_t = Es2Config::default().pool)]
    pool: Pool,
    /// How the two groups are compared: distance of the means, mean over all pairs, or each
    /// harmful embedding against the base model's harmless centroid.
    #[arg(long, help_heading = ES2_HEADING, value_enum, default_value_t = Es2Config::default().pair)]
    pair: Pair,
    /// Distance: Euclidean (l2), squared Euclidean, or 1 − cosine similarity.
    #[arg(long, help_heading = ES2_HEADING, value_enum, default_value_t = Es2Config::default().distance)]
    distance: Distance,
    /// hinge: max(0, margin − D) (bounded); neg: −D (unbounded).
    #[arg(long, help_heading = ES2_HEADING, value_enum, default_value_t = Es2Config::default().shape)]
    shape: LossShape,
    /// Hinge margin relative to the base model's distance at each layer.
    #[arg(long, help_heading = ES2_HEADING, default_value_t = Es2Config::default().margin)]
    margin: f32,
    /// Absolute hinge margin (overrides --margin).
    #[arg(long, help_heading = ES2_HEADING)]
    margin_abs: Option<f32>,
    /// Stop the separation gradient on the harmless embeddings.
    #[arg(long, help_heading = ES2_HEADING)]
    harmful_only: bool,
    /// Weight λ of the KL term.
    #[arg(long, help_heading = ES2_HEADING, default_value_t = Es2Config::default().lambda)]
    lambda: f32,
    /// Softmax temperature of the KL term.
    #[arg(long, help_heading = ES2_HEADING, default_value_t = Es2Config::default().temperature)]
    temperature: f32,
    /// KL(base ‖ tuned) (forward) or KL(tuned ‖ base) (reverse).
    #[arg(long, help_heading = ES2_HEADING, value_enum, default_value_t = Es2Config::default().kl_dir)]
    kl_dir: KlDirection,

    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// LoRA rank r.
    #[arg(long, default_value_t = LoraConfig::default().rank)]
    lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    lora_alpha: f32,
    /// Dropout on the adapters' input during training.
    #[arg(long, default_value_t = LoraConfig::default().dropout)]
    lora_dropout: f32,
    /// Projections that get adapters: some of q, k, v, o, gate, up, down.
    #[arg(long, default_value_t = Targets(LoraConfig::default().targets))]
    lora_targets: Targets,
    /// Also write a merged Hugging Face model folder (out/merged).
    #[arg(long)]
    merge: bool,
    /// The frozen weights' storage: the model of a LoRA run; the frozen reference copy of an
    /// es2 run under --full (an sft run under --full has none).
    #[command(flatten)]
    weights: super::WeightsArgs,
    /// Refuse model weights that hold NaN or infinity (by default they load with a warning).
    #[arg(long)]
    strict: bool,
    /// Keep only each block's input for the backward and run the block again there: the same
    /// gradients for a fraction of the activation memory, at about a third more compute. On
    /// by itself when the memory plan fits only with it.
    #[arg(long)]
    recompute: bool,
    /// The GPU memory the run may use (e.g. 24GB; GB and GiB both mean 2^30 bytes, as GPU
    /// makers count): the memory plan is checked against it before anything loads. wgpu
    /// cannot tell a GPU's memory, so without it only the adapter's buffer limits are checked.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    gpu_memory: Option<u64>,
    /// Print the run's memory plan (needs only the model's config.json: no weights, no
    /// tokenizer) and exit; with --json, as JSON.
    #[arg(long, conflicts_with = "resume")]
    dry_run: bool,
    /// With --dry-run: plan for a discrete GPU with --gpu-memory of memory (bindings up to
    /// 4 GiB, as desktop Vulkan drivers allow) instead of this machine's adapter, to plan for
    /// a GPU one does not have.
    #[arg(long, requires_all = ["dry_run", "gpu_memory"])]
    discrete_gpu: bool,

    #[arg(long, default_value_t = OptimizerConfig::default().lr, help = with_preset(
        "AdamW learning rate", |p| p.lr.map(|v| v.to_string())))]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = OptimizerConfig::default().weight_decay)]
    weight_decay: f64,
    /// Learning-rate schedule after the warmup: constant, or cosine decay to 0.
    #[arg(long, value_enum, default_value_t = OptimizerConfig::default().schedule)]
    schedule: Schedule,
    /// Linear warmup steps.
    #[arg(long, default_value_t = OptimizerConfig::default().warmup)]
    warmup: usize,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = OptimizerConfig::default().clip)]
    clip: f64,
    /// Seed of the adapters' initialisation, the data order and dropout.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Skip up to N steps whose loss or gradient is NaN or infinite (each is logged and
    /// changes nothing on the model) instead of stopping at the first.
    #[arg(long, value_name = "N", default_value_t = TrainConfig::default().skip_nonfinite)]
    skip_nonfinite: usize,
    #[arg(long, default_value_t = TrainConfig::default().steps, help = with_preset(
        "Training steps; with --resume, the new total", |p| p.steps.map(|v| v.to_string())))]
    steps: usize,
    #[arg(long, help_heading = ES2_HEADING, default_value_t = TrainConfig::default().harmful_batch, help = with_preset(
        "Harmful prompts per step", |p| p.harmful_batch.map(|v| v.to_string())))]
    harmful_batch: usize,
    #[arg(long, help_heading = ES2_HEADING, default_value_t = TrainConfig::default().harmless_batch, help = with_preset(
        "Harmless prompts per step", |p| p.harmless_batch.map(|v| v.to_string())))]
    harmless_batch: usize,
    /// Conversations per SFT step.
    #[arg(long, help_heading = SFT_HEADING, default_value_t = TrainConfig::default().sft_batch)]
    sft_batch: usize,
    /// SFT: batches of conversations of similar length (less padding, faster steps).
    #[arg(long)]
    group_by_length: bool,
    #[arg(long, default_value_t = TrainConfig::default().max_len, help = with_preset(
        "Prompts longer than this many tokens keep their last tokens; longer conversations \
         keep the whole replies that fit",
        |p| p.max_len.map(|v| v.to_string())))]
    max_len: usize,
    /// Fraction of each prompt set (or of the conversations) held out for evaluation.
    #[arg(long, default_value_t = TrainConfig::default().val_fraction)]
    val_fraction: f32,
    #[arg(long, default_value_t = TrainConfig::default().eval_every, help = with_preset(
        "Held-out evaluation every N steps, and at the start and end",
        |p| p.eval_every.map(|v| v.to_string())))]
    eval_every: usize,
    /// Checkpoint every N steps (0: none).
    #[arg(long, default_value_t = TrainConfig::default().save_every)]
    save_every: usize,
    #[arg(long, default_value_t = TrainConfig::default().refusal_sample, help = with_preset(
        "Held-out prompts per side whose greedy replies measure the refusal rates before and \
         after the run (a fixed sample of the built-in held-out sets; 0: none)",
        |p| p.refusal_sample.map(|v| v.to_string())))]
    refusal_sample: usize,
    /// Feed prompts and conversations as plain text even when the model has a chat template.
    #[arg(long)]
    no_chat: bool,
    /// Replace the results of an earlier run in --out.
    #[arg(long)]
    overwrite: bool,
    /// Time every kernel with timestamp queries and print where the GPU time went (slows
    /// the run: each dispatch gets a pass of its own).
    #[arg(long)]
    profile: bool,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,

    /// The flags given on the command line or through the environment (clap's argument ids).
    #[arg(skip)]
    pub given: BTreeSet<String>,
}

/// A layer list, shown and read as `parse_layers` reads it ("all" for every layer).
#[derive(Debug, Clone)]
struct Layers(Vec<usize>);

impl std::fmt::Display for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_layers(&self.0))
    }
}

impl std::str::FromStr for Layers {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        parse_layers(text).map(Layers).map_err(|e| match e {
            Error::Config { message, .. } => message,
            other => other.to_string(),
        })
    }
}

/// Projection names, shown and read as a comma list ("q,v" or "q_proj,v_proj").
#[derive(Debug, Clone)]
struct Targets(Vec<Projection>);

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|p| p.short()).collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for Targets {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let names = text.split(',').map(str::trim).filter(|t| !t.is_empty());
        names
            .map(|t| Projection::parse(t).map_err(|e| e.to_string()))
            .collect::<std::result::Result<_, _>>()
            .map(Targets)
    }
}

/// A size in bytes as people write it: a number with an optional unit (B, KB, MB, GB, TB, or
/// KiB, MiB, GiB, TiB: both kinds in powers of 1024, as GPU memory is counted).
fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size such as 24GB or 16GiB"))?;
    let power = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        other => return Err(format!("unknown unit '{other}' (B, KB, MB, GB or TB)")),
    };
    let bytes = number * 1024f64.powi(power);
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("'{text}' is not a positive size"));
    }
    Ok(bytes as u64)
}

/// `text` with the default model's own value of a setting its preset overrides.
fn with_preset(text: &str, value: impl Fn(&TrainingPreset) -> Option<String>) -> String {
    let preset = embedded::find(embedded::DEFAULT).and_then(|m| m.training_preset().ok());
    match preset.as_ref().and_then(value) {
        Some(v) => format!("{text} [the built-in {}: {v}]", embedded::DEFAULT),
        None => text.to_owned(),
    }
}

impl TrainArgs {
    /// The run's configuration: the library's defaults for the model (an embedded model's
    /// preset included), overridden by the flags. Flags a preset can set count only when given.
    fn config(&self) -> Result<TrainConfig> {
        self.check_objective_flags()?;
        let mut config = TrainConfig::for_model(&self.model)?;
        let given = |id: &str| self.given.contains(id);
        if given("lr") {
            config.optimizer.lr = self.lr;
        }
        if given("steps") {
            config.steps = self.steps;
        }
        if given("harmful_batch") {
            config.harmful_batch = self.harmful_batch;
        }
        if given("harmless_batch") {
            config.harmless_batch = self.harmless_batch;
        }
        if given("max_len") {
            config.max_len = self.max_len;
        }
        if given("eval_every") {
            config.eval_every = self.eval_every;
        }
        if given("refusal_sample") {
            config.refusal_sample = self.refusal_sample;
        }
        config.task = self.task;
        config.harmful.clone_from(&self.harmful);
        config.harmless.clone_from(&self.harmless);
        config.data.clone_from(&self.data);
        config.sft_batch = self.sft_batch;
        config.group_by_length = self.group_by_length;
        config.out.clone_from(&self.out);
        config.lora = (!self.full).then(|| LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.0.clone(),
        });
        let optimizer = &mut config.optimizer;
        optimizer.weight_decay = self.weight_decay;
        optimizer.clip = self.clip;
        optimizer.schedule = self.schedule;
        optimizer.warmup = self.warmup;
        config.seed = self.seed;
        config.skip_nonfinite = self.skip_nonfinite;
        config.val_fraction = self.val_fraction;
        config.save_every = self.save_every;

        config.chat = !self.no_chat;
        config.merge = self.merge;
        config.overwrite = self.overwrite;
        config.weights_dtype = self.weights.dtype();
        config.strict = self.strict;
        config.recompute = self.recompute;
        config.gpu_memory = self.gpu_memory;
        config.objective = Es2Config {
            layers: self.layers.0.clone(),
            pool: self.pool,
            pair: self.pair,
            distance: self.distance,
            shape: self.shape,
            margin: self.margin,
            margin_abs: self.margin_abs,
            harmful_only: self.harmful_only,
            lambda: self.lambda,
            temperature: self.temperature,
            kl_dir: self.kl_dir,
        };
        Ok(config)
    }
}

impl TrainArgs {
    /// Refuses a flag that only the other objective reads (one under that objective's help
    /// heading), which would otherwise be ignored without a word.
    fn check_objective_flags(&self) -> Result<()> {
        let (heading, objective, other) = match self.task {
            Task::Es2 => (SFT_HEADING, "es2", "sft"),
            Task::Sft => (ES2_HEADING, "sft", "es2"),
        };
        let command = <TrainArgs as Args>::augment_args(clap::Command::new("train"));
        let foreign = command.get_arguments().find(|arg| {
            arg.get_help_heading() == Some(heading) && self.given.contains(arg.get_id().as_str())
        });
        match foreign.and_then(|arg| arg.get_long()) {
            Some(flag) => Err(Error::InvalidArgument(format!(
                "--{flag} is an option of --objective {other}; this run trains for {objective}"
            ))),
            None => Ok(()),
        }
    }
}

/// Progress on stderr: a bar with the step's losses, separation and speed.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None }
    }

    fn bar(&mut self, total: usize) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total as u64);
            let style = ProgressStyle::with_template(
                "{bar:24} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        })
    }
}

impl TrainObserver for Progress {
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(text),
            _ => eprintln!("{text}"),
        }
    }

    fn step(&mut self, step: usize, total: usize, report: &StepReport, tokens_per_s: f64) {
        let terms = match &report.terms {
            Terms::Es2(t) => {
                let relative = &t.relative_distance;
                let sep = relative.iter().sum::<f32>() / relative.len().max(1) as f32;
                format!("L_sep {:.4}  L_KL {:.4}  D/D_base {sep:.2}", t.sep, t.kl)
            }
            Terms::Sft(_) => format!("loss {:.4}", report.loss),
        };
        let bar = self.bar(total);
        bar.set_position(step as u64);
        bar.set_message(format!("{terms}  {tokens_per_s:.0} tok/s"));
    }

    fn evaluation(&mut self, eval: &Evaluation) {
        let text = match &eval.held_out {
            HeldOut::Es2(h) => format!(
                "held-out at step {}: D = {:?}, KL = {:.5}",
                eval.step,
                h.distance
                    .iter()
                    .map(|d| (d * 1e4).round() / 1e4)
                    .collect::<Vec<_>>(),
                h.kl
            ),
            HeldOut::Sft(h) => format!("held-out at step {}: loss {:.4}", eval.step, h.loss),
        };
        self.message(&text);
    }
}

/// Runs `es2-wgpu train`: a fresh or resumed run with a progress bar, then the summary
/// (a table, or JSON) and, with `--profile`, the GPU time per kernel.
pub fn run(options: &GpuOptions, args: &TrainArgs) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    if args.dry_run {
        return dry_run(&gpu, args);
    }
    let mut progress = Progress::new();
    let mut trainer = match &args.resume {
        Some(dir) => {
            let steps = args.given.contains("steps").then_some(args.steps);
            Trainer::resume(&gpu, dir, steps, &mut progress)?
        }
        None => Trainer::new(&gpu, args.config()?, &mut progress)?,
    };
    if args.profile {
        gpu.start_profiling();
    }
    let summary = trainer.run(&mut progress)?;
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    if args.json {
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        println!("{text}");
    } else {
        print_summary(&summary);
    }
    if args.profile {
        print_profile(&gpu.take_profile());
    }
    Ok(())
}

/// `train --dry-run`: the memory plan of the run the flags describe, on this adapter (or a
/// discrete GPU, `--discrete-gpu`), with what would make it fit when it does not. Reads only the model's config.json.
fn dry_run(gpu: &Gpu, args: &TrainArgs) -> Result<()> {
    let mut config = args.config()?;
    config.validate()?;
    let model = open_config(&config.model)?;
    let device = match config.gpu_memory {
        Some(memory) if args.discrete_gpu => DeviceLimits::discrete_gpu(memory),
        memory => DeviceLimits {
            memory,
            ..DeviceLimits::of(gpu)
        },
    };
    let verdict = plan::fit(&model, &mut config, &device);
    if args.json {
        // With recomputation turned on when only that fits, as the run would.
        let plan = MemoryPlan::new(&model, &config, &device)?;
        let knobs = match verdict {
            Ok(_) => Vec::new(),
            Err(_) => plan::knobs(&model, &config, &device),
        };
        let json = serde_json::json!({
            "plan": plan,
            "fits": plan.fits(),
            "problems": plan.problems(),
            "knobs": knobs,
        });
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    match verdict {
        Ok((plan, note)) => println!("{plan}\nfits: {note}"),
        Err(Error::DoesNotFit { message }) => println!("{message}"),
        Err(other) => return Err(other),
    }
    Ok(())
}

fn print_profile(kernels: &[es2_wgpu::gpu::KernelTime]) {
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    println!("GPU time by kernel ({total:.3} s in all):");
    for k in kernels {
        let share = 100.0 * k.seconds / total.max(1e-12);
        println!(
            "  {:32} {:>8} dispatches {:>9.3} s {share:>5.1}%",
            k.kernel, k.dispatches, k.seconds
        );
    }
}

fn print_summary(s: &Summary) {
    let name = match s.task {
        Task::Es2 => "ES2",
        Task::Sft => "SFT",
    };
    println!(
        "{name} finished: {} steps in {:.1} s; outputs in {}",
        s.steps,
        s.seconds,
        s.out.display()
    );
    match (&s.before.held_out, &s.after.held_out) {
        (HeldOut::Es2(before), HeldOut::Es2(after)) => {
            println!("held-out separation per layer (D_l, normalised by the base model's ν_l):");
            println!("  layer      before       after    ratio");
            for (i, layer) in s.layers.iter().enumerate() {
                let (b, a) = (before.distance[i], after.distance[i]);
                println!("  {layer:>5}  {b:>10.4}  {a:>10.4}  {:>7.2}x", a / b);
            }
            println!(
                "held-out KL to the base model per token: {:.5} → {:.5}",
                before.kl, after.kl
            );
        }
        (HeldOut::Sft(before), HeldOut::Sft(after)) => {
            println!("held-out cross-entropy per learned token (perplexity):");
            println!(
                "  {:.4} ({:.2}) → {:.4} ({:.2})",
                before.loss,
                before.loss.exp(),
                after.loss,
                after.loss.exp()
            );
        }
        _ => println!("the evaluations before and after measure different objectives"),
    }
    println!(
        "GPU memory at the peak: {} (planned {})",
        plan::human_bytes(s.peak_bytes),
        plan::human_bytes(s.planned_bytes)
    );
    if let Some(r) = &s.refusals {
        println!(
            "refusals on held-out prompts ({} harmful + {} harmless of the built-in held-out \
             sets; greedy, at most {} new tokens; GCG's refusal list):",
            r.sample, r.sample, r.replies.max_new_tokens
        );
        println!(
            "  harmful refused   {} → {}",
            rate(&r.before.harmful),
            rate(&r.after.harmful)
        );
        println!(
            "  harmless refused  {} → {}",
            rate(&r.before.harmless),
            rate(&r.after.harmless)
        );
    }
}

/// `refused/total (percent)`.
fn rate(r: &Rate) -> String {
    let percent = 100.0 * r.fraction().unwrap_or(0.0);
    format!("{:>3}/{} ({percent:.0}%)", r.refused, r.total)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// The configuration `es2-wgpu ARGS` gives, as `main` builds it.
    fn config_of(args: &[&str]) -> Result<TrainConfig> {
        let matches = crate::Cli::command().get_matches_from(args);
        let cli = crate::Cli::from_arg_matches(&matches).unwrap();
        let crate::Command::Train(mut train) = cli.command else {
            panic!("{args:?} is not a train command");
        };
        train.given = crate::cli::given_flags(&matches);
        train.config()
    }

    #[test]
    fn a_flag_of_the_other_objective_is_refused_naming_it() {
        let sft = [
            "es2-wgpu",
            "train",
            "--objective",
            "sft",
            "--data",
            "c.jsonl",
        ];
        let config = config_of(&sft).unwrap();
        assert_eq!((config.task, config.sft_batch), (Task::Sft, 8));
        let refused = |args: &[&str], flag: &str| match config_of(args) {
            Err(Error::InvalidArgument(message)) => assert!(
                message.starts_with(&format!("--{flag} is an option of --objective")),
                "{message}"
            ),
            other => panic!("{args:?}: {other:?}"),
        };
        for (flag, value) in [("layers", "1"), ("lambda", "2"), ("harmful-batch", "4")] {
            refused(&[&sft[..], &[&format!("--{flag}"), value]].concat(), flag);
        }
        refused(&["es2-wgpu", "train", "--sft-batch", "4"], "sft-batch");
        assert!(config_of(&["es2-wgpu", "train", "--lambda", "2"]).is_ok());
    }
}
