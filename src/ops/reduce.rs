//! Deterministic reductions: column sums of a row-major matrix, used for every bias, norm-weight
//! and partial-sum gradient (two stages, fixed order, no float atomics).

use super::common::{expect_dtype, launch_per_column_block};
use super::Write;
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("reduce");
/// Rows one thread sums in the first stage: enough work per thread, enough threads per matrix.
const ROWS_PER_GROUP: usize = 64;

static SUM_ROWS: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "sum_rows",
    bindings: &[read(1), read_write(2)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    rows_per_group: u32,
    accumulate: u32,
}

fn launch(
    rec: &mut Recorder,
    x: &Tensor,
    out: &Tensor,
    rows: usize,
    cols: usize,
    per_group: usize,
    accumulate: bool,
) {
    let blocks = rows.div_ceil(per_group).max(1);
    let params = Params {
        rows: rows as u32,
        cols: cols as u32,
        rows_per_group: per_group as u32,
        accumulate: u32::from(accumulate),
    };
    launch_per_column_block(rec, &SUM_ROWS, &[x, out], &params, cols, blocks);
}

/// `out[c] = Σ_r x[r, c]` (or `+=` with [`Write::Accumulate`]), treating `x` as `[numel / cols, cols]`
/// with `cols = out.numel()`.
pub fn sum_rows(rec: &mut Recorder, x: &Tensor, out: &Tensor, write: Write) {
    let accumulate = write.accumulates();
    expect_dtype("sum_rows", "x", x, DType::F32);
    expect_dtype("sum_rows", "out", out, DType::F32);
    let cols = out.numel();
    assert!(
        cols > 0 && x.numel() % cols == 0,
        "sum_rows: {x:?} does not split into rows of {cols}"
    );
    let rows = x.numel() / cols;
    if rows <= ROWS_PER_GROUP {
        launch(rec, x, out, rows, cols, rows.max(1), accumulate);
        return;
    }
    let blocks = rows.div_ceil(ROWS_PER_GROUP);
    let partial = rec.scratch([blocks, cols], DType::F32);
    launch(rec, x, &partial, rows, cols, ROWS_PER_GROUP, false);
    launch(rec, &partial, out, blocks, cols, blocks, accumulate);
}

/// Bytes of scratch [`sum_rows`] takes for `rows` rows of `cols` columns (the memory
/// planner's question): the per-block partial sums when the rows span several blocks.
pub fn sum_rows_scratch_bytes(rows: usize, cols: usize) -> u64 {
    if rows <= ROWS_PER_GROUP {
        return 0;
    }
    (rows.div_ceil(ROWS_PER_GROUP) * cols * DType::F32.size_bytes()) as u64
}

/// CPU f64 reference.
pub mod reference {
    /// Column sums of row-major `x [rows, cols]`.
    pub fn sum_rows(x: &[f64], cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; cols];
        for row in x.chunks_exact(cols) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        out
    }
}
