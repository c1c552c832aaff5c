// Fused softmax + negative log-likelihood over rows of logits [rows, cols] with one label per
// row. One workgroup per row: a first walk over the row gathers online softmax statistics per
// thread, merged in the fixed-order workgroup tree of common.wgsl; a second walk writes the
// gradient. The softmax never reaches global memory. A label ≥ cols (u32::MAX by convention)
// marks an ignored row: loss 0 and gradient 0. (`target` is reserved in WGSL, hence `label`.)

struct Params {
    rows: u32,
    cols: u32,
    // Multiplies the gradient only (e.g. 1 / number of counted rows).
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;

// The row's online statistics (max, Σ exp(· − max), 0), the same in every thread.
fn row_max_sum(base: u32, lid: u32) -> vec3<f32> {
    var own = ONLINE_EMPTY;
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        own = online_add(own, logits[base + i], 0.0);
    }
    return workgroup_online_merge(lid, own);
}

// loss = logsumexp(z) − z[t] = (max − z[t]) + log(Σ exp(z − max)): the difference of two
// nearby logits first, so that a small loss keeps its precision next to large logits.
fn row_loss(base: u32, label: u32, stats: vec3<f32>) -> f32 {
    if label >= params.cols {
        return 0.0;
    }
    return (stats.x - logits[base + label]) + log(stats.y);
}

// The row's label and statistics, with its loss written by thread 0.
struct Row {
    base: u32,
    label: u32,
    stats: vec3<f32>,
}

fn row_forward(row: u32, lid: u32) -> Row {
    let base = row * params.cols;
    let label = targets[row];
    let stats = row_max_sum(base, lid);
    if lid == 0u {
        loss[row] = row_loss(base, label, stats);
    }
    return Row(base, label, stats);
}

// Per-row loss only (evaluation, perplexity).
@compute @workgroup_size(REDUCE_WG)
fn cross_entropy_forward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    row_forward(row, lid);
}

// Per-row loss and dlogits = scale·(softmax(z) − onehot(label)), 0 on ignored rows.
@compute @workgroup_size(REDUCE_WG)
fn cross_entropy_forward_backward(@builtin(workgroup_id) wid: vec3<u32>,
                                  @builtin(num_workgroups) nwg: vec3<u32>,
                                  @builtin(local_invocation_index) lid: u32) {
    let row_id = flat_workgroup_id(wid, nwg);
    if row_id >= params.rows {
        return;
    }
    let row = row_forward(row_id, lid);
    let counted = row.label < params.cols;
    let log_sum = log(row.stats.y);
    for (var i = lid; i < params.cols; i = i + REDUCE_WG) {
        let p = exp((logits[row.base + i] - row.stats.x) - log_sum);
        let onehot = select(0.0, 1.0, i == row.label);
        dlogits[row.base + i] = select(0.0, params.scale * (p - onehot), counted);
    }
}
