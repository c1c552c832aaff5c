//! Gradient buffers, allocated once for the trainable parameters (LoRA adapters, or every
//! weight for full fine-tuning), mirroring the model's structure so the backward finds them
//! without lookups; and the one walk that names parameters and gradients in the same order.

use super::linear::LinearGrads;
use super::names::{LoraMatrix, Param, PerProjection};
use super::transformer::Transformer;
use super::vocab::VocabMatrix;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::{Error, Result};

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// The LoRA adapters attached to the model (base weights frozen).
    Lora,
    /// Every base weight.
    Full,
}

/// Gradients of one block.
#[derive(Debug, Clone, Default)]
pub struct BlockGrads {
    /// The attention norm's weight gradient `[C]`, under full fine-tuning.
    pub attn_norm: Option<Tensor>,
    /// The MLP norm's weight gradient `[C]`, under full fine-tuning.
    pub mlp_norm: Option<Tensor>,
    /// Each projection's gradients (all `None` for a projection that does not train).
    pub proj: PerProjection<LinearGrads>,
}

/// Gradient buffers for the trainable parameters of a [`Transformer`].
#[derive(Debug, Clone)]
pub struct Gradients {
    /// The embedding's gradient, chunked as the embedding is, under full fine-tuning (a tied
    /// LM head's gradient adds into it).
    pub embed: Option<VocabMatrix>,
    /// One per decoder block, in order.
    pub blocks: Vec<BlockGrads>,
    /// The final norm's weight gradient `[C]`, under full fine-tuning.
    pub final_norm: Option<Tensor>,
    /// `None` also when the head is tied (its gradient then goes to `embed`).
    pub lm_head: Option<VocabMatrix>,
}

/// A trainable parameter, its gradient, and its checkpoint name (PEFT's for adapters, the
/// Hugging Face name otherwise; chunks of a split matrix get `@first_row`).
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Unique within a model: checkpoints store the optimizer state under it.
    pub name: String,
    /// The parameter itself (shares the model's storage: an update changes the model).
    pub param: Tensor,
    /// Its gradient buffer, the same shape.
    pub grad: Tensor,
}

fn zeros_like(gpu: &Gpu, t: &Tensor) -> Tensor {
    Tensor::zeros(gpu, t.shape().clone(), DType::F32)
}

impl Gradients {
    /// Zeroed gradient buffers for `trainable`. Full fine-tuning of a model whose weights are
    /// stored in 16 bits (f16 or bf16) is refused: those weights are frozen (their gradients
    /// and updates need f32).
    pub fn new(gpu: &Gpu, model: &Transformer, trainable: Trainable) -> Result<Self> {
        let full = trainable == Trainable::Full;
        if let Some((name, dtype)) = model.weights_in_16_bits().first().filter(|_| full) {
            return Err(Error::InvalidArgument(format!(
                "full fine-tuning trains every weight in f32, but {name} is stored in {dtype} \
                 (the model was loaded with {dtype} weights): load it in f32, or train LoRA \
                 adapters"
            )));
        }
        let blocks = model
            .blocks
            .iter()
            .map(|block| BlockGrads {
                attn_norm: full.then(|| zeros_like(gpu, &block.attn_norm)),
                mlp_norm: full.then(|| zeros_like(gpu, &block.mlp_norm)),
                proj: PerProjection::from_fn(|p| {
                    let linear = &block.proj[p];
                    let lora = linear.lora.as_ref().filter(|_| !full);
                    LinearGrads {
                        weight: full.then(|| zeros_like(gpu, &linear.weight)),
                        bias: linear
                            .bias
                            .as_ref()
                            .filter(|_| full)
                            .map(|b| zeros_like(gpu, b)),
                        lora_a: lora.map(|l| zeros_like(gpu, &l.a)),
                        lora_b: lora.map(|l| zeros_like(gpu, &l.b)),
                    }
                }),
            })
            .collect();
        Ok(Gradients {
            embed: full.then(|| model.embed.zeros_like(gpu)),
            blocks,
            final_norm: full.then(|| zeros_like(gpu, &model.final_norm)),
            lm_head: model
                .lm_head
                .as_ref()
                .filter(|_| full)
                .map(|h| h.zeros_like(gpu)),
        })
    }

    /// No parameter gradients at all: a backward then only carries the gradient to the hidden
    /// states it taps (an attack's gradient at the input embeddings).
    pub fn none(model: &Transformer) -> Self {
        Gradients {
            embed: None,
            blocks: vec![BlockGrads::default(); model.layers()],
            final_norm: None,
            lm_head: None,
        }
    }

    /// The gradient buffer of the LM head (the embedding's when tied), if it trains.
    pub fn lm_head_grad<'a>(&'a self, model: &Transformer) -> Option<&'a VocabMatrix> {
        if model.lm_head.is_some() {
            self.lm_head.as_ref()
        } else {
            self.embed.as_ref()
        }
    }

    /// Every trainable parameter with its gradient, in a fixed order.
    pub fn named(&self, model: &Transformer) -> Vec<NamedParam> {
        let arch = model.config.architecture;
        let mut out = Vec::new();
        let mut push = |param: Param, value: &Tensor, grad: &Option<Tensor>| {
            if let Some(grad) = grad {
                out.push(NamedParam {
                    name: param.hf_name(arch),
                    param: value.clone(),
                    grad: grad.clone(),
                });
            }
        };
        for (layer, (block, grads)) in model.blocks.iter().zip(&self.blocks).enumerate() {
            push(Param::AttnNorm(layer), &block.attn_norm, &grads.attn_norm);
            push(Param::MlpNorm(layer), &block.mlp_norm, &grads.mlp_norm);
            for ((p, linear), g) in block.proj.iter().zip(grads.proj.values()) {
                push(Param::Weight(layer, p), &linear.weight, &g.weight);
                if let Some(bias) = &linear.bias {
                    push(Param::Bias(layer, p), bias, &g.bias);
                }
                if let Some(lora) = &linear.lora {
                    push(Param::Lora(layer, p, LoraMatrix::A), &lora.a, &g.lora_a);
                    push(Param::Lora(layer, p, LoraMatrix::B), &lora.b, &g.lora_b);
                }
            }
        }
        push(Param::FinalNorm, &model.final_norm, &self.final_norm);
        // The vocabulary matrices go first and last, chunk by chunk.
        let mut named = vocab_params(arch, Param::Embed, &model.embed, &self.embed);
        named.append(&mut out);
        if let Some(head) = &model.lm_head {
            named.extend(vocab_params(arch, Param::LmHead, head, &self.lm_head));
        }
        named
    }

    /// Zeroes every gradient buffer (a step's gradients accumulate from zero).
    pub fn zero(&self, rec: &mut Recorder, model: &Transformer) {
        for p in self.named(model) {
            rec.zero(&p.grad);
        }
    }
}

/// The chunks of a vocabulary matrix and its gradient; chunks of a split matrix are named
/// `name@first_row`.
fn vocab_params(
    arch: super::config::Architecture,
    param: Param,
    value: &VocabMatrix,
    grad: &Option<VocabMatrix>,
) -> Vec<NamedParam> {
    let Some(grad) = grad else {
        return Vec::new();
    };
    let name = param.hf_name(arch);
    let split = value.chunks.len() > 1;
    value
        .parts()
        .zip(&grad.chunks)
        .map(|((first, p), g)| NamedParam {
            name: if split {
                format!("{name}@{first}")
            } else {
                name.clone()
            },
            param: p.clone(),
            grad: g.clone(),
        })
        .collect()
}
