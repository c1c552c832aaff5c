//! Benchmarks of whole training steps and of the GEMM, as `es2-wgpu bench` runs them: a model
//! of a named shape built from a config with seeded weights (no download), seeded token ids,
//! wall-clock milliseconds per step (the first step, which builds the pipelines, reported on
//! its own), tokens per second, and, where the adapter has timestamp queries, the GPU time of
//! one more step per kernel family with its GFLOP/s and GB/s (from the device's profile, as
//! `--profile` gets it).
//!
//! Workloads:
//! - `lm-step`: a plain language-model step: cross-entropy on every next token, AdamW, at
//!   [`BenchShape::PeerTiny`] full fine-tuning: the step the peer harnesses (Burn-wgpu,
//!   PyTorch) time, on the same shape, batch and optimizer settings;
//! - `es2-step`: one ES2 step (default objective) with the same number of harmful and harmless
//!   sequences; full fine-tuning with a frozen base at the tiny shape, LoRA at the others;
//! - `gemm`: products `C = A·B` in a given layout, timed one by one.

use serde::Serialize;

use super::engine::{measure_base_stats, Es2Engine, ModelPair};
use super::objective::Es2Config;
use super::optimizer::OptimizerConfig;
use super::report::StepReport;
use super::sft::SftEngine;
use crate::gpu::{DType, Gpu, KernelTime, Recorder, Tensor};
use crate::model::{
    Batch, Config, LoadOptions, LoraConfig, Projection, SeededInit, Targets, Trainable,
    Transformer, WeightsDtype,
};
use crate::ops::matmul::{gemm, Gemm, MatmulOptions};
use crate::rng::Rng;
use crate::{Error, Result};

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// A plain language-model training step (cross-entropy on every token, AdamW).
    LmStep,
    /// One ES2 training step.
    Es2Step,
    /// GEMMs, one at a time.
    Gemm,
}

/// A model shape to benchmark at; the weights are seeded, never downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum BenchShape {
    /// The peer harnesses' tiny Llama: vocabulary 512, hidden 128, 4 layers, 4 heads, 2 KV
    /// heads, MLP 344, untied; 8 sequences of 64 tokens, full fine-tuning.
    #[default]
    PeerTiny,
    /// Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary
    /// 151,936, tied; 1 sequence of 75 tokens (per side under ES2), LoRA.
    #[cfg_attr(feature = "cli", value(name = "qwen2.5-0.5b"))]
    #[serde(rename = "qwen2.5-0.5b")]
    Qwen2_5_0_5b,
    /// A Llama-3-style 1B model (Llama-3.2-1B's config, its embedding untied from the LM
    /// head): hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 128,256,
    /// rope θ 500,000 with llama3 scaling; 1 sequence of 75 tokens (per side under ES2), LoRA.
    #[cfg_attr(feature = "cli", value(name = "llama-3-1b"))]
    #[serde(rename = "llama-3-1b")]
    Llama3_1b,
    /// A 7B-class model (Mistral-7B's shape): hidden 4096, 32 layers, 32 heads, 8 KV heads,
    /// MLP 14336, vocabulary 32,000, untied; 1 sequence of 128 tokens, LoRA, f16 block
    /// weights (about 15 GB of GPU memory). For a real GPU.
    #[cfg_attr(feature = "cli", value(name = "mistral-7b"))]
    #[serde(rename = "mistral-7b")]
    Mistral7b,
}

/// The peer harnesses' model (their `VOCAB`, `HIDDEN`, ... constants).
const PEER_TINY: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "tie_word_embeddings": false
}"#;

/// Qwen2.5-0.5B's config.json, minus the fields the loader ignores.
const QWEN2_5_0_5B: &str = r#"{
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "tie_word_embeddings": true, "bos_token_id": 151643, "eos_token_id": 151645
}"#;

