//! Model-layer tests: checkpoints load, the forward matches transformers on fixtures written
//! by `scripts/make_model_fixtures.py`, tokenisation matches, generation is exact.

mod backward;
mod bad_adapter;
mod bad_input;
mod decode;
mod embed;
mod embedded;
mod f16_weights;
mod fixtures;
mod forward;
mod fuzz;
mod generation;
mod head;
mod hooks;
mod tokenizer;

use es2_wgpu::model::{Batch, Forward, Output, Pass, SavePolicy, Transformer};
use es2_wgpu::testing::{download, gpu};

/// The forward of one sequence, its logits and every hidden state kept.
fn run_sequence(model: &Transformer, ids: &[u32]) -> Forward {
    let gpu = gpu();
    let batch = Batch::new(gpu, &[ids.to_vec()], model.config.vocab_size).unwrap();
    let pass = Pass::new(Output::Logits).saving(SavePolicy::BlockInputs);
    model.run_now(gpu, &batch, &pass).unwrap()
}

/// The logits `[T, V]` of one sequence.
fn sequence_logits(model: &Transformer, ids: &[u32]) -> Vec<f32> {
    download(gpu(), run_sequence(model, ids).logits.as_ref().unwrap())
}
