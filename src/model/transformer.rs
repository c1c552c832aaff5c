//! The Llama-family decoder (Llama, Mistral, Qwen2): parameters on the GPU and the forward
//! pass, written out one block at a time as in llm.c. The forward can stop at any hidden
//! state, add a perturbation to one, and keep what the backward needs.
//!
//! Hidden states follow transformers' `output_hidden_states`: index 0 is the token embedding,
//! index `i` (1 ≤ i < L) the residual stream after block `i − 1`, and index `L` the output of
//! the final RMSNorm.

use std::path::Path;

use super::batch::Batch;
use super::config::Config;
use super::linear::{Linear, LoraActivations};
use super::params::ParamSource;
use super::vocab::VocabMatrix;
use super::weights::Checkpoint;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::activation::swiglu_forward;
use crate::ops::attention::{attention_forward, AttentionShape};
use crate::ops::dropout::Dropout;
use crate::ops::residual::{accumulate, residual_forward};
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{rope_forward, rope_inv_freq};
use crate::{Error, Result};
use half::{f16, slice::HalfFloatSliceExt};

/// One decoder block's parameters.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The projections of a block by name, in a fixed order (LoRA targets, PEFT names).
pub const PROJECTIONS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

impl Block {
    /// The projection called `name` (one of [`PROJECTIONS`]).
    pub fn projection(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q" => &self.q,
            "k" => &self.k,
            "v" => &self.v,
            "o" => &self.o,
            "gate" => &self.gate,
            "up" => &self.up,
            "down" => &self.down,
            _ => return None,
        })
    }

    /// Mutable access to the projection called `name`.
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "q" => &mut self.q,
            "k" => &mut self.k,
            "v" => &mut self.v,
            "o" => &mut self.o,
            "gate" => &mut self.gate,
            "up" => &mut self.up,
            "down" => &mut self.down,
            _ => return None,
        })
    }
}

/// The Hugging Face tensor name of projection `proj` in layer `layer`.
pub fn projection_name(layer: usize, proj: &str) -> String {
    let group = match proj {
        "q" | "k" | "v" | "o" => "self_attn",
        _ => "mlp",
    };
    format!("model.layers.{layer}.{group}.{proj}_proj")
}

/// How to place the model on the device.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Treat bindings larger than this as impossible (defaults to the adapter's limit); a
    /// small value forces the vocabulary-sized matrices into many chunks.
    pub max_binding_bytes: Option<u64>,
    /// Store the blocks' projection weights (q, k, v, o, gate, up, down: over 95% of a large
    /// model) in f16, at half the memory. They are rounded to nearest on the host, one tensor
    /// at a time; the kernels widen them exactly, so all arithmetic stays f32. Such a model
    /// runs, generates and trains LoRA adapters, but its own weights cannot train (full
    /// fine-tuning needs f32). Embeddings, LM head, norms and biases stay f32.
    pub f16_weights: bool,
    /// Refuse a checkpoint whose weights hold NaN or ±Inf (by default it loads, with a
    /// warning on stderr naming each such tensor).
    pub strict: bool,
}

impl LoadOptions {
    /// The element type of the blocks' projection weights.
    pub fn projection_dtype(&self) -> DType {
        if self.f16_weights {
            DType::F16
        } else {
            DType::F32
        }
    }
}

/// A decoder-only transformer on the GPU.
#[derive(Debug)]
pub struct Transformer {
    pub config: Config,
    pub embed: VocabMatrix,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<VocabMatrix>,
    pub inv_freq: Tensor,
}

/// What a forward pass computes.
#[derive(Debug, Clone, Copy)]
pub struct ForwardSpec<'a> {
    /// The highest hidden-state index needed (0..=L); blocks above it are not run.
    pub last_hidden: usize,
    /// Compute logits (implies `last_hidden == L`).
    pub logits: bool,
    /// Run the LoRA adapters (off gives the base model).
    pub adapters: bool,
    /// Add a vector to one hidden state.
    pub perturb: Option<Perturbation<'a>>,
    /// Dropout on the LoRA adapters' inputs (training only): (p, seed).
    pub lora_dropout: Option<(f32, u32)>,
}

