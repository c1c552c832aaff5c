//! Matrix products for the linear layers: `Y = X·Wᵀ (+ b)` and its gradients `dX = dY·W`,
//! `dW += dYᵀ·X`, `db += Σ dY`, all on one general batched GEMM ([`gemm`]) whose layout (which
//! operand is stored transposed) is fixed per pipeline, so no transpose kernel ever runs.
//!
//! Weights are stored PyTorch-style, `W [N, K]` (out × in); activations are row-major `[.., K]`.
//! A frozen weight may be f16 or bf16 (`DType::F16`, `DType::BF16`: half the memory): the
//! forward and the input gradient read it through the GEMM's B operand, which widens it
//! exactly to f32 as it loads a tile, so the product equals the f32 product of the same
//! (16-bit-representable) values, bit for bit. Everything else is f32, and so is all
//! arithmetic.
//! Every launcher takes [`MatmulOptions`]: handing a backward the forward's `alpha` gives the
//! gradient of the scaled forward.
//!
//! Two kernels compute [`gemm`], with the same results bit for bit (each output sums k in
//! order, one fma per step): the tiled kernel (`shaders/matmul.wgsl`, workgroup-memory tiles,
//! any device, launched from `matmul/tiled.rs`) and, on a CPU adapter whose subgroups are 8
//! lanes of one SIMD vector (lavapipe), the subgroup kernel (`shaders/matmul_subgroup.wgsl`,
//! launched from `matmul/subgroup.rs`), 5–10× faster there, wherever its vec4 reads are
//! aligned. The linear layers' products on it are in `matmul/layers.rs`, the f64 references in
//! `matmul/reference.rs`.

use crate::gpu::{DType, Grid, KernelSpec, Recorder, Tensor};
use crate::ops::reduce;
use crate::ops::Write;

mod layers;
pub mod reference;
mod subgroup;
mod tiled;

pub use layers::{
    matmul_backward_bias, matmul_backward_input, matmul_backward_input_lora,
    matmul_backward_weight, matmul_forward, matmul_forward_lora, LoraPair,
};
use tiled::{launch_tiled, split_parts, split_plan, Tiles};

/// Most workgroups along one grid dimension.
const MAX_GROUPS_PER_DIM: usize = 65_535;
/// The element types B may hold: f32, or a frozen weight's 16-bit f16 or bf16 (both kernels
/// widen it exactly as they read it; the `B_FORMAT` override).
const B_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// How a product is combined with what the output already holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulOptions {
    /// Scale of the product (LoRA's `alpha / r`); a bias is added unscaled.
    pub alpha: f32,
    /// `C += ...` (parameter gradients, LoRA's second path) or `C = ...`.
    pub write: Write,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        MatmulOptions {
            alpha: 1.0,
            write: Write::Overwrite,
        }
    }
}

impl MatmulOptions {
    /// `C = product` with alpha 1.
    pub fn overwrite() -> Self {
        Self::default()
    }

    /// `C += product` with alpha 1.
    pub fn accumulate() -> Self {
        Self::writing(Write::Accumulate)
    }

    /// `C = product` or `C += product` as `write` says, with alpha 1.
    pub fn writing(write: Write) -> Self {
        MatmulOptions {
            write,
            ..Self::default()
        }
    }

    /// The same, with the product scaled by `alpha`.
    pub fn scaled(self, alpha: f32) -> Self {
        MatmulOptions { alpha, ..self }
    }
}

/// Where the matrices of one operand lie inside its tensor, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    /// Index of the first matrix's first element.
    pub offset: usize,
    /// Elements from one stored row to the next (the leading dimension).
    pub row_stride: usize,
    /// Elements from one matrix of the batch to the next; 0 broadcasts one matrix.
    pub batch_stride: usize,
}

impl Strided {
    /// Contiguous `[batch, rows, cols]` matrices starting at element 0.
    pub fn dense(rows: usize, cols: usize) -> Strided {
        Strided {
            offset: 0,
            row_stride: cols,
            batch_stride: rows * cols,
        }
    }

    /// One matrix with rows `row_stride` apart, used by every batch entry.
    pub fn broadcast(row_stride: usize) -> Strided {
        Strided {
            offset: 0,
            row_stride,
            batch_stride: 0,
        }
    }

