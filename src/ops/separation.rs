//! The fused separation-distance loss of ES2: per layer, the distance `D_l` between the
//! harmful and the harmless embeddings, the loss `φ(D_l)`, and the gradients of
//! `grad_scale · Σ_l φ(D_l)` with respect to every embedding, in one dispatch (one workgroup
//! per layer) that keeps every per-pair quantity in workgroup memory.
//!
//! Limits of [`separation_loss`] (asserted): at most [`MAX_PAIRS`] distance pairs per layer
//! (1 for `Centroid`, `nH·nS` for `Pairwise`, `nH` for `BaseCentroid`) and at most
//! [`MAX_ROWS`] rows per side in the pairs (`Pairwise`, `BaseCentroid`); `Centroid` takes any
//! number of rows. [`separation_distance`] has no such limits (it keeps no per-pair state).

use serde::{Deserialize, Serialize};

use super::common::{expect_dims, expect_dtype, REDUCE_WG};
use crate::gpu::{read, read_write, DType, Grid, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("separation");
/// Threads that reduce one pair over the channels; a power of two dividing the [`REDUCE_WG`]
/// threads of a layer's workgroup.
const LANES: u32 = 32;
/// Most distance pairs per layer that [`separation_loss`] holds in workgroup memory.
pub const MAX_PAIRS: usize = 4096;
/// Most rows per side that [`separation_loss`] pairs up (their norms live in workgroup memory).
pub const MAX_ROWS: usize = 1024;
/// Workgroup memory the kernels use: the per-pair reduction scratch (vec4), the tree of
/// `workgroup_sum` (common.wgsl), the pair and row scalars.
const WORKGROUP_BYTES: u32 =
    REDUCE_WG * 16 + REDUCE_WG * 4 + (MAX_PAIRS as u32 + 2 * MAX_ROWS as u32) * 4;
const _: () = assert!(LANES.is_power_of_two() && LANES <= REDUCE_WG);

static LOSS: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "separation_loss",
    bindings: &[
        read(1),
        read(2),
        read(3),
        read(4),
        read_write(5),
        read_write(6),
        read_write(7),
    ],
};
static DISTANCE: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "separation_distance",
    bindings: &[read(1), read(2), read(3), read_write(5)],
};

/// Which embeddings the distance compares.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pair {
    /// `d(mean_i h_i, mean_j s_j)`.
    #[default]
    Centroid,
    /// `mean_{i,j} d(h_i, s_j)`.
    Pairwise,
    /// `mean_i d(h_i, c_base)` against the base model's fixed harmless centroid; no gradient
    /// reaches the harmless side.
    BaseCentroid,
}

/// The distance d between two embeddings. (Discriminants match `DISTANCE_*` in the shader.)
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distance {
    /// `‖a − b‖ / ν`.
    #[default]
    L2 = 0,
    /// `‖a − b‖² / ν²`.
    SqL2 = 1,
    /// `1 − cos(a, b)` (scale-free: not divided by ν).
    Cosine = 2,
}

/// φ, which turns the distance into a loss. (Discriminants match `SHAPE_*` in the shader.)
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossShape {
    /// `max(0, m − D)`: bounded; exactly zero gradient once `D ≥ m`.
    #[default]
    Hinge = 0,
    /// `−D`: unbounded.
    Neg = 1,
}

/// The separation term's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct SeparationOptions {
    /// Which embeddings the distance compares.
    pub pair: Pair,
    /// The distance between two embeddings.
    pub distance: Distance,
    /// How the distance becomes a loss.
    pub shape: LossShape,
    /// Stop the gradient on the harmless side.
    pub harmful_only: bool,
}

impl SeparationOptions {
    /// Whether any gradient reaches the harmless embeddings.
    pub fn grad_to_harmless(&self) -> bool {
        !self.harmful_only && self.pair != Pair::BaseCentroid
    }
}

/// The embeddings and per-layer constants of one separation call (`L` layers stacked).
#[derive(Debug, Clone, Copy)]
pub struct SeparationInputs<'a> {
    /// Harmful embeddings `[L, nH, C]`.
    pub harmful: &'a Tensor,
    /// Harmless embeddings `[L, nS, C]`; for [`Pair::BaseCentroid`], the base model's harmless
    /// centroid `[L, C]` (or `[L, 1, C]`).
    pub harmless: &'a Tensor,
    /// ν_l `[L]`: the base model's mean norm of e_l over the harmless training prompts.
    pub nu: &'a Tensor,
    /// Absolute margins m_l `[L]` (read by [`LossShape::Hinge`] only).
    pub margin: &'a Tensor,
}

