//! Hooks: what a pass of the block-loop runner does to the residual stream at a hidden-state
//! index, on the GPU, inside the recorded pass (and at every decoding step): capture it, add a
//! vector, replace it, project a direction out of it, or clamp it along one. Each edit has its
//! backward, so that a pass with hooks can be differentiated.
//!
//! Hidden-state indices follow transformers' `output_hidden_states`: 0 is the token embedding,
//! `i` (1 ≤ i < L) the residual stream after block `i − 1`, and `L` the final norm's output.

use super::batch::Batch;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::hook::{hook_add, hook_project, hook_replace, ProjectMode, RowEdit};
use crate::ops::pool::{pool_backward, pool_forward, Pool};
use crate::ops::residual::accumulate;
use crate::{Error, Result};

/// The positions of each sequence a hook acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every real (non-padding) position.
    All,
    /// The last real position of each sequence (while decoding: the newest token).
    Last,
    /// Positions `start .. start + len` of each sequence (absolute positions, counting the
    /// tokens already in a KV cache), where they exist.
    Span {
        /// The first position, counted from the sequence's first token.
        start: usize,
        /// How many positions; those past a sequence's end are skipped.
        len: usize,
    },
}

/// What a hook reads out of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// One `[B, C]` embedding per sequence: the last real position's or the mean over them.
    Pooled(Pool),
    /// The whole hidden state `[B·T, C]`.
    Whole,
}

/// What a hook does at its hidden state.
#[derive(Debug, Clone)]
pub enum HookAction {
    /// Reads the hidden state (see [`Forward::captured`](super::Forward::captured)); changes
    /// nothing.
    Capture(Capture),
    /// `h += scale · value` at the selected positions; `value` is `[1, C]` (the same vector
    /// everywhere) or `[n, C]` (the i-th selected row of the batch, sequences in order, takes
    /// row i % n).
    Add {
        /// f32 `[1, C]` or `[n, C]`.
        value: Tensor,
        /// Multiplies `value` (1 from [`Hook::add`]).
        scale: f32,
    },
    /// `h = value` at the selected positions (value shaped as for `Add`).
    Replace {
        /// f32 `[1, C]` or `[n, C]`, rows taken as for `Add`.
        value: Tensor,
    },
    /// Removes the component along `direction` (`[1, C]`, any length).
    ProjectOut {
        /// f32 `[1, C]`; a zero vector changes nothing.
        direction: Tensor,
    },
    /// Where the linear score `h·w + bias` exceeds `threshold`, moves `h` along `w` by the
    /// least amount that brings it down to the threshold (`w = direction`, `[1, C]`): SCAV's
    /// closed-form step, with a probe's logit clamped at σ⁻¹(P0). It has no backward.
    ClampAbove {
        /// The probe's weight `w`, f32 `[1, C]`.
        direction: Tensor,
        /// The probe's bias, added to `h·w`.
        bias: f32,
        /// The largest score a position keeps.
        threshold: f32,
    },
}

/// One hook of a pass: an action at a hidden-state index, at some positions.
#[derive(Debug, Clone)]
pub struct Hook {
    /// The hidden-state index (0 ..= L).
    pub hidden: usize,
    /// Which positions of each sequence an edit touches (a capture reads them all).
    pub positions: Positions,
    /// What it does there.
    pub action: HookAction,
}

impl Hook {
    /// Pooled capture of hidden state `hidden` (`[B, C]`).
    pub fn capture(hidden: usize, pool: Pool) -> Hook {
        Hook {
            hidden,
            positions: Positions::All,
            action: HookAction::Capture(Capture::Pooled(pool)),
        }
    }

    /// Capture of the whole hidden state `hidden` (`[B·T, C]`).
    pub fn capture_whole(hidden: usize) -> Hook {
        Hook {
            hidden,
            positions: Positions::All,
            action: HookAction::Capture(Capture::Whole),
        }
    }

    /// `h += value` at `positions` of hidden state `hidden`.
    pub fn add(hidden: usize, positions: Positions, value: Tensor) -> Hook {
        Hook {
            hidden,
            positions,
            action: HookAction::Add { value, scale: 1.0 },
        }
    }

    fn value(&self) -> Option<&Tensor> {
        match &self.action {
            HookAction::Capture(_) => None,
            HookAction::Add { value, .. } | HookAction::Replace { value } => Some(value),
            HookAction::ProjectOut { direction } | HookAction::ClampAbove { direction, .. } => {
                Some(direction)
            }
        }
    }

