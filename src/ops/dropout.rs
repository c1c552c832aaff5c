//! Inverted dropout with a mask regenerated from a seed (so nothing is stored between the
//! forward and the backward): used on the LoRA adapters' input during training.

use super::common::{expect_elements, launch_per_item};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("dropout");

static APPLY: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "dropout_apply",
    bindings: &[read(1), read_write(2)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    seed: u32,
    threshold: u32,
    scale: f32,
}

/// The parameters of one dropout mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in [0, 1).
    pub p: f32,
    /// Seed of the mask: the same seed gives the same mask in the forward and the backward.
    pub seed: u32,
}

impl Dropout {
    fn params(&self, n: usize) -> Params {
        assert!(
            (0.0..1.0).contains(&self.p),
            "dropout: p = {} must be in [0, 1)",
            self.p
        );
        Params {
            n: n as u32,
            seed: self.seed,
            threshold: (f64::from(self.p) * 4_294_967_296.0) as u32,
            scale: 1.0 / (1.0 - self.p),
        }
    }
}

/// `y = x·mask/(1−p)` (forward) — and, with the same `Dropout`, `dx = dy·mask/(1−p)`
/// (backward): the map is its own transpose.
pub fn dropout_apply(rec: &mut Recorder, dropout: &Dropout, x: &Tensor, y: &Tensor) {
    let n = x.numel();
    expect_elements("dropout", "x", x, DType::F32, &[n]);
    expect_elements("dropout", "y", y, DType::F32, &[n]);
    launch_per_item(rec, &APPLY, &[x, y], &dropout.params(n), n);
}

/// CPU reference: the same hash, so tests compare masks exactly.
pub mod reference {
    use super::Dropout;

    fn pcg_hash(v: u32) -> u32 {
        let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
        (word >> 22) ^ word
    }

    /// Whether element `i` survives.
    pub fn keep(d: &Dropout, i: usize) -> bool {
        let threshold = (f64::from(d.p) * 4_294_967_296.0) as u32;
        pcg_hash(i as u32 ^ pcg_hash(d.seed)) >= threshold
    }

    /// `x` with the dropped elements zeroed and the kept ones scaled by `1 / (1 − p)`.
    pub fn dropout_apply(d: &Dropout, x: &[f64]) -> Vec<f64> {
        let scale = 1.0 / (1.0 - f64::from(d.p));
        x.iter()
            .enumerate()
            .map(|(i, v)| if keep(d, i) { v * scale } else { 0.0 })
            .collect()
    }
}
