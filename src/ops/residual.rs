//! Residual-stream arithmetic: `y = x + s·r` (the skip connection), `y = s·x`, and
//! `acc += s·x` (gradient accumulation where two paths meet).

use super::common::{expect_elements, launch_per_item};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("residual");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "residual_forward",
    bindings: &[read(1), read(2), read_write(3)],
};
static SCALE: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "scale_forward",
    bindings: &[read(1), read_write(3)],
};
static ACCUMULATE: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "accumulate_scaled",
    bindings: &[read(1), read_write(4)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    scale: f32,
}

/// One thread per element; every tensor is f32 with as many elements as the first.
fn launch(rec: &mut Recorder, spec: &'static KernelSpec, tensors: &[&Tensor], scale: f32) {
    let n = tensors[0].numel();
    for t in tensors {
        expect_elements(spec.entry, "every tensor", t, DType::F32, &[n]);
    }
    launch_per_item(rec, spec, tensors, &Params { n: n as u32, scale }, n);
}

/// `y = x + scale·r`: the skip connection around a block (scale 1).
pub fn residual_forward(rec: &mut Recorder, x: &Tensor, r: &Tensor, y: &Tensor, scale: f32) {
    launch(rec, &FORWARD, &[x, r, y], scale);
}

/// Gradient of [`residual_forward`] with respect to `r`: `dr = scale·dy`. (The gradient with
/// respect to `x` is `dy` itself.)
pub fn residual_backward(rec: &mut Recorder, dy: &Tensor, dr: &Tensor, scale: f32) {
    scale_forward(rec, dy, dr, scale);
}

/// `y = scale·x`.
pub fn scale_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor, scale: f32) {
    launch(rec, &SCALE, &[x, y], scale);
}

/// `acc += scale·x`.
pub fn accumulate(rec: &mut Recorder, x: &Tensor, acc: &Tensor, scale: f32) {
    launch(rec, &ACCUMULATE, &[x, acc], scale);
}

/// CPU f64 references.
pub mod reference {
    /// `x + scale·r`.
    pub fn residual_forward(x: &[f64], r: &[f64], scale: f64) -> Vec<f64> {
        x.iter().zip(r).map(|(a, b)| a + scale * b).collect()
    }

    /// `acc + scale·x`.
    pub fn accumulate(acc: &[f64], x: &[f64], scale: f64) -> Vec<f64> {
        residual_forward(acc, x, scale)
    }
}