impl ForwardSpec<'static> {
    /// Every hidden state and the logits, adapters on: plain inference.
    pub fn full(layers: usize) -> Self {
        ForwardSpec {
            last_hidden: layers,
            logits: true,
            adapters: true,
            perturb: None,
            lora_dropout: None,
        }
    }

    /// The hidden states up to `last_hidden` and no logits, adapters on.
    pub fn hidden(last_hidden: usize) -> Self {
        ForwardSpec {
            logits: false,
            ..Self::full(last_hidden)
        }
    }
}

/// `hidden_states[hidden] += delta` (`delta [B·T, C]`) before anything reads it.
#[derive(Debug, Clone, Copy)]
pub struct Perturbation<'a> {
    pub hidden: usize,
    pub delta: &'a Tensor,
}

/// What one block's forward leaves for its backward.
#[derive(Debug)]
pub struct BlockActivations {
    pub attn_in: Tensor,
    pub attn_rstd: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Tensor,
    pub lse: Tensor,
    pub mid: Tensor,
    pub mlp_in: Tensor,
    pub mlp_rstd: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub act: Tensor,
    /// The adapters' saved state per projection, in [`PROJECTIONS`] order.
    pub lora: [Option<LoraActivations>; 7],
}

/// The result of [`Transformer::forward`].
#[derive(Debug)]
pub struct Forward {
    /// Residual stream `x_0 ..= x_k` (`x_0` the embedding, `x_{l+1}` after block `l`).
    pub residual: Vec<Tensor>,
    /// `norm(x_L)` and its rstd, when the last hidden state or logits were asked for.
    pub normed: Option<(Tensor, Tensor)>,
    pub logits: Option<Tensor>,
    pub blocks: Vec<BlockActivations>,
}

impl Forward {
    /// transformers' `hidden_states[index]` as `[B·T, C]`.
    pub fn hidden_state(&self, index: usize) -> &Tensor {
        match &self.normed {
            Some((normed, _)) if index + 1 == self.residual.len() => normed,
            _ => &self.residual[index],
        }
    }
}

/// Where a block's keys and values go: straight into attention (training, full prompts), or
/// appended to a cache that attention then reads (generation).
pub(crate) enum KvTarget<'a> {
    Fresh,
    Cache {
        k: &'a Tensor,
        v: &'a Tensor,
        past: usize,
        capacity: usize,
        seq_lens: &'a Tensor,
    },
}

impl Transformer {
    /// Loads a Hugging Face model folder (config.json + safetensors).
    pub fn load(gpu: &Gpu, dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?.strict(options.strict);
        Self::from_source(gpu, config, &checkpoint, options)
    }

