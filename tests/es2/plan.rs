//! The memory plan against the buffer pool's measured peak, and activation recomputation
//! against keeping everything.
//!
//! Each memory case builds its model from a config with seeded weights on a device of its own
//! (so the pool starts empty), measures the base statistics, builds the engine, releases the
//! idle buffers as the trainer does before a step, runs one step on batches of exactly
//! `max_len` tokens (the plan's assumption), and compares `Gpu::peak_bytes` with the plan's
//! total: within 10%.

use es2_wgpu::es2::plan::{DeviceLimits, MemoryPlan};
use std::path::PathBuf;

use es2_wgpu::es2::{
    measure_base_stats, Es2Engine, ModelPair, Quiet, SftEngine, StepReport, Task, TrainConfig,
    TrainObserver, Trainer,
};
use es2_wgpu::model::{
    Batch, Config, LoadOptions, LoraConfig, SeededInit, Trainable, Transformer, WeightsDtype,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::{assert_bit_identical, scratch_dir};
use es2_wgpu::{Error, Gpu};
use serde_json::Value;

/// A Qwen2-style shape larger than the embedded models that still runs a step in seconds on
/// lavapipe: grouped-query attention, q/k/v biases, a tied 8,000-token vocabulary.
const MEDIUM: &str = r#"{
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 8000, "hidden_size": 256,
    "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": true
}"#;

/// A Llama shape with an untied 140,000-token vocabulary: 240 rows take the LM head in two
/// row chunks (192 + 48), so the plan walks `head_in_chunks` as the step runs it.
const WIDE: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "vocab_size": 140000, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "tie_word_embeddings": false
}"#;

fn tiny_llama() -> Config {
    es2_wgpu::model::embedded::find("tiny-llama")
        .unwrap()
        .config()
        .unwrap()
}

fn stories() -> Config {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Config::from_file(&dir.join("models/stories260K/config.json")).unwrap()
}

fn medium() -> Config {
    Config::from_json(MEDIUM).unwrap()
}

/// A run of `task` with LoRA rank 8 (or full fine-tuning), batches `b` (ES2: harmful and
/// harmless; SFT: conversations) of `max_len` tokens.
fn run(task: Task, lora: bool, b: [usize; 2], max_len: usize, recompute: bool) -> TrainConfig {
    TrainConfig {
        task,
        lora: lora.then(|| LoraConfig {
            rank: 8,
            ..LoraConfig::default()
        }),
        harmful_batch: b[0],
        harmless_batch: b[1],
        sft_batch: b[0],
        max_len,
        recompute,
        ..TrainConfig::default()
    }
}

/// The models of `run`: LoRA adapters on a (possibly f16) base, or a trained f32 copy with a
/// frozen one for full ES2.
fn models(gpu: &Gpu, config: &Config, run: &TrainConfig) -> ModelPair {
    let init = SeededInit { seed: 5, std: 0.05 };
    let load = |weights| {
        let options = LoadOptions::with_weights(weights);
        Transformer::from_source(gpu, config.clone(), &init, &options).unwrap()
    };
    match &run.lora {
        Some(lora) => {
            let mut tuned = load(run.weights_dtype);
            tuned.attach_lora(gpu, lora, 3).unwrap();
            ModelPair {
                tuned,
                frozen: None,
            }
        }
        None => ModelPair {
            tuned: load(WeightsDtype::F32),
            frozen: (run.task == Task::Es2).then(|| load(run.weights_dtype)),
        },
    }
}

/// `batch` seeded sequences of exactly `len` tokens; with targets, every token after the
/// first is learned.
fn batch(gpu: &Gpu, rng: &mut Rng, batch: usize, len: usize, vocab: usize, targets: bool) -> Batch {
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..len).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    if targets {
        let learned = vec![vec![true; len]; batch];
        Batch::with_targets(gpu, &ids, &learned, vocab).unwrap()
    } else {
        Batch::new(gpu, &ids, vocab).unwrap()
    }
}

/// The engine of `run` on `models`, stepped once on seeded batches: its report.
struct Stepper {
    es2: Option<(Es2Engine, Batch, Batch)>,
    sft: Option<(SftEngine, Batch)>,
}

