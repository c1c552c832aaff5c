//! Gradient buffers, allocated once for the trainable parameters (LoRA adapters, or every
//! weight for full fine-tuning), mirroring the model's structure so the backward finds them
//! without lookups; and the one walk that names parameters and gradients in the same order.

use super::linear::LinearGrads;
use super::transformer::{projection_name, Transformer, PROJECTIONS};
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
    pub attn_norm: Option<Tensor>,
    pub mlp_norm: Option<Tensor>,
    /// In [`PROJECTIONS`] order.
    pub proj: [LinearGrads; 7],
}

/// Gradient buffers for the trainable parameters of a [`Transformer`].
#[derive(Debug, Clone)]
pub struct Gradients {
    pub trainable: Trainable,
    pub embed: Option<VocabMatrix>,
    pub blocks: Vec<BlockGrads>,
    pub final_norm: Option<Tensor>,
    /// `None` also when the head is tied (its gradient then goes to `embed`).
    pub lm_head: Option<VocabMatrix>,
}

/// A trainable parameter, its gradient, and its checkpoint name (PEFT's for adapters, the
/// Hugging Face name otherwise; chunks of a split matrix get `@first_row`).
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub param: Tensor,
    pub grad: Tensor,
}

fn zeros_like(gpu: &Gpu, t: &Tensor) -> Tensor {
    Tensor::zeros(gpu, t.shape().clone(), DType::F32)
}

impl Gradients {
    /// Zeroed gradient buffers for `trainable`. Full fine-tuning of a model whose weights are
    /// stored in f16 is refused: those weights are frozen (their gradients and updates need
    /// f32).
    pub fn new(gpu: &Gpu, model: &Transformer, trainable: Trainable) -> Result<Self> {
        let full = trainable == Trainable::Full;
        if let Some(name) = model.f16_weight_names().first().filter(|_| full) {
            return Err(Error::InvalidArgument(format!(
                "full fine-tuning trains every weight in f32, but {name} is stored in f16 (the \
                 model was loaded with f16 weights): load it in f32, or train LoRA adapters"
            )));
        }
        let blocks = model
            .blocks
            .iter()
            .map(|block| BlockGrads {
                attn_norm: full.then(|| zeros_like(gpu, &block.attn_norm)),
                mlp_norm: full.then(|| zeros_like(gpu, &block.mlp_norm)),
                proj: PROJECTIONS.map(|p| {
                    let linear = block.projection(p).expect("PROJECTIONS names projections");
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
            trainable,
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
        let mut out = Vec::new();
        let mut push = |name: String, param: &Tensor, grad: &Option<Tensor>| {
            if let Some(grad) = grad {
                out.push(NamedParam {
                    name,
                    param: param.clone(),
                    grad: grad.clone(),
                });
            }
        };
        let push_vocab = |out: &mut Vec<NamedParam>,
                          name: &str,
                          param: &VocabMatrix,
                          grad: &Option<VocabMatrix>| {
            let Some(grad) = grad else { return };
            let split = param.chunks.len() > 1;
            for ((first, p), g) in param.parts().zip(&grad.chunks) {
                let name = if split {
                    format!("{name}@{first}")
                } else {
                    name.to_owned()
                };
                out.push(NamedParam {
                    name,
                    param: p.clone(),
                    grad: g.clone(),
                });
            }
        };
        let mut vocab = Vec::new();
        push_vocab(
            &mut vocab,
            "model.embed_tokens.weight",
            &model.embed,
            &self.embed,
        );
        for (layer, (block, grads)) in model.blocks.iter().zip(&self.blocks).enumerate() {
            let prefix = format!("model.layers.{layer}");
            push(
                format!("{prefix}.input_layernorm.weight"),
                &block.attn_norm,
                &grads.attn_norm,
            );
            push(
                format!("{prefix}.post_attention_layernorm.weight"),
                &block.mlp_norm,
                &grads.mlp_norm,
            );
            for (p, g) in PROJECTIONS.iter().zip(&grads.proj) {
                let linear = block.projection(p).expect("PROJECTIONS names projections");
                let name = projection_name(layer, p);
                push(format!("{name}.weight"), &linear.weight, &g.weight);
                if let Some(bias) = &linear.bias {
                    push(format!("{name}.bias"), bias, &g.bias);
                }
                if let Some(lora) = &linear.lora {
                    push(
                        format!("base_model.model.{name}.lora_A.weight"),
                        &lora.a,
                        &g.lora_a,
                    );
                    push(
                        format!("base_model.model.{name}.lora_B.weight"),
                        &lora.b,
                        &g.lora_b,
                    );
                }
            }
        }
        push(
            "model.norm.weight".to_owned(),
            &model.final_norm,
            &self.final_norm,
        );
        if let Some(head) = &model.lm_head {
            push_vocab(&mut out, "lm_head.weight", head, &self.lm_head);
        }
        vocab.append(&mut out);
        vocab
    }

    /// Zeroes every gradient buffer (a step's gradients accumulate from zero).
    pub fn zero(&self, rec: &mut Recorder, model: &Transformer) {
        for p in self.named(model) {
            rec.zero(&p.grad);
        }
    }
}
