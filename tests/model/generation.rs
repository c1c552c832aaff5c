use std::path::PathBuf;

use es2_wgpu::model::generate::argmax;
use es2_wgpu::model::{LoadOptions, SamplingOptions, Transformer};
use es2_wgpu::testing::{assert_close, f64s, gpu};
use es2_wgpu::text::Tokenizer;
use serde_json::Value;

use crate::fixtures::{fixtures, model_dir};
use crate::sequence_logits;

fn stories_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/stories260K")
}

/// Logits at the last position by running the whole sequence (no cache).
fn last_logits_recomputed(model: &Transformer, ids: &[u32]) -> Vec<f32> {
    let v = model.config.vocab_size;
    sequence_logits(model, ids)[(ids.len() - 1) * v..].to_vec()
}

#[test]
fn cached_decoding_gives_the_tokens_recomputation_gives() {
    let gpu = gpu();
    let model = Transformer::load(gpu, &model_dir("qwen2-f16"), &LoadOptions::default()).unwrap();
    let prompt = [5u32, 17, 250, 3, 99, 42, 7];
    let options = SamplingOptions {
        max_tokens: 12,
        ..SamplingOptions::default()
    };
    let cached = model.generate(gpu, &prompt, &options, |_| Ok(())).unwrap();
    let mut ids = prompt.to_vec();
    let mut recomputed = Vec::new();
    for _ in 0..options.max_tokens {
        let next = argmax(&last_logits_recomputed(&model, &ids));
        recomputed.push(next);
        ids.push(next);
    }
    assert_eq!(cached, recomputed);
    // The logits after decoding one token at a time agree with recomputing the sequence.
    let mut cache = model.kv_cache(gpu, ids.len());
    let mut logits = model.decode(gpu, &mut cache, &prompt, true, &[]).unwrap();
    for &next in &cached {
        logits = model.decode(gpu, &mut cache, &[next], true, &[]).unwrap();
    }
    assert_eq!(cache.len(), ids.len());
    assert_close(
        "incremental vs recomputed logits",
        &logits,
        &f64s(&last_logits_recomputed(&model, &ids)),
        1e-5,
    );
}

#[test]
fn stories260k_greedy_continuation_equals_transformers() {
    let gpu = gpu();
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stories260k.reference.json")).unwrap(),
    )
    .unwrap();
    let model = Transformer::load(gpu, &stories_dir(), &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_dir(&stories_dir(), &model.config.eos_token_ids).unwrap();
    for case in refs["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        let ids = tok.encode(prompt).unwrap();
        assert_eq!(ids, want_prompt);
        let last: Vec<f64> = serde_json::from_value(case["last_logits"].clone()).unwrap();
        assert_close(
            &format!("stories260K logits {prompt:?}"),
            &last_logits_recomputed(&model, &ids),
            &last,
            1e-4,
        );
        let options = SamplingOptions {
            max_tokens: want.len(),
            stop_ids: tok.eos_ids().to_vec(),
            ..SamplingOptions::default()
        };
        let got = model.generate(gpu, &ids, &options, |_| Ok(())).unwrap();
        assert_eq!(got, want, "greedy continuation of {prompt:?}");
        assert_eq!(
            tok.decode(&got).unwrap(),
            case["greedy_text"].as_str().unwrap()
        );
    }
}

#[test]
fn batched_generation_gives_each_prompt_what_it_gets_alone() {
    let gpu = gpu();
    let model = Transformer::load(gpu, &stories_dir(), &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_dir(&stories_dir(), &model.config.eos_token_ids).unwrap();
    let texts = [
        "Once upon a time",
        "Once upon a day",
        "The dog ran to",
        "Tom and Lily went to the park",
        "Lily",
        "Once upon a big",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    assert!(
        lengths.len() >= 2 && lengths.len() + 2 <= prompts.len(),
        "the prompts need several lengths, some shared: {lengths:?}"
    );
    for (temperature, max_rows) in [(0.0, 2), (0.9, 8)] {
        let options = SamplingOptions {
            max_tokens: 20,
            temperature,
            seed: 7,
            stop_ids: tok.eos_ids().to_vec(),
            ..SamplingOptions::default()
        };
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| model.generate(gpu, p, &options, |_| Ok(())).unwrap())
            .collect();
        let batched = model
            .generate_batch(gpu, &prompts, &options, max_rows)
            .unwrap();
        assert_eq!(batched, alone, "temperature {temperature}, rows {max_rows}");
    }
}
