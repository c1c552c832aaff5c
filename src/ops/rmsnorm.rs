//! RMSNorm (Llama): `y = x · rstd · w` with `rstd = 1/sqrt(mean(x²) + eps)` per row of
//! `x [rows, C]` (any rank: the last dimension is C), `w [C]`.
//!
//! The forward saves `rstd [rows]` for the backward. The weight gradient is deterministic: a
//! kernel sums blocks of rows into partials `[blocks, C]` and [`reduce::sum_rows`] adds them up.

use super::common::{expect_dtype, expect_elements, launch_per_column_block, launch_rows};
use super::Write;
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::ops::reduce;
use crate::shader;

static SHADER: Shader = shader!("rmsnorm");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rmsnorm_forward",
    // x, w, y, rstd
    bindings: &[read(1), read(2), read_write(3), read_write(4)],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rmsnorm_backward",
    // x, w, rstd, dy, dx
    bindings: &[read(1), read(2), read(5), read(6), read_write(7)],
};
static DW_PARTIAL: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rmsnorm_dw_partial",
    // x, rstd, dy, then the partials `weight_grad` appends
    bindings: &[read(1), read(5), read(6), read_write(8)],
};

/// `y = x · rstd · w`; writes `rstd [rows]` for [`rmsnorm_backward`].
pub fn rmsnorm_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    rstd: &Tensor,
    eps: f32,
) {
    let op = "rmsnorm_forward";
    let shape = RowShape::of(op, x);
    shape.expect_per_column(op, "w", w);
    shape.expect_like_x(op, "y", y);
    shape.expect_per_row(op, "rstd", rstd);
    launch_row_norm(rec, &FORWARD, &[x, w, y, rstd], shape, eps);
}

/// Gradients of [`rmsnorm_forward`]: `dx` is overwritten; `dw`, when given, is written as
/// `dw_write` says.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    dw: Option<&Tensor>,
    dw_write: Write,
) {
    let op = "rmsnorm_backward";
    let shape = RowShape::of(op, x);
    shape.expect_per_column(op, "w", w);
    shape.expect_per_row(op, "rstd", rstd);
    shape.expect_like_x(op, "dy", dy);
    shape.expect_like_x(op, "dx", dx);
    launch_row_norm(rec, &BACKWARD, &[x, w, rstd, dy, dx], shape, 0.0);
    // A frozen weight (LoRA training) needs no gradient: skip its two passes.
    if let Some(dw) = dw {
        shape.expect_per_column(op, "dw", dw);
        let partial_inputs = [x, rstd, dy];
        weight_grad(rec, &DW_PARTIAL, &partial_inputs, shape, dw, dw_write);
    }
}

// ---- Shapes, launch parameters and the partial-then-sum weight gradient ----

/// Rows one thread sums into a partial of a weight gradient: enough work per thread, and the
/// partials stay a small fraction of the activations.
const ROWS_PER_BLOCK: usize = 64;

/// The `[rows, cols]` view of a row-wise norm's input.
#[derive(Debug, Clone, Copy)]
struct RowShape {
    pub rows: usize,
    pub cols: usize,
}

impl RowShape {
    fn of(op: &str, x: &Tensor) -> Self {
        expect_dtype(op, "x", x, DType::F32);
        let cols = x.shape().last();
        assert!(cols > 0 && x.numel() > 0, "{op}: x {x:?} is empty");
        RowShape {
            rows: x.shape().rows(),
            cols,
        }
    }

    /// An f32 tensor with one value per column (weights, biases, their gradients).
    fn expect_per_column(&self, op: &str, name: &str, t: &Tensor) {
        expect_elements(op, name, t, DType::F32, &[self.cols]);
    }

    /// An f32 tensor with one value per row (saved statistics).
    fn expect_per_row(&self, op: &str, name: &str, t: &Tensor) {
        expect_elements(op, name, t, DType::F32, &[self.rows]);
    }

    /// An f32 tensor as large as `x`.
    fn expect_like_x(&self, op: &str, name: &str, t: &Tensor) {
        expect_elements(op, name, t, DType::F32, &[self.rows, self.cols]);
    }
}

