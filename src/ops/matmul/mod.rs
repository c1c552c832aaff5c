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
//! any device) and, on a CPU adapter whose subgroups are 8 lanes of one SIMD vector (lavapipe),
//! the subgroup kernel (`shaders/matmul_subgroup.wgsl`, launched from `matmul/subgroup.rs`),
//! 5–10× faster there, wherever its vec4 reads are aligned.

use crate::gpu::{read, read_write, DType, Grid, KernelSpec, Recorder, Shader, Tensor};
use crate::ops::common::wgsl_format;
use crate::ops::reduce;
use crate::ops::Write;
use crate::shader;

mod subgroup;

static SHADER: Shader = shader!("matmul");

/// Depth of one K step through workgroup memory.
const TILE_K: u32 = 16;
/// The narrowest and widest tile extents (rows or columns of C per workgroup). On a CPU
/// adapter (lavapipe) wider tiles than 64 measured slower; a GPU takes 128 where the grid
/// stays large enough.
const MIN_TILE: u32 = 16;
const CPU_MAX_TILE: u32 = 64;
const GPU_MAX_TILE: u32 = 128;
/// Fewer workgroups than this leave much of a GPU idle: tiles shrink until the grid has
/// them (about one per streaming multiprocessor of a large GPU). A CPU adapter runs one
/// workgroup per core, where the per-workgroup overhead of small tiles costs more than the
/// parallelism gains.
const GPU_MIN_WORKGROUPS: usize = 128;
/// A product whose grid is too small for the device splits K into at most this many parts,
/// each at least `MIN_SPLIT_STEPS` K steps long, summed by workgroups side by side into
/// partial products that `reduce::sum_rows` adds up (the LoRA weight gradients: M or N is the
/// rank, K the tokens). Too small means fewer workgroups than twice the cores of a CPU adapter
/// (so that uneven grids balance), or fewer threads than `GPU_MIN_THREADS` on a GPU.
const MAX_SPLITS: usize = 16;
const MIN_SPLIT_STEPS: usize = 4;
const GPU_MIN_THREADS: usize = 32_768;
/// Rows and columns of C one thread computes at most (the WGSL `MAX_BLOCK`).
const MAX_BLOCK: u32 = 8;
/// Most workgroups along one grid dimension.
const MAX_GROUPS_PER_DIM: usize = 65_535;
/// The element types B may hold: f32, or a frozen weight's 16-bit f16 or bf16 (both kernels
/// widen it exactly as they read it; the `B_FORMAT` override).
const B_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// Bytes of `a_tile` and `b_tile` at the widest tiles: within WebGPU's guaranteed 16 KiB.
const _: () = assert!(TILE_K * 2 * GPU_MAX_TILE * 4 <= 16_384);

static GEMM: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "gemm",
    bindings: &[read(1), read(2), read_write(4)],
};
static GEMM_BIAS: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "gemm_bias",
    bindings: &[read(1), read(2), read(3), read_write(4)],
};

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

/// The tile sizes of one launch (the WGSL overrides): a workgroup of `threads[0] ×
/// threads[1]` threads computes a tile of `(threads[0]·block[0]) × (threads[1]·block[1])`
/// elements of C, each thread a `block[0] × block[1]` register block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiles {
    /// Threads along M and along N.
    threads: [u32; 2],
    /// Rows and columns of C per thread (multiples of 4, at most [`MAX_BLOCK`]).
    block: [u32; 2],
}

impl Tiles {
    /// Tiles no wider than the matrix needs (up to 64 or 128), shrunk on a GPU until the grid
    /// has [`GPU_MIN_WORKGROUPS`] workgroups.
    fn choose(g: &Gemm, cpu: bool) -> Tiles {
        let widest = if cpu { CPU_MAX_TILE } else { GPU_MAX_TILE };
        let mut extents = [tile_extent(g.m, widest), tile_extent(g.n, widest)];
        while !cpu && workgroups(g, extents) < GPU_MIN_WORKGROUPS {
            // Halve the wider tile (rows on a tie); stop at the narrowest.
            let wider = usize::from(extents[1] > extents[0]);
            if extents[wider] == MIN_TILE {
                break;
            }
            extents[wider] /= 2;
        }
        Tiles::with_extents(extents)
    }

