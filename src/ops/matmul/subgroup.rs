//! The GEMM for CPU adapters whose subgroups are 8 lanes of one SIMD vector (lavapipe):
//! `shaders/matmul_subgroup.wgsl`, no workgroup memory, A shared between lanes by
//! `subgroupShuffle`, a 16- or 32-row block of C per lane in registers. Same operands,
//! options and results (bit for bit) as the tiled kernel, 16-bit B included; it runs where every
//! vec4 it reads is aligned, and the tiled kernel runs everywhere else.

use super::{dispatch, Gemm, GemmKernel, Params};
use crate::gpu::{read, read_write, DType, Gpu, KernelSpec, Recorder, Shader, Tensor};
use crate::ops::common::wgsl_format;
use crate::shader;

static SHADER: Shader = shader!("matmul_subgroup");

static GEMM: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "gemm_subgroup",
    bindings: &[read(1), read(2), read_write(4), read(5), read(6)],
};
static GEMM_BIAS: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "gemm_subgroup_bias",
    bindings: &[read(1), read(2), read(3), read_write(4), read(5), read(6)],
};

/// Lanes of a subgroup the kernel is written for (one 256-bit vector of f32).
const LANES: u32 = 8;
/// Columns of C one workgroup (one subgroup) computes: 8 per lane.
const COLUMNS_PER_WORKGROUP: u32 = 64;
/// Elements of one vec4 load.
const VEC: usize = 4;
/// Bytes of B one slice of K reads (B stored `[K, N]`): what stays in a core's L2 cache while
/// every row block of C passes over it. Each row block reads B a row segment at a time, and
/// with B larger than the cache those strided reads go to memory: 75×896×37440 ran at
/// 11 GFLOP/s whole and 36 GFLOP/s with K = 512.
const SLICE_BYTES: usize = 1 << 20;
/// Fewer steps of K than this per slice cost more in reading and writing C than the cache
/// saves (N = 4864, 52 rows per slice, measured slower than no slices).
const MIN_SLICE_DEPTH: usize = 256;

/// The kernel's tile: `8·eights` rows of C per workgroup (one subgroup), 64 columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LaneTiles {
    /// Rows per lane, in eights (2 or 4).
    eights: u32,
}

impl LaneTiles {
    /// 32 rows where M has them (more multiply-adds per B load), else 16.
    fn choose(g: &Gemm) -> LaneTiles {
        let eights = if g.m >= 64 { 4 } else { 2 };
        LaneTiles { eights }
    }

    /// `[rows, cols]` of C per workgroup.
    pub(super) fn extents(&self) -> [u32; 2] {
        [8 * self.eights, COLUMNS_PER_WORKGROUP]
    }
}

/// Whether `gpu` runs this kernel as written: a CPU adapter with subgroups of exactly 8 lanes
/// (so that a workgroup's 8 invocations are one subgroup).
pub(super) fn device_fits(gpu: &Gpu) -> bool {
    let info = gpu.info();
    info.device_type == wgpu::DeviceType::Cpu
        && gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == LANES
        && info.subgroup_max_size == LANES
}

/// The tiles for `g` (K in parts of `k_split`, or 0) if this kernel can
/// run it: every vec4 it reads aligned and inside its tensor (B is read 16 bytes at a time:
/// 4 f32 or 8 f16 or bf16 elements).
pub(super) fn tiles_for(g: &Gemm, k_split: usize, a: &Tensor, b: &Tensor) -> Option<LaneTiles> {
    let aligned = |v: usize| v % VEC == 0;
    // A split K's batch entries are parts of one product: A and B are read as one matrix.
    let batch = if k_split > 0 { 1 } else { g.batch };
    let operand_fits = |s: &super::Strided, tensor: &Tensor, rows: usize, cols: usize| {
        // Rows as stored, each read in vec4s up to `cols` rounded up to a whole vec4, from
        // 16-byte words that must lie wholly inside the tensor.
        let end = s.offset
            + (batch - 1) * s.batch_stride
            + (rows - 1) * s.row_stride
            + cols.next_multiple_of(VEC);
        let per_word = 16 / tensor.dtype().size_bytes();
        [s.offset, s.row_stride, s.batch_stride]
            .into_iter()
            .all(aligned)
            && end.next_multiple_of(per_word) <= tensor.numel() / per_word * per_word
    };
    // A stored [K, M] is read along M, [M, K] along K (the k tail is masked); likewise B.
    let a_fits = if g.transpose_a {
        aligned(g.m) && operand_fits(&g.a, a, g.k, g.m)
    } else {
        operand_fits(&g.a, a, g.m, g.k)
    };
    let b_fits = if g.transpose_b {
        operand_fits(&g.b, b, g.n, g.k)
    } else {
        aligned(g.n) && operand_fits(&g.b, b, g.k, g.n)
    };
    let b_typed = super::B_DTYPES.contains(&b.dtype());
    (b_typed && g.k > 0 && aligned(k_split) && a_fits && b_fits).then(|| LaneTiles::choose(g))
}

