//! The GPU context: adapter choice, device creation with the adapter's own limits, and the
//! caches (pipelines, buffers) that live as long as the device.

use std::sync::Arc;

use serde::Serialize;

use super::kernel::KernelCache;
use super::pipeline_cache::{default_cache_dir, DiskPipelineCache};
use super::pool::BufferPool;
use super::timing::{KernelTime, Profile, TimedPass};
use crate::error::DeviceFault;
use crate::{Error, Result};

/// Environment variable that picks an adapter by index or name substring.
pub const ADAPTER_ENV: &str = "ES2_ADAPTER";
/// Environment variable that restricts the backends searched (vulkan, metal, dx12, gl).
pub const BACKEND_ENV: &str = "ES2_BACKEND";

/// Optional features es2-wgpu uses when the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::PIPELINE_CACHE);

/// Keeps Mesa's Vulkan device-select layer from probing for a Wayland compositor that cannot be
/// there, so that a headless process prints no `error: XDG_RUNTIME_DIR is invalid or not set in
/// the environment.` lines. Call it first thing in `main`, before any thread starts (it sets an
/// environment variable) and before the first [`Gpu`].
///
/// The layer (an implicit layer every Mesa install enables) connects to Wayland while listing
/// GPUs whenever the instance enables `VK_KHR_wayland_surface`, which wgpu always does and
/// offers no switch for; without a usable `XDG_RUNTIME_DIR`, libwayland prints that line for
/// every listing. The layer only reorders the GPU list, and es2-wgpu ranks adapters itself, so
/// turning it off (its documented `NODEVICE_SELECT=1`) loses no adapter and no backend. Nothing
/// changes when Wayland could be reached (`XDG_RUNTIME_DIR` or `WAYLAND_DISPLAY` is an absolute
/// path) or the user steers the layer (`NODEVICE_SELECT`, `MESA_VK_DEVICE_SELECT` or
/// `DRI_PRIME` is set).
pub fn quiet_headless_vulkan() {
    use std::env::var_os;
    let absolute = |var: &str| var_os(var).is_some_and(|v| std::path::Path::new(&v).is_absolute());
    let wayland_reachable = absolute("XDG_RUNTIME_DIR") || absolute("WAYLAND_DISPLAY");
    let user_steers = ["NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT", "DRI_PRIME"]
        .iter()
        .any(|var| var_os(var).is_some());
    if !wayland_reachable && !user_steers {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// How the caller wants the adapter chosen.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// An adapter index (as listed by `es2-wgpu info`) or a case-insensitive name substring.
    /// `None` reads [`ADAPTER_ENV`], then falls back to the best adapter.
    pub adapter: Option<String>,
    /// Backends to search, as a comma list ("vulkan,metal"). `None` reads [`BACKEND_ENV`].
    pub backends: Option<String>,
    /// Where compiled pipelines are kept between processes.
    pub pipeline_cache: PipelineCacheDir,
}

/// Where a device keeps wgpu's pipeline cache between processes (on adapters whose driver
/// has one; see `src/gpu/pipeline_cache.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PipelineCacheDir {
    /// The folder [`CACHE_DIR_ENV`](super::CACHE_DIR_ENV) names, else the user's cache folder.
    #[default]
    Default,
    /// This folder.
    At(std::path::PathBuf),
    /// No cache on disk.
    Off,
}

/// What one adapter is and what it can do, as `es2-wgpu info` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// Position in the list (what `--adapter N` and [`GpuOptions::adapter`] take).
    pub index: usize,
    /// The adapter's name as the driver reports it.
    pub name: String,
    /// The graphics API: Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// Discrete, integrated, virtual, CPU or other.
    pub device_type: String,
    /// The driver's name.
    pub driver: String,
    /// The driver's version or other detail.
    pub driver_info: String,
    /// The limits that matter here.
    pub limits: LimitsReport,
    /// The optional features es2-wgpu can use.
    pub features: FeaturesReport,
}

