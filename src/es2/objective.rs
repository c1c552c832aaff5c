//! The ES2 objective of ARCHITECTURE.md: L = L_sep + λ·L_KL, every option a field of [`Es2Config`].
//! This file records one evaluation of the objective and its gradients on the GPU; the
//! constants measured once on the base model live in [`BaseStats`].

use serde::{Deserialize, Serialize};

use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::model::embed::pooled_hidden_states;
use crate::model::head::HeadBackward;
use crate::model::{Batch, Forward, Gradients, Hook, Output, Transformer};
use crate::ops::kl::{kl_loss_in_parts, KlDirection, KlOptions};
use crate::ops::pool::Pool;
use crate::ops::separation::{
    separation_loss, Distance, LossShape, Pair, SeparationInputs, SeparationOptions,
    SeparationOutputs,
};
use crate::{Error, Result};

/// Every option of the objective, with ARCHITECTURE.md's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Es2Config {
    /// Layers whose embeddings are separated (0-based blocks); empty means all.
    pub layers: Vec<usize>,
    /// How a prompt's hidden states become one embedding (last token or mean).
    pub pool: Pool,
    /// Which embeddings the distance compares (pairs, or each against a centroid).
    pub pair: Pair,
    /// The distance measure (L2, squared L2, cosine).
    pub distance: Distance,
    /// How the distance becomes a loss (hinge to the margin, or its negative).
    pub shape: LossShape,
    /// Relative margin: m_l = margin × D_l(base).
    pub margin: f32,
    /// Absolute margin m_l (overrides `margin`).
    pub margin_abs: Option<f32>,
    /// Stop the separation gradient on harmless embeddings.
    pub harmful_only: bool,
    /// Weight λ of the KL term.
    pub lambda: f32,
    /// Softmax temperature of the KL term.
    pub temperature: f32,
    /// Which way the KL divergence runs (forward or reverse).
    pub kl_dir: KlDirection,
}

impl Default for Es2Config {
    fn default() -> Self {
        Es2Config {
            layers: Vec::new(),
            pool: Pool::Last,
            pair: Pair::Centroid,
            distance: Distance::L2,
            shape: LossShape::Hinge,
            margin: 3.0,
            margin_abs: None,
            harmful_only: false,
            lambda: 1.0,
            temperature: 1.0,
            kl_dir: KlDirection::Forward,
        }
    }
}

impl Es2Config {
    /// The layers, resolved against a model of `num_layers` blocks and checked.
    pub fn resolved_layers(&self, num_layers: usize) -> Result<Vec<usize>> {
        if self.layers.is_empty() {
            return Ok((0..num_layers).collect());
        }
        let mut layers = self.layers.clone();
        layers.sort_unstable();
        layers.dedup();
        if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
            return Err(Error::config(
                "objective.layers",
                format!(
                    "layer {bad} does not exist (the model has {num_layers} blocks, 0..={})",
                    num_layers - 1
                ),
            ));
        }
        Ok(layers)
    }

    /// The options of the fused separation kernels.
    pub fn separation_options(&self) -> SeparationOptions {
        SeparationOptions {
            pair: self.pair,
            distance: self.distance,
            shape: self.shape,
            harmful_only: self.harmful_only,
        }
    }

    /// The options of the fused KL kernels.
    pub fn kl_options(&self) -> KlOptions {
        KlOptions {
            temperature: self.temperature,
            direction: self.kl_dir,
        }
    }

    /// Rejects values the objective cannot use.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: String| Err(Error::config(field, message));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            let got = self.temperature;
            return bad("objective.temperature", format!("must be > 0, got {got}"));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            let got = self.lambda;
            return bad("objective.lambda", format!("must be >= 0, got {got}"));
        }
        if !self.margin.is_finite() {
            return bad("objective.margin", "must be finite".into());
        }
        if let Some(m) = self.margin_abs.filter(|m| !m.is_finite()) {
            return bad("objective.margin_abs", format!("must be finite, got {m}"));
        }
        Ok(())
    }
}

/// Parses a layer list as people write it: "all" (the empty list), or comma-separated indices
/// and inclusive ranges ("2,4,8-12"). [`format_layers`] writes it back.
pub fn parse_layers(text: &str) -> Result<Vec<usize>> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") {
        return Ok(Vec::new());
    }
    let bad = |part: &str| {
        Error::config(
            "objective.layers",
            format!("'{part}' is not a layer index or a range like 2-5"),
        )
    };
    let mut layers = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad(part))?,
                    b.trim().parse().map_err(|_| bad(part))?,
                );
                if a > b {
                    return Err(bad(part));
                }
                layers.extend(a..=b);
            }
            None => layers.push(part.parse().map_err(|_| bad(part))?),
        }
    }
    if layers.is_empty() {
        return Err(Error::config("objective.layers", "names no layer"));
    }
    Ok(layers)
}