impl Stepper {
    fn new(gpu: &Gpu, models: &ModelPair, run: &TrainConfig) -> Stepper {
        let model = &models.tuned;
        let vocab = model.config.vocab_size;
        let mut rng = Rng::new(17);
        let trainable = if run.lora.is_some() {
            Trainable::Lora
        } else {
            Trainable::Full
        };
        let dropout = run.lora.as_ref().map_or(0.0, |l| l.dropout);
        match run.task {
            Task::Es2 => {
                let h = batch(gpu, &mut rng, run.harmful_batch, run.max_len, vocab, false);
                let s = batch(gpu, &mut rng, run.harmless_batch, run.max_len, vocab, false);
                let stats = measure_base_stats(
                    gpu,
                    models.base_model(),
                    &run.objective,
                    std::slice::from_ref(&h),
                    std::slice::from_ref(&s),
                )
                .unwrap();
                let mut engine = Es2Engine::new(
                    gpu,
                    model,
                    trainable,
                    run.objective.clone(),
                    run.optimizer.clone(),
                    stats,
                    dropout,
                )
                .unwrap();
                engine.save = run.save_policy();
                Stepper {
                    es2: Some((engine, h, s)),
                    sft: None,
                }
            }
            Task::Sft => {
                let b = batch(gpu, &mut rng, run.sft_batch, run.max_len, vocab, true);
                let mut engine =
                    SftEngine::new(gpu, model, trainable, run.optimizer.clone(), dropout).unwrap();
                engine.save = run.save_policy();
                Stepper {
                    es2: None,
                    sft: Some((engine, b)),
                }
            }
        }
    }

    fn step(&mut self, gpu: &Gpu, models: &ModelPair) -> StepReport {
        if let Some((engine, h, s)) = &mut self.es2 {
            return engine.step(gpu, models, h, s, 1e-3, 9).unwrap();
        }
        let (engine, b) = self.sft.as_mut().unwrap();
        engine.step(gpu, &models.tuned, b, 1e-3, 9).unwrap()
    }

    /// Every trained tensor after the step, in the engine's order: its name, gradient and
    /// updated value.
    fn trained(&self, gpu: &Gpu, models: &ModelPair) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        let grads = match (&self.es2, &self.sft) {
            (Some((e, ..)), _) => &e.grads,
            (_, Some((e, _))) => &e.grads,
            _ => unreachable!("a stepper holds one engine"),
        };
        let read = |t: &es2_wgpu::Tensor| t.to_f32(gpu).unwrap();
        grads
            .named(&models.tuned)
            .into_iter()
            .map(|p| (p.name, read(&p.grad), read(&p.param)))
            .collect()
    }
}

/// One step of `run` on a fresh device: the pool's peak, and the plan for that device.
fn measured(config: &Config, run: &TrainConfig) -> (u64, MemoryPlan) {
    let gpu = Gpu::new().unwrap();
    let plan = MemoryPlan::new(config, run, &DeviceLimits::of(&gpu)).unwrap();
    let models = models(&gpu, config, run);
    let mut stepper = Stepper::new(&gpu, &models, run);
    gpu.trim_pool();
    gpu.reset_peak_bytes();
    stepper.step(&gpu, &models);
    (gpu.peak_bytes(), plan)
}

/// The plan's total is within 10% of the measured peak.
fn check(name: &str, config: Config, run: TrainConfig) {
    let (peak, plan) = measured(&config, &run);
    let error = (plan.total as f64 - peak as f64) / peak as f64;
    eprintln!(
        "{name}: measured {peak} B, planned {} B ({:+.1}%)\n{plan}",
        plan.total,
        100.0 * error
    );
    assert!(
        error.abs() < 0.10,
        "{name}: the plan ({} B) is {:+.1}% off the measured peak ({peak} B)",
        plan.total,
        100.0 * error
    );
}

#[test]
fn plan_matches_the_peak_of_a_tiny_llama_es2_lora_step() {
    check(
        "tiny-llama",
        tiny_llama(),
        run(Task::Es2, true, [4, 4], 64, false),
    );
    let recompute = run(Task::Es2, true, [4, 4], 64, true);
    check("tiny-llama, recompute", tiny_llama(), recompute);
}

#[test]
fn plan_matches_the_peak_of_stories260k_full_es2_and_lora_sft() {
    check(
        "stories260K full",
        stories(),
        run(Task::Es2, false, [3, 5], 40, false),
    );
    let recompute = run(Task::Es2, false, [3, 5], 40, true);
    check("stories260K full, recompute", stories(), recompute);
    let sft = run(Task::Sft, true, [6, 0], 48, true);
    check("stories260K SFT LoRA, recompute", stories(), sft);
}

#[test]
fn plan_matches_the_peak_of_a_medium_qwen2_shape() {
    let f16 = TrainConfig {
        weights_dtype: WeightsDtype::F16,
        ..run(Task::Es2, true, [4, 4], 48, false)
    };
    check("medium f16 LoRA", medium(), f16);
    let recompute = TrainConfig {
        weights_dtype: WeightsDtype::F16,
        ..run(Task::Es2, true, [4, 4], 48, true)
    };
    check("medium f16 LoRA, recompute", medium(), recompute);
    check(
        "medium SFT full",
        medium(),
        run(Task::Sft, false, [2, 0], 32, false),
    );
}

