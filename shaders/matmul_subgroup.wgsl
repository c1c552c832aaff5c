// The GEMM of matmul.wgsl (same Params, bindings, layouts and results, bit for bit) for
// adapters whose subgroups are 8 lanes that run as one SIMD vector: lavapipe on 256-bit
// vectors. There, every load a lane makes on its own costs a pass over the 8 lanes, while
// arithmetic and cross-lane moves cost one vector instruction. So here nothing goes through
// workgroup memory: each lane loads one vec4 of A per 8 rows and shares it with
// subgroupShuffle, and loads the vec4s of B for its own 8 columns; per 4 steps of k a lane
// makes 2 + 8 loads (16 rows) or 4 + 8 (32 rows) for 16 · 8 · 4 or 32 · 8 · 4 multiply-adds.
//
// The code is written out rather than looped: an unrolled block in registers is what makes
// this kernel fast (loops over a register array measured 10× slower, when naga's loop
// bounding still hid every trip count from the driver; the modules are now made without it,
// and the loops were not tried again).
//
// A workgroup is one subgroup. Lane L of workgroup (x, y, z) computes rows x·8·EIGHTS +
// 0..8·EIGHTS and 8 columns of C: col0 + L + 8·j (j = 0..7) when B is stored [N, K] (its vec4s
// run along k), or col0 + 4·L + 32·g + 0..3 (g = 0, 1) when B is stored [K, N] (they run along
// n), where col0 = 64·y. (Several subgroups per workgroup, side by side along N, ran no faster
// and made a pipeline per count: each costs lavapipe 0.3-0.4 s to create, even from Mesa's
// shader cache.) Row blocks come first in the grid so that the workgroups that run
// side by side, and one after another, read the same columns of B while they are in cache
// (measured 1.5× at M = 75 against columns first). Each output sums k = 0, 1, ... in order with one fma per step, as
// matmul.wgsl does. The launcher uses this kernel only where every vec4 is aligned (offsets
// and strides multiples of 4, and M (Aᵀ) or N (B as [K, N]) too, so that a vec4 lies wholly
// inside the matrix or wholly outside it).

// The uniform parameters are GemmParams (common.wgsl), as in matmul.wgsl.

@group(0) @binding(0) var<uniform> params: GemmParams;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
// f32 bit patterns, 4 to a vec4, or (B_FORMAT f16 or bf16) 8 16-bit values to a vec4: read
// through b_vec4.
@group(0) @binding(2) var<storage, read> b: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
// The second product's operands (SECOND; the launcher binds A and B again otherwise).
@group(0) @binding(5) var<storage, read> a2: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> b2: array<vec4<f32>>;

override TRANSPOSE_A: bool = false;
override TRANSPOSE_B: bool = false;
// B's element type: FORMAT_F32, FORMAT_F16 or FORMAT_BF16 (common.wgsl; frozen weights at
// half the memory), widened exactly as matmul.wgsl widens it, so that both kernels give the
// same bits.
override B_FORMAT: u32 = FORMAT_F32;
// Whether a second product, alpha2 · A2·op(B2), is summed into the same outputs after the
// first (its A2 scaled by alpha2 as it is loaded, so that the accumulators simply go on).
override SECOND: bool = false;
// Rows of C per lane, in eights: 2 or 4.
override EIGHTS: u32 = 2u;

const LANES: u32 = 8u;
const COLUMNS_PER_WORKGROUP: u32 = 64u;

// One row of a lane's block: its 8 columns in two vec4s.
struct Row {
    g0: vec4<f32>,
    g1: vec4<f32>,
}

// Eight rows of a lane's block.
struct Eight {
    r0: Row, r1: Row, r2: Row, r3: Row, r4: Row, r5: Row, r6: Row, r7: Row,
}

// B at k0 + 0..3 for the lane's 8 columns.
struct Panel {
    k0: Row, k1: Row, k2: Row, k3: Row,
}

// Where the operands of this workgroup's product start, which k it sums, and which batch
// entry of C (or slab of partial sums, when K is split) it writes.
// `second` picks the second product's operands (A2, B2: A2 never transposed).
struct Span {
    second: bool,
    a_transposed: bool,
    a_base: u32,
    a_row_stride: u32,
    b_base: u32,
    b_row_stride: u32,
    k_begin: u32,
    k_end: u32,
    c_batch: u32,
}

fn span(wid: vec3<u32>) -> Span {
    let split = params.k_split > 0u;
    let batch = select(wid.z, 0u, split);
    let k_begin = select(0u, wid.z * params.k_split, split);
    let k_end = select(params.k, min(k_begin + params.k_split, params.k), split);
    return Span(false, TRANSPOSE_A, params.a_offset + batch * params.a_batch_stride,
                params.a_row_stride, params.b_offset + batch * params.b_batch_stride,
                params.b_row_stride, k_begin, k_end, wid.z);
}

