//! The block loop: the one place where the decoder's blocks run, for every pass there is. A
//! training forward, the frozen base's forward, an evaluation pass and cached decoding are the
//! same loop with different settings ([`Pass`]): hooks at any hidden state, a save policy for
//! the backward, and (for decoding) a KV cache. The backward walks the same loop in reverse,
//! from seeds at the logits and at hidden states, returning the gradient at any hidden state
//! (a tap), and recomputes blocks whose activations the forward did not keep.
//!
//! Memory lifetimes: each block is submitted on its own (`Recorder::flush`), so whatever a
//! block's forward or backward no longer holds returns to the buffer pool before the next
//! block takes its buffers. A pass that saves nothing keeps one residual state at a time; the
//! backward drops each block's activations once it has used them.

use super::backward::Seeds;
use super::batch::Batch;
use super::grads::Gradients;
use super::hooks::{
    apply_hooks, bind_hooks, check_capture_grad, hooks_backward, BoundHook, Hook, PositionFrame,
};
use super::transformer::{BlockActivations, KvTarget, LoraDropout, ProjectionMode, Transformer};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::embedding::{embedding_backward, embedding_forward, EmbeddingGradIndex};
use crate::ops::residual::accumulate;
use crate::{Error, Result};

/// A KV cache for one pass: per layer `[B, capacity, n_kv_heads, head_dim]` keys and values,
/// with `past[b]` tokens already in row `b`; the pass appends each row's new tokens after them.
pub(crate) struct CacheTarget<'a> {
    pub k: &'a [Tensor],
    pub v: &'a [Tensor],
    pub past: &'a [usize],
    pub capacity: usize,
    /// `past` on the GPU (u32 `[B]`): where each row's new tokens start.
    pub starts: &'a Tensor,
    /// The cache row (of `[B·capacity]`) each position of the batch `[B·T]` is written to:
    /// `b·capacity + past[b] + t` (padding included: it lands past the row's length, where
    /// nothing reads it before a later token overwrites it).
    pub slots: &'a Tensor,
    /// Each row's valid length after this pass, then `starts` (u32 `[2B]`).
    pub lens_and_starts: &'a Tensor,
}

/// What a forward keeps for a backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SavePolicy {
    /// Nothing: the pass takes no gradient (a frozen base's logits, evaluation, decoding).
    #[default]
    Nothing,
    /// Every block's activations: the backward runs straight through.
    Everything,
    /// Only each block's input: the backward runs each block's forward again before its
    /// backward (activation recomputation), with identical results.
    BlockInputs,
}

/// How far a pass runs and what it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Up to hidden state `i` (0 ..= L); blocks above it do not run.
    Hidden(usize),
    /// Every block, the final norm and the logits of every position `[B·T, V]`.
    Logits,
    /// Every block, the final norm and the logits of each sequence's last position `[B, V]`.
    LastLogits,
}

/// The settings of one pass through the block loop.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// How far the pass runs and what it returns.
    pub output: Output,
    /// Run the LoRA adapters (off gives the base model).
    pub adapters: bool,
    /// Dropout on the adapters' inputs (training forwards only).
    pub dropout: Option<LoraDropout>,
    /// Edits and captures at hidden states, applied in order; [`Forward::captured`] finds a
    /// capture by its index here.
    pub hooks: &'a [Hook],
    /// What the forward keeps for [`Transformer::backward`] (which refuses
    /// [`SavePolicy::Nothing`]).
    pub save: SavePolicy,
}

impl Pass<'static> {
    /// A pass with adapters on, no hooks, no dropout, saving nothing.
    pub fn new(output: Output) -> Self {
        Pass {
            output,
            adapters: true,
            dropout: None,
            hooks: &[],
            save: SavePolicy::Nothing,
        }
    }
}

