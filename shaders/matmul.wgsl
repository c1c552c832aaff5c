// General batched matrix product with f32 accumulation, for every layout the linear layers
// need (Y = X·Wᵀ, dX = dY·W, dW += dYᵀ·X) without transpose kernels:
//
//   C[b] = alpha · op(A[b]) · op(B[b])  (+ bias)  (+ C[b] when accumulating)
//
// op(A) is M×K and op(B) is K×N. A is stored [M, K] row-major, or [K, M] when TRANSPOSE_A;
// B is stored [K, N], or [N, K] when TRANSPOSE_B (PyTorch's weight layout). Every operand has
// an element offset, a row stride (leading dimension, so C may be a column window of a wider
// matrix) and a batch stride (0 broadcasts one matrix to the whole batch).
//
// Each workgroup computes a TILE_M×TILE_N block of C, walking K in steps of TILE_K through
// workgroup memory; each thread keeps a BLOCK×BLOCK register block of the output. Every output
// element has one writer that sums over k in a fixed order: results are bit-identical run to
// run (for one set of tile sizes).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_offset: u32,
    a_row_stride: u32,
    a_batch_stride: u32,
    b_offset: u32,
    b_row_stride: u32,
    b_batch_stride: u32,
    c_offset: u32,
    c_row_stride: u32,
    c_batch_stride: u32,
    bias_offset: u32,
    alpha: f32,
    // 1: C += product; 0: C = product.
    accumulate: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// The layout, fixed when the pipeline is made.
override TRANSPOSE_A: bool = false;
override TRANSPOSE_B: bool = false;
// Threads of a workgroup along M and N, and the depth of one K step.
override GROUP_M: u32 = 16u;
override GROUP_N: u32 = 16u;
override TILE_K: u32 = 16u;

// Each thread owns a BLOCK×BLOCK block of C: one vec4 accumulator per row.
const BLOCK: u32 = 4u;

// k-major tiles, one vec4 per BLOCK consecutive rows (of op(A)) or columns (of op(B)):
// a_tile[kk * GROUP_M + i] = op(A)[row0 + BLOCK·i .. + BLOCK, k0 + kk], and likewise b_tile,
// so the inner loop reads one vec4 of each and does BLOCK outer-product updates.
var<workgroup> a_tile: array<vec4<f32>, TILE_K * GROUP_M>;
var<workgroup> b_tile: array<vec4<f32>, TILE_K * GROUP_N>;

// Index of element (row, col) of a matrix stored row-major with `row_stride`, or stored
// transposed (as [cols, rows]).
fn stored_index(row: u32, col: u32, row_stride: u32, transposed: bool) -> u32 {
    if transposed {
        return col * row_stride + row;
    }
    return row * row_stride + col;
}

// op(A)[row, col] of batch matrix `base`, or 0 outside the M×K matrix.
fn load_a(base: u32, row: u32, col: u32) -> f32 {
    if row >= params.m || col >= params.k {
        return 0.0;
    }
    return a[base + stored_index(row, col, params.a_row_stride, TRANSPOSE_A)];
}

// op(B)[row, col] of batch matrix `base`, or 0 outside the K×N matrix.
fn load_b(base: u32, row: u32, col: u32) -> f32 {
    if row >= params.k || col >= params.n {
        return 0.0;
    }
    return b[base + stored_index(row, col, params.b_row_stride, TRANSPOSE_B)];
}

// Which tile entry (kk, group of BLOCK) load slot `slot` fills. Neighbouring threads take
// neighbouring addresses in memory: along k when the operand is stored k-contiguous, else
// along its M (or N) dimension.
fn tile_entry(slot: u32, groups: u32, k_contiguous: bool) -> vec2<u32> {
    if k_contiguous {
        return vec2<u32>(slot % TILE_K, slot / TILE_K);
    }
    return vec2<u32>(slot / groups, slot % groups);
}

// Position of tile entry e = (kk, group) in a_tile or b_tile.
fn slot_index(e: vec2<u32>, groups: u32) -> u32 {
    return e.x * groups + e.y;
}

