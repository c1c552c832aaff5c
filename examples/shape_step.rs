//! One ES2 LoRA step at a real model's shape, with bf16 frozen weights and recomputation,
//! written out so that PyTorch can check it (`scripts/check_shape_step.py`) and measured
//! against the memory plan.
//!
//! The model is built from a `--shape` config (`es2::bench::BenchShape`) with seeded weights:
//! no download. Norm weights and biases are drawn too (not left at 1 and 0), and every value
//! is rounded to bf16, so the folder holds the model exactly. `--out DIR` receives:
//!
//! - `model/`: a Hugging Face folder, `config.json` (`torch_dtype` bfloat16) and
//!   `model.safetensors` with every tensor in bf16;
//! - `adapter/`: a PEFT LoRA adapter (rank 16, alpha 16, every projection) with B nonzero, so
//!   that the KL and every gradient are nonzero at the first step;
//! - `prompts.json`: the seeded token-id prompts of both sides and the objective's options;
//! - `result.json`: the base constants (ν_l, D_l(base), m_l), the step's loss, L_sep, L_KL,
//!   D_l and pre-clip gradient norm, the measured GPU peak beside the memory plan, wall times;
//! - `grads.safetensors`: the step's LoRA gradients (f32, PEFT names).
//!
//! What runs is what torch reads: the folder and the adapter are loaded back from disk
//! (`WeightsDtype::Bf16`) before the step. The step runs with `SavePolicy::BlockInputs`
//! (`--recompute`); the peak is `Gpu::peak_bytes` over the step after `trim_pool` and
//! `reset_peak_bytes`, as `tests/es2/plan.rs` measures it.
//!
//! ```sh
//! cargo run --release --example shape_step -- --shape qwen2.5-0.5b --out target/shape-steps/qwen2.5-0.5b
//! cargo run --release --example shape_step -- --shape llama-3-1b --out target/shape-steps/llama-3-1b --batch 2 --max-len 64
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use es2_wgpu::es2::bench::BenchShape;
use es2_wgpu::es2::plan::{DeviceLimits, MemoryPlan};
use es2_wgpu::es2::{
    measure_base_stats, Es2Config, Es2Engine, ModelPair, OptimizerConfig, TrainConfig,
};
use es2_wgpu::io::{write_json, write_safetensors, SaveTensor};
use es2_wgpu::model::{
    Batch, LoadOptions, LoraConfig, ParamSource, SeededInit, Trainable, Transformer, WeightsDtype,
};
use es2_wgpu::ops::cast::cast;
use es2_wgpu::rng::Rng;
use es2_wgpu::{DType, Error, Gpu, Recorder, Result, Tensor};
use serde_json::json;

struct Args {
    shape: BenchShape,
    out: PathBuf,
    batch: usize,
    max_len: usize,
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: shape_step --shape NAME --out DIR [--batch N] [--max-len T] [--seed S]";
    let mut shape = None;
    let mut out = None;
    let (mut batch, mut max_len, mut seed) = (2, 64, 7);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| Error::InvalidArgument(format!("{arg} takes a value; {usage}")))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| Error::InvalidArgument(format!("{arg} takes a number, not {v}")))
        };
        match arg.as_str() {
            "--shape" => {
                shape = Some(BenchShape::from_name(&value).ok_or_else(|| {
                    let names: Vec<&str> = BenchShape::ALL.iter().map(|s| s.name()).collect();
                    Error::InvalidArgument(format!(
                        "unknown shape {value}; one of {}",
                        names.join(", ")
                    ))
                })?)
            }
            "--out" => out = Some(PathBuf::from(value)),
            "--batch" => batch = number(&value)?,
            "--max-len" => max_len = number(&value)?,
            "--seed" => seed = number(&value)? as u64,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown flag {arg}; {usage}"
                )))
            }
        }
    }
    let missing = |flag: &str| Error::InvalidArgument(format!("{flag} is required; {usage}"));
    if batch == 0 || max_len < 2 {
        return Err(Error::InvalidArgument(
            "--batch must be at least 1 and --max-len at least 2".into(),
        ));
    }
    Ok(Args {
        shape: shape.ok_or_else(|| missing("--shape"))?,
        out: out.ok_or_else(|| missing("--out"))?,
        batch,
        max_len,
        seed,
    })
}

/// Standard deviation of the adapters' B entries (PEFT would start them at 0).
const LORA_B_STD: f64 = 0.02;

/// `SeededInit`'s matrices (N(0, 0.02²)), norm weights 1 + N(0, 0.1²) and biases N(0, 0.02²)
/// instead of 1 and 0, every value rounded to bf16.
struct Bf16Init(SeededInit);

