//! A linear probe of one layer's embeddings: L2-regularised logistic regression of "harmful"
//! (label 1) against "harmless" (label 0), in plain f64, deterministic.
//!
//! It minimises scikit-learn's `LogisticRegression()` objective with its defaults (L2 penalty,
//! C = 1, intercept fitted and not penalised, raw features: no standardisation), which is also
//! what SCAV's probes fit (saga to convergence):
//!
//! `C · Σᵢ log(1 + exp(−ỹᵢ (wᵀxᵢ + b))) + ½‖w‖²`, ỹ = ±1.
//!
//! scikit-learn's lbfgs stops after 100 iterations, often short of the optimum on unscaled
//! embeddings; this probe iterates to convergence, so it agrees with scikit-learn run to
//! convergence and with SCAV. To converge fast it runs L-BFGS in centred, per-channel-scaled
//! coordinates, an exact change of variables: the optimum is the raw-feature one.
//!
//! The SCAV attack's closed-form step ([`Probe::scav_step`]) moves an embedding along w/‖w‖ to
//! the point where the probe's P(harmful) equals a target P0.

use super::geometry::{dot, norm};
use super::{expect_two_groups, Rows};
use crate::{Error, Result};

/// How a probe is fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeOptions {
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub c: f64,
    /// L-BFGS iterations at most.
    pub max_iterations: usize,
    /// Convergence: the largest gradient entry of the mean loss (the objective above divided
    /// by C·n) at most this.
    pub tolerance: f64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            c: 1.0,
            max_iterations: 2000,
            tolerance: 1e-9,
        }
    }
}

/// A fitted probe: P(harmful | e) = σ(wᵀe + b).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// w, one weight per embedding value.
    pub weights: Vec<f64>,
    /// b.
    pub bias: f64,
    /// L-BFGS iterations the fit took.
    pub iterations: usize,
    /// Whether the fit met the tolerance within the iteration limit.
    pub converged: bool,
}

/// σ(z) = 1 / (1 + e^−z), without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// σ⁻¹(p) = ln(p / (1 − p)); an error unless 0 < p < 1.
pub fn inverse_sigmoid(p: f64) -> Result<f64> {
    if !(p > 0.0 && p < 1.0) {
        return Err(Error::InvalidArgument(format!(
            "a target probability must lie strictly between 0 and 1, not {p}"
        )));
    }
    Ok((p / (1.0 - p)).ln())
}

/// ln(1 + e^z), without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

impl Probe {
    /// Fits a probe that tells `harmful` rows (label 1) from `harmless` rows (label 0).
    pub fn fit(harmful: Rows, harmless: Rows, options: &ProbeOptions) -> Result<Probe> {
        expect_two_groups("probe", harmful, harmless)?;
        if !(options.c > 0.0 && options.c.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "the probe's C must be positive and finite, not {}",
                options.c
            )));
        }
        let problem = Problem::new(harmful, harmless, options.c);
        let start = vec![0.0; problem.cols + 1];
        let fit = lbfgs(|theta| problem.loss_and_gradient(theta), start, options);
        let (weights, bias) = problem.raw_parameters(&fit.x);
        Ok(Probe {
            weights,
            bias,
            iterations: fit.iterations,
            converged: fit.converged,
        })
    }

    /// wᵀe + b: the log-odds that `e` is harmful.
    pub fn logit(&self, e: &[f64]) -> f64 {
        dot(&self.weights, e) + self.bias
    }

    /// P(harmful | e).
    pub fn prob(&self, e: &[f64]) -> f64 {
        sigmoid(self.logit(e))
    }

    /// The probe's call: harmful when the logit is positive (scikit-learn's `predict`).
    pub fn is_harmful(&self, e: &[f64]) -> bool {
        self.logit(e) > 0.0
    }

    /// Share of `harmful` and `harmless` rows together that the probe labels correctly.
    pub fn accuracy(&self, harmful: Rows, harmless: Rows) -> f64 {
        let right = harmful.iter().filter(|e| self.is_harmful(e)).count()
            + harmless.iter().filter(|e| !self.is_harmful(e)).count();
        right as f64 / (harmful.len() + harmless.len()).max(1) as f64
    }

    /// SCAV's signed step length ε = (σ⁻¹(P0) − b − wᵀe)/‖w‖: moving `e` by ε along w/‖w‖
    /// brings P(harmful) to exactly `p0` (negative when P(harmful | e) > P0). An error unless
    /// 0 < P0 < 1 or when w = 0.
    pub fn scav_epsilon(&self, e: &[f64], p0: f64) -> Result<f64> {
        let w_norm = norm(&self.weights);
        if w_norm == 0.0 {
            return Err(Error::Numerical(
                "the probe's weights are zero: it has no direction to step along".into(),
            ));
        }
        Ok((inverse_sigmoid(p0)? - self.logit(e)) / w_norm)
    }

    /// SCAV's minimal perturbation δ = ε·w/‖w‖ (see [`Probe::scav_epsilon`]): the shortest
    /// vector with P(harmful | e + δ) = P0. The attack applies it only where P(harmful | e)
    /// exceeds P0.
    pub fn scav_step(&self, e: &[f64], p0: f64) -> Result<Vec<f64>> {
        let along = self.scav_epsilon(e, p0)? / norm(&self.weights);
        Ok(self.weights.iter().map(|w| along * w).collect())
    }
}

/// The fitting problem in centred, scaled coordinates x̃ = (x − μ)/s, parameters θ = (u, c)
/// with z = uᵀx̃ + c. Then w = u/s and b = c − wᵀμ, and the penalty ½‖w‖² is Σ u²/(2s²): the
/// same objective, better conditioned.
struct Problem {
    cols: usize,
    /// x̃, row-major, harmful rows first.
    x: Vec<f64>,
    /// 1 for harmful, 0 for harmless.
    y: Vec<f64>,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// 1/(C·n): the penalty of the mean loss.
    penalty: f64,
}