    /// Builds the model from any parameter source, checking every shape.
    pub fn from_source(
        gpu: &Gpu,
        config: Config,
        source: &dyn ParamSource,
        options: &LoadOptions,
    ) -> Result<Self> {
        let c = &config;
        let max_binding = options.max_binding_bytes.unwrap_or(gpu.max_binding_bytes());
        let vocab = |name: &str| {
            VocabMatrix::load(gpu, source, name, c.vocab_size, c.hidden_size, max_binding)
        };
        let embed = vocab("model.embed_tokens.weight")?;
        let blocks = (0..c.num_hidden_layers)
            .map(|layer| load_block(gpu, c, source, layer, options.projection_dtype()))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload(gpu, source, "model.norm.weight", &[c.hidden_size])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(vocab("lm_head.weight")?)
        };
        let inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
        let inv_freq = Tensor::from_f32(gpu, [inv_freq.len()], &inv_freq)?;
        Ok(Transformer {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            inv_freq,
        })
    }

    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &VocabMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes the base weights take on the GPU (adapters not counted).
    pub fn parameter_bytes(&self) -> u64 {
        let vocab = |m: &VocabMatrix| m.chunks.iter().map(Tensor::size_bytes).sum::<u64>();
        let blocks: u64 = self
            .blocks
            .iter()
            .map(|b| {
                let projections: u64 = PROJECTIONS
                    .iter()
                    .filter_map(|p| b.projection(p))
                    .map(|l| l.weight.size_bytes() + l.bias.as_ref().map_or(0, Tensor::size_bytes))
                    .sum();
                projections + b.attn_norm.size_bytes() + b.mlp_norm.size_bytes()
            })
            .sum();
        vocab(&self.embed)
            + blocks
            + self.final_norm.size_bytes()
            + self.lm_head.as_ref().map_or(0, vocab)
    }

    /// The Hugging Face names of the weights stored in f16 (see [`LoadOptions::f16_weights`]).
    pub fn f16_weight_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            for p in PROJECTIONS {
                let linear = block.projection(p).expect("PROJECTIONS names projections");
                if linear.weight.dtype() == DType::F16 {
                    names.push(format!("{}.weight", projection_name(layer, p)));
                }
            }
        }
        names
    }

    /// Number of decoder blocks L (hidden-state indices run 0..=L).
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// Records a forward pass over `batch`; see [`ForwardSpec`].
    pub fn forward(&self, rec: &mut Recorder, batch: &Batch, spec: &ForwardSpec) -> Forward {
        let layers = self.layers();
        assert!(
            spec.last_hidden <= layers,
            "hidden state {} past the last ({layers})",
            spec.last_hidden
        );
        let gpu = rec.gpu();
        let rows = batch.rows();
        let c = self.config.hidden_size;
        let x0 = Tensor::empty(gpu, [rows, c], DType::F32);
        self.embed.lookup(rec, &batch.ids, &x0);
        apply_perturbation(rec, spec, 0, &x0);

        let run = if spec.logits {
            layers
        } else {
            spec.last_hidden.min(layers)
        };
        let mut residual = vec![x0];
        let mut blocks = Vec::with_capacity(run);
        for (layer, block) in self.blocks.iter().take(run).enumerate() {
            let x = &residual[layer];
            let mode = ProjectionMode {
                adapters: spec.adapters,
                dropout: spec.lora_dropout,
                layer,
            };
            let (out, saved) = self.block_forward(rec, block, x, batch, mode, KvTarget::Fresh);
            // hidden_states[L] is the normed output, so a perturbation there is applied below.
            if layer + 1 < layers {
                apply_perturbation(rec, spec, layer + 1, &out);
            }
            residual.push(out);
            blocks.push(saved);
        }

        let wants_normed = spec.logits || spec.last_hidden == layers;
        let normed = wants_normed.then(|| {
            let (normed, rstd) = self.final_norm_forward(rec, &residual[layers]);
            apply_perturbation(rec, spec, layers, &normed);
            (normed, rstd)
        });
        let logits = match (&normed, spec.logits) {
            (Some((normed, _)), true) => {
                let logits = Tensor::empty(gpu, [rows, self.config.vocab_size], DType::F32);
                self.lm_head().project(rec, normed, &logits);
                Some(logits)
            }
            _ => None,
        };
        Forward {
            residual,
            normed,
            logits,
            blocks,
        }
    }

    /// Runs [`Transformer::forward`] in a recorder of its own and waits for it.
    pub fn forward_now(&self, gpu: &Gpu, batch: &Batch, spec: &ForwardSpec) -> Result<Forward> {
        let mut rec = Recorder::new(gpu);
        let out = self.forward(&mut rec, batch, spec);
        rec.finish()?;
        Ok(out)
    }

    pub(crate) fn final_norm_forward(&self, rec: &mut Recorder, x: &Tensor) -> (Tensor, Tensor) {
        let gpu = rec.gpu();
        let rows = x.dims()[0];
        let normed = Tensor::empty(gpu, x.shape().clone(), DType::F32);
        let rstd = Tensor::empty(gpu, [rows], DType::F32);
        rmsnorm_forward(
            rec,
            x,
            &self.final_norm,
            &normed,
            &rstd,
            self.config.rms_norm_eps as f32,
        );
        (normed, rstd)
    }

    /// One decoder block: pre-norm attention and pre-norm SwiGLU MLP, each around a residual.
    pub(crate) fn block_forward(
        &self,
        rec: &mut Recorder,
        block: &Block,
        x: &Tensor,
        batch: &Batch,
        mode: ProjectionMode,
        kv: KvTarget,
    ) -> (Tensor, BlockActivations) {
        let gpu = rec.gpu();
        let cfg = &self.config;
        let rows = batch.rows();
        let eps = cfg.rms_norm_eps as f32;
        let f32_tensor = |dims: &[usize]| Tensor::empty(gpu, dims, DType::F32);

        let attn_in = f32_tensor(&[rows, cfg.hidden_size]);
        let attn_rstd = f32_tensor(&[rows]);
        rmsnorm_forward(rec, x, &block.attn_norm, &attn_in, &attn_rstd, eps);
        let (q_raw, k_raw, v) = (
            block.q.output(gpu, rows),
            block.k.output(gpu, rows),
            block.v.output(gpu, rows),
        );
        let lora_q = mode.forward(rec, &block.q, "q", &attn_in, &q_raw);
        let lora_k = mode.forward(rec, &block.k, "k", &attn_in, &k_raw);
        let lora_v = mode.forward(rec, &block.v, "v", &attn_in, &v);

        let (b, t, d) = (batch.batch, batch.seq, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let past = match kv {
            KvTarget::Fresh => 0,
            KvTarget::Cache { past, .. } => past,
        };
        let q = f32_tensor(&[b, t, hq, d]);
        let k = f32_tensor(&[b, t, hkv, d]);
        rope_forward(rec, &q_raw.reshape([b, t, hq, d]), &self.inv_freq, &q, past);
        rope_forward(
            rec,
            &k_raw.reshape([b, t, hkv, d]),
            &self.inv_freq,
            &k,
            past,
        );
        let v = v.reshape([b, t, hkv, d]);

        let attn = f32_tensor(&[b, t, hq, d]);
        let lse = f32_tensor(&[b, hq, t]);
        let scale = 1.0 / (d as f32).sqrt();
        match kv {
            KvTarget::Fresh => {
                let shape = AttentionShape::training(b, t, hq, hkv, d);
                attention_forward(rec, &shape, &q, &k, &v, &batch.seq_lens, &attn, &lse, scale);
            }
            KvTarget::Cache {
                k: k_cache,
                v: v_cache,
                past,
                capacity,
                seq_lens,
            } => {
                assert_eq!(b, 1, "the KV cache holds one sequence");
                let row = hkv * d;
                rec.copy_elements(&k, 0, k_cache, past * row, t * row);
                rec.copy_elements(&v, 0, v_cache, past * row, t * row);
                let shape = AttentionShape {
                    batch: 1,
                    q_len: t,
                    kv_len: capacity,
                    q_offset: past,
                    n_heads: hq,
                    n_kv_heads: hkv,
                    head_dim: d,
                };
                attention_forward(
                    rec, &shape, &q, k_cache, v_cache, seq_lens, &attn, &lse, scale,
                );
            }
        }

        let attn_flat = attn.reshape([rows, hq * d]);
        let o = block.o.output(gpu, rows);
        let lora_o = mode.forward(rec, &block.o, "o", &attn_flat, &o);
        let mid = f32_tensor(&[rows, cfg.hidden_size]);
        residual_forward(rec, x, &o, &mid, 1.0);

        let mlp_in = f32_tensor(&[rows, cfg.hidden_size]);
        let mlp_rstd = f32_tensor(&[rows]);
        rmsnorm_forward(rec, &mid, &block.mlp_norm, &mlp_in, &mlp_rstd, eps);
        let (gate, up) = (block.gate.output(gpu, rows), block.up.output(gpu, rows));
        let lora_gate = mode.forward(rec, &block.gate, "gate", &mlp_in, &gate);
        let lora_up = mode.forward(rec, &block.up, "up", &mlp_in, &up);
        let act = f32_tensor(&[rows, cfg.intermediate_size]);
        swiglu_forward(rec, &gate, &up, &act);
        let down = block.down.output(gpu, rows);
        let lora_down = mode.forward(rec, &block.down, "down", &act, &down);
        let out = f32_tensor(&[rows, cfg.hidden_size]);
        residual_forward(rec, &mid, &down, &out, 1.0);

        let saved = BlockActivations {
            attn_in,
            attn_rstd,
            q,
            k,
            v,
            attn: attn_flat,
            lse,
            mid,
            mlp_in,
            mlp_rstd,
            gate,
            up,
            act,
            lora: [
                lora_q, lora_k, lora_v, lora_o, lora_gate, lora_up, lora_down,
            ],
        };
        (out, saved)
    }
}

