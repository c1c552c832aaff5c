//! A batch of token sequences, right-padded into `[B, T]`, as the kernels take it.

use crate::gpu::{Gpu, Tensor};
use crate::ops::cross_entropy::IGNORE;
use crate::{Error, Result};

/// Token ids `[B·T]` (padding holds id 0, never attended) and valid lengths `[B]`, on the GPU,
/// with host copies of the shapes; for a language-model loss, the next-token targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[B·T]` (u32), sequence `b` in row `b`, right-padded with id 0.
    pub ids: Tensor,
    /// Each sequence's length `[B]` (u32): the attention mask and the pooling read it.
    pub seq_lens: Tensor,
    /// B: the number of sequences.
    pub batch: usize,
    /// T: the longest sequence's length, which every row is padded to.
    pub seq: usize,
    /// Host copy of `seq_lens`; every length is at least 1.
    pub lens: Vec<usize>,
    /// The unpadded ids, per sequence.
    pub sequences: Vec<Vec<u32>>,
    /// Host copy of `ids` (padding holds 0).
    pub padded_ids: Vec<u32>,
    /// What each position learns to predict, for a cross-entropy objective.
    pub targets: Option<Targets>,
}

/// Next-token targets with their loss mask: position `t` of a sequence predicts its token
/// `t + 1` where that token is learned; every other position (prompt tokens, the last token,
/// padding) holds [`IGNORE`] and counts for nothing.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `[B·T]` u32.
    pub ids: Tensor,
    /// Host copy of `ids`.
    pub host: Vec<u32>,
    /// Positions that count (the loss is their mean).
    pub counted: usize,
}

impl Batch {
    /// Pads `sequences` on the right to the longest one. Every sequence needs at least one
    /// token and every id must be below `vocab_size`.
    pub fn new(gpu: &Gpu, sequences: &[Vec<u32>], vocab_size: usize) -> Result<Batch> {
        Self::padded(gpu, sequences, vocab_size, 0)
    }

    /// [`Batch::new`], padded to at least `seq` positions: two batches of one step padded to
    /// the same length have activations of the same sizes, which the buffer pool then shares.
    pub fn padded(
        gpu: &Gpu,
        sequences: &[Vec<u32>],
        vocab_size: usize,
        seq: usize,
    ) -> Result<Batch> {
        if sequences.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one sequence".into(),
            ));
        }
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "sequence {i} of the batch is empty"
            )));
        }
        if let Some(&bad) = sequences
            .iter()
            .flatten()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(1).max(seq);
        let batch = sequences.len();
        let mut ids = vec![0u32; batch * seq];
        for (row, s) in ids.chunks_exact_mut(seq).zip(sequences) {
            row[..s.len()].copy_from_slice(s);
        }
        let lens: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let lens_u32: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
        Ok(Batch {
            ids: Tensor::from_u32(gpu, [batch * seq], &ids)?,
            seq_lens: Tensor::from_u32(gpu, [batch], &lens_u32)?,
            batch,
            seq,
            lens,
            sequences: sequences.to_vec(),
            padded_ids: ids,
            targets: None,
        })
    }

    /// A batch whose positions predict the tokens `learned` marks (`learned[b][t]`: token `t`
    /// of sequence `b` is a target, predicted at position `t − 1`; a sequence's first token
    /// cannot be). At least one token of the batch must be learned.
    pub fn with_targets(
        gpu: &Gpu,
        sequences: &[Vec<u32>],
        learned: &[Vec<bool>],
        vocab_size: usize,
    ) -> Result<Batch> {
        let mut batch = Batch::new(gpu, sequences, vocab_size)?;
        if learned.len() != sequences.len()
            || learned
                .iter()
                .zip(sequences)
                .any(|(l, s)| l.len() != s.len())
        {
            return Err(Error::InvalidArgument(
                "one learned flag per token of every sequence".into(),
            ));
        }
        let mut host = vec![IGNORE; batch.rows()];
        for (b, (seq, flags)) in sequences.iter().zip(learned).enumerate() {
            for t in 1..seq.len() {
                if flags[t] {
                    host[b * batch.seq + t - 1] = seq[t];
                }
            }
        }
        let counted = host.iter().filter(|&&t| t != IGNORE).count();
        if counted == 0 {
            return Err(Error::InvalidArgument(
                "no token of the batch is learned: nothing to train on".into(),
            ));
        }
        batch.targets = Some(Targets {
            ids: Tensor::from_u32(gpu, [host.len()], &host)?,
            host,
            counted,
        });
        Ok(batch)
    }

    /// Rows of the flattened `[B·T, ...]` activations.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Number of real (non-padding) tokens.
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }

    /// 1 for a real position, 0 for padding, per row of `[B·T]`.
    pub fn position_mask(&self) -> Vec<u32> {
        let mut mask = vec![0u32; self.rows()];
        for (b, &len) in self.lens.iter().enumerate() {
            mask[b * self.seq..b * self.seq + len].fill(1);
        }
        mask
    }
}
