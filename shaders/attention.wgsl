// Causal multi-head self-attention with grouped-query heads and right padding, flash style:
// the [T, T] score matrix never exists in memory.
//
// Layouts (row-major, as the projections write them): q, out, dout [B, Tq, Hq, D];
// k, v [B, Tkv, Hkv, D]; lse [B, Hq, Tq]; seq_lens [B]. Query t of batch b sits at position
// pos = q_offset + t and attends the keys j <= pos with j < seq_lens[b]; a query with
// pos >= seq_lens[b] is padding (out = 0, lse = 0, no gradient). Query head h reads kv head
// h / (Hq / Hkv): grouped heads share K and V by index. With row_starts set (the forward of
// rows decoded side by side after different numbers of cached tokens), seq_lens is [2B] and
// row b's queries start at position seq_lens[B + b] instead of q_offset.
//
// Every kernel but the preprocess gives one workgroup ROWS "outer" rows and streams tiles of
// INNER rows of the other side past them. The outer rows are queries in the forward and dQ,
// keys in dK/dV. Each outer row r is owned by LANES threads; lane l owns the head dimensions
// l, l + LANES, ... (at most MAX_DIMS_PER_LANE of them) of the row's accumulators.
//
// Workgroup tiles, each holding two halves (A and B):
//              outer A    outer B    inner A    inner B    weights A        weights B
//   forward    scale·Q    -          K          V          scores           probabilities
//   dQ         scale·Q    dO         K          V          probabilities    dS
//   dK, dV     K          V          scale·Q    dO         probabilities    dS
// so scores are always outer A · inner A and dP = outer B · inner B; the output and dV mix
// weights with inner B, dQ and dK mix dS with inner A. Folding the scale into Q makes dK come
// out scaled, and dQ is scaled once when written.
//
// Small heads (HEAD_DIM <= 4·MAX_ROW_GROUPS) take the "_rows" entry points instead: one thread
// per outer row, which keeps its whole row (and accumulators) in registers as vec4 groups and
// streams tiles of INNER rows of the other side through workgroup memory as vec4 rows. Every
// score is then a register dot product with no exchange between threads, and the softmax runs
// online per key (see `attention_forward_rows`). The lane layout above spreads a row over
// LANES threads instead, which large heads need (a 128-wide row does not fit one thread's
// registers), at the price of passing scores through workgroup memory.
//
// Deterministic: every sum runs in a fixed order, and dK/dV of a kv head sums over all query
// heads of its group inside one workgroup; nothing is written by two workgroups.

struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    q_offset: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    row_starts: u32,
}