    /// The same layout starting at element `offset`.
    pub fn at(self, offset: usize) -> Strided {
        Strided { offset, ..self }
    }
}

/// One batched product `C[b] = alpha·op(A[b])·op(B[b]) (+ bias) (+ C[b])`, with op(A) `M×K`
/// and op(B) `K×N`. A is stored `[M, K]`, or `[K, M]` when `transpose_a`; B is stored
/// `[K, N]`, or `[N, K]` when `transpose_b`; C is stored `[M, N]` (with its own strides).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Independent products (each with its own strided A, B and C).
    pub batch: usize,
    /// Rows of op(A) and of C.
    pub m: usize,
    /// Columns of op(B) and of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// A is stored `[K, M]`.
    pub transpose_a: bool,
    /// B is stored `[N, K]` (a PyTorch weight in the forward).
    pub transpose_b: bool,
    /// Where A's elements are.
    pub a: Strided,
    /// Where B's elements are.
    pub b: Strided,
    /// Where C's elements go.
    pub c: Strided,
    /// Index of `bias[0]` in the bias tensor (a column window of C takes a window of bias).
    pub bias_offset: usize,
    /// Scale and overwrite/accumulate.
    pub options: MatmulOptions,
}

impl Gemm {
    /// An unbatched product of contiguous matrices in the given layout.
    pub fn dense(m: usize, n: usize, k: usize, transpose_a: bool, transpose_b: bool) -> Gemm {
        let (a_rows, a_cols) = stored_dims(m, k, transpose_a);
        let (b_rows, b_cols) = stored_dims(k, n, transpose_b);
        Gemm {
            batch: 1,
            m,
            n,
            k,
            transpose_a,
            transpose_b,
            a: Strided::dense(a_rows, a_cols),
            b: Strided::dense(b_rows, b_cols),
            c: Strided::dense(m, n),
            bias_offset: 0,
            options: MatmulOptions::default(),
        }
    }

    /// The same product with other options.
    pub fn with(self, options: MatmulOptions) -> Gemm {
        Gemm { options, ..self }
    }

    /// The part of this product that sums over `k` in `k0..k1`: A's and B's offsets move to
    /// `k0`, and every part after the first (`k0 > 0`) adds to C.
    pub fn k_range(self, k0: usize, k1: usize) -> Gemm {
        let moved = |s: Strided, along_rows: bool| {
            s.at(s.offset + if along_rows { k0 * s.row_stride } else { k0 })
        };
        let mut options = self.options;
        if k0 > 0 {
            options.write = Write::Accumulate;
        }
        Gemm {
            k: k1 - k0,
            a: moved(self.a, self.transpose_a),
            b: moved(self.b, !self.transpose_b),
            options,
            ..self
        }
    }

    /// `(rows, cols)` of A, B and C as stored.
    fn stored(&self) -> [(usize, usize); 3] {
        [
            stored_dims(self.m, self.k, self.transpose_a),
            stored_dims(self.k, self.n, self.transpose_b),
            (self.m, self.n),
        ]
    }
}

/// `(rows, cols)` as stored of a `rows × cols` operand, transposed or not.
fn stored_dims(rows: usize, cols: usize, transposed: bool) -> (usize, usize) {
    if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_offset: u32,
    a_row_stride: u32,
    a_batch_stride: u32,
    b_offset: u32,
    b_row_stride: u32,
    b_batch_stride: u32,
    c_offset: u32,
    c_row_stride: u32,
    c_batch_stride: u32,
    bias_offset: u32,
    alpha: f32,
    accumulate: u32,
    k_split: u32,
    k2: u32,
    a2_offset: u32,
    a2_row_stride: u32,
    b2_offset: u32,
    b2_row_stride: u32,
    alpha2: f32,
}

