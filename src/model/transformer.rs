//! The Llama-family decoder (Llama, Mistral, Qwen2): its parameters on the GPU and one decoder
//! block's forward, written out as in llm.c. The block loop that runs the blocks (with hooks, a
//! save policy and a KV cache) is in `runner.rs`; the block's backward in `backward.rs`.

use std::path::Path;

use super::batch::Batch;
use super::config::Config;
use super::linear::{Linear, LoraActivations};
use super::names::{Param, PerProjection, Projection};
use super::params::ParamSource;
use super::vocab::VocabMatrix;
use super::weights::Checkpoint;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::activation::swiglu_forward;
use crate::ops::attention::{attention_forward, attention_forward_at, AttentionShape};
use crate::ops::dropout::Dropout;
use crate::ops::hook::{hook_replace, RowEdit};
use crate::ops::residual::residual_forward;
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{rope_forward, rope_forward_at, rope_inv_freq};
use crate::{Error, Result};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use serde::{Deserialize, Serialize};

/// One decoder block's parameters.
#[derive(Debug, Clone)]
pub struct Block {
    /// The RMSNorm weight `[C]` before attention (`input_layernorm`).
    pub attn_norm: Tensor,
    /// The RMSNorm weight `[C]` before the MLP (`post_attention_layernorm`).
    pub mlp_norm: Tensor,
    /// q, k, v, o, gate, up, down.
    pub proj: PerProjection<Linear>,
}

/// The element type of a model's weight matrices on the GPU (`--weights-dtype`). 16-bit
/// matrices take half the memory; the kernels widen them exactly, so all arithmetic stays f32.
/// They are frozen: full fine-tuning trains f32 weights.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsDtype {
    /// Every weight in f32.
    #[default]
    F32,
    /// The matrices (the blocks' projections, the embedding, the LM head: all but a few
    /// thousandths of a model) in f16, rounded to nearest even on the host one tensor at a
    /// time; norms and biases stay f32. A value beyond f16's range (±65504) is a load error.
    F16,
    /// The same matrices in bf16 (f32's range, 8 significant bits): exact for a bf16
    /// checkpoint, rounded to nearest even on the host otherwise.
    Bf16,
    /// The checkpoint's own 16-bit type when `config.json` declares one (`torch_dtype`
    /// float16: f16, bfloat16: bf16), f32 otherwise: 16-bit weights are kept as they are
    /// stored, exactly.
    Auto,
}

impl WeightsDtype {
    /// What `self` stores the matrices of a model with `config` as: f32, f16 or bf16.
    pub fn resolve(self, config: &Config) -> DType {
        match self {
            WeightsDtype::F32 => DType::F32,
            WeightsDtype::F16 => DType::F16,
            WeightsDtype::Bf16 => DType::BF16,
            WeightsDtype::Auto => match config.torch_dtype.as_deref() {
                Some("float16") => DType::F16,
                Some("bfloat16") => DType::BF16,
                _ => DType::F32,
            },
        }
    }

    /// Reads a `WeightsDtype`, or the `f16-weights` flag it replaced (`true` is f16): runs
    /// saved before `--weights-dtype` resume as they ran.
    pub(crate) fn deserialize_or_flag<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum DtypeOrFlag {
            Dtype(WeightsDtype),
            Flag(bool),
        }
        Ok(match DtypeOrFlag::deserialize(deserializer)? {
            DtypeOrFlag::Dtype(dtype) => dtype,
            DtypeOrFlag::Flag(true) => WeightsDtype::F16,
            DtypeOrFlag::Flag(false) => WeightsDtype::F32,
        })
    }
}

/// How to place the model on the device.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Treat bindings larger than this as impossible (defaults to the adapter's limit); a
    /// small value forces the vocabulary-sized matrices into many chunks.
    pub max_binding_bytes: Option<u64>,
    /// The element type of the weight matrices (the blocks' projections, the embedding and
    /// the LM head). In f16 or bf16 such a model runs, generates and trains LoRA adapters,
    /// but its own weights cannot train (full fine-tuning needs f32). Norms and biases stay
    /// f32.
    pub weights: WeightsDtype,
    /// Refuse a checkpoint whose weights hold NaN or ±Inf (by default it loads, with a
    /// warning on stderr naming each such tensor).
    pub strict: bool,
}