// What the backward needs per query row, made by `attention_backward_preprocess`.
struct RowStats {
    // logsumexp of the row's scaled scores, from the forward.
    lse: f32,
    // rowsum(dout ∘ out).
    delta: f32,
    // How many keys the row attends (a prefix 0..keys); 0 for padding rows.
    keys: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> seq_lens: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
@group(0) @binding(7) var<storage, read> saved_out: array<f32>;
@group(0) @binding(8) var<storage, read> saved_lse: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<f32>;
@group(0) @binding(10) var<storage, read_write> stats_out: array<RowStats>;
@group(0) @binding(11) var<storage, read> stats: array<RowStats>;
@group(0) @binding(12) var<storage, read_write> dq: array<f32>;
@group(0) @binding(13) var<storage, read_write> dk: array<f32>;
@group(0) @binding(14) var<storage, read_write> dv: array<f32>;

override HEAD_DIM: u32 = 64u;
override ROWS: u32 = 16u;
override LANES: u32 = 16u;
override INNER: u32 = 16u;
override WG: u32 = ROWS * LANES;
override DIMS_PER_LANE: u32 = (HEAD_DIM + LANES - 1u) / LANES;
// Threads per workgroup of the preprocess (one thread per query row).
override ROW_WG: u32 = 64u;

const MAX_DIMS_PER_LANE: u32 = 8u;
// A lane's share of one row's [HEAD_DIM] accumulator.
alias LaneVec = array<f32, MAX_DIMS_PER_LANE>;

// Score of a masked (query, key) pair: far below any real score, yet finite, so that
// exp(MASKED - MASKED) = 1 keeps a fully masked tile free of NaN.
const MASKED: f32 = -1.0e30;
const TILE_A: u32 = 0u;
const TILE_B: u32 = 1u;

var<workgroup> outer: array<f32, 2u * ROWS * HEAD_DIM>;
var<workgroup> inner: array<f32, 2u * INNER * HEAD_DIM>;
var<workgroup> weights: array<f32, 2u * ROWS * INNER>;
var<workgroup> inner_stats: array<RowStats, INNER>;

// ---- indexing and masking ----

fn query_row_start(b: u32, t: u32, h: u32) -> u32 {
    return ((b * params.q_len + t) * params.n_heads + h) * HEAD_DIM;
}

fn key_row_start(b: u32, j: u32, kv_head: u32) -> u32 {
    return ((b * params.kv_len + j) * params.n_kv_heads + kv_head) * HEAD_DIM;
}

// Index of query row (b, h, t) in lse and the row statistics ([B, Hq, Tq]).
fn stats_index(b: u32, h: u32, t: u32) -> u32 {
    return (b * params.n_heads + h) * params.q_len + t;
}

fn kv_head_of(h: u32) -> u32 {
    return h / (params.n_heads / params.n_kv_heads);
}

// Keys of batch b that hold tokens: the rest is right padding.
fn valid_len(b: u32) -> u32 {
    return min(seq_lens[b], params.kv_len);
}

// Position of query 0 of batch b: q_offset, or the row's own start (see the header).
fn query_start(b: u32) -> u32 {
    if params.row_starts != 0u {
        return seq_lens[params.batch + b];
    }
    return params.q_offset;
}

// How many keys query t of batch b attends: pos + 1 (causal), or 0 for a padding row (also
// for t past the end, so that tile rows beyond q_len drop out).
fn attended_keys(b: u32, t: u32) -> u32 {
    let pos = query_start(b) + t;
    return select(0u, pos + 1u, t < params.q_len && pos < valid_len(b));
}

// One past the last key any query of the tile q0.. attends (0 if all are padding). Uniform.
fn forward_key_end(b: u32, q0: u32) -> u32 {
    let valid = valid_len(b);
    let start = query_start(b);
    if start + q0 >= valid {
        return 0u;
    }
    return min(valid, start + min(q0 + ROWS, params.q_len));
}

// The same bound in the backward, which reads the padding from the row statistics: valid
// rows form a prefix, so a tile whose first row is padding is padding throughout. Uniform.
fn backward_key_end(b: u32, h: u32, q0: u32) -> u32 {
    if stats[stats_index(b, h, q0)].keys == 0u {
        return 0u;
    }
    return min(params.kv_len, params.q_offset + min(q0 + ROWS, params.q_len));
}

// ---- tile loads (rows past the end of a tensor read as zero) ----

fn scaled_query(b: u32, t: u32, h: u32, d: u32) -> f32 {
    if t >= params.q_len {
        return 0.0;
    }
    return params.scale * q[query_row_start(b, t, h) + d];
}

fn dout_element(b: u32, t: u32, h: u32, d: u32) -> f32 {
    if t >= params.q_len {
        return 0.0;
    }
    return dout[query_row_start(b, t, h) + d];
}

fn key_element(b: u32, j: u32, kv_head: u32, d: u32) -> f32 {
    if j >= params.kv_len {
        return 0.0;
    }
    return k[key_row_start(b, j, kv_head) + d];
}

fn value_element(b: u32, j: u32, kv_head: u32, d: u32) -> f32 {
    if j >= params.kv_len {
        return 0.0;
    }
    return v[key_row_start(b, j, kv_head) + d];
}

// outer A <- scale·Q rows q0 .. q0 + ROWS of head h.
fn fill_outer_with_queries(b: u32, h: u32, q0: u32, lid: u32) {
    for (var i = lid; i < ROWS * HEAD_DIM; i += WG) {
        outer[i] = scaled_query(b, q0 + i / HEAD_DIM, h, i % HEAD_DIM);
    }
}

// outer B <- dO rows q0 .. q0 + ROWS of head h.
fn fill_outer_with_douts(b: u32, h: u32, q0: u32, lid: u32) {
    for (var i = lid; i < ROWS * HEAD_DIM; i += WG) {
        outer[ROWS * HEAD_DIM + i] = dout_element(b, q0 + i / HEAD_DIM, h, i % HEAD_DIM);
    }
}

// outer A, B <- K, V rows k0 .. k0 + ROWS of a kv head.
fn fill_outer_with_keys(b: u32, kv_head: u32, k0: u32, lid: u32) {
    for (var i = lid; i < ROWS * HEAD_DIM; i += WG) {
        let j = k0 + i / HEAD_DIM;
        outer[i] = key_element(b, j, kv_head, i % HEAD_DIM);
        outer[ROWS * HEAD_DIM + i] = value_element(b, j, kv_head, i % HEAD_DIM);
    }
}

// inner A, B <- K, V rows j0 .. j0 + INNER of a kv head.
fn fill_inner_with_keys(b: u32, kv_head: u32, j0: u32, lid: u32) {
    for (var i = lid; i < INNER * HEAD_DIM; i += WG) {
        let j = j0 + i / HEAD_DIM;
        inner[i] = key_element(b, j, kv_head, i % HEAD_DIM);
        inner[INNER * HEAD_DIM + i] = value_element(b, j, kv_head, i % HEAD_DIM);
    }
}

// inner A, B <- scale·Q, dO rows i0 .. i0 + INNER of head h, with their row statistics.
fn fill_inner_with_queries(b: u32, h: u32, i0: u32, lid: u32) {
    for (var i = lid; i < INNER * HEAD_DIM; i += WG) {
        let t = i0 + i / HEAD_DIM;
        inner[i] = scaled_query(b, t, h, i % HEAD_DIM);
        inner[INNER * HEAD_DIM + i] = dout_element(b, t, h, i % HEAD_DIM);
    }
    for (var c = lid; c < INNER; c += WG) {
        inner_stats[c] = row_stats(b, h, i0 + c);
    }
}

fn row_stats(b: u32, h: u32, t: u32) -> RowStats {
    if t >= params.q_len {
        return RowStats(0.0, 0.0, 0u);
    }
    return stats[stats_index(b, h, t)];
}

// ---- tile arithmetic ----

// Σ_d outer[tile][r, d] · inner[tile][c, d]
fn outer_dot_inner(tile: u32, r: u32, c: u32) -> f32 {
    let outer_start = (tile * ROWS + r) * HEAD_DIM;
    let inner_start = (tile * INNER + c) * HEAD_DIM;
    var total = 0.0;
    for (var d = 0u; d < HEAD_DIM; d++) {
        total += outer[outer_start + d] * inner[inner_start + d];
    }
    return total;
}

fn weight_index(tile: u32, r: u32, c: u32) -> u32 {
    return (tile * ROWS + r) * INNER + c;
}

// For every dimension d this lane owns: keep·acc[d] + Σ_c weights[w][r, c] · inner[i][c, d].
fn mix_inner(acc: LaneVec, keep: f32, w: u32, i: u32, r: u32, lane: u32) -> LaneVec {
    var result = acc;
    for (var slot = 0u; slot < DIMS_PER_LANE; slot++) {
        result[slot] *= keep;
    }
    // Each weight is read once and used for all the lane's dimensions.
    for (var c = 0u; c < INNER; c++) {
        let weight = weights[weight_index(w, r, c)];
        let row = (i * INNER + c) * HEAD_DIM;
        for (var slot = 0u; slot < DIMS_PER_LANE; slot++) {
            let d = lane + slot * LANES;
            if d < HEAD_DIM {
                result[slot] += weight * inner[row + d];
            }
        }
    }
    return result;
}

// max_c weights[A][r, c] (the raw scores in the forward).
fn row_max_score(r: u32) -> f32 {
    var m = MASKED;
    for (var c = 0u; c < INNER; c++) {
        m = max(m, weights[weight_index(TILE_A, r, c)]);
    }
    return m;
}

fn row_sum(tile: u32, r: u32) -> f32 {
    var total = 0.0;
    for (var c = 0u; c < INNER; c++) {
        total += weights[weight_index(tile, r, c)];
    }
    return total;
}

// Backward: for the pair (outer row r, inner row c) stores P = exp(score - lse) (0 unless
// attended) in weights A and dS = P·(dP - delta) in weights B.
fn store_probability_and_gradient(r: u32, c: u32, attended: bool, row_lse: f32, delta: f32) {
    let p = select(0.0, exp(outer_dot_inner(TILE_A, r, c) - row_lse), attended);
    let dp = outer_dot_inner(TILE_B, r, c);
    weights[weight_index(TILE_A, r, c)] = p;
    weights[weight_index(TILE_B, r, c)] = p * (dp - delta);
}

// ---- forward ----

// Grid: (query tiles, Hq, B).
@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let r = lid / LANES;
    let lane = lid % LANES;
    let t = q0 + r;
    let keys = attended_keys(b, t);
    let kv_end = forward_key_end(b, q0);