/// Llama-3.2-1B's config.json, minus the fields the loader ignores, with
/// `tie_word_embeddings` false: a separate 128,256-row LM head, as Llama-3-8B has.
const LLAMA_3_1B: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "attention_bias": false, "mlp_bias": false,
    "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

/// Mistral-7B-v0.1's config.json, minus the fields the loader ignores.
const MISTRAL_7B: &str = r#"{
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
    "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
}"#;

impl BenchShape {
    /// Every shape, smallest first.
    pub const ALL: [BenchShape; 4] = [
        BenchShape::PeerTiny,
        BenchShape::Qwen2_5_0_5b,
        BenchShape::Llama3_1b,
        BenchShape::Mistral7b,
    ];

    /// The shape `--shape` calls `name`.
    pub fn from_name(name: &str) -> Option<BenchShape> {
        BenchShape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The name `--shape` takes.
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::PeerTiny => "peer-tiny",
            BenchShape::Qwen2_5_0_5b => "qwen2.5-0.5b",
            BenchShape::Llama3_1b => "llama-3-1b",
            BenchShape::Mistral7b => "mistral-7b",
        }
    }

    /// The model's configuration.
    pub fn config(self) -> Result<Config> {
        let json = match self {
            BenchShape::PeerTiny => PEER_TINY,
            BenchShape::Qwen2_5_0_5b => QWEN2_5_0_5B,
            BenchShape::Llama3_1b => LLAMA_3_1B,
            BenchShape::Mistral7b => MISTRAL_7B,
        };
        Config::from_json(json).map_err(Error::InvalidArgument)
    }

    /// Sequences per batch (per side under ES2) and tokens per sequence.
    pub fn default_batch(self) -> (usize, usize) {
        match self {
            BenchShape::PeerTiny => (8, 64),
            BenchShape::Qwen2_5_0_5b | BenchShape::Llama3_1b => (1, 75),
            BenchShape::Mistral7b => (1, 128),
        }
    }

    /// What trains by default: everything at the tiny shape, LoRA adapters at the others.
    pub fn default_trainable(self) -> Trainable {
        match self {
            BenchShape::PeerTiny => Trainable::Full,
            _ => Trainable::Lora,
        }
    }
}

/// One GEMM to time: `C [M, N] = op(A) · op(B)`, op a transpose where the flag says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GemmCase {
    /// What the product is (`square`, `gate forward`, ...).
    pub label: String,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// A is stored `[K, M]`.
    pub transpose_a: bool,
    /// B is stored `[N, K]` (a weight in the forward).
    pub transpose_b: bool,
}

impl GemmCase {
    /// `A·B` with both operands stored as written: the layout of a plain square matmul.
    pub fn plain(label: &str, m: usize, n: usize, k: usize) -> GemmCase {
        GemmCase {
            label: label.into(),
            m,
            n,
            k,
            transpose_a: false,
            transpose_b: false,
        }
    }

    /// The layout as `A·Bᵀ`-style text.
    pub fn layout(&self) -> String {
        let a = if self.transpose_a { "Aᵀ" } else { "A" };
        let b = if self.transpose_b { "Bᵀ" } else { "B" };
        format!("{a}·{b}")
    }

    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }

    /// The products of one training step at `shape` with `tokens` rows: each distinct block
    /// projection's forward (`X·Wᵀ`) and input gradient (`dY·W`), its weight gradient
    /// (`dYᵀ·X`) under full fine-tuning, and the LoRA down and up products (rank 16) under
    /// LoRA. The LM head is left out (it runs in vocabulary chunks).
    pub fn step_products(config: &Config, tokens: usize, trainable: Trainable) -> Vec<GemmCase> {
        let rank = LoraConfig::default().rank;
        let mut cases: Vec<GemmCase> = Vec::new();
        let mut add = |label: String, m, n, k, transpose_a, transpose_b| {
            let case = GemmCase {
                label,
                m,
                n,
                k,
                transpose_a,
                transpose_b,
            };
            let same = |c: &GemmCase| (c.m, c.n, c.k, c.transpose_a, c.transpose_b);
            if !cases.iter().any(|c| same(c) == same(&case)) {
                cases.push(case);
            }
        };
        for p in Projection::ALL {
            let (n, k) = config.projection_shape(p);
            let name = p.short();
            add(format!("{name} forward"), tokens, n, k, false, true);
            add(format!("{name} input grad"), tokens, k, n, false, false);
            match trainable {
                Trainable::Full => add(format!("{name} weight grad"), n, k, tokens, true, false),
                Trainable::Lora => {
                    add(format!("{name} LoRA down"), tokens, rank, k, false, true);
                    add(format!("{name} LoRA up"), tokens, n, rank, false, true);
                }
            }
        }
        cases
    }
}

