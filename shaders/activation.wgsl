// Elementwise MLP activations and their gradients:
//   SwiGLU (Llama): h = silu(gate)·up, silu(g) = g·σ(g);
//   GELU, tanh approximation (GPT-2 `gelu_new`): y = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³).
// Every transcendental goes through `sigmoid_pair`, which only ever evaluates exp of a
// non-positive argument, so |x| = 100 (or far more) gives no overflow, inf or NaN.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// SwiGLU.
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read> dh: array<f32>;
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
@group(0) @binding(5) var<storage, read_write> dgate: array<f32>;
@group(0) @binding(6) var<storage, read_write> dup: array<f32>;
// GELU.
@group(0) @binding(7) var<storage, read> x: array<f32>;
@group(0) @binding(8) var<storage, read> dy: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<f32>;
@group(0) @binding(10) var<storage, read_write> dx: array<f32>;

override WG: u32 = 256u;

// √(2/π) and the cubic coefficient of GPT-2's tanh approximation.
const GELU_SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_CUBIC: f32 = 0.044715;
// Beyond this |x|, σ(2u) is exactly 0 or 1 in f32 already; clamping the polynomial's argument
// keeps x³ and x² finite for any finite x.
const GELU_FLAT_TAIL: f32 = 1.0e4;

// (σ(t), 1 − σ(t)), each computed directly rather than by subtraction, so that the small one
// keeps its relative precision in both tails.
fn sigmoid_pair(t: f32) -> vec2<f32> {
    let e = exp(-abs(t));
    let small = e / (1.0 + e);
    let large = 1.0 / (1.0 + e);
    if t >= 0.0 {
        return vec2<f32>(large, small);
    }
    return vec2<f32>(small, large);
}

// silu(g) and its derivative σ(g)·(1 + g·(1 − σ(g))).
fn silu_and_grad(g: f32) -> vec2<f32> {
    let s = sigmoid_pair(g);
    return vec2<f32>(g * s.x, s.x * (1.0 + g * s.y));
}

// GELU(x) and its derivative. ½(1 + tanh(u)) = σ(2u), so GELU(x) = x·σ(2u) and
// GELU'(x) = σ(2u) + x·σ(2u)·(1 − σ(2u))·2u'(x); no tanh (whose library versions can return
// NaN for large arguments on some backends) and no cancellation in 1 + tanh(u) for u ≪ 0.
fn gelu_and_grad(v: f32) -> vec2<f32> {
    let c = clamp(v, -GELU_FLAT_TAIL, GELU_FLAT_TAIL);
    let two_u = 2.0 * GELU_SQRT_2_OVER_PI * (c + GELU_CUBIC * c * c * c);
    let two_du = 2.0 * GELU_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * c * c);
    let s = sigmoid_pair(two_u);
    return vec2<f32>(v * s.x, s.x + v * s.x * s.y * two_du);
}

@compute @workgroup_size(WG)
fn swiglu_forward(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        h[i] = silu_and_grad(gate[i]).x * up[i];
    }
}

@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        let silu = silu_and_grad(gate[i]);
        dgate[i] = dh[i] * up[i] * silu.y;
        dup[i] = dh[i] * silu.x;
    }
}

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        y[i] = gelu_and_grad(x[i]).x;
    }
}

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        dx[i] = dy[i] * gelu_and_grad(x[i]).y;
    }
}
