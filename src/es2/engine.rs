//! One ES2 training step, end to end on the GPU: the forwards (tuned model on both batches,
//! the base model to its final norm on the harmless batch), the fused losses (the KL over row
//! chunks of both LM heads' logits), both backwards, the global gradient
//! norm and AdamW, recorded into one command buffer with a single readback of the scalars.

use super::objective::{
    embedding_hooks, embedding_output, embeddings_on_host, record_objective, BaseStats,
    BaseTensors, Es2Config, ObjectiveInputs, ObjectiveValues,
};
use super::optimizer::{AdamW, OptimizerConfig};
use super::report::{Es2Terms, StepReport, Terms};
use crate::gpu::{Gpu, Recorder};
use crate::model::{
    Batch, Gradients, LoraDropout, Output, Pass, SavePolicy, Seeds, Trainable, Transformer,
};
use crate::{Error, Result};

/// The model being trained and the reference it is held to: under LoRA the same weights with
/// the adapters off, under full ES2 fine-tuning a frozen copy of the base (supervised
/// fine-tuning keeps none).
#[derive(Debug)]
pub struct ModelPair {
    /// The model whose trainable weights the step updates.
    pub tuned: Transformer,
    /// The frozen base of a full fine-tune; `None` under LoRA.
    pub frozen: Option<Transformer>,
}

impl ModelPair {
    /// The base model's forward settings: its weights, adapters off, run to the final norm
    /// (its LM head makes the reference logits chunk by chunk, `Transformer::head_in_chunks`).
    pub fn base(&self) -> (&Transformer, Pass<'static>) {
        let model = self.frozen.as_ref().unwrap_or(&self.tuned);
        (model, Pass::new(Output::Hidden(model.layers())).base())
    }

    /// The model that supplies base statistics and reference logits.
    pub fn base_model(&self) -> &Transformer {
        self.base().0
    }
}

/// The state that persists across steps.
#[derive(Debug)]
pub struct Es2Engine {
    /// The objective's options.
    pub config: Es2Config,
    /// The chosen layers, resolved to block indices.
    pub layers: Vec<usize>,
    /// Constants measured once on the base model (ν, margins, centroid).
    pub base_stats: BaseStats,
    base_tensors: BaseTensors,
    /// Gradient buffers of the trainable parameters.
    pub grads: Gradients,
    /// AdamW and its moments.
    pub optimizer: AdamW,
    /// Dropout probability on the LoRA adapters' inputs.
    pub lora_dropout: f32,
    /// What the forwards keep for the backward: every block's activations (the default), or
    /// only the blocks' inputs, recomputing each block in the backward
    /// (`TrainConfig::recompute`).
    pub save: SavePolicy,
}

impl Es2Engine {
    /// An engine for `model`'s trainable parameters under `config`.
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
            save: SavePolicy::Everything,
        })
    }

    /// One step on `harmful` and `harmless` at learning rate `lr`, with LoRA dropout masks
    /// drawn from `dropout_seed`.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        models: &ModelPair,
        harmful: &Batch,
        harmless: &Batch,
        lr: f64,
        dropout_seed: u32,
    ) -> Result<StepReport> {
        let model = &models.tuned;
        let mut rec = Recorder::new(gpu);
        let params = self.grads.named(model);
        self.grads.zero(&mut rec, model);

        let dropout = (self.lora_dropout > 0.0).then_some(LoraDropout {
            p: self.lora_dropout,
            seed: dropout_seed,
        });
        let hooks = embedding_hooks(&self.layers, self.config.pool);
        let train = |output, dropout| {
            Pass::new(output)
                .with_hooks(&hooks)
                .with_dropout(dropout)
                .saving(self.save)
        };
        let (base_model, base_pass) = models.base();
        let top = model.layers();
        // Only the final norm's output is kept: its logits are made chunk by chunk in the
        // objective, beside the tuned model's.
        let base_normed = base_model
            .run(&mut rec, harmless, &base_pass)?
            .hidden_state(top)
            .clone();
        let mut s_fwd = model.run(&mut rec, harmless, &train(Output::Hidden(top), dropout))?;
        // Harmful prompts need the network only up to the deepest chosen layer; their
        // adapters draw other dropout masks than the harmless batch's.
        let h_dropout = dropout.map(|d| LoraDropout {
            seed: d.seed ^ 0x5A5A_5A5A,
            ..d
        });
        let h_output = embedding_output(&self.layers);
        let mut h_fwd = model.run(&mut rec, harmful, &train(h_output, h_dropout))?;

        let objective = record_objective(
            &mut rec,
            &ObjectiveInputs {
                config: &self.config,
                layers: &self.layers,
                constants: &self.base_tensors,
                harmful: (harmful, &h_fwd),
                harmless: (harmless, &s_fwd),
                model,
                base: (base_model, &base_normed),
                grads: &self.grads,
            },
        )?;
        drop(base_normed);
        // Hook i captured layer layers[i]: its gradient enters the backward where it read.
        for (hook, grad) in objective.harmless_captures.into_iter().enumerate() {
            s_fwd.seed_capture(harmless, hook, grad)?;
        }
        for (hook, grad) in objective.harmful_captures.into_iter().enumerate() {
            h_fwd.seed_capture(harmful, hook, grad)?;
        }
        let s_seeds = Seeds {
            normed: Some(&objective.harmless_normed),
            ..Seeds::default()
        };
        model.backward(&mut rec, harmless, s_fwd, &s_seeds, &[], &self.grads)?;
        model.backward(
            &mut rec,
            harmful,
            h_fwd,
            &Seeds::default(),
            &[],
            &self.grads,
        )?;
        let norm_sq = self.optimizer.record_step(&mut rec, &params, lr)?;

        // One readback: D_l and φ(D_l), the per-position KL, the squared gradient norm.
        let out = &objective.outputs;
        let values = rec.finish_reading(&[&out.per_layer, &out.kl_rows, &norm_sq])?;
        let v = ObjectiveValues::from_parts(
            &values[0],
            &values[1],
            out.kl_positions,
            self.config.lambda,
        );
        let grad_norm = f64::from(values[2][0]).sqrt();
        Ok(StepReport {
            loss: v.loss,
            grad_norm,
            tokens: harmful.tokens() + harmless.tokens(),
            terms: Terms::Es2(Es2Terms {
                sep: v.sep,
                kl: v.kl,
                relative_distance: self.base_stats.relative(&v.distance),
                distance: v.distance,
            }),
        })
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
    let embed = |batches: &[Batch]| -> Result<Vec<Vec<f64>>> {
        let mut out = vec![Vec::new(); layers.len()];
        for batch in batches {
            // The prompts differ in length and the pool reuses an idle buffer only for a tensor
            // of its size: without this the pool would keep every length's buffers, and
            // measuring would take more memory than a training step (the run's plan).
            gpu.trim_pool();
            let one = std::slice::from_ref(batch);
            let pooled = embeddings_on_host(gpu, base, one, &layers, config.pool, false)?;
            for (all, layer) in out.iter_mut().zip(pooled) {
                all.extend(layer);
            }
        }
        Ok(out)
    };
    let (h, s) = (embed(harmful)?, embed(harmless)?);
    BaseStats::from_embeddings(config, &layers, &h, &s, base.config.hidden_size)
}