    /// Tiles of `[rows, cols]` (powers of two within `MIN_TILE..=GPU_MAX_TILE`): 8 elements
    /// per thread along a dimension from 64 on (more multiply-adds per value read), 4 below,
    /// so that a workgroup has at least 4 threads along each dimension.
    fn with_extents(extents: [u32; 2]) -> Tiles {
        let block = extents.map(|e| if e >= 64 { MAX_BLOCK } else { 4 });
        Tiles {
            threads: [extents[0] / block[0], extents[1] / block[1]],
            block,
        }
    }

    /// Rows and columns of C per workgroup.
    fn extents(&self) -> [u32; 2] {
        [
            self.threads[0] * self.block[0],
            self.threads[1] * self.block[1],
        ]
    }

    /// The overrides for `g` with a B operand of type `b_dtype`.
    fn overrides(&self, g: &Gemm, b_dtype: DType) -> [(&'static str, u32); 8] {
        [
            ("TRANSPOSE_A", u32::from(g.transpose_a)),
            ("TRANSPOSE_B", u32::from(g.transpose_b)),
            ("B_FORMAT", wgsl_format(b_dtype)),
            ("GROUP_M", self.threads[0]),
            ("GROUP_N", self.threads[1]),
            ("BLOCK_M", self.block[0]),
            ("BLOCK_N", self.block[1]),
            ("TILE_K", TILE_K),
        ]
    }

    /// `[x, y, z]` workgroups: N in tiles, M in tiles, the batch.
    fn grid(&self, g: &Gemm) -> [usize; 3] {
        let [rows, cols] = self.extents();
        [
            g.n.div_ceil(cols as usize),
            g.m.div_ceil(rows as usize),
            g.batch,
        ]
    }
}

/// The tile extent for a matrix dimension of `len`: the power of two that covers it, within
/// [`MIN_TILE`]`..=widest`.
fn tile_extent(len: usize, widest: u32) -> u32 {
    let len = len.min(widest as usize) as u32;
    len.next_power_of_two().clamp(MIN_TILE, widest)
}

/// Workgroups of a grid with tiles of `extents` rows and columns.
fn workgroups(g: &Gemm, [rows, cols]: [u32; 2]) -> usize {
    g.m.div_ceil(rows as usize) * g.n.div_ceil(cols as usize) * g.batch
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

/// The tiles of `g` and into how many parts its K splits (1: not at all). Only a single
/// product into a whole, dense C with no bias splits (`unsplittable` says otherwise).
fn split_plan(g: &Gemm, unsplittable: bool, cpu: bool) -> (Tiles, usize) {
    let tiles = Tiles::choose(g, cpu);
    if g.batch != 1 || unsplittable {
        return (tiles, 1);
    }
    (tiles, split_count(g, tiles, cpu))
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

/// K split into `splits` parts of whole K steps: (part length, parts).
fn split_parts(k: usize, splits: usize) -> (usize, usize) {
    let part = k.div_ceil(splits).next_multiple_of(TILE_K as usize);
    (part, k.div_ceil(part))
}

/// Into how many parts to split K (1: not at all) so that the grid fills the device, each
/// part at least [`MIN_SPLIT_STEPS`] K steps long.
fn split_count(g: &Gemm, tiles: Tiles, cpu: bool) -> usize {
    let groups = workgroups(g, tiles.extents());
    let wanted = if cpu {
        (2 * cpu_cores()).div_ceil(groups)
    } else {
        let threads = groups * tiles.threads.iter().product::<u32>() as usize;
        GPU_MIN_THREADS.div_ceil(threads)
    };
    let deepest = g.k / (MIN_SPLIT_STEPS * TILE_K as usize);
    wanted.min(deepest).clamp(1, MAX_SPLITS)
}

/// The cores a CPU adapter runs on, read once: `available_parallelism` reads the cgroup's
/// files on every call, which for a 7B model's plan (thousands of products) took seconds.
fn cpu_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
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

/// [`launch`] with the tiled kernel (workgroup-memory tiles of `tiles`), on any device.
#[allow(clippy::too_many_arguments)]
fn launch_tiled(
    rec: &mut Recorder,
    g: &Gemm,
    tiles: Tiles,
    k_split: usize,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    c: &Tensor,
) {
    let kernel = GemmKernel {
        entries: [&GEMM, &GEMM_BIAS],
        overrides: &tiles.overrides(g, b.dtype()),
        grid: tiles.grid(g),
        extra: Vec::new(),
    };
    dispatch(rec, g, &kernel, &Params::new(g, k_split), [a, b, c], bias);
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

/// Rows of `t` as a matrix with `cols` columns (all leading dimensions flattened).
fn rows_of(what: &str, t: &Tensor, cols: usize) -> usize {
    assert_eq!(
        t.shape().last(),
        cols,
        "matmul: {what} {t:?} must have {cols} columns"
    );
    t.shape().rows()
}

/// The rows `op`'s two activations share: `(name, tensor, columns)` each.
fn shared_rows(op: &str, a: (&str, &Tensor, usize), b: (&str, &Tensor, usize)) -> usize {
    let ((a_name, a, a_cols), (b_name, b, b_cols)) = (a, b);
    let rows = rows_of(a_name, a, a_cols);
    assert_eq!(
        rows_of(b_name, b, b_cols),
        rows,
        "{op}: {a_name} {a:?} and {b_name} {b:?} differ in rows"
    );
    rows
}

/// `(N, K)` of a weight `[N, K]`.
fn weight_dims(w: &Tensor) -> (usize, usize) {
    assert_eq!(w.shape().rank(), 2, "matmul: weight {w:?} must be [N, K]");
    (w.dims()[0], w.dims()[1])
}

/// `Y = alpha·X·Wᵀ (+ bias) (+ Y)`: `x [.., K]`, `w [N, K]` (f32, f16 or bf16), `bias [N]`,
/// `y [.., N]`.
pub fn matmul_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    options: MatmulOptions,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_forward", ("x", x, k), ("y", y, n));
    if let Some(bias) = bias {
        assert_eq!(
            bias.numel(),
            n,
            "matmul_forward: bias {bias:?} must have {n} elements"
        );
    }
    gemm(
        rec,
        &Gemm::dense(m, n, k, false, true).with(options),
        x,
        w,
        bias,
        y,
    );
}

/// `dX = alpha·dY·W` (or `+=`): `dy [.., N]`, `w [N, K]` (f32, f16 or bf16),
/// `dx [.., K]`.
pub fn matmul_backward_input(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    options: MatmulOptions,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_backward_input", ("dy", dy, n), ("dx", dx, k));
    gemm(
        rec,
        &Gemm::dense(m, k, n, false, false).with(options),
        dy,
        w,
        None,
        dx,
    );
}

/// A LoRA adapter's two matrices beside a weight `W [N, K]`: `a [r, K]`, `b [N, r]`, and the
/// scale `alpha / r`; its path adds `scale·(u·Aᵀ)·Bᵀ` to the layer's output.
#[derive(Debug, Clone, Copy)]
pub struct LoraPair<'t> {
    /// `A [r, K]`.
    pub a: &'t Tensor,
    /// `B [N, r]`.
    pub b: &'t Tensor,
    /// `alpha / r`.
    pub scale: f32,
}

/// `Y = X·Wᵀ (+ bias) + scale·H·Bᵀ`: a projection and its LoRA path's up product, `h [.., r]`
/// the path's hidden `u·Aᵀ` (with [`gemm_plus`]: one product where the device runs both).
pub fn matmul_forward_lora(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &LoraPair,
    h: &Tensor,
    y: &Tensor,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_forward_lora", ("x", x, k), ("y", y, n));
    let r = lora.b.dims()[1];
    assert_eq!(
        (lora.b.dims(), rows_of("h", h, r)),
        (&[n, r][..], m),
        "matmul_forward_lora: B {:?} and h {h:?} must be [{n}, r] and [{m}, r]",
        lora.b
    );
    let second = Second {
        a: (h, Strided::dense(m, r)),
        b: (lora.b, Strided::dense(n, r)),
        k: r,
        alpha: lora.scale,
    };
    let base = Gemm::dense(m, n, k, false, true);
    gemm_plus(rec, &base, x, w, bias, &second, y);
}

/// `dX = dY·W + dH·A` (or `+=`): a projection's input gradient and its LoRA path's (without
/// dropout), `dh [.., r]` the gradient at the path's hidden, `a [r, K]` its down matrix.
pub fn matmul_backward_input_lora(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dh: &Tensor,
    lora_a: &Tensor,
    dx: &Tensor,
    write: Write,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_backward_input_lora", ("dy", dy, n), ("dx", dx, k));
    let r = lora_a.dims()[0];
    assert_eq!(
        (lora_a.dims(), rows_of("dh", dh, r)),
        (&[r, k][..], m),
        "matmul_backward_input_lora: A {lora_a:?} and dh {dh:?} must be [r, {k}] and [{m}, r]"
    );
    let second = Second {
        a: (dh, Strided::dense(m, r)),
        b: (lora_a, Strided::dense(r, k)),
        k: r,
        alpha: 1.0,
    };
    let base = Gemm::dense(m, k, n, false, false).with(MatmulOptions::writing(write));
    gemm_plus(rec, &base, dy, w, None, &second, dx);
}

/// `dW = alpha·dYᵀ·X` (or `+=`, as parameter gradients do): `dy [.., N]`, `x [.., K]`,
/// `dw [N, K]`, all f32 (a weight stored in 16 bits is frozen: it has no
/// gradient).
pub fn matmul_backward_weight(
    rec: &mut Recorder,
    dy: &Tensor,
    x: &Tensor,
    dw: &Tensor,
    options: MatmulOptions,
) {
    for (name, t) in [("dy", dy), ("x", x), ("dw", dw)] {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "matmul_backward_weight: {name} {t:?} must be f32 (16-bit weights are frozen)"
        );
    }
    let (n, k) = weight_dims(dw);
    let m = shared_rows("matmul_backward_weight", ("dy", dy, n), ("x", x, k));
    gemm(
        rec,
        &Gemm::dense(n, k, m, true, false).with(options),
        dy,
        x,
        None,
        dw,
    );
}

/// `db = Σ_rows dY` (or `+=`): `dy [.., N]`, `db [N]`. The bias is not scaled by alpha in the
/// forward, so its gradient has no alpha either.
pub fn matmul_backward_bias(rec: &mut Recorder, dy: &Tensor, db: &Tensor, write: Write) {
    assert_eq!(
        dy.shape().last(),
        db.numel(),
        "matmul_backward_bias: dy {dy:?} and db {db:?} differ in columns"
    );
    reduce::sum_rows(rec, dy, db, write);
}

/// CPU f64 references. Matrices are row-major slices; `alpha` scales the product as in
/// [`MatmulOptions`]. Gradients are returned, not accumulated.
pub mod reference {
    use super::Gemm;

