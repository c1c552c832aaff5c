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

mod shapes;
mod step;

pub use shapes::{BenchShape, GemmCase};
use step::StepBench;

use crate::gpu::{DType, Gpu, KernelTime, Recorder, Tensor};
use crate::model::{Trainable, WeightsDtype};
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
