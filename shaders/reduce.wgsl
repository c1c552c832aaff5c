// Deterministic column sums: out[c] (+)= Σ_r x[r, c], in a fixed order (no atomics), so the
// same inputs give bit-identical sums. Large row counts run in two launches of the same entry
// point: first each workgroup row `g` sums its block of rows into partial[g, c], then one
// launch sums the partials.

struct Params {
    rows: u32,
    cols: u32,
    // Rows summed by one workgroup row of the grid.
    rows_per_group: u32,
    // 1: out += sum; 0: out = sum.
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

override WG: u32 = 256u;

// Grid: x covers the columns, y the blocks of rows.
@compute @workgroup_size(WG)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let block = gid.y;
    if c >= params.cols {
        return;
    }
    let first = block * params.rows_per_group;
    let last = min(first + params.rows_per_group, params.rows);
    var total = 0.0;
    for (var r = first; r < last; r = r + 1u) {
        total = total + x[r * params.cols + c];
    }
    let i = block * params.cols + c;
    if params.accumulate == 1u {
        out[i] = out[i] + total;
    } else {
        out[i] = total;
    }
}
