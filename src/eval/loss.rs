//! Next-token cross-entropy of chosen tokens of whole sequences, per sequence: the one loss
//! behind perplexity, multiple-choice log-likelihood, the coherence of replies, and the
//! soft-prompt and GCG objectives (whose gradient at the input embeddings comes from the same
//! pass, through a tap at hidden state 0). The logits are made one row chunk at a time
//! (`Transformer::head_in_chunks`), never for the whole batch.

use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::head::{HeadBackward, HeadChunk};
use crate::model::{Batch, Gradients, Hook, Output, SavePolicy, Seeds};
use crate::ops::cross_entropy::IGNORE;
use crate::{Error, Result};

use super::subject::Subject;

/// The summed negative log-likelihood of one sequence's learned tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SequenceLoss {
    /// Σ −log p(token) over the learned tokens (nats).
    pub total: f64,
    /// How many tokens were learned.
    pub tokens: usize,
}

impl SequenceLoss {
    /// Mean per token (0 for no tokens).
    pub fn mean(&self) -> f64 {
        self.total / self.tokens.max(1) as f64
    }

    /// The sum of several.
    pub fn sum(losses: &[SequenceLoss]) -> SequenceLoss {
        SequenceLoss {
            total: losses.iter().map(|l| l.total).sum(),
            tokens: losses.iter().map(|l| l.tokens).sum(),
        }
    }
}

/// A sequence and which of its tokens count (`learned[t]`: token `t` is scored, predicted at
/// position `t − 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scored {
    /// The sequence's token ids.
    pub ids: Vec<u32>,
    /// Per token, whether it is scored.
    pub learned: Vec<bool>,
}

impl Scored {
    /// `context` followed by `continuation`, scoring the continuation.
    pub fn continuation(context: &[u32], continuation: &[u32]) -> Scored {
        let mut ids = context.to_vec();
        ids.extend_from_slice(continuation);
        let mut learned = vec![false; context.len()];
        learned.resize(ids.len(), true);
        Scored { ids, learned }
    }
}

/// A batch carrying the targets of `items`.
pub fn scored_batch(gpu: &Gpu, subject: &Subject, items: &[Scored]) -> Result<Batch> {
    let ids: Vec<Vec<u32>> = items.iter().map(|s| s.ids.clone()).collect();
    let learned: Vec<Vec<bool>> = items.iter().map(|s| s.learned.clone()).collect();
    Batch::with_targets(gpu, &ids, &learned, subject.model.config.vocab_size)
}

/// Per-sequence losses from per-position losses `[B·T]`.
fn per_sequence(batch: &Batch, row_loss: &[f32]) -> Result<Vec<SequenceLoss>> {
    let targets = targets_of(batch)?;
    Ok((0..batch.batch)
        .map(|b| {
            let rows = b * batch.seq..(b + 1) * batch.seq;
            let counted = rows.clone().filter(|&r| targets.host[r] != IGNORE);
            SequenceLoss {
                total: counted.clone().map(|r| f64::from(row_loss[r])).sum(),
                tokens: counted.count(),
            }
        })
        .collect())
}

fn targets_of(batch: &Batch) -> Result<&crate::model::Targets> {
    batch
        .targets
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("a sequence loss needs a batch with targets".into()))
}

/// The losses of `items` under `subject` with `hooks`, `batch_size` sequences per pass.
pub fn sequence_losses(
    gpu: &Gpu,
    subject: &Subject,
    items: &[Scored],
    hooks: &[Hook],
    batch_size: usize,
) -> Result<Vec<SequenceLoss>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let batch = scored_batch(gpu, subject, chunk)?;
        out.extend(batch_losses(gpu, subject, &batch, hooks)?);
    }
    Ok(out)
}

/// The losses of one batch that carries targets.
pub fn batch_losses(
    gpu: &Gpu,
    subject: &Subject,
    batch: &Batch,
    hooks: &[Hook],
) -> Result<Vec<SequenceLoss>> {
    Ok(score(gpu, subject, batch, hooks, Wanted::default())?.losses)
}

/// What [`score`] reads back besides the losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wanted {
    /// The gradient at hidden state 0 (the input embeddings, after their hooks).
    pub gradient: bool,
    /// Whether each sequence's learned tokens are all the model's greedy choice.
    pub greedy: bool,
}

/// What [`score`] measured on one batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scoring {
    /// Per sequence, its loss over the scored tokens.
    pub losses: Vec<SequenceLoss>,
    /// `[B·T, C]`: the gradient of Σ_b (mean loss of sequence b) at hidden state 0 after its
    /// hooks; each sequence's rows are the gradient of its own mean loss.
    pub gradient: Option<Vec<f32>>,
    /// Per sequence: every learned token is the argmax of the logits that predict it (greedy
    /// decoding would write exactly these tokens).
    pub greedy: Option<Vec<bool>>,
}