/// A layer list as [`parse_layers`] reads it: "all" for the empty list (every layer), else
/// the indices, with runs of three or more written as ranges ("0,2,5-9").
pub fn format_layers(layers: &[usize]) -> String {
    if layers.is_empty() {
        return "all".into();
    }
    let mut parts = Vec::new();
    let mut start = 0;
    while start < layers.len() {
        let mut end = start;
        while end + 1 < layers.len() && layers[end + 1] == layers[end] + 1 {
            end += 1;
        }
        match end - start {
            0 => parts.push(layers[start].to_string()),
            1 => parts.extend([layers[start].to_string(), layers[end].to_string()]),
            _ => parts.push(format!("{}-{}", layers[start], layers[end])),
        }
        start = end + 1;
    }
    parts.join(",")
}

/// Constants measured once on the base model over the training prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseStats {
    /// The chosen layers (block indices), in the order of every per-layer vector.
    pub layers: Vec<usize>,
    /// ν_l: mean norm of the harmless embeddings.
    pub nu: Vec<f32>,
    /// D_l(base).
    pub distance: Vec<f32>,
    /// m_l.
    pub margin: Vec<f32>,
    /// The base harmless centroid per layer `[L, C]` (for `base-centroid`).
    pub centroid: Vec<f32>,
}

impl BaseStats {
    /// Computes the statistics from the base model's pooled embeddings `[L][n, C]`.
    pub fn from_embeddings(
        config: &Es2Config,
        layers: &[usize],
        harmful: &[Vec<f64>],
        harmless: &[Vec<f64>],
        cols: usize,
    ) -> Result<BaseStats> {
        use crate::eval::heldout::{comparison_side, layer_distance};
        let mut stats = BaseStats {
            layers: layers.to_vec(),
            nu: Vec::new(),
            distance: Vec::new(),
            margin: Vec::new(),
            centroid: Vec::new(),
        };
        let options = config.separation_options();
        for (h, s) in harmful.iter().zip(harmless) {
            let rows: Vec<&[f64]> = s.chunks(cols).collect();
            let nu = rows
                .iter()
                .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
                .sum::<f64>()
                / rows.len() as f64;
            let centroid: Vec<f64> = (0..cols)
                .map(|c| rows.iter().map(|r| r[c]).sum::<f64>() / rows.len() as f64)
                .collect();
            let other = comparison_side(&options, s, &centroid);
            let distance = layer_distance(h, other, cols, nu, &options)?;
            stats.nu.push(nu as f32);
            stats.distance.push(distance as f32);
            stats
                .margin
                .push(config.margin_abs.unwrap_or(config.margin * distance as f32));
            stats.centroid.extend(centroid.iter().map(|&x| x as f32));
        }
        Ok(stats)
    }

    /// Host copies of layer-normalised distances: D_l / D_l(base).
    pub fn relative(&self, distances: &[f32]) -> Vec<f32> {
        distances
            .iter()
            .zip(&self.distance)
            .map(|(d, b)| d / b)
            .collect()
    }
}

/// The per-layer constants on the GPU.
#[derive(Debug)]
pub struct BaseTensors {
    /// ν_l per chosen layer (the distance normaliser).
    pub nu: Tensor,
    /// m_l per chosen layer.
    pub margin: Tensor,
    /// The base model's harmless centroid per chosen layer, `[layers, hidden]`.
    pub centroid: Tensor,
}

impl BaseTensors {
    /// Uploads `stats` for hidden width `cols`.
    pub fn new(gpu: &Gpu, stats: &BaseStats, cols: usize) -> Result<Self> {
        let l = stats.layers.len();
        Ok(BaseTensors {
            nu: Tensor::from_f32(gpu, [l], &stats.nu)?,
            margin: Tensor::from_f32(gpu, [l], &stats.margin)?,
            centroid: Tensor::from_f32(gpu, [l, cols], &stats.centroid)?,
        })
    }
}

/// transformers' hidden-state index of block `layer`'s output embedding e_l.
pub fn embedding_index(layer: usize) -> usize {
    layer + 1
}

/// Hooks that capture e_l for every chosen layer, pooled (hook i captures layer `layers[i]`).
pub fn embedding_hooks(layers: &[usize], pool: Pool) -> Vec<Hook> {
    layers
        .iter()
        .map(|&l| Hook::capture(embedding_index(l), pool))
        .collect()
}

