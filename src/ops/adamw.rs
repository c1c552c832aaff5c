//! The fused AdamW step (PyTorch `torch.optim.AdamW` semantics) with global-norm gradient
//! clipping read from GPU memory, so that a training step needs no readback.

use super::common::{expect_elements, launch_per_item};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("adamw");

static STEP: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "adamw_step",
    bindings: &[
        read_write(1),
        read(2),
        read_write(3),
        read_write(4),
        read(5),
    ],
};

/// The hyperparameters of one AdamW step, as `torch.optim.AdamW` names them (f64, as Python
/// computes them; the kernel receives the derived scalars rounded once to f32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the square root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay: `p ← p·(1 − lr·weight_decay)` before the Adam update.
    pub weight_decay: f64,
    /// 1-based step number, for the bias corrections `1 − β^step`.
    pub step: u64,
    /// Global gradient-norm clipping threshold; 0 or ∞ turns clipping off.
    pub max_grad_norm: f64,
}

impl Default for AdamWStep {
    /// PyTorch's defaults, first step, no clipping.
    fn default() -> Self {
        AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            step: 1,
            max_grad_norm: 0.0,
        }
    }
}

impl AdamWStep {
    /// Whether gradients are clipped to `max_grad_norm`.
    pub fn clips(&self) -> bool {
        self.max_grad_norm > 0.0 && self.max_grad_norm.is_finite()
    }

    /// `lr / (1 − β1^step)`: torch's `step_size`.
    fn step_size(&self) -> f64 {
        self.lr / (1.0 - self.beta1.powf(self.step as f64))
    }

    /// `sqrt(1 − β2^step)`: torch's `bias_correction2_sqrt`.
    fn bias_correction2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powf(self.step as f64)).sqrt()
    }

    fn check(&self) {
        assert!(self.step >= 1, "adamw_step: step is 1-based, got 0");
        assert!(
            (0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2),
            "adamw_step: betas must lie in [0, 1), got {} and {}",
            self.beta1,
            self.beta2
        );
        assert!(
            self.max_grad_norm >= 0.0,
            "adamw_step: max_grad_norm must be >= 0 (0 or inf: no clipping), got {}",
            self.max_grad_norm
        );
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    clip: u32,
    max_grad_norm: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
}

impl Params {
    fn new(n: usize, s: &AdamWStep) -> Self {
        Params {
            n: n as u32,
            clip: u32::from(s.clips()),
            max_grad_norm: s.max_grad_norm as f32,
            one_minus_beta1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: (1.0 - s.beta2) as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            step_size: s.step_size() as f32,
            bias_correction2_sqrt: s.bias_correction2_sqrt() as f32,
            eps: s.eps as f32,
        }
    }
}

/// One AdamW step on `param` in place, updating the moments `m` (exp_avg) and `v` (exp_avg_sq)
/// in place. `grad` is read, scaled by the clip coefficient `min(1, max_grad_norm /
/// (sqrt(norm_sq[0]) + 1e-6))` when clipping is on, and left unchanged. `norm_sq` is the
/// squared global gradient norm over all trainable tensors, as
/// [`grad_norm_squared`](crate::ops::grad_norm::grad_norm_squared) writes it; it is not read
/// when clipping is off.
pub fn adamw_step(
    rec: &mut Recorder,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    norm_sq: &Tensor,
    step: &AdamWStep,
) {
    step.check();
    let op = "adamw_step";
    let n = param.numel();
    for (name, t) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
        expect_elements(op, name, t, DType::F32, &[n]);
    }
    expect_elements(op, "norm_sq", norm_sq, DType::F32, &[1]);
    if n == 0 {
        return;
    }
    let tensors = [param, grad, m, v, norm_sq];
    launch_per_item(rec, &STEP, &tensors, &Params::new(n, step), n);
}

/// CPU f64 reference, written from the textbook update (the kernel follows torch's equivalent
/// lerp/addcdiv forms).
pub mod reference {
    use super::AdamWStep;

    /// The factor the gradients are scaled by: `min(1, max_norm / (‖g‖ + 1e-6))`, or 1.
    pub fn clip_coefficient(norm_sq: f64, s: &AdamWStep) -> f64 {
        if s.clips() {
            (s.max_grad_norm / (norm_sq.sqrt() + 1e-6)).min(1.0)
        } else {
            1.0
        }
    }

    /// One AdamW update of `p` with gradient `g` and moments `m`, `v`, after clipping by the
    /// global squared norm `norm_sq`.
    pub fn adamw_step(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        norm_sq: f64,
        s: &AdamWStep,
    ) {
        if !norm_sq.is_finite() {
            return; // the kernel applies no update from a non-finite gradient
        }
        let clip = clip_coefficient(norm_sq, s);
        let t = s.step as f64;
        let (bc1, bc2) = (1.0 - s.beta1.powf(t), 1.0 - s.beta2.powf(t));
        for i in 0..p.len() {
            let g = clip * g[i];
            m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g;
            v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
            p[i] -= s.lr * s.weight_decay * p[i];
            let (m_hat, v_hat) = (m[i] / bc1, v[i] / bc2);
            p[i] -= s.lr * m_hat / (v_hat.sqrt() + s.eps);
        }
    }
}