impl Params {
    /// The parameters of `g`, with K split into parts of `k_split` (0: not split).
    fn new(g: &Gemm, k_split: usize) -> Params {
        let u = |v: usize| u32::try_from(v).expect("checked against the tensor sizes");
        Params {
            m: u(g.m),
            n: u(g.n),
            k: u(g.k),
            a_offset: u(g.a.offset),
            a_row_stride: u(g.a.row_stride),
            a_batch_stride: u(g.a.batch_stride),
            b_offset: u(g.b.offset),
            b_row_stride: u(g.b.row_stride),
            b_batch_stride: u(g.b.batch_stride),
            c_offset: u(g.c.offset),
            c_row_stride: u(g.c.row_stride),
            c_batch_stride: u(g.c.batch_stride),
            bias_offset: u(g.bias_offset),
            alpha: g.options.alpha,
            accumulate: u32::from(g.options.write.accumulates()),
            k_split: u(k_split),
            k2: 0,
            a2_offset: 0,
            a2_row_stride: 0,
            b2_offset: 0,
            b2_row_stride: 0,
            alpha2: 0.0,
        }
    }

    /// The same with `second` (the second product of [`gemm_plus`], as a [`Gemm`]) summed
    /// into the outputs (the subgroup kernel's SECOND).
    fn with_second(self, second: &Gemm) -> Params {
        let u = |v: usize| u32::try_from(v).expect("checked against the tensor sizes");
        Params {
            k2: u(second.k),
            a2_offset: u(second.a.offset),
            a2_row_stride: u(second.a.row_stride),
            b2_offset: u(second.b.offset),
            b2_row_stride: u(second.b.row_stride),
            alpha2: second.options.alpha,
            ..self
        }
    }
}

/// Asserts that `tensor` has one of the element types in `dtypes`, and that `batch` matrices
/// of `rows × cols` laid out as `layout` lie inside it (and that every index fits the kernel's
/// u32 arithmetic). Offsets and strides count elements whatever their width: the kernel finds
/// a 16-bit element i in half i % 2 of word i / 2, so any element offset, odd or even, works,
/// and the last word is there because bindings are padded to 4 bytes.
fn check_operand(
    name: &str,
    tensor: &Tensor,
    dtypes: &[DType],
    layout: &Strided,
    batch: usize,
    dims: (usize, usize),
) {
    let (rows, cols) = dims;
    assert!(
        dtypes.contains(&tensor.dtype()),
        "gemm: {name} {tensor:?} must be {}",
        dtypes
            .iter()
            .map(DType::to_string)
            .collect::<Vec<_>>()
            .join(" or ")
    );
    assert!(
        layout.row_stride >= cols,
        "gemm: {name} row stride {} is shorter than its {cols} columns",
        layout.row_stride
    );
    let last =
        layout.offset + (batch - 1) * layout.batch_stride + (rows - 1) * layout.row_stride + cols;
    assert!(
        last <= tensor.numel(),
        "gemm: {name} ({rows}x{cols}, {layout:?}, batch {batch}) reaches element {last} of {tensor:?}"
    );
    assert!(
        u32::try_from(tensor.numel()).is_ok(),
        "gemm: {name} {tensor:?} has more elements than u32 indexing reaches"
    );
}

/// Whether the batch entries of C are disjoint: stacked one after another, or interleaved
/// side by side within each row (e.g. attention heads writing `[T, heads, D]`).
fn batches_disjoint(g: &Gemm) -> bool {
    let c = &g.c;
    let stacked = c.batch_stride >= (g.m - 1) * c.row_stride + g.n;
    let interleaved = c.batch_stride >= g.n && (g.batch - 1) * c.batch_stride + g.n <= c.row_stride;
    g.batch == 1 || stacked || interleaved
}

/// Records `C[b] = alpha·op(A[b])·op(B[b]) (+ bias) (+ C[b])` for every `b < g.batch`, as
/// described by `g`. `bias` (f32, `bias[g.bias_offset + n]` for column n) is added unscaled.
/// C must not overlap A, B or bias, and distinct batch entries of C must not overlap.
/// B is f32, f16 or bf16 (frozen weights; widened exactly as it is read); A, bias and C are
/// f32.
pub fn gemm(
    rec: &mut Recorder,
    g: &Gemm,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    c: &Tensor,
) {
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return;
    }
    check_gemm(g, a, b, bias, c);
    let cpu = rec.gpu().info().device_type == wgpu::DeviceType::Cpu;
    let dense_c = g.c.offset == 0 && g.c.row_stride == g.n && c.numel() == g.m * g.n;
    let (tiles, splits) = split_plan(g, bias.is_some() || !dense_c, cpu);
    if splits > 1 {
        launch_split(rec, g, tiles, splits, a, b, c);
    } else {
        launch(rec, g, tiles, 0, a, b, bias, c);
    }
}