/// How far a pass must run to reach every chosen layer (no logits).
pub fn embedding_output(layers: &[usize]) -> Output {
    Output::Hidden(layers.iter().max().map_or(0, |&l| embedding_index(l)))
}

/// The pooled embeddings a pass captured with [`embedding_hooks`], stacked as `[L, B, C]`.
pub fn stacked_embeddings(rec: &mut Recorder, forward: &Forward, layers: usize) -> Result<Tensor> {
    let captured = |i: usize| {
        forward.captured(i).ok_or_else(|| {
            Error::InvalidArgument(format!("the pass did not capture embedding {i}"))
        })
    };
    let first = captured(0)?;
    let (b, cols) = (first.dims()[0], first.dims()[1]);
    let stacked = Tensor::empty(rec.gpu(), [layers, b, cols], DType::F32);
    for slot in 0..layers {
        rec.copy_elements(captured(slot)?, 0, &stacked, slot * b * cols, b * cols);
    }
    Ok(stacked)
}

/// Each chosen layer's slice `[B, C]` of the gradient of the pooled embeddings `[L, B, C]`:
/// the gradients of the captures, in the order of [`embedding_hooks`] (for
/// [`Forward::seed_capture`]).
pub fn capture_gradients(rec: &mut Recorder, d_pooled: &Tensor) -> Vec<Tensor> {
    let [layers, b, cols] = [d_pooled.dims()[0], d_pooled.dims()[1], d_pooled.dims()[2]];
    (0..layers)
        .map(|slot| {
            let de = Tensor::empty(rec.gpu(), [b, cols], DType::F32);
            rec.copy_elements(d_pooled, slot * b * cols, &de, 0, b * cols);
            de
        })
        .collect()
}

/// Where one evaluation of the objective leaves its results (read back after submission).
#[derive(Debug)]
pub struct ObjectiveOutputs {
    /// `[2, L]`: D_l and φ(D_l).
    pub per_layer: Tensor,
    /// `[B_S·T_S]` per-position T²·KL (0 at padding).
    pub kl_rows: Tensor,
    /// Number of positions the KL averages over.
    pub kl_positions: usize,
}

/// The separation and KL losses with their gradients, recorded on `rec`: the seeds of the
/// harmful and harmless backward passes.
pub struct ObjectiveGradients {
    /// The gradients of the harmful pass's captures, per chosen layer (`[B_H, C]` each).
    pub harmful_captures: Vec<Tensor>,
    /// The gradients of the harmless pass's captures, per chosen layer (none when
    /// `harmful_only`).
    pub harmless_captures: Vec<Tensor>,
    /// The KL term's gradient at the harmless pass's final-norm output `[B_S·T_S, C]`, taken
    /// back through the LM head chunk by chunk (its seed at hidden state L).
    pub harmless_normed: Tensor,
    /// The values the step reads back.
    pub outputs: ObjectiveOutputs,
}

/// Everything one objective evaluation reads.
pub struct ObjectiveInputs<'a> {
    /// The objective's options.
    pub config: &'a Es2Config,
    /// The chosen layers (block indices).
    pub layers: &'a [usize],
    /// The base constants on the GPU.
    pub constants: &'a BaseTensors,
    /// The harmful batch and its forward (hidden states of the chosen layers).
    pub harmful: (&'a Batch, &'a Forward),
    /// The harmless batch and its forward (run to the final norm).
    pub harmless: (&'a Batch, &'a Forward),
    /// The model being tuned: its LM head turns the harmless forward's final-norm output into
    /// logits, one row chunk at a time.
    pub model: &'a Transformer,
    /// The base model and its final-norm output on the harmless batch `[B_S·T_S, C]`: its
    /// head gives the reference logits of each chunk.
    pub base: (&'a Transformer, &'a Tensor),
    /// The gradients the LM head's weight adds to, when it trains.
    pub grads: &'a Gradients,
}