impl Problem {
    fn new(harmful: Rows, harmless: Rows, c: f64) -> Problem {
        let cols = harmful.cols();
        let rows: Vec<&[f64]> = harmful.iter().chain(harmless.iter()).collect();
        let n = rows.len() as f64;
        let mean: Vec<f64> = (0..cols)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
            .collect();
        let scale: Vec<f64> = (0..cols)
            .map(|j| {
                let var = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if var > 0.0 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let x = rows
            .iter()
            .flat_map(|r| (0..cols).map(|j| (r[j] - mean[j]) / scale[j]))
            .collect();
        let y = (0..rows.len())
            .map(|i| if i < harmful.len() { 1.0 } else { 0.0 })
            .collect();
        Problem {
            cols,
            x,
            y,
            mean,
            scale,
            penalty: 1.0 / (c * n),
        }
    }

    /// The mean loss at θ and its gradient.
    fn loss_and_gradient(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let (u, c) = theta.split_at(self.cols);
        let n = self.y.len() as f64;
        let mut grad = vec![0.0; self.cols + 1];
        let mut loss = 0.0;
        for (row, &y) in self.x.chunks_exact(self.cols).zip(&self.y) {
            let z = dot(u, row) + c[0];
            loss += softplus(z) - y * z;
            let residual = (sigmoid(z) - y) / n;
            for (g, x) in grad.iter_mut().zip(row) {
                *g += residual * x;
            }
            grad[self.cols] += residual;
        }
        loss /= n;
        for ((g, u), s) in grad.iter_mut().zip(u).zip(&self.scale) {
            loss += 0.5 * self.penalty * (u / s).powi(2);
            *g += self.penalty * u / (s * s);
        }
        (loss, grad)
    }

    /// (w, b) in the original coordinates.
    fn raw_parameters(&self, theta: &[f64]) -> (Vec<f64>, f64) {
        let (u, c) = theta.split_at(self.cols);
        let w: Vec<f64> = u.iter().zip(&self.scale).map(|(u, s)| u / s).collect();
        let b = c[0] - dot(&w, &self.mean);
        (w, b)
    }
}

/// What L-BFGS ended at.
struct Minimum {
    x: Vec<f64>,
    iterations: usize,
    converged: bool,
}

/// Curvature pairs L-BFGS keeps.
const HISTORY: usize = 10;

/// L-BFGS with a backtracking (Armijo) line search, for a smooth convex `f` that returns its
/// value and gradient.
fn lbfgs(f: impl Fn(&[f64]) -> (f64, Vec<f64>), x0: Vec<f64>, options: &ProbeOptions) -> Minimum {
    let mut x = x0;
    let (mut fx, mut g) = f(&x);
    let mut pairs: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    let mut iterations = 0;
    while iterations < options.max_iterations && max_abs(&g) > options.tolerance {
        iterations += 1;
        let direction = two_loop(&g, &pairs);
        let Some((step, f_new, g_new)) = line_search(&f, &x, fx, &g, &direction) else {
            // No decrease along a descent direction: the loss is flat to rounding here.
            break;
        };
        let s: Vec<f64> = direction.iter().map(|d| step * d).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        x.iter_mut().zip(&s).for_each(|(xi, si)| *xi += si);
        if dot(&s, &y) > 1e-300 {
            if pairs.len() == HISTORY {
                pairs.remove(0);
            }
            pairs.push((s, y));
        }
        (fx, g) = (f_new, g_new);
    }
    let converged = max_abs(&g) <= options.tolerance;
    Minimum {
        x,
        iterations,
        converged,
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// −H g by the two-loop recursion over the curvature pairs (s, y), with H₀ = (sᵀy/yᵀy)·I
/// from the newest pair (the plain gradient, scaled to a small first step, when there is none).
fn two_loop(g: &[f64], pairs: &[(Vec<f64>, Vec<f64>)]) -> Vec<f64> {
    let mut q = g.to_vec();
    let mut alphas = Vec::with_capacity(pairs.len());
    for (s, y) in pairs.iter().rev() {
        let alpha = dot(s, &q) / dot(s, y);
        q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= alpha * yi);
        alphas.push(alpha);
    }
    let gamma = match pairs.last() {
        Some((s, y)) => dot(s, y) / dot(y, y),
        None => 1.0 / norm(g).max(1.0),
    };
    q.iter_mut().for_each(|qi| *qi *= gamma);
    for ((s, y), alpha) in pairs.iter().zip(alphas.iter().rev()) {
        let beta = dot(y, &q) / dot(s, y);
        q.iter_mut()
            .zip(s)
            .for_each(|(qi, si)| *qi += (alpha - beta) * si);
    }
    q.iter().map(|v| -v).collect()
}

/// The first of 1, ½, ¼, … that decreases f enough (Armijo, c₁ = 1e-4), with f and ∇f there.
fn line_search(
    f: &impl Fn(&[f64]) -> (f64, Vec<f64>),
    x: &[f64],
    fx: f64,
    g: &[f64],
    direction: &[f64],
) -> Option<(f64, f64, Vec<f64>)> {
    let slope = dot(g, direction);
    if slope >= 0.0 {
        return None;
    }
    let mut step = 1.0;
    for _ in 0..60 {
        let trial: Vec<f64> = x.iter().zip(direction).map(|(a, d)| a + step * d).collect();
        let (f_new, g_new) = f(&trial);
        if f_new <= fx + 1e-4 * step * slope {
            return Some((step, f_new, g_new));
        }
        step *= 0.5;
    }
    None
}
