// The fused separation-distance loss of ES2, one workgroup per layer l.
//
// Side 0 is the harmful group H = eh[l] (n_h rows), side 1 the harmless group S = es[l]
// (n_s rows; for base-centroid, the fixed centroid as one row). The kernel sees every pairing
// as a mean over "virtual" pairs (v, u): with `centroid` each side is the single mean of its
// rows, otherwise each of its rows stands for itself. So
//   D_l = mean over (v, u) of d(A_v, B_u),  loss_l = φ(D_l),
// and the gradient of grad_scale·φ(D_l) with respect to row r of a side is
//   grad_scale·φ'(D_l) / (#pairs) · Σ_o ∂d/∂x(x = its virtual row, y = other side's row o)
// (times 1/n_rows when the side is a centroid). Every d is symmetric, so one ∂d/∂x serves
// both sides.
//
// Stage 1 reduces each virtual pair over the channels (LANES threads per pair, several pairs
// at a time) into per-pair scalars kept in workgroup memory; stage 2 writes each gradient
// element as a fixed-order sum over the other side. Nothing of size |H|×|S| reaches global
// memory, and every sum runs in a fixed order: same inputs, same bits.

struct Params {
    layers: u32,
    n_h: u32,
    n_s: u32,
    cols: u32,
    // 1: each side is represented by its mean (Pair::Centroid).
    centroid: u32,
    // DISTANCE_*.
    distance: u32,
    // SHAPE_*.
    shape: u32,
    // 1: the gradient flows to S; 0: des is written as zeros.
    grad_to_s: u32,
    // 1: des is bound and written.
    write_ds: u32,
    grad_scale: f32,
}

const DISTANCE_L2: u32 = 0u;
const DISTANCE_SQ_L2: u32 = 1u;
const DISTANCE_COSINE: u32 = 2u;
const SHAPE_HINGE: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> eh: array<f32>;
@group(0) @binding(2) var<storage, read> es: array<f32>;
@group(0) @binding(3) var<storage, read> nu: array<f32>;
@group(0) @binding(4) var<storage, read> margin: array<f32>;
// [2, L]: D_l, then φ(D_l). The distance-only entry point writes the first row only.
@group(0) @binding(5) var<storage, read_write> per_layer: array<f32>;
@group(0) @binding(6) var<storage, read_write> deh: array<f32>;
@group(0) @binding(7) var<storage, read_write> des: array<f32>;

// The kernels run REDUCE_WG threads (common.wgsl). Threads that reduce one pair over the
// channels (a power of two dividing REDUCE_WG):
override LANES: u32 = 32u;
// Capacity of the per-pair and per-row scalars the gradient needs (the loss entry point only).
override MAX_PAIRS: u32 = 4096u;
override MAX_ROWS: u32 = 1024u;

// Per-thread partial sums (Σ(a−b)², Σab, Σa², Σb²) during the per-pair tree reductions.
var<workgroup> scratch: array<vec4<f32>, REDUCE_WG>;
// Per virtual pair: ‖a−b‖ (l2), ‖a−b‖² (sq-l2) or cos(a, b) (cosine).
var<workgroup> pair_value: array<f32, MAX_PAIRS>;
// Per virtual row of each side: its norm (cosine only).
var<workgroup> norm_h: array<f32, MAX_ROWS>;
var<workgroup> norm_s: array<f32, MAX_ROWS>;

fn side_rows(side: u32) -> u32 {
    return select(params.n_h, params.n_s, side == 1u);
}

fn virtual_rows(side: u32) -> u32 {
    return select(side_rows(side), 1u, params.centroid == 1u);
}

fn embedding(side: u32, l: u32, row: u32, c: u32) -> f32 {
    if side == 0u {
        return eh[(l * params.n_h + row) * params.cols + c];
    }
    return es[(l * params.n_s + row) * params.cols + c];
}

