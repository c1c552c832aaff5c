// Hooks on the residual stream: edits of selected rows of x [rows, C], in place, inside a
// recorded pass. `rows_sel [n]` lists the rows to edit; the i-th selected row pairs with row
// i % value_rows of v [value_rows, C] (value_rows = 1 broadcasts one vector to every row).
//
// - hook_add:     x[r] += scale · v[i % value_rows]
// - hook_replace: x[r]  = v[i % value_rows]
// - hook_project: s = x[r]·w + bias; x[r] −= a(s) · w / (w·w), a(s) = s (exact: x[r] leaves
//   the span of w, or lands on the hyperplane x·w + bias = 0), or max(s − threshold, 0)
//   (clamped: only rows beyond the threshold move, exactly onto it).

struct Params {
    selected: u32,
    cols: u32,
    value_rows: u32,
    scale: f32,
    bias: f32,
    threshold: f32,
    // 0: exact projection; 1: clamped above `threshold`.
    clamped: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> rows_sel: array<u32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

override WG: u32 = 256u;

// The element of x and of v that thread i of a per-element launch edits.
struct Target {
    x_index: u32,
    v_index: u32,
}

fn target_of(i: u32) -> Target {
    let sel = i / params.cols;
    let c = i % params.cols;
    return Target(rows_sel[sel] * params.cols + c, (sel % params.value_rows) * params.cols + c);
}

// One thread per (selected row, column).
@compute @workgroup_size(WG)
fn hook_add(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.selected * params.cols {
        let t = target_of(i);
        x[t.x_index] = x[t.x_index] + params.scale * v[t.v_index];
    }
}

// One thread per (selected row, column).
@compute @workgroup_size(WG)
fn hook_replace(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.selected * params.cols {
        let t = target_of(i);
        x[t.x_index] = v[t.v_index];
    }
}

// ROW_THREADS threads per selected row; w is v's first row.
@compute @workgroup_size(REDUCE_WG)
fn hook_project(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let sel = row_of_thread(wid, nwg, lid);
    let lane = lane_in_row(lid);
    let cols = cols_of_row(sel, params.selected, params.cols);
    var base = 0u;
    if cols > 0u {
        base = rows_sel[sel] * params.cols;
    }
    var xw = 0.0;
    var ww = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        xw = xw + x[base + c] * v[c];
        ww = ww + v[c] * v[c];
    }
    let s = sum_across_row(lid, xw) + params.bias;
    let norm_sq = sum_across_row(lid, ww);
    var amount = s;
    if params.clamped == 1u {
        amount = max(s - params.threshold, 0.0);
    }
    if norm_sq > 0.0 && amount != 0.0 {
        let step = amount / norm_sq;
        for (var c = lane; c < cols; c = c + ROW_THREADS) {
            x[base + c] = x[base + c] - step * v[c];
        }
    }
}
