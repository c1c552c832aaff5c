//! `embed_prompt`: pooled hidden states in transformers' `output_hidden_states` convention and
//! the logits at the last position, against the forward pass and transformers' numbers.

use es2_wgpu::model::{embed_prompt, embedded, open_model, LoadOptions, Transformer};
use es2_wgpu::ops::pool::Pool;
use es2_wgpu::testing::{assert_close, download, f64s, gpu};

use crate::fixtures::{model_dir, Reference};
use crate::run_sequence;

/// Every hidden state `[T, C]` and the logits `[T, V]` of one sequence.
fn full_forward(model: &Transformer, ids: &[u32]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let out = run_sequence(model, ids);
    let hidden = (0..=model.layers())
        .map(|i| download(gpu(), out.hidden_state(i)))
        .collect();
    (hidden, download(gpu(), out.logits.as_ref().unwrap()))
}

#[test]
fn last_and_mean_pooling_and_logits_match_the_forward() {
    let gpu = gpu();
    let (model, tok) = open_model(gpu, embedded::DEFAULT, &LoadOptions::default()).unwrap();
    let ids = tok.encode("pooled, seven").unwrap();
    let (t, c, v) = (ids.len(), model.config.hidden_size, model.config.vocab_size);
    let (hidden, logits) = full_forward(&model, &ids);

    let last = embed_prompt(gpu, &model, &ids, Pool::Last, true).unwrap();
    assert_eq!(last.hidden_states.len(), model.layers() + 1);
    for (i, (got, h)) in last.hidden_states.iter().zip(&hidden).enumerate() {
        assert_eq!(got.as_slice(), &h[(t - 1) * c..], "hidden_states[{i}] last");
    }
    assert_close(
        "embed logits at the last position",
        last.logits.as_ref().unwrap(),
        &f64s(&logits[(t - 1) * v..]),
        1e-6,
    );

    let mean = embed_prompt(gpu, &model, &ids, Pool::Mean, false).unwrap();
    assert!(mean.logits.is_none());
    for (i, (got, h)) in mean.hidden_states.iter().zip(&hidden).enumerate() {
        let want: Vec<f64> = (0..c)
            .map(|j| (0..t).map(|r| f64::from(h[r * c + j])).sum::<f64>() / t as f64)
            .collect();
        assert_close(&format!("hidden_states[{i}] mean"), got, &want, 1e-6);
    }
}

#[test]
fn embeddings_match_transformers_hidden_states() {
    let gpu = gpu();
    let name = "llama-f32";
    let (model, _) = open_model(
        gpu,
        model_dir(name).to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let r = Reference::load(name);
    let ids = &r.sequences()[0];
    let embedding = embed_prompt(gpu, &model, ids, Pool::Last, false).unwrap();
    // Reference hidden states are [L + 1, B, T, C]; sequence 0's last token.
    let at = (ids.len() - 1) * r.hidden;
    let per_state = r.batch * r.seq * r.hidden;
    for (i, got) in embedding.hidden_states.iter().enumerate() {
        let start = i * per_state + at;
        let want = f64s(&r.hidden_states[start..start + r.hidden]);
        assert_close(
            &format!("{name} embed hidden_states[{i}]"),
            got,
            &want,
            1e-4,
        );
    }
}
