// Residual stream arithmetic: y = x + s·r, acc += s·x, y = s·x.

struct Params {
    n: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> r: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> acc: array<f32>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn residual_forward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        y[i] = x[i] + params.scale * r[i];
    }
}

@compute @workgroup_size(WG)
fn scale_forward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        y[i] = params.scale * x[i];
    }
}

@compute @workgroup_size(WG)
fn accumulate_scaled(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        acc[i] = acc[i] + params.scale * x[i];
    }
}