/// Where [`separation_loss`] writes.
#[derive(Debug, Clone, Copy)]
pub struct SeparationOutputs<'a> {
    /// `[2, L]`: row 0 holds `D_l`, row 1 `φ(D_l)`. One tensor because the entry point already
    /// binds 7 storage buffers, the portable maximum (and the host reads both in one go).
    /// Check row 0 for divergence: a NaN `D_l` leaves the hinge flat (zero gradient) and
    /// `max(0, NaN)` may read 0.
    pub per_layer: &'a Tensor,
    /// Gradient for the harmful embeddings, shaped like them (overwritten).
    pub d_harmful: &'a Tensor,
    /// Gradient for the harmless side, shaped like `harmless` (overwritten; zeros when no
    /// gradient flows there). May be `None` exactly when no gradient flows there.
    pub d_harmless: Option<&'a Tensor>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    layers: u32,
    n_h: u32,
    n_s: u32,
    cols: u32,
    centroid: u32,
    distance: u32,
    shape: u32,
    grad_to_s: u32,
    write_ds: u32,
    grad_scale: f32,
}

/// `(layers, nH, nS, C)` of the embeddings, checked.
fn embedding_dims(harmful: &Tensor, harmless: &Tensor, pair: Pair) -> [usize; 4] {
    let &[layers, n_h, cols] = harmful.dims() else {
        panic!("separation: harmful embeddings must be [L, nH, C], got {harmful:?}");
    };
    let n_s = match (pair, harmless.dims()) {
        (Pair::BaseCentroid, &[l, c]) if [l, c] == [layers, cols] => 1,
        (_, &[l, n, c]) if [l, c] == [layers, cols] => n,
        _ => panic!("separation: harmless side {harmless:?} does not match {harmful:?} ({pair:?})"),
    };
    assert!(
        pair != Pair::BaseCentroid || n_s == 1,
        "separation: the base centroid must be [L, C], got {harmless:?}"
    );
    assert!(
        n_h > 0 && n_s > 0 && cols > 0,
        "separation: empty embeddings"
    );
    assert!(
        layers <= 65_535,
        "separation: {layers} layers exceed one grid dimension"
    );
    for (name, t) in [("harmful", harmful), ("harmless", harmless)] {
        expect_dtype("separation", name, t, DType::F32);
    }
    [layers, n_h, n_s, cols]
}

fn check_per_layer(name: &str, t: &Tensor, dims: &[usize]) {
    expect_dims("separation", name, t, DType::F32, dims);
}

fn params(
    dims: [usize; 4],
    options: &SeparationOptions,
    write_ds: bool,
    grad_scale: f32,
) -> Params {
    let [layers, n_h, n_s, cols] = dims;
    Params {
        layers: layers as u32,
        n_h: n_h as u32,
        n_s: n_s as u32,
        cols: cols as u32,
        centroid: u32::from(options.pair == Pair::Centroid),
        distance: options.distance as u32,
        shape: options.shape as u32,
        grad_to_s: u32::from(options.grad_to_harmless()),
        write_ds: u32::from(write_ds),
        grad_scale,
    }
}

fn kernel(rec: &Recorder, spec: &'static KernelSpec) -> std::sync::Arc<crate::gpu::Kernel> {
    let available = rec.gpu().limits().max_compute_workgroup_storage_size;
    assert!(
        WORKGROUP_BYTES <= available,
        "separation: needs {WORKGROUP_BYTES} bytes of workgroup memory, the device has {available}"
    );
    let overrides = [
        ("LANES", LANES),
        ("MAX_PAIRS", MAX_PAIRS as u32),
        ("MAX_ROWS", MAX_ROWS as u32),
    ];
    rec.gpu().kernel(spec, &overrides)
}