    /// [`super::gemm`] on host slices: updates `c` in place, leaving elements outside the
    /// product untouched.
    pub fn gemm(g: &Gemm, a: &[f64], b: &[f64], bias: Option<&[f64]>, c: &mut [f64]) {
        let at = |s: &super::Strided, batch: usize, row: usize, col: usize, transposed: bool| {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{download, f64s, gpu, poisoned, randn, rel_error, upload};

    fn extents_chosen(m: usize, n: usize, cpu: bool) -> [u32; 2] {
        Tiles::choose(&Gemm::dense(m, n, 64, false, true), cpu).extents()
    }

    #[test]
    fn tiles_fit_narrow_matrices_and_small_gpu_grids_shrink_or_split() {
        // The CPU adapter: as narrow as the matrix, at most 64.
        assert_eq!(extents_chosen(592, 16, true), [64, 16]);
        assert_eq!(extents_chosen(16, 64, true), [16, 64]);
        assert_eq!(extents_chosen(592, 172, true), [64, 64]);
        assert_eq!(extents_chosen(1, 1, true), [16, 16]);
        // A GPU: 128×128 while the grid stays large, smaller tiles for small grids.
        assert_eq!(extents_chosen(512, 4864, false), [128, 128]);
        assert_eq!(extents_chosen(512, 1024, false), [64, 64]);
        assert_eq!(extents_chosen(16, 4096, false), [16, 32]);
        assert_eq!(extents_chosen(1, 1, false), [16, 16]);
        // A LoRA weight gradient of an 8B model on a GPU: 128 workgroups of 32 threads, so K
        // (4096 tokens) splits into 8 parts; an ample grid does not split.
        let lora = Gemm::dense(16, 4096, 4096, true, false);
        assert_eq!(split_count(&lora, Tiles::choose(&lora, false), false), 8);
        let big = Gemm::dense(512, 4864, 896, false, true);
        assert_eq!(split_count(&big, Tiles::choose(&big, false), false), 1);
        for extent in [16, 32, 64, 128] {
            let tiles = Tiles::with_extents([extent, extent]);
            assert_eq!(tiles.extents(), [extent, extent]);
            assert!(tiles.threads.iter().product::<u32>() <= 256, "{tiles:?}");
        }
    }

    #[test]
    fn split_k_matches_the_reference_and_accumulates() {
        let gpu = gpu();
        // LoRA's weight-gradient layout (Aᵀ·B), K = 203 in parts of 48, 48, 48, 48 and 11.
        let (m, n, k) = (16, 37, 203);
        let g = Gemm::dense(m, n, k, true, false).with(MatmulOptions::accumulate().scaled(-0.5));
        let (a, b, init) = (
            randn(4, m * k, 1.0),
            randn(5, k * n, 1.0),
            randn(6, m * n, 1.0),
        );
        let (ta, tb) = (upload(gpu, [k, m], &a), upload(gpu, [k, n], &b));
        let run = || {
            let c = upload(gpu, [m, n], &init);
            let mut rec = Recorder::new(gpu);
            let tiles = Tiles::choose(&g, true);
            launch_split(&mut rec, &g, tiles, 5, &ta, &tb, &c);
            rec.finish().unwrap();
            download(gpu, &c)
        };
        let mut want = f64s(&init);
        reference::gemm(&g, &f64s(&a), &f64s(&b), None, &mut want);
        let out = run();
        assert!(rel_error(&out, &want) < 1e-5, "{}", rel_error(&out, &want));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&run()));
    }

