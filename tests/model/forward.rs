use es2_wgpu::model::{Batch, LoadOptions, Output, Pass, SavePolicy, Transformer};
use es2_wgpu::testing::{assert_close, download, f64s, gpu};

use crate::fixtures::{model_dir, Reference, MODELS};

const TOL: f64 = 1e-4;

pub fn full_forward(model: &Transformer, batch: &Batch) -> (Vec<f32>, Vec<Vec<f32>>) {
    let gpu = gpu();
    let out = model
        .run_now(
            gpu,
            batch,
            &Pass::new(Output::Logits)
                .base()
                .saving(SavePolicy::BlockInputs),
        )
        .unwrap();
    let logits = download(gpu, out.logits.as_ref().unwrap());
    let hidden = (0..=model.layers())
        .map(|i| download(gpu, out.hidden_state(i)))
        .collect();
    (logits, hidden)
}

pub fn check_against_transformers(name: &str, options: &LoadOptions) {
    let gpu = gpu();
    let model = Transformer::load(gpu, &model_dir(name), options).unwrap();
    let r = Reference::load(name);
    let batch = Batch::new(gpu, &r.sequences(), model.config.vocab_size).unwrap();
    let (logits, hidden) = full_forward(&model, &batch);
    let want = f64s(&r.valid_rows(&r.logits, r.vocab));
    assert_close(
        &format!("{name} logits"),
        &r.valid_rows(&logits, r.vocab),
        &want,
        TOL,
    );
    let per_state = r.batch * r.seq * r.hidden;
    for (i, got) in hidden.iter().enumerate() {
        let want = &r.hidden_states[i * per_state..(i + 1) * per_state];
        assert_close(
            &format!("{name} hidden_states[{i}]"),
            &r.valid_rows(got, r.hidden),
            &f64s(&r.valid_rows(want, r.hidden)),
            TOL,
        );
    }
}

#[test]
fn llama_f32_matches_transformers() {
    check_against_transformers("llama-f32", &LoadOptions::default());
}

#[test]
fn mistral_bf16_sharded_tied_matches_transformers() {
    check_against_transformers("mistral-bf16-sharded", &LoadOptions::default());
}

#[test]
fn qwen2_f16_with_biases_matches_transformers() {
    check_against_transformers("qwen2-f16", &LoadOptions::default());
}

#[test]
fn llama3_rope_scaling_and_all_biases_match_transformers() {
    check_against_transformers("llama3-rope-bias", &LoadOptions::default());
}

#[test]
fn every_fixture_model_is_covered() {
    for name in MODELS {
        assert!(
            model_dir(name).join("config.json").exists(),
            "{name} fixture missing"
        );
    }
}

/// Vocabulary matrices split into 64-row chunks and logits computed in 64-row parts give the
/// same numbers as the unsplit model.
#[test]
fn chunked_vocabulary_matches_unsplit() {
    let gpu = gpu();
    let name = "llama-f32";
    let whole = Transformer::load(gpu, &model_dir(name), &LoadOptions::default()).unwrap();
    let tiny = LoadOptions {
        max_binding_bytes: Some(64 * 48 * 4),
        ..LoadOptions::default()
    };
    let split = Transformer::load(gpu, &model_dir(name), &tiny).unwrap();
    assert_eq!(whole.embed.chunks.len(), 1);
    assert_eq!(split.embed.chunks.len(), 5, "301 rows in 64-row chunks");
    // 150 rows of logits: three row parts under the small binding.
    let sequences: Vec<Vec<u32>> = (0..3)
        .map(|b| {
            (0..50)
                .map(|t| ((b * 97 + t * 31) % 300 + 1) as u32)
                .collect()
        })
        .collect();
    let batch = Batch::new(gpu, &sequences, 301).unwrap();
    let (a, _) = full_forward(&whole, &batch);
    let (b, _) = full_forward(&split, &batch);
    assert_eq!(a.len(), b.len());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "chunking changed the logits");
}
