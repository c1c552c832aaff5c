//! Layer 3: Hugging Face checkpoints (config, safetensors weights), the transformer forward
//! with hooks, LoRA adapters, generation with a KV cache, pooled embeddings, and the embedded
//! default model.

pub mod backward;
pub mod batch;
pub mod config;
pub mod embed;
pub mod embedded;
pub mod generate;
pub mod grads;
pub mod linear;
pub mod lora;
pub mod open;
pub mod params;
pub mod save;
pub mod transformer;
pub mod vocab;
pub mod weights;

pub use backward::Seeds;
pub use batch::Batch;
pub use config::{Architecture, Config, Llama3RopeScaling};
pub use embed::{embed_prompt, Embedding};
pub use generate::{KvCache, SamplingOptions};
pub use grads::{BlockGrads, Gradients, NamedParam, Trainable};
pub use linear::{Linear, LinearGrads, Lora};
pub use lora::{read_adapter_config, same_base, AdapterConfig, LoraConfig};
pub use open::open_model;
pub use params::{ParamSource, SeededInit};
pub use save::save_pretrained;
pub use transformer::{
    Block, BlockActivations, Forward, ForwardSpec, LoadOptions, Perturbation, Transformer,
};
pub use vocab::VocabMatrix;
pub use weights::Checkpoint;
