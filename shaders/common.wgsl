// Prepended to every shader in this folder (see src/gpu/kernel.rs): what kernel families
// share. A workgroup variable declared here costs workgroup memory only in the entry points
// that use it.

// The flat workgroup index of a grid made by `Grid::flat` (x-major, folded into y when the
// count exceeds one dimension's limit).
fn flat_workgroup_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The flat invocation index of a grid made by `Grid::threads(_, group_size)`.
fn flat_invocation_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, group_size: u32) -> u32 {
    return flat_workgroup_id(wid, nwg) * group_size + lid;
}

// ---- Fixed-order workgroup reductions ----
//
// A kernel that reduces across its workgroup runs REDUCE_WG threads (mirrored by
// `ops::common::REDUCE_WG` in Rust). Each tree halves the active threads at every step, so the
// same inputs always combine in the same order: bit-identical results, no atomics. Call them
// from uniform control flow only (they hold barriers). Every thread gets the same, uniform
// result, and the tree is free again for the next call: workgroupUniformLoad synchronises
// before and after its load.

// A power of two (the trees halve it).
const REDUCE_WG: u32 = 256u;

var<workgroup> sum_tree: array<f32, REDUCE_WG>;
var<workgroup> online_tree: array<vec3<f32>, REDUCE_WG>;

// The sum of every thread's `value`.
fn workgroup_sum(lid: u32, value: f32) -> f32 {
    sum_tree[lid] = value;
    workgroupBarrier();
    for (var stride = REDUCE_WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            sum_tree[lid] = sum_tree[lid] + sum_tree[lid + stride];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&sum_tree[0]);
}

// ---- Online softmax statistics ----
//
// The statistics of a set of values x_i with weights w_i, gathered in one pass without knowing
// the maximum in advance: (m, s, t) = (max x, Σ exp(x − m), Σ exp(x − m)·w). s and t are
// rescaled whenever m grows, and exp only ever sees a non-positive argument. logsumexp is
// m + log(s); t / s is the softmax-weighted mean of w (zero weights leave t at 0).

// The most negative finite f32: the maximum of an empty set. (WGSL has no -inf literal.)
const LOWEST_F32: f32 = -3.40282347e38;
const ONLINE_EMPTY: vec3<f32> = vec3<f32>(LOWEST_F32, 0.0, 0.0);

// Adds the value x with weight w.
fn online_add(acc: vec3<f32>, x: f32, w: f32) -> vec3<f32> {
    if x > acc.x {
        let keep = exp(acc.x - x);
        return vec3<f32>(x, acc.y * keep + 1.0, acc.z * keep + w);
    }
    let e = exp(x - acc.x);
    return vec3<f32>(acc.x, acc.y + e, acc.z + e * w);
}

// The statistics of the union of two disjoint sets.
fn online_merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let m = max(a.x, b.x);
    let ea = exp(a.x - m);
    let eb = exp(b.x - m);
    return vec3<f32>(m, a.y * ea + b.y * eb, a.z * ea + b.z * eb);
}

// The statistics of the union of every thread's set.
fn workgroup_online_merge(lid: u32, own: vec3<f32>) -> vec3<f32> {
    online_tree[lid] = own;
    workgroupBarrier();
    for (var stride = REDUCE_WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            online_tree[lid] = online_merge(online_tree[lid], online_tree[lid + stride]);
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&online_tree[0]);
}