// Channel c of virtual row v: the row itself, or the mean of the side's rows.
fn virtual_embedding(side: u32, l: u32, v: u32, c: u32) -> f32 {
    if params.centroid == 0u {
        return embedding(side, l, v, c);
    }
    let n = side_rows(side);
    var total = 0.0;
    for (var r = 0u; r < n; r = r + 1u) {
        total = total + embedding(side, l, r, c);
    }
    return total / f32(n);
}

// Index of the pair (own row v, other row o) seen from `side`.
fn pair_index(side: u32, v: u32, o: u32) -> u32 {
    let n_s = virtual_rows(1u);
    return select(v * n_s + o, o * n_s + v, side == 1u);
}

fn row_norm(side: u32, v: u32) -> f32 {
    if side == 0u {
        return norm_h[v];
    }
    return norm_s[v];
}

// Sums `scratch` over aligned runs of LANES threads into the run's first slot. Every thread
// must call it (it holds barriers).
fn sum_lanes(lid: u32) {
    for (var stride = LANES / 2u; stride > 0u; stride = stride / 2u) {
        if lid % LANES < stride {
            scratch[lid] = scratch[lid] + scratch[lid + stride];
        }
        workgroupBarrier();
    }
}

// This lane's share of (Σ(a−b)², Σab, Σa², Σb²) over the channels of pair (v, u).
fn pair_partial(l: u32, v: u32, u: u32, lane: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var c = lane; c < params.cols; c = c + LANES) {
        let a = virtual_embedding(0u, l, v, c);
        let b = virtual_embedding(1u, l, u, c);
        let diff = a - b;
        acc = acc + vec4<f32>(diff * diff, a * b, a * a, b * b);
    }
    return acc;
}

// The pair scalar the gradient needs: ‖a−b‖, ‖a−b‖², or cos(a, b) (0 for a zero vector).
fn pair_scalar(sums: vec4<f32>) -> f32 {
    switch params.distance {
        case DISTANCE_L2: {
            return sqrt(sums.x);
        }
        case DISTANCE_SQ_L2: {
            return sums.x;
        }
        default: {
            let norms = sqrt(sums.z) * sqrt(sums.w);
            return select(0.0, sums.y / norms, norms > 0.0);
        }
    }
}

fn pair_distance(scalar: f32, nu_l: f32) -> f32 {
    switch params.distance {
        case DISTANCE_L2: {
            return scalar / nu_l;
        }
        case DISTANCE_SQ_L2: {
            return scalar / (nu_l * nu_l);
        }
        default: {
            return 1.0 - scalar;
        }
    }
}

// Keeps what the gradient stage needs about pair p = (v, u).
fn record_pair(p: u32, v: u32, u: u32, scalar: f32, sums: vec4<f32>) {
    pair_value[p] = scalar;
    if u == 0u {
        norm_h[v] = sqrt(sums.z);
    }
    if v == 0u {
        norm_s[u] = sqrt(sums.w);
    }
}

// Σ over virtual pairs of d, returned to every thread. Groups of LANES threads take pairs in
// turn; each group leader adds its pairs' distances in order, then `workgroup_sum` adds the
// groups.
fn sum_pair_distances(l: u32, lid: u32, record: bool) -> f32 {
    let n_s = virtual_rows(1u);
    let n_pairs = virtual_rows(0u) * n_s;
    let groups = REDUCE_WG / LANES;
    let group = lid / LANES;
    let lane = lid % LANES;
    let nu_l = nu[l];
    var total = 0.0;
    for (var first = 0u; first < n_pairs; first = first + groups) {
        let p = first + group;
        var partial = vec4<f32>(0.0);
        if p < n_pairs {
            partial = pair_partial(l, p / n_s, p % n_s, lane);
        }
        scratch[lid] = partial;
        workgroupBarrier();
        sum_lanes(lid);
        if lane == 0u && p < n_pairs {
            let sums = scratch[lid];
            let scalar = pair_scalar(sums);
            total = total + pair_distance(scalar, nu_l);
            if record {
                record_pair(p, p / n_s, p % n_s, scalar, sums);
            }
        }
    }
    return workgroup_sum(lid, select(0.0, total, lane == 0u));
}

