//! The geometry of one layer's pooled embeddings of harmful and harmless prompts, on the host
//! in f64: the distances the ES2 objective trains (between centroids and over all pairs, raw
//! and normalised by ν as training does) and a 2-D PCA projection for the picture of what
//! training did.
//!
//! [`layer_distance`] is the production twin of `ops::separation::reference::layer_distance`
//! (the kernels' test oracle), with the same options and numbers.

use serde::{Deserialize, Serialize};

use super::{expect_two_groups, Rows};
use crate::ops::separation::{Distance, Pair, SeparationOptions};
use crate::rng::Rng;
use crate::{Error, Result};

/// ‖a‖.
pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// aᵀb.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// d(a, b) with normaliser ν: `‖a − b‖/ν`, `‖a − b‖²/ν²` or `1 − cos(a, b)` (ν unused; a zero
/// vector has cosine 0).
pub fn distance(kind: Distance, a: &[f64], b: &[f64], nu: f64) -> f64 {
    let squared = || a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
    match kind {
        Distance::L2 => squared().sqrt() / nu,
        Distance::SqL2 => squared() / (nu * nu),
        Distance::Cosine => {
            let norms = norm(a) * norm(b);
            1.0 - if norms > 0.0 { dot(a, b) / norms } else { 0.0 }
        }
    }
}

/// The mean row.
pub fn centroid(rows: Rows) -> Vec<f64> {
    let mut mean = vec![0.0; rows.cols()];
    for row in rows.iter() {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x;
        }
    }
    let n = rows.len().max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// The mean row norm: ν, when `rows` are the harmless embeddings.
pub fn mean_norm(rows: Rows) -> f64 {
    rows.iter().map(norm).sum::<f64>() / rows.len().max(1) as f64
}

/// d(mean harmful, mean harmless).
pub fn centroid_distance(kind: Distance, harmful: Rows, harmless: Rows, nu: f64) -> f64 {
    distance(kind, &centroid(harmful), &centroid(harmless), nu)
}

/// The mean of d(h, s) over every harmful row h and harmless row s.
pub fn mean_pairwise_distance(kind: Distance, harmful: Rows, harmless: Rows, nu: f64) -> f64 {
    let total: f64 = harmful
        .iter()
        .flat_map(|h| harmless.iter().map(move |s| distance(kind, h, s, nu)))
        .sum();
    total / (harmful.len() * harmless.len()).max(1) as f64
}

/// D of one layer as the ES2 objective defines it under `options` (`pair` and `distance`;
/// the shape and stop-gradients do not change D). For [`Pair::BaseCentroid`], `other` is the
/// base model's harmless centroid as one row; otherwise the harmless rows.
pub fn layer_distance(harmful: Rows, other: Rows, nu: f64, options: &SeparationOptions) -> f64 {
    match options.pair {
        Pair::Centroid => centroid_distance(options.distance, harmful, other, nu),
        Pair::Pairwise | Pair::BaseCentroid => {
            mean_pairwise_distance(options.distance, harmful, other, nu)
        }
    }
}

/// One measurement under each distance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distances {
    /// Euclidean.
    pub l2: f64,
    /// Squared Euclidean.
    pub sq_l2: f64,
    /// `1 − cos`.
    pub cosine: f64,
}

impl Distances {
    fn each(measure: impl Fn(Distance) -> f64) -> Distances {
        Distances {
            l2: measure(Distance::L2),
            sq_l2: measure(Distance::SqL2),
            cosine: measure(Distance::Cosine),
        }
    }

    /// The value under `kind`.
    pub fn get(&self, kind: Distance) -> f64 {
        match kind {
            Distance::L2 => self.l2,
            Distance::SqL2 => self.sq_l2,
            Distance::Cosine => self.cosine,
        }
    }

    /// Raw distances divided as training divides them: L2 by ν, squared L2 by ν², cosine
    /// left alone.
    pub fn normalised(&self, nu: f64) -> Distances {
        Distances {
            l2: self.l2 / nu,
            sq_l2: self.sq_l2 / (nu * nu),
            cosine: self.cosine,
        }
    }
}

/// The distances between the harmful and harmless embeddings of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerGeometry {
    /// ν: the normaliser of the `*_normalised` fields (see [`LayerGeometry::measure`]).
    pub nu: f64,
    /// Between the two centroids, raw.
    pub centroid: Distances,
    /// Between the two centroids, normalised by ν.
    pub centroid_normalised: Distances,
    /// Mean over all harmful × harmless pairs, raw.
    pub pairwise: Distances,
    /// Mean over all pairs, normalised by ν.
    pub pairwise_normalised: Distances,
}