impl<'a> Pass<'a> {
    /// The same pass with these hooks.
    pub fn with_hooks<'b>(self, hooks: &'b [Hook]) -> Pass<'b> {
        Pass {
            output: self.output,
            adapters: self.adapters,
            dropout: self.dropout,
            hooks,
            save: self.save,
        }
    }

    /// The same pass keeping what a backward needs, by `save`.
    pub fn saving(self, save: SavePolicy) -> Self {
        Pass { save, ..self }
    }

    /// The same pass with the adapters off: the base model.
    pub fn base(self) -> Self {
        Pass {
            adapters: false,
            ..self
        }
    }

    /// The same pass with dropout on the adapters' inputs.
    pub fn with_dropout(self, dropout: Option<LoraDropout>) -> Self {
        Pass { dropout, ..self }
    }
}

/// What a pass produced, and what its backward needs.
#[derive(Debug)]
pub struct Forward {
    /// The logits (`[B·T, V]`, or `[B, V]` for [`Output::LastLogits`]).
    pub logits: Option<Tensor>,
    captures: Vec<(usize, Tensor)>,
    /// Gradients of what captures read ([`Forward::seed_capture`]), by hook number.
    capture_grads: Vec<(usize, Tensor)>,
    /// `h_0 ..= h_top` as the blocks read them (after the hooks); with [`SavePolicy::Nothing`]
    /// only the last one.
    residual: Vec<Tensor>,
    /// `norm(h_L)` (after the hooks at L) and its rstd, when the pass reached the final norm.
    normed: Option<(Tensor, Tensor)>,
    /// Per block, with [`SavePolicy::Everything`].
    blocks: Vec<BlockActivations>,
    hooks: Vec<BoundHook>,
    save: SavePolicy,
    adapters: bool,
    dropout: Option<LoraDropout>,
    /// The highest hidden-state index computed.
    top: usize,
}

impl Forward {
    /// What hook number `hook` (its index in [`Pass::hooks`]) captured.
    pub fn captured(&self, hook: usize) -> Option<&Tensor> {
        self.captures
            .iter()
            .find(|(number, _)| *number == hook)
            .map(|(_, t)| t)
    }

    /// transformers' `hidden_states[index]` as `[B·T, C]`, for passes that keep them (any save
    /// policy but [`SavePolicy::Nothing`], or the top of a pass that saves nothing).
    pub fn hidden_state(&self, index: usize) -> &Tensor {
        if let Some((normed, _)) = self.normed.as_ref().filter(|_| index == self.top) {
            return normed;
        }
        let saved = if self.save == SavePolicy::Nothing {
            (index == self.top).then(|| self.residual.last()).flatten()
        } else {
            self.residual.get(index)
        };
        saved.unwrap_or_else(|| {
            panic!(
                "hidden state {index} was not kept by this pass (top {}, {:?}): capture it with \
                 a hook or save it",
                self.top, self.save
            )
        })
    }

    /// The highest hidden-state index the pass computed.
    pub fn top(&self) -> usize {
        self.top
    }

    /// Seeds the backward with `grad`, the gradient of the loss with respect to what hook
    /// number `hook` captured on `batch` (`[B, C]` for a pooled capture, `[B·T, C]` for a whole
    /// one): the backward adds it where the capture read, with no `[B·T, C]` seed tensor
    /// (what a pooled capture's gradient would otherwise need).
    pub fn seed_capture(&mut self, batch: &Batch, hook: usize, grad: Tensor) -> Result<()> {
        let cols = self.residual.last().map_or(0, |h| h.dims()[1]);
        check_capture_grad(&self.hooks, hook, &grad, batch, cols)?;
        self.capture_grads.push((hook, grad));
        Ok(())
    }
}

impl Transformer {
    /// Records `pass` over `batch`.
    pub fn run(&self, rec: &mut Recorder, batch: &Batch, pass: &Pass) -> Result<Forward> {
        self.run_with(rec, batch, pass, None)
    }

    /// Runs [`Transformer::run`] in a recorder of its own and waits for it.
    pub fn run_now(&self, gpu: &Gpu, batch: &Batch, pass: &Pass) -> Result<Forward> {
        let mut rec = Recorder::new(gpu);
        let out = self.run(&mut rec, batch, pass)?;
        rec.finish()?;
        Ok(out)
    }