/// How a block runs its projections: adapters on or off, and the dropout mask seeds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProjectionMode {
    pub adapters: bool,
    pub dropout: Option<(f32, u32)>,
    pub layer: usize,
}

impl ProjectionMode {
    fn forward(
        &self,
        rec: &mut Recorder,
        linear: &Linear,
        name: &str,
        x: &Tensor,
        y: &Tensor,
    ) -> Option<LoraActivations> {
        let index = PROJECTIONS.iter().position(|p| *p == name).unwrap_or(0);
        // Every projection of every layer draws its own mask from the step's seed.
        let dropout = self
            .dropout
            .filter(|&(p, _)| p > 0.0)
            .map(|(p, seed)| Dropout {
                p,
                seed: seed
                    ^ ((self.layer * PROJECTIONS.len() + index) as u32).wrapping_mul(0x9E37_79B9),
            });
        linear.forward(rec, x, y, self.adapters, dropout)
    }
}

fn apply_perturbation(rec: &mut Recorder, spec: &ForwardSpec, index: usize, hidden: &Tensor) {
    if let Some(p) = spec.perturb.filter(|p| p.hidden == index) {
        accumulate(rec, p.delta, hidden, 1.0);
    }
}

fn upload(gpu: &Gpu, source: &dyn ParamSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let data = source.tensor(name, shape)?;
    Tensor::from_f32(gpu, shape, &data)
}