// The second product's operands (one batch entry, K never split).
fn second_span(wid: vec3<u32>) -> Span {
    return Span(true, false, params.a2_offset, params.a2_row_stride, params.b2_offset,
                params.b2_row_stride, 0u, params.k2, wid.z);
}

// `v` with the components of k0 + i at or past k_end set to 0.
fn mask_k(v: vec4<f32>, k0: u32, k_end: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), v, vec4<u32>(k0) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(k_end));
}

// The lane's vec4 of A for rows first..first + 7 and k0..k0 + 3: row first + lane (along k),
// or, A stored [K, M], k0 + lane / 2 at rows first + 4·(lane % 2) + 0..3.
fn load_a(s: Span, first: u32, k0: u32, lane: u32) -> vec4<f32> {
    if s.a_transposed {
        let k = k0 + lane / 2u;
        let row = min(first + 4u * (lane % 2u), params.m - 4u);
        let v = a_vec4(s.second, s.a_base + min(k, s.k_end - 1u) * s.a_row_stride + row);
        return select(vec4<f32>(0.0), v, k < s.k_end);
    }
    let row = min(first + lane, params.m - 1u);
    return mask_k(a_vec4(s.second, s.a_base + row * s.a_row_stride + k0), k0, s.k_end);
}

// Row i (0..7) of the eight rows whose A the lanes loaded into `v`: A at k0..k0 + 3.
fn a_row(v: vec4<f32>, i: u32, transposed: bool) -> vec4<f32> {
    if transposed {
        let q = i % 4u;
        let h = i / 4u;
        return vec4<f32>(subgroupShuffle(v[q], h), subgroupShuffle(v[q], 2u + h),
                         subgroupShuffle(v[q], 4u + h), subgroupShuffle(v[q], 6u + h));
    }
    return subgroupShuffle(v, i);
}

// Column j (0..7) of the lane's block.
fn lane_column(col0: u32, lane: u32, j: u32) -> u32 {
    if TRANSPOSE_B {
        return col0 + lane + LANES * j;
    }
    return col0 + 4u * lane + 32u * (j / 4u) + j % 4u;
}

// Elements e..e + 3 (e a multiple of 4) of A, or of A2 when `second`.
fn a_vec4(second: bool, e: u32) -> vec4<f32> {
    if second {
        return a2[e / 4u];
    }
    return a[e / 4u];
}

// Elements e..e + 3 of B (f32, f16 or bf16), or of B2 (f32) when `second`.
fn b_operand(second: bool, e: u32) -> vec4<f32> {
    if second {
        return b2[e / 4u];
    }
    return b_vec4(e);
}

// B's elements e..e + 3 (e a multiple of 4) as f32.
fn b_vec4(e: u32) -> vec4<f32> {
    if B_FORMAT == FORMAT_F32 {
        return bitcast<vec4<f32>>(b[e / 4u]);
    }
    let words = b[e / 8u];
    let pair = select(words.xy, words.zw, (e / 4u) % 2u == 1u);
    return bitcast<vec4<f32>>(vec4<u32>(
        widen_16_bits(half_of_word(pair.x, 0u), B_FORMAT),
        widen_16_bits(half_of_word(pair.x, 1u), B_FORMAT),
        widen_16_bits(half_of_word(pair.y, 0u), B_FORMAT),
        widen_16_bits(half_of_word(pair.y, 1u), B_FORMAT)));
}

// B stored [N, K]: the vec4 along k of column j.
fn b_column(s: Span, col0: u32, lane: u32, j: u32, k0: u32) -> vec4<f32> {
    let col = min(lane_column(col0, lane, j), params.n - 1u);
    return mask_k(b_operand(s.second, s.b_base + col * s.b_row_stride + k0), k0, s.k_end);
}

// B stored [K, N]: the lane's 8 columns at k.
fn b_row(s: Span, col0: u32, lane: u32, k: u32) -> Row {
    let col = min(col0 + 4u * lane, params.n - 4u);
    let base = s.b_base + min(k, s.k_end - 1u) * s.b_row_stride + col;
    let live = k < s.k_end;
    return Row(select(vec4<f32>(0.0), b_operand(s.second, base), live),
               select(vec4<f32>(0.0), b_operand(s.second, base + 32u),
                      live && col + 32u < params.n));
}