/// Everything a benchmark run is configured with.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// What to time.
    pub workload: Workload,
    /// The model's shape (steps), or whose step products to time (`gemm` without cases).
    pub shape: BenchShape,
    /// Timed runs after the first (which builds pipelines and is reported on its own).
    pub steps: usize,
    /// Sequences per batch (per side under ES2); `None`: the shape's default.
    pub batch: Option<usize>,
    /// Tokens per sequence; `None`: the shape's default.
    pub seq_len: Option<usize>,
    /// What trains; `None`: the shape's default.
    pub trainable: Option<Trainable>,
    /// How the frozen weight matrices are stored; `mistral-7b` is always f16.
    pub weights: WeightsDtype,
    /// Time one more step kernel by kernel (timestamp queries; skipped without them).
    pub profile: bool,
    /// The products of the `gemm` workload; empty: 1024³ and the shape's step products.
    pub gemms: Vec<GemmCase>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            workload: Workload::LmStep,
            shape: BenchShape::default(),
            steps: 3,
            batch: None,
            seq_len: None,
            trainable: None,
            weights: WeightsDtype::F32,
            profile: true,
            gemms: Vec::new(),
        }
    }
}

/// One kernel family's share of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyRate {
    /// The shader file (`shaders/<family>.wgsl`).
    pub family: String,
    /// Its entry points that ran.
    pub entries: Vec<String>,
    /// Dispatches in the step.
    pub dispatches: u64,
    /// GPU milliseconds in the step.
    pub ms: f64,
    /// Share of the step's GPU time, in percent.
    pub percent: f64,
    /// GFLOP/s, where its FLOPs are counted (the GEMM).
    pub gflops: Option<f64>,
    /// GB/s of the bytes its dispatches bind (see [`crate::gpu::Work`]).
    pub gbytes_per_s: Option<f64>,
}

/// One timed GEMM.
#[derive(Debug, Clone, Serialize)]
pub struct GemmRate {
    /// The product.
    #[serde(flatten)]
    pub case: GemmCase,
    /// The first run (pipeline built), milliseconds.
    pub first_ms: f64,
    /// The median of the later runs, milliseconds.
    pub ms: f64,
    /// GFLOP/s at the median.
    pub gflops: f64,
    /// GB/s of A, B and C, each once, at the median.
    pub gbytes_per_s: f64,
}

/// What a benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The workload.
    pub workload: Workload,
    /// The model shape.
    pub shape: BenchShape,
    /// The adapter's name.
    pub adapter: String,
    /// Its backend and driver.
    pub driver: String,
    /// Times come from timestamp queries (GPU time) rather than the wall clock; the step
    /// times are always wall-clock.
    pub timestamps: bool,
    /// Sequences per batch (per side under ES2) and tokens per sequence (steps).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// `full` or `lora`.
    pub trainable: String,
    /// Real tokens per step.
    pub tokens_per_step: usize,
    /// Timed steps (or runs of each GEMM) after the first.
    pub runs: usize,
    /// The first step (or GEMM round), milliseconds.
    pub first_step_ms: f64,
    /// Each later step, milliseconds.
    pub step_ms: Vec<f64>,
    /// Their median.
    pub median_step_ms: f64,
    /// Tokens per second at the median.
    pub tokens_per_s: f64,
    /// The loss of every step, the first included.
    pub losses: Vec<f64>,
    /// GPU time of the profiled step, milliseconds (0 without a profile).
    pub profiled_step_ms: f64,
    /// Kernel families of the profiled step, most time first.
    pub families: Vec<FamilyRate>,
    /// Entry points of the profiled step, most time first.
    pub kernels: Vec<KernelTime>,
    /// The `gemm` workload's products.
    pub gemms: Vec<GemmRate>,
}