/// A second product that [`gemm_plus`] sums into the outputs of a first:
/// `alpha · A2·op(B2)`, A2 `[M, k]` row-major, B2 stored as the first product's B is
/// (`[N, k]` when that is transposed, else `[k, N]`), both f32. The LoRA paths: `y += s·h·Bᵀ`
/// beside `y = x·Wᵀ`, and `dx += dh·A` beside `dx = dy·W`.
#[derive(Debug, Clone, Copy)]
pub struct Second<'t> {
    /// A2 and where its elements are (its batch stride is not used).
    pub a: (&'t Tensor, Strided),
    /// B2 and where its elements are.
    pub b: (&'t Tensor, Strided),
    /// The summed dimension of the second product.
    pub k: usize,
    /// Its scale.
    pub alpha: f32,
}

impl Second<'_> {
    /// The second product as a [`Gemm`] of its own that adds into `first`'s C.
    fn as_gemm(&self, first: &Gemm) -> Gemm {
        Gemm {
            batch: 1,
            k: self.k,
            transpose_a: false,
            a: self.a.1,
            b: self.b.1,
            bias_offset: 0,
            options: MatmulOptions::accumulate().scaled(self.alpha),
            ..*first
        }
    }
}

/// `C = alpha·op(A)·op(B) (+ bias) (+ C) + second.alpha · A2·op(B2)`: [`gemm`] of `g` (one
/// product) and a second product summed into the same outputs. Where the subgroup kernel runs
/// both (alpha 1, f32 second operands, aligned vec4s), it is one dispatch that reads and writes
/// C once, the second product's terms added after the first's to the same sums; elsewhere `g`
/// and then the second product added to C (the same values up to rounding).
pub fn gemm_plus(
    rec: &mut Recorder,
    g: &Gemm,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    second: &Second,
    c: &Tensor,
) {
    assert_eq!(
        g.batch, 1,
        "gemm_plus: the first product must be one product"
    );
    let second_g = second.as_gemm(g);
    let ((a2, _), (b2, _)) = (second.a, second.b);
    // The kernel scales the one set of sums by alpha and A2 by alpha2 as it loads it.
    let fused = g.m > 0
        && g.n > 0
        && g.k > 0
        && second.k > 0
        && g.options.alpha == 1.0
        && a2.dtype() == DType::F32
        && b2.dtype() == DType::F32
        && subgroup::device_fits(rec.gpu())
        && subgroup::tiles_for(&second_g, 0, a2, b2).is_some();
    let tiles = fused.then(|| subgroup::tiles_for(g, 0, a, b)).flatten();
    let Some(tiles) = tiles else {
        gemm(rec, g, a, b, bias, c);
        gemm(rec, &second_g, a2, b2, None, c);
        return;
    };
    check_gemm(g, a, b, bias, c);
    check_gemm(&second_g, a2, b2, None, c);
    subgroup::launch(rec, g, tiles, 0, [a, b, c], bias, Some((&second_g, a2, b2)));
}

/// Asserts that `g`'s operands, C and bias have the types and extents it needs.
fn check_gemm(g: &Gemm, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor) {
    let [a_dims, b_dims, c_dims] = g.stored();
    // With K = 0 the product is empty; the kernel still writes bias (+ C), so A and B are
    // not read and need no extent.
    if g.k > 0 {
        check_operand("A", a, &[DType::F32], &g.a, g.batch, a_dims);
        check_operand("B", b, &B_DTYPES, &g.b, g.batch, b_dims);
    }
    check_operand("C", c, &[DType::F32], &g.c, g.batch, c_dims);
    assert!(
        batches_disjoint(g),
        "gemm: batch entries of C may overlap ({:?}, {}x{}, batch {})",
        g.c,
        g.m,
        g.n,
        g.batch
    );
    if let Some(bias) = bias {
        check_operand(
            "bias",
            bias,
            &[DType::F32],
            &Strided::broadcast(g.n).at(g.bias_offset),
            1,
            (1, g.n),
        );
    }
}

