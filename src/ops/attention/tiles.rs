//! How the attention kernels spread their rows over threads, and the tile sizes that fit a
//! device's workgroup memory (the overrides of `shaders/attention_lanes.wgsl` and
//! `shaders/attention_rows.wgsl`).

use super::{Entry, Params, ROW_STATS_BYTES};
use crate::gpu::{Gpu, Grid, Recorder, Tensor};

/// Outer rows (queries, or keys in dK/dV) per workgroup, when workgroup memory allows.
const ROWS: u32 = 16;
/// Most threads sharing one outer row.
pub(super) const MAX_LANES: u32 = 16;
/// Accumulator slots per thread: mirrors `MAX_DIMS_PER_LANE` in the WGSL.
pub(super) const MAX_DIMS_PER_LANE: u32 = 8;
/// Largest streamed tile (keys in the forward and dQ, queries in dK/dV).
const MAX_INNER: u32 = 64;
/// Largest head dimension of the rows layout: one thread holds a row in registers (the WGSL
/// `MAX_ROW_GROUPS` vec4s).
const MAX_ROWS_LAYOUT_HEAD_DIM: u32 = 64;
/// Threads (outer rows) per workgroup, and the largest streamed tile, in the rows layout
/// (32 and 32 measured best on lavapipe at head dimensions 16 and 64, within 10% of 16..64).
const ROWS_LAYOUT_THREADS: u32 = 32;
const ROWS_LAYOUT_MAX_INNER: u32 = 32;

/// How the kernels spread an outer row over threads (see the WGSL header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `lanes` threads per row, scores exchanged through workgroup memory: any head.
    Lanes,
    /// One thread per row, held in registers: heads up to [`MAX_ROWS_LAYOUT_HEAD_DIM`].
    Rows,
}

/// Tile sizes of the attention kernels (WGSL overrides), chosen per head dimension so that the
/// workgroup tiles fit the device's workgroup memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tiles {
    layout: Layout,
    head_dim: u32,
    /// Outer rows per workgroup.
    rows: u32,
    /// Threads per outer row (1 in the rows layout).
    lanes: u32,
    /// Rows of the streamed tile.
    inner: u32,
}

impl Tiles {
    /// The rows layout for small heads, else lanes; the largest tiles (rows first, then
    /// inner) whose workgroup memory fits `limit` bytes.
    pub(super) fn choose(head_dim: usize, limit: u32) -> Tiles {
        let head_dim = head_dim as u32;
        let (layout, lanes, most_rows, most_inner) = if head_dim <= MAX_ROWS_LAYOUT_HEAD_DIM {
            (Layout::Rows, 1, ROWS_LAYOUT_THREADS, ROWS_LAYOUT_MAX_INNER)
        } else {
            let lanes = head_dim.next_power_of_two().min(MAX_LANES);
            (Layout::Lanes, lanes, ROWS, MAX_INNER)
        };
        for rows in halvings(most_rows) {
            for inner in halvings(most_inner) {
                let tiles = Tiles {
                    layout,
                    head_dim,
                    rows,
                    lanes,
                    inner,
                };
                if tiles.workgroup_bytes() <= limit {
                    return tiles;
                }
            }
        }
        panic!("attention: no tiles for head_dim {head_dim} fit {limit} bytes of workgroup memory")
    }

    pub(super) fn for_device(gpu: &Gpu, head_dim: usize) -> Tiles {
        Tiles::choose(head_dim, gpu.limits().max_compute_workgroup_storage_size)
    }

    /// Mirrors the WGSL workgroup arrays an entry point of the layout uses: `outer`, `inner`,
    /// `weights` and `inner_stats`, or `stream` and `inner_stats`.
    fn workgroup_bytes(&self) -> u32 {
        let Tiles {
            head_dim: d,
            rows,
            inner,
            ..
        } = *self;
        let floats = match self.layout {
            Layout::Lanes => 2 * rows * d + 2 * inner * d + 2 * rows * inner,
            Layout::Rows => 2 * inner * 4 * d.div_ceil(4),
        };
        4 * floats + ROW_STATS_BYTES * inner
    }

    /// The override constants of the layout's module.
    fn overrides(&self) -> Vec<(&'static str, u32)> {
        let mut constants = vec![
            ("HEAD_DIM", self.head_dim),
            ("ROWS", self.rows),
            ("INNER", self.inner),
        ];
        if self.layout == Layout::Lanes {
            constants.push(("LANES", self.lanes));
        }
        constants
    }

    /// Launches `entry` (in this layout) with one workgroup per (tile of `len` outer rows,
    /// head, batch) of `[len, heads, batch]`.
    pub(super) fn launch(
        &self,
        rec: &mut Recorder,
        entry: &'static Entry,
        tensors: &[&Tensor],
        params: &Params,
        [len, heads, batch]: [usize; 3],
    ) {
        let gpu = rec.gpu();
        let tiles = len.div_ceil(self.rows as usize);
        let max = gpu.limits().max_compute_workgroups_per_dimension as usize;
        assert!(
            tiles <= max && heads <= max && batch <= max,
            "attention: grid ({tiles}, {heads}, {batch}) exceeds {max} workgroups per dimension"
        );
        let spec = match self.layout {
            Layout::Lanes => &entry.lanes,
            Layout::Rows => &entry.rows,
        };
        let kernel = gpu.kernel(spec, &self.overrides());
        let grid = Grid::xyz(tiles as u32, heads as u32, batch as u32);
        rec.dispatch(&kernel, tensors, params, grid);
    }
}

/// `start, start / 2, ..., 1`.
fn halvings(start: u32) -> impl Iterator<Item = u32> {
    std::iter::successors(Some(start), |&n| (n > 1).then_some(n / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::MAX_HEAD_DIM;

    #[test]
    fn tiles_fit_workgroup_memory_for_every_head_dim() {
        // WebGPU's guaranteed minimum and lavapipe's limit.
        for limit in [16_384, 32_768] {
            for head_dim in 1..=MAX_HEAD_DIM {
                let tiles = Tiles::choose(head_dim, limit);
                assert!(tiles.workgroup_bytes() <= limit);
                assert!(tiles.rows * tiles.lanes <= 256, "{tiles:?}");
                let per_thread = match tiles.layout {
                    Layout::Lanes => tiles.lanes * MAX_DIMS_PER_LANE,
                    Layout::Rows => MAX_ROWS_LAYOUT_HEAD_DIM,
                };
                assert!(head_dim as u32 <= per_thread, "{tiles:?}");
            }
        }
        // Small heads get one thread per row and the widest streamed tile; the full outer
        // tile of large heads fits lavapipe.
        let small = Tiles::choose(8, 32_768);
        assert_eq!(
            (small.layout, small.inner),
            (Layout::Rows, ROWS_LAYOUT_MAX_INNER)
        );
        assert_eq!(Tiles::choose(64, 16_384).layout, Layout::Rows);
        let large = Tiles::choose(128, 32_768);
        assert_eq!((large.layout, large.rows), (Layout::Lanes, ROWS));
    }
}
