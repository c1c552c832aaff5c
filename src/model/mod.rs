//! Layer 3: Hugging Face checkpoints (config, safetensors weights) and the transformer.

pub mod config;

pub use config::{Architecture, Config, Llama3RopeScaling};
