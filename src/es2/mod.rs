//! Layer 5: the ES2 objective, the training loop, the optimizer, checkpoints and metrics.

pub mod objective;

pub use objective::{BaseStats, Es2Config};
