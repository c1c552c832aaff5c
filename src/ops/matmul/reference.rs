//! CPU f64 references. Matrices are row-major slices; `alpha` scales the product as in
//! [`MatmulOptions`](super::MatmulOptions). Gradients are returned, not accumulated.

use super::{Gemm, Strided};

/// [`super::gemm`] on host slices: updates `c` in place, leaving elements outside the
/// product untouched.
pub fn gemm(g: &Gemm, a: &[f64], b: &[f64], bias: Option<&[f64]>, c: &mut [f64]) {
    let at = |s: &Strided, batch: usize, row: usize, col: usize, transposed: bool| {
        let (r, c) = if transposed { (col, row) } else { (row, col) };
        s.offset + batch * s.batch_stride + r * s.row_stride + c
    };
    let alpha = f64::from(g.options.alpha);
    for batch in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let product: f64 = (0..g.k)
                    .map(|p| {
                        a[at(&g.a, batch, i, p, g.transpose_a)]
                            * b[at(&g.b, batch, p, j, g.transpose_b)]
                    })
                    .sum();
                let bias = bias.map_or(0.0, |bias| bias[g.bias_offset + j]);
                let out = &mut c[at(&g.c, batch, i, j, false)];
                let previous = if g.options.write.accumulates() {
                    *out
                } else {
                    0.0
                };
                *out = alpha * product + bias + previous;
            }
        }
    }
}

/// `y [m, n] = alpha·x [m, k]·wᵀ (w [n, k]) + bias`.
pub fn matmul_forward(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    (m, n, k): (usize, usize, usize),
    alpha: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            y[i * n + j] = alpha * dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// `dx [m, k] = alpha·dy [m, n]·w [n, k]`.
pub fn matmul_backward_input(
    dy: &[f64],
    w: &[f64],
    (m, n, k): (usize, usize, usize),
    alpha: f64,
) -> Vec<f64> {
    let mut dx = vec![0.0; m * k];
    for i in 0..m {
        for p in 0..k {
            let dot: f64 = (0..n).map(|j| dy[i * n + j] * w[j * k + p]).sum();
            dx[i * k + p] = alpha * dot;
        }
    }
    dx
}

/// `dw [n, k] = alpha·dyᵀ·x` for `dy [m, n]`, `x [m, k]`.
pub fn matmul_backward_weight(
    dy: &[f64],
    x: &[f64],
    (m, n, k): (usize, usize, usize),
    alpha: f64,
) -> Vec<f64> {
    let mut dw = vec![0.0; n * k];
    for j in 0..n {
        for p in 0..k {
            let dot: f64 = (0..m).map(|i| dy[i * n + j] * x[i * k + p]).sum();
            dw[j * k + p] = alpha * dot;
        }
    }
    dw
}

/// `db [n] = Σ_rows dy`.
pub fn matmul_backward_bias(dy: &[f64], n: usize) -> Vec<f64> {
    crate::ops::reduce::reference::sum_rows(dy, n)
}