/// Records a checked `g` on `[a, b, c]` with `tiles` (K split into parts of `k_split` as in
/// [`super::launch`]), in slices of K where B is large (see [`k_slices`]), and `second`, a
/// product `(g2, a2, b2)` of [`super::gemm_plus`] summed into the same outputs.
pub(super) fn launch(
    rec: &mut Recorder,
    g: &Gemm,
    tiles: LaneTiles,
    k_split: usize,
    [a, b, c]: [&Tensor; 3],
    bias: Option<&Tensor>,
    second: Option<(&Gemm, &Tensor, &Tensor)>,
) {
    let [rows, cols] = tiles.extents();
    let overrides = [
        ("TRANSPOSE_A", u32::from(g.transpose_a)),
        ("TRANSPOSE_B", u32::from(g.transpose_b)),
        ("B_FORMAT", wgsl_format(b.dtype())),
        ("EIGHTS", tiles.eights),
        ("SECOND", u32::from(second.is_some())),
    ];
    let kernel = GemmKernel {
        entries: [&GEMM, &GEMM_BIAS],
        overrides: &overrides,
        // Row blocks first: see the shader.
        grid: [
            g.m.div_ceil(rows as usize),
            g.n.div_ceil(cols as usize),
            g.batch,
        ],
        // Without a second product its bindings take A and B again, unread.
        extra: second.map_or(vec![a, b], |(_, a2, b2)| vec![a2, b2]),
    };
    for (slice, first) in k_slices(g, k_split, b.dtype()) {
        let mut params = Params::new(&slice, k_split);
        if let (true, Some((g2, _, _))) = (first, second) {
            params = params.with_second(g2);
        }
        let bias = bias.filter(|_| first);
        dispatch(rec, &slice, &kernel, &params, [a, b, c], bias);
    }
}

