// The MLP activation and its gradient: SwiGLU (Llama): h = silu(gate)·up, silu(g) = g·σ(g).
// The sigmoid goes through `sigmoid_pair`, which only ever evaluates exp of a non-positive
// argument, so |g| = 100 (or far more) gives no overflow, inf or NaN.

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

override WG: u32 = 256u;

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
