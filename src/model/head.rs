//! The LM head over row chunks. A loss at the logits (cross-entropy, the KL to a base model)
//! never needs every position's logits at once: each chunk of rows gets its logits, its loss
//! recorded by the caller and, in training, its gradient taken back through the head at once,
//! so no tensor grows with tokens × vocabulary. The memory planner (`es2::plan`) walks the same
//! chunks.

use super::batch::Targets;
use super::grads::Gradients;
use super::transformer::Transformer;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::cross_entropy::{cross_entropy_in_parts, cross_entropy_loss_in_parts};
use crate::Result;

/// Bytes one chunk's f32 logits `[rows, V]` may take: large enough that the head's products
/// stay wide (hundreds of rows at a 150k vocabulary), small beside any model that needs it.
pub const HEAD_CHUNK_BYTES: u64 = 128 << 20;

/// Chunks start at multiples of this many rows, so that a view of a chunk's rows of a
/// 4-byte-per-row tensor (targets, masks, per-row losses) starts at a 256-byte boundary, the
/// largest storage offset alignment an adapter may ask for.
pub const HEAD_CHUNK_ALIGN: usize = 64;

/// Rows per chunk for `rows` positions against a vocabulary of `vocab`: every row when their
/// logits fit [`HEAD_CHUNK_BYTES`], otherwise the largest multiple of [`HEAD_CHUNK_ALIGN`]
/// that fits (at least one multiple).
pub fn head_chunk_rows(rows: usize, vocab: usize) -> usize {
    let row_bytes = (vocab.max(1) * DType::F32.size_bytes()) as u64;
    let fit = usize::try_from(HEAD_CHUNK_BYTES / row_bytes).unwrap_or(usize::MAX);
    if fit >= rows {
        return rows.max(1);
    }
    (fit / HEAD_CHUNK_ALIGN * HEAD_CHUNK_ALIGN).max(HEAD_CHUNK_ALIGN)
}

/// One chunk of the rows of the LM head's input `[M, C]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadChunk {
    /// First row.
    pub start: usize,
    /// Rows in this chunk.
    pub rows: usize,
    /// Rows of a full chunk: the buffers of every chunk, the shorter last one included, are
    /// sized for it, so that the pool hands each chunk the buffers of the one before.
    pub capacity: usize,
}

/// The chunks of `rows` positions against a vocabulary of `vocab`, in order.
pub fn head_chunks(rows: usize, vocab: usize) -> impl Iterator<Item = HeadChunk> {
    let capacity = head_chunk_rows(rows, vocab);
    (0..rows).step_by(capacity).map(move |start| HeadChunk {
        start,
        rows: capacity.min(rows - start),
        capacity,
    })
}

impl HeadChunk {
    /// A fresh f32 `[rows, vocab]` tensor for this chunk (logits or their gradient).
    pub fn vocab_tensor(&self, gpu: &Gpu, vocab: usize) -> Tensor {
        let full = Tensor::empty(gpu, [self.capacity, vocab], DType::F32);
        if self.rows == self.capacity {
            full
        } else {
            full.rows_view(gpu, 0, self.rows)
        }
    }

    /// This chunk's rows of `t` (whose first dimension is the positions).
    pub fn rows_of(&self, gpu: &Gpu, t: &Tensor) -> Tensor {
        if self.start == 0 && self.rows == t.dims()[0] {
            t.clone()
        } else {
            t.rows_view(gpu, self.start, self.rows)
        }
    }

    /// The fused cross-entropy of this chunk's `logits` against its rows of `targets` (u32
    /// `[M]`), written to its rows of `row_loss` (`[M]`); with `grad_scale`, also
    /// `grad_scale·(softmax − onehot)`, the gradient at the logits, returned.
    pub fn cross_entropy(
        &self,
        rec: &mut Recorder,
        logits: &Tensor,
        targets: &Tensor,
        row_loss: &Tensor,
        grad_scale: Option<f32>,
    ) -> Option<Tensor> {
        let gpu = rec.gpu();
        let (ids, loss) = (self.rows_of(gpu, targets), self.rows_of(gpu, row_loss));
        let Some(scale) = grad_scale else {
            cross_entropy_loss_in_parts(rec, logits, &ids, &loss);
            return None;
        };
        let dlogits = self.vocab_tensor(gpu, logits.dims()[1]);
        cross_entropy_in_parts(rec, logits, &ids, &loss, &dlogits, scale);
        Some(dlogits)
    }

