//! LayerNorm (GPT-2): `y = (x − mean) · rstd · w + b` with `rstd = 1/sqrt(var + eps)` (biased
//! variance) per row of `x [rows, C]` (any rank: the last dimension is C), `w, b [C]`.
//!
//! The forward saves `mean` and `rstd [rows]`. Weight and bias gradients are deterministic:
//! `dw` through per-block partials and `reduce::sum_rows` (the plumbing shared with
//! `rmsnorm`), `db` as `reduce::sum_rows` of `dy` directly.

use super::reduce;
use super::rmsnorm::{launch_row_norm, weight_grad, RowShape};
use crate::gpu::{read, read_write, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("layernorm");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "layernorm_forward",
    // x, w, b, y, mean, rstd
    bindings: &[
        read(1),
        read(2),
        read(3),
        read_write(4),
        read_write(5),
        read_write(6),
    ],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "layernorm_backward",
    // x, w, mean, rstd, dy, dx
    bindings: &[read(1), read(2), read(7), read(8), read(9), read_write(10)],
};
static DW_PARTIAL: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "layernorm_dw_partial",
    // x, mean, rstd, dy, then the partials `weight_grad` appends
    bindings: &[read(1), read(7), read(8), read(9), read_write(11)],
};

/// `y = (x − mean) · rstd · w + b`; writes `mean` and `rstd [rows]` for [`layernorm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    y: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    eps: f32,
) {
    let op = "layernorm_forward";
    let shape = RowShape::of(op, x);
    shape.expect_per_column(op, "w", w);
    shape.expect_per_column(op, "b", b);
    shape.expect_like_x(op, "y", y);
    shape.expect_per_row(op, "mean", mean);
    shape.expect_per_row(op, "rstd", rstd);
    launch_row_norm(rec, &FORWARD, &[x, w, b, y, mean, rstd], shape, eps);
}

/// Gradients of [`layernorm_forward`]: `dx` is overwritten; `dw` and `db` are accumulated
/// (`+=`) when `accumulate`, overwritten otherwise.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    dw: &Tensor,
    db: &Tensor,
    accumulate: bool,
) {
    let op = "layernorm_backward";
    let shape = RowShape::of(op, x);
    shape.expect_per_column(op, "w", w);
    shape.expect_per_row(op, "mean", mean);
    shape.expect_per_row(op, "rstd", rstd);
    shape.expect_like_x(op, "dy", dy);
    shape.expect_like_x(op, "dx", dx);
    shape.expect_per_column(op, "dw", dw);
    shape.expect_per_column(op, "db", db);
    launch_row_norm(rec, &BACKWARD, &[x, w, mean, rstd, dy, dx], shape, 0.0);
    let partial_inputs = [x, mean, rstd, dy];
    weight_grad(rec, &DW_PARTIAL, &partial_inputs, shape, dw, accumulate);
    reduce::sum_rows(rec, dy, db, accumulate);
}

/// CPU f64 references (row-major `[rows, cols]`).
pub mod reference {
    /// Per row: `(mean, rstd)`.
    fn statistics(row: &[f64], eps: f64) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, 1.0 / (var + eps).sqrt())
    }

    /// `(y, mean, rstd)`.
    pub fn layernorm_forward(
        x: &[f64],
        w: &[f64],
        b: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut means, mut rstds) = (Vec::with_capacity(x.len()), Vec::new(), Vec::new());
        for row in x.chunks_exact(w.len()) {
            let (mean, rstd) = statistics(row, eps);
            y.extend((0..w.len()).map(|c| (row[c] - mean) * rstd * w[c] + b[c]));
            means.push(mean);
            rstds.push(rstd);
        }
        (y, means, rstds)
    }

    /// `(dx, dw, db)`.
    pub fn layernorm_backward(
        x: &[f64],
        w: &[f64],
        dy: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let n = cols as f64;
        let mut dx = Vec::with_capacity(x.len());
        let (mut dw, mut db) = (vec![0.0; cols], vec![0.0; cols]);
        for (row, drow) in x.chunks_exact(cols).zip(dy.chunks_exact(cols)) {
            let (mean, rstd) = statistics(row, eps);
            let x_hat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = drow.iter().zip(w).map(|(d, wc)| d * wc).collect();
            let g_mean = g.iter().sum::<f64>() / n;
            let gx_mean = g.iter().zip(&x_hat).map(|(a, b)| a * b).sum::<f64>() / n;
            dx.extend((0..cols).map(|c| rstd * (g[c] - g_mean - x_hat[c] * gx_mean)));
            for c in 0..cols {
                dw[c] += drow[c] * x_hat[c];
                db[c] += drow[c];
            }
        }
        (dx, dw, db)
    }
}