/// The separation loss and its gradients in one dispatch: `D_l` and `φ(D_l)` into
/// `per_layer`, and the gradients of `grad_scale · Σ_l φ(D_l)` into `d_harmful` and
/// `d_harmless` (overwritten). The caller passes `grad_scale = 1/|L|` for the mean over layers,
/// times any upstream weight.
pub fn separation_loss(
    rec: &mut Recorder,
    inputs: &SeparationInputs,
    outputs: &SeparationOutputs,
    options: &SeparationOptions,
    grad_scale: f32,
) {
    let dims = embedding_dims(inputs.harmful, inputs.harmless, options.pair);
    let [layers, n_h, n_s, _] = dims;
    check_per_layer("nu", inputs.nu, &[layers]);
    check_per_layer("margin", inputs.margin, &[layers]);
    check_per_layer("per_layer", outputs.per_layer, &[2, layers]);
    check_per_layer("d_harmful", outputs.d_harmful, inputs.harmful.dims());
    let (pairs, rows) = match options.pair {
        Pair::Centroid => (1, 1),
        Pair::Pairwise | Pair::BaseCentroid => (n_h * n_s, n_h.max(n_s)),
    };
    assert!(
        pairs <= MAX_PAIRS && rows <= MAX_ROWS,
        "separation_loss: {n_h}x{n_s} embeddings per layer exceed {MAX_PAIRS} pairs or \
         {MAX_ROWS} rows per side for {:?}",
        options.pair
    );
    // Nothing flows to the harmless side without a tensor to hold it: bind a stand-in.
    let stand_in;
    let d_harmless = match outputs.d_harmless {
        Some(t) => {
            check_per_layer("d_harmless", t, inputs.harmless.dims());
            t
        }
        None => {
            assert!(
                !options.grad_to_harmless(),
                "separation_loss: a gradient flows to the harmless side but d_harmless is None"
            );
            stand_in = rec.scratch([1], DType::F32);
            &stand_in
        }
    };
    let params = params(dims, options, outputs.d_harmless.is_some(), grad_scale);
    let kernel = kernel(rec, &LOSS);
    let tensors = [
        inputs.harmful,
        inputs.harmless,
        inputs.nu,
        inputs.margin,
        outputs.per_layer,
        outputs.d_harmful,
        d_harmless,
    ];
    rec.dispatch(&kernel, &tensors, &params, Grid::xyz(layers as u32, 1, 1));
}

/// `dist[l] = D_l` only (`options.shape` and `harmful_only` do not matter): for measuring the
/// base model's distances (margins) and for evaluation. No gradient buffers, no limit on the
/// number of embeddings (time grows with the pairs: prefer `Centroid` for large sets).
pub fn separation_distance(
    rec: &mut Recorder,
    harmful: &Tensor,
    harmless: &Tensor,
    nu: &Tensor,
    options: &SeparationOptions,
    dist: &Tensor,
) {
    let dims = embedding_dims(harmful, harmless, options.pair);
    let layers = dims[0];
    check_per_layer("nu", nu, &[layers]);
    check_per_layer("dist", dist, &[layers]);
    let params = params(dims, options, false, 0.0);
    let kernel = kernel(rec, &DISTANCE);
    let tensors = [harmful, harmless, nu, dist];
    rec.dispatch(&kernel, &tensors, &params, Grid::xyz(layers as u32, 1, 1));
}

/// CPU f64 references, written straight from the definitions.
pub mod reference {
    use super::{Distance, LossShape, Pair, SeparationOptions};

    fn norm(a: &[f64]) -> f64 {
        a.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn diff(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x - y).collect()
    }

    /// d(a, b) with normaliser ν.
    pub fn distance(kind: Distance, a: &[f64], b: &[f64], nu: f64) -> f64 {
        match kind {
            Distance::L2 => norm(&diff(a, b)) / nu,
            Distance::SqL2 => norm(&diff(a, b)).powi(2) / (nu * nu),
            Distance::Cosine => {
                let norms = norm(a) * norm(b);
                1.0 - if norms > 0.0 { dot(a, b) / norms } else { 0.0 }
            }
        }
    }

