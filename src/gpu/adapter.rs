//! Which adapter a device opens: the backends searched, the adapters found and their ranking,
//! what the user asked for (an option, else the environment), and the report `es2-wgpu info`
//! prints.

use serde::Serialize;

use super::PipelineCacheDir;
use crate::{Error, Result};

/// Environment variable that picks an adapter by index or name substring.
pub const ADAPTER_ENV: &str = "ES2_ADAPTER";
/// Environment variable that restricts the backends searched (vulkan, metal, dx12, gl).
pub const BACKEND_ENV: &str = "ES2_BACKEND";

/// Keeps Mesa's Vulkan device-select layer from probing for a Wayland compositor that cannot be
/// there, so that a headless process prints no `error: XDG_RUNTIME_DIR is invalid or not set in
/// the environment.` lines. Call it first thing in `main`, before any thread starts (it sets an
/// environment variable) and before the first [`Gpu`](super::Gpu).
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

pub(super) fn choose_adapter(options: &GpuOptions) -> Result<(Vec<wgpu::Adapter>, usize, String)> {
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
