//! The LM head over row chunks (`Transformer::head_in_chunks`) against the whole batch's
//! logits: on a vocabulary wide enough that a batch takes two chunks, the cross-entropy and
//! its gradients, and the held-out KL, are those of the unchunked path.

use es2_wgpu::eval::heldout::heldout_kl;
use es2_wgpu::gpu::{DType, Recorder, Tensor};
use es2_wgpu::model::head::{head_chunks, HeadBackward};
use es2_wgpu::model::{
    Batch, Config, Gradients, LoadOptions, Output, Pass, SavePolicy, SeededInit, Seeds, Trainable,
    Transformer,
};
use es2_wgpu::ops::cross_entropy::cross_entropy_in_parts;
use es2_wgpu::ops::kl::{kl_loss_in_parts, KlOptions};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::{assert_bit_identical, download, f64s, gpu, rel_error};

/// A Llama shape whose untied 140,000-token head makes 240 rows two chunks (192 + 48).
const WIDE: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "vocab_size": 140000, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "tie_word_embeddings": false
}"#;

fn wide(seed: u64) -> Transformer {
    let config = Config::from_json(WIDE).unwrap();
    let init = SeededInit { seed, std: 0.5 };
    Transformer::from_source(gpu(), config, &init, &LoadOptions::default()).unwrap()
}

/// Five sequences of 48 seeded tokens (240 rows), every token after the first learned.
fn batch(model: &Transformer) -> Batch {
    let vocab = model.config.vocab_size;
    let mut rng = Rng::new(9);
    let ids: Vec<Vec<u32>> = (0..5)
        .map(|_| (0..48).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let learned = vec![vec![true; 48]; 5];
    Batch::with_targets(gpu(), &ids, &learned, vocab).unwrap()
}

/// Per-row loss, the gradient at the input embeddings and every parameter's gradient, from
/// one forward and backward of the mean cross-entropy, the head whole or in chunks.
fn lm_step(model: &Transformer, batch: &Batch, chunked: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
    let gpu = gpu();
    let grads = Gradients::new(gpu, model, Trainable::Full).unwrap();
    let targets = batch.targets.as_ref().unwrap();
    let mut rec = Recorder::new(gpu);
    let top = model.layers();
    let output = if chunked {
        Output::Hidden(top)
    } else {
        Output::Logits
    };
    let pass = Pass::new(output).saving(SavePolicy::Everything);
    let forward = model.run(&mut rec, batch, &pass).unwrap();
    let scale = 1.0 / targets.counted as f32;
    let (loss, seeded) = if chunked {
        let normed = forward.hidden_state(top).clone();
        let dnormed = Tensor::empty(gpu, normed.shape().clone(), DType::F32);
        let back = HeadBackward {
            dnormed: &dnormed,
            grads: &grads,
        };
        let loss = model
            .lm_loss(&mut rec, &normed, targets, Some(back))
            .unwrap();
        (loss, dnormed)
    } else {
        let logits = forward.logits.as_ref().unwrap();
        let loss = Tensor::empty(gpu, [batch.rows()], DType::F32);
        let dlogits = Tensor::empty(gpu, logits.shape().clone(), DType::F32);
        cross_entropy_in_parts(&mut rec, logits, &targets.ids, &loss, &dlogits, scale);
        let seeds = Seeds {
            logits: Some(&dlogits),
            ..Seeds::default()
        };
        let taps = model
            .backward(&mut rec, batch, forward, &seeds, &[], &grads)
            .unwrap();
        assert!(taps.is_empty());
        rec.finish().unwrap();
        return (download(gpu, &loss), every_gradient(model, &grads));
    };
    let seeds = Seeds {
        normed: Some(&seeded),
        ..Seeds::default()
    };
    model
        .backward(&mut rec, batch, forward, &seeds, &[], &grads)
        .unwrap();
    rec.finish().unwrap();
    (download(gpu, &loss), every_gradient(model, &grads))
}

fn every_gradient(model: &Transformer, grads: &Gradients) -> Vec<Vec<f32>> {
    grads
        .named(model)
        .iter()
        .map(|p| download(gpu(), &p.grad))
        .collect()
}

#[test]
fn the_batch_takes_two_chunks() {
    let chunks: Vec<_> = head_chunks(240, 140_000).collect();
    assert_eq!(chunks.len(), 2, "{chunks:?}");
}

#[test]
fn cross_entropy_in_chunks_is_the_whole_batch_s() {
    let model = wide(3);
    let batch = batch(&model);
    let (whole_loss, whole_grads) = lm_step(&model, &batch, false);
    let (chunk_loss, chunk_grads) = lm_step(&model, &batch, true);
    // Each row's logits are the same products, so its loss is the same, bit for bit.
    assert_bit_identical("per-row loss", &chunk_loss, &whole_loss);
    // Every position but each sequence's last predicts a learned token.
    let counted = whole_loss.iter().filter(|&&l| l > 0.0).count();
    assert_eq!(counted, 5 * 47, "{counted} rows have a loss");
    let names: Vec<String> = Gradients::new(gpu(), &model, Trainable::Full)
        .unwrap()
        .named(&model)
        .iter()
        .map(|p| p.name.clone())
        .collect();
    for ((name, chunked), whole) in names.iter().zip(&chunk_grads).zip(&whole_grads) {
        // The head's gradient sums the chunks' rows in two products instead of one; every
        // other gradient flows from the same ∂L/∂normed, bit for bit.
        if name == "lm_head.weight" {
            let err = rel_error(chunked, &f64s(whole));
            eprintln!("rel-error {name}: {err:.2e}");
            assert!(err < 1e-6, "{name}: {err:.2e}");
            assert!(whole.iter().any(|&g| g != 0.0));
        } else {
            assert_bit_identical(name, chunked, whole);
        }
    }
}

#[test]
fn kl_in_chunks_is_the_whole_batch_s() {
    let (tuned, base) = (wide(3), wide(4));
    let batch = batch(&tuned);
    let options = KlOptions::default();
    let pass = Pass::new(Output::Logits);
    let chunked = heldout_kl(
        gpu(),
        (&tuned, pass),
        (&base, pass),
        std::slice::from_ref(&batch),
        &options,
    )
    .unwrap();

    let gpu = gpu();
    let mut rec = Recorder::new(gpu);
    let zt = tuned.run(&mut rec, &batch, &pass).unwrap().logits.unwrap();
    let zb = base.run(&mut rec, &batch, &pass).unwrap().logits.unwrap();
    let mask = Tensor::from_u32(gpu, [batch.rows()], &batch.position_mask()).unwrap();
    let rows = Tensor::empty(gpu, [batch.rows()], DType::F32);
    let scratch = Tensor::empty(gpu, zt.shape().clone(), DType::F32);
    kl_loss_in_parts(&mut rec, &zt, &zb, &mask, &rows, &scratch, &options, 0.0);
    rec.finish().unwrap();
    let rows = download(gpu, &rows);
    let whole = rows.iter().map(|&x| f64::from(x)).sum::<f64>() / batch.tokens() as f64;
    assert!(whole > 0.0, "two different models have a KL: {whole}");
    // The same per-row values summed in the same order.
    assert_eq!(chunked.to_bits(), whole.to_bits(), "{chunked} vs {whole}");
}
