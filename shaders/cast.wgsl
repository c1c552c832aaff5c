// Dtype casts between f32 and the 16-bit formats f16 and bf16, bit-exact: round to nearest
// even, subnormals kept, ±0 and ±inf kept, NaN stays NaN (quieted, payload kept as far as it
// fits, as the `half` crate and x86 F16C do).
//
// Nothing here needs shader-f16: 16-bit data is read and written as array<u32>, two elements
// per word (see half_of_word and widen_16_bits in common.wgsl, shared with the GEMM's and the
// embedding's 16-bit weights). f32 data is moved as raw bits too. The conversions are integer
// code rather than unpack2x16float / pack2x16float because WGSL lets those flush subnormals,
// round either way, and return an indeterminate value for NaN, inf and out-of-range inputs.

struct Params {
    // Element count.
    n: u32,
    // FORMAT_F16 or FORMAT_BF16 (common.wgsl): the 16-bit side of the cast.
    format: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src16: array<u32>;
// f32 bit patterns.
@group(0) @binding(2) var<storage, read_write> dst32: array<u32>;
// f32 bit patterns.
@group(0) @binding(3) var<storage, read> src32: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst16: array<u32>;

override WG: u32 = 256u;

// `bits >> shift` rounded to nearest, ties to even. A carry out of the mantissa ripples into
// the exponent, which is exactly right for rounding up into the next binade or to infinity.
fn shift_right_round_even(bits: u32, shift: u32) -> u32 {
    let kept = bits >> shift;
    let half = 1u << (shift - 1u);
    let dropped = bits & ((1u << shift) - 1u);
    let round_up = dropped > half || (dropped == half && (kept & 1u) == 1u);
    return kept + select(0u, 1u, round_up);
}

fn f32_to_f16_bits(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let exponent = (x >> 23u) & 0xffu;
    let mantissa = x & 0x7fffffu;
    if exponent == 0xffu {
        let quiet = select(0u, 0x200u, mantissa != 0u);
        return sign | 0x7c00u | quiet | (mantissa >> 13u);
    }
    let half_exponent = i32(exponent) - 112;
    if half_exponent >= 31 {
        return sign | 0x7c00u;
    }
    if half_exponent > 0 {
        return sign | shift_right_round_even((u32(half_exponent) << 23u) | mantissa, 13u);
    }
    // Below f16's normal range: shift the full significand (implicit one included) down to a
    // subnormal; below half the smallest subnormal (shift > 24) only the sign survives.
    // (f32 subnormals land here too and round to ±0.)
    let shift = u32(14 - half_exponent);
    if shift > 24u {
        return sign;
    }
    return sign | shift_right_round_even(mantissa | 0x800000u, shift);
}

fn f32_to_bf16_bits(x: u32) -> u32 {
    if (x & 0x7fffffffu) > 0x7f800000u {
        return (x >> 16u) | 0x40u;
    }
    return shift_right_round_even(x, 16u);
}

fn narrow(x: u32) -> u32 {
    if params.format == FORMAT_BF16 {
        return f32_to_bf16_bits(x);
    }
    return f32_to_f16_bits(x);
}

// One thread per element: dst32[i] = element i of src16, widened.
@compute @workgroup_size(WG)
fn widen_to_f32(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation_id(wid, nwg, lid, WG);
    if i >= params.n {
        return;
    }
    dst32[i] = widen_16_bits(half_of_word(src16[i / 2u], i), params.format);
}

// One thread per output word (two elements), so no two threads write the same word. With an
// odd count the last word's upper half lies past the tensor and may belong to a neighbour in
// the same buffer: it is written back unchanged.
@compute @workgroup_size(WG)
fn narrow_from_f32(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let word = flat_invocation_id(wid, nwg, lid, WG);
    let first = 2u * word;
    if first >= params.n {
        return;
    }
    let low = narrow(src32[first]);
    var high = dst16[word] >> 16u;
    if first + 1u < params.n {
        high = narrow(src32[first + 1u]);
    }
    dst16[word] = low | (high << 16u);
}