/// The limits that decide how es2-wgpu tiles and chunks its work.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsReport {
    /// Largest byte range one storage binding may cover (larger tensors are chunked).
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Workgroup memory per workgroup, in bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Threads per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroups along one grid dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Storage buffers one entry point may bind.
    pub max_storage_buffers_per_shader_stage: u32,
    /// Alignment of uniform buffer offsets, in bytes.
    pub min_uniform_buffer_offset_alignment: u32,
}

/// The optional features es2-wgpu can use.
#[derive(Debug, Clone, Serialize)]
pub struct FeaturesReport {
    /// WGSL `f16` arithmetic.
    pub shader_f16: bool,
    /// Subgroup operations.
    pub subgroups: bool,
    /// Fewest and most invocations a subgroup may have (lavapipe: 8 and 8, which is what the
    /// subgroup GEMM is written for).
    pub subgroup_sizes: [u32; 2],
    /// Timestamp queries (kernel timing, `--profile`).
    pub timestamp_query: bool,
    /// Timestamps written inside compute passes.
    pub timestamp_query_inside_passes: bool,
    /// wgpu's pipeline cache, which es2-wgpu keeps on disk between processes (only some
    /// drivers store compiled pipelines in it; lavapipe stores none).
    pub pipeline_cache: bool,
}

/// Every adapter wgpu found, and which one was chosen and why.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSurvey {
    /// Every adapter found, in wgpu's order.
    pub adapters: Vec<AdapterReport>,
    /// Index of the adapter es2-wgpu uses.
    pub chosen: usize,
    /// Why that one.
    pub reason: String,
}

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
        if let Some(cache) = &self.pipeline_cache {
            self.finish_compiling();
            let _ = cache.save();
        }
    }
}

impl Gpu {
    /// Opens the best adapter, honouring [`ADAPTER_ENV`] and [`BACKEND_ENV`].
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
        self.finish_compiling();
        match &self.pipeline_cache {
            Some(cache) if cache.save()? => Ok(Some(cache.path())),
            _ => Ok(None),
        }
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

/// Lists every adapter and picks one.
pub fn survey_adapters(options: &GpuOptions) -> Result<AdapterSurvey> {
    let (adapters, chosen, reason) = choose_adapter(options)?;
    let adapters = adapters
        .iter()
        .enumerate()
        .map(|(index, adapter)| report(index, adapter))
        .collect();
    Ok(AdapterSurvey {
        adapters,
        chosen,
        reason,
    })
}

fn report(index: usize, adapter: &wgpu::Adapter) -> AdapterReport {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterReport {
        index,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver,
        driver_info: info.driver_info,
        limits: LimitsReport {
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            min_uniform_buffer_offset_alignment: limits.min_uniform_buffer_offset_alignment,
        },
        features: FeaturesReport {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_sizes: [info.subgroup_min_size, info.subgroup_max_size],
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamp_query_inside_passes: features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            pipeline_cache: features.contains(wgpu::Features::PIPELINE_CACHE),
        },
    }
}

fn parse_backends(list: &Setting) -> Result<wgpu::Backends> {
    let mut backends = wgpu::Backends::empty();
    for name in list
        .value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        backends |= match name.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            other => {
                return Err(list.error(format!(
                    "unknown backend '{other}' (expected vulkan, metal, dx12 or gl)"
                )))
            }
        };
    }
    if backends.is_empty() {
        return Err(list.error("names no backend".into()));
    }
    Ok(backends)
}

/// A [`GpuOptions`] value, given or read from its environment variable.
struct Setting {
    field: &'static str,
    value: String,
    /// The environment variable it was read from, when it was not given.
    from_env: Option<&'static str>,
}

impl Setting {
    fn read(field: &'static str, given: &Option<String>, var: &'static str) -> Option<Setting> {
        let (value, from_env) = match given {
            Some(value) => (value.clone(), None),
            None => (
                std::env::var(var).ok().filter(|s| !s.trim().is_empty())?,
                Some(var),
            ),
        };
        Some(Setting {
            field,
            value,
            from_env,
        })
    }