    fill_outer_with_queries(b, h, q0, lid);
    // Online softmax: running max m, running sum l, unnormalised output acc.
    var m = MASKED;
    var l = 0.0;
    var acc = LaneVec();
    for (var j0 = 0u; j0 < kv_end; j0 += INNER) {
        workgroupBarrier(); // the previous tile has been read
        fill_inner_with_keys(b, kv_head_of(h), j0, lid);
        workgroupBarrier();
        for (var c = lane; c < INNER; c += LANES) {
            let score = outer_dot_inner(TILE_A, r, c);
            weights[weight_index(TILE_A, r, c)] = select(MASKED, score, j0 + c < keys);
        }
        workgroupBarrier();
        let m_new = max(m, row_max_score(r));
        for (var c = lane; c < INNER; c += LANES) {
            let p = exp(weights[weight_index(TILE_A, r, c)] - m_new);
            weights[weight_index(TILE_B, r, c)] = select(0.0, p, j0 + c < keys);
        }
        workgroupBarrier();
        let keep = exp(m - m_new);
        l = keep * l + row_sum(TILE_B, r);
        acc = mix_inner(acc, keep, TILE_B, TILE_B, r, lane);
        m = m_new;
    }

    if t >= params.q_len {
        return;
    }
    let attends = keys > 0u;
    let inv_l = select(0.0, 1.0 / l, attends);
    let start = query_row_start(b, t, h);
    for (var slot = 0u; slot < DIMS_PER_LANE; slot++) {
        let d = lane + slot * LANES;
        if d < HEAD_DIM {
            out[start + d] = inv_l * acc[slot];
        }
    }
    if lane == 0u {
        lse[stats_index(b, h, t)] = select(0.0, m + log(l), attends);
    }
}