/// Runs the benchmark `config` describes; `progress` hears a line as each step ends.
pub fn run_bench(
    gpu: &Gpu,
    config: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let model_config = config.shape.config()?;
    let (default_batch, default_len) = config.shape.default_batch();
    let batch = config.batch.unwrap_or(default_batch);
    let seq_len = config.seq_len.unwrap_or(default_len);
    if batch == 0 || seq_len < 2 {
        return Err(Error::config(
            "batch",
            format!("need at least 1 sequence of 2 tokens, got {batch} × {seq_len}"),
        ));
    }
    if config.steps == 0 {
        return Err(Error::config("steps", "must be at least 1"));
    }
    let trainable = config.trainable.unwrap_or(config.shape.default_trainable());
    let info = gpu.info();
    let mut report = BenchReport {
        workload: config.workload,
        shape: config.shape,
        adapter: info.name.clone(),
        driver: format!("{:?}, {} {}", info.backend, info.driver, info.driver_info),
        timestamps: gpu.has_timestamps(),
        batch,
        seq_len,
        trainable: match trainable {
            Trainable::Full => "full".into(),
            Trainable::Lora => "lora".into(),
        },
        tokens_per_step: 0,
        runs: config.steps,
        first_step_ms: 0.0,
        step_ms: Vec::new(),
        median_step_ms: 0.0,
        tokens_per_s: 0.0,
        losses: Vec::new(),
        profiled_step_ms: 0.0,
        families: Vec::new(),
        kernels: Vec::new(),
        gemms: Vec::new(),
    };
    match config.workload {
        Workload::Gemm => {
            let cases = if config.gemms.is_empty() {
                let mut cases = vec![GemmCase::plain("square", 1024, 1024, 1024)];
                cases.extend(GemmCase::step_products(
                    &model_config,
                    batch * seq_len,
                    trainable,
                ));
                cases
            } else {
                config.gemms.clone()
            };
            for case in cases {
                let rate = time_gemm(gpu, &case, config.steps)?;
                progress(&format!(
                    "gemm {} x {} x {} {}: {:.3} ms, {:.2} GFLOP/s",
                    case.m,
                    case.n,
                    case.k,
                    case.layout(),
                    rate.ms,
                    rate.gflops
                ));
                report.gemms.push(rate);
            }
            let total = |f: fn(&GemmRate) -> f64| report.gemms.iter().map(f).sum::<f64>();
            report.first_step_ms = total(|g| g.first_ms);
            report.median_step_ms = total(|g| g.ms);
            Ok(report)
        }
        Workload::LmStep | Workload::Es2Step => {
            let mut step = StepBench::new(gpu, config, model_config, batch, seq_len, trainable)?;
            report.tokens_per_step = step.tokens();
            let (ms, loss) = step.timed()?;
            progress(&format!("first step: {ms:.1} ms, loss {loss:.4}"));
            report.first_step_ms = ms;
            report.losses.push(loss);
            for i in 0..config.steps {
                let (ms, loss) = step.timed()?;
                progress(&format!("step {}: {ms:.1} ms, loss {loss:.4}", i + 1));
                report.step_ms.push(ms);
                report.losses.push(loss);
            }
            report.median_step_ms = median(&report.step_ms);
            report.tokens_per_s = report.tokens_per_step as f64 / (report.median_step_ms * 1e-3);
            if config.profile && gpu.has_timestamps() {
                gpu.start_profiling();
                let result = step.timed();
                report.kernels = gpu.take_profile();
                let (ms, loss) = result?;
                progress(&format!("profiled step: {ms:.1} ms, loss {loss:.4}"));
                report.losses.push(loss);
                report.families = families(&report.kernels);
                report.profiled_step_ms =
                    report.kernels.iter().map(|k| k.seconds).sum::<f64>() * 1e3;
            }
            Ok(report)
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}

/// Entry points summed by family, most time first.
fn families(kernels: &[KernelTime]) -> Vec<FamilyRate> {
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    let mut by_family: Vec<(String, Vec<&KernelTime>)> = Vec::new();
    for k in kernels {
        match by_family.iter_mut().find(|(f, _)| f == k.family) {
            Some((_, list)) => list.push(k),
            None => by_family.push((k.family.to_string(), vec![k])),
        }
    }
    let mut rates: Vec<FamilyRate> = by_family
        .into_iter()
        .map(|(family, list)| {
            let sum = KernelTime {
                dispatches: list.iter().map(|k| k.dispatches).sum(),
                seconds: list.iter().map(|k| k.seconds).sum(),
                flops: list.iter().map(|k| k.flops).sum(),
                bytes: list.iter().map(|k| k.bytes).sum(),
                ..KernelTime::default()
            };
            FamilyRate {
                family,
                entries: list.iter().map(|k| k.kernel.to_string()).collect(),
                dispatches: sum.dispatches,
                ms: sum.seconds * 1e3,
                percent: 100.0 * sum.seconds / total.max(1e-12),
                gflops: sum.gflops(),
                gbytes_per_s: sum.gbytes_per_s(),
            }
        })
        .collect();
    rates.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rates
}

/// Times `case` once to build its pipelines, then `runs` times: by timestamp queries where the
/// adapter has them (every dispatch of the call, a split K's sum included), else by the wall
/// clock around submit-and-wait.
fn time_gemm(gpu: &Gpu, case: &GemmCase, runs: usize) -> Result<GemmRate> {
    let g = Gemm::dense(case.m, case.n, case.k, case.transpose_a, case.transpose_b)
        .with(MatmulOptions::overwrite());
    let mut rng = Rng::new(0x6e6d);
    let mut random = |numel: usize| Tensor::from_f32(gpu, [numel], &rng.normal_vec(numel, 1.0));
    let a = random(case.m * case.k)?;
    let b = random(case.k * case.n)?;
    let c = Tensor::zeros(gpu, [case.m * case.n], DType::F32);
    let once = || -> Result<f64> {
        if gpu.has_timestamps() {
            gpu.start_profiling();
        }
        let started = std::time::Instant::now();
        let mut rec = Recorder::new(gpu);
        gemm(&mut rec, &g, &a, &b, None, &c);
        let finished = rec.finish();
        let wall = started.elapsed().as_secs_f64();
        let gpu_time: f64 = gpu.take_profile().iter().map(|k| k.seconds).sum();
        finished?;
        Ok(if gpu.has_timestamps() { gpu_time } else { wall })
    };
    let first = once()?;
    let times = (0..runs).map(|_| once()).collect::<Result<Vec<f64>>>()?;
    let seconds = median(&times);
    let bytes = 4.0 * (case.m * case.k + case.k * case.n + case.m * case.n) as f64;
    Ok(GemmRate {
        case: case.clone(),
        first_ms: first * 1e3,
        ms: seconds * 1e3,
        gflops: case.flops() / seconds * 1e-9,
        gbytes_per_s: bytes / seconds * 1e-9,
    })
}

/// A model, its data and its engine, ready to step.
struct StepBench<'g> {
    gpu: &'g Gpu,
    engine: Engine,
    models: ModelPair,
    batches: Vec<Batch>,
}

enum Engine {
    Lm(Box<SftEngine>),
    Es2(Box<Es2Engine>),
}

/// The peer harnesses' optimizer (AdamW, lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay
/// 0.01, no clipping).
fn peer_optimizer() -> OptimizerConfig {
    OptimizerConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        clip: 0.0,
        ..OptimizerConfig::default()
    }
}