/// The uniform parameters of every entry point (the WGSL `Params` of rmsnorm.wgsl).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowParams {
    rows: u32,
    cols: u32,
    eps: f32,
    rows_per_block: u32,
}

impl RowParams {
    fn new(shape: RowShape, eps: f32) -> Self {
        RowParams {
            rows: shape.rows as u32,
            cols: shape.cols as u32,
            eps,
            rows_per_block: ROWS_PER_BLOCK as u32,
        }
    }
}

/// Several rows per workgroup when rows are narrow (`eps` is read by forwards only).
fn launch_row_norm(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    shape: RowShape,
    eps: f32,
) {
    let params = RowParams::new(shape, eps);
    launch_rows(rec, spec, tensors, &params, [shape.rows, shape.cols]);
}

/// A deterministic weight gradient: `partial_spec` (bound to `tensors` then the partials)
/// writes `partial[block, c]`, the sum over a block of [`ROWS_PER_BLOCK`] rows, with one thread
/// per column and block; [`reduce::sum_rows`] then adds the blocks into `grad` as `write`
/// says.
fn weight_grad(
    rec: &mut Recorder,
    partial_spec: &'static KernelSpec,
    tensors: &[&Tensor],
    shape: RowShape,
    grad: &Tensor,
    write: Write,
) {
    const MAX_BLOCKS: usize = 65_535;
    let blocks = shape.rows.div_ceil(ROWS_PER_BLOCK);
    assert!(
        blocks <= MAX_BLOCKS,
        "{}: {} rows need more than {MAX_BLOCKS} blocks",
        partial_spec.entry,
        shape.rows
    );
    let partial = rec.scratch([blocks, shape.cols], DType::F32);
    let mut bound = tensors.to_vec();
    bound.push(&partial);
    let params = RowParams::new(shape, 0.0);
    launch_per_column_block(rec, partial_spec, &bound, &params, shape.cols, blocks);
    reduce::sum_rows(rec, &partial, grad, write);
}

/// Bytes of scratch [`rmsnorm_backward`] takes for `[rows, cols]` when it computes the
/// weight's gradient (`weight_grad`; a frozen weight takes none): the per-block partials and
/// their sum's own.
pub fn rmsnorm_backward_scratch_bytes(rows: usize, cols: usize, weight_grad: bool) -> u64 {
    if !weight_grad {
        return 0;
    }
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    (blocks * cols * DType::F32.size_bytes()) as u64 + reduce::sum_rows_scratch_bytes(blocks, cols)
}

/// CPU f64 references (row-major `[rows, cols]`).
pub mod reference {
    /// `(y, rstd)`.
    pub fn rmsnorm_forward(x: &[f64], w: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let mut y = Vec::with_capacity(x.len());
        let mut rstd = Vec::new();
        for row in x.chunks_exact(cols) {
            let mean_square = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            let r = 1.0 / (mean_square + eps).sqrt();
            y.extend(row.iter().zip(w).map(|(v, wc)| v * r * wc));
            rstd.push(r);
        }
        (y, rstd)
    }

    /// `(dx, dw)`.
    pub fn rmsnorm_backward(x: &[f64], w: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let (_, rstd) = rmsnorm_forward(x, w, eps);
        let mut dx = Vec::with_capacity(x.len());
        let mut dw = vec![0.0; cols];
        for ((row, drow), r) in x.chunks_exact(cols).zip(dy.chunks_exact(cols)).zip(rstd) {
            let g: Vec<f64> = drow.iter().zip(w).map(|(d, wc)| d * wc).collect();
            let mean_gx = g.iter().zip(row).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
            dx.extend(
                g.iter()
                    .zip(row)
                    .map(|(gc, xc)| r * (gc - xc * r * r * mean_gx)),
            );
            for ((acc, d), xc) in dw.iter_mut().zip(drow).zip(row) {
                *acc += d * xc * r;
            }
        }
        (dx, dw)
    }
}
