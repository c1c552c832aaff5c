//! The block loop's tensors in the plan's walk: the forward (`Transformer::run_with`, a
//! block's `BlockActivations`), the LM head's chunks, the projections with their adapters, and
//! the backward (`model/backward.rs`).

use super::{Fwd, PassSpec, Rows, Walk};
use crate::es2::plan::{ledger::Id, Component};
use crate::gpu::rows_per_binding;
use crate::model::{Projection, SavePolicy};
use crate::ops::attention::{attention_backward_scratch_bytes, AttentionShape};
use crate::ops::matmul::{gemm_scratch_bytes, Gemm};
use crate::ops::reduce::sum_rows_scratch_bytes;
use crate::ops::rmsnorm::rmsnorm_backward_scratch_bytes;

impl Walk<'_> {
    /// The block loop's forward (`Transformer::run_with`).
    pub(super) fn forward(&mut self, rows: Rows, pass: &PassSpec) -> Fwd {
        let c = self.cfg;
        let (r, cols) = (rows.rows(), c.hidden_size);
        let layers = c.num_hidden_layers;
        let kept = match pass.save {
            SavePolicy::Nothing => Component::Workspace,
            _ => Component::Activations,
        };
        let hook_rows = pass
            .hooks
            .iter()
            .map(|_| self.ledger.u32("a hook's rows", r))
            .collect();
        let mut fwd = Fwd {
            residual: vec![self.ledger.f32(kept, "the residual stream", &[r, cols])],
            normed: Vec::new(),
            blocks: Vec::new(),
            captures: Vec::new(),
            capture_grads: Vec::new(),
            normed_seed: None,
            hook_rows,
            save: pass.save,
            top: pass.top,
        };
        for layer in 0..pass.top.min(layers) {
            let saved_part = if pass.save == SavePolicy::Everything {
                Component::Activations
            } else {
                Component::Workspace
            };
            let adapters = pass.adapters;
            let (out, saved) = self.block_forward(rows, adapters, saved_part, kept);
            if layer + 1 < layers {
                self.capture(rows, pass, layer + 1, &mut fwd.captures);
            }
            if pass.save == SavePolicy::Everything {
                fwd.blocks.push(saved);
            } else {
                self.ledger.drop_all(saved);
            }
            if pass.save == SavePolicy::Nothing {
                let residual = std::mem::take(&mut fwd.residual);
                self.ledger.drop_all(residual);
            }
            fwd.residual.push(out);
            self.ledger.flush();
        }
        if pass.top == layers {
            fwd.normed = vec![
                self.ledger.f32(kept, "the final norm's output", &[r, cols]),
                self.ledger.f32(kept, "the final norm's rstd", &[r]),
            ];
            self.capture(rows, pass, layers, &mut fwd.captures);
        }
        fwd
    }

    /// Pooled captures at hidden state `index` (`capture_hidden`).
    fn capture(&mut self, rows: Rows, pass: &PassSpec, index: usize, into: &mut Vec<Id>) {
        for _ in pass.hooks.iter().filter(|&&h| h == index) {
            let cols = self.cfg.hidden_size;
            into.push(self.ledger.f32(
                Component::Workspace,
                "a pooled embedding",
                &[rows.batch, cols],
            ));
        }
    }

    /// The LM head's products over row parts and vocabulary chunks (`VocabMatrix::project`,
    /// `project_backward`): their split-K scratch. A product writes a dense output only when
    /// there is one chunk and one part.
    pub(super) fn lm_head_scratch(&mut self, rows: usize, backward: bool) {
        let (v, cols) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let chunks = self.vocab_chunks();
        let part = rows_per_binding(rows, v, self.device.max_binding_size);
        let whole = chunks.len() == 1 && part >= rows;
        for start in (0..rows).step_by(part) {
            let m = part.min(rows - start);
            for &n in &chunks {
                let products = if backward {
                    // dx (dense when whole) and, under full fine-tuning, the head's gradient.
                    let mut g = vec![(Gemm::dense(m, cols, n, false, false), !whole)];
                    if self.full {
                        g.push((Gemm::dense(n, cols, m, true, false), false));
                    }
                    g
                } else {
                    vec![(Gemm::dense(m, n, cols, false, true), !whole)]
                };
                for (g, unsplittable) in products {
                    let bytes = gemm_scratch_bytes(&g, unsplittable, self.device.cpu);
                    self.ledger.scratch("the LM head's partial products", bytes);
                }
            }
        }
    }

    /// One block's forward (`Transformer::block_forward`): returns its output and the tensors
    /// of `BlockActivations` (with the adapters' `LoraActivations`); its temporaries (the
    /// projections' outputs before RoPE and before the residual adds) are dropped.
    fn block_forward(
        &mut self,
        rows: Rows,
        adapters: bool,
        saved_part: Component,
        out_part: Component,
    ) -> (Id, Vec<Id>) {
        let c = self.cfg;
        let r = rows.rows();
        let (cols, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut saved = Vec::new();
        let mut keep = |walk: &mut Self, name: &str, dims: &[usize]| {
            let id = walk.ledger.f32(saved_part, name, dims);
            saved.push(id);
        };
        keep(self, "attn_in", &[r, cols]);
        keep(self, "attn_rstd", &[r]);
        let mut lora = Vec::new();
        let q_raw = self.project(Projection::Q, r, adapters, &mut lora, saved_part);
        let k_raw = self.project(Projection::K, r, adapters, &mut lora, saved_part);
        let v = self.project(Projection::V, r, adapters, &mut lora, saved_part);
        keep(self, "q", &[r, q]);
        keep(self, "k", &[r, kv]);
        keep(self, "attn", &[r, q]);
        keep(self, "lse", &[rows.batch, c.num_attention_heads, rows.seq]);
        let o = self.project(Projection::O, r, adapters, &mut lora, saved_part);
        keep(self, "mid", &[r, cols]);
        keep(self, "mlp_in", &[r, cols]);
        keep(self, "mlp_rstd", &[r]);
        let gate = self.project(Projection::Gate, r, adapters, &mut lora, saved_part);
        let up = self.project(Projection::Up, r, adapters, &mut lora, saved_part);
        keep(self, "act", &[r, ffn]);
        let down = self.project(Projection::Down, r, adapters, &mut lora, saved_part);
        let out = self.ledger.f32(out_part, "a block's output", &[r, cols]);
        // q_raw, k_raw, o and down are temporaries; v, gate and up are saved.
        self.ledger.drop_all([q_raw, k_raw, o, down]);
        let mut all = saved;
        all.extend([v, gate, up]);
        all.extend(lora);
        (out, all)
    }

    /// A projection's forward (`Linear::forward`): its output and, with adapters, the
    /// adapter's saved input (after dropout) and hidden state, plus the products' scratch.
    fn project(
        &mut self,
        p: Projection,
        rows: usize,
        adapters: bool,
        lora: &mut Vec<Id>,
        saved_part: Component,
    ) -> Id {
        let (out, inp) = self.cfg.projection_shape(p);
        // A saved output (v, gate, up) has the saved tensors' component; the others are
        // dropped before the block's submission, which the caller does.
        let part = match p {
            Projection::V | Projection::Gate | Projection::Up => saved_part,
            _ => Component::Workspace,
        };
        let y = self.ledger.f32(part, "a projection's output", &[rows, out]);
        let bias = self.cfg.projection_has_bias(p);
        let forward = Gemm::dense(rows, out, inp, false, true);
        let bytes = gemm_scratch_bytes(&forward, bias, self.device.cpu);
        self.ledger
            .scratch("a projection's partial products", bytes);
        let Some(rank) = self.adapter_rank(p).filter(|_| adapters) else {
            return y;
        };
        if self.dropout {
            lora.push(
                self.ledger
                    .f32(saved_part, "an adapter's input", &[rows, inp]),
            );
        }
        lora.push(
            self.ledger
                .f32(saved_part, "an adapter's hidden state", &[rows, rank]),
        );
        for g in [
            Gemm::dense(rows, rank, inp, false, true),
            Gemm::dense(rows, out, rank, false, true),
        ] {
            let bytes = gemm_scratch_bytes(&g, false, self.device.cpu);
            self.ledger.scratch("an adapter's partial products", bytes);
        }
        y
    }

    /// The rank of projection `p`'s adapter, when it has one.
    fn adapter_rank(&self, p: Projection) -> Option<usize> {
        self.lora.filter(|l| l.targets.contains(&p)).map(|l| l.rank)
    }

    /// The block loop's backward (`Transformer::backward`), from seeds at hidden states (the
    /// final norm's output among them); with [`SavePolicy::BlockInputs`] each block runs
    /// forward again.
    pub(super) fn backward(&mut self, rows: Rows, fwd: Fwd) {
        let c = self.cfg;
        let (r, cols) = (rows.rows(), c.hidden_size);
        let layers = c.num_hidden_layers;
        let ws = Component::Workspace;
        let Fwd {
            mut residual,
            normed,
            mut blocks,
            captures,
            capture_grads,
            normed_seed,
            hook_rows,
            save,
            top,
        } = fwd;
        self.ledger.drop_all(captures);
        let mut dx = self.ledger.f32(ws, "the residual's gradient", &[r, cols]);
        if !normed.is_empty() {
            if normed_seed.is_none() {
                self.ledger
                    .temp("the final norm's output gradient", &[r, cols]);
            }
            let bytes = rmsnorm_backward_scratch_bytes(r, cols, self.full);
            self.ledger.scratch("the final norm's partials", bytes);
        }
        for _ in (0..top.min(layers)).rev() {
            if let Some(h) = residual.pop() {
                self.ledger.drop(h);
            }
            let saved = match save {
                SavePolicy::Everything => blocks.pop().unwrap_or_default(),
                _ => {
                    let (out, saved) = self.block_forward(rows, true, ws, ws);
                    self.ledger.drop(out);
                    saved
                }
            };
            let dx_in = self.ledger.f32(ws, "the residual's gradient", &[r, cols]);
            self.block_backward(rows);
            self.ledger.drop_all(saved);
            self.ledger.drop(dx);
            dx = dx_in;
            self.ledger.flush();
        }
        if self.full {
            // EmbeddingGradIndex: the distinct ids, their offsets, the positions.
            let distinct = r.min(c.vocab_size);
            let index = [
                self.ledger.u32("distinct ids", distinct),
                self.ledger.u32("id offsets", distinct + 1),
                self.ledger.u32("id positions", r),
            ];
            self.ledger.drop_all(index);
        }
        self.ledger.drop(dx);
        let held = residual.into_iter().chain(normed).chain(hook_rows);
        let held = held.chain(capture_grads).chain(normed_seed);
        self.ledger.drop_all(held);
    }

    /// One block's backward (`Transformer::block_backward`): its temporaries, all released
    /// at the block's submission.
    fn block_backward(&mut self, rows: Rows) {
        let c = self.cfg;
        let r = rows.rows();
        let (cols, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        self.ledger.temp("dact", &[r, ffn]);
        self.project_backward(Projection::Down, r);
        self.ledger.temp("dgate", &[r, ffn]);
        self.ledger.temp("dup", &[r, ffn]);
        self.ledger.temp("dmlp_in", &[r, cols]);
        self.project_backward(Projection::Gate, r);
        self.project_backward(Projection::Up, r);
        self.ledger.temp("dmid", &[r, cols]);
        let norm = rmsnorm_backward_scratch_bytes(r, cols, self.full);
        self.ledger.scratch("a norm's partials", norm);
        self.ledger.temp("dattn", &[r, q]);
        self.project_backward(Projection::O, r);
        self.ledger.temp("dq", &[r, q]);
        self.ledger.temp("dk", &[r, kv]);
        self.ledger.temp("dv", &[r, kv]);
        let shape = AttentionShape::training(
            rows.batch,
            rows.seq,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let stats = attention_backward_scratch_bytes(&shape);
        self.ledger.scratch("attention's row statistics", stats);
        self.ledger.temp("dq_raw", &[r, q]);
        self.ledger.temp("dk_raw", &[r, kv]);
        self.ledger.temp("dattn_in", &[r, cols]);
        for p in [Projection::Q, Projection::K, Projection::V] {
            self.project_backward(p, r);
        }
        self.ledger.scratch("a norm's partials", norm);
    }

    /// A projection's backward (`Linear::backward`): the products' scratch, and the adapter's
    /// temporaries.
    fn project_backward(&mut self, p: Projection, rows: usize) {
        let (out, inp) = self.cfg.projection_shape(p);
        let mut products = vec![Gemm::dense(rows, inp, out, false, false)];
        if self.full {
            products.push(Gemm::dense(out, inp, rows, true, false));
            if self.cfg.projection_has_bias(p) {
                let bytes = sum_rows_scratch_bytes(rows, out);
                self.ledger.scratch("a bias gradient's partials", bytes);
            }
        }
        if let Some(rank) = self.adapter_rank(p) {
            products.extend([
                Gemm::dense(out, rank, rows, true, false),
                Gemm::dense(rows, rank, out, false, false),
                Gemm::dense(rank, inp, rows, true, false),
                Gemm::dense(rows, inp, rank, false, false),
            ]);
            self.ledger
                .scratch("an adapter's hidden gradient", (rows * rank * 4) as u64);
            if self.dropout {
                self.ledger
                    .scratch("an adapter's input gradient", (rows * inp * 4) as u64);
                self.ledger
                    .scratch("an adapter's input gradient", (rows * inp * 4) as u64);
            }
        }
        for g in products {
            let bytes = gemm_scratch_bytes(&g, false, self.device.cpu);
            self.ledger
                .scratch("a projection's partial products", bytes);
        }
    }
}
