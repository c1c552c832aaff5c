//! The global squared gradient norm Σ_tensors Σ g², for gradient clipping without a host round
//! trip: AdamW reads the result from GPU memory. Two deterministic stages: per-block partial
//! sums of squares of every tensor into one scratch vector, then [`reduce::sum_rows`].

use super::common::{expect_dtype, expect_elements, REDUCE_WG};
use super::Write;
use crate::gpu::{read, read_write, DType, Grid, KernelSpec, Recorder, Shader, Tensor};
use crate::ops::reduce;
use crate::shader;

static SHADER: Shader = shader!("grad_norm");
/// Elements each of the [`REDUCE_WG`] threads squares: a block is `REDUCE_WG · ITEMS`
/// elements, one scratch slot.
const ITEMS: u32 = 16;
const BLOCK: usize = (REDUCE_WG * ITEMS) as usize;

static SUM_SQUARES: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "sum_squares_per_block",
    bindings: &[read(1), read_write(2)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    first_slot: u32,
    blocks: u32,
}

/// `out[0] = Σ over grads, in order, of Σ g²`: the squared global norm that gradient clipping
/// needs. Deterministic: the same gradients give bit-identical results. `out` is overwritten.
pub fn grad_norm_squared(rec: &mut Recorder, grads: &[&Tensor], out: &Tensor) {
    let op = "grad_norm_squared";
    expect_elements(op, "out", out, DType::F32, &[1]);
    for g in grads {
        expect_dtype(op, "every gradient", g, DType::F32);
    }
    let blocks: Vec<usize> = grads.iter().map(|g| g.numel().div_ceil(BLOCK)).collect();
    let slots: usize = blocks.iter().sum();
    if slots == 0 {
        rec.zero(out);
        return;
    }
    let partials = rec.scratch([slots, 1], DType::F32);
    let kernel = rec.gpu().kernel(&SUM_SQUARES, &[("ITEMS", ITEMS)]);
    let mut first_slot = 0;
    for (g, &count) in grads.iter().zip(&blocks).filter(|(_, &b)| b > 0) {
        let params = Params {
            n: g.numel() as u32,
            first_slot: first_slot as u32,
            blocks: count as u32,
        };
        rec.dispatch(&kernel, &[g, &partials], &params, Grid::flat(count));
        first_slot += count;
    }
    reduce::sum_rows(rec, &partials, out, Write::Overwrite);
}

/// Bytes of scratch [`grad_norm_squared`] takes for gradients of `numels` elements each.
pub fn grad_norm_scratch_bytes(numels: impl IntoIterator<Item = usize>) -> u64 {
    let slots: usize = numels.into_iter().map(|n| n.div_ceil(BLOCK)).sum();
    if slots == 0 {
        return 0;
    }
    (slots * DType::F32.size_bytes()) as u64 + reduce::sum_rows_scratch_bytes(slots, 1)
}

/// CPU f64 reference.
pub mod reference {
    /// Σ over every tensor of Σ g².
    pub fn grad_norm_squared(grads: &[&[f64]]) -> f64 {
        grads.iter().flat_map(|g| g.iter()).map(|x| x * x).sum()
    }
}