impl LoadOptions {
    /// `LoadOptions` with the matrices stored as `weights`, the rest default.
    pub fn with_weights(weights: WeightsDtype) -> Self {
        LoadOptions {
            weights,
            ..LoadOptions::default()
        }
    }
}

/// A decoder-only transformer on the GPU.
#[derive(Debug)]
pub struct Transformer {
    /// The configuration the weights were checked against.
    pub config: Config,
    /// The token embedding `[V, C]` (f32, or f16 or bf16 per [`LoadOptions::weights`]), in
    /// row chunks that each fit a binding.
    pub embed: VocabMatrix,
    /// The decoder blocks, first to last.
    pub blocks: Vec<Block>,
    /// The RMSNorm weight `[C]` applied after the last block (`model.norm`).
    pub final_norm: Tensor,
    /// `None` when the LM head is tied to the embedding.
    pub lm_head: Option<VocabMatrix>,
    /// RoPE's inverse frequencies `[head_dim / 2]` (f32), Llama-3 scaling applied.
    pub inv_freq: Tensor,
}

/// What one block's forward leaves for its backward (`[B·T, ...]` rows, or `[B, T, H, D]`).
#[derive(Debug)]
pub(crate) struct BlockActivations {
    /// `norm(x) [B·T, C]` and its `rstd [B·T]`.
    pub attn_in: Tensor,
    pub attn_rstd: Tensor,
    /// Queries `[B, T, Hq, D]` and keys `[B, T, Hkv, D]` after RoPE; values `[B, T, Hkv, D]`.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention's output `[B·T, Hq·D]` (the o projection's input) and its row logsumexp
    /// `[B, Hq, T]`.
    pub attn: Tensor,
    pub lse: Tensor,
    /// The residual stream after attention `[B·T, C]`.
    pub mid: Tensor,
    /// `norm(mid) [B·T, C]` and its `rstd [B·T]`.
    pub mlp_in: Tensor,
    pub mlp_rstd: Tensor,
    /// `gate`, `up` and `act = silu(gate)·up`, each `[B·T, F]`.
    pub gate: Tensor,
    pub up: Tensor,
    pub act: Tensor,
    /// The adapters' saved state per projection.
    pub lora: PerProjection<Option<LoraActivations>>,
}

/// Where a block's keys and values go: straight into attention (training, full prompts), or
/// appended to a cache that attention then reads (generation; see `runner::CacheTarget`).
pub(crate) enum KvTarget<'a> {
    Fresh,
    Cache {
        k: &'a Tensor,
        v: &'a Tensor,
        capacity: usize,
        starts: &'a Tensor,
        slots: &'a Tensor,
        lens_and_starts: &'a Tensor,
    },
}