// ---- backward ----

// One thread per query row (rows in [B, Hq, Tq] order): the row statistics the dQ and dK/dV
// kernels read instead of seq_lens, lse and out.
@compute @workgroup_size(ROW_WG)
fn attention_backward_preprocess(@builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let row = flat_invocation_id(wid, nwg, lid, ROW_WG);
    if row >= params.batch * params.n_heads * params.q_len {
        return;
    }
    let t = row % params.q_len;
    let h = (row / params.q_len) % params.n_heads;
    let b = row / (params.q_len * params.n_heads);
    let keys = attended_keys(b, t);
    var delta = 0.0;
    if keys > 0u {
        let start = query_row_start(b, t, h);
        for (var d = 0u; d < HEAD_DIM; d++) {
            delta += dout[start + d] * saved_out[start + d];
        }
    }
    stats_out[row] = RowStats(select(0.0, saved_lse[row], keys > 0u), delta, keys);
}

// dQ = scale · Σ_j dS[t, j] · K[j]. Grid: (query tiles, Hq, B).
@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let r = lid / LANES;
    let lane = lid % LANES;
    let t = q0 + r;
    let own = row_stats(b, h, t);
    let kv_end = backward_key_end(b, h, q0);

    fill_outer_with_queries(b, h, q0, lid);
    fill_outer_with_douts(b, h, q0, lid);
    var acc = LaneVec();
    for (var j0 = 0u; j0 < kv_end; j0 += INNER) {
        workgroupBarrier();
        fill_inner_with_keys(b, kv_head_of(h), j0, lid);
        workgroupBarrier();
        for (var c = lane; c < INNER; c += LANES) {
            store_probability_and_gradient(r, c, j0 + c < own.keys, own.lse, own.delta);
        }
        workgroupBarrier();
        acc = mix_inner(acc, 1.0, TILE_B, TILE_A, r, lane);
    }

    if t >= params.q_len {
        return;
    }
    let start = query_row_start(b, t, h);
    for (var slot = 0u; slot < DIMS_PER_LANE; slot++) {
        let d = lane + slot * LANES;
        if d < HEAD_DIM {
            dq[start + d] = params.scale * acc[slot];
        }
    }
}

