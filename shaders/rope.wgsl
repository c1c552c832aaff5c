// Rotary position embedding, Hugging Face rotate-half layout, on x [B, T, H, D]: for each head
// vector at position p = pos_offset + t (rope_forward_at: p = starts[b] + t, each row at its
// own positions) and each i < D/2, with angle = p · inv_freq[i] (an f32 multiply, as
// transformers computes it),
//   out[i]       = x[i] · cos − x[i + D/2] · sin
//   out[i + D/2] = x[i + D/2] · cos + x[i] · sin.
// The backward is the transpose rotation: the same with sin negated.

struct Params {
    // B · T · H · D/2: one thread per rotated pair.
    pairs: u32,
    tokens: u32,
    heads: u32,
    half_dim: u32,
    pos_offset: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
@group(0) @binding(4) var<storage, read> starts: array<u32>;

override WG: u32 = 256u;

// 2π split so that k · TWO_PI_HI and k · TWO_PI_MID are exact for k < 2^16 (8 and 7
// significant bits); TWO_PI_LO is the f32 rest.
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_MID: f32 = 0.0019378662109375;
const TWO_PI_LO: f32 = -2.5590314e-6;
const INV_TWO_PI: f32 = 0.15915494;

// `angle` minus the nearest multiple of 2π, within ~2e-7 for |angle| < 4e5 (positions up to
// ~400k at inv_freq 1). GPU sin/cos are only specified on [-π, π] and lose accuracy on the
// raw angles of long contexts, so the reduction is done here, Cody–Waite style.
fn reduce_angle(angle: f32) -> f32 {
    let k = round(angle * INV_TWO_PI);
    return ((angle - k * TWO_PI_HI) - k * TWO_PI_MID) - k * TWO_PI_LO;
}

// Rotates pair `i` (< pairs) by the angle of its position, `start` + its token index, times
// `direction` (1: forward, −1: the transpose, for the backward).
fn rotate_pair(i: u32, direction: f32, start: u32) {
    let k = i % params.half_dim;
    let vector = i / params.half_dim;
    let t = (vector / params.heads) % params.tokens;
    let angle = reduce_angle(f32(start + t) * inv_freq[k]);
    let c = cos(angle);
    let s = direction * sin(angle);
    let lo = vector * 2u * params.half_dim + k;
    let hi = lo + params.half_dim;
    let a = src[lo];
    let b = src[hi];
    dst[lo] = a * c - b * s;
    dst[hi] = b * c + a * s;
}

@compute @workgroup_size(WG)
fn rope_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.pairs {
        rotate_pair(i, 1.0, params.pos_offset);
    }
}

@compute @workgroup_size(WG)
fn rope_forward_at(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.pairs {
        let row = i / (params.half_dim * params.heads * params.tokens);
        rotate_pair(i, 1.0, starts[row]);
    }
}

@compute @workgroup_size(WG)
fn rope_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i < params.pairs {
        rotate_pair(i, -1.0, params.pos_offset);
    }
}
