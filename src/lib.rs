//! # es2-wgpu
//!
//! Embedding Space Separation (ES2) safety fine-tuning for open-weight LLMs, on any GPU:
//! a transformer forward and backward written in WGSL compute shaders on `wgpu`, fused
//! kernels for the separation and KL losses, and a small training loop.
//!
//! An application needs little more than the [`prelude`]: open a [`Gpu`], load a model with
//! [`model::open_model`] (an embedded model by name, or a Hugging Face folder), configure a run
//! with [`es2::TrainConfig`], and drive it with [`es2::Trainer`], watching it through an
//! [`es2::TrainObserver`]. The README's "Use it from Rust" and `examples/harden.rs` show it
//! end to end. Errors are [`Error`] values that name the file, the configuration field or the
//! value at fault.
//!
//! Layers, each using only those before it (`tests/layers.rs` checks it):
//!
//! 1. [`gpu`]: device, tensors, kernel registry, command recording, buffer pool, timing;
//! 2. [`ops`]: the kernels, each with a CPU f64 reference;
//! 3. [`text`]: tokenizer, chat templates, prompt and conversation datasets;
//! 4. [`model`]: Hugging Face checkpoints, parameter names, the blocks and the one block loop
//!    that runs them (hooks, gradient taps, save policies, the KV cache), LoRA, generation,
//!    embeddings, the embedded default models;
//! 5. [`eval`]: held-out measurements, refusal judges, probes, geometry, the eval report;
//! 6. [`es2`]: the objectives (ES2, supervised fine-tuning), one training step, the training
//!    loop, checkpoints, metrics.
//!
//! Beside them, used by any layer: [`error`], [`io`] (atomic writers), [`rng`], [`plot`] (SVG
//! charts) and [`failpoint`] (named points where a test pauses the process to kill it, or
//! injects a NaN or a GPU fault). The command line (`es2-wgpu`, the `cli` feature, on by
//! default) is a thin layer over this API; `default-features = false` leaves it and its
//! dependencies out.

// Every public item is documented: the library is used from other apps, and `cargo doc` is
// its reference (clippy -D warnings in CI turns a gap into a failure).
#![warn(missing_docs)]

pub mod error;
pub mod es2;
pub mod eval;
pub mod failpoint;
pub mod gpu;
pub mod io;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
#[doc(hidden)]
pub mod testing;
pub mod text;

pub use error::{DeviceFault, Error, Result};
pub use gpu::{DType, Gpu, GpuOptions, Recorder, Shape, Tensor};

/// The types an application touches to load a model, harden it, read the results and
/// generate: `use es2_wgpu::prelude::*;`.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::es2::{
        Es2Config, Evaluation, HeldOut, OptimizerConfig, Quiet, Schedule, StepReport, Summary,
        Task, TrainConfig, TrainObserver, Trainer,
    };
    pub use crate::gpu::{Gpu, GpuOptions};
    pub use crate::model::{
        embed_prompt, open_model, Embedding, LoadOptions, LoraConfig, SamplingOptions, Transformer,
        WeightsDtype,
    };
    pub use crate::ops::kl::KlDirection;
    pub use crate::ops::pool::Pool;
    pub use crate::ops::separation::{Distance, LossShape, Pair};
    pub use crate::text::Tokenizer;
}

/// The README's Rust snippets, compiled as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
