//! One ES2 training step, end to end on the GPU: the forwards (tuned model on both batches,
//! base logits on the harmless batch), the fused losses, both backwards, the global gradient
//! norm and AdamW, recorded into one command buffer with a single readback of the scalars.

use super::objective::{
    embeddings_on_host, forward_spec, record_objective, BaseStats, BaseTensors, Es2Config,
    ObjectiveInputs, ObjectiveValues,
};
use super::optimizer::{AdamW, OptimizerConfig};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::{Batch, ForwardSpec, Gradients, Seeds, Trainable, Transformer};
use crate::{Error, Result};

/// The state that persists across steps.
#[derive(Debug)]
pub struct Es2Engine {
    pub config: Es2Config,
    pub layers: Vec<usize>,
    pub base_stats: BaseStats,
    base_tensors: BaseTensors,
    pub grads: Gradients,
    pub optimizer: AdamW,
    /// Dropout on the LoRA adapters' input.
    pub lora_dropout: f32,
}

/// What one step measured (before its update).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    #[serde(flatten)]
    pub values: ObjectiveValues,
    /// D_l / D_l(base) per chosen layer.
    pub relative_distance: Vec<f32>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
}

impl Es2Engine {
    pub fn new(
        gpu: &Gpu,
        model: &Transformer,
        trainable: Trainable,
        config: Es2Config,
        optimizer: OptimizerConfig,
        base_stats: BaseStats,
        lora_dropout: f32,
    ) -> Result<Self> {
        config.validate()?;
        optimizer.validate()?;
        let layers = config.resolved_layers(model.layers())?;
        if layers != base_stats.layers {
            return Err(Error::InvalidArgument(format!(
                "base statistics cover layers {:?}, the objective uses {layers:?}",
                base_stats.layers
            )));
        }
        if trainable == Trainable::Lora && !model.has_lora() {
            return Err(Error::InvalidArgument(
                "LoRA training needs adapters on the model".into(),
            ));
        }
        let grads = Gradients::new(gpu, model, trainable)?;
        let params = grads.named(model);
        let base_tensors = BaseTensors::new(gpu, &base_stats, model.config.hidden_size)?;
        Ok(Es2Engine {
            optimizer: AdamW::new(gpu, &params, optimizer),
            config,
            layers,
            base_stats,
            base_tensors,
            grads,
            lora_dropout,
        })
    }

    /// One step on `harmful` and `harmless` at learning rate `lr`. `frozen` supplies the base
    /// logits under full fine-tuning; under LoRA they come from `model` with adapters off.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        gpu: &Gpu,
        model: &Transformer,
        frozen: Option<&Transformer>,
        harmful: &Batch,
        harmless: &Batch,
        lr: f64,
        dropout_seed: u32,
    ) -> Result<StepReport> {
        let mut rec = Recorder::new(gpu);
        let params = self.grads.named(model);
        self.grads.zero(&mut rec, model);

        let dropout = (self.lora_dropout > 0.0).then_some((self.lora_dropout, dropout_seed));
        let tuned = |logits: bool, dropout| ForwardSpec {
            lora_dropout: dropout,
            ..forward_spec(&self.layers, logits, true)
        };
        let s_fwd = model.forward(&mut rec, harmless, &tuned(true, dropout));
        let base_model = frozen.unwrap_or(model);
        let base_fwd = base_model.forward(&mut rec, harmless, &forward_spec(&[], true, false));
        let base_logits = base_fwd
            .logits
            .ok_or_else(|| Error::InvalidArgument("the base forward produced no logits".into()))?;
        // Harmful prompts need the network only up to the deepest chosen layer; their
        // adapters draw other dropout masks than the harmless batch's.
        let h_dropout = dropout.map(|(p, seed)| (p, seed ^ 0x5A5A_5A5A));
        let h_fwd = model.forward(&mut rec, harmful, &tuned(false, h_dropout));

        let objective = record_objective(
            &mut rec,
            &ObjectiveInputs {
                config: &self.config,
                layers: &self.layers,
                base: &self.base_tensors,
                harmful: (harmful, &h_fwd),
                harmless: (harmless, &s_fwd),
                base_logits: &base_logits,
            },
        )?;
        let s_seeds = Seeds {
            logits: Some(&objective.harmless_logits),
            hidden: &objective.harmless_hidden,
        };
        model.backward(&mut rec, harmless, &s_fwd, &s_seeds, &self.grads)?;
        let h_seeds = Seeds {
            logits: None,
            hidden: &objective.harmful_hidden,
        };
        model.backward(&mut rec, harmful, &h_fwd, &h_seeds, &self.grads)?;
        let norm_sq = self.optimizer.record_step(&mut rec, &params, lr);

        // One readback: D_l and φ(D_l), the per-position KL, the squared gradient norm.
        let out = &objective.outputs;
        let (l2, n) = (out.per_layer.numel(), out.kl_rows.numel());
        let packed = Tensor::empty(gpu, [l2 + n + 1], DType::F32);
        rec.copy_elements(&out.per_layer, 0, &packed, 0, l2);
        rec.copy_elements(&out.kl_rows, 0, &packed, l2, n);
        rec.copy_elements(&norm_sq, 0, &packed, l2 + n, 1);
        rec.submit();
        let packed_values = packed.to_f32(gpu)?;
        let values = ObjectiveValues::from_parts(
            &packed_values[..l2],
            &packed_values[l2..l2 + n],
            out.kl_positions,
            self.config.lambda,
        );
        let report = StepReport {
            relative_distance: self.base_stats.relative(&values.distance),
            values,
            grad_norm: f64::from(packed_values[l2 + n]).sqrt(),
            tokens: harmful.tokens() + harmless.tokens(),
        };
        if !report.values.loss.is_finite() || !report.grad_norm.is_finite() {
            return Err(Error::Numerical(format!(
                "step {}: the loss or gradient norm is not finite (loss {}, grad norm {}); lower the \
                 learning rate or turn on gradient clipping",
                self.optimizer.step, report.values.loss, report.grad_norm
            )));
        }
        Ok(report)
    }
}

/// Measures ν, D(base), the margins and the base centroid on the base model (`adapters`
/// off) over the given prompt batches.
pub fn measure_base_stats(
    gpu: &Gpu,
    base: &Transformer,
    config: &Es2Config,
    harmful: &[Batch],
    harmless: &[Batch],
) -> Result<BaseStats> {
    let layers = config.resolved_layers(base.layers())?;
    let h = embeddings_on_host(gpu, base, harmful, &layers, config.pool, false)?;
    let s = embeddings_on_host(gpu, base, harmless, &layers, config.pool, false)?;
    Ok(BaseStats::from_embeddings(
        config,
        &layers,
        &h,
        &s,
        base.config.hidden_size,
    ))
}
