//! One training step walked tensor by tensor, as the engines record it: what the run keeps
//! for its whole length, the step's batches, objective, optimizer and uniforms. The block
//! loop's forward and backward are in `walk/blocks.rs`.

mod blocks;

use super::ledger::{Bound, Id, Key, Ledger};
use super::{Component, DeviceLimits, MemoryPlan, PlanSettings};
use crate::es2::objective::{embedding_index, Es2Config};
use crate::es2::train_config::{Task, TrainConfig};
use crate::gpu::{rows_per_binding, DType, UNIFORM_CHUNK_BYTES};
use crate::model::head::head_chunks;
use crate::model::{Config, LoraConfig, Projection, SavePolicy};
use crate::ops::grad_norm::grad_norm_scratch_bytes;

/// The shape of one batch: every sequence at full length, as the plan assumes.
#[derive(Debug, Clone, Copy)]
struct Rows {
    batch: usize,
    seq: usize,
}

impl Rows {
    fn rows(self) -> usize {
        self.batch * self.seq
    }
}

/// One pass through the block loop (`runner.rs`'s `Pass`), as far as memory goes.
struct PassSpec {
    save: SavePolicy,
    adapters: bool,
    /// Hidden-state indices of the pooled captures.
    hooks: Vec<usize>,
    /// The highest hidden state computed.
    top: usize,
}

/// What a forward holds (`runner.rs`'s `Forward`).
struct Fwd {
    residual: Vec<Id>,
    normed: Vec<Id>,
    blocks: Vec<Vec<Id>>,
    captures: Vec<Id>,
    capture_grads: Vec<Id>,
    /// The gradient at the final norm's output the LM head's loss made (`Seeds::normed`): the
    /// backward goes on from it instead of a zeroed tensor of its own.
    normed_seed: Option<Id>,
    hook_rows: Vec<Id>,
    save: SavePolicy,
    top: usize,
}

/// One step of a run, walked tensor by tensor.
pub(super) struct Walk<'a> {
    cfg: &'a Config,
    /// The adapters of a LoRA run.
    lora: Option<&'a LoraConfig>,
    /// Every weight trains.
    full: bool,
    dropout: bool,
    /// The frozen matrices' element type.
    frozen_matrices: DType,
    save: SavePolicy,
    device: DeviceLimits,
    /// Numbers of elements of each trained tensor (the gradient norm's scratch).
    trained: Vec<usize>,
    ledger: Ledger,
}

impl<'a> Walk<'a> {
    pub(super) fn new(cfg: &'a Config, run: &'a TrainConfig, device: &DeviceLimits) -> Self {
        Walk {
            cfg,
            lora: run.lora.as_ref(),
            full: run.lora.is_none(),
            dropout: run.lora.as_ref().is_some_and(|l| l.dropout > 0.0),
            frozen_matrices: run.weights_dtype.resolve(cfg),
            save: run.save_policy(),
            device: device.clone(),
            trained: Vec::new(),
            ledger: Ledger::default(),
        }
    }

    pub(super) fn finish(self, run: &TrainConfig) -> MemoryPlan {
        let l = &self.ledger;
        let components: Vec<(Component, u64)> = Component::ALL
            .iter()
            .map(|&c| (c, l.at_peak[c.index()]))
            .collect();
        let total = l.pool_bytes();
        let batches = match run.task {
            Task::Es2 => vec![run.harmful_batch, run.harmless_batch],
            Task::Sft => vec![run.sft_batch],
        };
        MemoryPlan {
            parameters: self.cfg.parameter_count(),
            settings: PlanSettings {
                task: run.task,
                lora: run.lora.clone(),
                frozen_matrices: self.frozen_matrices,
                recompute: run.recompute,
                batches,
                max_len: run.max_len,
            },
            components,
            idle: total.saturating_sub(l.peak),
            total,
            largest: l.largest.clone(),
            largest_binding: l.largest_binding.clone(),
            device: self.device,
        }
    }

    // ---- What lives across steps: weights, adapters, gradients, moments ----