impl<'g> StepBench<'g> {
    fn new(
        gpu: &'g Gpu,
        config: &BenchConfig,
        model_config: Config,
        batch: usize,
        seq_len: usize,
        trainable: Trainable,
    ) -> Result<Self> {
        let vocab = model_config.vocab_size;
        let options = LoadOptions {
            weights: match config.shape {
                BenchShape::Mistral7b => WeightsDtype::F16,
                _ => config.weights,
            },
            ..LoadOptions::default()
        };
        let init = SeededInit { seed: 7, std: 0.02 };
        let load = || Transformer::from_source(gpu, model_config.clone(), &init, &options);
        let mut tuned = load()?;
        if trainable == Trainable::Lora {
            tuned.attach_lora(gpu, &LoraConfig::default(), 0)?;
        }
        let mut tokens = PeerTokens::new();
        match config.workload {
            Workload::LmStep => {
                let data = lm_batch(gpu, &mut tokens, batch, seq_len, vocab)?;
                let engine = SftEngine::new(gpu, &tuned, trainable, peer_optimizer(), 0.0)?;
                Ok(StepBench {
                    gpu,
                    engine: Engine::Lm(Box::new(engine)),
                    models: ModelPair {
                        tuned,
                        frozen: None,
                    },
                    batches: vec![data],
                })
            }
            _ => {
                let mut sequences = || -> Result<Batch> {
                    let rows: Vec<Vec<u32>> =
                        (0..batch).map(|_| tokens.take(seq_len, vocab)).collect();
                    Batch::new(gpu, &rows, vocab)
                };
                let (harmful, harmless) = (sequences()?, sequences()?);
                let frozen = match trainable {
                    Trainable::Full => Some(load()?),
                    Trainable::Lora => None,
                };
                let models = ModelPair { tuned, frozen };
                let objective = Es2Config::default();
                let stats = measure_base_stats(
                    gpu,
                    models.base_model(),
                    &objective,
                    std::slice::from_ref(&harmful),
                    std::slice::from_ref(&harmless),
                )?;
                let engine = Es2Engine::new(
                    gpu,
                    &models.tuned,
                    trainable,
                    objective,
                    peer_optimizer(),
                    stats,
                    0.0,
                )?;
                Ok(StepBench {
                    gpu,
                    engine: Engine::Es2(Box::new(engine)),
                    models,
                    batches: vec![harmful, harmless],
                })
            }
        }
    }