/// Tensor `name` uploaded as `dtype`: f32, or f16 rounded to nearest even on the host (only
/// this tensor is ever held twice, as f32 and as f16).
fn upload_as(
    gpu: &Gpu,
    source: &dyn ParamSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    match dtype {
        DType::F32 => upload(gpu, source, name, shape),
        DType::F16 => {
            let halves = to_f16(name, &source.tensor(name, shape)?)?;
            Tensor::from_f16(gpu, shape, &halves)
        }
        other => unreachable!("weights are stored as f32 or f16, not {other}"),
    }
}

/// `data` rounded to f16 (round to nearest even, as the cast kernel), or an error naming
/// tensor `name` when a finite value lies beyond f16's range and would become infinite.
fn to_f16(name: &str, data: &[f32]) -> Result<Vec<f16>> {
    let mut halves = vec![f16::ZERO; data.len()];
    halves.convert_from_f32_slice(data);
    let overflow = data
        .iter()
        .zip(&halves)
        .position(|(x, h)| x.is_finite() && h.is_infinite());
    if let Some(i) = overflow {
        return Err(Error::InvalidArgument(format!(
            "{name}: element {i} ({}) is beyond the f16 range (±65504); load this model \
             without f16 weights (--f16-weights)",
            data[i]
        )));
    }
    Ok(halves)
}

/// A projection with its weight stored as `dtype` and its bias (if any) as f32.
fn load_linear(
    gpu: &Gpu,
    source: &dyn ParamSource,
    name: &str,
    (out_features, in_features): (usize, usize),
    bias: bool,
    dtype: DType,
) -> Result<Linear> {
    let weight = upload_as(
        gpu,
        source,
        &format!("{name}.weight"),
        &[out_features, in_features],
        dtype,
    )?;
    let bias = if bias {
        Some(upload(
            gpu,
            source,
            &format!("{name}.bias"),
            &[out_features],
        )?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Block `layer`, its projection weights stored as `dtype`.
fn load_block(
    gpu: &Gpu,
    c: &Config,
    source: &dyn ParamSource,
    layer: usize,
    dtype: DType,
) -> Result<Block> {
    let prefix = format!("model.layers.{layer}");
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let proj = |p: &str, out, inp, bias| {
        load_linear(
            gpu,
            source,
            &projection_name(layer, p),
            (out, inp),
            bias,
            dtype,
        )
    };
    let block = Block {
        attn_norm: upload(
            gpu,
            source,
            &format!("{prefix}.input_layernorm.weight"),
            &[hidden],
        )?,
        q: proj("q", c.q_dim(), hidden, c.qkv_bias)?,
        k: proj("k", c.kv_dim(), hidden, c.qkv_bias)?,
        v: proj("v", c.kv_dim(), hidden, c.qkv_bias)?,
        o: proj("o", hidden, c.q_dim(), c.o_bias)?,
        mlp_norm: upload(
            gpu,
            source,
            &format!("{prefix}.post_attention_layernorm.weight"),
            &[hidden],
        )?,
        gate: proj("gate", ffn, hidden, c.mlp_bias)?,
        up: proj("up", ffn, hidden, c.mlp_bias)?,
        down: proj("down", hidden, ffn, c.mlp_bias)?,
    };
    gpu.flush_uploads();
    Ok(block)
}
