// Row softmax over the last dimension of [rows, cols] and its gradient. One workgroup per row;
// each thread walks the row in strides of WG, and the per-thread results meet in a fixed-order
// tree in workgroup memory, so results are bit-identical from run to run and cols may be
// large (vocabularies of 150,000).

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

// A power of two (the tree halves it).
override WG: u32 = 256u;

// The most negative finite f32: the running maximum of an empty set. (WGSL has no -inf
// literal.)
const LOWEST: f32 = -3.40282347e38;

var<workgroup> partial_max_sum: array<vec2<f32>, WG>;
var<workgroup> partial_sum: array<f32, WG>;

// Adds v to a running (max m, Σ exp(· − m)); exp only ever sees a non-positive argument.
fn online_add(acc: vec2<f32>, v: f32) -> vec2<f32> {
    if v > acc.x {
        return vec2<f32>(v, acc.y * exp(acc.x - v) + 1.0);
    }
    return vec2<f32>(acc.x, acc.y + exp(v - acc.x));
}

// Merges two running (max, sum) pairs.
fn online_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// The row's (max, Σ exp(· − max)) from every thread's share, the same in every thread.
// Called once per dispatch (the tree's memory is not handed back).
fn workgroup_max_sum(lid: u32, own: vec2<f32>) -> vec2<f32> {
    partial_max_sum[lid] = own;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            partial_max_sum[lid] = online_merge(partial_max_sum[lid], partial_max_sum[lid + stride]);
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&partial_max_sum[0]);
}

// Σ of every thread's share, the same in every thread. Called once per dispatch.
fn workgroup_sum(lid: u32, own: f32) -> f32 {
    partial_sum[lid] = own;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            partial_sum[lid] = partial_sum[lid] + partial_sum[lid + stride];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&partial_sum[0]);
}

@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    var own = vec2<f32>(LOWEST, 0.0);
    for (var i = lid; i < params.cols; i = i + WG) {
        own = online_add(own, x[base + i]);
    }
    let stats = workgroup_max_sum(lid, own);
    let inv_sum = 1.0 / stats.y;
    for (var i = lid; i < params.cols; i = i + WG) {
        y[base + i] = exp(x[base + i] - stats.x) * inv_sum;
    }
}

// dx = y ∘ (dy − Σ dy·y).
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    var own = 0.0;
    for (var i = lid; i < params.cols; i = i + WG) {
        own = own + dy[base + i] * probs[base + i];
    }
    let dy_dot_y = workgroup_sum(lid, own);
    for (var i = lid; i < params.cols; i = i + WG) {
        dx[base + i] = probs[base + i] * (dy[base + i] - dy_dot_y);
    }
}
