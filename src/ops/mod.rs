//! Layer 2: the kernels. One file per kernel family, mirroring `shaders/<family>.wgsl`; each
//! holds the forward and backward launchers and a CPU f64 reference (`reference`) that the
//! tests compare against.

pub mod kl;
pub mod pool;
pub mod reduce;
pub mod residual;
pub mod separation;