    fn tokens(&self) -> usize {
        self.batches.iter().map(Batch::tokens).sum()
    }

    /// One step: wall milliseconds (submit to readback) and its loss.
    fn timed(&mut self) -> Result<(f64, f64)> {
        let lr = peer_optimizer().lr;
        let started = std::time::Instant::now();
        let report: StepReport = match &mut self.engine {
            Engine::Lm(engine) => {
                engine.step(self.gpu, &self.models.tuned, &self.batches[0], lr, 0)?
            }
            Engine::Es2(engine) => engine.step(
                self.gpu,
                &self.models,
                &self.batches[0],
                &self.batches[1],
                lr,
                0,
            )?,
        };
        Ok((started.elapsed().as_secs_f64() * 1e3, report.loss))
    }
}

/// `batch` sequences of `seq_len` inputs, each position learning the next token of a
/// `seq_len + 1`-token stream: cross-entropy on every position, as the peers compute it.
fn lm_batch(
    gpu: &Gpu,
    tokens: &mut PeerTokens,
    batch: usize,
    seq_len: usize,
    vocab: usize,
) -> Result<Batch> {
    let streams: Vec<Vec<u32>> = (0..batch)
        .map(|_| tokens.take(seq_len + 1, vocab))
        .collect();
    let inputs: Vec<Vec<u32>> = streams.iter().map(|s| s[..seq_len].to_vec()).collect();
    let host: Vec<u32> = streams.iter().flat_map(|s| s[1..].to_vec()).collect();
    let mut data = Batch::new(gpu, &inputs, vocab)?;
    data.targets = Some(Targets {
        ids: Tensor::from_u32(gpu, [host.len()], &host)?,
        counted: host.len(),
        host,
    });
    Ok(data)
}