/// Dropout on the LoRA adapters' inputs (training only): probability `p`, masks drawn from
/// `seed` (every projection of every layer draws its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraDropout {
    /// Probability of dropping an element, in `[0, 1)`; 0 turns dropout off.
    pub p: f32,
    /// The step's seed: a different seed per step gives fresh masks.
    pub seed: u32,
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
        let dtype = options.weights.resolve(c);
        let vocab = |name: &str| {
            let shape = (c.vocab_size, c.hidden_size);
            VocabMatrix::load(gpu, source, name, shape, max_binding, dtype)
        };
        let name = |param: Param| param.hf_name(c.architecture);
        let embed = vocab(&name(Param::Embed))?;
        let blocks = (0..c.num_hidden_layers)
            .map(|layer| load_block(gpu, c, source, layer, dtype))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload(gpu, source, &name(Param::FinalNorm), &[c.hidden_size])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(vocab(&name(Param::LmHead))?)
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
                let projections: u64 = b
                    .proj
                    .values()
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

    /// The Hugging Face names of the weights stored in 16 bits (f16 or bf16, see
    /// [`LoadOptions::weights`]), each with its type: the blocks' projections first, then the
    /// embedding and the LM head. These weights are frozen.
    pub fn weights_in_16_bits(&self) -> Vec<(String, DType)> {
        let arch = self.config.architecture;
        let narrow = |dtype: DType| dtype != DType::F32;
        let mut names = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            for (p, linear) in block.proj.iter() {
                if narrow(linear.weight.dtype()) {
                    names.push((Param::Weight(layer, p).hf_name(arch), linear.weight.dtype()));
                }
            }
        }
        let vocab = [
            (Param::Embed, Some(&self.embed)),
            (Param::LmHead, self.lm_head.as_ref()),
        ];
        for (param, matrix) in vocab {
            if let Some(m) = matrix.filter(|m| narrow(m.dtype())) {
                names.push((param.hf_name(arch), m.dtype()));
            }
        }
        names
    }

    /// Number of decoder blocks L (hidden-state indices run 0..=L).
    pub fn layers(&self) -> usize {
        self.blocks.len()
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
        let mut lora = PerProjection::default();
        let mut project = |rec: &mut Recorder, p: Projection, x: &Tensor| {
            let y = block.proj[p].output(gpu, rows);
            lora[p] = mode.forward(rec, &block.proj[p], p, x, &y);
            y
        };
        let q_raw = project(rec, Projection::Q, &attn_in);
        let k_raw = project(rec, Projection::K, &attn_in);
        let v = project(rec, Projection::V, &attn_in);

        let (b, t, d) = (batch.batch, batch.seq, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let q = f32_tensor(&[b, t, hq, d]);
        let k = f32_tensor(&[b, t, hkv, d]);
        let (q_raw, k_raw) = (q_raw.reshape([b, t, hq, d]), k_raw.reshape([b, t, hkv, d]));
        match kv {
            KvTarget::Fresh => {
                rope_forward(rec, &q_raw, &self.inv_freq, &q, 0);
                rope_forward(rec, &k_raw, &self.inv_freq, &k, 0);
            }
            KvTarget::Cache { starts, .. } => {
                rope_forward_at(rec, &q_raw, &self.inv_freq, &q, starts);
                rope_forward_at(rec, &k_raw, &self.inv_freq, &k, starts);
            }
        }
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
                capacity,
                slots,
                lens_and_starts,
                ..
            } => {
                // Row `r` of the batch goes to row `r` of the cache after its cached tokens:
                // one scatter of the batch's rows into the cache's rows (see `slots`).
                let row = hkv * d;
                for (new, cache) in [(&k, k_cache), (&v, v_cache)] {
                    let edit = RowEdit {
                        x: &cache.reshape([b * capacity, row]),
                        rows: slots,
                        value: &new.reshape([b * t, row]),
                    };
                    hook_replace(rec, &edit);
                }
                let shape = AttentionShape {
                    batch: b,
                    q_len: t,
                    kv_len: capacity,
                    q_offset: 0,
                    n_heads: hq,
                    n_kv_heads: hkv,
                    head_dim: d,
                };
                attention_forward_at(
                    rec,
                    &shape,
                    &q,
                    k_cache,
                    v_cache,
                    lens_and_starts,
                    &attn,
                    &lse,
                    scale,
                );
            }
        }

        let attn_flat = attn.reshape([rows, hq * d]);
        let o = project(rec, Projection::O, &attn_flat);
        let mid = f32_tensor(&[rows, cfg.hidden_size]);
        residual_forward(rec, x, &o, &mid, 1.0);

        let mlp_in = f32_tensor(&[rows, cfg.hidden_size]);
        let mlp_rstd = f32_tensor(&[rows]);
        rmsnorm_forward(rec, &mid, &block.mlp_norm, &mlp_in, &mlp_rstd, eps);
        let gate = project(rec, Projection::Gate, &mlp_in);
        let up = project(rec, Projection::Up, &mlp_in);
        let act = f32_tensor(&[rows, cfg.intermediate_size]);
        swiglu_forward(rec, &gate, &up, &act);
        let down = project(rec, Projection::Down, &act);
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
            lora,
        };
        (out, saved)
    }
}

/// How a block runs its projections: adapters on or off, and the dropout mask seeds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProjectionMode {
    pub adapters: bool,
    pub dropout: Option<LoraDropout>,
    pub layer: usize,
}

