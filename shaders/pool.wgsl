// Pooling hidden states into one embedding per prompt: the last valid token (`Pool::Last`) or
// the mean over the valid tokens (`Pool::Mean`) of right-padded `h [B, T, C]`.
// The backward accumulates into the residual-stream gradient `dh`, which already holds other
// contributions, and touches only the positions the forward read.

struct Params {
    batch: u32,
    tokens: u32,
    cols: u32,
    // 0: last valid token; 1: mean over the valid tokens.
    mean: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read> seq_lens: array<u32>;
@group(0) @binding(3) var<storage, read_write> e: array<f32>;
@group(0) @binding(4) var<storage, read> de: array<f32>;
@group(0) @binding(5) var<storage, read_write> dh: array<f32>;

override WG: u32 = 256u;

// Valid length of prompt `b`, clamped to [1, T] so that a bad length cannot read out of bounds.
fn valid_len(b: u32) -> u32 {
    return clamp(seq_lens[b], 1u, params.tokens);
}

// The weight of position `t` in prompt `b`'s embedding (0 for positions pooling ignores).
fn pool_weight(b: u32, t: u32) -> f32 {
    let len = valid_len(b);
    if params.mean == 1u {
        return select(0.0, 1.0 / f32(len), t < len);
    }
    return select(0.0, 1.0, t == len - 1u);
}

// One thread per (b, c).
@compute @workgroup_size(WG)
fn pool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.batch * params.cols {
        return;
    }
    let b = i / params.cols;
    let c = i % params.cols;
    let len = valid_len(b);
    let first = select(len - 1u, 0u, params.mean == 1u);
    var total = 0.0;
    for (var t = first; t < len; t = t + 1u) {
        total = total + h[(b * params.tokens + t) * params.cols + c];
    }
    e[i] = total * pool_weight(b, first);
}

// One thread per (b, t, c); positions with weight 0 are left untouched.
@compute @workgroup_size(WG)
fn pool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.batch * params.tokens * params.cols {
        return;
    }
    let c = i % params.cols;
    let bt = i / params.cols;
    let b = bt / params.tokens;
    let weight = pool_weight(b, bt % params.tokens);
    if weight != 0.0 {
        dh[i] = dh[i] + weight * de[b * params.cols + c];
    }
}