    fn error(&self, message: String) -> Error {
        match self.from_env {
            Some(var) => Error::config(self.field, format!("{message} (read from {var})")),
            None => Error::config(self.field, message),
        }
    }
}

/// Rank adapters: real GPUs first, then CPU rasterisers; native APIs before GL.
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    });
    pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .filter(|a| a.get_info().backend != wgpu::Backend::Noop)
        .collect()
}

fn choose_adapter(options: &GpuOptions) -> Result<(Vec<wgpu::Adapter>, usize, String)> {
    let adapters = match Setting::read("gpu.backends", &options.backends, BACKEND_ENV) {
        Some(list) => enumerate(parse_backends(&list)?),
        // GL is a last resort: it lacks features the native APIs have, and probing it on a
        // headless machine only prints noise.
        None => {
            let native = enumerate(wgpu::Backends::PRIMARY);
            if native.is_empty() {
                enumerate(wgpu::Backends::GL)
            } else {
                native
            }
        }
    };
    if adapters.is_empty() {
        return Err(Error::Gpu(
            "no GPU adapter found; install a Vulkan, Metal or DX12 driver (on Linux without \
             a GPU: Mesa's lavapipe, package mesa-vulkan-drivers)"
                .into(),
        ));
    }
    if let Some(wanted) = Setting::read("gpu.adapter", &options.adapter, ADAPTER_ENV) {
        let index = find_adapter(&adapters, &wanted)?;
        let by = wanted.from_env.unwrap_or("the adapter option");
        let reason = format!("selected by {by}: {}", wanted.value);
        return Ok((adapters, index, reason));
    }
    let (index, best) = adapters
        .iter()
        .enumerate()
        .min_by_key(|(i, a)| (adapter_rank(&a.get_info()), *i))
        .ok_or_else(|| Error::Gpu("no adapter".into()))?;
    let info = best.get_info();
    let reason = format!(
        "best available: {:?} on {:?} (discrete > integrated > virtual > other > CPU; \
         Vulkan/Metal/DX12 before GL)",
        info.device_type, info.backend
    );
    Ok((adapters, index, reason))
}

fn find_adapter(adapters: &[wgpu::Adapter], wanted: &Setting) -> Result<usize> {
    let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
    let found = || format!("found: {}", names.join(", "));
    if let Ok(index) = wanted.value.trim().parse::<usize>() {
        return if index < adapters.len() {
            Ok(index)
        } else {
            let count = adapters.len();
            let message = format!(
                "index {index} is out of range: {count} adapter(s), {}",
                found()
            );
            Err(wanted.error(message))
        };
    }
    let needle = wanted.value.to_lowercase();
    names
        .iter()
        .position(|name| name.to_lowercase().contains(&needle))
        .ok_or_else(|| {
            let message = format!("no adapter name contains '{}'; {}", wanted.value, found());
            wanted.error(message)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn given(list: &str) -> Setting {
        Setting::read("gpu.backends", &Some(list.into()), BACKEND_ENV).unwrap()
    }

    #[test]
    fn backend_lists_parse_and_reject_unknown_names() {
        assert_eq!(
            parse_backends(&given("Vulkan, gl")).unwrap(),
            wgpu::Backends::VULKAN | wgpu::Backends::GL
        );
        match parse_backends(&given("cuda")) {
            Err(Error::Config { field, message }) => {
                assert_eq!(field, "gpu.backends");
                assert!(message.contains("unknown backend 'cuda'"), "{message}");
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
        assert!(parse_backends(&given(" , ")).is_err());
    }

    #[test]
    fn a_setting_read_from_the_environment_says_so() {
        let setting = Setting {
            field: "gpu.backends",
            value: "cuda".into(),
            from_env: Some(BACKEND_ENV),
        };
        let err = parse_backends(&setting).unwrap_err().to_string();
        assert!(err.contains(BACKEND_ENV) && err.contains("cuda"), "{err}");
    }
}