/// `g` as products over consecutive ranges of K, each `(product, first)`: the first writes C
/// as `g` says (with its bias), the others add to it. K is sliced only where B is stored
/// `[K, N]` and is larger than [`SLICE_BYTES`], and only when K is not split into parts.
fn k_slices(g: &Gemm, k_split: usize, b_dtype: DType) -> Vec<(Gemm, bool)> {
    let row_bytes = g.n * b_dtype.size_bytes();
    let depth = SLICE_BYTES / row_bytes / VEC * VEC;
    if g.transpose_b || k_split > 0 || g.k <= depth || depth < MIN_SLICE_DEPTH {
        return vec![(*g, true)];
    }
    (0..g.k)
        .step_by(depth)
        .map(|k0| (g.k_range(k0, (k0 + depth).min(g.k)), k0 == 0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tiled::{launch_tiled, Tiles};
    use super::super::{gemm_plus, reference, MatmulOptions, Second, Strided};
    use super::*;
    use crate::testing::{
        download, f64s, gpu, narrow_weights, poisoned, randn, rel_error, rel_error_f64, round_to,
        upload, upload_as,
    };

    /// Operands of one test product, with A's and B's rows padded to `pad` more elements that
    /// hold NaN: a vec4 that reads past K must mask them, not add them. B is uploaded as
    /// `b_dtype`, its values representable there.
    struct Case {
        g: Gemm,
        a: Vec<f32>,
        b: Vec<f32>,
        b_dtype: DType,
        bias: Vec<f32>,
        c: Vec<f32>,
    }

    impl Case {
        fn new(g: Gemm, seed: u64) -> Case {
            let extent = |s: &Strided, rows: usize, cols: usize, batch: usize| {
                s.offset + (batch.max(1) - 1) * s.batch_stride + rows * s.row_stride + cols
            };
            let [a_dims, b_dims, _] = g.stored();
            let padded = |s: &Strided, (rows, cols): (usize, usize), batch: usize, seed: u64| {
                let len = extent(s, rows, cols, batch);
                let values = randn(seed, len, 1.0);
                (0..len)
                    .map(|i| {
                        let col = (i - s.offset.min(i)) % s.row_stride;
                        if col < cols {
                            values[i]
                        } else {
                            f32::NAN
                        }
                    })
                    .collect::<Vec<f32>>()
            };
            let b_batch = if g.b.batch_stride == 0 { 1 } else { g.batch };
            Case {
                a: padded(&g.a, a_dims, g.batch, seed),
                b: padded(&g.b, b_dims, b_batch, seed + 1),
                b_dtype: DType::F32,
                bias: randn(seed + 2, g.n, 1.0),
                c: randn(seed + 3, g.batch * g.m * g.n, 1.0),
                g,
            }
        }

        /// The same with B rounded to `dtype` (f32, f16 or bf16) and uploaded as it.
        fn with_b(self, dtype: DType) -> Case {
            Case {
                b: round_to(dtype, &self.b),
                b_dtype: dtype,
                ..self
            }
        }

        /// C from the subgroup kernel (checked to take it) and from the tiled kernel.
        fn run_both(&self) -> (Vec<f32>, Vec<f32>) {
            let gpu = gpu();
            let g = &self.g;
            let (a, b) = (
                upload(gpu, [self.a.len()], &self.a),
                upload_as(gpu, [self.b.len()], self.b_dtype, &self.b),
            );
            let bias = upload(gpu, [g.n], &self.bias);
            let tiles = tiles_for(g, 0, &a, &b)
                .unwrap_or_else(|| panic!("{g:?} must take the subgroup kernel"));
            let run = |subgroup_kernel: bool| {
                let c = if g.options.write.accumulates() {
                    upload(gpu, [self.c.len()], &self.c)
                } else {
                    poisoned(gpu, [self.c.len()])
                };
                let mut rec = Recorder::new(gpu);
                if subgroup_kernel {
                    launch(&mut rec, g, tiles, 0, [&a, &b, &c], Some(&bias), None);
                } else {
                    launch_tiled(
                        &mut rec,
                        g,
                        Tiles::choose(g, true),
                        0,
                        &a,
                        &b,
                        Some(&bias),
                        &c,
                    );
                }
                rec.finish().expect("gemm runs");
                download(gpu, &c)
            };
            (run(true), run(false))
        }

        fn reference(&self) -> Vec<f64> {
            let mut want = f64s(&self.c);
            reference::gemm(
                &self.g,
                &f64s(&self.a),
                &f64s(&self.b),
                Some(&f64s(&self.bias)),
                &mut want,
            );
            want
        }
    }

    /// Whether the subgroup kernel runs on `gpu`; where it does not, asserts that the adapter
    /// really lacks what it is written for (a CPU adapter with 8-lane subgroups), so that a
    /// lavapipe, where CI runs, can never skip these tests.
    fn runs_here(gpu: &Gpu) -> bool {
        let info = gpu.info();
        let fits = device_fits(gpu);
        assert!(
            fits || info.device_type != wgpu::DeviceType::Cpu
                || info.subgroup_min_size != LANES
                || info.subgroup_max_size != LANES,
            "{info:?} has 8-lane subgroups but the subgroup kernel is not used"
        );
        fits
    }

    /// Asserts that `a` and `b` hold the same bits, naming the first element that differs.
    fn assert_same_bits(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let differing = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        let first = a
            .iter()
            .zip(b)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(
            differing, 0,
            "{what}: {differing} elements differ, the first at {first:?}"
        );
    }

    /// A batched product of odd sizes in `layout`, rows padded to a multiple of 4 plus 4.
    fn padded_product(m: usize, n: usize, k: usize, (ta, tb): (bool, bool)) -> Gemm {
        let padded = |cols: usize| cols.next_multiple_of(4) + 4;
        let strided = |rows: usize, cols: usize| Strided {
            offset: 8,
            row_stride: padded(cols),
            batch_stride: rows * padded(cols),
        };
        let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
        Gemm {
            batch: 2,
            a: strided(a_rows, a_cols),
            // One B for both batch entries.
            b: Strided {
                batch_stride: 0,
                ..strided(b_rows, b_cols)
            },
            ..Gemm::dense(m, n, k, ta, tb)
        }
    }

    /// On a device with 8-lane subgroups (lavapipe, where CI runs), the subgroup kernel gives
    /// the f64 reference's values and the tiled kernel's bits in every layout, with a batch, a
    /// broadcast B, alpha, a bias, accumulation and a masked k tail (elsewhere it is never
    /// chosen: see `runs_here`).
    #[test]
    fn the_subgroup_kernel_matches_the_reference_and_the_tiled_kernel_bit_for_bit() {
        let gpu = gpu();
        if !runs_here(gpu) {
            return;
        }
        // M a multiple of 4 where A is stored [K, M], N where B is stored [K, N] (the vec4s
        // run along them); every other size odd, K's tail inside a vec4.
        // B in f32 and in the 16-bit types of frozen weights (their elements counted as
        // 2 bytes in the alignment rules).
        for b_dtype in [DType::F32, DType::F16, DType::BF16] {
            for (layout, (m, n, k)) in [
                ((false, true), (37, 29, 53)),
                ((false, false), (37, 28, 52)),
                ((true, true), (36, 29, 53)),
                ((true, false), (76, 92, 45)),
            ] {
                for options in [
                    MatmulOptions::overwrite(),
                    MatmulOptions::accumulate().scaled(-0.5),
                ] {
                    let g = padded_product(m, n, k, layout).with(options);
                    let case = Case::new(g, 7).with_b(b_dtype);
                    let (subgroup, tiled) = case.run_both();
                    let what = format!("{b_dtype} B {layout:?} {options:?}");
                    let err = rel_error(&subgroup, &case.reference());
                    assert!(err < 1e-5, "{what}: {err}");
                    assert_same_bits(&subgroup, &tiled, &what);
                }
            }
        }
    }

    /// 16-bit B (frozen weights in f16 or bf16, f16's subnormals among them) gives the
    /// reference's values, and the bits of f32 B holding the same values and of the tiled
    /// kernel reading the same 16-bit B, in both of B's layouts.
    #[test]
    fn sixteen_bit_b_gives_the_bits_of_f32_b_and_of_the_tiled_kernel() {
        let gpu = gpu();
        if !runs_here(gpu) {
            return;
        }
        for dtype in [DType::F16, DType::BF16] {
            for (layout, (m, n, k)) in [
                ((false, true), (37, 30, 52)),
                ((false, false), (37, 28, 52)),
            ] {
                let g = Gemm::dense(m, n, k, layout.0, layout.1);
                let values = narrow_weights(dtype, 21, k * n);
                let b16 = upload_as(gpu, [k * n], dtype, &values);
                let a_values = randn(22, m * k, 1.0);
                let a = upload(gpu, [m * k], &a_values);
                let b32 = upload(gpu, [k * n], &values);
                let run = |b: &Tensor, subgroup_kernel: bool| {
                    let c = poisoned(gpu, [m * n]);
                    let mut rec = Recorder::new(gpu);
                    if subgroup_kernel {
                        let tiles = tiles_for(&g, 0, &a, b).expect("subgroup kernel");
                        launch(&mut rec, &g, tiles, 0, [&a, b, &c], None, None);
                    } else {
                        launch_tiled(&mut rec, &g, Tiles::choose(&g, true), 0, &a, b, None, &c);
                    }
                    rec.finish().expect("gemm runs");
                    download(gpu, &c)
                };
                let what = format!("{dtype} B {layout:?}");
                let narrow_subgroup = run(&b16, true);
                let mut want = vec![0.0; m * n];
                reference::gemm(&g, &f64s(&a_values), &f64s(&values), None, &mut want);
                let err = rel_error(&narrow_subgroup, &want);
                assert!(err < 1e-5, "{what}: {err}");
                eprintln!("subgroup kernel, {what}: relative error {err:.2e}");
                let f32_b = run(&b32, true);
                assert_same_bits(&narrow_subgroup, &f32_b, &format!("{what} vs f32 B"));
                let tiled = run(&b16, false);
                assert_same_bits(&narrow_subgroup, &tiled, &format!("{what} vs tiled"));
                let tiled_f32_b = run(&b32, false);
                assert_same_bits(&tiled, &tiled_f32_b, &format!("{what} tiled vs f32 B"));
            }
        }
    }

    /// `gemm_plus` (a LoRA path's product summed into the projection's outputs in the same
    /// dispatch) matches the f64 reference and the two products run one after the other, in
    /// the forward's layout (with a bias) and the input gradient's (accumulating), and with a
    /// scaled first product, which the kernel leaves to two dispatches.
    #[test]
    fn a_second_product_rides_along_with_the_first() {
        let gpu = gpu();
        let (m, k, r) = (37, 52, 16);
        for (n, transpose_b, options, with_bias) in [
            (29, true, MatmulOptions::overwrite(), true),
            (28, false, MatmulOptions::accumulate(), false),
            // A scaled first product: the two run one after the other.
            (29, true, MatmulOptions::overwrite().scaled(0.5), true),
        ] {
            let g = Gemm::dense(m, n, k, false, transpose_b).with(options);
            let (b_rows, b_cols) = if transpose_b { (n, r) } else { (r, n) };
            let values = |seed: u64, len: usize| randn(seed, len, 1.0);
            let (a, b, bias, c0) = (
                values(31, m * k),
                values(32, k * n),
                values(33, n),
                values(34, m * n),
            );
            let (a2, b2) = (values(35, m * r), values(36, r * n));
            let t = |v: &[f32]| upload(gpu, [v.len()], v);
            let (ta, tb, tbias, ta2, tb2) = (t(&a), t(&b), t(&bias), t(&a2), t(&b2));
            let second = Second {
                a: (&ta2, Strided::dense(m, r)),
                b: (&tb2, Strided::dense(b_rows, b_cols)),
                k: r,
                alpha: 0.25,
            };
            let bias_t = with_bias.then_some(&tbias);
            if runs_here(gpu) {
                assert!(tiles_for(&second.as_gemm(&g), 0, &ta2, &tb2).is_some());
                assert!(tiles_for(&g, 0, &ta, &tb).is_some());
            }
            let run = |fused: bool| {
                let c = t(&c0);
                let mut rec = Recorder::new(gpu);
                if fused {
                    gemm_plus(&mut rec, &g, &ta, &tb, bias_t, &second, &c);
                } else {
                    super::super::gemm(&mut rec, &g, &ta, &tb, bias_t, &c);
                    let g2 = second.as_gemm(&g);
                    super::super::gemm(&mut rec, &g2, &ta2, &tb2, None, &c);
                }
                rec.finish().expect("gemm runs");
                download(gpu, &c)
            };
            let mut want = f64s(&c0);
            let bias64 = f64s(&bias);
            reference::gemm(
                &g,
                &f64s(&a),
                &f64s(&b),
                with_bias.then_some(&bias64[..]),
                &mut want,
            );
            let g2 = second.as_gemm(&g);
            reference::gemm(&g2, &f64s(&a2), &f64s(&b2), None, &mut want);
            let (fused, apart) = (run(true), run(false));
            let what = format!("transpose_b {transpose_b}");
            assert!(
                rel_error(&fused, &want) < 1e-5,
                "{what}: {}",
                rel_error(&fused, &want)
            );
            assert!(rel_error(&apart, &want) < 1e-5, "{what}");
            assert!(rel_error(&fused, &f64s(&apart)) < 1e-6, "{what}");
        }
    }

    /// A split K (parts summed side by side) and a sliced K (slices added in turn, B stored
    /// [K, N] larger than a slice) both give the reference's values.
    #[test]
    fn split_and_sliced_k_match_the_reference() {
        let gpu = gpu();
        if !runs_here(gpu) {
            return;
        }
        // Sliced: 9400 rows of 28 columns of B is more than SLICE_BYTES in f32. bf16's slices
        // count its 2-byte elements, so they are twice as deep: 20000 rows of bf16 B take 2
        // slices where f32 B would take 3.
        for (k, b_dtype, slices) in [(9400, DType::F32, 2), (20_000, DType::BF16, 2)] {
            let sliced = Gemm::dense(9, 28, k, false, false).with(MatmulOptions::accumulate());
            let counts = [b_dtype, DType::F32].map(|t| k_slices(&sliced, 0, t).len());
            assert_eq!(counts, [slices, k.div_ceil(9360)], "{b_dtype}");
            let case = Case::new(sliced, 11).with_b(b_dtype);
            let (subgroup, tiled) = case.run_both();
            let want = case.reference();
            let err = rel_error(&subgroup, &want);
            assert!(err < 1e-5, "sliced {b_dtype}: {err}");
            assert!(rel_error(&tiled, &want) < 1e-5, "tiled {b_dtype}");
        }

        // Split into parts of 48: each part's product is the tiled kernel's, bit for bit.
        let (m, n, k, part) = (16, 36, 203, 48);
        let g = Gemm::dense(m, n, k, true, false);
        let parts = Gemm {
            batch: k.div_ceil(part),
            c: Strided::dense(m, n),
            ..g
        };
        let (a, b) = (randn(4, m * k, 1.0), randn(5, k * n, 1.0));
        let (ta, tb) = (upload(gpu, [k, m], &a), upload(gpu, [k, n], &b));
        let tiles = tiles_for(&parts, part, &ta, &tb).expect("subgroup kernel");
        let run = |subgroup_kernel: bool| {
            let c = poisoned(gpu, [parts.batch * m * n]);
            let mut rec = Recorder::new(gpu);
            if subgroup_kernel {
                launch(&mut rec, &parts, tiles, part, [&ta, &tb, &c], None, None);
            } else {
                launch_tiled(
                    &mut rec,
                    &parts,
                    Tiles::choose(&g, true),
                    part,
                    &ta,
                    &tb,
                    None,
                    &c,
                );
            }
            rec.finish().expect("gemm runs");
            download(gpu, &c)
        };
        let (subgroup, tiled) = (run(true), run(false));
        assert_same_bits(&subgroup, &tiled, "split K");
        let sum: Vec<f64> = (0..m * n)
            .map(|i| {
                (0..parts.batch)
                    .map(|p| f64::from(subgroup[p * m * n + i]))
                    .sum()
            })
            .collect();
        let mut want = vec![0.0; m * n];
        reference::gemm(&g, &f64s(&a), &f64s(&b), None, &mut want);
        assert!(rel_error_f64(&sum, &want) < 1e-5);
    }

    /// Operands whose vec4s would be misaligned or run past the tensor take the tiled kernel.
    #[test]
    fn unaligned_operands_are_left_to_the_tiled_kernel() {
        let gpu = gpu();
        let t = |len: usize| upload(gpu, [len], &vec![0.0; len]);
        let ok = Gemm::dense(8, 8, 8, false, true);
        assert!(tiles_for(&ok, 0, &t(64), &t(64)).is_some());
        // 16-bit B is read 8 elements to a 16-byte word: B [15, 4] (60 elements) fits a
        // tensor of 60 f32, but 60 f16 or bf16 end halfway through a word the kernel would
        // read whole; 64 of them hold it. u32 is no type B takes.
        let b_15x4 = Gemm::dense(8, 15, 4, false, true);
        assert!(tiles_for(&b_15x4, 0, &t(32), &t(60)).is_some());
        for dtype in [DType::F16, DType::BF16] {
            let narrow = |len: usize| Tensor::empty(gpu, [len], dtype);
            assert!(tiles_for(&ok, 0, &t(64), &narrow(64)).is_some(), "{dtype}");
            let fits = |len: usize| tiles_for(&b_15x4, 0, &t(32), &narrow(len)).is_some();
            assert_eq!((fits(60), fits(64)), (false, true), "{dtype}");
        }
        let ids = Tensor::empty(gpu, [64], DType::U32);
        assert!(tiles_for(&ok, 0, &t(64), &ids).is_none());
        // K = 7: rows of A and B start off a vec4.
        let odd_k = Gemm::dense(8, 8, 7, false, true);
        assert!(tiles_for(&odd_k, 0, &t(56), &t(56)).is_none());
        // B stored [K, N] with N = 6, A stored [K, M] with M = 6.
        let odd_n = Gemm::dense(8, 6, 8, false, false);
        assert!(tiles_for(&odd_n, 0, &t(64), &t(48)).is_none());
        let odd_m = Gemm::dense(6, 8, 8, true, true);
        assert!(tiles_for(&odd_m, 0, &t(48), &t(64)).is_none());
        // An offset of 2 elements.
        let shifted = Gemm {
            a: Strided::dense(8, 8).at(2),
            ..ok
        };
        assert!(tiles_for(&shifted, 0, &t(66), &t(64)).is_none());
        // The last row's k tail (a whole vec4 read) would pass the end of A.
        let rows_of_8 = Strided {
            offset: 0,
            row_stride: 8,
            batch_stride: 0,
        };
        let tail = Gemm {
            a: rows_of_8,
            b: rows_of_8,
            ..Gemm::dense(8, 8, 5, false, true)
        };
        assert!(tiles_for(&tail, 0, &t(61), &t(64)).is_none());
    }
}