    /// `model`'s logits at this chunk's rows of `normed` (the final norm's output `[M, C]`).
    pub fn logits(&self, rec: &mut Recorder, model: &Transformer, normed: &Tensor) -> Tensor {
        let gpu = rec.gpu();
        let logits = self.vocab_tensor(gpu, model.config.vocab_size);
        model
            .lm_head()
            .project(rec, &self.rows_of(gpu, normed), &logits);
        logits
    }
}

/// Where [`Transformer::head_in_chunks`] takes the loss's gradient: `∂L/∂normed` `[M, C]`
/// (overwritten) and the gradients the LM head's weight adds to, when it trains.
#[derive(Debug, Clone, Copy)]
pub struct HeadBackward<'a> {
    /// `∂L/∂normed`, written chunk by chunk.
    pub dnormed: &'a Tensor,
    /// The run's gradients (the head's own, or the tied embedding's, when they train).
    pub grads: &'a Gradients,
}

impl Transformer {
    /// For every chunk of the rows of `normed` (the final norm's output `[M, C]`, the top
    /// hidden state of a pass run to `Output::Hidden(layers)`): records the chunk's logits and
    /// hands them to `loss`, which records the chunk's loss and returns its gradient at the
    /// logits (or `None`). With `backward`, that gradient goes back through the head at once:
    /// into the chunk's rows of `dnormed` and into the head weight's gradient. Each chunk is
    /// submitted on its own, so its buffers serve the next.
    pub fn head_in_chunks(
        &self,
        rec: &mut Recorder,
        normed: &Tensor,
        backward: Option<HeadBackward>,
        mut loss: impl FnMut(&mut Recorder, &HeadChunk, &Tensor) -> Result<Option<Tensor>>,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        for chunk in head_chunks(normed.dims()[0], vocab) {
            let logits = chunk.logits(rec, self, normed);
            let dlogits = loss(rec, &chunk, &logits)?;
            drop(logits);
            if let (Some(dlogits), Some(back)) = (dlogits, backward) {
                let gpu = rec.gpu();
                let (x, dx) = (chunk.rows_of(gpu, normed), chunk.rows_of(gpu, back.dnormed));
                let grad = back.grads.lm_head_grad(self);
                self.lm_head()
                    .project_backward(rec, &x, &dlogits, &dx, grad);
            }
            rec.flush();
        }
        Ok(())
    }

    /// Records the per-position cross-entropy `[B·T]` of the logits at `normed` (the final
    /// norm's output `[B·T, C]`) against `targets`, over row chunks of the LM head. With
    /// `backward`, the gradient of their mean over the learned positions goes back through the
    /// head chunk by chunk.
    pub fn lm_loss(
        &self,
        rec: &mut Recorder,
        normed: &Tensor,
        targets: &Targets,
        backward: Option<HeadBackward>,
    ) -> Result<Tensor> {
        let rows = normed.dims()[0];
        let row_loss = Tensor::empty(rec.gpu(), [rows], DType::F32);
        let scale = 1.0 / targets.counted.max(1) as f32;
        let grad_scale = backward.is_some().then_some(scale);
        self.head_in_chunks(rec, normed, backward, |rec, chunk, logits| {
            Ok(chunk.cross_entropy(rec, logits, &targets.ids, &row_loss, grad_scale))
        })?;
        Ok(row_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_at_aligned_starts() {
        for (rows, vocab) in [(1, 512), (75, 151_936), (2048, 128_256), (4097, 152_064)] {
            let chunks: Vec<HeadChunk> = head_chunks(rows, vocab).collect();
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.start, next, "{rows}×{vocab}: {chunks:?}");
                assert_eq!(c.start % HEAD_CHUNK_ALIGN, 0);
                assert!(c.rows >= 1 && c.rows <= c.capacity);
                assert!(
                    c.capacity == rows
                        || (c.capacity * vocab * 4) as u64 <= HEAD_CHUNK_BYTES
                        || c.capacity == HEAD_CHUNK_ALIGN
                );
                next += c.rows;
            }
            assert_eq!(next, rows);
        }
    }

    #[test]
    fn a_small_vocabulary_takes_every_row_in_one_chunk() {
        assert_eq!(head_chunk_rows(512, 512), 512);
        // 128 MiB of 151,936-wide f32 rows is 220 rows: 192 at 64-row steps.
        assert_eq!(head_chunk_rows(2048, 151_936), 192);
        // A vocabulary so large that one aligned chunk exceeds the budget still makes progress.
        assert_eq!(head_chunk_rows(1000, 1 << 30), HEAD_CHUNK_ALIGN);
    }
}
