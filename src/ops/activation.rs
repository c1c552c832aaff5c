//! The MLP activation: SwiGLU (`h = silu(gate)·up`, Llama's MLP, with `gate` and `up` as
//! separate tensors as `gate_proj` and `up_proj` produce them). The backward launcher overwrites
//! its outputs.

use super::common::{expect_f32_alike, launch_per_item};
use crate::gpu::{read, read_write, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("activation");

static SWIGLU_FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "swiglu_forward",
    bindings: &[read(1), read(2), read_write(4)],
};
static SWIGLU_BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "swiglu_backward",
    bindings: &[read(1), read(2), read(3), read_write(5), read_write(6)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
}

/// One thread per element; every tensor is f32 with the shape of the first.
fn launch(rec: &mut Recorder, spec: &'static KernelSpec, tensors: &[&Tensor]) {
    let n = expect_f32_alike(spec.entry, tensors).numel();
    launch_per_item(rec, spec, tensors, &Params { n: n as u32 }, n);
}

/// `h = silu(gate)·up`, elementwise over `[rows, F]`.
pub fn swiglu_forward(rec: &mut Recorder, gate: &Tensor, up: &Tensor, h: &Tensor) {
    launch(rec, &SWIGLU_FORWARD, &[gate, up, h]);
}

/// Gradients of [`swiglu_forward`]: `dgate = dh·up·silu'(gate)`, `dup = dh·silu(gate)`
/// (overwritten).
pub fn swiglu_backward(
    rec: &mut Recorder,
    gate: &Tensor,
    up: &Tensor,
    dh: &Tensor,
    dgate: &Tensor,
    dup: &Tensor,
) {
    launch(rec, &SWIGLU_BACKWARD, &[gate, up, dh, dgate, dup]);
}

/// CPU f64 references, written from the textbook formulas.
pub mod reference {
    /// σ(t), without overflow for large |t|.
    pub fn sigmoid(t: f64) -> f64 {
        if t >= 0.0 {
            1.0 / (1.0 + (-t).exp())
        } else {
            t.exp() / (1.0 + t.exp())
        }
    }

    /// `silu(g) = g·σ(g)`.
    pub fn silu(g: f64) -> f64 {
        g * sigmoid(g)
    }

    /// `silu'(g)`.
    pub fn silu_grad(g: f64) -> f64 {
        let s = sigmoid(g);
        s * (1.0 + g * (1.0 - s))
    }

    /// `h = silu(gate)·up`, elementwise.
    pub fn swiglu_forward(gate: &[f64], up: &[f64]) -> Vec<f64> {
        gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
    }

    /// `(dgate, dup)`.
    pub fn swiglu_backward(gate: &[f64], up: &[f64], dh: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let dgate = (gate.iter().zip(up).zip(dh))
            .map(|((&g, &u), &d)| d * u * silu_grad(g))
            .collect();
        let dup = gate.iter().zip(dh).map(|(&g, &d)| d * silu(g)).collect();
        (dgate, dup)
    }
}
