//! The kernel registry: every WGSL entry point is compiled once per device (and per set of
//! override constants) and its pipeline cached.
//!
//! A pipeline compiles on a thread of its own from the moment its kernel is first asked for,
//! and the [`super::Recorder`] waits for it only when it encodes the dispatch (at the end of
//! its compute pass), so the kernels a fresh process's first step needs compile side by side
//! on every core instead of one after another (lavapipe runs its compiler passes for every
//! pipeline even when its shader cache holds the result: BENCHMARKS.md, "Startup").
//!
//! Binding convention, shared by every shader in `shaders/`: `@binding(0)` is the entry
//! point's uniform parameter struct; storage buffers use the other binding numbers of group 0,
//! each number unique within its file, and an entry point uses at most 7 of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use super::Gpu;

/// WGSL prepended to every shader: helpers that all kernel families share.
const PRELUDE: &str = include_str!("../../shaders/common.wgsl");

/// What wgpu checks in the shaders at run time: everything but loop bounding, whose loop
/// counters hide each loop's trip count from the driver (lavapipe compiled attention's kernels
/// 5× faster and ran them 20% faster without them: BENCHMARKS.md, "Startup").
const RUNTIME_CHECKS: wgpu::ShaderRuntimeChecks = wgpu::ShaderRuntimeChecks {
    force_loop_bounding: false,
    ..wgpu::ShaderRuntimeChecks::checked()
};

/// Most storage buffers one entry point may bind (Metal has one slot fewer than the 8 of
/// WebGPU's default limit, and one slot is the uniform).
pub const MAX_STORAGE_BINDINGS: usize = 7;

/// A WGSL shader module from `shaders/`: one file, or a file after the files of its family
/// that it builds on (so that a family's passes can live in files of their own).
#[derive(Debug)]
pub struct Shader {
    /// The (last) file's name without `.wgsl`, used in error messages and profiles.
    pub name: &'static str,
    /// The WGSL texts of the files, in order.
    pub sources: &'static [&'static str],
}

/// Declares a [`Shader`] from `shaders/<name>.wgsl`, embedded at compile time;
/// `shader!("b" after "a")` is `a.wgsl` followed by `b.wgsl`, named `b`.
#[macro_export]
macro_rules! shader {
    ($name:literal $(after $base:literal)*) => {
        $crate::gpu::Shader {
            name: $name,
            sources: &[
                $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $base, ".wgsl")),)*
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl")),
            ],
        }
    };
}

/// How an entry point uses one storage binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `var<storage, read>`
    Read,
    /// `var<storage, read_write>`
    ReadWrite,
}

/// A `var<storage, read>` binding of a [`KernelSpec`].
pub const fn read(binding: u32) -> (u32, Access) {
    (binding, Access::Read)
}

/// A `var<storage, read_write>` binding of a [`KernelSpec`].
pub const fn read_write(binding: u32) -> (u32, Access) {
    (binding, Access::ReadWrite)
}

/// One compute entry point: its shader, name, and the storage bindings it uses, in the order
/// a launcher passes tensors.
#[derive(Debug)]
pub struct KernelSpec {
    /// The file the entry point is in.
    pub shader: &'static Shader,
    /// The entry point's name.
    pub entry: &'static str,
    /// `(binding number, access)` for each storage buffer, in launch order.
    pub bindings: &'static [(u32, Access)],
}

