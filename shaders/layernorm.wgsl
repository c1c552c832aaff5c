// LayerNorm (GPT-2): y = (x − mean) · rstd · w + b with rstd = 1/sqrt(var + eps), per row of
// x [rows, C] (biased variance, two passes over the row as torch computes it).
//
// Same scheme as rmsnorm.wgsl: ROW_THREADS threads per row reducing through
// `sum_across_row` (common.wgsl); the weight gradient is summed per block of rows into
// partials [blocks, C] that `reduce::sum_rows` finishes (the bias gradient is a plain
// `sum_rows` of dy).

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
// (common.wgsl), ROW_THREADS per row.
override WG: u32 = 256u;

@compute @workgroup_size(REDUCE_WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = row_of_thread(wid, nwg, lid);
    let lane = lane_in_row(lid);
    let cols = cols_of_row(row, params.rows, params.cols);
    let base = row * params.cols;
    let n = f32(params.cols);
    var sum = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        sum = sum + x[base + c];
    }
    let m = sum_across_row(lid, sum) / n;
    var squares = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        let d = x[base + c] - m;
        squares = squares + d * d;
    }
    let r = 1.0 / sqrt(sum_across_row(lid, squares) / n + params.eps);
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        y[base + c] = (x[base + c] - m) * r * w[c] + b[c];
    }
    if lane == 0u && cols > 0u {
        mean_out[row] = m;
        rstd_out[row] = r;
    }
}

// With x̂ = (x − mean) · rstd and g = dy · w: dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
@compute @workgroup_size(REDUCE_WG)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = row_of_thread(wid, nwg, lid);
    let lane = lane_in_row(lid);
    let cols = cols_of_row(row, params.rows, params.cols);
    let base = row * params.cols;
    let n = f32(params.cols);
    // Rows past the last one read no statistics (their loops are empty).
    let m = select(0.0, mean[min(row, params.rows - 1u)], cols > 0u);
    let r = select(0.0, rstd[min(row, params.rows - 1u)], cols > 0u);
    var g_sum = 0.0;
    var gx_sum = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        let g = dy[base + c] * w[c];
        g_sum = g_sum + g;
        gx_sum = gx_sum + g * (x[base + c] - m) * r;
    }
    let g_mean = sum_across_row(lid, g_sum) / n;
    let gx_mean = sum_across_row(lid, gx_sum) / n;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
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
