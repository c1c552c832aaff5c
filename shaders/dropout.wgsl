// Inverted dropout with a stateless mask: element i is kept when hash(seed, i) is at or above
// the drop threshold, so the backward regenerates the forward's mask from the same seed
// instead of storing it. Forward y = x·keep/(1−p) and backward dx = dy·keep/(1−p) are the
// same map, hence one entry point.

struct Params {
    n: u32,
    seed: u32,
    // Elements whose hash is below this are dropped: p·2³².
    threshold: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

override WG: u32 = 256u;

// PCG-style integer hash (Jarzynski & Olano, "Hash Functions for GPU Rendering", 2020).
fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn keep(i: u32) -> bool {
    return pcg_hash(i ^ pcg_hash(params.seed)) >= params.threshold;
}

@compute @workgroup_size(WG)
fn dropout_apply(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.n {
        y[i] = select(0.0, x[i] * params.scale, keep(i));
    }
}