    /// ∂d(a, b)/∂a (∂/∂b is the same with a and b swapped: every d is symmetric); 0 at
    /// a = b for l2 and at a zero vector for cosine.
    pub fn distance_grad(kind: Distance, a: &[f64], b: &[f64], nu: f64) -> Vec<f64> {
        let d = diff(a, b);
        match kind {
            Distance::L2 => {
                let r = norm(&d);
                let k = if r > 0.0 { 1.0 / (nu * r) } else { 0.0 };
                d.iter().map(|x| k * x).collect()
            }
            Distance::SqL2 => d.iter().map(|x| 2.0 * x / (nu * nu)).collect(),
            Distance::Cosine => {
                let (na, nb) = (norm(a), norm(b));
                if na == 0.0 || nb == 0.0 {
                    return vec![0.0; a.len()];
                }
                let cos = dot(a, b) / (na * nb);
                let grad_cos = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| y / (na * nb) - cos * x / (na * na));
                grad_cos.map(|g| -g).collect()
            }
        }
    }

    fn mean_row(rows: &[&[f64]]) -> Vec<f64> {
        let mut mean = vec![0.0; rows[0].len()];
        for row in rows {
            for (m, x) in mean.iter_mut().zip(*row) {
                *m += x / rows.len() as f64;
            }
        }
        mean
    }

    /// D of one layer from its harmful rows `h` and harmless rows `s` (for base-centroid,
    /// `s` is the centroid).
    pub fn layer_distance(
        h: &[f64],
        s: &[f64],
        cols: usize,
        nu: f64,
        o: &SeparationOptions,
    ) -> f64 {
        let (hr, sr): (Vec<_>, Vec<_>) = (h.chunks(cols).collect(), s.chunks(cols).collect());
        match o.pair {
            Pair::Centroid => distance(o.distance, &mean_row(&hr), &mean_row(&sr), nu),
            Pair::Pairwise | Pair::BaseCentroid => {
                let pairs = (hr.len() * sr.len()) as f64;
                let each = hr
                    .iter()
                    .flat_map(|a| sr.iter().map(|b| distance(o.distance, a, b, nu)));
                each.sum::<f64>() / pairs
            }
        }
    }

    /// (∂D/∂h, ∂D/∂s) of one layer, ignoring stop-gradients.
    pub fn layer_distance_grad(
        h: &[f64],
        s: &[f64],
        cols: usize,
        nu: f64,
        o: &SeparationOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hr, sr): (Vec<_>, Vec<_>) = (h.chunks(cols).collect(), s.chunks(cols).collect());
        let (mut dh, mut ds) = (vec![0.0; h.len()], vec![0.0; s.len()]);
        match o.pair {
            Pair::Centroid => {
                let (hm, sm) = (mean_row(&hr), mean_row(&sr));
                let (gh, gs) = (
                    distance_grad(o.distance, &hm, &sm, nu),
                    distance_grad(o.distance, &sm, &hm, nu),
                );
                for (i, g) in dh.iter_mut().enumerate() {
                    *g = gh[i % cols] / hr.len() as f64;
                }
                for (j, g) in ds.iter_mut().enumerate() {
                    *g = gs[j % cols] / sr.len() as f64;
                }
            }
            Pair::Pairwise | Pair::BaseCentroid => {
                let w = 1.0 / (hr.len() * sr.len()) as f64;
                for (i, a) in hr.iter().enumerate() {
                    for (j, b) in sr.iter().enumerate() {
                        let (ga, gb) = (
                            distance_grad(o.distance, a, b, nu),
                            distance_grad(o.distance, b, a, nu),
                        );
                        for c in 0..cols {
                            dh[i * cols + c] += w * ga[c];
                            ds[j * cols + c] += w * gb[c];
                        }
                    }
                }
            }
        }
        (dh, ds)
    }

    /// φ(D) with margin m.
    pub fn shape(shape: LossShape, d: f64, m: f64) -> f64 {
        match shape {
            LossShape::Hinge => (m - d).max(0.0),
            LossShape::Neg => -d,
        }
    }

    /// dφ/dD (0 once the hinge is flat, D ≥ m).
    pub fn shape_slope(shape: LossShape, d: f64, m: f64) -> f64 {
        match shape {
            LossShape::Hinge if d < m => -1.0,
            LossShape::Hinge => 0.0,
            LossShape::Neg => -1.0,
        }
    }

    /// Per layer `(D_l, φ(D_l))` of `eh [L, nH, C]` and `es [L, nS, C]` (or `[L, C]`).
    pub fn separation_loss(
        eh: &[f64],
        es: &[f64],
        nu: &[f64],
        margin: &[f64],
        cols: usize,
        o: &SeparationOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        let layers = nu.len();
        let pairs = eh
            .chunks(eh.len() / layers)
            .zip(es.chunks(es.len() / layers));
        let dist: Vec<f64> = pairs
            .zip(nu)
            .map(|((h, s), &n)| layer_distance(h, s, cols, n, o))
            .collect();
        let loss = dist
            .iter()
            .zip(margin)
            .map(|(&d, &m)| shape(o.shape, d, m))
            .collect();
        (dist, loss)
    }

    /// Gradients of `grad_scale · Σ_l φ(D_l)` for `eh` and `es`, with the options'
    /// stop-gradients (zeros for `es` under harmful-only and base-centroid).
    pub fn separation_grad(
        eh: &[f64],
        es: &[f64],
        nu: &[f64],
        margin: &[f64],
        cols: usize,
        o: &SeparationOptions,
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let layers = nu.len();
        let (lh, ls) = (eh.len() / layers, es.len() / layers);
        let (mut deh, mut des) = (Vec::new(), Vec::new());
        for l in 0..layers {
            let (h, s) = (&eh[l * lh..(l + 1) * lh], &es[l * ls..(l + 1) * ls]);
            let d = layer_distance(h, s, cols, nu[l], o);
            let slope = grad_scale * shape_slope(o.shape, d, margin[l]);
            let (gh, gs) = layer_distance_grad(h, s, cols, nu[l], o);
            deh.extend(gh.iter().map(|g| slope * g));
            let to_s = if o.grad_to_harmless() { slope } else { 0.0 };
            des.extend(gs.iter().map(|g| to_s * g));
        }
        (deh, des)
    }
}