impl ParamSource for Bf16Init {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>> {
        let vector = name.ends_with("norm.weight") || name.ends_with(".bias");
        let mut values = if vector {
            // FNV-1a of the name, as SeededInit streams its matrices.
            let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            let mut rng = Rng::new(hash ^ self.0.seed);
            let all = rng.normal_vec(shape[0], 1.0);
            let (offset, std) = if name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else {
                (0.0, 0.02)
            };
            all[rows]
                .iter()
                .map(|&x| offset + std * x)
                .collect::<Vec<f32>>()
        } else {
            self.0.rows(name, shape, rows)?
        };
        for x in &mut values {
            *x = half::bf16::from_f32(*x).to_f32();
        }
        Ok(values)
    }
}

/// Writes `model` (no adapters) as a Hugging Face folder with every tensor in bf16: the
/// matrices as they are stored, the norms and biases narrowed (exactly: they hold bf16
/// values).
fn write_bf16_folder(gpu: &Gpu, model: &Transformer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = json!("bfloat16");
    write_json(&dir.join("config.json"), &config)?;
    let mut rec = Recorder::new(gpu);
    let mut tensors = Vec::new();
    for (name, tensor) in model.hf_tensors(gpu) {
        let tensor = match tensor {
            SaveTensor::Device { gpu, tensor } if tensor.dtype() == DType::F32 => {
                let narrow = Tensor::empty(gpu, tensor.shape().clone(), DType::BF16);
                cast(&mut rec, &tensor, &narrow);
                SaveTensor::Device {
                    gpu,
                    tensor: narrow,
                }
            }
            SaveTensor::Device { tensor, .. } if tensor.dtype() != DType::BF16 => {
                return Err(Error::InvalidArgument(format!(
                    "{name} is stored in {}, not bf16",
                    tensor.dtype()
                )))
            }
            SaveTensor::Chunks { chunks, .. }
                if chunks.iter().any(|c| c.dtype() != DType::BF16) =>
            {
                return Err(Error::InvalidArgument(format!("{name} is not in bf16")))
            }
            other => other,
        };
        tensors.push((name, tensor));
    }
    rec.finish()?;
    let metadata = [("format".to_owned(), "pt".to_owned())].into();
    write_safetensors(&dir.join("model.safetensors"), tensors, Some(metadata))
}

/// `count` seeded prompts: the first exactly `max_len` tokens (so the batch has the planned
/// length), the others between half and all of it (right padding), ids in `3..vocab`.
fn prompts(rng: &mut Rng, count: usize, max_len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| {
            let len = if i == 0 {
                max_len
            } else {
                max_len / 2 + rng.below(max_len - max_len / 2 + 1)
            };
            (0..len)
                .map(|_| (3 + rng.below(vocab - 3)) as u32)
                .collect()
        })
        .collect()
}

