//! Layer 1: the wgpu context, tensors, the kernel registry, command recording, the buffer
//! pool and timestamp timing. Nothing here knows about transformers.

mod adapter;
mod context;
mod kernel;
mod pipeline_cache;
mod pool;
mod recorder;
mod tensor;
mod timing;

pub use adapter::{
    quiet_headless_vulkan, survey_adapters, AdapterReport, AdapterSurvey, FeaturesReport,
    GpuOptions, LimitsReport, ADAPTER_ENV, BACKEND_ENV,
};
pub use context::Gpu;
pub use kernel::{
    read, read_write, Access, Kernel, KernelSpec, Overrides, Shader, MAX_STORAGE_BINDINGS,
};
pub use pipeline_cache::{default_cache_dir, PipelineCacheDir, CACHE_DIR_ENV};
pub use pool::pooled_size;
pub use recorder::{Grid, Recorder, UNIFORM_CHUNK_BYTES};
pub use tensor::{rows_per_binding, DType, Shape, Tensor};
pub use timing::{KernelTime, Work};
