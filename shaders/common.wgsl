// Prepended to every shader in this folder (see src/gpu/kernel.rs): what kernel families
// share. A workgroup variable declared here costs workgroup memory only in the entry points
// that use it.

// The flat workgroup index of a grid made by `Grid::flat` (x-major, folded into y when the
// count exceeds one dimension's limit).
fn flat_workgroup_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The flat invocation index of a grid made by `Grid::threads(_, group_size)`.
fn flat_invocation_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, group_size: u32) -> u32 {
    return flat_workgroup_id(wid, nwg) * group_size + lid;
}

// ---- Fixed-order workgroup reductions ----
//
// A kernel that reduces across its workgroup runs REDUCE_WG threads (mirrored by
// `ops::common::REDUCE_WG` in Rust). Each tree halves the active threads at every step, so the
// same inputs always combine in the same order: bit-identical results, no atomics. Call them
// from uniform control flow only (they hold barriers). Every thread gets the same, uniform
// result, and the tree is free again for the next call: workgroupUniformLoad synchronises
// before and after its load.

// A power of two (the trees halve it).
const REDUCE_WG: u32 = 256u;

var<workgroup> sum_tree: array<f32, REDUCE_WG>;
var<workgroup> online_tree: array<vec3<f32>, REDUCE_WG>;

// Sums `value` over each aligned segment of `width` threads (a power of two dividing
// REDUCE_WG) into the segment's first entry of sum_tree: log2(width) halving steps.
fn sum_segments(lid: u32, value: f32, width: u32) {
    sum_tree[lid] = value;
    workgroupBarrier();
    for (var stride = width / 2u; stride > 0u; stride = stride / 2u) {
        if lid % width < stride {
            sum_tree[lid] = sum_tree[lid] + sum_tree[lid + stride];
        }
        workgroupBarrier();
    }
}

// The sum of every thread's `value`.
fn workgroup_sum(lid: u32, value: f32) -> f32 {
    sum_segments(lid, value, REDUCE_WG);
    return workgroupUniformLoad(&sum_tree[0]);
}

// ---- Several rows per workgroup ----
//
// Row kernels over narrow rows give each row ROW_THREADS threads (a power of two dividing
// REDUCE_WG, set by the launcher per row width) instead of a whole workgroup: a workgroup of
// REDUCE_WG threads covers REDUCE_WG / ROW_THREADS consecutive rows, and a row's reduction
// takes log2(ROW_THREADS) steps instead of log2(REDUCE_WG), with no idle threads.
override ROW_THREADS: u32 = REDUCE_WG;

// The row this thread works on (rows past the last one have threads too: they must take
// part in the reductions, reading and writing nothing).
fn row_of_thread(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_workgroup_id(wid, nwg) * (REDUCE_WG / ROW_THREADS) + lid / ROW_THREADS;
}

// Columns of row `row` of a [rows, cols] matrix: 0 past the last row, whose threads only
// join the reductions.
fn cols_of_row(row: u32, rows: u32, cols: u32) -> u32 {
    return select(0u, cols, row < rows);
}

// This thread's index among its row's ROW_THREADS threads.
fn lane_in_row(lid: u32) -> u32 {
    return lid % ROW_THREADS;
}

// The sum of `value` over the threads of this thread's row, the same for each of them.
fn sum_across_row(lid: u32, value: f32) -> f32 {
    sum_segments(lid, value, ROW_THREADS);
    let total = sum_tree[lid - lane_in_row(lid)];
    workgroupBarrier(); // the tree is free again for the next call
    return total;
}

// ---- Online softmax statistics ----
//
// The statistics of a set of values x_i with weights w_i, gathered in one pass without knowing
// the maximum in advance: (m, s, t) = (max x, Σ exp(x − m), Σ exp(x − m)·w). s and t are
// rescaled whenever m grows, and exp only ever sees a non-positive argument. logsumexp is
// m + log(s); t / s is the softmax-weighted mean of w (zero weights leave t at 0).

// The most negative finite f32: the maximum of an empty set. (WGSL has no -inf literal.)
const LOWEST_F32: f32 = -3.40282347e38;
const ONLINE_EMPTY: vec3<f32> = vec3<f32>(LOWEST_F32, 0.0, 0.0);

