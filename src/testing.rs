//! Helpers shared by the kernel tests and benchmarks: the test device, seeded inputs,
//! NaN-poisoned outputs, relative errors against f64 references and finite differences.
//!
//! Public so that integration tests and benches can use it; not part of the stable API.

use std::sync::OnceLock;

use crate::gpu::{DType, Gpu, Shape, Tensor};
use crate::rng::Rng;
use half::{bf16, f16};

/// An empty scratch folder for a test, `es2-{tag}-{name}-{pid}` in the system's temporary
/// folder (removed first if an earlier run left it; created by whoever writes into it).
pub fn scratch_dir(tag: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("es2-{tag}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The device every test in a binary shares. Panics (fails the test) when no adapter exists:
/// a GPU test never passes by skipping.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new() {
        Ok(gpu) => gpu,
        Err(e) => panic!("GPU tests need an adapter (on CI: Mesa lavapipe): {e}"),
    })
}

/// Seeded N(0, std²) values: never zeros, never a pattern a wrong kernel could match.
pub fn randn(seed: u64, n: usize, std: f64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, std)
}

/// Uploads f32 data.
pub fn upload(gpu: &Gpu, shape: impl Into<Shape>, data: &[f32]) -> Tensor {
    Tensor::from_f32(gpu, shape, data).expect("upload matches its shape")
}

/// `values` rounded to `dtype` (f32, or f16 or bf16 to nearest even, as the `half` crate
/// does) and widened back to f32: values a `dtype` tensor holds exactly.
pub fn round_to(dtype: DType, values: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => values.to_vec(),
        DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        DType::U32 => panic!("u32 holds no floating-point values"),
    }
}

/// Uploads `values` as a `dtype` tensor (f32, f16 or bf16), each rounded to nearest even.
pub fn upload_as(gpu: &Gpu, shape: impl Into<Shape>, dtype: DType, values: &[f32]) -> Tensor {
    let tensor = match dtype {
        DType::F32 => Tensor::from_f32(gpu, shape, values),
        DType::F16 => {
            let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            Tensor::from_f16(gpu, shape, &halves)
        }
        DType::BF16 => {
            let halves: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            Tensor::from_bf16(gpu, shape, &halves)
        }
        DType::U32 => panic!("upload_as uploads floating-point values, not u32"),
    };
    tensor.expect("upload")
}

/// `n` seeded weights representable in `dtype` (f16 or bf16, or f32), every seventh scaled by
/// 1e-6 (into f16's subnormal range), as f32: exact, since every f16 and bf16 is an f32.
pub fn narrow_weights(dtype: DType, seed: u64, n: usize) -> Vec<f32> {
    let values: Vec<f32> = randn(seed, n, 1.0)
        .iter()
        .enumerate()
        .map(|(i, &w)| if i % 7 == 3 { w * 1e-6 } else { w })
        .collect();
    round_to(dtype, &values)
}

/// An f32 tensor whose every element is NaN, so that an element a kernel forgets to write
/// shows up in the comparison.
pub fn poisoned(gpu: &Gpu, shape: impl Into<Shape>) -> Tensor {
    let t = Tensor::empty(gpu, shape, DType::F32);
    t.fill_f32(gpu, f32::NAN).expect("f32 fill");
    t
}

/// Reads an f32 tensor back.
pub fn download(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    t.to_f32(gpu).expect("readback")
}

/// Widens f32 data for the f64 references.
pub fn f64s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

/// ||out − ref|| / ||ref|| (∞ if `out` holds a NaN or the lengths differ).
pub fn rel_error(out: &[f32], reference: &[f64]) -> f64 {
    rel_error_f64(&f64s(out), reference)
}

/// ||a − b|| / ||b|| for two f64 vectors (∞ if `a` holds a non-finite value or the lengths
/// differ).
pub fn rel_error_f64(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        f64::INFINITY
    } else if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Asserts `rel_error(out, reference) <= tol` and prints the error (visible with
/// `--nocapture`), so that test logs record every kernel's measured error.
#[track_caller]
pub fn assert_close(what: &str, out: &[f32], reference: &[f64], tol: f64) {
    let err = rel_error(out, reference);
    eprintln!("rel-error {what}: {err:.3e}");
    assert!(
        err <= tol,
        "{what}: ||out-ref||/||ref|| = {err:.3e} > {tol:.1e}"
    );
}

/// `init + grad`: what an output that started at `init` holds after accumulating `grad`.
pub fn accumulated(init: &[f32], grad: &[f64]) -> Vec<f64> {
    init.iter()
        .zip(grad)
        .map(|(&a, b)| f64::from(a) + b)
        .collect()
}

/// `assert_close` (as `what +=`) of an output that started at `init` and accumulated what the
/// reference `grad` says.
#[track_caller]
pub fn assert_close_accumulated(what: &str, out: &[f32], init: &[f32], grad: &[f64], tol: f64) {
    assert_close(&format!("{what} +="), out, &accumulated(init, grad), tol);
}

/// The bit patterns of f32 data, for comparisons that must be exact (NaN included).
pub fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

/// Asserts that two runs of a kernel gave bit-identical results (the determinism the
/// fixed-order reductions promise).
#[track_caller]
pub fn assert_bit_identical(what: &str, first: &[f32], second: &[f32]) {
    assert!(
        bits(first) == bits(second),
        "{what}: two runs on the same inputs differ"
    );
}

/// Central finite differences of the scalar `f` at `x`, step `h` (f64 throughout).
pub fn finite_difference(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let original = probe[i];
            probe[i] = original + h;
            let up = f(&probe);
            probe[i] = original - h;
            let down = f(&probe);
            probe[i] = original;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `Σ a_i b_i`: turns a vector output into the scalar whose gradient a backward computes when
/// it is handed `b` as the upstream gradient.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts that an f64 reference gradient agrees with finite differences of its forward.
#[track_caller]
pub fn assert_gradient(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    let err = rel_error_f64(analytic, numeric);
    eprintln!("fd-error {what}: {err:.3e}");
    assert!(
        err <= tol,
        "{what}: reference gradient vs finite differences: {err:.3e} > {tol:.1e}"
    );
}