// Fills a_tile and b_tile with the K step starting at k0 (zeros outside the matrices).
fn load_tiles(thread: u32, a_base: u32, b_base: u32, row0: u32, col0: u32, k0: u32) {
    let threads = GROUP_M * GROUP_N;
    for (var slot = thread; slot < TILE_K * GROUP_M; slot += threads) {
        let e = tile_entry(slot, GROUP_M, !TRANSPOSE_A);
        let row = row0 + BLOCK * e.y;
        let k = k0 + e.x;
        a_tile[slot_index(e, GROUP_M)] = vec4<f32>(
            load_a(a_base, row, k),
            load_a(a_base, row + 1u, k),
            load_a(a_base, row + 2u, k),
            load_a(a_base, row + 3u, k),
        );
    }
    for (var slot = thread; slot < TILE_K * GROUP_N; slot += threads) {
        let e = tile_entry(slot, GROUP_N, TRANSPOSE_B);
        let col = col0 + BLOCK * e.y;
        let k = k0 + e.x;
        b_tile[slot_index(e, GROUP_N)] = vec4<f32>(
            load_b(b_base, k, col),
            load_b(b_base, k, col + 1u),
            load_b(b_base, k, col + 2u),
            load_b(b_base, k, col + 3u),
        );
    }
}

// One thread's share of C: its first row and column and its BLOCK×BLOCK sums.
struct Block {
    row: u32,
    col: u32,
    sums: array<vec4<f32>, BLOCK>,
}

// op(A)·op(B) for this thread's block of this workgroup's tile (batch = workgroup z).
// Must be called in uniform control flow: it synchronises the workgroup.
fn multiply_block(wid: vec3<u32>, lid: vec3<u32>) -> Block {
    let batch = wid.z;
    let a_base = params.a_offset + batch * params.a_batch_stride;
    let b_base = params.b_offset + batch * params.b_batch_stride;
    let tile_row0 = wid.y * GROUP_M * BLOCK;
    let tile_col0 = wid.x * GROUP_N * BLOCK;
    let thread = lid.y * GROUP_N + lid.x;

    var sums: array<vec4<f32>, BLOCK>;
    for (var i = 0u; i < BLOCK; i++) {
        sums[i] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < params.k; k0 += TILE_K) {
        load_tiles(thread, a_base, b_base, tile_row0, tile_col0, k0);
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let a_col = a_tile[kk * GROUP_M + lid.y];
            let b_row = b_tile[kk * GROUP_N + lid.x];
            for (var i = 0u; i < BLOCK; i++) {
                sums[i] = fma(vec4<f32>(a_col[i]), b_row, sums[i]);
            }
        }
        workgroupBarrier();
    }
    return Block(tile_row0 + BLOCK * lid.y, tile_col0 + BLOCK * lid.x, sums);
}

// Writes alpha·sums + col_bias (+ C) into this thread's block of C, inside the M×N bounds.
fn store_block(block: Block, batch: u32, col_bias: vec4<f32>) {
    let c_base = params.c_offset + batch * params.c_batch_stride;
    for (var i = 0u; i < BLOCK; i++) {
        let row = block.row + i;
        if row >= params.m {
            break;
        }
        let values = params.alpha * block.sums[i] + col_bias;
        for (var j = 0u; j < BLOCK; j++) {
            let col = block.col + j;
            if col >= params.n {
                break;
            }
            let index = c_base + row * params.c_row_stride + col;
            var value = values[j];
            if params.accumulate == 1u {
                value += c[index];
            }
            c[index] = value;
        }
    }
}

// bias[col .. col + BLOCK] (0 past column N).
fn load_bias(col: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < BLOCK; j++) {
        if col + j < params.n {
            v[j] = bias[params.bias_offset + col + j];
        }
    }
    return v;
}

// Grid: x covers N in TILE_N columns, y covers M in TILE_M rows, z the batch.
@compute @workgroup_size(GROUP_N, GROUP_M)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let block = multiply_block(wid, lid);
    store_block(block, wid.z, vec4<f32>(0.0));
}

// As gemm, plus bias[col] on every row.
@compute @workgroup_size(GROUP_N, GROUP_M)
fn gemm_bias(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let block = multiply_block(wid, lid);
    store_block(block, wid.z, load_bias(block.col));
}
