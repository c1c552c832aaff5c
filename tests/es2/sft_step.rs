//! The SFT engine's steps against the state files `scripts/make_sft_fixtures.py` computed with
//! torch + transformers + peft: the loss, the pre-clip gradient norm, the step-1 gradients and
//! the parameters after every step, for LoRA and for full fine-tuning.

use es2_wgpu::es2::sft::SftEngine;
use es2_wgpu::model::{Batch, Trainable};
use es2_wgpu::testing::gpu;
use serde_json::Value;

use super::torch_step::{close_scalar, compare_tensors, load_case, optimizer, TOL};

/// The fixture's sequences and its `loss_mask` (position t counts when token t + 1 is learned)
/// as the batch takes them: one learned flag per token, the first never learned.
fn sequences_and_learned(spec: &Value) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let sequences: Vec<Vec<u32>> = serde_json::from_value(spec["sequences"].clone()).unwrap();
    let masks: Vec<Vec<u8>> = serde_json::from_value(spec["loss_mask"].clone()).unwrap();
    let learned = masks
        .iter()
        .map(|m| {
            assert_eq!(m.last(), Some(&0), "the last position predicts nothing");
            std::iter::once(false)
                .chain(m[..m.len() - 1].iter().map(|&x| x == 1))
                .collect()
        })
        .collect();
    (sequences, learned)
}

fn run_case(case: &str) {
    let gpu = gpu();
    let (spec, expected, models) = load_case(case);
    let model = &models.tuned;
    let (sequences, learned) = sequences_and_learned(&spec);
    let batch = Batch::with_targets(gpu, &sequences, &learned, model.config.vocab_size).unwrap();
    let counted = batch.targets.as_ref().unwrap().counted;
    assert_eq!(counted as u64, spec["loss_tokens"].as_u64().unwrap());

    let trainable = if models.frozen.is_none() {
        Trainable::Lora
    } else {
        Trainable::Full
    };
    let mut engine =
        SftEngine::new(gpu, model, trainable, optimizer(&spec["optimizer"]), 0.0).unwrap();
    let lr = spec["optimizer"]["lr"].as_f64().unwrap();
    for (k, want) in spec["steps"].as_array().unwrap().iter().enumerate() {
        let step = k + 1;
        let got = engine.step(gpu, model, &batch, lr, 0).unwrap();
        assert_eq!(got.sft().unwrap().learned_tokens, counted);
        close_scalar(
            &format!("{case} step {step} loss"),
            got.loss,
            want["loss"].as_f64().unwrap(),
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

#[test]
fn sft_lora_with_clipping_and_weight_decay_matches_torch() {
    run_case("sft-lora");
}

#[test]
fn sft_full_tied_head_with_biases_matches_torch() {
    run_case("sft-full");
}
