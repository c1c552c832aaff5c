// Prepended to every shader in this folder (see src/gpu/kernel.rs).

// The flat workgroup index of a grid made by `Grid::flat` (x-major, folded into y when the
// count exceeds one dimension's limit).
fn flat_workgroup_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