#[test]
fn plan_matches_the_peak_of_a_step_whose_lm_head_takes_two_chunks() {
    let wide = || Config::from_json(WIDE).unwrap();
    let f16 = TrainConfig {
        weights_dtype: WeightsDtype::F16,
        ..run(Task::Es2, true, [3, 5], 48, true)
    };
    check("wide f16 LoRA, recompute", wide(), f16);
    check(
        "wide SFT full",
        wide(),
        run(Task::Sft, false, [5, 0], 48, false),
    );
}

/// bf16 frozen weights: planned as f16 ones (2 bytes an element, the same buffers), named in
/// the plan, and the plan of a real LoRA step on bf16 weights within 10% of its peak (the
/// tiny-llama shape of the f32 case above, which the plan matches exactly).
#[test]
fn bf16_frozen_weights_plan_as_f16_ones_and_the_plan_names_them() {
    let with = |weights_dtype, max_len| TrainConfig {
        weights_dtype,
        ..run(Task::Es2, true, [4, 4], max_len, true)
    };
    let device = DeviceLimits::discrete_gpu(24 << 30);
    let plan = |dtype| MemoryPlan::new(&medium(), &with(dtype, 48), &device).unwrap();
    let (f16, bf16, f32) = (
        plan(WeightsDtype::F16),
        plan(WeightsDtype::Bf16),
        plan(WeightsDtype::F32),
    );
    assert_eq!(bf16.components, f16.components);
    assert_eq!(bf16.total, f16.total);
    assert!(bf16.total < f32.total);
    let shown = bf16.to_string();
    assert!(shown.contains("frozen matrices in bf16"), "{shown}");
    assert!(shown.contains("frozen weights, bf16"), "{shown}");
    assert!(f16.to_string().contains("frozen weights, f16"));
    let tiny = with(WeightsDtype::Bf16, 64);
    check("tiny-llama bf16 LoRA, recompute", tiny_llama(), tiny);
}

/// Two identical models stepped once, one keeping every activation and one recomputing:
/// the same losses, gradients and updated parameters, bit for bit.
fn recompute_changes_nothing(config: Config, run: TrainConfig) {
    let gpu = es2_wgpu::testing::gpu();
    let mut results = Vec::new();
    for recompute in [false, true] {
        let run = TrainConfig {
            recompute,
            ..run.clone()
        };
        let models = models(gpu, &config, &run);
        let mut stepper = Stepper::new(gpu, &models, &run);
        let report = stepper.step(gpu, &models);
        results.push((report, stepper.trained(gpu, &models)));
    }
    let (kept, recomputed) = (&results[0], &results[1]);
    assert_eq!(kept.0.loss.to_bits(), recomputed.0.loss.to_bits(), "loss");
    assert_eq!(kept.0.grad_norm.to_bits(), recomputed.0.grad_norm.to_bits());
    assert!(kept.0.grad_norm > 0.0, "the step has a gradient to compare");
    assert_eq!(kept.1.len(), recomputed.1.len());
    for ((name, grad, value), (_, grad2, value2)) in kept.1.iter().zip(&recomputed.1) {
        assert_bit_identical(&format!("{name}'s gradient"), grad, grad2);
        assert_bit_identical(&format!("{name} after the update"), value, value2);
    }
}

#[test]
fn recomputation_gives_the_same_es2_step_with_dropout() {
    let lora = LoraConfig {
        rank: 4,
        dropout: 0.1,
        ..LoraConfig::default()
    };
    let run = TrainConfig {
        lora: Some(lora),
        ..run(Task::Es2, true, [3, 2], 20, false)
    };
    recompute_changes_nothing(stories(), run);
    recompute_changes_nothing(stories(), run_full_es2_on_some_layers());
}

fn run_full_es2_on_some_layers() -> TrainConfig {
    let mut run = run(Task::Es2, false, [2, 3], 17, false);
    run.objective.layers = vec![1, 3];
    run
}

#[test]
fn recomputation_gives_the_same_sft_step() {
    recompute_changes_nothing(stories(), run(Task::Sft, true, [3, 0], 21, false));
    recompute_changes_nothing(stories(), run(Task::Sft, false, [2, 0], 19, false));
}

/// Collects the run's messages.
#[derive(Default)]
struct Messages(Vec<String>);

impl TrainObserver for Messages {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_owned());
    }
}