// Adds the value x with weight w.
fn online_add(acc: vec3<f32>, x: f32, w: f32) -> vec3<f32> {
    if x > acc.x {
        let keep = exp(acc.x - x);
        return vec3<f32>(x, acc.y * keep + 1.0, acc.z * keep + w);
    }
    let e = exp(x - acc.x);
    return vec3<f32>(acc.x, acc.y + e, acc.z + e * w);
}

// The statistics of the union of two disjoint sets.
fn online_merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let m = max(a.x, b.x);
    let ea = exp(a.x - m);
    let eb = exp(b.x - m);
    return vec3<f32>(m, a.y * ea + b.y * eb, a.z * ea + b.z * eb);
}

// The statistics of the union of every thread's set.
fn workgroup_online_merge(lid: u32, own: vec3<f32>) -> vec3<f32> {
    online_tree[lid] = own;
    workgroupBarrier();
    for (var stride = REDUCE_WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            online_tree[lid] = online_merge(online_tree[lid], online_tree[lid + stride]);
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&online_tree[0]);
}

// ---- 16-bit data without shader-f16 ----
//
// f16 and bf16 tensors are bound as array<u32>: element i is half i % 2 of word i / 2,
// element 2k in the low half (the little-endian byte order of the host's arrays). The
// widening is integer code rather than unpack2x16float, which WGSL lets flush subnormals and
// leave NaN and inf indeterminate: it is exact for every input.

// The element format of a tensor bound as array<u32> (the GEMM's B_FORMAT, the embedding's
// TABLE_FORMAT, the cast kernel's 16-bit side; ops::common::wgsl_format on the Rust side):
// f32 bit patterns, or two 16-bit values per word.
const FORMAT_F32: u32 = 0u;
const FORMAT_F16: u32 = 1u;
const FORMAT_BF16: u32 = 2u;

// The 16 bits of element `i` out of `word`, the word that holds it.
fn half_of_word(word: u32, i: u32) -> u32 {
    return (word >> (16u * (i & 1u))) & 0xffffu;
}

// The f32 bit pattern of the f16 value with bits `h`: ±0, subnormals, ±inf kept; NaN stays
// NaN (quieted, payload kept), as the `half` crate and x86 F16C widen.
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    if exponent == 0x1fu {
        if mantissa == 0u {
            return sign | 0x7f800000u;
        }
        return sign | 0x7fc00000u | (mantissa << 13u);
    }
    if exponent == 0u {
        if mantissa == 0u {
            return sign;
        }
        // A subnormal mantissa·2^-24 with its leading one at bit p is 1.x·2^(p-24): a normal
        // f32 with biased exponent p + 103 and the bits below p as its mantissa.
        let p = firstLeadingBit(mantissa);
        return sign | ((p + 103u) << 23u) | ((mantissa << (23u - p)) & 0x7fffffu);
    }
    // Rebias: 127 - 15 = 112.
    return sign | ((exponent + 112u) << 23u) | (mantissa << 13u);
}

// The f32 bit pattern of the bf16 value with bits `h`: the upper half of an f32, so every
// value widens exactly; NaN stays NaN (quieted, payload kept), as the `half` crate widens.
fn bf16_to_f32_bits(h: u32) -> u32 {
    let is_nan = (h & 0x7fffu) > 0x7f80u;
    return (h | select(0u, 0x40u, is_nan)) << 16u;
}

// The f32 bit pattern of the 16-bit value with bits `h` in `format` (FORMAT_F16 or
// FORMAT_BF16).
fn widen_16_bits(h: u32, format: u32) -> u32 {
    if format == FORMAT_BF16 {
        return bf16_to_f32_bits(h);
    }
    return f16_to_f32_bits(h);
}

// The shape, layout and options of one GEMM (matmul.wgsl and matmul_subgroup.wgsl; the
// Rust side is ops::matmul's Params). Offsets and strides count elements of each operand.
struct GemmParams {
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
    // Split K (when not 0): workgroup z sums k in [z·k_split, (z + 1)·k_split) of the one
    // batch entry into slab z of C (partial sums that the launcher adds up).
    k_split: u32,
    // A second product summed into the same outputs (matmul_subgroup.wgsl with SECOND; a
    // LoRA path): alpha2 · A2·op(B2), A2 [M, k2] row-major, B2 in B's layout ([N, k2] or
    // [k2, N]), both f32.
    k2: u32,
    a2_offset: u32,
    a2_row_stride: u32,
    b2_offset: u32,
    b2_row_stride: u32,
    alpha2: f32,
}
