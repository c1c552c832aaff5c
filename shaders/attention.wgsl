// Causal multi-head self-attention with grouped-query heads and right padding, flash style:
// the [T, T] score matrix never exists in memory. This file holds what both layouts share
// (parameters, bindings, indexing and masking, element loads, the backward's preprocess);
// attention_lanes.wgsl and attention_rows.wgsl each follow it with one layout's forward and
// backward (src/ops/attention builds a module of this file and one of them).
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
// keys in dK/dV. Streamed tiles hold two halves: A (K, or scale·Q in dK/dV) and B (V, or dO).
// Folding the scale into Q makes dK come out scaled, and dQ is scaled once when written.
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
// Outer rows per workgroup, and rows of a streamed tile.
override ROWS: u32 = 16u;
override INNER: u32 = 16u;
// Threads per workgroup of the preprocess (one thread per query row).
override ROW_WG: u32 = 64u;

// Score of a masked (query, key) pair: far below any real score, yet finite, so that
// exp(MASKED - MASKED) = 1 keeps a fully masked tile free of NaN.
const MASKED: f32 = -1.0e30;
const TILE_A: u32 = 0u;
const TILE_B: u32 = 1u;

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

// ---- element loads (rows past the end of a tensor read as zero) ----

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

fn row_stats(b: u32, h: u32, t: u32) -> RowStats {
    if t >= params.q_len {
        return RowStats(0.0, 0.0, 0u);
    }
    return stats[stats_index(b, h, t)];
}

// ---- the backward's preprocess ----

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