    /// Checks the index against a model of `layers` blocks and the value's width.
    pub(crate) fn check(&self, layers: usize, cols: usize) -> Result<()> {
        if self.hidden > layers {
            return Err(Error::InvalidArgument(format!(
                "a hook at hidden state {} (the model has 0..={layers})",
                self.hidden
            )));
        }
        if let Some(v) = self.value() {
            let fits = v.dtype() == DType::F32 && v.dims().len() == 2 && v.dims()[1] == cols;
            let one_row = !matches!(
                self.action,
                HookAction::Add { .. } | HookAction::Replace { .. }
            );
            if !fits || (one_row && v.dims()[0] != 1) {
                return Err(Error::InvalidArgument(format!(
                    "the value of a hook at hidden state {} must be f32 [{}, {cols}], got {v:?}",
                    self.hidden,
                    if one_row { "1" } else { "n" }
                )));
            }
        }
        Ok(())
    }
}

/// Where a pass's positions sit: a fresh batch (no `past`), or new tokens after `past[b]`
/// cached ones in row `b`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PositionFrame<'a> {
    pub past: &'a [usize],
}

impl PositionFrame<'_> {
    /// Tokens cached before row `b`'s new ones.
    fn past(&self, b: usize) -> usize {
        self.past.get(b).copied().unwrap_or(0)
    }
}

/// A hook with its positions resolved to rows of `[B·T, C]` for one pass.
#[derive(Debug, Clone)]
pub(crate) struct BoundHook {
    pub hook: Hook,
    /// Row indices (`u32 [n]`); `None` when the hook selects no row in this pass.
    pub rows: Option<Tensor>,
}

/// The rows of `batch` that `positions` selects, in sequence order.
fn select_rows(batch: &Batch, positions: Positions, frame: PositionFrame) -> Vec<u32> {
    let mut rows = Vec::new();
    for (b, &len) in batch.lens.iter().enumerate() {
        let first = b * batch.seq;
        let chosen = match positions {
            Positions::All => 0..len,
            Positions::Last => len - 1..len,
            Positions::Span { start, len: n } => {
                let lo = start.saturating_sub(frame.past(b)).min(len);
                let hi = (start + n).saturating_sub(frame.past(b)).min(len);
                lo..hi
            }
        };
        rows.extend(chosen.map(|t| (first + t) as u32));
    }
    rows
}

/// Resolves `hooks` against `batch` (uploading each one's row list).
pub(crate) fn bind_hooks(
    gpu: &Gpu,
    hooks: &[Hook],
    batch: &Batch,
    frame: PositionFrame,
) -> Result<Vec<BoundHook>> {
    hooks
        .iter()
        .map(|hook| {
            let rows = select_rows(batch, hook.positions, frame);
            let rows = if rows.is_empty() {
                None
            } else {
                Some(Tensor::from_u32(gpu, [rows.len()], &rows)?)
            };
            Ok(BoundHook {
                hook: hook.clone(),
                rows,
            })
        })
        .collect()
}

/// Applies every hook at `index` to `h [B·T, C]`, in the order given; returns the captures
/// (hook number, tensor).
pub(crate) fn apply_hooks(
    rec: &mut Recorder,
    hooks: &[BoundHook],
    index: usize,
    h: &Tensor,
    batch: &Batch,
) -> Vec<(usize, Tensor)> {
    let mut captures = Vec::new();
    for (number, bound) in hooks.iter().enumerate() {
        if bound.hook.hidden != index {
            continue;
        }
        if let HookAction::Capture(capture) = bound.hook.action {
            captures.push((number, capture_hidden(rec, h, batch, capture)));
            continue;
        }
        let Some(rows) = &bound.rows else { continue };
        let edit = |value| RowEdit { x: h, rows, value };
        match &bound.hook.action {
            HookAction::Capture(_) => unreachable!("handled above"),
            HookAction::Add { value, scale } => hook_add(rec, &edit(value), *scale),
            HookAction::Replace { value } => hook_replace(rec, &edit(value)),
            HookAction::ProjectOut { direction } => {
                hook_project(rec, &edit(direction), ProjectMode::Exact { bias: 0.0 })
            }
            HookAction::ClampAbove {
                direction,
                bias,
                threshold,
            } => hook_project(
                rec,
                &edit(direction),
                ProjectMode::ClampAbove {
                    bias: *bias,
                    threshold: *threshold,
                },
            ),
        }
    }
    captures
}

