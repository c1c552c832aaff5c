//! Layer 2: the kernels. One file per kernel family, mirroring `shaders/<family>.wgsl`; each
//! holds the forward and backward launchers and a CPU f64 reference (`reference`) that the
//! tests compare against. `common` holds what the launchers share, as `shaders/common.wgsl`
//! does for the kernels.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cast;
pub(crate) mod common;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod grad_norm;
pub mod hook;
pub mod kl;
pub mod matmul;
pub mod pool;
pub mod reduce;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod separation;

/// Whether a launcher overwrites its output (`=`) or adds into what it holds (`+=`, as
/// parameter gradients accumulate over the passes of a step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// `out = result`: what the output held before is ignored (it may be NaN).
    Overwrite,
    /// `out += result`: the output must hold a value already (zeroed, or an earlier pass's).
    Accumulate,
}

impl Write {
    fn accumulates(self) -> bool {
        self == Write::Accumulate
    }
}