    /// Every tile configuration the chooser can pick computes the same bits: each output sums
    /// over k in order whatever the tiles, so the choice never changes results.
    #[test]
    fn every_tile_configuration_gives_the_same_bits() {
        let gpu = gpu();
        let (batch, m, n, k) = (2, 37, 29, 53);
        // Transposed operands, a broadcast B, a batch, alpha and a bias: every path at once.
        let g = Gemm {
            batch,
            b: Strided::broadcast(k),
            ..Gemm::dense(m, n, k, true, true)
        }
        .with(MatmulOptions::default().scaled(0.5));
        let (a, b, bias) = (
            randn(1, batch * m * k, 1.0),
            randn(2, n * k, 1.0),
            randn(3, n, 1.0),
        );
        let (ta, tb, tbias) = (
            upload(gpu, [batch * m * k], &a),
            upload(gpu, [n * k], &b),
            upload(gpu, [n], &bias),
        );
        let mut want = vec![0.0; batch * m * n];
        reference::gemm(&g, &f64s(&a), &f64s(&b), Some(&f64s(&bias)), &mut want);

        // Each extent along each dimension, and each block shape.
        let configurations = [[16, 128], [32, 64], [64, 32], [128, 16], [128, 128]];
        let mut first_bits = None;
        for extents in configurations {
            let tiles = Tiles::with_extents(extents);
            let c = poisoned(gpu, [batch * m * n]);
            let mut rec = Recorder::new(gpu);
            launch_tiled(&mut rec, &g, tiles, 0, &ta, &tb, Some(&tbias), &c);
            rec.finish().unwrap();
            let out = download(gpu, &c);
            assert!(rel_error(&out, &want) < 1e-5, "{tiles:?}");
            let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                &bits,
                first_bits.get_or_insert_with(|| bits.clone()),
                "{tiles:?}"
            );
        }
    }
}