fn load_panel(s: Span, col0: u32, lane: u32, k0: u32) -> Panel {
    if TRANSPOSE_B {
        let c0 = b_column(s, col0, lane, 0u, k0);
        let c1 = b_column(s, col0, lane, 1u, k0);
        let c2 = b_column(s, col0, lane, 2u, k0);
        let c3 = b_column(s, col0, lane, 3u, k0);
        let c4 = b_column(s, col0, lane, 4u, k0);
        let c5 = b_column(s, col0, lane, 5u, k0);
        let c6 = b_column(s, col0, lane, 6u, k0);
        let c7 = b_column(s, col0, lane, 7u, k0);
        return Panel(
            Row(vec4<f32>(c0.x, c1.x, c2.x, c3.x), vec4<f32>(c4.x, c5.x, c6.x, c7.x)),
            Row(vec4<f32>(c0.y, c1.y, c2.y, c3.y), vec4<f32>(c4.y, c5.y, c6.y, c7.y)),
            Row(vec4<f32>(c0.z, c1.z, c2.z, c3.z), vec4<f32>(c4.z, c5.z, c6.z, c7.z)),
            Row(vec4<f32>(c0.w, c1.w, c2.w, c3.w), vec4<f32>(c4.w, c5.w, c6.w, c7.w)));
    }
    return Panel(b_row(s, col0, lane, k0), b_row(s, col0, lane, k0 + 1u),
                 b_row(s, col0, lane, k0 + 2u), b_row(s, col0, lane, k0 + 3u));
}

// acc + a.x·B[k0] + a.y·B[k0 + 1] + ..., one fma per element per k, in k order.
fn step(acc: Row, a: vec4<f32>, p: Panel) -> Row {
    var g0 = fma(vec4<f32>(a.x), p.k0.g0, acc.g0);
    var g1 = fma(vec4<f32>(a.x), p.k0.g1, acc.g1);
    g0 = fma(vec4<f32>(a.y), p.k1.g0, g0);
    g1 = fma(vec4<f32>(a.y), p.k1.g1, g1);
    g0 = fma(vec4<f32>(a.z), p.k2.g0, g0);
    g1 = fma(vec4<f32>(a.z), p.k2.g1, g1);
    g0 = fma(vec4<f32>(a.w), p.k3.g0, g0);
    g1 = fma(vec4<f32>(a.w), p.k3.g1, g1);
    return Row(g0, g1);
}

// The eight rows whose A the lanes loaded into `v` (stored transposed or not), 4 steps of k.
fn step_eight(e: Eight, v: vec4<f32>, t: bool, p: Panel) -> Eight {
    return Eight(step(e.r0, a_row(v, 0u, t), p), step(e.r1, a_row(v, 1u, t), p),
                 step(e.r2, a_row(v, 2u, t), p), step(e.r3, a_row(v, 3u, t), p),
                 step(e.r4, a_row(v, 4u, t), p), step(e.r5, a_row(v, 5u, t), p),
                 step(e.r6, a_row(v, 6u, t), p), step(e.r7, a_row(v, 7u, t), p));
}

// The block after 4·steps more steps of k over the operands of `s` (A scaled by `scale`).
fn accumulate_block(block: Block, s: Span, scale: f32, row0: u32, col0: u32, lane: u32) -> Block {
    var e0 = block.e0;
    var e1 = block.e1;
    var e2 = block.e2;
    var e3 = block.e3;
    let t = s.a_transposed;
    for (var k0 = s.k_begin; k0 < s.k_end; k0 += 4u) {
        let p = load_panel(s, col0, lane, k0);
        e0 = step_eight(e0, scale * load_a(s, row0, k0, lane), t, p);
        e1 = step_eight(e1, scale * load_a(s, row0 + 8u, k0, lane), t, p);
        if EIGHTS == 4u {
            e2 = step_eight(e2, scale * load_a(s, row0 + 16u, k0, lane), t, p);
            e3 = step_eight(e3, scale * load_a(s, row0 + 24u, k0, lane), t, p);
        }
    }
    return Block(e0, e1, e2, e3);
}

// Writes alpha·sum + bias (+ C) at column `col` of a row of C, inside the N bound.
fn store_one(sum: f32, bias_value: f32, c_row: u32, col: u32) {
    if col < params.n {
        var value = params.alpha * sum + bias_value;
        if params.accumulate == 1u {
            value += c[c_row + col];
        }
        c[c_row + col] = value;
    }
}

// One row of the lane's block, inside the M bound (written out: a loop over a local array
// would index it dynamically, which lavapipe turns into memory accesses lane by lane).
fn store_row(acc: Row, bias_row: Row, row: u32, s: Span, col0: u32, lane: u32) {
    if row >= params.m {
        return;
    }
    let c_row = params.c_offset + s.c_batch * params.c_batch_stride + row * params.c_row_stride;
    store_one(acc.g0.x, bias_row.g0.x, c_row, lane_column(col0, lane, 0u));
    store_one(acc.g0.y, bias_row.g0.y, c_row, lane_column(col0, lane, 1u));
    store_one(acc.g0.z, bias_row.g0.z, c_row, lane_column(col0, lane, 2u));
    store_one(acc.g0.w, bias_row.g0.w, c_row, lane_column(col0, lane, 3u));
    store_one(acc.g1.x, bias_row.g1.x, c_row, lane_column(col0, lane, 4u));
    store_one(acc.g1.y, bias_row.g1.y, c_row, lane_column(col0, lane, 5u));
    store_one(acc.g1.z, bias_row.g1.z, c_row, lane_column(col0, lane, 6u));
    store_one(acc.g1.w, bias_row.g1.w, c_row, lane_column(col0, lane, 7u));
}

