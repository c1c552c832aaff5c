//! The tiled GEMM (`shaders/matmul.wgsl`): workgroup-memory tiles of A and B, a register
//! block of C per thread, on any device. Here are its tile sizes, chosen by shape and device,
//! and the split of K into parts that a product too small for the device's grid takes.

use super::{dispatch, Gemm, GemmKernel, Params};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::ops::common::wgsl_format;
use crate::shader;

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

/// The tile sizes of one launch (the WGSL overrides): a workgroup of `threads[0] ×
/// threads[1]` threads computes a tile of `(threads[0]·block[0]) × (threads[1]·block[1])`
/// elements of C, each thread a `block[0] × block[1]` register block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tiles {
    /// Threads along M and along N.
    threads: [u32; 2],
    /// Rows and columns of C per thread (multiples of 4, at most [`MAX_BLOCK`]).
    block: [u32; 2],
}

impl Tiles {
    /// Tiles no wider than the matrix needs (up to 64 or 128), shrunk on a GPU until the grid
    /// has [`GPU_MIN_WORKGROUPS`] workgroups.
    pub(super) fn choose(g: &Gemm, cpu: bool) -> Tiles {
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

/// The tiles of `g` and into how many parts its K splits (1: not at all). Only a single
/// product into a whole, dense C with no bias splits (`unsplittable` says otherwise).
pub(super) fn split_plan(g: &Gemm, unsplittable: bool, cpu: bool) -> (Tiles, usize) {
    let tiles = Tiles::choose(g, cpu);
    if g.batch != 1 || unsplittable {
        return (tiles, 1);
    }
    (tiles, split_count(g, tiles, cpu))
}

/// K split into `splits` parts of whole K steps: (part length, parts).
pub(super) fn split_parts(k: usize, splits: usize) -> (usize, usize) {
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

/// [`launch`](super::launch) with the tiled kernel (workgroup-memory tiles of `tiles`), on
/// any device.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_tiled(
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

#[cfg(test)]
mod tests {
    use super::super::{launch_split, reference, MatmulOptions, Strided};
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