impl ProjectionMode {
    fn forward(
        &self,
        rec: &mut Recorder,
        linear: &Linear,
        projection: Projection,
        x: &Tensor,
        y: &Tensor,
    ) -> Option<LoraActivations> {
        // Every projection of every layer draws its own mask from the step's seed.
        let slot = (self.layer * Projection::ALL.len() + projection.index()) as u32;
        let dropout = self.dropout.filter(|d| d.p > 0.0).map(|d| Dropout {
            p: d.p,
            seed: d.seed ^ slot.wrapping_mul(0x9E37_79B9),
        });
        linear.forward(rec, x, y, self.adapters, dropout)
    }
}

fn upload(gpu: &Gpu, source: &dyn ParamSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let data = source.tensor(name, shape)?;
    Tensor::from_f32(gpu, shape, &data)
}

/// Tensor `name` uploaded as `dtype` (see [`store_as`]).
fn upload_as(
    gpu: &Gpu,
    source: &dyn ParamSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    store_as(gpu, name, shape, &source.tensor(name, shape)?, dtype)
}

/// `data` (of tensor `name`) uploaded as `dtype`: f32, or f16 or bf16 rounded to nearest even
/// on the host (only this part of the model is ever held twice, as f32 and as 16 bits). A
/// bf16 checkpoint, read as f32 and stored as bf16, comes through exactly.
pub(super) fn store_as(
    gpu: &Gpu,
    name: &str,
    shape: &[usize],
    data: &[f32],
    dtype: DType,
) -> Result<Tensor> {
    match dtype {
        DType::F32 => Tensor::from_f32(gpu, shape, data),
        DType::F16 => Tensor::from_f16(gpu, shape, &narrow::<f16>(name, data, "f16", "±65504")?),
        DType::BF16 => {
            Tensor::from_bf16(gpu, shape, &narrow::<bf16>(name, data, "bf16", "±3.39e38")?)
        }
        DType::U32 => unreachable!("weights are stored as f32, f16 or bf16, not u32"),
    }
}

/// `data` rounded to the 16-bit type `H` (f16 or bf16, called `what`; round to nearest even,
/// as the cast kernel), or an error naming tensor `name` when a finite value lies beyond the
/// type's `range` and would become infinite.
fn narrow<H>(name: &str, data: &[f32], what: &str, range: &str) -> Result<Vec<H>>
where
    H: Copy + Default,
    [H]: HalfFloatSliceExt,
    f32: From<H>,
{
    let mut halves = vec![H::default(); data.len()];
    halves.convert_from_f32_slice(data);
    let overflow = data
        .iter()
        .zip(&halves)
        .position(|(x, &h)| x.is_finite() && f32::from(h).is_infinite());
    if let Some(i) = overflow {
        return Err(Error::InvalidArgument(format!(
            "{name}: element {i} ({}) is beyond the {what} range ({range}); load this model \
             with f32 weights (--weights-dtype f32)",
            data[i]
        )));
    }
    Ok(halves)
}

/// Projection `p` of block `layer`: its weight stored as `dtype`, its bias (if the
/// architecture has one there) as f32.
fn load_linear(
    gpu: &Gpu,
    c: &Config,
    source: &dyn ParamSource,
    (layer, p): (usize, Projection),
    dtype: DType,
) -> Result<Linear> {
    let (out_features, in_features) = c.projection_shape(p);
    let name = |param: Param| param.hf_name(c.architecture);
    let weight = upload_as(
        gpu,
        source,
        &name(Param::Weight(layer, p)),
        &[out_features, in_features],
        dtype,
    )?;
    let bias = if c.projection_has_bias(p) {
        Some(upload(
            gpu,
            source,
            &name(Param::Bias(layer, p)),
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
    let norm = |param: Param| {
        upload(
            gpu,
            source,
            &param.hf_name(c.architecture),
            &[c.hidden_size],
        )
    };
    let block = Block {
        attn_norm: norm(Param::AttnNorm(layer))?,
        mlp_norm: norm(Param::MlpNorm(layer))?,
        proj: PerProjection::try_from_fn(|p| load_linear(gpu, c, source, (layer, p), dtype))?,
    };
    gpu.flush_uploads();
    Ok(block)
}