    /// The rows of each chunk of a vocabulary-sized matrix (`VocabMatrix::load`).
    fn vocab_chunks(&self) -> Vec<usize> {
        let (v, c) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let per = rows_per_binding(v, c, self.device.max_binding_size);
        (0..v)
            .step_by(per)
            .map(|start| per.min(v - start))
            .collect()
    }

    /// Every tensor of the model (`Transformer::from_source`): `(component, name, elements,
    /// dtype)`. The matrices (projections, embedding, LM head) are `matrices` (f32, or f16 or
    /// bf16 for frozen weights only).
    fn model_tensors(
        &self,
        trained: bool,
        matrices: DType,
    ) -> Vec<(Component, &'static str, usize, DType)> {
        let c = self.cfg;
        let f32_part = if trained {
            Component::Trained
        } else {
            Component::FrozenF32
        };
        let (proj_part, proj_dtype) = match (trained, matrices) {
            (true, _) => (Component::Trained, DType::F32),
            (false, DType::F32) => (Component::FrozenF32, DType::F32),
            (false, narrow) => (Component::Frozen16, narrow),
        };
        let mut out = Vec::new();
        let vocab = |out: &mut Vec<_>, name| {
            for rows in self.vocab_chunks() {
                out.push((proj_part, name, rows * c.hidden_size, proj_dtype));
            }
        };
        vocab(&mut out, "the embedding");
        for _ in 0..c.num_hidden_layers {
            out.push((f32_part, "a norm weight", c.hidden_size, DType::F32));
            out.push((f32_part, "a norm weight", c.hidden_size, DType::F32));
            for p in Projection::ALL {
                let (rows, cols) = c.projection_shape(p);
                out.push((proj_part, "a projection weight", rows * cols, proj_dtype));
                if c.projection_has_bias(p) {
                    out.push((f32_part, "a bias", rows, DType::F32));
                }
            }
        }
        out.push((f32_part, "the final norm", c.hidden_size, DType::F32));
        if !c.tie_word_embeddings {
            vocab(&mut out, "the LM head");
        }
        out
    }

