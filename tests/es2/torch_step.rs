//! The engine's training steps against the state files `scripts/make_training_fixtures.py`
//! computed with torch + transformers + peft for the same objective: losses, per-layer
//! distances, gradient norms, the step-1 gradients and the parameters after every step.

use std::path::PathBuf;

use es2_wgpu::es2::{measure_base_stats, Es2Config, Es2Engine, ModelPair, OptimizerConfig};
use es2_wgpu::model::{Batch, Checkpoint, LoadOptions, NamedParam, Trainable, Transformer};
use es2_wgpu::ops::kl::KlDirection;
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::ops::separation::{Distance, LossShape, Pair};
use es2_wgpu::testing::{download, gpu, rel_error};
use serde_json::Value;

pub(super) const TOL: f64 = 1e-4;

pub(super) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).expect("prompt id lists")
}

fn objective(o: &Value) -> Es2Config {
    let s = |k: &str| o[k].as_str().unwrap_or_else(|| panic!("objective.{k}"));
    Es2Config {
        layers: serde_json::from_value(o["layers"].clone()).unwrap(),
        pool: match s("pool") {
            "last" => Pool::Last,
            _ => Pool::Mean,
        },
        pair: match s("pair") {
            "centroid" => Pair::Centroid,
            "pairwise" => Pair::Pairwise,
            _ => Pair::BaseCentroid,
        },
        distance: match s("distance") {
            "l2" => Distance::L2,
            "sq-l2" => Distance::SqL2,
            _ => Distance::Cosine,
        },
        shape: if s("shape") == "hinge" {
            LossShape::Hinge
        } else {
            LossShape::Neg
        },
        margin: o["margin"].as_f64().unwrap() as f32,
        margin_abs: o["margin_abs"].as_f64().map(|m| m as f32),
        harmful_only: o["harmful_only"].as_bool().unwrap(),
        lambda: o["lambda"].as_f64().unwrap() as f32,
        temperature: o["temperature"].as_f64().unwrap() as f32,
        kl_dir: if s("kl_dir") == "forward" {
            KlDirection::Forward
        } else {
            KlDirection::Reverse
        },
    }
}

pub(super) fn optimizer(o: &Value) -> OptimizerConfig {
    OptimizerConfig {
        lr: o["lr"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        clip: o["clip"].as_f64().unwrap(),
        ..OptimizerConfig::default()
    }
}

#[track_caller]
pub(super) fn close_scalar(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-30);
    eprintln!("rel-error {what}: {err:.3e} (got {got:.7e}, torch {want:.7e})");
    assert!(
        err <= tol,
        "{what}: {got} vs torch {want} ({err:.2e} > {tol:.0e})"
    );
}

#[track_caller]
pub(super) fn close_vec(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = rel_error(got, want);
    eprintln!("rel-error {what}: {err:.3e}");
    assert!(
        err <= tol,
        "{what}: ||out-ref||/||ref|| = {err:.2e} > {tol:.0e}"
    );
}

