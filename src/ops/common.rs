//! What the launchers share, as `shaders/common.wgsl` is what the kernels share: the workgroup
//! sizes, the two common launch shapes (one thread per item, one workgroup per row) and the
//! tensor checks.

use crate::gpu::{rows_per_binding, DType, Grid, KernelSpec, Recorder, Shape, Tensor};

/// Threads of every kernel that reduces across its workgroup with the fixed-order trees of
/// `shaders/common.wgsl`: its `const REDUCE_WG`, which must stay equal (a test checks).
pub(crate) const REDUCE_WG: u32 = 256;
const _: () = assert!(REDUCE_WG.is_power_of_two());

/// Threads per workgroup of the one-thread-per-item kernels (their WGSL `override WG`).
pub(crate) const WG: u32 = 256;

/// Launches `spec` with one thread per item (`items` of them) in workgroups of [`WG`].
pub(crate) fn launch_per_item<P: bytemuck::Pod>(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    params: &P,
    items: usize,
) {
    launch_per_item_with(rec, spec, &[], tensors, params, items);
}

/// [`launch_per_item`] with the kernel's own pipeline overrides (a variant such as an
/// operand's element type) besides `WG`.
pub(crate) fn launch_per_item_with<P: bytemuck::Pod>(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    overrides: &[(&'static str, u32)],
    tensors: &[&Tensor],
    params: &P,
    items: usize,
) {
    let overrides: Vec<_> = [("WG", WG)]
        .into_iter()
        .chain(overrides.iter().copied())
        .collect();
    let kernel = rec.gpu().kernel(spec, &overrides);
    rec.dispatch(&kernel, tensors, params, Grid::threads(items, WG));
}

/// Launches `spec` with one thread per (column, block of rows): x covers `cols` in workgroups
/// of [`WG`], y the `blocks`.
pub(crate) fn launch_per_column_block<P: bytemuck::Pod>(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    params: &P,
    cols: usize,
    blocks: usize,
) {
    let kernel = rec.gpu().kernel(spec, &[("WG", WG)]);
    let grid = Grid::xyz(cols.div_ceil(WG as usize) as u32, blocks as u32, 1);
    rec.dispatch(&kernel, tensors, params, grid);
}

/// Elements each thread of a row kernel covers (more when a row is wider than [`REDUCE_WG`]
/// of them): enough to amortise the row's reduction (on lavapipe 16 took C = 64 rows from
/// 12.9 to 0.6 ms per 1104 rows, 8 to 0.7, 32 to 0.5), few enough that a GPU still has
/// several threads per row.
const ROW_ITEMS: usize = 16;

/// Threads that share one row of `cols` elements in the several-rows-per-workgroup kernels:
/// about [`ROW_ITEMS`] elements each, a power of two up to [`REDUCE_WG`] (the WGSL override
/// `ROW_THREADS` of `shaders/common.wgsl`).
pub(crate) fn row_threads(cols: usize) -> u32 {
    let threads = cols.div_ceil(ROW_ITEMS).min(REDUCE_WG as usize);
    threads.next_power_of_two() as u32
}

/// Launches `spec` over `rows` rows of `cols` elements, [`row_threads`] threads per row and
/// as many rows per workgroup of [`REDUCE_WG`] threads as fit.
pub(crate) fn launch_rows<P: bytemuck::Pod>(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    params: &P,
    [rows, cols]: [usize; 2],
) {
    let threads = row_threads(cols);
    let rows_per_group = (REDUCE_WG / threads) as usize;
    let kernel = rec.gpu().kernel(spec, &[("ROW_THREADS", threads)]);
    rec.dispatch(
        &kernel,
        tensors,
        params,
        Grid::flat(rows.div_ceil(rows_per_group)),
    );
}

/// Launches `spec` with one workgroup of [`REDUCE_WG`] threads per row.
pub(crate) fn launch_per_row<P: bytemuck::Pod>(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    params: &P,
    rows: usize,
) {
    let kernel = rec.gpu().kernel(spec, &[]);
    rec.dispatch(&kernel, tensors, params, Grid::flat(rows));
}

/// Runs `launch` once per part of `rows` rows such that a part of a `[rows, cols]` f32 matrix
/// fits one storage binding, passing row views of `tensors` (each with `rows` rows: wide
/// matrices and per-row vectors alike). A part starts at a multiple of 64 rows, so every view
/// meets the storage-offset alignment (at most 256 bytes).
pub(crate) fn in_binding_parts(
    rec: &mut Recorder,
    [rows, cols]: [usize; 2],
    tensors: &[&Tensor],
    mut launch: impl FnMut(&mut Recorder, &[Tensor]),
) {
    let gpu = rec.gpu();
    let part = rows_per_binding(rows, cols, gpu.max_binding_bytes());
    for start in (0..rows).step_by(part.max(1)) {
        let n = part.min(rows - start);
        let views: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                if n == rows {
                    (*t).clone()
                } else {
                    t.rows_view(gpu, start, n)
                }
            })
            .collect();
        launch(rec, &views);
    }
}

/// The `FORMAT_*` code (`shaders/common.wgsl`) of a tensor of `dtype` bound as `array<u32>`:
/// how a kernel reads its elements as f32 (the GEMM's `B_FORMAT`, the embedding's
/// `TABLE_FORMAT`, the 16-bit side of a cast). u32 data has no such reading.
pub(crate) fn wgsl_format(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U32 => panic!("u32 data is not read as f32"),
    }
}

/// Asserts that `op`'s tensor `name` holds `dtype` values.
#[track_caller]
pub(crate) fn expect_dtype(op: &str, name: &str, t: &Tensor, dtype: DType) {
    assert_eq!(t.dtype(), dtype, "{op}: {name} must be {dtype}, got {t:?}");
}

/// Asserts that `op`'s tensor `name` holds `dtype` values, as many as `dims` has (in any
/// shape).
#[track_caller]
pub(crate) fn expect_elements(op: &str, name: &str, t: &Tensor, dtype: DType, dims: &[usize]) {
    expect_dtype(op, name, t, dtype);
    let numel: usize = dims.iter().product();
    assert_eq!(
        t.numel(),
        numel,
        "{op}: {name} must hold {dims:?} elements, got {t:?}"
    );
}

/// Asserts that `op`'s tensor `name` holds `dtype` values shaped exactly `dims`.
#[track_caller]
pub(crate) fn expect_dims(op: &str, name: &str, t: &Tensor, dtype: DType, dims: &[usize]) {
    expect_dtype(op, name, t, dtype);
    assert_eq!(t.dims(), dims, "{op}: {name} must be {dims:?}, got {t:?}");
}

/// Asserts that every tensor is f32 and shaped like the first; returns that shape.
#[track_caller]
pub(crate) fn expect_f32_alike<'t>(op: &str, tensors: &[&'t Tensor]) -> &'t Shape {
    let first = tensors[0];
    for t in tensors {
        assert!(
            t.dtype() == DType::F32 && t.dims() == first.dims(),
            "{op}: every tensor must be f32 and shaped like {first:?}, got {t:?}"
        );
    }
    first.shape()
}

#[cfg(test)]
mod tests {
    use super::REDUCE_WG;

    #[test]
    fn reduce_wg_matches_the_wgsl_prelude() {
        let prelude = include_str!("../../shaders/common.wgsl");
        let declaration = format!("const REDUCE_WG: u32 = {REDUCE_WG}u;");
        assert!(
            prelude.contains(&declaration),
            "shaders/common.wgsl must declare `{declaration}`"
        );
    }
}