/// Records L_sep and λ·L_KL with their gradients.
pub fn record_objective(
    rec: &mut Recorder,
    inputs: &ObjectiveInputs,
) -> Result<ObjectiveGradients> {
    let gpu = rec.gpu();
    let cfg = inputs.config;
    let (_, h_fwd) = inputs.harmful;
    let (s_batch, s_fwd) = inputs.harmless;
    let layers = inputs.layers;
    let eh = stacked_embeddings(rec, h_fwd, layers.len())?;
    let es = stacked_embeddings(rec, s_fwd, layers.len())?;
    let options = cfg.separation_options();
    let per_layer = Tensor::empty(gpu, [2, layers.len()], DType::F32);
    let deh = Tensor::empty(gpu, eh.shape().clone(), DType::F32);
    let des = options
        .grad_to_harmless()
        .then(|| Tensor::empty(gpu, es.shape().clone(), DType::F32));
    let centroid = inputs.constants.centroid.clone();
    let harmless = if cfg.pair == Pair::BaseCentroid {
        &centroid
    } else {
        &es
    };
    separation_loss(
        rec,
        &SeparationInputs {
            harmful: &eh,
            harmless,
            nu: &inputs.constants.nu,
            margin: &inputs.constants.margin,
        },
        &SeparationOutputs {
            per_layer: &per_layer,
            d_harmful: &deh,
            d_harmless: des.as_ref(),
        },
        &options,
        1.0 / layers.len() as f32,
    );

    let (model, (base_model, base_normed)) = (inputs.model, inputs.base);
    let top = model.layers();
    if s_fwd.top() != top {
        return Err(Error::InvalidArgument(
            "the harmless forward must run to the final norm (Output::Hidden(layers))".into(),
        ));
    }
    let normed = s_fwd.hidden_state(top);
    let mask = s_batch.position_mask();
    let positions = mask.iter().filter(|&&m| m == 1).count();
    let mask = Tensor::from_u32(gpu, [mask.len()], &mask)?;
    let kl_rows = Tensor::empty(gpu, [s_batch.rows()], DType::F32);
    let dnormed = Tensor::empty(gpu, normed.shape().clone(), DType::F32);
    let grad_scale = cfg.lambda / positions as f32;
    let options = cfg.kl_options();
    let vocab = model.config.vocab_size;
    let backward = HeadBackward {
        dnormed: &dnormed,
        grads: inputs.grads,
    };
    model.head_in_chunks(rec, normed, Some(backward), |rec, chunk, zt| {
        let zb = chunk.logits(rec, base_model, base_normed);
        let gpu = rec.gpu();
        let dzt = chunk.vocab_tensor(gpu, vocab);
        let (mask, kl_rows) = (chunk.rows_of(gpu, &mask), chunk.rows_of(gpu, &kl_rows));
        kl_loss_in_parts(rec, zt, &zb, &mask, &kl_rows, &dzt, &options, grad_scale);
        Ok(Some(dzt))
    })?;

    let harmless_captures = match &des {
        Some(des) => capture_gradients(rec, des),
        None => Vec::new(),
    };
    Ok(ObjectiveGradients {
        harmful_captures: capture_gradients(rec, &deh),
        harmless_captures,
        harmless_normed: dnormed,
        outputs: ObjectiveOutputs {
            per_layer,
            kl_rows,
            kl_positions: positions,
        },
    })
}

/// Scalars of one objective evaluation, read back from [`ObjectiveOutputs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectiveValues {
    /// L_sep + λ·L_KL.
    pub loss: f64,
    /// L_sep, the mean over the chosen layers of φ(D_l).
    pub sep: f64,
    /// L_KL per real harmless position.
    pub kl: f64,
    /// D_l per chosen layer.
    pub distance: Vec<f32>,
}

impl ObjectiveValues {
    /// The scalars from the read-back `[2, L]` per-layer values and per-position KL.
    pub fn from_parts(
        per_layer: &[f32],
        kl_rows: &[f32],
        kl_positions: usize,
        lambda: f32,
    ) -> Self {
        let l = per_layer.len() / 2;
        let sep = per_layer[l..].iter().map(|&x| f64::from(x)).sum::<f64>() / l as f64;
        let kl = kl_rows.iter().map(|&x| f64::from(x)).sum::<f64>() / kl_positions.max(1) as f64;
        ObjectiveValues {
            loss: sep + f64::from(lambda) * kl,
            sep,
            kl,
            distance: per_layer[..l].to_vec(),
        }
    }
}

/// Runs `model` over `batches` (no gradients) and returns each chosen layer's pooled
/// embeddings e_l on the host, `[L][n·C]` with the rows of all batches concatenated.
pub fn embeddings_on_host(
    gpu: &Gpu,
    model: &Transformer,
    batches: &[Batch],
    layers: &[usize],
    pool: Pool,
    adapters: bool,
) -> Result<Vec<Vec<f64>>> {
    let hidden: Vec<usize> = layers.iter().map(|&l| embedding_index(l)).collect();
    pooled_hidden_states(gpu, model, batches, &hidden, pool, adapters)
}