/// Bytes of scratch [`gemm`] takes for `g` (a whole, dense C; `bias` says whether it adds
/// one) on a CPU adapter (`cpu`) or a GPU: the partial products of a split K, or nothing. The
/// memory planner asks this before any device runs the product.
pub fn gemm_scratch_bytes(g: &Gemm, bias: bool, cpu: bool) -> u64 {
    match split_plan(g, bias, cpu) {
        (_, 1) => 0,
        (_, splits) => {
            let (_, splits) = split_parts(g.k, splits);
            (splits * g.m * g.n * DType::F32.size_bytes()) as u64
        }
    }
}

/// Records `g` (one product into all of a dense C, no bias) with K in `splits` parts: each
/// part's product goes to a slab of a scratch tensor, and `reduce::sum_rows` adds the slabs
/// into C in order (deterministic, like every other sum here).
fn launch_split(
    rec: &mut Recorder,
    g: &Gemm,
    tiles: Tiles,
    splits: usize,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) {
    let (part, splits) = split_parts(g.k, splits);
    let partial = rec.scratch([splits, g.m * g.n], DType::F32);
    let parts = Gemm {
        batch: splits,
        c: Strided::dense(g.m, g.n),
        options: MatmulOptions {
            write: Write::Overwrite,
            ..g.options
        },
        ..*g
    };
    launch(rec, &parts, tiles, part, a, b, None, &partial);
    reduce::sum_rows(rec, &partial, c, g.options.write);
}

/// Records a checked `g`, K split into parts of `k_split` (0: not split; then workgroup z is a
/// part of K instead of a batch entry, and writes slab z of C): with the subgroup kernel where
/// the device and the operands allow it, else with the tiled kernel and `tiles`.
#[allow(clippy::too_many_arguments)]
fn launch(
    rec: &mut Recorder,
    g: &Gemm,
    tiles: Tiles,
    k_split: usize,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    c: &Tensor,
) {
    let lane_tiles = subgroup::device_fits(rec.gpu())
        .then(|| subgroup::tiles_for(g, k_split, a, b))
        .flatten();
    match lane_tiles {
        Some(lane_tiles) => {
            subgroup::launch(rec, g, lane_tiles, k_split, [a, b, c], bias, None);
        }
        None => launch_tiled(rec, g, tiles, k_split, a, b, bias, c),
    }
}

/// One of the GEMM kernels as a launch of `g`: its entry points without and with a bias (the
/// bindings of [`GEMM`] and [`GEMM_BIAS`], then those of `extra`), overrides and grid.
struct GemmKernel<'o> {
    entries: [&'static KernelSpec; 2],
    overrides: &'o [(&'static str, u32)],
    grid: [usize; 3],
    extra: Vec<&'o Tensor>,
}

/// Records `g` with `kernel` and `params` (K in parts of `params.k_split`, or 0; a second
/// product of `params.k2`), on `[a, b, c]` and the bias.
fn dispatch(
    rec: &mut Recorder,
    g: &Gemm,
    kernel: &GemmKernel,
    params: &Params,
    [a, b, c]: [&Tensor; 3],
    bias: Option<&Tensor>,
) {
    let grid = kernel.grid;
    assert!(
        grid.iter().all(|&d| d <= MAX_GROUPS_PER_DIM),
        "gemm: {}x{}x{} (batch {}) needs a {grid:?} grid, more than {MAX_GROUPS_PER_DIM} workgroups per dimension",
        g.m,
        g.n,
        g.k,
        g.batch
    );
    let spec = kernel.entries[usize::from(bias.is_some())];
    let pipeline = rec.gpu().kernel(spec, kernel.overrides);
    let mut tensors: Vec<&Tensor> = match bias {
        Some(bias) => vec![a, b, bias, c],
        None => vec![a, b, c],
    };
    tensors.extend(&kernel.extra);
    let [x, y, z] = grid.map(|d| d as u32);
    // A split product's batch entries are parts of one K, not products of their own.
    let products = if params.k_split == 0 { g.batch } else { 1 };
    let depth = g.k + params.k2 as usize;
    let flops = 2 * (products * g.m * g.n * depth) as u64;
    rec.dispatch_counting(&pipeline, &tensors, params, Grid::xyz(x, y, z), flops);
}
