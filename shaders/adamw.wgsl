// Fused AdamW step with decoupled weight decay, bias correction and global-norm gradient
// clipping. The clip coefficient comes from the squared global gradient norm that grad_norm.wgsl
// left in GPU memory, so a training step needs no host round trip.
//
// The order of operations mirrors torch.optim.AdamW (single-tensor path) after
// torch.nn.utils.clip_grad_norm_, so f32 results track PyTorch's:
//   g' = clip·g                        clip = min(1, max_norm / (sqrt(norm_sq) + 1e-6))
//   m  = lerp(m, g', 1 − β1)           exp_avg.lerp_(grad, 1 - beta1)
//   v  = β2·v + (1 − β2)·g'·g'         exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   p  = p·(1 − lr·wd)                 param.mul_(1 - lr * weight_decay)
//   p  = p − step_size·(m / denom)     param.addcdiv_(exp_avg, denom, value=-step_size)
//        denom = sqrt(v) / sqrt(1 − β2^t) + eps,  step_size = lr / (1 − β1^t)
// The scalars torch computes in Python (f64) arrive precomputed from the host.
//
// A non-finite gradient norm (a NaN or ±Inf anywhere in any gradient) leaves the parameters and
// moments untouched, so that the host can stop at, or skip, that step with the model intact.

struct Params {
    n: u32,
    // 1: scale the gradient by the clip coefficient; 0: no clipping.
    clip: u32,
    max_grad_norm: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    // 1 − lr·wd
    decay: f32,
    // lr / (1 − β1^t)
    step_size: f32,
    // sqrt(1 − β2^t)
    bias_correction2_sqrt: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<f32>;
// One element: Σ g² over every trainable tensor.
@group(0) @binding(5) var<storage, read> norm_sq: array<f32>;

override WG: u32 = 256u;

// torch.nn.utils.clip_grad_norm_'s coefficient, clamped to at most 1.
fn clip_coefficient() -> f32 {
    if params.clip == 0u {
        return 1.0;
    }
    return min(1.0, params.max_grad_norm / (sqrt(norm_sq[0]) + 1e-6));
}

// NaN and ±Inf have every exponent bit set; comparisons cannot be trusted to see NaN.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// torch.lerp: a + w·(b − a), evaluated from the nearer end for accuracy.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if abs(w) < 0.5 {
        return a + w * (b - a);
    }
    return b - (b - a) * (1.0 - w);
}

@compute @workgroup_size(WG)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.n || !is_finite(norm_sq[0]) {
        return;
    }
    let g = grad[i] * clip_coefficient();
    let m = lerp(exp_avg[i], g, params.one_minus_beta1);
    let v = exp_avg_sq[i] * params.beta2 + params.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    let denom = sqrt(v) / params.bias_correction2_sqrt + params.eps;
    param[i] = param[i] * params.decay - params.step_size * (m / denom);
}
