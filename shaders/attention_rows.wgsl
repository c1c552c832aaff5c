// Attention in the "rows" layout (after attention.wgsl), for small heads
// (HEAD_DIM <= 4·MAX_ROW_GROUPS): one thread per outer row, which keeps its whole row (and
// accumulators) in registers as vec4 groups and streams tiles of INNER rows of the other side
// through workgroup memory as vec4 rows. Every score is then a register dot product with no
// exchange between threads, and the softmax runs online per key (see
// `attention_forward_rows`). The lanes layout (attention_lanes.wgsl) spreads a row over
// several threads instead, which large heads need (a 128-wide row does not fit one thread's
// registers), at the price of passing scores through workgroup memory.

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
