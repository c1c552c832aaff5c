//! Held-out measurements of a model under training: per-layer separation of harmful and
//! harmless embeddings (normalised as the objective normalises them), the KL to the base
//! model on harmless prompts, and the cross-entropy of learned tokens (supervised
//! fine-tuning). No gradients; every pass saves nothing.

use super::{geometry, Rows};
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::embed::pooled_hidden_states;
use crate::model::{Batch, Output, Pass, Transformer};
use crate::ops::kl::{kl_loss_in_parts, KlOptions};
use crate::ops::pool::Pool;
use crate::ops::separation::{Pair, SeparationOptions};
use crate::Result;

/// How separation is measured: the layers' hidden-state indices, pooling, the objective's
/// distance options, and the base model's constants per layer.
#[derive(Debug, Clone)]
pub struct SeparationSpec<'a> {
    /// transformers' hidden-state index of each measured embedding.
    pub hidden: &'a [usize],
    /// How a prompt's hidden states become one embedding (last token or mean).
    pub pool: Pool,
    /// The objective's pairing and distance; the loss shape plays no part in a measurement.
    pub options: SeparationOptions,
    /// ν per layer: the base model's mean harmless embedding norm.
    pub nu: &'a [f32],
    /// The base model's harmless centroid per layer (`[L·C]`), used when `options.pair` is
    /// `base-centroid`.
    pub base_centroid: &'a [f32],
}

/// D per layer between the pooled embeddings of `harmful` and `harmless` under `model` (adapters
/// on), normalised as in training.
pub fn heldout_separation(
    gpu: &Gpu,
    model: &Transformer,
    harmful: &[Batch],
    harmless: &[Batch],
    spec: &SeparationSpec,
) -> Result<Vec<f64>> {
    let h = pooled_hidden_states(gpu, model, harmful, spec.hidden, spec.pool, true)?;
    let s = pooled_hidden_states(gpu, model, harmless, spec.hidden, spec.pool, true)?;
    let cols = model.config.hidden_size;
    (0..spec.hidden.len())
        .map(|i| {
            let centroid: Vec<f64> = spec.base_centroid[i * cols..(i + 1) * cols]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let other = comparison_side(&spec.options, &s[i], &centroid);
            layer_distance(&h[i], other, cols, f64::from(spec.nu[i]), &spec.options)
        })
        .collect()
}

/// What the harmful embeddings are compared with: the harmless set, or the base model's
/// harmless centroid (`pair = base-centroid`). The one place that choice is made on the host.
pub fn comparison_side<'a>(
    options: &SeparationOptions,
    harmless: &'a [f64],
    base_centroid: &'a [f64],
) -> &'a [f64] {
    if options.pair == Pair::BaseCentroid {
        base_centroid
    } else {
        harmless
    }
}

/// The objective's distance between two sets of embeddings (`[n·C]` each), normalised by ν.
pub fn layer_distance(
    harmful: &[f64],
    other: &[f64],
    cols: usize,
    nu: f64,
    options: &SeparationOptions,
) -> Result<f64> {
    Ok(geometry::layer_distance(
        Rows::new(harmful, cols)?,
        Rows::new(other, cols)?,
        nu,
        options,
    ))
}

/// T²·KL per real harmless token between the `base` pass and the `tuned` pass (the objective's
/// direction and temperature), over `batches`. Each pass runs to its final norm whatever its
/// `output` says, and the logits are made one row chunk at a time
/// ([`Transformer::head_in_chunks`]).
pub fn heldout_kl(
    gpu: &Gpu,
    tuned: (&Transformer, Pass),
    base: (&Transformer, Pass),
    batches: &[Batch],
    options: &KlOptions,
) -> Result<f64> {
    let (mut total, mut positions) = (0.0, 0usize);
    let vocab = tuned.0.config.vocab_size;
    for batch in batches {
        let mut rec = Recorder::new(gpu);
        let tuned_normed = normed_of(&mut rec, tuned, batch)?;
        let base_normed = normed_of(&mut rec, base, batch)?;
        let mask = batch.position_mask();
        let mask = Tensor::from_u32(gpu, [mask.len()], &mask)?;
        let rows = Tensor::empty(gpu, [mask.dims()[0]], DType::F32);
        tuned
            .0
            .head_in_chunks(&mut rec, &tuned_normed, None, |rec, chunk, zt| {
                let zb = chunk.logits(rec, base.0, &base_normed);
                let gpu = rec.gpu();
                // The gradient is not wanted: a zero scale, into scratch.
                let scratch = chunk.vocab_tensor(gpu, vocab);
                let (mask, rows) = (chunk.rows_of(gpu, &mask), chunk.rows_of(gpu, &rows));
                kl_loss_in_parts(rec, zt, &zb, &mask, &rows, &scratch, options, 0.0);
                Ok(None)
            })?;
        let values = rec.finish_reading(&[&rows])?;
        total += values[0].iter().map(|&x| f64::from(x)).sum::<f64>();
        positions += batch.tokens();
    }
    Ok(total / positions.max(1) as f64)
}

/// Mean cross-entropy per learned token over `batches` (each made with its targets, see
/// [`Batch::with_targets`]): the sum over every learned token of every batch divided by their
/// number, so batches of different sizes weigh by their tokens. The pass runs to its final
/// norm whatever its `output` says ([`Transformer::lm_loss`], one row chunk at a time).
pub fn heldout_loss(
    gpu: &Gpu,
    (model, pass): (&Transformer, Pass),
    batches: &[Batch],
) -> Result<f64> {
    let (mut total, mut counted) = (0.0, 0usize);
    for batch in batches {
        let targets = batch.targets.as_ref().ok_or_else(|| {
            crate::Error::InvalidArgument("a held-out loss needs batches with targets".into())
        })?;
        let mut rec = Recorder::new(gpu);
        let normed = normed_of(&mut rec, (model, pass), batch)?;
        let rows = model.lm_loss(&mut rec, &normed, targets, None)?;
        let values = rec.finish_reading(&[&rows])?;
        total += values[0].iter().map(|&x| f64::from(x)).sum::<f64>();
        counted += targets.counted;
    }
    Ok(total / counted.max(1) as f64)
}

/// The final norm's output `[B·T, C]` of `pass` (run that far) on `batch`.
fn normed_of(
    rec: &mut Recorder,
    (model, pass): (&Transformer, Pass),
    batch: &Batch,
) -> Result<Tensor> {
    let top = model.layers();
    let pass = Pass {
        output: Output::Hidden(top),
        ..pass
    };
    Ok(model.run(rec, batch, &pass)?.hidden_state(top).clone())
}