/// The peer harnesses' token stream (Burn's `make_tokens`, torch_bench.py's LCG): Knuth's
/// MMIX generator, the id from its high bits.
struct PeerTokens(u64);

impl PeerTokens {
    fn new() -> Self {
        PeerTokens(0x2545_F491_4F6C_DD1D)
    }

    fn take(&mut self, count: usize, vocab: usize) -> Vec<u32> {
        (0..count)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((self.0 >> 33) % vocab as u64) as u32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_shapes_are_the_models_they_name() {
        let tiny = BenchShape::PeerTiny.config().unwrap();
        assert_eq!(
            (tiny.vocab_size, tiny.hidden_size, tiny.num_hidden_layers),
            (512, 128, 4)
        );
        assert_eq!(tiny.head_dim, 32);
        let qwen = BenchShape::Qwen2_5_0_5b.config().unwrap();
        assert_eq!((qwen.hidden_size, qwen.intermediate_size), (896, 4864));
        assert_eq!(qwen.head_dim, 64);
        assert!(qwen.tie_word_embeddings);
        let llama = BenchShape::Llama3_1b.config().unwrap();
        assert_eq!(
            (llama.vocab_size, llama.hidden_size, llama.num_hidden_layers),
            (128256, 2048, 16)
        );
        assert_eq!((llama.num_key_value_heads, llama.head_dim), (8, 64));
        assert!(!llama.tie_word_embeddings);
        for shape in BenchShape::ALL {
            assert_eq!(BenchShape::from_name(shape.name()), Some(shape));
        }
        assert_eq!(llama.rope_scaling.unwrap().factor, 32.0);
        let mistral = BenchShape::Mistral7b.config().unwrap();
        assert_eq!(mistral.head_dim, 128);
    }

    #[test]
    fn step_products_are_each_projection_layout_once() {
        let qwen = BenchShape::Qwen2_5_0_5b.config().unwrap();
        let lora = GemmCase::step_products(&qwen, 75, Trainable::Lora);
        // q/o, k/v, gate/up, down: 4 weight shapes × (forward + input grad); LoRA down on
        // K = 896 and 4864; LoRA up to N = 896, 128, 4864.
        assert_eq!(lora.len(), 4 * 2 + 2 + 3, "{lora:#?}");
        assert!(lora
            .iter()
            .any(|c| (c.m, c.n, c.k, c.transpose_b) == (75, 4864, 896, true)));
        let full = GemmCase::step_products(&qwen, 75, Trainable::Full);
        assert!(full
            .iter()
            .any(|c| (c.m, c.n, c.k, c.transpose_a) == (4864, 896, 75, true)));
    }

    #[test]
    fn the_lm_batch_learns_every_position() {
        let gpu = crate::testing::gpu();
        let data = lm_batch(gpu, &mut PeerTokens::new(), 3, 5, 512).unwrap();
        let targets = data.targets.as_ref().unwrap();
        assert_eq!(targets.counted, 15);
        // Position t of a row predicts the stream's token t + 1: the next row's input.
        assert_eq!(targets.host[..4], data.padded_ids[1..5]);
    }
}
