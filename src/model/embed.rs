//! A prompt's embeddings: the residual stream at one pooled position after the embedding and
//! after every block, as transformers' `output_hidden_states` gives them, and optionally the
//! next-token logits.

use serde::Serialize;

use super::batch::Batch;
use super::transformer::{ForwardSpec, Transformer};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::pool::{pool_forward, Pool};
use crate::{Error, Result};

/// The embeddings of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Embedding {
    /// `hidden_states[i]` pooled over the prompt, for i in 0..=L (`[C]` each): 0 is the token
    /// embedding, i the residual stream after block i − 1, and L the final norm's output.
    pub hidden_states: Vec<Vec<f32>>,
    /// The logits at the last position (`[vocab]`), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

/// Runs `ids` through `model` (adapters on) and pools every hidden state with `pool`.
pub fn embed_prompt(
    gpu: &Gpu,
    model: &Transformer,
    ids: &[u32],
    pool: Pool,
    with_logits: bool,
) -> Result<Embedding> {
    if ids.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let batch = Batch::new(gpu, &[ids.to_vec()], model.config.vocab_size)?;
    let (t, c) = (ids.len(), model.config.hidden_size);
    let layers = model.layers();
    let mut rec = Recorder::new(gpu);
    let spec = ForwardSpec::hidden(layers);
    let forward = model.forward(&mut rec, &batch, &spec);
    let pooled: Vec<Tensor> = (0..=layers)
        .map(|i| {
            let e = Tensor::empty(gpu, [1, c], DType::F32);
            let h = forward.hidden_state(i).reshape([1, t, c]);
            pool_forward(&mut rec, &h, &batch.seq_lens, pool, &e);
            e
        })
        .collect();
    // Only the last position's logits are wanted: project that one row.
    let logits = with_logits.then(|| {
        let last = Tensor::empty(gpu, [1, c], DType::F32);
        rec.copy_elements(forward.hidden_state(layers), (t - 1) * c, &last, 0, c);
        let logits = Tensor::empty(gpu, [1, model.config.vocab_size], DType::F32);
        model.lm_head().project(&mut rec, &last, &logits);
        logits
    });
    rec.finish()?;
    Ok(Embedding {
        hidden_states: pooled
            .iter()
            .map(|e| e.to_f32(gpu))
            .collect::<Result<_>>()?,
        logits: logits.map(|l| l.to_f32(gpu)).transpose()?,
    })
}