fn capture_hidden(rec: &mut Recorder, h: &Tensor, batch: &Batch, capture: Capture) -> Tensor {
    let gpu = rec.gpu();
    let cols = h.dims()[1];
    match capture {
        Capture::Pooled(pool) => {
            let pooled = Tensor::empty(gpu, [batch.batch, cols], DType::F32);
            let h = h.reshape([batch.batch, batch.seq, cols]);
            pool_forward(rec, &h, &batch.seq_lens, pool, &pooled);
            pooled
        }
        Capture::Whole => {
            let copy = Tensor::empty(gpu, h.shape().clone(), DType::F32);
            rec.copy(h, &copy);
            copy
        }
    }
}

/// The backward of the hooks at `index`, in reverse order, applied to `dh` (the gradient at
/// the hidden state after them) in place: afterwards `dh` is the gradient before them. A
/// capture with a gradient in `capture_grads` (hook number, gradient of what it captured)
/// adds it where it read.
pub(crate) fn hooks_backward(
    rec: &mut Recorder,
    hooks: &[BoundHook],
    index: usize,
    dh: &Tensor,
    capture_grads: &[(usize, Tensor)],
    batch: &Batch,
) -> Result<()> {
    for (number, bound) in hooks.iter().enumerate().rev() {
        if bound.hook.hidden != index {
            continue;
        }
        if let HookAction::Capture(capture) = bound.hook.action {
            for (_, grad) in capture_grads.iter().filter(|(n, _)| *n == number) {
                capture_backward(rec, grad, dh, batch, capture);
            }
            continue;
        }
        let Some(rows) = &bound.rows else { continue };
        let edit = |value| RowEdit { x: dh, rows, value };
        match &bound.hook.action {
            // Adding a constant leaves the gradient as it is.
            HookAction::Capture(_) | HookAction::Add { .. } => {}
            HookAction::Replace { .. } => {
                // Replaced rows did not depend on what came before.
                let zero = Tensor::empty(rec.gpu(), [1, dh.dims()[1]], DType::F32);
                rec.zero(&zero);
                hook_replace(rec, &edit(&zero));
            }
            // I − wwᵀ/|w|² is symmetric: the gradient goes through the same projection.
            HookAction::ProjectOut { direction } => {
                hook_project(rec, &edit(direction), ProjectMode::Exact { bias: 0.0 })
            }
            HookAction::ClampAbove { .. } => {
                return Err(Error::InvalidArgument(format!(
                    "the clamp hook at hidden state {index} has no backward; run the pass \
                     without gradients"
                )))
            }
        }
    }
    Ok(())
}

/// `dh += ∂(capture)/∂h · grad`: a pooled capture's gradient `[B, C]` goes to the positions
/// the pooling read, a whole capture's `[B·T, C]` everywhere.
fn capture_backward(
    rec: &mut Recorder,
    grad: &Tensor,
    dh: &Tensor,
    batch: &Batch,
    capture: Capture,
) {
    match capture {
        Capture::Pooled(pool) => {
            let cols = dh.dims()[1];
            let dh = dh.reshape([batch.batch, batch.seq, cols]);
            pool_backward(rec, grad, &batch.seq_lens, pool, &dh);
        }
        Capture::Whole => accumulate(rec, grad, dh, 1.0),
    }
}

/// Checks a gradient for what hook number `hook` of `hooks` captured on `batch`: the hook is a
/// capture, and the gradient has the capture's shape.
pub(crate) fn check_capture_grad(
    hooks: &[BoundHook],
    hook: usize,
    grad: &Tensor,
    batch: &Batch,
    cols: usize,
) -> Result<()> {
    let capture = match hooks.get(hook).map(|b| &b.hook.action) {
        Some(HookAction::Capture(capture)) => *capture,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "hook {hook} of the pass is not a capture: only a capture's output has a \
                 gradient to seed"
            )))
        }
    };
    let rows = match capture {
        Capture::Pooled(_) => batch.batch,
        Capture::Whole => batch.rows(),
    };
    if grad.dtype() != DType::F32 || grad.numel() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "the gradient of capture {hook} must be f32 [{rows}, {cols}], got {grad:?}"
        )));
    }
    Ok(())
}