    /// The block loop; with a `cache`, the blocks append their keys and values to it and
    /// attend over everything it holds.
    pub(crate) fn run_with(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        pass: &Pass,
        cache: Option<CacheTarget>,
    ) -> Result<Forward> {
        let layers = self.layers();
        let top = match pass.output {
            Output::Hidden(i) if i <= layers => i,
            Output::Hidden(i) => {
                return Err(Error::InvalidArgument(format!(
                    "hidden state {i} is past the last ({layers})"
                )))
            }
            Output::Logits | Output::LastLogits => layers,
        };
        for hook in pass.hooks {
            hook.check(layers, self.config.hidden_size)?;
        }
        let frame = PositionFrame {
            past: cache.as_ref().map_or(&[], |c| c.past),
        };
        let hooks = bind_hooks(rec.gpu(), pass.hooks, batch, frame)?;
        let gpu = rec.gpu();
        let x0 = Tensor::empty(gpu, [batch.rows(), self.config.hidden_size], DType::F32);
        self.embed.lookup(rec, &batch.ids, &x0);
        let mut captures = apply_hooks(rec, &hooks, 0, &x0, batch);

        let mut residual = vec![x0];
        let mut blocks = Vec::new();
        for layer in 0..top.min(layers) {
            let mode = ProjectionMode {
                adapters: pass.adapters,
                dropout: pass.dropout,
                layer,
            };
            let x = residual.last().expect("the residual stream starts at h_0");
            let kv = match &cache {
                None => KvTarget::Fresh,
                Some(c) => KvTarget::Cache {
                    k: &c.k[layer],
                    v: &c.v[layer],
                    capacity: c.capacity,
                    starts: c.starts,
                    slots: c.slots,
                    lens_and_starts: c.lens_and_starts,
                },
            };
            let (out, saved) = self.block_forward(rec, &self.blocks[layer], x, batch, mode, kv);
            // hidden_states[L] is the normed output: its hooks run after the final norm.
            if layer + 1 < layers {
                captures.extend(apply_hooks(rec, &hooks, layer + 1, &out, batch));
            }
            if pass.save == SavePolicy::Everything {
                blocks.push(saved);
            }
            if pass.save == SavePolicy::Nothing {
                residual.clear();
            }
            residual.push(out);
            rec.flush();
        }

        let normed = (top == layers).then(|| {
            let (normed, rstd) = self.final_norm_forward(rec, residual.last().expect("h_L"));
            captures.extend(apply_hooks(rec, &hooks, layers, &normed, batch));
            (normed, rstd)
        });
        let logits = match (&normed, pass.output) {
            (Some((normed, _)), Output::Logits) => Some(self.logits(rec, normed)),
            (Some((normed, _)), Output::LastLogits) => {
                let last = last_rows(rec, normed, batch)?;
                Some(self.logits(rec, &last))
            }
            _ => None,
        };
        Ok(Forward {
            logits,
            captures,
            capture_grads: Vec::new(),
            residual,
            normed,
            blocks,
            hooks,
            save: pass.save,
            adapters: pass.adapters,
            dropout: pass.dropout,
            top,
        })
    }

    fn logits(&self, rec: &mut Recorder, normed: &Tensor) -> Tensor {
        let rows = normed.dims()[0];
        let logits = Tensor::empty(rec.gpu(), [rows, self.config.vocab_size], DType::F32);
        self.lm_head().project(rec, normed, &logits);
        logits
    }

