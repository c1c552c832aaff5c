// General batched matrix product with f32 accumulation, for every layout the linear layers
// need (Y = X·Wᵀ, dX = dY·W, dW += dYᵀ·X) without transpose kernels:
//
//   C[b] = alpha · op(A[b]) · op(B[b])  (+ bias)  (+ C[b] when accumulating)
//
// op(A) is M×K and op(B) is K×N. A is stored [M, K] row-major, or [K, M] when TRANSPOSE_A;
// B is stored [K, N], or [N, K] when TRANSPOSE_B (PyTorch's weight layout). Every operand has
// an element offset, a row stride (leading dimension, so C may be a column window of a wider
// matrix) and a batch stride (0 broadcasts one matrix to the whole batch). B may hold f16 or
// bf16 values (B_FORMAT: frozen weights stored at half the memory); they are widened exactly
// to f32 as the tile is loaded, so everything after the load, and the result, is as for f32 B
// holding the same values.
//
// Each workgroup computes a tile of (4·A_GROUPS)×(4·B_GROUPS) elements of C, walking K in
// steps of TILE_K through workgroup memory; each thread keeps a BLOCK_M×BLOCK_N register
// block of the output. The launcher picks the sizes per shape and device (narrow tiles for
// narrow matrices, so that no work is wasted on padding). Every output element has one writer
// that sums over k = 0, 1, ... in order with one fma per step, whatever the tile sizes:
// results are bit-identical run to run and across tile configurations.

// The uniform parameters are GemmParams (common.wgsl), shared with matmul_subgroup.wgsl.

@group(0) @binding(0) var<uniform> params: GemmParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
// f32 bit patterns, or two 16-bit values per word when B_FORMAT is FORMAT_F16 or FORMAT_BF16
// (see half_of_word); read through b_element.
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// The layout, fixed when the pipeline is made.
override TRANSPOSE_A: bool = false;
override TRANSPOSE_B: bool = false;
// B's element type: FORMAT_F32, FORMAT_F16 or FORMAT_BF16 (common.wgsl).
override B_FORMAT: u32 = FORMAT_F32;
// Threads of a workgroup along M and N, and the depth of one K step.
override GROUP_M: u32 = 16u;
override GROUP_N: u32 = 16u;
override TILE_K: u32 = 16u;
// Rows and columns of C one thread computes: multiples of 4, at most MAX_BLOCK.
override BLOCK_M: u32 = 4u;
override BLOCK_N: u32 = 4u;

const MAX_BLOCK: u32 = 8u;
// vec4 groups of one thread's rows or columns.
const MAX_GROUPS: u32 = MAX_BLOCK / 4u;
alias Groups = array<vec4<f32>, MAX_GROUPS>;

// vec4 groups of rows of op(A) and of columns of op(B) in a workgroup's tile.
override A_GROUPS: u32 = GROUP_M * BLOCK_M / 4u;
override B_GROUPS: u32 = GROUP_N * BLOCK_N / 4u;

// k-major tiles, one vec4 per 4 consecutive rows (of op(A)) or columns (of op(B)):
// a_tile[kk * A_GROUPS + g] = op(A)[row0 + 4·g .. + 4, k0 + kk], and likewise b_tile.
// A thread owns the row groups ty, ty + GROUP_M, ... and the column groups tx, tx + GROUP_N,
// ...: neighbouring threads read neighbouring vec4s, and per kk a thread reads
// (BLOCK_M + BLOCK_N) / 4 vec4s for BLOCK_M · BLOCK_N multiply-adds.
var<workgroup> a_tile: array<vec4<f32>, TILE_K * A_GROUPS>;
var<workgroup> b_tile: array<vec4<f32>, TILE_K * B_GROUPS>;

// Index of element (row, col) of a matrix stored row-major with `row_stride`, or stored
// transposed (as [cols, rows]).
fn stored_index(row: u32, col: u32, row_stride: u32, transposed: bool) -> u32 {
    if transposed {
        return col * row_stride + row;
    }
    return row * row_stride + col;
}

// op(A)[row, col] of batch matrix `base`, or 0 outside the M×k_end matrix.
fn load_a(base: u32, row: u32, col: u32, k_end: u32) -> f32 {
    if row >= params.m || col >= k_end {
        return 0.0;
    }
    return a[base + stored_index(row, col, params.a_row_stride, TRANSPOSE_A)];
}

// Element `i` of B (counted in elements of B's type) as f32.
fn b_element(i: u32) -> f32 {
    if B_FORMAT == FORMAT_F32 {
        return bitcast<f32>(b[i]);
    }
    return bitcast<f32>(widen_16_bits(half_of_word(b[i / 2u], i), B_FORMAT));
}

// op(B)[row, col] of batch matrix `base`, or 0 outside the k_end×N matrix.
fn load_b(base: u32, row: u32, col: u32, k_end: u32) -> f32 {
    if row >= k_end || col >= params.n {
        return 0.0;
    }
    return b_element(base + stored_index(row, col, params.b_row_stride, TRANSPOSE_B));
}

// Which tile entry (kk, group of 4) load slot `slot` fills. Neighbouring threads take
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