/// A short tiny-llama run whose prompts are all longer than `max_len` (they keep their last
/// 12 tokens), so that every step has the planned shapes.
fn short_run(out: PathBuf) -> TrainConfig {
    TrainConfig {
        out,
        steps: 2,
        eval_every: 0,
        save_every: 0,
        harmful_batch: 3,
        harmless_batch: 3,
        max_len: 12,
        eval_prompts: 3,
        base_prompts: 6,
        ..TrainConfig::for_model("tiny-llama").unwrap()
    }
}

#[test]
fn a_run_reports_its_peak_beside_the_plan_it_made() {
    let gpu = Gpu::new().unwrap();
    let out = scratch_dir("plan", "peak");
    let mut trainer = Trainer::new(&gpu, short_run(out.clone()), &mut Quiet).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    let error =
        (summary.planned_bytes as f64 - summary.peak_bytes as f64) / summary.peak_bytes as f64;
    eprintln!(
        "run: peak {} B, planned {} B ({:+.1}%)",
        summary.peak_bytes,
        summary.planned_bytes,
        100.0 * error
    );
    assert!(error.abs() < 0.10, "planned {summary:?}");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["peak_bytes"], summary.peak_bytes);
    assert_eq!(written["planned_bytes"], summary.planned_bytes);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let peaks: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("peak_bytes").and_then(Value::as_u64))
        .collect();
    assert_eq!(peaks.len(), 2, "one peak per step line");
    assert!(peaks.iter().all(|&p| p > 0 && p <= summary.peak_bytes));
    let _ = std::fs::remove_dir_all(&out);
}

/// The default model's own run (prompts of many lengths, up to its `max_len`), cut to three
/// steps with the refusal rates off (generation is outside the plan): neither the setup (the
/// base statistics over prompts of many lengths), an evaluation nor a step takes more than the
/// plan, which assumes every prompt at `max_len`.
#[test]
fn the_default_run_stays_within_its_plan() {
    let gpu = Gpu::new().unwrap();
    let out = scratch_dir("plan", "default");
    let config = TrainConfig {
        out: out.clone(),
        steps: 3,
        eval_every: 0,
        save_every: 0,
        refusal_sample: 0,
        ..TrainConfig::for_model(es2_wgpu::model::embedded::DEFAULT).unwrap()
    };
    let mut trainer = Trainer::new(&gpu, config, &mut Quiet).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    eprintln!(
        "default run: peak {} B, planned {} B",
        summary.peak_bytes, summary.planned_bytes
    );
    assert!(summary.peak_bytes > 0);
    assert!(
        summary.peak_bytes <= summary.planned_bytes,
        "the default run peaked at {} B, above its plan of {} B",
        summary.peak_bytes,
        summary.planned_bytes
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_run_that_fits_only_with_recomputation_turns_it_on_and_says_so() {
    let gpu = Gpu::new().unwrap();
    let out = scratch_dir("plan", "auto-recompute");
    let config = short_run(out.clone());
    let model = tiny_llama();
    let device = DeviceLimits::of(&gpu);
    let plan = |recompute| {
        let run = TrainConfig {
            recompute,
            ..config.clone()
        };
        MemoryPlan::new(&model, &run, &device).unwrap().total
    };
    let (kept, recomputed) = (plan(false), plan(true));
    assert!(recomputed < kept);
    let config = TrainConfig {
        gpu_memory: Some((kept + recomputed) / 2),
        ..config
    };
    let mut messages = Messages::default();
    let mut trainer = Trainer::new(&gpu, config, &mut messages).unwrap();
    assert!(trainer.config.recompute);
    assert!(
        messages
            .0
            .iter()
            .any(|m| m.contains("activation recomputation is on")),
        "{:?}",
        messages.0
    );
    let summary = trainer.run(&mut Quiet).unwrap();
    assert_eq!(summary.planned_bytes, recomputed);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_run_that_cannot_fit_fails_before_anything_loads() {
    let gpu = Gpu::new().unwrap();
    // The folder has a config.json and nothing else: loading would fail on the tokenizer.
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/configs/llama-3-8b-instruct");
    let config = TrainConfig {
        model: model.to_string_lossy().into_owned(),
        gpu_memory: Some(16 << 30),
        max_len: 256,
        ..short_run(scratch_dir("plan", "cannot-fit"))
    };
    let started = std::time::Instant::now();
    let error = Trainer::new(&gpu, config, &mut Quiet).err().unwrap();
    eprintln!("refused in {:.3} s", started.elapsed().as_secs_f64());
    let Error::DoesNotFit { message } = &error else {
        panic!("expected DoesNotFit, got {error}");
    };
    for wanted in [
        "16.00 GiB",
        "memory plan",
        "--recompute",
        // Llama-3's checkpoint is bf16: the advice keeps it so.
        "--weights-dtype bf16",
    ] {
        assert!(message.contains(wanted), "{wanted} missing from: {message}");
    }
}