/// The losses of one batch that carries targets, and what `wanted` asks for. The model's
/// weights get no gradient.
pub fn score(
    gpu: &Gpu,
    subject: &Subject,
    batch: &Batch,
    hooks: &[Hook],
    wanted: Wanted,
) -> Result<Scoring> {
    let targets = targets_of(batch)?;
    let model = subject.model;
    let mut rec = Recorder::new(gpu);
    let save = if wanted.gradient {
        SavePolicy::BlockInputs
    } else {
        SavePolicy::Nothing
    };
    let top = model.layers();
    let pass = subject
        .pass(Output::Hidden(top))
        .with_hooks(hooks)
        .saving(save);
    let forward = model.run(&mut rec, batch, &pass)?;
    let normed = forward.hidden_state(top).clone();
    let row_loss = Tensor::empty(gpu, [batch.rows()], DType::F32);
    let learned_rows: Vec<usize> = (0..batch.rows())
        .filter(|&r| targets.host[r] != IGNORE)
        .collect();
    let vocab = model.config.vocab_size;
    let picked = wanted
        .greedy
        .then(|| Tensor::empty(gpu, [learned_rows.len().max(1), vocab], DType::F32));
    let dnormed = wanted
        .gradient
        .then(|| Tensor::empty(gpu, normed.shape().clone(), DType::F32));
    let no_grads = Gradients::none(model);
    let backward = dnormed.as_ref().map(|dnormed| HeadBackward {
        dnormed,
        grads: &no_grads,
    });
    // Unit scale: each row's gradient is that of its own loss; rows are divided by their
    // sequence's token count on the host.
    let grad_scale = wanted.gradient.then_some(1.0);
    model.head_in_chunks(&mut rec, &normed, backward, |rec, chunk, logits| {
        if let Some(picked) = &picked {
            pick_rows(rec, chunk, logits, &learned_rows, picked);
        }
        Ok(chunk.cross_entropy(rec, logits, &targets.ids, &row_loss, grad_scale))
    })?;
    drop(normed);
    let mut read = vec![row_loss.clone()];
    if let Some(dnormed) = dnormed {
        let seeds = Seeds {
            normed: Some(&dnormed),
            ..Seeds::default()
        };
        let taps = model.backward(&mut rec, batch, forward, &seeds, &[0], &no_grads)?;
        let (_, dx0) = taps
            .into_iter()
            .next()
            .ok_or_else(|| Error::InvalidArgument("the backward returned no tap".into()))?;
        read.push(dx0);
    }
    read.extend(picked.clone());
    let refs: Vec<&Tensor> = read.iter().collect();
    let mut values = rec.finish_reading(&refs)?.into_iter();
    let losses = per_sequence(batch, &values.next().unwrap_or_default())?;
    let gradient = if wanted.gradient {
        let mut g = values.next().unwrap_or_default();
        let cols = subject.width();
        for (b, loss) in losses.iter().enumerate() {
            let scale = 1.0 / loss.tokens.max(1) as f32;
            let rows = b * batch.seq * cols..(b + 1) * batch.seq * cols;
            g[rows].iter_mut().for_each(|x| *x *= scale);
        }
        Some(g)
    } else {
        None
    };
    let greedy = match picked {
        Some(_) => {
            let rows = values.next().unwrap_or_default();
            Some(greedy_hits(batch, &learned_rows, &rows, targets))
        }
        None => None,
    };
    Ok(Scoring {
        losses,
        gradient,
        greedy,
    })
}

/// Copies the rows of `chunk`'s `logits [chunk.rows, V]` that are among `rows` (of the whole
/// batch) into their places in `picked [rows.len(), V]`.
fn pick_rows(
    rec: &mut Recorder,
    chunk: &HeadChunk,
    logits: &Tensor,
    rows: &[usize],
    picked: &Tensor,
) {
    let vocab = logits.dims()[1];
    let inside = chunk.start..chunk.start + chunk.rows;
    for (i, &r) in rows.iter().enumerate().filter(|(_, r)| inside.contains(r)) {
        rec.copy_elements(logits, (r - chunk.start) * vocab, picked, i * vocab, vocab);
    }
}

/// Per sequence: whether each learned row's argmax is its target.
fn greedy_hits(
    batch: &Batch,
    learned_rows: &[usize],
    picked: &[f32],
    targets: &crate::model::Targets,
) -> Vec<bool> {
    let mut hits = vec![true; batch.batch];
    let vocab = picked.len() / learned_rows.len().max(1);
    for (i, &r) in learned_rows.iter().enumerate() {
        let row = &picked[i * vocab..(i + 1) * vocab];
        if crate::model::generate::argmax(row) != targets.host[r] {
            hits[r / batch.seq] = false;
        }
    }
    hits
}
