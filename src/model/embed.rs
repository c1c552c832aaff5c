//! A prompt's embeddings: the residual stream at one pooled position after the embedding and
//! after every block, as transformers' `output_hidden_states` gives them, and optionally the
//! next-token logits.

use serde::Serialize;

use super::batch::Batch;
use super::hooks::Hook;
use super::runner::{Output, Pass};
use super::transformer::Transformer;
use crate::gpu::{Gpu, Recorder};
use crate::ops::pool::Pool;
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
    let layers = model.layers();
    let hooks: Vec<Hook> = (0..=layers).map(|i| Hook::capture(i, pool)).collect();
    let output = if with_logits {
        Output::LastLogits
    } else {
        Output::Hidden(layers)
    };
    let mut rec = Recorder::new(gpu);
    let forward = model.run(&mut rec, &batch, &Pass::new(output).with_hooks(&hooks))?;
    rec.finish()?;
    let hidden_states = (0..hooks.len())
        .map(|i| {
            forward
                .captured(i)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("hidden state {i} was not captured"))
                })?
                .to_f32(gpu)
        })
        .collect::<Result<_>>()?;
    Ok(Embedding {
        hidden_states,
        logits: forward.logits.map(|l| l.to_f32(gpu)).transpose()?,
    })
}

/// Runs `model` over `batches` with no gradient and returns, for each index in `hidden`, that
/// hidden state pooled with `pool` on the host (`[n·C]`, the sequences of all batches in
/// order). `adapters` off gives the base model.
pub fn pooled_hidden_states(
    gpu: &Gpu,
    model: &Transformer,
    batches: &[Batch],
    hidden: &[usize],
    pool: Pool,
    adapters: bool,
) -> Result<Vec<Vec<f64>>> {
    let hooks: Vec<Hook> = hidden.iter().map(|&i| Hook::capture(i, pool)).collect();
    let top = hidden.iter().copied().max().unwrap_or(0);
    let pass = Pass {
        adapters,
        ..Pass::new(Output::Hidden(top))
    }
    .with_hooks(&hooks);
    let mut out = vec![Vec::new(); hidden.len()];
    for batch in batches {
        let mut rec = Recorder::new(gpu);
        let forward = model.run(&mut rec, batch, &pass)?;
        rec.finish()?;
        for (slot, values) in out.iter_mut().enumerate() {
            let captured = forward.captured(slot).ok_or_else(|| {
                Error::InvalidArgument(format!("hidden state {slot} not captured"))
            })?;
            values.extend(captured.to_f32(gpu)?.iter().map(|&x| f64::from(x)));
        }
    }
    Ok(out)
}
