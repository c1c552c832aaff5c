// Attention in the "lanes" layout (after attention.wgsl), for any head: each outer row r is
// owned by LANES threads; lane l owns the head dimensions l, l + LANES, ... (at most
// MAX_DIMS_PER_LANE of them) of the row's accumulators, and scores pass between the lanes
// through workgroup memory.
//
// Workgroup tiles, each holding two halves (A and B):
//              outer A    outer B    inner A    inner B    weights A        weights B
//   forward    scale·Q    -          K          V          scores           probabilities
//   dQ         scale·Q    dO         K          V          probabilities    dS
//   dK, dV     K          V          scale·Q    dO         probabilities    dS
// so scores are always outer A · inner A and dP = outer B · inner B; the output and dV mix
// weights with inner B, dQ and dK mix dS with inner A.

override LANES: u32 = 16u;
override WG: u32 = ROWS * LANES;
override DIMS_PER_LANE: u32 = (HEAD_DIM + LANES - 1u) / LANES;

const MAX_DIMS_PER_LANE: u32 = 8u;
// A lane's share of one row's [HEAD_DIM] accumulator.
alias LaneVec = array<f32, MAX_DIMS_PER_LANE>;

var<workgroup> outer: array<f32, 2u * ROWS * HEAD_DIM>;
var<workgroup> inner: array<f32, 2u * INNER * HEAD_DIM>;
var<workgroup> weights: array<f32, 2u * ROWS * INNER>;

// ---- tile fills (through the element loads of attention.wgsl) ----

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

// ---- backward (after attention_backward_preprocess) ----

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
