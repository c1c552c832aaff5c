//! Layer 4 (above `text`): Hugging Face checkpoints (config, safetensors weights), the
//! decoder's blocks, the one block loop that runs them for every pass (`runner`: hooks,
//! gradient taps, save policies, the KV cache), LoRA adapters, generation, pooled embeddings,
//! and the embedded default models.

pub mod backward;
pub mod batch;
pub mod config;
pub mod embed;
pub mod embedded;
pub mod generate;
pub mod grads;
pub mod head;
pub mod hooks;
pub mod linear;
pub mod lora;
pub mod names;
pub mod open;
pub mod params;
pub mod runner;
pub mod save;
pub mod transformer;
pub mod vocab;
pub mod weights;

pub use backward::Seeds;
pub use batch::{Batch, Targets};
pub use config::{Architecture, Config, Llama3RopeScaling};
pub use embed::{embed_prompt, Embedding};
pub use generate::{KvCache, SamplingOptions};
pub use grads::{BlockGrads, Gradients, NamedParam, Trainable};
pub use hooks::{Capture, Hook, HookAction, Positions};
pub use linear::{Linear, LinearGrads, Lora};
pub use lora::{adapter_base_warning, read_adapter_config, same_base, AdapterConfig, LoraConfig};
pub use names::{LoraMatrix, Param, PerProjection, Projection};
pub use open::{open_config, open_model};
pub use params::{ParamSource, SeededInit};
pub use runner::{Forward, Output, Pass, SavePolicy};
pub use save::{save_orthogonalised, save_pretrained};
pub use transformer::{Block, LoadOptions, LoraDropout, Transformer, WeightsDtype};
pub use vocab::VocabMatrix;
pub use weights::Checkpoint;