    /// The adapters (`Transformer::attach_lora`): `A [r, in]`, `B [out, r]` per target.
    fn adapter_tensors(&self) -> Vec<usize> {
        let Some(lora) = self.lora else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            for &p in &lora.targets {
                let (rows, cols) = self.cfg.projection_shape(p);
                out.extend([lora.rank * cols, rows * lora.rank]);
            }
        }
        out
    }

    /// Weights, adapters, the frozen copy of a full ES2 run, the engine's gradients, AdamW's
    /// moments (`Gradients::new`, `AdamW::new`) and ES2's per-layer constants (`BaseTensors`).
    pub(super) fn persistent(&mut self, es2_layers: &[usize]) {
        let full = self.full;
        // The tuned model: f32 and trained under --full, the frozen base of a LoRA run.
        let tuned = if full {
            DType::F32
        } else {
            self.frozen_matrices
        };
        let mut tensors = self.model_tensors(full, tuned);
        let es2 = !es2_layers.is_empty();
        if full && es2 {
            tensors.extend(self.model_tensors(false, self.frozen_matrices));
        }
        for (component, name, n, dtype) in tensors {
            let bytes = (n * dtype.size_bytes()) as u64;
            let bound = if name == "the embedding" || name == "the LM head" {
                Bound::InParts
            } else {
                Bound::Whole
            };
            self.ledger.take(component, name, bytes, bound);
        }
        let rope = self.cfg.head_dim / 2;
        self.ledger
            .f32(Component::FrozenF32, "RoPE frequencies", &[rope]);
        let trained: Vec<usize> = if full {
            self.model_tensors(true, DType::F32)
                .into_iter()
                .map(|(_, _, n, _)| n)
                .collect()
        } else {
            self.adapter_tensors()
        };
        for &n in &trained {
            if !full {
                self.ledger.f32(Component::Trained, "a LoRA matrix", &[n]);
            }
            self.ledger.f32(Component::Gradients, "a gradient", &[n]);
        }
        for _ in 0..2 {
            for &n in &trained {
                self.ledger.f32(Component::Moments, "an AdamW moment", &[n]);
            }
        }
        self.ledger
            .f32(Component::Moments, "the gradient norm", &[1]);
        self.trained = trained;
        if es2 {
            let (l, c) = (es2_layers.len(), self.cfg.hidden_size);
            for dims in [&[l][..], &[l], &[l, c]] {
                self.ledger
                    .f32(Component::Workspace, "ES2's base constants", dims);
            }
        }
    }

    // ---- One step ----

    /// A batch's tensors (`Batch::new`, `Batch::with_targets`).
    fn batch(&mut self, rows: Rows, targets: bool) {
        self.ledger.u32("token ids", rows.rows());
        self.ledger.u32("sequence lengths", rows.batch);
        if targets {
            self.ledger.u32("targets", rows.rows());
        }
    }

    /// `Es2Engine::step`: the base logits, the tuned forwards of both batches, the fused
    /// losses, both backwards, the gradient norm and AdamW, one readback.
    pub(super) fn es2_step(&mut self, run: &TrainConfig, layers: &[usize]) {
        let c = self.cfg;
        let seq = run.max_len;
        let h = Rows {
            batch: run.harmful_batch,
            seq,
        };
        let s = Rows {
            batch: run.harmless_batch,
            seq,
        };
        self.batch(h, false);
        self.batch(s, false);
        self.uniforms();
        let base = PassSpec {
            save: SavePolicy::Nothing,
            adapters: false,
            hooks: Vec::new(),
            top: c.num_hidden_layers,
        };
        // Only the base forward's final-norm output is kept.
        let base_fwd = self.forward(s, &base);
        let base_rstd = base_fwd.normed.get(1).copied();
        let held = base_fwd.residual.into_iter().chain(base_rstd);
        self.ledger.drop_all(held.chain(base_fwd.hook_rows));
        let hooks: Vec<usize> = layers.iter().map(|&l| embedding_index(l)).collect();
        let tuned = |top| PassSpec {
            save: self.save,
            adapters: true,
            hooks: hooks.clone(),
            top,
        };
        let s_pass = tuned(c.num_hidden_layers);
        let h_pass = tuned(hooks.iter().copied().max().unwrap_or(0));
        let mut s_fwd = self.forward(s, &s_pass);
        let mut h_fwd = self.forward(h, &h_pass);
        let ([h_grads, s_grads], seed) = self.objective(&run.objective, layers.len(), h, s);
        h_fwd.capture_grads = h_grads;
        s_fwd.capture_grads = s_grads;
        s_fwd.normed_seed = Some(seed);
        self.ledger.drop_all(base_fwd.normed.first().copied());
        self.backward(s, s_fwd);
        self.backward(h, h_fwd);
        self.optimizer();
        let packed = 2 * layers.len() + s.rows() + 1;
        self.ledger
            .f32(Component::Workspace, "the readback", &[packed]);
        self.ledger.flush();
    }

    /// `SftEngine::step`: forward with logits, the fused cross-entropy, backward, AdamW.
    pub(super) fn sft_step(&mut self, run: &TrainConfig) {
        let b = Rows {
            batch: run.sft_batch,
            seq: run.max_len,
        };
        self.batch(b, true);
        self.uniforms();
        let pass = PassSpec {
            save: self.save,
            adapters: true,
            hooks: Vec::new(),
            top: self.cfg.num_hidden_layers,
        };
        let mut fwd = self.forward(b, &pass);
        // Model::lm_loss: the per-row loss, the seed at the final norm's output, and per row
        // chunk the logits and their gradient.
        self.ledger
            .f32(Component::Workspace, "per-row loss", &[b.rows()]);
        let seed = self.head_loss(b.rows(), &["the logits' gradient"], true);
        fwd.normed_seed = Some(seed);
        self.backward(b, fwd);
        self.optimizer();
        self.ledger
            .f32(Component::Workspace, "the readback", &[b.rows() + 1]);
        self.ledger.flush();
    }

    /// The recorder's uniform arena: a chunk per 256 dispatches between two submissions. The
    /// most come after the last block's backward: the gradient norm and AdamW, one dispatch
    /// each per trained tensor, and a few more.
    fn uniforms(&mut self) {
        const SLOTS: usize = 256;
        let dispatches = 2 * self.trained.len() + 3;
        let key = Key {
            bytes: UNIFORM_CHUNK_BYTES,
            uniform: true,
        };
        for _ in 0..dispatches.div_ceil(SLOTS) {
            self.ledger
                .take_key(Component::Workspace, "launch parameters", key, Bound::Whole);
        }
    }

    /// `Transformer::head_in_chunks`: the gradient at the final norm's output `[rows, C]`
    /// (returned: the backward's seed) and, per row chunk submitted on its own, the chunk's
    /// logits, the loss's own `[chunk, V]` tensors (`extra`; a KL's first one is the base
    /// model's logits, made by a second head product) and the head's products.
    fn head_loss(&mut self, rows: usize, extra: &[&str], backward: bool) -> Id {
        let cols = self.cfg.hidden_size;
        let seed = self.ledger.f32(
            Component::Workspace,
            "the gradient at the final norm's output",
            &[rows, cols],
        );
        for chunk in head_chunks(rows, self.cfg.vocab_size) {
            let mut held = vec![self.logits_tensor("the logits of a row chunk", chunk.capacity)];
            self.lm_head_scratch(chunk.rows, false);
            for (i, name) in extra.iter().enumerate() {
                held.push(self.logits_tensor(name, chunk.capacity));
                if i == 0 && extra.len() > 1 {
                    self.lm_head_scratch(chunk.rows, false);
                }
            }
            if backward {
                self.lm_head_scratch(chunk.rows, true);
            }
            self.ledger.drop_all(held);
            self.ledger.flush();
        }
        seed
    }

    /// A `[rows, V]` f32 tensor, bound in row parts.
    fn logits_tensor(&mut self, name: &str, rows: usize) -> Id {
        let bytes = (rows * self.cfg.vocab_size * DType::F32.size_bytes()) as u64;
        self.ledger
            .take(Component::Logits, name, bytes, Bound::InParts)
    }

    /// `record_objective`: the stacked embeddings, the separation loss and its gradients, the
    /// KL over the LM head's row chunks, the captures' gradients (harmful, harmless) and the
    /// gradient at the harmless pass's final-norm output, which the backwards keep.
    fn objective(
        &mut self,
        config: &Es2Config,
        layers: usize,
        h: Rows,
        s: Rows,
    ) -> ([Vec<Id>; 2], Id) {
        let cols = self.cfg.hidden_size;
        let ledger = &mut self.ledger;
        let ws = Component::Workspace;
        let eh = ledger.f32(ws, "harmful embeddings", &[layers, h.batch, cols]);
        let es = ledger.f32(ws, "harmless embeddings", &[layers, s.batch, cols]);
        ledger.f32(ws, "per-layer distances", &[2, layers]);
        let deh = ledger.f32(ws, "harmful embeddings' gradient", &[layers, h.batch, cols]);
        let to_harmless = config.separation_options().grad_to_harmless();
        let des = to_harmless.then(|| {
            ledger.f32(
                ws,
                "harmless embeddings' gradient",
                &[layers, s.batch, cols],
            )
        });
        if !to_harmless {
            ledger.scratch("a stand-in", 4);
        }
        let mask = ledger.u32("the KL's position mask", s.rows());
        ledger.f32(ws, "per-position KL", &[s.rows()]);
        let kl = [eh, es, deh, mask].into_iter().chain(des);
        ledger.drop_all(kl.collect::<Vec<_>>());
        let seed = self.head_loss(
            s.rows(),
            &[
                "the base model's logits of a chunk",
                "the KL's gradient of a chunk",
            ],
            true,
        );
        let grads = |walk: &mut Self, side: Rows| {
            (0..layers)
                .map(|_| {
                    walk.ledger
                        .f32(ws, "a capture's gradient", &[side.batch, cols])
                })
                .collect()
        };
        let s_grads = if to_harmless {
            grads(self, s)
        } else {
            Vec::new()
        };
        ([grads(self, h), s_grads], seed)
    }

    /// `AdamW::record_step`: the gradient norm's partial sums (the update takes nothing).
    fn optimizer(&mut self) {
        let bytes = grad_norm_scratch_bytes(self.trained.iter().copied());
        self.ledger.scratch("the gradient norm's partials", bytes);
    }
}
