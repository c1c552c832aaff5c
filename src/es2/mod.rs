//! Layer 6: the ES2 objective and supervised fine-tuning, the training loop, the optimizer,
//! checkpoints and metrics.

pub mod bench;
pub mod chat_data;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod job;
pub mod metrics;
pub mod objective;
pub mod optimizer;
pub mod plan;
pub mod report;
pub mod sft;
pub mod tiny_chat;
pub mod train_config;
pub mod trainer;

pub use engine::{measure_base_stats, Es2Engine, ModelPair};
pub use job::Job;
pub use objective::{BaseStats, Es2Config};
pub use optimizer::{OptimizerConfig, Schedule};
pub use plan::{DeviceLimits, MemoryPlan};
pub use report::{
    Es2HeldOut, Es2Terms, Evaluation, HeldOut, SftHeldOut, SftTerms, StepReport, Terms,
};
pub use sft::SftEngine;
pub use train_config::{Task, TrainConfig};
pub use trainer::{Quiet, RefusalChange, Summary, TrainObserver, Trainer};