    /// Records the backward of `forward` (run on `batch` with a save policy other than
    /// [`SavePolicy::Nothing`]) from `seeds`, accumulating into `grads`, and returns the
    /// gradient at each hidden state in `taps` (with respect to the state after its hooks,
    /// `[B·T, C]`). Each block's activations are dropped once used.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        forward: Forward,
        seeds: &Seeds,
        taps: &[usize],
        grads: &Gradients,
    ) -> Result<Vec<(usize, Tensor)>> {
        if forward.save == SavePolicy::Nothing {
            return Err(Error::InvalidArgument(
                "a backward needs a forward that saved its activations (SavePolicy::Nothing \
                 keeps none)"
                    .into(),
            ));
        }
        if let Some(&tap) = taps.iter().find(|&&t| t > forward.top) {
            return Err(Error::InvalidArgument(format!(
                "a gradient tap at hidden state {tap}, above the pass's top ({})",
                forward.top
            )));
        }
        let Forward {
            logits,
            captures,
            capture_grads,
            mut residual,
            normed,
            mut blocks,
            hooks,
            save,
            adapters,
            dropout,
            top,
        } = forward;
        // What the caller read from the forward is recorded already: release it now.
        drop((logits, captures));
        let gpu = rec.gpu();
        let layers = self.layers();
        let cols = self.config.hidden_size;
        let mut tapped = Vec::new();
        // The gradient at hidden state `index` (after its hooks) is complete: add its seeds,
        // read the taps, and take it back through the hooks.
        let mut settle = |rec: &mut Recorder, index: usize, dh: &Tensor| -> Result<()> {
            for (_, seed) in seeds.hidden.iter().filter(|(i, _)| *i == index) {
                accumulate(rec, seed, dh, 1.0);
            }
            if taps.contains(&index) {
                let copy = Tensor::empty(rec.gpu(), dh.shape().clone(), DType::F32);
                rec.copy(dh, &copy);
                tapped.push((index, copy));
            }
            hooks_backward(rec, &hooks, index, dh, &capture_grads, batch)
        };

        let mut dx = Tensor::empty(gpu, [batch.rows(), cols], DType::F32);
        match &normed {
            Some((normed, rstd)) => {
                let dnormed = match (seeds.normed, seeds.logits) {
                    (Some(_), Some(_)) => {
                        return Err(Error::InvalidArgument(
                            "seed the backward at the logits or at the final norm's output, \
                             not both"
                                .into(),
                        ))
                    }
                    (Some(seed), None) => seed.clone(),
                    (None, dlogits) => {
                        let dnormed = Tensor::empty(gpu, [batch.rows(), cols], DType::F32);
                        match dlogits {
                            Some(dlogits) => self.lm_head().project_backward(
                                rec,
                                normed,
                                dlogits,
                                &dnormed,
                                grads.lm_head_grad(self),
                            ),
                            None => rec.zero(&dnormed),
                        }
                        dnormed
                    }
                };
                settle(rec, layers, &dnormed)?;
                let h_last = residual.last().expect("h_L");
                self.final_norm_backward(rec, h_last, rstd, &dnormed, &dx, grads);
            }
            None => {
                rec.zero(&dx);
                settle(rec, top, &dx)?;
            }
        }

        for layer in (0..top.min(layers)).rev() {
            residual.pop();
            let x = residual.last().expect("a block's input is kept");
            let saved = match save {
                SavePolicy::Everything => blocks.pop().expect("one saved block per block run"),
                _ => {
                    let mode = ProjectionMode {
                        adapters,
                        dropout,
                        layer,
                    };
                    let block = &self.blocks[layer];
                    self.block_forward(rec, block, x, batch, mode, KvTarget::Fresh)
                        .1
                }
            };
            let dx_in = Tensor::empty(gpu, [batch.rows(), cols], DType::F32);
            self.block_backward(
                rec,
                &self.blocks[layer],
                x,
                &saved,
                batch,
                &dx,
                &dx_in,
                &grads.blocks[layer],
            );
            drop(saved);
            dx = dx_in;
            settle(rec, layer, &dx)?;
            rec.flush();
        }

        if let Some(dembed) = &grads.embed {
            let index = EmbeddingGradIndex::new(gpu, &batch.padded_ids)?;
            for (first, chunk) in dembed.parts() {
                embedding_backward(rec, &index, &dx, chunk, first);
            }
        }
        Ok(tapped)
    }
}

/// The last real row of each sequence of `h [B·T, C]`, as `[B, C]` (one gather, however many
/// sequences).
fn last_rows(rec: &mut Recorder, h: &Tensor, batch: &Batch) -> Result<Tensor> {
    let cols = h.dims()[1];
    let gpu = rec.gpu();
    let out = Tensor::empty(gpu, [batch.batch, cols], DType::F32);
    let rows: Vec<u32> = batch
        .lens
        .iter()
        .enumerate()
        .map(|(b, &len)| (b * batch.seq + len - 1) as u32)
        .collect();
    let rows = Tensor::from_u32(gpu, [batch.batch], &rows)?;
    embedding_forward(rec, &rows, h, 0, &out);
    Ok(out)
}
