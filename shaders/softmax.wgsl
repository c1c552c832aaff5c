// Row softmax over the last dimension of [rows, cols] and its gradient. One workgroup per row;
// each thread walks the row in strides of REDUCE_WG, and the per-thread results meet in the
// fixed-order trees of common.wgsl, so results are bit-identical from run to run and cols may
// be large (vocabularies of 150,000).

struct Params {
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// Forward.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// Backward: the forward's output, the upstream gradient and the input gradient.
@group(0) @binding(3) var<storage, read> probs: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(REDUCE_WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    var own = ONLINE_EMPTY;
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        own = online_add(own, x[base + i], 0.0);
    }
    let stats = workgroup_online_merge(lid, own);
    let inv_sum = 1.0 / stats.y;
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        y[base + i] = exp(x[base + i] - stats.x) * inv_sum;
    }
}

// dx = y ∘ (dy − Σ dy·y).
@compute @workgroup_size(REDUCE_WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    var own = 0.0;
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        own = own + dy[base + i] * probs[base + i];
    }
    let dy_dot_y = workgroup_sum(lid, own);
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        dx[base + i] = probs[base + i] * (dy[base + i] - dy_dot_y);
    }
}
