//! Layer 5 (above `model`, below `es2`): measuring a model. Held-out separation and KL during
//! training today; refusal judges, probes, attacks and reports as `es2-wgpu eval` grows.

pub mod heldout;
