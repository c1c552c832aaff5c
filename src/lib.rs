//! # es2-wgpu
//!
//! Embedding Space Separation (ES2) safety fine-tuning for open-weight LLMs, on any GPU:
//! a transformer forward and backward written in WGSL compute shaders on `wgpu`, fused
//! kernels for the separation and KL losses, and a small training loop.
//!
//! Layers, each using only those before it: [`gpu`] (device, tensors, recording), [`ops`]
//! (kernels with CPU f64 references).

pub mod error;
pub mod es2;
pub mod gpu;
pub mod io;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
#[doc(hidden)]
pub mod testing;
pub mod text;

pub use error::{Error, Result};
pub use gpu::{DType, Gpu, GpuOptions, Recorder, Shape, Tensor};
