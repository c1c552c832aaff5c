//! `es2-wgpu train`: flags → `TrainConfig`, a progress bar, and the closing summary table.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use es2_wgpu::es2::{
    Evaluation, OptimizerConfig, Schedule, StepReport, Summary, TrainConfig, TrainObserver, Trainer,
};
use es2_wgpu::model::{embedded, LoraConfig, Projection};
use es2_wgpu::ops::kl::KlDirection;
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::ops::separation::{Distance, LossShape, Pair};
use es2_wgpu::{Error, Gpu, GpuOptions, Result};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A Hugging Face model folder, or the name of a model built into es2-wgpu.
    #[arg(long, default_value = embedded::DEFAULT)]
    model: String,
    /// Harmful prompts: JSON array, JSONL or CSV with an instruction/prompt/goal/behavior/text
    /// field (default: the built-in set).
    #[arg(long)]
    harmful: Option<PathBuf>,
    /// Harmless prompts, same formats (default: the built-in set).
    #[arg(long)]
    harmless: Option<PathBuf>,
    /// Output folder: adapter, metrics.jsonl, checkpoints, summary.json.
    #[arg(long, default_value = "es2-out")]
    out: PathBuf,
    /// Continue the run saved in this checkpoint (or output) folder; other options come from
    /// the checkpoint, except --steps.
    #[arg(long)]
    resume: Option<PathBuf>,

    /// Layers whose embeddings are separated: "all", or a list such as "2,4,6" or "8-12".
    #[arg(long, default_value = "all")]
    layers: String,
    /// Where a prompt's embedding is read: its last token, or the mean over its tokens.
    #[arg(long, value_enum, default_value_t = PoolArg::Last)]
    pool: PoolArg,
    /// How the two groups are compared: distance of the means, mean over all pairs, or each
    /// harmful embedding against the base model's harmless centroid.
    #[arg(long, value_enum, default_value_t = PairArg::Centroid)]
    pair: PairArg,
    /// Distance: Euclidean (l2), squared Euclidean, or 1 − cosine similarity.
    #[arg(long, value_enum, default_value_t = DistanceArg::L2)]
    distance: DistanceArg,
    /// hinge: max(0, margin − D) (bounded); neg: −D (unbounded).
    #[arg(long, value_enum, default_value_t = ShapeArg::Hinge)]
    shape: ShapeArg,
    /// Hinge margin relative to the base model's distance at each layer.
    #[arg(long, default_value_t = 3.0)]
    margin: f32,
    /// Absolute hinge margin (overrides --margin).
    #[arg(long)]
    margin_abs: Option<f32>,
    /// Stop the separation gradient on the harmless embeddings.
    #[arg(long)]
    harmful_only: bool,
    /// Weight of the KL term.
    #[arg(long, default_value_t = 1.0)]
    lambda: f32,
    /// Softmax temperature of the KL term.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// KL(base ‖ tuned) (forward) or KL(tuned ‖ base) (reverse).
    #[arg(long, value_enum, default_value_t = KlDirArg::Forward)]
    kl_dir: KlDirArg,

    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Projections that get adapters (q, k, v, o, gate, up, down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    lora_targets: Vec<String>,
    /// Also write a merged Hugging Face model folder (out/merged).
    #[arg(long)]
    merge: bool,
    /// Keep the frozen base weights' block projections in f16, at half their GPU memory
    /// (the model of a LoRA run; the frozen reference copy under --full). Compute stays f32.
    #[arg(long)]
    f16_weights: bool,
    /// Refuse model weights that hold NaN or infinity (by default they load with a warning).
    #[arg(long)]
    strict: bool,

    /// Learning rate [default: 1e-4; an embedded model's preset may differ].
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    schedule: ScheduleArg,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training steps; with --resume, the new total [default: 200; an embedded model's preset
    /// may differ].
    #[arg(long)]
    steps: Option<usize>,
    /// Harmful prompts per step [default: 8; an embedded model's preset may differ].
    #[arg(long)]
    harmful_batch: Option<usize>,
    /// Harmless prompts per step [default: 8; an embedded model's preset may differ].
    #[arg(long)]
    harmless_batch: Option<usize>,
    /// Prompts longer than this many tokens keep their last tokens [default: 128; an
    /// embedded model's preset may differ].
    #[arg(long)]
    max_len: Option<usize>,
    /// Fraction of each prompt set held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f32,
    /// Held-out evaluation every N steps, and at the start and end [default: 50; an embedded
    /// model's preset may differ].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Checkpoint every N steps (0: none).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Feed prompts as plain text even when the model has a chat template.
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
}

macro_rules! value_enum {
    ($name:ident => $target:ty { $($variant:ident => $value:expr),* $(,)? }) => {
        #[derive(Clone, Copy, Debug, ValueEnum)]
        enum $name { $($variant),* }
        impl From<$name> for $target {
            fn from(v: $name) -> $target {
                match v { $($name::$variant => $value),* }
            }
        }
    };
}

value_enum!(PoolArg => Pool { Last => Pool::Last, Mean => Pool::Mean });
value_enum!(PairArg => Pair { Centroid => Pair::Centroid, Pairwise => Pair::Pairwise, BaseCentroid => Pair::BaseCentroid });
value_enum!(DistanceArg => Distance { L2 => Distance::L2, SqL2 => Distance::SqL2, Cosine => Distance::Cosine });
value_enum!(ShapeArg => LossShape { Hinge => LossShape::Hinge, Neg => LossShape::Neg });
value_enum!(KlDirArg => KlDirection { Forward => KlDirection::Forward, Reverse => KlDirection::Reverse });
value_enum!(ScheduleArg => Schedule { Constant => Schedule::Constant, Cosine => Schedule::Cosine });

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let targets = self
            .lora_targets
            .iter()
            .map(|t| Projection::parse(t.trim()))
            .collect::<Result<Vec<_>>>()?;
        let lora = (!self.full).then_some(LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
        });
        let mut config = TrainConfig::for_model(&self.model)?;
        let preset = config.clone();
        config = TrainConfig {
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            out: self.out.clone(),
            lora,
            optimizer: OptimizerConfig {
                lr: self.lr.unwrap_or(preset.optimizer.lr),
                weight_decay: self.weight_decay,
                clip: self.clip,
                schedule: self.schedule.into(),
                warmup: self.warmup,
                ..OptimizerConfig::default()
            },
            steps: self.steps.unwrap_or(preset.steps),
            harmful_batch: self.harmful_batch.unwrap_or(preset.harmful_batch),
            harmless_batch: self.harmless_batch.unwrap_or(preset.harmless_batch),
            max_len: self.max_len.unwrap_or(preset.max_len),
            seed: self.seed,
            val_fraction: self.val_fraction,
            eval_every: self.eval_every.unwrap_or(preset.eval_every),
            save_every: self.save_every,
            chat: !self.no_chat,
            merge: self.merge,
            overwrite: self.overwrite,
            f16_weights: self.f16_weights,
            strict: self.strict,
            ..config
        };
        let o = &mut config.objective;
        o.layers = es2_wgpu::es2::objective::parse_layers(&self.layers)?;
        o.pool = self.pool.into();
        o.pair = self.pair.into();
        o.distance = self.distance.into();
        o.shape = self.shape.into();
        o.margin = self.margin;
        o.margin_abs = self.margin_abs;
        o.harmful_only = self.harmful_only;
        o.lambda = self.lambda;
        o.temperature = self.temperature;
        o.kl_dir = self.kl_dir.into();
        Ok(config)
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
        let v = &report.values;
        let relative = &report.relative_distance;
        let sep = relative.iter().sum::<f32>() / relative.len().max(1) as f32;
        let bar = self.bar(total);
        bar.set_position(step as u64);
        bar.set_message(format!(
            "L_sep {:.4}  L_KL {:.4}  D/D_base {sep:.2}  {tokens_per_s:.0} tok/s",
            v.sep, v.kl
        ));
    }

    fn evaluation(&mut self, eval: &Evaluation) {
        let text = format!(
            "held-out at step {}: D = {:?}, KL = {:.5}",
            eval.step,
            eval.distance
                .iter()
                .map(|d| (d * 1e4).round() / 1e4)
                .collect::<Vec<_>>(),
            eval.kl
        );
        self.message(&text);
    }
}

pub fn run(options: &GpuOptions, args: &TrainArgs) -> Result<()> {
    let gpu = Gpu::with_options(options)?;
    let mut progress = Progress::new();
    let mut trainer = match &args.resume {
        Some(dir) => Trainer::resume(&gpu, dir, args.steps, &mut progress)?,
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
    println!(
        "ES2 finished: {} steps in {:.1} s; outputs in {}",
        s.steps,
        s.seconds,
        s.out.display()
    );
    println!("held-out separation per layer (D_l, normalised by the base model's ν_l):");
    println!("  layer      before       after    ratio");
    for (i, layer) in s.layers.iter().enumerate() {
        let (b, a) = (s.before.distance[i], s.after.distance[i]);
        println!("  {layer:>5}  {b:>10.4}  {a:>10.4}  {:>7.2}x", a / b);
    }
    println!(
        "held-out KL to the base model per token: {:.5} → {:.5}",
        s.before.kl, s.after.kl
    );
}
