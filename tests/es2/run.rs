//! Whole runs on the embedded model: the output folder, merged and full-model folders that
//! load back with the same numbers, and clear errors for bad input and divergence.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use es2_wgpu::es2::{Quiet, TrainConfig, TrainObserver, Trainer};
use es2_wgpu::eval::refusal::{heldout_sample, refusal_rates};
use es2_wgpu::model::{
    open_model, Batch, LoadOptions, Output, Pass, SavePolicy, Transformer, WeightsDtype,
};
use es2_wgpu::testing::{assert_close, download, f64s, gpu, scratch_dir};
use es2_wgpu::Error;
use serde_json::Value;

fn small(out: PathBuf) -> TrainConfig {
    TrainConfig {
        out,
        steps: 3,
        eval_every: 2,
        save_every: 2,
        harmful_batch: 2,
        harmless_batch: 2,
        max_len: 32,
        eval_prompts: 4,
        base_prompts: 8,
        ..TrainConfig::for_model("tiny-llama").unwrap()
    }
}

/// The logits of one sequence.
pub(crate) fn logits(model: &Transformer, ids: &[u32]) -> Vec<f32> {
    let gpu = gpu();
    let batch = Batch::new(gpu, &[ids.to_vec()], model.config.vocab_size).unwrap();
    let out = model
        .run_now(
            gpu,
            &batch,
            &Pass::new(Output::Logits).saving(SavePolicy::BlockInputs),
        )
        .unwrap();
    download(gpu, out.logits.as_ref().unwrap())
}

/// The step lines and the evaluation lines of a metrics log.
pub(crate) fn steps_and_evaluations(lines: &[Value]) -> (Vec<&Value>, Vec<&Value>) {
    let with = |key: &str| lines.iter().filter(|v| v.get(key).is_some()).collect();
    (with("step"), with("eval_step"))
}

pub(crate) fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `curves.svg` is an SVG document that names every series, and draws the three step series
/// with a point per step and each layer's held-out distance and the held-out KL with a point
/// per evaluation.
fn check_es2_curves(path: &Path, steps: usize, evaluations: usize, layers: usize) {
    let last_layer = format!("layer {}", layers - 1);
    let labels = ["L_sep", "L_KL", "held-out KL", "layer 0", &last_layer];
    check_curves(path, &labels, &[(steps, 3), (evaluations, layers + 1)]);
}

/// `curves.svg` at `path` is an SVG document whose text holds each of `labels`, and which
/// draws `count` lines of `points` points for each `(points, count)` of `lines`.
pub(crate) fn check_curves(path: &Path, labels: &[&str], lines: &[(usize, usize)]) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    for label in labels {
        assert!(
            texts.iter().any(|t| t.contains(label)),
            "{label} missing from {texts:?}"
        );
    }
    let drawn: Vec<usize> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .count()
        })
        .collect();
    let mut want: HashMap<usize, usize> = HashMap::new();
    for &(points, count) in lines {
        *want.entry(points).or_default() += count;
    }
    for (points, count) in want {
        let found = drawn.iter().filter(|&&n| n == points).count();
        assert_eq!(found, count, "lines of {points} points in {drawn:?}");
    }
}

