//! Layer 5: the ES2 objective, the training loop, the optimizer, checkpoints and metrics.

pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod metrics;
pub mod objective;
pub mod optimizer;
pub mod sft;
pub mod trainer;

pub use engine::{measure_base_stats, Es2Engine, ModelPair, StepReport};
pub use objective::{BaseStats, Es2Config};
pub use optimizer::{OptimizerConfig, Schedule};
pub use trainer::{Evaluation, Quiet, Summary, TrainConfig, TrainObserver, Trainer};