fn store_eight(e: Eight, bias_row: Row, first: u32, s: Span, col0: u32, lane: u32) {
    store_row(e.r0, bias_row, first, s, col0, lane);
    store_row(e.r1, bias_row, first + 1u, s, col0, lane);
    store_row(e.r2, bias_row, first + 2u, s, col0, lane);
    store_row(e.r3, bias_row, first + 3u, s, col0, lane);
    store_row(e.r4, bias_row, first + 4u, s, col0, lane);
    store_row(e.r5, bias_row, first + 5u, s, col0, lane);
    store_row(e.r6, bias_row, first + 6u, s, col0, lane);
    store_row(e.r7, bias_row, first + 7u, s, col0, lane);
}

// One lane's share of the product: its 8·EIGHTS rows (e2 and e3 unused with 2 eights).
struct Block {
    e0: Eight, e1: Eight, e2: Eight, e3: Eight,
}

// Where a lane's block lies: its first row and its wave's first column.
fn block_row0(wid: vec3<u32>) -> u32 {
    return wid.x * 8u * EIGHTS;
}

fn block_col0(wid: vec3<u32>) -> u32 {
    return wid.y * COLUMNS_PER_WORKGROUP;
}

// The lane's block of op(A)·op(B), then (SECOND) of alpha2·A2·op(B2) summed on by the same
// accumulators (lane = local x: the launcher checks that a subgroup is exactly the workgroup's
// 8 invocations). One loop over the products, not a call for each: lavapipe's time to create
// a pipeline, even from its shader cache, grows with the code once every call is inlined
// (a quarter less this way).
fn multiply(wid: vec3<u32>, lid: vec3<u32>) -> Block {
    let lane = lid.x;
    let row0 = block_row0(wid);
    let col0 = block_col0(wid);
    var block = Block();
    for (var product = 0u; product < select(1u, 2u, SECOND); product++) {
        // A constant false without SECOND, so that the first product's code is as before.
        let second = SECOND && product == 1u;
        var s = span(wid);
        if second {
            s = second_span(wid);
        }
        // A scale of 1 multiplies exactly: the first product's values are A's own.
        block = accumulate_block(block, s, select(1.0, params.alpha2, second), row0, col0, lane);
    }
    return block;
}

fn store_block(block: Block, bias_row: Row, wid: vec3<u32>, lid: vec3<u32>) {
    let lane = lid.x;
    let s = span(wid);
    let row0 = block_row0(wid);
    let col0 = block_col0(wid);
    store_eight(block.e0, bias_row, row0, s, col0, lane);
    store_eight(block.e1, bias_row, row0 + 8u, s, col0, lane);
    if EIGHTS == 4u {
        store_eight(block.e2, bias_row, row0 + 16u, s, col0, lane);
        store_eight(block.e3, bias_row, row0 + 24u, s, col0, lane);
    }
}

// bias[col], or 0 past column N.
fn bias_at(col: u32) -> f32 {
    return select(0.0, bias[params.bias_offset + min(col, params.n - 1u)], col < params.n);
}

// The bias of the lane's 8 columns.
fn lane_bias(wid: vec3<u32>, lid: vec3<u32>) -> Row {
    let col0 = block_col0(wid);
    let lane = lid.x;
    return Row(vec4<f32>(bias_at(lane_column(col0, lane, 0u)), bias_at(lane_column(col0, lane, 1u)),
                         bias_at(lane_column(col0, lane, 2u)), bias_at(lane_column(col0, lane, 3u))),
               vec4<f32>(bias_at(lane_column(col0, lane, 4u)), bias_at(lane_column(col0, lane, 5u)),
                         bias_at(lane_column(col0, lane, 6u)), bias_at(lane_column(col0, lane, 7u))));
}

// Grid: x covers M in 8·EIGHTS rows, y covers N in 64 columns, z the batch (or the
// parts of a split K).
@compute @workgroup_size(LANES)
fn gemm_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>) {
    store_block(multiply(wid, lid), Row(), wid, lid);
}

// As gemm_subgroup, plus bias[col] on every row.
@compute @workgroup_size(LANES)
fn gemm_subgroup_bias(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    store_block(multiply(wid, lid), lane_bias(wid, lid), wid, lid);
}
