// Global squared gradient norm, stage 1: each workgroup writes the sum of squares of its block
// of one gradient tensor into its own slot of a shared scratch vector,
// partials[first_slot + block]. The launcher dispatches once per tensor with disjoint slots;
// stage 2 sums the scratch with `sum_rows` (reduce.wgsl). `workgroup_sum` (common.wgsl) adds in
// a fixed order, so the same gradients give a bit-identical norm.

struct Params {
    // Elements in this tensor.
    n: u32,
    // Scratch slot of this tensor's first block.
    first_slot: u32,
    // Blocks (workgroups) this tensor needs; a folded grid may launch a few more.
    blocks: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

// Elements each thread of the REDUCE_WG threads squares.
override ITEMS: u32 = 16u;

@compute @workgroup_size(REDUCE_WG)
fn sum_squares_per_block(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let block = flat_workgroup_id(wid, nwg);
    // Uniform per workgroup, so returning before the barriers is safe.
    if block >= params.blocks {
        return;
    }
    // Strided by REDUCE_WG so that neighbouring threads read neighbouring elements.
    let first = block * REDUCE_WG * ITEMS + lid;
    var total = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = first + k * REDUCE_WG;
        if i < params.n {
            total = total + grad[i] * grad[i];
        }
    }
    let block_total = workgroup_sum(lid, total);
    if lid == 0u {
        partials[params.first_slot + block] = block_total;
    }
}