pub(super) fn as_f64(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn run_case(case: &str) {
    let gpu = gpu();
    let (spec, expected, models) = load_case(case);
    let lora = models.frozen.is_none();
    let model = &models.tuned;
    let config = objective(&spec["objective"]);
    let vocab = model.config.vocab_size;
    let harmful = Batch::new(gpu, &ids(&spec["harmful"]), vocab).unwrap();
    let harmless = Batch::new(gpu, &ids(&spec["harmless"]), vocab).unwrap();

    let stats = measure_base_stats(
        gpu,
        models.base_model(),
        &config,
        std::slice::from_ref(&harmful),
        std::slice::from_ref(&harmless),
    )
    .unwrap();
    let base = &spec["base"];
    close_vec(&format!("{case} nu"), &stats.nu, &as_f64(&base["nu"]), TOL);
    close_vec(
        &format!("{case} base distance"),
        &stats.distance,
        &as_f64(&base["base_distance"]),
        TOL,
    );
    if config.shape == LossShape::Hinge {
        close_vec(
            &format!("{case} margin"),
            &stats.margin,
            &as_f64(&base["margin"]),
            TOL,
        );
    }
    if config.pair == Pair::BaseCentroid {
        let shape = expected.shape("base.centroid").unwrap().to_vec();
        let want: Vec<f64> = expected
            .load_f32("base.centroid", &shape)
            .unwrap()
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        close_vec(
            &format!("{case} base centroid"),
            &stats.centroid,
            &want,
            TOL,
        );
    }

    let trainable = if lora {
        Trainable::Lora
    } else {
        Trainable::Full
    };
    let mut engine = Es2Engine::new(
        gpu,
        model,
        trainable,
        config,
        optimizer(&spec["optimizer"]),
        stats,
        0.0,
    )
    .unwrap();
    let lr = spec["optimizer"]["lr"].as_f64().unwrap();
    for (k, want) in spec["steps"].as_array().unwrap().iter().enumerate() {
        let step = k + 1;
        let got = engine
            .step(gpu, &models, &harmful, &harmless, lr, 0)
            .unwrap();
        let v = got.es2().expect("an ES2 step reports ES2 terms");
        close_scalar(
            &format!("{case} step {step} loss"),
            got.loss,
            want["loss"].as_f64().unwrap(),
            TOL,
        );
        close_scalar(
            &format!("{case} step {step} sep"),
            v.sep,
            want["sep"].as_f64().unwrap(),
            TOL,
        );
        let kl = want["kl"].as_f64().unwrap();
        if kl == 0.0 {
            assert!(
                v.kl.abs() < 1e-7,
                "{case}: KL {} where torch has exactly 0",
                v.kl
            );
        } else {
            close_scalar(&format!("{case} step {step} kl"), v.kl, kl, TOL);
        }
        close_vec(
            &format!("{case} step {step} distance"),
            &v.distance,
            &as_f64(&want["distance"]),
            TOL,
        );
        close_scalar(
            &format!("{case} step {step} grad norm"),
            got.grad_norm,
            want["grad_norm"].as_f64().unwrap(),
            TOL,
        );

        compare_tensors(case, step, &expected, &engine.grads.named(model));
    }
}

/// A fixture case: its JSON spec, its stored tensors, and the model it starts from (the LoRA
/// case with the stored initial adapter, the full case with a frozen copy beside it).
pub(super) fn load_case(case: &str) -> (Value, Checkpoint, ModelPair) {
    let gpu = gpu();
    let dir = fixtures().join("training");
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let expected = Checkpoint::open_file(&dir.join(format!("{case}.safetensors"))).unwrap();
    let model_dir = fixtures().join(spec["model"].as_str().unwrap());
    let load = || Transformer::load(gpu, &model_dir, &LoadOptions::default()).unwrap();
    let mut model = load();
    let frozen = if spec["mode"] == "lora" {
        model
            .load_adapter(gpu, &dir.join(format!("{case}.adapter")))
            .unwrap();
        None
    } else {
        Some(load())
    };
    let models = ModelPair {
        tuned: model,
        frozen,
    };
    (spec, expected, models)
}

/// Compares the trained tensors the fixture stores for `step` (`grad.*` and `step1.*` after
/// the first step, `step<k>.*` after step k) and fails when none is stored.
pub(super) fn compare_tensors(
    case: &str,
    step: usize,
    expected: &Checkpoint,
    named: &[NamedParam],
) {
    let gpu = gpu();
    let mut compared = 0;
    let step_key = format!("step{step}");
    let kinds: &[&str] = if step == 1 {
        &["grad", "step1"]
    } else {
        &[&step_key]
    };
    for p in named {
        for &kind in kinds {
            let key = format!("{kind}.{}", p.name);
            if !expected.contains(&key) {
                continue;
            }
            let tensor = if kind == "grad" { &p.grad } else { &p.param };
            let want: Vec<f64> = expected
                .load_f32(&key, tensor.dims())
                .unwrap()
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            close_vec(&format!("{case} {key}"), &download(gpu, tensor), &want, TOL);
            compared += 1;
        }
    }
    assert!(compared > 0, "{case} step {step}: no tensor compared");
}

#[test]
fn lora_centroid_l2_hinge_matches_torch() {
    run_case("lora-centroid-l2-hinge");
}

#[test]
fn full_pairwise_sq_l2_neg_harmful_only_reverse_kl_matches_torch() {
    run_case("full-pairwise-sqL2-neg");
}

#[test]
fn lora_base_centroid_cosine_hinge_with_clipping_matches_torch() {
    run_case("lora-basecentroid-cosine-hinge");
}

#[test]
fn lora_pairwise_l2_neg_mean_pool_matches_torch() {
    run_case("lora-pairwise-l2-neg-mean");
}
