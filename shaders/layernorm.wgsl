// LayerNorm (GPT-2): y = (x − mean) · rstd · w + b with rstd = 1/sqrt(var + eps), per row of
// x [rows, C] (biased variance, two passes over the row as torch computes it).
//
// Same scheme as rmsnorm.wgsl: one workgroup per row reducing through `workgroup_sum`
// (common.wgsl); the weight gradient is summed per block of rows into partials [blocks, C]
// that `reduce::sum_rows` finishes (the bias gradient is a plain `sum_rows` of dy).

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    // Rows that one thread of `layernorm_dw_partial` sums.
    rows_per_block: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> mean: array<f32>;
@group(0) @binding(8) var<storage, read> rstd: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<f32>;
@group(0) @binding(10) var<storage, read_write> dx: array<f32>;
@group(0) @binding(11) var<storage, read_write> dw_partial: array<f32>;

// Threads per column block of `layernorm_dw_partial`. The row kernels run REDUCE_WG threads
// (common.wgsl) for `workgroup_sum`.
override WG: u32 = 256u;

@compute @workgroup_size(REDUCE_WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    let n = f32(params.cols);
    var sum = 0.0;
    for (var c = lid; c < params.cols; c = c + REDUCE_WG) {
        sum = sum + x[base + c];
    }
    let m = workgroup_sum(lid, sum) / n;
    var squares = 0.0;
    for (var c = lid; c < params.cols; c = c + REDUCE_WG) {
        let d = x[base + c] - m;
        squares = squares + d * d;
    }
    let r = 1.0 / sqrt(workgroup_sum(lid, squares) / n + params.eps);
    for (var c = lid; c < params.cols; c = c + REDUCE_WG) {
        y[base + c] = (x[base + c] - m) * r * w[c] + b[c];
    }
    if lid == 0u {
        mean_out[row] = m;
        rstd_out[row] = r;
    }
}

// With x̂ = (x − mean) · rstd and g = dy · w: dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
@compute @workgroup_size(REDUCE_WG)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = flat_workgroup_id(wid, nwg);
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    let n = f32(params.cols);
    let m = mean[row];
    let r = rstd[row];
    var g_sum = 0.0;
    var gx_sum = 0.0;
    for (var c = lid; c < params.cols; c = c + REDUCE_WG) {
        let g = dy[base + c] * w[c];
        g_sum = g_sum + g;
        gx_sum = gx_sum + g * (x[base + c] - m) * r;
    }
    let g_mean = workgroup_sum(lid, g_sum) / n;
    let gx_mean = workgroup_sum(lid, gx_sum) / n;
    for (var c = lid; c < params.cols; c = c + REDUCE_WG) {
        let x_hat = (x[base + c] - m) * r;
        dx[base + c] = r * (dy[base + c] * w[c] - g_mean - x_hat * gx_mean);
    }
}

// dw_partial[block, c] = Σ over the block's rows of dy · x̂. Grid: x covers the columns, y the
// blocks of rows.
@compute @workgroup_size(WG)
fn layernorm_dw_partial(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let block = gid.y;
    if c >= params.cols {
        return;
    }
    let first = block * params.rows_per_block;
    let last = min(first + params.rows_per_block, params.rows);
    var total = 0.0;
    for (var row = first; row < last; row = row + 1u) {
        let i = row * params.cols + c;
        total = total + dy[i] * (x[i] - mean[row]) * rstd[row];
    }
    dw_partial[block * params.cols + c] = total;
}