// ∂d(x, y)/∂x for the pair (own virtual row v, other row o) seen from `side`. Zero at the
// non-differentiable points: x = y for l2, a zero vector for cosine.
fn distance_gradient(x: f32, y: f32, side: u32, v: u32, o: u32, nu_l: f32) -> f32 {
    let scalar = pair_value[pair_index(side, v, o)];
    switch params.distance {
        case DISTANCE_L2: {
            return select(0.0, (x - y) / (nu_l * scalar), scalar > 0.0);
        }
        case DISTANCE_SQ_L2: {
            return 2.0 * (x - y) / (nu_l * nu_l);
        }
        default: {
            let nx = row_norm(side, v);
            let ny = row_norm(1u - side, o);
            if nx == 0.0 || ny == 0.0 {
                return 0.0;
            }
            return scalar * x / (nx * nx) - y / (nx * ny);
        }
    }
}

fn store_gradient(side: u32, l: u32, row: u32, c: u32, g: f32) {
    let i = (l * side_rows(side) + row) * params.cols + c;
    if side == 0u {
        deh[i] = g;
    } else {
        des[i] = g;
    }
}

// Writes slope·∂D/∂(every row of `side`), overwriting; exactly +0 when slope is 0.
fn write_side_gradient(side: u32, l: u32, lid: u32, slope: f32) {
    let n_rows = side_rows(side);
    let n_own = virtual_rows(side);
    let n_other = virtual_rows(1u - side);
    var weight = slope / f32(n_own * n_other);
    if params.centroid == 1u {
        weight = weight / f32(n_rows);
    }
    let nu_l = nu[l];
    for (var e = lid; e < n_own * params.cols; e = e + REDUCE_WG) {
        let v = e / params.cols;
        let c = e % params.cols;
        var g = 0.0;
        if weight != 0.0 {
            let x = virtual_embedding(side, l, v, c);
            for (var o = 0u; o < n_other; o = o + 1u) {
                let y = virtual_embedding(1u - side, l, o, c);
                g = g + distance_gradient(x, y, side, v, o, nu_l);
            }
            g = weight * g;
        }
        // A centroid's gradient reaches every row it averages.
        if params.centroid == 1u {
            for (var r = 0u; r < n_rows; r = r + 1u) {
                store_gradient(side, l, r, c, g);
            }
        } else {
            store_gradient(side, l, v, c, g);
        }
    }
}

@compute @workgroup_size(REDUCE_WG)
fn separation_loss(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let l = wid.x;
    let n_pairs = virtual_rows(0u) * virtual_rows(1u);
    let dist = sum_pair_distances(l, lid, true) / f32(n_pairs);
    let m = margin[l];
    let hinge = params.shape == SHAPE_HINGE;
    // grad_scale·φ'(D): −grad_scale, or exactly 0 where the hinge is flat (D ≥ m).
    let slope = select(-params.grad_scale, 0.0, hinge && !(dist < m));
    if lid == 0u {
        per_layer[l] = dist;
        per_layer[params.layers + l] = select(-dist, max(0.0, m - dist), hinge);
    }
    write_side_gradient(0u, l, lid, slope);
    if params.write_ds == 1u {
        write_side_gradient(1u, l, lid, select(0.0, slope, params.grad_to_s == 1u));
    }
}

@compute @workgroup_size(REDUCE_WG)
fn separation_distance(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let l = wid.x;
    let n_pairs = virtual_rows(0u) * virtual_rows(1u);
    let total = sum_pair_distances(l, lid, false);
    if lid == 0u {
        per_layer[l] = total / f32(n_pairs);
    }
}
