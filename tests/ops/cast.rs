use es2_wgpu::gpu::{DType, Gpu};
use es2_wgpu::ops::cast::{self, reference};
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};
use half::{bf16, f16};

/// A NaN pattern that no conversion here produces (signalling, odd payload), so that a 16-bit
/// element the kernel forgets to write shows up.
const POISON16: u16 = 0x7d55;

/// 16-bit patterns worth naming: ±0, subnormal edges, normal edges, ±inf, NaNs with and without
/// the quiet bit, in both f16 and bf16 readings.
const SPECIAL16: [u16; 20] = [
    0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0x7c00, 0xfc00, 0x7c01, 0x7e00, 0xfe00,
    0x7fff, 0x007f, 0x0080, 0x7f7f, 0x7f80, 0xff80, 0x7f81, 0x7fc0,
];

/// f32 inputs whose rounding is easy to get wrong; their names say what they test.
const SPECIAL32: [u32; 32] = [
    0x0000_0000, // +0
    0x8000_0000, // -0
    0x7f80_0000, // +inf
    0xff80_0000, // -inf
    0x7fc0_0000, // quiet NaN
    0xffc0_0000, // negative quiet NaN
    0x7f80_0001, // signalling NaN, payload lost by f16 and bf16 truncation
    0x7fa0_0000, // signalling NaN with a high payload
    0xff80_0001, // negative signalling NaN
    0x7fbf_ffff, // signalling NaN, full payload
    0x0000_0001, // smallest f32 subnormal
    0x807f_ffff, // largest negative f32 subnormal
    0x0080_0000, // smallest f32 normal
    0x477f_e000, // 65504, f16 max
    0x477f_efff, // just below the f16 overflow tie
    0x477f_f000, // 65520: tie between f16 max and inf, rounds to inf
    0xc77f_f000, // -65520
    0x3380_0000, // 2^-24, smallest f16 subnormal
    0x3300_0000, // 2^-25: tie between 0 and 2^-24, rounds to even 0
    0x3300_0001, // just above 2^-25: rounds to 2^-24
    0x33c0_0000, // 1.5·2^-24: tie between subnormals 1 and 2, rounds to 2
    0x3880_0000, // 2^-14, smallest f16 normal
    0x387f_ffff, // just below 2^-14: rounds up into the normal range
    0x3f80_1000, // 1 + 2^-11: f16 tie, rounds to even 1
    0x3f80_3000, // 1 + 3·2^-11: f16 tie, rounds up to even
    0x3f80_8000, // bf16 tie, rounds to even 0x3f80
    0x3f81_8000, // bf16 tie, rounds up to 0x3f82
    0x7f7f_ffff, // f32 max: inf in both
    0x7f7f_7fff, // just below a bf16 overflow tie
    0x7f7f_8000, // bf16 tie with an odd last bit: rounds to inf
    0x3f80_0000, // 1
    0xbfc0_0000, // -1.5
];

fn upload16(gpu: &Gpu, dtype: DType, bits: &[u16]) -> Tensor {
    Tensor::from_bytes(gpu, [bits.len()], dtype, bytemuck::cast_slice(bits)).expect("upload")
}

fn download16(gpu: &Gpu, t: &Tensor) -> Vec<u16> {
    bytemuck::pod_collect_to_vec(&t.to_bytes(gpu).expect("readback"))
}

/// The `half` crate's widening of the 16-bit patterns `x` of `dtype` (f16 or bf16), as f32
/// bit patterns.
fn widened_bits(dtype: DType, x: &[u16]) -> Vec<u32> {
    let values = if dtype == DType::F16 {
        let halves: Vec<f16> = x.iter().map(|&b| f16::from_bits(b)).collect();
        reference::f16_to_f32(&halves)
    } else {
        let brains: Vec<bf16> = x.iter().map(|&b| bf16::from_bits(b)).collect();
        reference::bf16_to_f32(&brains)
    };
    bits(&values)
}

/// The `half` crate's rounding of `x` to `dtype` (f16 or bf16), as bit patterns.
fn narrowed_bits(dtype: DType, x: &[f32]) -> Vec<u16> {
    match dtype {
        DType::F16 => reference::f32_to_f16(x)
            .iter()
            .map(|h| h.to_bits())
            .collect(),
        _ => reference::f32_to_bf16(x)
            .iter()
            .map(|h| h.to_bits())
            .collect(),
    }
}

fn run_cast(gpu: &Gpu, src: &Tensor, dst: &Tensor) {
    let mut rec = Recorder::new(gpu);
    cast::cast(&mut rec, src, dst);
    rec.finish().unwrap();
}