// dV = Σ P[t, j] · dO[t] and dK = Σ dS[t, j] · scale·Q[t] over every query t of every query
// head of the group. Grid: (key tiles, Hkv, B). Training case only (Tq == Tkv, q_offset 0).
@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let kv_head = wid.y;
    let k0 = wid.x * ROWS;
    let r = lid / LANES;
    let lane = lid % LANES;
    let j = k0 + r;
    let group = params.n_heads / params.n_kv_heads;

    fill_outer_with_keys(b, kv_head, k0, lid);
    var dk_acc = LaneVec();
    var dv_acc = LaneVec();
    for (var g = 0u; g < group; g++) {
        let h = kv_head * group + g;
        // Queries before k0 attend none of these keys.
        for (var i0 = k0; i0 < params.q_len; i0 += INNER) {
            // Valid rows form a prefix: from the first padding row on, nothing contributes.
            if stats[stats_index(b, h, i0)].keys == 0u {
                break;
            }
            workgroupBarrier();
            fill_inner_with_queries(b, h, i0, lid);
            workgroupBarrier();
            for (var c = lane; c < INNER; c += LANES) {
                let row = inner_stats[c];
                store_probability_and_gradient(r, c, j < row.keys, row.lse, row.delta);
            }
            workgroupBarrier();
            dv_acc = mix_inner(dv_acc, 1.0, TILE_A, TILE_B, r, lane);
            dk_acc = mix_inner(dk_acc, 1.0, TILE_B, TILE_A, r, lane);
        }
    }

    if j >= params.kv_len {
        return;
    }
    let start = key_row_start(b, j, kv_head);
    for (var slot = 0u; slot < DIMS_PER_LANE; slot++) {
        let d = lane + slot * LANES;
        if d < HEAD_DIM {
            dk[start + d] = dk_acc[slot];
            dv[start + d] = dv_acc[slot];
        }
    }
}

// ---- small heads: one thread per outer row ----

// Rows of at most MAX_ROW_GROUPS vec4s (HEAD_DIM <= 64) live in one thread's registers.
const MAX_ROW_GROUPS: u32 = 16u;
alias RowVec = array<vec4<f32>, MAX_ROW_GROUPS>;
// vec4 groups of a row (the last one zero-padded past HEAD_DIM).
override GROUPS: u32 = (HEAD_DIM + 3u) / 4u;

// Streamed tiles as vec4 rows: A (K, or scale·Q in dK/dV) then B (V, or dO).
var<workgroup> stream: array<vec4<f32>, 2u * INNER * GROUPS>;

// Group g (elements 4g .. 4g + 3, zero past HEAD_DIM) of a row of each input. One loader per
// tensor: WGSL cannot take a storage buffer as an argument, and one loader that switched over
// tensors would make every entry point bind all four (the forward has no dout).

fn query_group(b: u32, t: u32, h: u32, g: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var d = 4u * g; d < min(4u * g + 4u, HEAD_DIM); d++) {
        v[d % 4u] = scaled_query(b, t, h, d);
    }
    return v;
}

