//! The GPU context: the device, created on the adapter `adapter.rs` chooses with the adapter's
//! own limits, and the caches (pipelines, buffers) that live as long as the device.

use std::sync::Arc;

use super::adapter::{choose_adapter, GpuOptions};
use super::kernel::KernelCache;
use super::pipeline_cache::{default_cache_dir, DiskPipelineCache, PipelineCacheDir};
use super::pool::BufferPool;
use super::timing::{KernelTime, Profile, TimedPass};
use crate::error::DeviceFault;
use crate::{Error, Result};

/// Optional features es2-wgpu uses when the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::PIPELINE_CACHE);

/// A wgpu device and queue plus the per-device caches.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    pub(crate) kernels: KernelCache,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) pipeline_cache: Option<DiskPipelineCache>,
    profile: std::sync::Mutex<Profile>,
    /// The first fault the device reported since it was last checked (and how many followed).
    faults: Arc<std::sync::Mutex<Option<(Error, usize)>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Best effort: a cache that cannot be written costs the next process compile time only.
        let _ = self.save_pipeline_cache();
    }
}

impl Gpu {
    /// Opens the best adapter, honouring [`ADAPTER_ENV`](super::ADAPTER_ENV) and
    /// [`BACKEND_ENV`](super::BACKEND_ENV).
    pub fn new() -> Result<Self> {
        Self::with_options(&GpuOptions::default())
    }

    /// Opens the adapter that `options` select.
    pub fn with_options(options: &GpuOptions) -> Result<Self> {
        let (adapters, chosen, _) = choose_adapter(options)?;
        let adapter = adapters
            .into_iter()
            .nth(chosen)
            .ok_or_else(|| Error::Gpu("chosen adapter disappeared".into()))?;
        Self::from_adapter_caching(adapter, &options.pipeline_cache)
    }

