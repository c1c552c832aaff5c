//! Dtype casts: f16/bf16 → f32 (loading checkpoints and frozen weights) and f32 → f16/bf16
//! with round-to-nearest-even (storing frozen weights, writing checkpoints). Bit-exact with the
//! `half` crate, and independent of shader-f16 (16-bit data travels as packed `u32` words).

use super::common::{launch_per_item, wgsl_format};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("cast");

static WIDEN: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "widen_to_f32",
    bindings: &[read(1), read_write(2)],
};
static NARROW: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "narrow_from_f32",
    bindings: &[read(3), read_write(4)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    format: u32,
}

/// Converts every element of `src` into `dst` (same element count): f16 → f32, bf16 → f32,
/// f32 → f16 or f32 → bf16, chosen by the tensors' dtypes. Narrowing rounds to nearest even;
/// NaN stays NaN, ±0, ±inf and subnormals are kept where the target can hold them.
///
/// With an odd element count the 16-bit output's last storage word is half past the end; that
/// half is left as it was, so a tensor that is a view into a larger buffer is safe.
pub fn cast(rec: &mut Recorder, src: &Tensor, dst: &Tensor) {
    assert_eq!(
        src.numel(),
        dst.numel(),
        "cast: {src:?} and {dst:?} differ in element count"
    );
    let n = src.numel();
    assert!(
        u32::try_from(n).is_ok(),
        "cast: {n} elements exceed a 32-bit index; cast in chunks"
    );
    // The 16-bit side names the format.
    let (spec, format, threads) = match (src.dtype(), dst.dtype()) {
        (from @ (DType::F16 | DType::BF16), DType::F32) => (&WIDEN, from, n),
        // One thread per output word: two elements.
        (DType::F32, to @ (DType::F16 | DType::BF16)) => (&NARROW, to, n.div_ceil(2)),
        (from, to) => panic!("cast: no conversion from {from} to {to} (f16/bf16 <-> f32 only)"),
    };
    if n == 0 {
        return;
    }
    let params = Params {
        n: n as u32,
        format: wgsl_format(format),
    };
    launch_per_item(rec, spec, &[src, dst], &params, threads);
}

/// CPU references: the `half` crate's conversions, which are round-to-nearest-even and keep
/// NaN, infinities and subnormals.
pub mod reference {
    use half::{bf16, f16};

    /// f16 → f32, exactly.
    pub fn f16_to_f32(x: &[f16]) -> Vec<f32> {
        x.iter().map(|h| h.to_f32()).collect()
    }

    /// bf16 → f32, exactly.
    pub fn bf16_to_f32(x: &[bf16]) -> Vec<f32> {
        x.iter().map(|h| h.to_f32()).collect()
    }

    /// f32 → f16, rounded to nearest even.
    pub fn f32_to_f16(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// f32 → bf16, rounded to nearest even.
    pub fn f32_to_bf16(x: &[f32]) -> Vec<bf16> {
        x.iter().map(|&v| bf16::from_f32(v)).collect()
    }
}
