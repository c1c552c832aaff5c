// Prepended to every shader in this folder (see src/gpu/kernel.rs).

// The flat workgroup index of a grid made by `Grid::flat` (x-major, folded into y when the
// count exceeds one dimension's limit).
fn flat_workgroup_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The flat invocation index of a grid made by `Grid::threads(_, group_size)`.
fn flat_invocation_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, group_size: u32) -> u32 {
    return flat_workgroup_id(wid, nwg) * group_size + lid;
}
