//! GPU memory of one ES2 LoRA training step: the buffer pool's high-water mark over the step,
//! beside what the weights alone take and what the memory plan predicted. The model is built
//! from a config with seeded weights (no download) and the prompts are seeded random token ids
//! of exactly `--max-len` tokens, so the numbers depend only on the shape.
//!
//! ```sh
//! cargo run --release --example step_memory -- tiny-llama
//! cargo run --release --example step_memory -- qwen2.5-0.5b --batch 4 --max-len 64 --f16 --recompute
//! ```

use es2_wgpu::es2::bench::BenchShape;
use es2_wgpu::es2::plan::{DeviceLimits, MemoryPlan};
use es2_wgpu::es2::{
    measure_base_stats, Es2Config, Es2Engine, ModelPair, OptimizerConfig, TrainConfig,
};
use es2_wgpu::model::{
    Batch, Config, LoadOptions, LoraConfig, SeededInit, Trainable, Transformer, WeightsDtype,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::{Error, Gpu, Result};

struct Args {
    model: String,
    batch: usize,
    max_len: usize,
    f16: bool,
    recompute: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: "tiny-llama".into(),
        batch: 4,
        max_len: 64,
        f16: false,
        recompute: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| -> Result<usize> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::InvalidArgument(format!("{flag} takes a number")))
        };
        match arg.as_str() {
            "--batch" => args.batch = value("--batch")?,
            "--max-len" => args.max_len = value("--max-len")?,
            "--f16" => args.f16 = true,
            "--recompute" => args.recompute = true,
            name => args.model = name.to_owned(),
        }
    }
    Ok(args)
}

fn config_for(name: &str) -> Result<Config> {
    match name {
        "qwen2.5-0.5b" => BenchShape::Qwen2_5_0_5b.config(),
        other => es2_wgpu::model::embedded::find(other)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown shape {other}")))?
            .config(),
    }
}

fn random_batch(gpu: &Gpu, rng: &mut Rng, args: &Args, vocab: usize) -> Result<Batch> {
    let sequences: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.max_len)
                .map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32)
                .collect()
        })
        .collect();
    Batch::new(gpu, &sequences, vocab)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let gpu = Gpu::new()?;
    let config = config_for(&args.model)?;
    let vocab = config.vocab_size;
    let weights = if args.f16 {
        WeightsDtype::F16
    } else {
        WeightsDtype::F32
    };
    let run = TrainConfig {
        harmful_batch: args.batch,
        harmless_batch: args.batch,
        max_len: args.max_len,
        weights_dtype: weights,
        recompute: args.recompute,
        ..TrainConfig::default()
    };
    let plan = MemoryPlan::new(&config, &run, &DeviceLimits::of(&gpu))?;
    let options = LoadOptions::with_weights(weights);
    let init = SeededInit { seed: 7, std: 0.02 };
    let mut model = Transformer::from_source(&gpu, config, &init, &options)?;
    model.attach_lora(&gpu, &LoraConfig::default(), 0)?;
    let weights = gpu.allocated_bytes();

    let mut rng = Rng::new(11);
    let harmful = random_batch(&gpu, &mut rng, &args, vocab)?;
    let harmless = random_batch(&gpu, &mut rng, &args, vocab)?;
    let objective = Es2Config::default();
    let stats = measure_base_stats(
        &gpu,
        &model,
        &objective,
        std::slice::from_ref(&harmful),
        std::slice::from_ref(&harmless),
    )?;
    let mut engine = Es2Engine::new(
        &gpu,
        &model,
        Trainable::Lora,
        objective,
        OptimizerConfig::default(),
        stats,
        0.0,
    )?;
    engine.save = run.save_policy();
    gpu.trim_pool();
    gpu.reset_peak_bytes();
    let before_step = gpu.allocated_bytes();
    let started = std::time::Instant::now();
    let models = ModelPair {
        tuned: model,
        frozen: None,
    };
    let report = engine.step(&gpu, &models, &harmful, &harmless, 1e-4, 1)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = gpu.peak_bytes();
    println!(
        "{} ({}), batches {} + {} x {} tokens, f16 weights: {}, recompute: {}",
        args.model,
        gpu.info().name,
        args.batch,
        args.batch,
        args.max_len,
        args.f16,
        args.recompute
    );
    println!("weights + adapters:           {:10.1} MiB", mib(weights));
    println!(
        "allocated before the step:    {:10.1} MiB",
        mib(before_step)
    );
    println!("peak during the step:         {:10.1} MiB", mib(peak));
    println!(
        "peak beyond the weights:      {:10.1} MiB",
        mib(peak.saturating_sub(weights))
    );
    let error = 100.0 * (plan.total as f64 / peak as f64 - 1.0);
    println!(
        "planned peak:                 {:10.1} MiB ({error:+.2}%; {} B measured, {} B planned)",
        mib(plan.total),
        peak,
        plan.total
    );
    println!("{plan}");
    println!("step: loss {:.6}, {:.1} s", report.loss, seconds);
    Ok(())
}
