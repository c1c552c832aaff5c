// Token embedding lookup and its gradient, for a table split into row chunks
// [first_row, first_row + chunk_rows) of the full [V, C] table.
//
// Forward: out[t, :] = table[ids[t], :] for the tokens whose id lies in the chunk; the other
// rows of out are left untouched (so one launch per chunk covers every in-range id, and an id
// >= V, a caller bug, is skipped by every chunk: its row is never written and nothing is read
// out of bounds).
//
// The table may hold f16 or bf16 values (TABLE_FORMAT: a frozen table stored at half the
// memory), widened exactly to f32 as they are read, as the GEMM's B operand does; out is f32
// either way.
//
// Backward: one writer per table row, no atomics. The host's CSR inverse index lists the
// sorted unique ids, and for each the positions where it occurs (increasing); one thread per
// (unique id, column) adds dout over those positions in that fixed order.

struct Params {
    tokens: u32,
    cols: u32,
    first_row: u32,
    chunk_rows: u32,
    // Backward: the first unique id (index into unique_ids) inside the chunk, and how many.
    first_unique: u32,
    uniques: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
// f32 bit patterns, or two 16-bit values per word when TABLE_FORMAT is FORMAT_F16 or
// FORMAT_BF16 (see half_of_word); read through table_element.
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> unique_ids: array<u32>;
@group(0) @binding(5) var<storage, read> offsets: array<u32>;
@group(0) @binding(6) var<storage, read> positions: array<u32>;
@group(0) @binding(7) var<storage, read> dout: array<f32>;
@group(0) @binding(8) var<storage, read_write> dtable: array<f32>;

override WG: u32 = 256u;
// The table's element type: FORMAT_F32, FORMAT_F16 or FORMAT_BF16 (common.wgsl).
override TABLE_FORMAT: u32 = FORMAT_F32;

// Element `i` of the table chunk (counted in elements of its type) as f32.
fn table_element(i: u32) -> f32 {
    if TABLE_FORMAT == FORMAT_F32 {
        return bitcast<f32>(table[i]);
    }
    return bitcast<f32>(widen_16_bits(half_of_word(table[i / 2u], i), TABLE_FORMAT));
}

// Whether `id` is a row of this chunk (written without `first_row + chunk_rows`, which could
// overflow).
fn in_chunk(id: u32) -> bool {
    return id >= params.first_row && id - params.first_row < params.chunk_rows;
}

// One thread per element of out.
@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.tokens * params.cols {
        return;
    }
    let id = ids[i / params.cols];
    if in_chunk(id) {
        out[i] = table_element((id - params.first_row) * params.cols + i % params.cols);
    }
}

// One thread per (unique id inside the chunk, column): dtable[id, c] += Σ dout[p, c] over the
// positions p of id, in increasing order.
@compute @workgroup_size(WG)
fn embedding_backward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.uniques * params.cols {
        return;
    }
    let u = params.first_unique + i / params.cols;
    let c = i % params.cols;
    var total = 0.0;
    for (var k = offsets[u]; k < offsets[u + 1u]; k = k + 1u) {
        total = total + dout[positions[k] * params.cols + c];
    }
    let row = (unique_ids[u] - params.first_row) * params.cols;
    dtable[row + c] = dtable[row + c] + total;
}