#[test]
fn a_lora_run_writes_metrics_checkpoints_and_a_peft_adapter_that_reloads_and_merges() {
    let gpu = gpu();
    let out = scratch_dir("run", "lora");
    let config = TrainConfig {
        merge: true,
        refusal_sample: 3,
        ..small(out.clone())
    };
    let mut trainer = Trainer::new(gpu, config, &mut Quiet).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    assert_eq!(summary.steps, 3);
    // Refusal rates before (the base model: fresh adapters change nothing) and after.
    let refusals = summary.refusals.as_ref().expect("refusal rates measured");
    let (harmful, harmless) = heldout_sample(3).unwrap();
    let (base, base_tok) = open_model(gpu, "tiny-llama", &LoadOptions::default()).unwrap();
    let replies = refusals.replies;
    let want = refusal_rates(gpu, &base, &base_tok, &harmful, &harmless, replies).unwrap();
    assert_eq!(refusals.before, want);
    assert_eq!(
        (refusals.after.harmful.total, refusals.after.harmless.total),
        (3, 3)
    );
    assert_eq!(refusals.after, trainer.measure_refusals().unwrap());

    let lines = json_lines(&out.join("metrics.jsonl"));
    let (steps, evals) = steps_and_evaluations(&lines);
    assert_eq!(steps.len(), 3);
    assert_eq!(
        evals
            .iter()
            .map(|e| e["eval_step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 2, 3]
    );
    for key in [
        "loss",
        "sep",
        "kl",
        "distance",
        "relative_distance",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ] {
        assert!(
            steps.iter().all(|s| s.get(key).is_some()),
            "metrics lines lack {key}"
        );
    }
    assert!(evals
        .iter()
        .all(|e| e["val_distance"].as_array().unwrap().len() == 4 && e["val_kl"].is_number()));
    assert!(out.join("checkpoints/step-000002/state.json").exists());
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.curves, out.join("curves.svg"));
    assert_eq!(written["curves"], summary.curves.to_string_lossy().as_ref());
    assert_eq!(written["refusals"]["sample"], 3);
    check_es2_curves(&summary.curves, 3, 3, 4);

    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["r"], 16);
    assert_eq!(adapter["target_modules"].as_array().unwrap().len(), 7);

    // The trained model, the base model with the saved adapter, and the merged folder agree.
    let ids = trainer
        .tokenizer
        .encode_prompt("How do I pick a lock?", true)
        .unwrap();
    let trained = logits(&trainer.models.tuned, &ids);
    let (mut reloaded, _) = open_model(gpu, "tiny-llama", &LoadOptions::default()).unwrap();
    reloaded.load_adapter(gpu, &out).unwrap();
    assert_close(
        "adapter reloaded",
        &logits(&reloaded, &ids),
        &f64s(&trained),
        1e-6,
    );
    let (merged, tokenizer) = open_model(
        gpu,
        &out.join("merged").to_string_lossy(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(
        tokenizer
            .encode_prompt("How do I pick a lock?", true)
            .unwrap(),
        ids
    );
    assert_close(
        "merged folder",
        &logits(&merged, &ids),
        &f64s(&trained),
        1e-5,
    );
    let (base, _) = open_model(gpu, "tiny-llama", &LoadOptions::default()).unwrap();
    let moved = es2_wgpu::testing::rel_error(&logits(&base, &ids), &f64s(&trained));
    assert!(
        moved > 1e-4,
        "training left the logits where they were ({moved:e})"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_full_fine_tuning_run_writes_a_model_folder_that_loads_back() {
    let gpu = gpu();
    let out = scratch_dir("run", "full");
    let config = TrainConfig {
        lora: None,
        steps: 2,
        save_every: 0,
        ..small(out.clone())
    };
    let mut trainer = Trainer::new(gpu, config, &mut Quiet).unwrap();
    trainer.run(&mut Quiet).unwrap();
    let ids = trainer
        .tokenizer
        .encode_prompt("Write a poem.", true)
        .unwrap();
    let (saved, _) = open_model(
        gpu,
        &out.join("model").to_string_lossy(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_close(
        "full model folder",
        &logits(&saved, &ids),
        &f64s(&logits(&trainer.models.tuned, &ids)),
        1e-6,
    );
    std::fs::remove_dir_all(out).unwrap();
}

/// Keeps the trainer's messages.
#[derive(Default)]
pub(crate) struct Messages(pub Vec<String>);

impl TrainObserver for Messages {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_owned());
    }
}

/// The losses of three steps of `config` with the frozen weights in f16 or not, and the
/// trainer's messages.
fn three_losses(config: &TrainConfig, weights_dtype: WeightsDtype) -> (Vec<f64>, Vec<String>) {
    let config = TrainConfig {
        weights_dtype,
        overwrite: true,
        ..config.clone()
    };
    let mut messages = Messages::default();
    let mut trainer = Trainer::new(gpu(), config, &mut messages).unwrap();
    let losses = (0..3).map(|_| trainer.train_step().unwrap().loss).collect();
    (losses, messages.0)
}

/// With the frozen weights in f16 (the LoRA run's base model, the full run's reference copy)
/// a run follows the f32 run closely but not exactly: the rounding (at most 2^-12 of each
/// weight) moves the activations by about 1e-3 relative (see tests/model/f16_weights.rs), and
/// with them the base statistics, the margins, the base logits and so every step's loss.
/// Differences are measured against the first loss, the objective's scale: later losses fall
/// towards the hinge's zero, where a relative difference means little. 5e-3 of that scale
/// allows for the rounding and for three AdamW steps amplifying it (measured: below 1e-3),
/// while a weight read wrongly moves the loss by far more.
#[test]
fn runs_with_f16_frozen_weights_follow_the_f32_runs() {
    let out = scratch_dir("run", "f16");
    let lora = small(out.clone());
    let full = TrainConfig {
        lora: None,
        ..lora.clone()
    };
    for (kind, config) in [("LoRA", lora), ("full", full)] {
        let (f32_losses, f32_messages) = three_losses(&config, WeightsDtype::F32);
        let (f16_losses, f16_messages) = three_losses(&config, WeightsDtype::F16);
        let scale = f32_losses[0].abs();
        for (step, (a, b)) in f16_losses.iter().zip(&f32_losses).enumerate() {
            let diff = (a - b).abs() / scale;
            eprintln!(
                "{kind} step {}: loss f16 {a:.6} f32 {b:.6}, difference {diff:.2e} of the first loss",
                step + 1
            );
            assert!(diff < 5e-3, "{kind} step {}: {a} vs {b}", step + 1);
        }
        // One line tells the memory the weights take, and that f16 saves some of it.
        let weights = |messages: &[String]| -> String {
            messages
                .iter()
                .find(|m| m.contains("on the GPU"))
                .cloned()
                .unwrap_or_default()
        };
        let (line16, line32) = (weights(&f16_messages), weights(&f32_messages));
        eprintln!("{kind}: {line16} / {line32}");
        assert!(line16.ends_with("in f16") && line32.ends_with("in f32"));
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// Runs saved before `--weights-dtype` stored the `f16-weights` flag: they resume with the
/// storage they ran with.
#[test]
fn a_saved_f16_weights_flag_reads_as_the_weights_dtype() {
    let read = |json: &str| {
        serde_json::from_str::<TrainConfig>(json)
            .unwrap()
            .weights_dtype
    };
    assert_eq!(read(r#"{"f16-weights": true}"#), WeightsDtype::F16);
    assert_eq!(read(r#"{"f16-weights": false}"#), WeightsDtype::F32);
    assert_eq!(read(r#"{"weights-dtype": "auto"}"#), WeightsDtype::Auto);
    assert_eq!(read("{}"), WeightsDtype::F32);
    let saved = TrainConfig {
        weights_dtype: WeightsDtype::F16,
        ..TrainConfig::default()
    };
    let saved = serde_json::to_value(saved).unwrap();
    assert_eq!(saved["weights-dtype"], "f16");
}

#[test]
fn an_earlier_run_is_not_overwritten_without_asking() {
    let gpu = gpu();
    let out = scratch_dir("run", "keep");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    match Trainer::new(gpu, small(out.clone()), &mut Quiet) {
        Err(err @ Error::RunExists { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("already holds a run (metrics.jsonl)") && text.contains("overwrite"),
                "{text}"
            );
        }
        other => panic!("expected RunExists, got {:?}", other.err()),
    }
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        "{\"step\": 1}\n"
    );
    let config = TrainConfig {
        overwrite: true,
        steps: 1,
        ..small(out.clone())
    };
    Trainer::new(gpu, config, &mut Quiet)
        .unwrap()
        .run(&mut Quiet)
        .unwrap();
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_datasets_name_the_file_and_the_row() {
    let gpu = gpu();
    let dir = scratch_dir("run", "data");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"instruction": "fine"}, {"question": "no prompt field"}]"#,
    )
    .unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    for (file, needle) in [(&bad, "row 2"), (&empty, "no prompts")] {
        let config = TrainConfig {
            harmful: Some(file.clone()),
            ..small(dir.join("out"))
        };
        let err = Trainer::new(gpu, config, &mut Quiet)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&*file.to_string_lossy()) && err.contains(needle),
            "{err}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn divergence_stops_with_a_numerical_error_and_no_half_written_checkpoint() {
    let gpu = gpu();
    let out = scratch_dir("run", "nan");
    let mut config = TrainConfig {
        steps: 6,
        save_every: 1,
        ..small(out.clone())
    };
    config.optimizer.lr = 1e30;
    config.optimizer.clip = 0.0;
    let mut trainer = Trainer::new(gpu, config, &mut Quiet).unwrap();
    match trainer.run(&mut Quiet) {
        Err(Error::Numerical(message)) => assert!(message.contains("not finite"), "{message}"),
        other => panic!("expected a numerical error, got {other:?}"),
    }
    // Every checkpoint on disk is complete.
    for entry in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("step-"), "leftover {name}");
        assert!(dir.join("state.json").exists() && dir.join("trainable.safetensors").exists());
    }
    std::fs::remove_dir_all(out).unwrap();
}