impl LayerGeometry {
    /// Measures one layer. `nu` is the normaliser: training uses the base model's mean norm of
    /// the harmless embeddings ([`mean_norm`]); a model's own ν keeps a model that only scales
    /// its embeddings up from looking more separated.
    pub fn measure(harmful: Rows, harmless: Rows, nu: f64) -> Result<LayerGeometry> {
        expect_two_groups("layer geometry", harmful, harmless)?;
        if !(nu > 0.0 && nu.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "the normaliser ν must be positive and finite, not {nu}"
            )));
        }
        let centroid = Distances::each(|k| centroid_distance(k, harmful, harmless, 1.0));
        let pairwise = Distances::each(|k| mean_pairwise_distance(k, harmful, harmless, 1.0));
        Ok(LayerGeometry {
            nu,
            centroid,
            centroid_normalised: centroid.normalised(nu),
            pairwise,
            pairwise_normalised: pairwise.normalised(nu),
        })
    }
}

/// The harmful and harmless embeddings of one layer projected on their two principal
/// directions (of both groups pooled together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// Sample variance (denominator n − 1) along each direction, largest first.
    pub variance: [f64; 2],
    /// Each direction's share of the total variance.
    pub explained: [f64; 2],
    /// Coordinates of the harmful rows, in their order.
    pub harmful: Vec<[f64; 2]>,
    /// Coordinates of the harmless rows, in their order.
    pub harmless: Vec<[f64; 2]>,
    /// The two unit directions; each one's entry of largest magnitude is positive, so that
    /// the picture does not flip between runs or models. Not in report.json.
    #[serde(skip)]
    pub components: [Vec<f64>; 2],
    /// The mean row that was subtracted. Not in report.json.
    #[serde(skip)]
    pub mean: Vec<f64>,
}

/// Subspace iterations of [`project_2d`] at most; it stops earlier once both directions are
/// eigenvectors to within [`PCA_TOLERANCE`].
pub const PCA_MAX_ITERATIONS: usize = 5000;
/// ‖C v − λ v‖ ≤ tolerance · λ₁ for both directions ends the iteration.
pub const PCA_TOLERANCE: f64 = 1e-10;

/// 2-D PCA of both groups pooled: subspace iteration with a Rayleigh–Ritz step, never forming
/// the C×C covariance (C can be the hidden size of a 7B model). Deterministic: a fixed
/// starting subspace and sign convention.
pub fn project_2d(harmful: Rows, harmless: Rows) -> Result<Projection> {
    expect_two_groups("PCA", harmful, harmless)?;
    let cols = harmful.cols();
    if cols < 2 {
        return Err(Error::InvalidArgument(
            "a 2-D projection needs embeddings of at least 2 values".into(),
        ));
    }
    let (n_h, n_s) = (harmful.len() as f64, harmless.len() as f64);
    let (c_h, c_s) = (centroid(harmful), centroid(harmless));
    let mean: Vec<f64> = c_h
        .iter()
        .zip(&c_s)
        .map(|(h, s)| (n_h * h + n_s * s) / (n_h + n_s))
        .collect();
    let centred: Vec<f64> = harmful
        .iter()
        .chain(harmless.iter())
        .flat_map(|r| r.iter().zip(&mean).map(|(x, m)| x - m))
        .collect();
    let x = Rows::new(&centred, cols)?;
    let (components, variance) = top_two_eigenvectors(x);
    let total = x.data().iter().map(|v| v * v).sum::<f64>() / denominator(x);
    let share = |v: f64| if total > 0.0 { v / total } else { 0.0 };
    let coordinates = |r: &[f64]| [dot(r, &components[0]), dot(r, &components[1])];
    let mut points = x.iter().map(coordinates);
    Ok(Projection {
        variance,
        explained: [share(variance[0]), share(variance[1])],
        harmful: points.by_ref().take(harmful.len()).collect(),
        harmless: points.collect(),
        components,
        mean,
    })
}

/// n − 1 (or 1 for a single row): the sample covariance's denominator.
fn denominator(x: Rows) -> f64 {
    x.len().saturating_sub(1).max(1) as f64
}