// Fills a_tile and b_tile with the K step starting at k0 (zeros outside the matrices and
// from k_end on).
fn load_tiles(thread: u32, a_base: u32, b_base: u32, row0: u32, col0: u32, k0: u32,
              k_end: u32) {
    let threads = GROUP_M * GROUP_N;
    for (var slot = thread; slot < TILE_K * A_GROUPS; slot += threads) {
        let e = tile_entry(slot, A_GROUPS, !TRANSPOSE_A);
        let row = row0 + 4u * e.y;
        let k = k0 + e.x;
        a_tile[slot_index(e, A_GROUPS)] = vec4<f32>(
            load_a(a_base, row, k, k_end),
            load_a(a_base, row + 1u, k, k_end),
            load_a(a_base, row + 2u, k, k_end),
            load_a(a_base, row + 3u, k, k_end),
        );
    }
    for (var slot = thread; slot < TILE_K * B_GROUPS; slot += threads) {
        let e = tile_entry(slot, B_GROUPS, TRANSPOSE_B);
        let col = col0 + 4u * e.y;
        let k = k0 + e.x;
        b_tile[slot_index(e, B_GROUPS)] = vec4<f32>(
            load_b(b_base, k, col, k_end),
            load_b(b_base, k, col + 1u, k_end),
            load_b(b_base, k, col + 2u, k_end),
            load_b(b_base, k, col + 3u, k_end),
        );
    }
}

// One thread's share of C: the first row and column of its first groups, and its sums:
// sums[i][j] holds its row i (row i % 4 of its row group i / 4) and the 4 columns of its
// column group j.
struct Block {
    row: u32,
    col: u32,
    sums: array<Groups, MAX_BLOCK>,
}

// Row (or column) of C of a thread's element `i` of its groups starting at `first`, with
// `stride` between its groups.
fn block_index(first: u32, i: u32, stride: u32) -> u32 {
    return first + (i / 4u) * stride + i % 4u;
}

// op(A)·op(B) for this thread's block of this workgroup's tile (batch = workgroup z, or the
// part of K that workgroup z sums when K is split).
// Must be called in uniform control flow: it synchronises the workgroup. The loops over the
// block have constant trip counts, so the compiler unrolls them and keeps the block in
// registers.
fn multiply_block(wid: vec3<u32>, lid: vec3<u32>) -> Block {
    let split = params.k_split > 0u;
    let batch = select(wid.z, 0u, split);
    let k_begin = select(0u, wid.z * params.k_split, split);
    let k_end = select(params.k, min(k_begin + params.k_split, params.k), split);
    let a_base = params.a_offset + batch * params.a_batch_stride;
    let b_base = params.b_offset + batch * params.b_batch_stride;
    let tile_row0 = wid.y * 4u * A_GROUPS;
    let tile_col0 = wid.x * 4u * B_GROUPS;
    let thread = lid.y * GROUP_N + lid.x;

    var sums: array<Groups, MAX_BLOCK>;
    for (var k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        load_tiles(thread, a_base, b_base, tile_row0, tile_col0, k0, k_end);
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            var a_col: Groups;
            var b_row: Groups;
            for (var g = 0u; g < BLOCK_M / 4u; g++) {
                a_col[g] = a_tile[kk * A_GROUPS + lid.y + g * GROUP_M];
            }
            for (var g = 0u; g < BLOCK_N / 4u; g++) {
                b_row[g] = b_tile[kk * B_GROUPS + lid.x + g * GROUP_N];
            }
            for (var i = 0u; i < BLOCK_M; i++) {
                let a_value = vec4<f32>(a_col[i / 4u][i % 4u]);
                for (var j = 0u; j < BLOCK_N / 4u; j++) {
                    sums[i][j] = fma(a_value, b_row[j], sums[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    return Block(tile_row0 + 4u * lid.y, tile_col0 + 4u * lid.x, sums);
}

// Writes alpha·sums + col_bias (+ C) into this thread's block of C, inside the M×N bounds.
// col_bias[j] holds the bias of the thread's column group j.
fn store_block(block: Block, batch: u32, col_bias: Groups) {
    let c_base = params.c_offset + batch * params.c_batch_stride;
    // Copied into variables once: indexing a value (a parameter) with a loop counter makes
    // naga copy the whole value at every access (measured 25% of this kernel on lavapipe).
    var sums = block.sums;
    var bias_values = col_bias;
    for (var i = 0u; i < BLOCK_M; i++) {
        let row = block_index(block.row, i, 4u * GROUP_M);
        for (var j = 0u; j < BLOCK_N; j++) {
            let col = block_index(block.col, j, 4u * GROUP_N);
            var value = params.alpha * sums[i][j / 4u][j % 4u] + bias_values[j / 4u][j % 4u];
            // A guard rather than an early exit: loops without breaks unroll.
            if row < params.m && col < params.n {
                let index = c_base + row * params.c_row_stride + col;
                if params.accumulate == 1u {
                    value += c[index];
                }
                c[index] = value;
            }
        }
    }
}

// The bias of each of this thread's columns (0 past column N).
fn load_bias(block: Block) -> Groups {
    var v: Groups;
    for (var j = 0u; j < BLOCK_N; j++) {
        let col = block_index(block.col, j, 4u * GROUP_N);
        if col < params.n {
            v[j / 4u][j % 4u] = bias[params.bias_offset + col];
        }
    }
    return v;
}

// Grid: x covers N in tiles of 4·B_GROUPS columns, y covers M in tiles of 4·A_GROUPS rows,
// z the batch.
@compute @workgroup_size(GROUP_N, GROUP_M)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    store_block(multiply_block(wid, lid), wid.z, Groups());
}

// As gemm, plus bias[col] on every row.
@compute @workgroup_size(GROUP_N, GROUP_M)
fn gemm_bias(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let block = multiply_block(wid, lid);
    store_block(block, wid.z, load_bias(block));
}
