//! Row softmax over the last dimension, with max subtraction, and its gradient
//! `dx = y ∘ (dy − Σ dy·y)` (overwritten). One workgroup per row with deterministic tree
//! reductions, so rows as long as a vocabulary work and reruns are bit-identical.

use super::common::{expect_f32_alike, launch_per_row};
use crate::gpu::{read, read_write, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("softmax");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "softmax_forward",
    bindings: &[read(1), read_write(2)],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "softmax_backward",
    bindings: &[read(3), read(4), read_write(5)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
}

/// One workgroup per row of the first tensor's `[.., cols]` shape; all tensors f32 and alike.
fn launch(rec: &mut Recorder, spec: &'static KernelSpec, tensors: &[&Tensor]) {
    let shape = expect_f32_alike(spec.entry, tensors);
    let (rows, cols) = (shape.rows(), shape.last());
    assert!(cols > 0, "{}: rows of length 0 in {shape}", spec.entry);
    let params = Params {
        rows: rows as u32,
        cols: cols as u32,
    };
    launch_per_row(rec, spec, tensors, &params, rows);
}

/// `y = softmax(x)` over the last dimension.
pub fn softmax_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) {
    launch(rec, &FORWARD, &[x, y]);
}

/// Gradient of [`softmax_forward`] from its output `y`: `dx = y ∘ (dy − Σ dy·y)` per row
/// (overwritten).
pub fn softmax_backward(rec: &mut Recorder, y: &Tensor, dy: &Tensor, dx: &Tensor) {
    launch(rec, &BACKWARD, &[y, dy, dx]);
}

/// CPU f64 references over row-major `[rows, cols]` data.
pub mod reference {
    /// Row softmax with max subtraction.
    pub fn softmax_forward(x: &[f64], cols: usize) -> Vec<f64> {
        x.chunks_exact(cols)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                exps.into_iter().map(move |e| e / sum)
            })
            .collect()
    }

    /// `dx = y ∘ (dy − Σ dy·y)` per row, from the softmax output `y`.
    pub fn softmax_backward(y: &[f64], dy: &[f64], cols: usize) -> Vec<f64> {
        y.chunks_exact(cols)
            .zip(dy.chunks_exact(cols))
            .flat_map(|(y, dy)| {
                let dot: f64 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
                y.iter().zip(dy).map(move |(a, b)| a * (b - dot))
            })
            .collect()
    }
}