/// Asserts bit equality and names the first input that differs.
#[track_caller]
fn assert_bits<T: PartialEq + std::fmt::LowerHex, I: std::fmt::LowerHex>(
    what: &str,
    got: &[T],
    want: &[T],
    inputs: &[I],
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
    eprintln!("bit-mismatches {what}: {bad} of {}", want.len());
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: {bad} mismatches; first at {i}: input {:#x} gave {:#x}, want {:#x}",
            inputs[i], got[i], want[i]
        );
    }
}

/// The special patterns first (so short prefixes test them), then every other pattern,
/// shuffled, so that short lengths also see arbitrary values.
fn all_patterns16() -> Vec<u16> {
    let mut rest: Vec<u16> = (0..=u16::MAX).filter(|p| !SPECIAL16.contains(p)).collect();
    Rng::new(11).shuffle(&mut rest);
    SPECIAL16.iter().copied().chain(rest).collect()
}

fn widen_on_gpu(gpu: &Gpu, dtype: DType, x: &[u16]) -> Vec<u32> {
    let src = upload16(gpu, dtype, x);
    let dst = poisoned(gpu, [x.len()]);
    run_cast(gpu, &src, &dst);
    bits(&download(gpu, &dst))
}

#[test]
fn cast_widens_every_f16_and_bf16_pattern_bit_exactly() {
    let gpu = gpu();
    let patterns = all_patterns16();
    // Odd lengths end inside a storage word; the full set is every 16-bit pattern.
    for n in [1, 37, patterns.len()] {
        let x = &patterns[..n];
        for dtype in [DType::F16, DType::BF16] {
            let got = widen_on_gpu(gpu, dtype, x);
            let want = widened_bits(dtype, x);
            assert_bits(&format!("cast {dtype}->f32 n={n}"), &got, &want, x);
        }
    }
}

/// Inputs for narrowing: the specials, then random bit patterns (every class of f32), values
/// spread over f16's whole range and beyond, and exact f16 ties.
fn narrowing_inputs(n: usize) -> Vec<f32> {
    let mut rng = Rng::new(12);
    let mut bits: Vec<u32> = SPECIAL32.to_vec();
    while bits.len() < n {
        let value = match bits.len() % 3 {
            0 => rng.next_u64() as u32,
            1 => {
                let scale = 2f64.powi(rng.below(56) as i32 - 36);
                ((rng.normal() * scale) as f32).to_bits()
            }
            _ => {
                // Halfway between two neighbouring normal f16 values (of either sign).
                let magnitude = rng.below(0x7800) as u16 + 0x0400;
                let sign = if rng.below(2) == 0 { 0 } else { 0x8000 };
                f16::from_bits(sign | magnitude).to_f32().to_bits() + (1 << 12)
            }
        };
        bits.push(value);
    }
    bits.truncate(n);
    bits.into_iter().map(f32::from_bits).collect()
}

fn narrow_on_gpu(gpu: &Gpu, dtype: DType, x: &[f32]) -> Vec<u16> {
    let src = upload(gpu, [x.len()], x);
    let dst = upload16(gpu, dtype, &vec![POISON16; x.len()]);
    run_cast(gpu, &src, &dst);
    download16(gpu, &dst)
}

#[test]
fn cast_narrows_to_f16_and_bf16_rounding_to_nearest_even_bit_exactly() {
    let gpu = gpu();
    let inputs = narrowing_inputs(30_001);
    for n in [1, 37, inputs.len()] {
        let x = &inputs[..n];
        let x_bits = bits(x);
        for dtype in [DType::F16, DType::BF16] {
            let got = narrow_on_gpu(gpu, dtype, x);
            let want = narrowed_bits(dtype, x);
            assert_bits(&format!("cast f32->{dtype} n={n}"), &got, &want, &x_bits);
        }
    }
}

#[test]
fn cast_to_an_odd_16_bit_view_leaves_the_next_element_alone() {
    let gpu = gpu();
    let n = 37;
    let sentinel = 0xabcd;
    let x = randn(13, n, 10.0);
    for dtype in [DType::F16, DType::BF16] {
        // A buffer of n + 1 elements; the view's last word also holds element n.
        let whole = upload16(gpu, dtype, &vec![sentinel; n + 1]);
        let view = whole.rows_view(gpu, 0, n);
        run_cast(gpu, &upload(gpu, [n], &x), &view);
        let got = download16(gpu, &whole);
        assert_eq!(
            got[n], sentinel,
            "{dtype}: element past the end was overwritten"
        );
        assert_bits(
            &format!("cast f32->{dtype} view n={n}"),
            &got[..n],
            &narrowed_bits(dtype, &x),
            &bits(&x),
        );
    }
}
