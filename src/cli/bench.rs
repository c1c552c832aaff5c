//! `es2-wgpu bench`: flags onto `es2::bench::BenchConfig`, the report as a table or JSON.

use clap::Args;
use es2_wgpu::es2::bench::{run_bench, BenchConfig, BenchReport, BenchShape, GemmCase, Workload};
use es2_wgpu::gpu::GpuOptions;
use es2_wgpu::model::Trainable;
use es2_wgpu::{Error, Gpu, Result};

/// Examples shown under `es2-wgpu bench --help`.
pub const EXAMPLE: &str = "Examples:
  es2-wgpu bench lm-step                        # the peers' tiny Llama step (Burn, PyTorch)
  es2-wgpu bench es2-step --shape qwen2.5-0.5b  # one ES2 LoRA step at Qwen2.5-0.5B's shape
  es2-wgpu bench gemm                           # 1024³ and the 0.5B step's products
  es2-wgpu bench gemm 4096 4096 4096 --steps 5 --json";

/// `es2-wgpu bench`'s arguments.
#[derive(Args)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum, default_value = "lm-step")]
    workload: Workload,
    /// For gemm: M N K of one product C[M, N] = A[M, K]·B[K, N] (default: 1024³ and the
    /// products of a --shape step).
    #[arg(num_args = 3, value_names = ["M", "N", "K"])]
    dims: Vec<usize>,
    /// The model shape (seeded weights, no download). [default: peer-tiny for lm-step,
    /// es2-step; qwen2.5-0.5b for gemm's step products]
    #[arg(long, value_enum)]
    shape: Option<BenchShape>,
    /// Timed steps (or GEMM runs) after the first, which is reported on its own.
    #[arg(long, default_value_t = BenchConfig::default().steps)]
    steps: usize,
    /// Sequences per batch (per side for es2-step) [default: the shape's].
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence [default: the shape's].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Train every weight (the default at peer-tiny).
    #[arg(long, conflicts_with = "lora")]
    full: bool,
    /// Train LoRA adapters, rank 16 (the default at the larger shapes).
    #[arg(long)]
    lora: bool,
    #[command(flatten)]
    weights: super::WeightsArgs,
    /// Skip the extra step timed kernel by kernel.
    #[arg(long)]
    no_profile: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn config(&self) -> BenchConfig {
        let default_shape = match self.workload {
            Workload::Gemm => BenchShape::Qwen2_5_0_5b,
            _ => BenchShape::PeerTiny,
        };
        let gemms = match self.dims[..] {
            [m, n, k] => vec![GemmCase::plain("given", m, n, k)],
            _ => Vec::new(),
        };
        BenchConfig {
            workload: self.workload,
            shape: self.shape.unwrap_or(default_shape),
            steps: self.steps,
            batch: self.batch,
            seq_len: self.seq_len,
            trainable: match (self.full, self.lora) {
                (true, _) => Some(Trainable::Full),
                (_, true) => Some(Trainable::Lora),
                _ => None,
            },
            weights: self.weights.dtype(),
            profile: !self.no_profile,
            gemms,
        }
    }
}

/// Runs the benchmark, with a line per step on stderr, and prints the report.
pub fn run(options: &GpuOptions, args: &BenchArgs) -> Result<()> {
    if args.workload != Workload::Gemm && !args.dims.is_empty() {
        return Err(Error::InvalidArgument(
            "M N K are for the gemm workload".into(),
        ));
    }
    if args.dims.contains(&0) {
        return Err(Error::InvalidArgument(
            "M, N and K must be at least 1".into(),
        ));
    }
    let gpu = Gpu::with_options(options)?;
    let report = run_bench(&gpu, &args.config(), &mut |line| eprintln!("{line}"))?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::InvalidArgument(format!("writing JSON: {e}")))?;
        println!("{text}");
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &BenchReport) {
    let timing = if r.timestamps {
        "GPU time from timestamp queries"
    } else {
        "wall clock: the adapter has no timestamp queries"
    };
    println!("adapter: {} ({})", r.adapter, r.driver);
    if r.workload == Workload::Gemm {
        println!(
            "gemm, f32, median of {} runs after the first ({timing}):",
            r.runs
        );
        println!(
            "  {:18} {:>6} {:>6} {:>6} {:6} {:>10} {:>10} {:>9} {:>8}",
            "product", "M", "N", "K", "layout", "first ms", "ms", "GFLOP/s", "GB/s"
        );
        for g in &r.gemms {
            let c = &g.case;
            println!(
                "  {:18} {:>6} {:>6} {:>6} {:6} {:>10.3} {:>10.3} {:>9.2} {:>8.2}",
                c.label,
                c.m,
                c.n,
                c.k,
                c.layout(),
                g.first_ms,
                g.ms,
                g.gflops,
                g.gbytes_per_s
            );
        }
        return;
    }
    let workload = match r.workload {
        Workload::LmStep => "lm-step (cross-entropy on every token, AdamW)",
        _ => "es2-step (ES2, default objective; batches per side)",
    };
    println!(
        "{workload} at {} ({}, {} × {} tokens, {} tokens per step)",
        r.shape.name(),
        r.trainable,
        r.batch,
        r.seq_len,
        r.tokens_per_step
    );
    let each: Vec<String> = r.step_ms.iter().map(|ms| format!("{ms:.1}")).collect();
    // What a fresh process pays to build its pipelines, as a multiple of a later step.
    let startup = if r.median_step_ms > 0.0 {
        format!(
            "  ({:.1}× the median step)",
            r.first_step_ms / r.median_step_ms
        )
    } else {
        String::new()
    };
    println!(
        "  first step            {:>10.1} ms{startup}",
        r.first_step_ms
    );
    println!(
        "  step (median of {:>2})   {:>10.1} ms  [{}]",
        r.step_ms.len(),
        r.median_step_ms,
        each.join(", ")
    );
    println!("  tokens/s              {:>10.1}", r.tokens_per_s);
    if r.families.is_empty() {
        return;
    }
    println!(
        "GPU time of one more step by kernel family ({:.1} ms; each dispatch timed on its own):",
        r.profiled_step_ms
    );
    println!(
        "  {:16} {:>10} {:>10} {:>6} {:>9} {:>8}",
        "family", "dispatches", "ms", "%", "GFLOP/s", "GB/s"
    );
    let rate = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    for f in &r.families {
        println!(
            "  {:16} {:>10} {:>10.2} {:>6.1} {:>9} {:>8}",
            f.family,
            f.dispatches,
            f.ms,
            f.percent,
            rate(f.gflops),
            rate(f.gbytes_per_s)
        );
    }
}
