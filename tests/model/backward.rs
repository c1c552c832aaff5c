//! The model backward against directional finite differences of the GPU forward: for a
//! random direction δ in parameter space, (L(θ+εδ) − L(θ−εδ)) / 2ε ≈ ∇L·δ. The exact
//! comparison against PyTorch lives in the training tests; this checks every parameter kind
//! (LoRA and full) and every seed kind (logits, hidden states, the final-norm output).

use es2_wgpu::model::{
    Batch, Gradients, LoadOptions, LoraConfig, Output, Pass, SavePolicy, Seeds, Trainable,
    Transformer, WeightsDtype,
};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::{download, gpu, randn, upload};
use es2_wgpu::{Recorder, Tensor};

use crate::fixtures::model_dir;

/// L = Σ w_logits·logits + Σ_i Σ w_i·hidden_states[i], with fixed random weights.
struct Probe {
    batch: Batch,
    w_logits: Tensor,
    w_hidden: Vec<(usize, Tensor)>,
}

fn probe(model: &Transformer, seed: u64) -> Probe {
    let gpu = gpu();
    let sequences = vec![vec![5, 9, 44, 101, 7, 250, 3], vec![17, 2, 200, 66]];
    let batch = Batch::new(gpu, &sequences, model.config.vocab_size).unwrap();
    let rows = batch.rows();
    let (c, v) = (model.config.hidden_size, model.config.vocab_size);
    // Padding rows carry no loss, as in training.
    let mask = batch.position_mask();
    let masked = |mut w: Vec<f32>, width: usize| {
        for (r, &m) in mask.iter().enumerate() {
            if m == 0 {
                w[r * width..(r + 1) * width].fill(0.0);
            }
        }
        w
    };
    let w_logits = upload(gpu, [rows, v], &masked(randn(seed, rows * v, 1.0), v));
    let w_hidden = [1usize, model.layers()]
        .iter()
        .map(|&i| {
            (
                i,
                upload(
                    gpu,
                    [rows, c],
                    &masked(randn(seed + i as u64, rows * c, 1.0), c),
                ),
            )
        })
        .collect();
    Probe {
        batch,
        w_logits,
        w_hidden,
    }
}

fn loss(model: &Transformer, p: &Probe) -> f64 {
    let gpu = gpu();
    let out = model
        .run_now(
            gpu,
            &p.batch,
            &Pass::new(Output::Logits).saving(SavePolicy::BlockInputs),
        )
        .unwrap();
    let dot = |a: &Tensor, b: &Tensor| -> f64 {
        download(gpu, a)
            .iter()
            .zip(download(gpu, b))
            .map(|(x, y)| f64::from(*x) * f64::from(y))
            .sum()
    };
    let mut total = dot(out.logits.as_ref().unwrap(), &p.w_logits);
    for (i, w) in &p.w_hidden {
        total += dot(out.hidden_state(*i), w);
    }
    total
}

fn gradients(model: &Transformer, p: &Probe, trainable: Trainable) -> Gradients {
    let gpu = gpu();
    let grads = Gradients::new(gpu, model, trainable).unwrap();
    let mut rec = Recorder::new(gpu);
    let pass = Pass::new(Output::Logits).saving(SavePolicy::Everything);
    let out = model.run(&mut rec, &p.batch, &pass).unwrap();
    let seeds = Seeds {
        logits: Some(&p.w_logits),
        normed: None,
        hidden: &p.w_hidden,
    };
    model
        .backward(&mut rec, &p.batch, out, &seeds, &[], &grads)
        .unwrap();
    rec.finish().unwrap();
    grads
}

/// (The step is small because the loss is strongly curved along a random direction through
/// every parameter; central differences converge as ε², checked down to ε = 3e-4.)
/// Moves every trainable parameter by `eps·δ` (δ from `seed`), in place.
fn shift(model: &Transformer, grads: &Gradients, seed: u64, eps: f32) {
    let gpu = gpu();
    let mut rng = Rng::new(seed);
    for p in grads.named(model) {
        let delta = rng.normal_vec(p.param.numel(), 1.0);
        let moved: Vec<f32> = download(gpu, &p.param)
            .iter()
            .zip(&delta)
            .map(|(x, d)| x + eps * d)
            .collect();
        p.param.write_f32(gpu, &moved).unwrap();
    }
}

fn directional(model: &Transformer, grads: &Gradients, seed: u64) -> f64 {
    let gpu = gpu();
    let mut rng = Rng::new(seed);
    grads
        .named(model)
        .iter()
        .map(|p| {
            let delta = rng.normal_vec(p.param.numel(), 1.0);
            download(gpu, &p.grad)
                .iter()
                .zip(&delta)
                .map(|(g, d)| f64::from(*g) * f64::from(*d))
                .sum::<f64>()
        })
        .sum()
}

fn check(model: &Transformer, trainable: Trainable, eps: f32) {
    let p = probe(model, 3);
    let grads = gradients(model, &p, trainable);
    assert!(!grads.named(model).is_empty());
    let analytic = directional(model, &grads, 77);
    shift(model, &grads, 77, eps);
    let up = loss(model, &p);
    shift(model, &grads, 77, -2.0 * eps);
    let down = loss(model, &p);
    shift(model, &grads, 77, eps);
    let numeric = (up - down) / (2.0 * f64::from(eps));
    let err = (analytic - numeric).abs() / numeric.abs();
    eprintln!("directional derivative {trainable:?}: analytic {analytic:.6e} numeric {numeric:.6e} rel {err:.2e}");
    assert!(
        err < 1e-3,
        "{trainable:?}: analytic {analytic} vs numeric {numeric} ({err:.2e})"
    );
}

#[test]
fn full_backward_matches_directional_finite_differences() {
    let model = Transformer::load(
        gpu(),
        &model_dir("llama3-rope-bias"),
        &LoadOptions::default(),
    )
    .unwrap();
    check(&model, Trainable::Full, 3e-4);
}

/// The LoRA backward on fixture model `name` loaded with `options`.
fn check_lora(name: &str, options: &LoadOptions) {
    let gpu = gpu();
    let mut model = Transformer::load(gpu, &model_dir(name), options).unwrap();
    let config = LoraConfig {
        rank: 3,
        alpha: 6.0,
        ..LoraConfig::default()
    };
    model.attach_lora(gpu, &config, 5).unwrap();
    // PEFT starts B at zero; make it nonzero so that every adapter gradient is exercised.
    let grads = Gradients::new(gpu, &model, Trainable::Lora).unwrap();
    let mut rng = Rng::new(9);
    for p in grads
        .named(&model)
        .iter()
        .filter(|p| p.name.contains("lora_B"))
    {
        p.param
            .write_f32(gpu, &rng.normal_vec(p.param.numel(), 0.2))
            .unwrap();
    }
    check(&model, Trainable::Lora, 3e-4);
}

#[test]
fn lora_backward_matches_directional_finite_differences() {
    check_lora("qwen2-f16", &LoadOptions::default());
}

/// The frozen base weights rounded to f16 (a model of its own, whose forward and input
/// gradients dX = dY·W both read the f16 weights).
#[test]
fn lora_backward_with_f16_base_weights_matches_directional_finite_differences() {
    check_lora("llama-f32", &LoadOptions::with_weights(WeightsDtype::F16));
}

/// The frozen base weights rounded to bf16 (the forward, dX = dY·W and the untied LM head's
/// dX all read bf16 weights).
#[test]
fn lora_backward_with_bf16_base_weights_matches_directional_finite_differences() {
    check_lora("llama-f32", &LoadOptions::with_weights(WeightsDtype::Bf16));
}
