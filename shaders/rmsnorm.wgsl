// RMSNorm (Llama): y = x · rstd · w with rstd = 1/sqrt(mean(x²) + eps), per row of x [rows, C].
//
// Each row is reduced by ROW_THREADS threads through `sum_across_row` (common.wgsl), a
// fixed-order tree, so results are bit-identical across runs; a workgroup covers several
// narrow rows. The weight gradient is summed per block of rows into partials [blocks, C] (one
// thread per column and block); `reduce::sum_rows` finishes it.

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    // Rows that one thread of `rmsnorm_dw_partial` sums.
    rows_per_block: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(5) var<storage, read> rstd: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;
@group(0) @binding(8) var<storage, read_write> dw_partial: array<f32>;

// Threads per column block of `rmsnorm_dw_partial`. The row kernels run REDUCE_WG threads
// (common.wgsl), ROW_THREADS per row.
override WG: u32 = 256u;

@compute @workgroup_size(REDUCE_WG)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = row_of_thread(wid, nwg, lid);
    let lane = lane_in_row(lid);
    let cols = cols_of_row(row, params.rows, params.cols);
    let base = row * params.cols;
    var squares = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        let v = x[base + c];
        squares = squares + v * v;
    }
    let mean_square = sum_across_row(lid, squares) / f32(params.cols);
    let r = 1.0 / sqrt(mean_square + params.eps);
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        // (x · rstd) · w, in the order transformers' LlamaRMSNorm multiplies.
        y[base + c] = x[base + c] * r * w[c];
    }
    if lane == 0u && cols > 0u {
        rstd_out[row] = r;
    }
}

// dx = rstd · (g − x · rstd² · mean(g · x)) with g = dy · w.
@compute @workgroup_size(REDUCE_WG)
fn rmsnorm_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = row_of_thread(wid, nwg, lid);
    let lane = lane_in_row(lid);
    let cols = cols_of_row(row, params.rows, params.cols);
    let base = row * params.cols;
    var gx = 0.0;
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        gx = gx + dy[base + c] * w[c] * x[base + c];
    }
    let total = sum_across_row(lid, gx);
    if cols == 0u {
        return;
    }
    let r = rstd[row];
    let correction = r * r * total / f32(params.cols);
    for (var c = lane; c < cols; c = c + ROW_THREADS) {
        dx[base + c] = r * (dy[base + c] * w[c] - x[base + c] * correction);
    }
}

// dw_partial[block, c] = Σ over the block's rows of dy · x · rstd. Grid: x covers the columns,
// y the blocks of rows.
@compute @workgroup_size(WG)
fn rmsnorm_dw_partial(@builtin(global_invocation_id) gid: vec3<u32>) {
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
        total = total + dy[i] * x[i] * rstd[row];
    }
    dw_partial[block * params.cols + c] = total;
}