fn dout_group(b: u32, t: u32, h: u32, g: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var d = 4u * g; d < min(4u * g + 4u, HEAD_DIM); d++) {
        v[d % 4u] = dout_element(b, t, h, d);
    }
    return v;
}

fn key_group(b: u32, j: u32, kv_head: u32, g: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var d = 4u * g; d < min(4u * g + 4u, HEAD_DIM); d++) {
        v[d % 4u] = key_element(b, j, kv_head, d);
    }
    return v;
}

fn value_group(b: u32, j: u32, kv_head: u32, g: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var d = 4u * g; d < min(4u * g + 4u, HEAD_DIM); d++) {
        v[d % 4u] = value_element(b, j, kv_head, d);
    }
    return v;
}

// Element d of a row held in registers.
fn row_value(v: ptr<function, RowVec>, d: u32) -> f32 {
    return (*v)[d / 4u][d % 4u];
}

fn stream_index(tile: u32, c: u32, g: u32) -> u32 {
    return (tile * INNER + c) * GROUPS + g;
}

// Stream A, B <- K, V rows j0 .. j0 + INNER of a kv head.
fn stream_keys(b: u32, kv_head: u32, j0: u32, lid: u32) {
    for (var i = lid; i < INNER * GROUPS; i += ROWS) {
        let c = i / GROUPS;
        let g = i % GROUPS;
        stream[stream_index(TILE_A, c, g)] = key_group(b, j0 + c, kv_head, g);
        stream[stream_index(TILE_B, c, g)] = value_group(b, j0 + c, kv_head, g);
    }
}

// Stream A, B <- scale·Q, dO rows i0 .. i0 + INNER of head h, with their row statistics.
fn stream_queries(b: u32, h: u32, i0: u32, lid: u32) {
    for (var i = lid; i < INNER * GROUPS; i += ROWS) {
        let c = i / GROUPS;
        let g = i % GROUPS;
        stream[stream_index(TILE_A, c, g)] = query_group(b, i0 + c, h, g);
        stream[stream_index(TILE_B, c, g)] = dout_group(b, i0 + c, h, g);
    }
    for (var c = lid; c < INNER; c += ROWS) {
        inner_stats[c] = row_stats(b, h, i0 + c);
    }
}

// row · (row c of stream tile `tile`).
fn dot_streamed(row: ptr<function, RowVec>, tile: u32, c: u32) -> f32 {
    var total = 0.0;
    for (var g = 0u; g < GROUPS; g++) {
        total += dot((*row)[g], stream[stream_index(tile, c, g)]);
    }
    return total;
}

// acc = keep·acc + weight·(row c of stream tile `tile`).
fn mix_streamed(acc: ptr<function, RowVec>, keep: f32, weight: f32, tile: u32, c: u32) {
    for (var g = 0u; g < GROUPS; g++) {
        (*acc)[g] = keep * (*acc)[g] + weight * stream[stream_index(tile, c, g)];
    }
}

// How many of the INNER streamed rows from `first` on a row uses that attends the prefix
// 0..attended of the streamed side.
fn attended_in_tile(attended: u32, first: u32) -> u32 {
    return min(INNER, attended - min(attended, first));
}

// The forward for small heads. Grid: (query tiles of ROWS, Hq, B).
@compute @workgroup_size(ROWS)
fn attention_forward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let t = q0 + lid;
    let keys = attended_keys(b, t);
    let kv_end = forward_key_end(b, q0);

    var query: RowVec;
    for (var g = 0u; g < GROUPS; g++) {
        query[g] = query_group(b, t, h, g);
    }
    // Online softmax per key: running max m, running sum l, unnormalised output acc. The
    // first key meets m = MASKED, so keep = exp(MASKED - m_new) = 0 clears the empty start.
    var m = MASKED;
    var l = 0.0;
    var acc: RowVec;
    for (var j0 = 0u; j0 < kv_end; j0 += INNER) {
        workgroupBarrier(); // the previous tile has been read
        stream_keys(b, kv_head_of(h), j0, lid);
        workgroupBarrier();
        let count = attended_in_tile(keys, j0);
        for (var c = 0u; c < count; c++) {
            let score = dot_streamed(&query, TILE_A, c);
            let m_new = max(m, score);
            let keep = exp(m - m_new);
            let p = exp(score - m_new);
            l = keep * l + p;
            mix_streamed(&acc, keep, p, TILE_B, c);
            m = m_new;
        }
    }

    if t >= params.q_len {
        return;
    }
    let attends = keys > 0u;
    let inv_l = select(0.0, 1.0 / l, attends);
    let start = query_row_start(b, t, h);
    for (var d = 0u; d < HEAD_DIM; d++) {
        out[start + d] = inv_l * row_value(&acc, d);
    }
    lse[stats_index(b, h, t)] = select(0.0, m + log(l), attends);
}