    /// Creates the device on `adapter` with the adapter's own limits and the optional features
    /// es2-wgpu can use, its pipeline cache in the default folder.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        Self::from_adapter_caching(adapter, &PipelineCacheDir::Default)
    }

    /// [`Gpu::from_adapter`] with the pipeline cache in `cache`.
    pub fn from_adapter_caching(adapter: wgpu::Adapter, cache: &PipelineCacheDir) -> Result<Self> {
        let features = adapter.features() & WANTED_FEATURES;
        let limits = adapter.limits();
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("es2-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::default(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&descriptor))
            .map_err(|e| Error::Gpu(format!("could not create a device: {e}")))?;
        let info = adapter.get_info();
        let faults = Arc::new(std::sync::Mutex::new(None));
        catch_device_faults(&device, &faults);
        let cache_dir = match cache {
            PipelineCacheDir::Default => default_cache_dir(),
            PipelineCacheDir::At(dir) => Some(dir.clone()),
            PipelineCacheDir::Off => None,
        };
        let pipeline_cache =
            cache_dir.and_then(|dir| DiskPipelineCache::open(&device, &info, &dir));
        Ok(Gpu {
            device,
            queue,
            info,
            features,
            limits,
            kernels: KernelCache::default(),
            pool: Arc::new(BufferPool::default()),
            pipeline_cache,
            profile: Default::default(),
            faults,
        })
    }

    /// An error for the first fault the device reported since the last check (wgpu reports
    /// validation errors, failed allocations and a lost device through callbacks rather than
    /// where the work was recorded), or `Ok` when there was none.
    pub fn check_faults(&self) -> Result<()> {
        let taken = self
            .faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match taken {
            None => Ok(()),
            Some((first, 0)) => Err(first),
            Some((Error::Device { kind, message }, more)) => Err(Error::Device {
                kind,
                message: format!("{message} (and {more} later errors)"),
            }),
            Some((other, _)) => Err(other),
        }
    }

    /// Writes the pipelines compiled so far to the pipeline cache's file, when the device
    /// has one and it changed (a dropped device does the same, ignoring errors: the cache only
    /// saves compile time). Returns the file when it wrote.
    pub fn save_pipeline_cache(&self) -> Result<Option<&std::path::Path>> {
        let Some(cache) = &self.pipeline_cache else {
            return Ok(None);
        };
        // Every pipeline still compiling, so that the cache holds them all.
        self.finish_compiling();
        Ok(cache.save()?.then(|| cache.path()))
    }

    /// The file the device's pipeline cache is read from and written to, when it has one.
    pub fn pipeline_cache_file(&self) -> Option<&std::path::Path> {
        self.pipeline_cache.as_ref().map(|c| c.path())
    }

    /// The adapter's name, backend and driver.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The features enabled on this device.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// The limits this device was created with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Whether WGSL `f16` is available.
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether compute passes can carry timestamp queries.
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// The largest byte range one storage binding may cover.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }

    /// The underlying wgpu device, for applications that add their own work.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The underlying wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Blocks until all submitted work has finished.
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.check_faults()
    }

    /// Starts timing every dispatch (each in its own pass, waiting at every submission) into
    /// a per-kernel profile; a no-op without timestamp queries.
    pub fn start_profiling(&self) {
        self.lock_profile().active = self.has_timestamps();
    }

    /// Whether [`Gpu::start_profiling`] is in effect.
    pub fn is_profiling(&self) -> bool {
        self.lock_profile().active
    }

    /// Stops profiling and returns the time per kernel, largest first.
    pub fn take_profile(&self) -> Vec<KernelTime> {
        let profile = std::mem::take(&mut *self.lock_profile());
        let mut times: Vec<KernelTime> = profile.kernels.into_values().collect();
        times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        times
    }

    pub(crate) fn add_to_profile(&self, passes: &[TimedPass]) {
        let mut profile = self.lock_profile();
        for pass in passes {
            let entry = profile
                .kernels
                .entry(pass.entry)
                .or_insert_with(|| KernelTime {
                    kernel: pass.entry,
                    family: pass.family,
                    ..KernelTime::default()
                });
            entry.dispatches += 1;
            entry.seconds += pass.seconds;
            entry.flops += pass.work.flops;
            entry.bytes += pass.work.bytes;
        }
    }

    fn lock_profile(&self) -> std::sync::MutexGuard<'_, Profile> {
        self.profile
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands queued uploads to the GPU. `Tensor` uploads are staged until the next submission;
    /// loaders call this every few tensors so a large model is never staged all at once.
    pub fn flush_uploads(&self) {
        self.queue.submit([]);
    }

    /// Reads `size` bytes back to the host (blocking): `record` encodes the copies that fill
    /// the mappable staging buffer it is handed, which is then submitted, mapped and read.
    pub(crate) fn read_back(
        &self,
        label: &str,
        size: u64,
        record: impl FnOnce(&mut wgpu::CommandEncoder, &wgpu::Buffer),
    ) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        record(&mut encoder, &staging);
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver outlives this callback: it is read right below.
            let _ = sender.send(r);
        });
        self.wait_idle()?;
        receiver
            .recv()
            .map_err(|_| Error::Gpu(format!("{label}: the mapping callback never ran")))?
            .map_err(|e| Error::Gpu(format!("{label}: mapping the staging buffer failed: {e}")))?;
        let bytes = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("{label}: reading the staging buffer failed: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    /// Bytes currently parked in the buffer pool, ready for reuse.
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.idle_bytes()
    }

    /// Releases every idle pooled buffer back to the driver.
    pub fn trim_pool(&self) {
        self.pool.clear();
    }

    /// Bytes of tensor and uniform buffers held from the driver now: in use, or idle in the
    /// pool (staging and query buffers are not counted).
    pub fn allocated_bytes(&self) -> u64 {
        self.pool.allocated_bytes()
    }

    /// The high-water mark of [`Gpu::allocated_bytes`] since the device was made or since the
    /// last [`Gpu::reset_peak_bytes`]: the GPU memory a piece of work really needed.
    pub fn peak_bytes(&self) -> u64 {
        self.pool.peak_bytes()
    }

    /// Starts a new high-water mark at what is allocated now.
    pub fn reset_peak_bytes(&self) {
        self.pool.reset_peak();
    }
}

/// Routes the device's uncaptured errors and its loss into `faults` instead of wgpu's default
/// handler, which panics: an application that embeds the library gets an error value.
fn catch_device_faults(
    device: &wgpu::Device,
    faults: &Arc<std::sync::Mutex<Option<(Error, usize)>>>,
) {
    let record = |faults: &std::sync::Mutex<Option<(Error, usize)>>, kind, message: String| {
        let mut slot = faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.as_mut() {
            Some((_, more)) => *more += 1,
            None => *slot = Some((Error::Device { kind, message }, 0)),
        }
    };
    let on_error = faults.clone();
    device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
        let (kind, message) = match &error {
            wgpu::Error::OutOfMemory { .. } => (DeviceFault::OutOfMemory, error.to_string()),
            wgpu::Error::Validation { description, .. } => {
                (DeviceFault::Validation, description.clone())
            }
            wgpu::Error::Internal { description, .. } => {
                (DeviceFault::Internal, description.clone())
            }
        };
        record(&on_error, kind, message);
    }));
    let on_lost = faults.clone();
    device.set_device_lost_callback(move |reason, message| {
        // Dropping the device at exit also "loses" it; only an unexpected loss is a fault.
        if reason == wgpu::DeviceLostReason::Unknown {
            record(&on_lost, DeviceFault::Lost, message);
        }
    });
}