fn seconds_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn main() -> Result<()> {
    es2_wgpu::gpu::quiet_headless_vulkan();
    let args = parse_args()?;
    let gpu = Gpu::new()?;
    let config = args.shape.config()?;
    let vocab = config.vocab_size;
    let (model_dir, adapter_dir) = (args.out.join("model"), args.out.join("adapter"));
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let bf16 = LoadOptions::with_weights(WeightsDtype::Bf16);
    let lora = LoraConfig::default();

    // The folder and the adapter, from the config and seeds alone.
    let started = Instant::now();
    {
        let init = Bf16Init(SeededInit {
            seed: args.seed,
            std: 0.02,
        });
        let mut model = Transformer::from_source(&gpu, config.clone(), &init, &bf16)?;
        write_bf16_folder(&gpu, &model, &model_dir)?;
        model.attach_lora(&gpu, &lora, args.seed)?;
        let mut rng = Rng::new(args.seed ^ 0xb);
        for block in &mut model.blocks {
            for (_, linear) in block.proj.iter_mut() {
                if let Some(adapter) = &mut linear.lora {
                    let dims = adapter.b.dims().to_vec();
                    let values = rng.normal_vec(dims[0] * dims[1], LORA_B_STD);
                    adapter.b = Tensor::from_f32(&gpu, [dims[0], dims[1]], &values)?;
                }
            }
        }
        model.save_adapter(&gpu, &adapter_dir, &lora, "model")?;
    }
    gpu.trim_pool();
    let write_s = seconds_since(started);

    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let harmful_ids = prompts(&mut rng, args.batch, args.max_len, vocab);
    let harmless_ids = prompts(&mut rng, args.batch, args.max_len, vocab);
    let objective = Es2Config::default();
    let layers = objective.resolved_layers(config.num_hidden_layers)?;
    // The objective in make_training_fixtures.py's terms (ARCHITECTURE.md's defaults).
    let objective_json = json!({
        "layers": layers, "pool": "last", "pair": "centroid", "distance": "l2",
        "shape": "hinge", "margin": objective.margin, "margin_abs": null,
        "harmful_only": false, "lambda": objective.lambda,
        "temperature": objective.temperature, "kl_dir": "forward",
    });
    write_json(
        &args.out.join("prompts.json"),
        &json!({
            "shape": args.shape.name(),
            "harmful": harmful_ids,
            "harmless": harmless_ids,
            "objective": objective_json,
            "lora": {"r": lora.rank, "alpha": lora.alpha, "b_std": LORA_B_STD},
            "seed": args.seed,
        }),
    )?;

    // What torch reads, loaded back.
    let started = Instant::now();
    let mut model = Transformer::load(&gpu, &model_dir, &bf16)?;
    let loaded = model.load_adapter(&gpu, &adapter_dir)?;
    let load_s = seconds_since(started);
    let weights_bytes = gpu.allocated_bytes();
    let parameters = config.parameter_count();

    let run = TrainConfig {
        harmful_batch: args.batch,
        harmless_batch: args.batch,
        max_len: args.max_len,
        weights_dtype: WeightsDtype::Bf16,
        recompute: true,
        lora: Some(loaded),
        objective: objective.clone(),
        ..TrainConfig::default()
    };
    let plan = MemoryPlan::new(&config, &run, &DeviceLimits::of(&gpu))?;

    let harmful = Batch::new(&gpu, &harmful_ids, vocab)?;
    let harmless = Batch::new(&gpu, &harmless_ids, vocab)?;
    let started = Instant::now();
    let stats = measure_base_stats(
        &gpu,
        &model,
        &objective,
        std::slice::from_ref(&harmful),
        std::slice::from_ref(&harmless),
    )?;
    let base_s = seconds_since(started);
    let base = json!({
        "nu": stats.nu, "base_distance": stats.distance, "margin": stats.margin,
    });
    let optimizer = OptimizerConfig::default();
    let lr = optimizer.lr;
    let mut engine = Es2Engine::new(
        &gpu,
        &model,
        Trainable::Lora,
        objective,
        optimizer,
        stats,
        0.0,
    )?;
    engine.save = run.save_policy();
    let models = ModelPair {
        tuned: model,
        frozen: None,
    };
    gpu.trim_pool();
    gpu.reset_peak_bytes();
    let started = Instant::now();
    let report = engine.step(&gpu, &models, &harmful, &harmless, lr, 0)?;
    let step_s = seconds_since(started);
    let peak = gpu.peak_bytes();
    let terms = report
        .es2()
        .ok_or_else(|| Error::InvalidArgument("an ES2 step without ES2 terms".into()))?;

    let named = engine.grads.named(&models.tuned);
    let lora_parameters: usize = named.iter().map(|p| p.grad.numel()).sum();
    let grads: Vec<(String, SaveTensor)> = named
        .into_iter()
        .map(|p| {
            let tensor = SaveTensor::Device {
                gpu: &gpu,
                tensor: p.grad,
            };
            (p.name, tensor)
        })
        .collect();
    write_safetensors(&args.out.join("grads.safetensors"), grads, None)?;

    let ratio = plan.total as f64 / peak as f64;
    let tokens = harmful.tokens() + harmless.tokens();
    let result = json!({
        "shape": args.shape.name(),
        "device": gpu.info().name,
        "parameters": parameters,
        "lora_parameters": lora_parameters,
        "batch": args.batch,
        "max_len": args.max_len,
        "tokens": tokens,
        "weights_dtype": "bf16",
        "recompute": true,
        "base": base,
        "step0": {
            "loss": report.loss,
            "sep": terms.sep,
            "kl": terms.kl,
            "distance": terms.distance,
            "grad_norm": report.grad_norm,
        },
        "memory": {
            "weights_and_adapters_bytes": weights_bytes,
            "peak_bytes": peak,
            "planned_bytes": plan.total,
            "planned_over_measured": ratio,
            "plan": plan,
        },
        "seconds": {"build_and_write": write_s, "load": load_s, "base_stats": base_s, "step": step_s},
    });
    write_json(&args.out.join("result.json"), &result)?;

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{} ({}), {} parameters, bf16 weights, recompute, {} + {} prompts of <= {} tokens",
        args.shape.name(),
        gpu.info().name,
        parameters,
        args.batch,
        args.batch,
        args.max_len
    );
    println!(
        "step 0: loss {:.6}  L_sep {:.6}  L_KL {:.6}  grad norm {:.6}",
        report.loss, terms.sep, terms.kl, report.grad_norm
    );
    println!(
        "peak {:.1} MiB ({peak} B), plan {:.1} MiB ({} B): plan/peak {:.4} ({:+.2}%)",
        mib(peak),
        mib(plan.total),
        plan.total,
        ratio,
        100.0 * (ratio - 1.0)
    );
    println!("{plan}");
    println!(
        "seconds: build+write {write_s:.1}, load {load_s:.1}, base stats {base_s:.1}, step {step_s:.1}"
    );
    println!("wrote {}", args.out.display());
    Ok(())
}