// dQ for small heads. Grid: (query tiles of ROWS, Hq, B).
@compute @workgroup_size(ROWS)
fn attention_backward_dq_rows(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let t = q0 + lid;
    let own = row_stats(b, h, t);
    let kv_end = backward_key_end(b, h, q0);

    var query: RowVec;
    var grad_out: RowVec;
    for (var g = 0u; g < GROUPS; g++) {
        query[g] = query_group(b, t, h, g);
        grad_out[g] = dout_group(b, t, h, g);
    }
    var acc: RowVec;
    for (var j0 = 0u; j0 < kv_end; j0 += INNER) {
        workgroupBarrier();
        stream_keys(b, kv_head_of(h), j0, lid);
        workgroupBarrier();
        let count = attended_in_tile(own.keys, j0);
        for (var c = 0u; c < count; c++) {
            let p = exp(dot_streamed(&query, TILE_A, c) - own.lse);
            let ds = p * (dot_streamed(&grad_out, TILE_B, c) - own.delta);
            mix_streamed(&acc, 1.0, ds, TILE_A, c);
        }
    }

    if t >= params.q_len {
        return;
    }
    let start = query_row_start(b, t, h);
    for (var d = 0u; d < HEAD_DIM; d++) {
        dq[start + d] = params.scale * row_value(&acc, d);
    }
}

// dK and dV for small heads, summed over every query of every query head of the group.
// Grid: (key tiles of ROWS, Hkv, B). Training case only (Tq == Tkv, q_offset 0).
@compute @workgroup_size(ROWS)
fn attention_backward_dkv_rows(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let kv_head = wid.y;
    let k0 = wid.x * ROWS;
    let j = k0 + lid;
    let group = params.n_heads / params.n_kv_heads;

    var key: RowVec;
    var value: RowVec;
    for (var g = 0u; g < GROUPS; g++) {
        key[g] = key_group(b, j, kv_head, g);
        value[g] = value_group(b, j, kv_head, g);
    }
    var dk_acc: RowVec;
    var dv_acc: RowVec;
    for (var g = 0u; g < group; g++) {
        let h = kv_head * group + g;
        // Queries before k0 attend none of these keys.
        for (var i0 = k0; i0 < params.q_len; i0 += INNER) {
            // Valid rows form a prefix: from the first padding row on, nothing contributes.
            if stats[stats_index(b, h, i0)].keys == 0u {
                break;
            }
            workgroupBarrier();
            stream_queries(b, h, i0, lid);
            workgroupBarrier();
            for (var c = 0u; c < INNER; c++) {
                let row = inner_stats[c];
                if j < row.keys {
                    let p = exp(dot_streamed(&key, TILE_A, c) - row.lse);
                    let ds = p * (dot_streamed(&value, TILE_B, c) - row.delta);
                    mix_streamed(&dv_acc, 1.0, p, TILE_B, c);
                    mix_streamed(&dk_acc, 1.0, ds, TILE_A, c);
                }
            }
        }
    }

    if j >= params.kv_len {
        return;
    }
    let start = key_row_start(b, j, kv_head);
    for (var d = 0u; d < HEAD_DIM; d++) {
        dk[start + d] = row_value(&dk_acc, d);
        dv[start + d] = row_value(&dv_acc, d);
    }
}
