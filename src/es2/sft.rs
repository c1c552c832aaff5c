//! Supervised fine-tuning, the trainer's second objective: next-token cross-entropy on the
//! tokens a conversation teaches (the assistant's replies and what closes them), averaged over
//! those tokens, through the fused cross-entropy kernel (the softmax over the vocabulary is
//! never written out). One step is the forward, the loss, the backward and AdamW, with one
//! readback.

use super::optimizer::{AdamW, OptimizerConfig};
use super::report::{SftTerms, StepReport, Terms};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::head::HeadBackward;
use crate::model::{
    Batch, Gradients, LoraDropout, Output, Pass, SavePolicy, Seeds, Targets, Trainable, Transformer,
};
use crate::{Error, Result};

/// The state that persists across SFT steps.
#[derive(Debug)]
pub struct SftEngine {
    /// Gradient buffers of the trainable parameters.
    pub grads: Gradients,
    /// AdamW and its moments.
    pub optimizer: AdamW,
    /// Dropout probability on the LoRA adapters' inputs.
    pub lora_dropout: f32,
    /// What the forward keeps for the backward (see [`Es2Engine::save`](super::Es2Engine)).
    pub save: SavePolicy,
}

impl SftEngine {
    /// Gradient buffers and AdamW state for `trainable` on `model`.
    pub fn new(
        gpu: &Gpu,
        model: &Transformer,
        trainable: Trainable,
        optimizer: OptimizerConfig,
        lora_dropout: f32,
    ) -> Result<Self> {
        optimizer.validate()?;
        if trainable == Trainable::Lora && !model.has_lora() {
            return Err(Error::InvalidArgument(
                "LoRA training needs adapters on the model".into(),
            ));
        }
        let grads = Gradients::new(gpu, model, trainable)?;
        let params = grads.named(model);
        Ok(SftEngine {
            optimizer: AdamW::new(gpu, &params, optimizer),
            grads,
            lora_dropout,
            save: SavePolicy::Everything,
        })
    }

    /// One step on `batch` (which carries its targets) at learning rate `lr`.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        model: &Transformer,
        batch: &Batch,
        lr: f64,
        dropout_seed: u32,
    ) -> Result<StepReport> {
        let targets = batch_targets(batch)?;
        let mut rec = Recorder::new(gpu);
        let params = self.grads.named(model);
        self.grads.zero(&mut rec, model);
        let dropout = (self.lora_dropout > 0.0).then_some(LoraDropout {
            p: self.lora_dropout,
            seed: dropout_seed,
        });
        let top = model.layers();
        let pass = Pass::new(Output::Hidden(top))
            .with_dropout(dropout)
            .saving(self.save);
        let forward = model.run(&mut rec, batch, &pass)?;
        let normed = forward.hidden_state(top).clone();
        let dnormed = Tensor::empty(gpu, normed.shape().clone(), DType::F32);
        let backward = HeadBackward {
            dnormed: &dnormed,
            grads: &self.grads,
        };
        let row_loss = model.lm_loss(&mut rec, &normed, targets, Some(backward))?;
        drop(normed);
        let seeds = Seeds {
            normed: Some(&dnormed),
            ..Seeds::default()
        };
        model.backward(&mut rec, batch, forward, &seeds, &[], &self.grads)?;
        let norm_sq = self.optimizer.record_step(&mut rec, &params, lr)?;
        let values = rec.finish_reading(&[&row_loss, &norm_sq])?;
        Ok(StepReport {
            loss: mean_loss(&values[0], targets),
            grad_norm: f64::from(values[1][0]).sqrt(),
            tokens: batch.tokens(),
            terms: Terms::Sft(SftTerms {
                learned_tokens: targets.counted,
            }),
        })
    }
}

/// The targets of a batch made for a cross-entropy objective.
pub fn batch_targets(batch: &Batch) -> Result<&Targets> {
    batch.targets.as_ref().ok_or_else(|| {
        Error::InvalidArgument("a cross-entropy objective needs a batch with targets".into())
    })
}

/// The mean over the learned positions of the read-back per-position losses.
pub fn mean_loss(row_loss: &[f32], targets: &Targets) -> f64 {
    row_loss.iter().map(|&x| f64::from(x)).sum::<f64>() / targets.counted.max(1) as f64
}