/// C v for the sample covariance C of the centred rows `x`, as Xᵀ(X v)/(n − 1).
fn covariance_times(x: Rows, v: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; x.cols()];
    for row in x.iter() {
        let along = dot(row, v);
        for (o, r) in out.iter_mut().zip(row) {
            *o += along * r;
        }
    }
    let n = denominator(x);
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// The two leading eigenpairs of the covariance of `x`, eigenvalues descending.
fn top_two_eigenvectors(x: Rows) -> ([Vec<f64>; 2], [f64; 2]) {
    let mut rng = Rng::new(0);
    let start: Vec<Vec<f64>> = (0..2)
        .map(|_| (0..x.cols()).map(|_| rng.normal()).collect())
        .collect();
    let mut v = orthonormal_pair(&start[0], &start[1], &start);
    let mut lambda = [0.0; 2];
    for _ in 0..PCA_MAX_ITERATIONS {
        let w = [covariance_times(x, &v[0]), covariance_times(x, &v[1])];
        let (values, rotation) = symmetric_eigen_2x2([
            [dot(&v[0], &w[0]), dot(&v[0], &w[1])],
            [dot(&v[1], &w[0]), dot(&v[1], &w[1])],
        ]);
        v = rotate(&v, rotation);
        let w = rotate(&w, rotation);
        lambda = values;
        let residual = (0..2).map(|i| {
            let r = w[i].iter().zip(&v[i]).map(|(a, b)| a - lambda[i] * b);
            norm(&r.collect::<Vec<f64>>())
        });
        if lambda[0] <= 0.0 || residual.fold(0.0, f64::max) <= PCA_TOLERANCE * lambda[0] {
            break;
        }
        v = orthonormal_pair(&w[0], &w[1], &v);
    }
    (v.map(positive_largest_entry), lambda.map(|l| l.max(0.0)))
}

/// Gram–Schmidt of (a, b); a column that vanishes (rank-deficient data) is replaced by the
/// matching column of `fallback`, made orthogonal to the first.
fn orthonormal_pair(a: &[f64], b: &[f64], fallback: &[Vec<f64>]) -> [Vec<f64>; 2] {
    let unit = |v: Vec<f64>| {
        let n = norm(&v);
        (n > 1e-300).then(|| v.iter().map(|x| x / n).collect::<Vec<f64>>())
    };
    let without = |v: &[f64], u: &[f64]| -> Vec<f64> {
        let along = dot(v, u);
        v.iter().zip(u).map(|(x, y)| x - along * y).collect()
    };
    let first = unit(a.to_vec())
        .or_else(|| unit(fallback[0].clone()))
        .unwrap_or_else(|| axis(a.len(), 0));
    let second = unit(without(b, &first))
        .or_else(|| unit(without(&fallback[1], &first)))
        .or_else(|| unit(without(&axis(a.len(), 1), &first)))
        .unwrap_or_else(|| axis(a.len(), 0));
    [first, second]
}

fn axis(len: usize, i: usize) -> Vec<f64> {
    (0..len).map(|j| if j == i { 1.0 } else { 0.0 }).collect()
}

/// Columns of `v` mixed by the 2×2 `rotation` (column j of the result = Σ_i v_i r[i][j]).
fn rotate(v: &[Vec<f64>; 2], r: [[f64; 2]; 2]) -> [Vec<f64>; 2] {
    let mix = |j: usize| -> Vec<f64> {
        v[0].iter()
            .zip(&v[1])
            .map(|(a, b)| a * r[0][j] + b * r[1][j])
            .collect()
    };
    [mix(0), mix(1)]
}

/// Eigenvalues (descending) and eigenvectors (as columns) of a symmetric 2×2 matrix, by one
/// Jacobi rotation.
fn symmetric_eigen_2x2(m: [[f64; 2]; 2]) -> ([f64; 2], [[f64; 2]; 2]) {
    let off = 0.5 * (m[0][1] + m[1][0]);
    let theta = 0.5 * (2.0 * off).atan2(m[0][0] - m[1][1]);
    let (s, c) = theta.sin_cos();
    let first = c * c * m[0][0] + 2.0 * s * c * off + s * s * m[1][1];
    let second = s * s * m[0][0] - 2.0 * s * c * off + c * c * m[1][1];
    let rotation = [[c, -s], [s, c]];
    if first >= second {
        ([first, second], rotation)
    } else {
        ([second, first], [[-s, c], [c, s]])
    }
}

/// Flips `v` so that its entry of largest magnitude is positive.
fn positive_largest_entry(v: Vec<f64>) -> Vec<f64> {
    let largest = v
        .iter()
        .copied()
        .fold(0.0, |m: f64, x| if x.abs() > m.abs() { x } else { m });
    if largest < 0.0 {
        v.iter().map(|x| -x).collect()
    } else {
        v
    }
}