/// Override constants a pipeline is specialised with (workgroup and tile sizes).
pub type Overrides = Vec<(&'static str, u32)>;

/// A compute pipeline (compiled, or compiling on a thread of its own) and the layout its bind
/// groups follow.
#[derive(Debug)]
pub struct Kernel {
    pub(crate) spec: &'static KernelSpec,
    pub(crate) pipeline: Arc<PendingPipeline>,
    pub(crate) layout: wgpu::BindGroupLayout,
}

/// A pipeline that is compiled on another thread until someone needs it.
#[derive(Debug)]
pub(crate) struct PendingPipeline {
    /// The pipeline, or what the compiling thread panicked with, once it is known.
    done: OnceLock<Result<wgpu::ComputePipeline, String>>,
    compiling: Mutex<Option<JoinHandle<wgpu::ComputePipeline>>>,
}

impl PendingPipeline {
    /// Starts `compile` on a thread of its own, or runs it here where no thread can be made.
    fn spawn(
        entry: &str,
        compile: impl Fn() -> wgpu::ComputePipeline + Clone + Send + 'static,
    ) -> PendingPipeline {
        let pending = PendingPipeline {
            done: OnceLock::new(),
            compiling: Mutex::new(None),
        };
        let thread = std::thread::Builder::new()
            .name(format!("compile {entry}"))
            .spawn(compile.clone());
        match thread {
            Ok(handle) => *lock(&pending.compiling) = Some(handle),
            // No thread to be had (a process limit): compile here, as if nothing overlapped.
            Err(_) => {
                let _ = pending.done.set(Ok(compile()));
            }
        }
        pending
    }

    /// The pipeline, waiting for its compilation to end. A compile that panicked (an invalid
    /// shader) panics here, where the pipeline is needed.
    pub(crate) fn get(&self) -> &wgpu::ComputePipeline {
        match self.finished() {
            Ok(pipeline) => pipeline,
            Err(message) => panic!("{message}"),
        }
    }

    /// Waits for the compilation to end without panicking, whatever it ended with: for a
    /// device that is being dropped, perhaps while a panic unwinds.
    pub(crate) fn wait(&self) {
        let _ = self.finished();
    }

    fn finished(&self) -> &Result<wgpu::ComputePipeline, String> {
        self.done.get_or_init(|| {
            let handle = lock(&self.compiling).take();
            let handle = handle.expect("a pipeline that is not done is compiling");
            let name = handle.thread().name().unwrap_or("compile").to_owned();
            handle
                .join()
                .map_err(|panic| format!("{name} panicked: {}", panic_message(&*panic)))
        })
    }
}

/// What a panic said, where it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

type KernelKey = (usize, Overrides);

/// Pipelines and shader modules by identity; compiled at first use.
#[derive(Default)]
pub(crate) struct KernelCache {
    pipelines: Mutex<HashMap<KernelKey, Arc<Kernel>>>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
}

impl Gpu {
    /// The pipeline for `spec` with `overrides`, compiled on first use and cached.
    pub fn kernel(
        &self,
        spec: &'static KernelSpec,
        overrides: &[(&'static str, u32)],
    ) -> Arc<Kernel> {
        assert!(
            spec.bindings.len() <= MAX_STORAGE_BINDINGS,
            "{} binds {} storage buffers; at most {MAX_STORAGE_BINDINGS} are portable",
            spec.entry,
            spec.bindings.len()
        );
        let key = (spec as *const KernelSpec as usize, overrides.to_vec());
        let cache = &self.kernels;
        if let Some(kernel) = lock(&cache.pipelines).get(&key) {
            return kernel.clone();
        }
        let kernel = Arc::new(self.compile(spec, overrides));
        lock(&cache.pipelines).insert(key, kernel.clone());
        kernel
    }

    fn module(&self, shader: &'static Shader) -> wgpu::ShaderModule {
        let mut modules = lock(&self.kernels.modules);
        modules
            .entry(shader.name)
            .or_insert_with(|| {
                let source = format!(
                    "{}\n{PRELUDE}\n{}",
                    self.wgsl_enables(),
                    shader.sources.join("\n")
                );
                let descriptor = wgpu::ShaderModuleDescriptor {
                    label: Some(shader.name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                };
                // SAFETY: the one check left out is naga's loop bounding, which a shader needs
                // only if a loop of it could run forever (a driver may treat such a loop as
                // unreachable). Every loop in shaders/ is a `for` that counts up to a bound by
                // a positive step, or halves down to zero (the test
                // `every_shader_loop_counts_up_to_a_bound_or_halves_to_zero` holds them to
                // those shapes), and its bound is an element count of a buffer, far below
                // where a u32 wraps. Bounds checks and integer division checks stay on.
                unsafe {
                    self.device
                        .create_shader_module_trusted(descriptor, RUNTIME_CHECKS)
                }
            })
            .clone()
    }

    /// `enable` directives for the optional features this device has.
    fn wgsl_enables(&self) -> &'static str {
        if self.has_f16() {
            "enable f16;"
        } else {
            ""
        }
    }

    fn compile(&self, spec: &'static KernelSpec, overrides: &[(&'static str, u32)]) -> Kernel {
        let module = self.module(spec.shader);
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        entries.extend(
            spec.bindings
                .iter()
                .map(|&(binding, access)| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: access == Access::Read,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }),
        );
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(spec.entry),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(spec.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let constants: Vec<(&'static str, f64)> = overrides
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let device = self.device.clone();
        let cache = self.pipeline_cache.as_ref().map(|c| c.cache.clone());
        let compile = move || {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(spec.entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(spec.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel initialises the workgroup memory it reads.
                    zero_initialize_workgroup_memory: false,
                },
                cache: cache.as_ref(),
            })
        };
        Kernel {
            spec,
            pipeline: Arc::new(PendingPipeline::spawn(spec.entry, compile)),
            layout,
        }
    }

    /// Waits for every pipeline still compiling, whatever each compile ends with.
    pub(crate) fn finish_compiling(&self) {
        let kernels: Vec<Arc<Kernel>> = lock(&self.kernels.pipelines).values().cloned().collect();
        for kernel in kernels {
            kernel.pipeline.wait();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while compiling leaves a cache that is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::PendingPipeline;

    /// A compile that panics is reported where its pipeline is needed, with its message, and
    /// waiting for it (as a device does when it is dropped) does not panic.
    #[test]
    fn a_compile_that_panics_panics_where_its_pipeline_is_needed() {
        let pending = PendingPipeline::spawn("broken_entry", || panic!("invalid shader"));
        pending.wait();
        pending.wait();
        let needed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pending.get();
        }));
        let panic = needed.expect_err("get() panics for a pipeline that failed to compile");
        let message = super::panic_message(&*panic);
        assert!(
            message.contains("compile broken_entry panicked: invalid shader"),
            "{message}"
        );
    }

    /// The `for` headers of every WGSL file (which has no `loop` or `while`): what makes the
    /// modules' loops finite without naga's loop bounding (see `Gpu::module`).
    #[test]
    fn every_shader_loop_counts_up_to_a_bound_or_halves_to_zero() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("shaders/ is readable") {
            let path = entry.expect("a directory entry").path();
            let text = std::fs::read_to_string(&path).expect("a WGSL file is text");
            for (number, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let place = format!("{}:{}", path.display(), number + 1);
                for word in ["loop", "while", "continuing"] {
                    let words = code.split(|c: char| !c.is_alphanumeric() && c != '_');
                    assert!(!words.into_iter().any(|w| w == word), "{place}: `{word}`");
                }
                if let Some(header) = code.trim().strip_prefix("for (") {
                    assert!(
                        finite_for(header),
                        "{place}: a loop of unproven end: {line}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 50,
            "only {checked} loops found under {}",
            dir.display()
        );
    }

    /// `var i = ...; i < bound; i++` (or `i += step`, `i = i + step`, step a name or a positive
    /// literal), or `var i = ...; i > 0u; i = i / 2u`.
    fn finite_for(header: &str) -> bool {
        let parts: Vec<&str> = header.split(';').map(str::trim).collect();
        let [init, condition, update] = parts[..] else {
            return false;
        };
        let Some(var) = init
            .strip_prefix("var ")
            .and_then(|rest| rest.split_whitespace().next())
        else {
            return false;
        };
        let update = update.strip_suffix(") {").unwrap_or(update);
        let positive_step = |step: &str| {
            let step = step.trim();
            step.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                || (step
                    .trim_end_matches('u')
                    .parse::<u32>()
                    .is_ok_and(|n| n > 0))
                || step.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        };
        if condition == format!("{var} > 0u") {
            return update == format!("{var} = {var} / 2u");
        }
        let counts_up = update == format!("{var}++")
            || update
                .strip_prefix(&format!("{var} += "))
                .is_some_and(positive_step)
            || update
                .strip_prefix(&format!("{var} = {var} + "))
                .is_some_and(positive_step);
        counts_up && condition.starts_with(&format!("{var} < "))
    }
}
