//! The memory plan of a training run, made from `config.json` and the run's settings before
//! any weight loads: what the GPU's buffer pool will hold at the run's peak (one training
//! step), by component, its largest single buffer, and whether that fits the adapter.
//!
//! The plan walks one step as the engines record it, tensor by tensor: `engine.rs` (ES2) and
//! `sft.rs`, the block loop (`model/runner.rs`), a block's forward
//! (`Transformer::block_forward`, whose saved tensors are `BlockActivations`) and backward
//! (`model/backward.rs`), the projections with their adapters (`model/linear.rs`) and the
//! scratch each kernel takes (the ops' `*_scratch_bytes`). It runs them through a model of the
//! buffer pool (`gpu/pool.rs`): buffers are keyed by their rounded size, a dropped tensor's
//! buffer goes back to the pool at the recorder's next submission (the recorder keeps every
//! bound buffer until then; the block loop submits once per block), and a request reuses an
//! idle buffer of its size or allocates a new one. So the pool ends up holding, for each
//! size, as many buffers as were ever in use at once: the sum of those is what
//! [`Gpu::peak_bytes`] measures, and what the plan's total predicts. A change to what a step
//! allocates must be followed here; `tests/es2/plan.rs` compares the plan with the measured
//! peak.

use std::fmt;

use serde::Serialize;

use super::train_config::{Task, TrainConfig};
use crate::gpu::{DType, Gpu};
use crate::model::{Config, LoraConfig, WeightsDtype};
use crate::{Error, Result};

mod ledger;
mod walk;

use walk::Walk;

/// What a buffer holds, for the plan's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// Weights that do not train, stored in f32 (embedding, LM head, norms, biases; the block
    /// projections without 16-bit weights).
    FrozenF32,
    /// Frozen weight matrices (block projections, embedding, LM head) stored in 16 bits (f16
    /// or bf16: [`PlanSettings::frozen_matrices`]).
    Frozen16,
    /// The parameters that train (LoRA adapters, or every weight), f32.
    Trained,
    /// The trained parameters' gradients.
    Gradients,
    /// AdamW's two moments per trained parameter.
    Moments,
    /// What the forwards keep for the backward: every block's activations, or with
    /// recomputation only the residual stream.
    Activations,
    /// The LM head's row chunks of logits `[chunk, V]` and their gradient (the fine-tuned and
    /// base logits under ES2), `Transformer::head_in_chunks`.
    Logits,
    /// A block's temporaries and recomputed activations, gradients in flight, the losses'
    /// inputs, batches, kernel scratch and launch parameters.
    Workspace,
}

impl Component {
    /// Every component, in the table's order.
    pub const ALL: [Component; 8] = [
        Component::FrozenF32,
        Component::Frozen16,
        Component::Trained,
        Component::Gradients,
        Component::Moments,
        Component::Activations,
        Component::Logits,
        Component::Workspace,
    ];

    /// The table's name for it.
    pub fn describe(self) -> &'static str {
        match self {
            Component::FrozenF32 => "frozen weights, f32",
            Component::Frozen16 => "frozen weights, 16-bit",
            Component::Trained => "trained parameters",
            Component::Gradients => "gradients",
            Component::Moments => "AdamW moments",
            Component::Activations => "activations kept for the backward",
            Component::Logits => "logits and their gradients",
            Component::Workspace => "workspace (temporaries, scratch)",
        }
    }

    fn index(self) -> usize {
        Component::ALL
            .iter()
            .position(|&c| c == self)
            .unwrap_or_default()
    }
}

/// The adapter a plan is made for: its buffer limits and, when known, its memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceLimits {
    /// The adapter's name.
    pub name: String,
    /// A CPU adapter (lavapipe): matrix products split their work differently there, which
    /// changes their scratch.
    pub cpu: bool,
    /// The largest buffer it creates (`max_buffer_size`).
    pub max_buffer_size: u64,
    /// The largest range one storage binding covers (`max_storage_buffer_binding_size`);
    /// vocabulary-sized matrices are split into chunks that fit it.
    pub max_binding_size: u64,
    /// The memory the run may use, when known (wgpu does not report it: the user says it).
    pub memory: Option<u64>,
}

impl DeviceLimits {
    /// The limits of `gpu`'s adapter, its memory unknown.
    pub fn of(gpu: &Gpu) -> Self {
        DeviceLimits {
            name: gpu.info().name.clone(),
            cpu: gpu.info().device_type == wgpu::DeviceType::Cpu,
            max_buffer_size: gpu.limits().max_buffer_size,
            max_binding_size: gpu.max_binding_bytes(),
            memory: None,
        }
    }

    /// A discrete GPU with `memory` bytes as Vulkan drivers of current desktop GPUs describe
    /// one (NVIDIA, AMD's RADV): bindings up to 4 GiB − 1 byte, buffers as large as memory.
    /// For planning a run on a machine one does not have.
    pub fn discrete_gpu(memory: u64) -> Self {
        DeviceLimits {
            name: format!("a discrete GPU with {}", human_bytes(memory)),
            cpu: false,
            max_buffer_size: memory,
            max_binding_size: u64::from(u32::MAX),
            memory: Some(memory),
        }
    }
}

/// A buffer the plan names: the largest one, or the largest bound whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Buffer {
    /// What it holds (a name from the code).
    pub name: String,
    /// Its size in bytes (as the pool allocates it).
    pub bytes: u64,
}

/// The run settings a plan depends on, for its heading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanSettings {
    /// The objective.
    pub task: Task,
    /// LoRA's rank and targets, or `None` for full fine-tuning.
    pub lora: Option<LoraConfig>,
    /// The element type of the frozen weight matrices (block projections, embedding, LM
    /// head): f32, f16 or bf16, the run's `weights_dtype` as it resolves for this model.
    pub frozen_matrices: DType,
    /// Only block inputs are kept; blocks run again in the backward.
    pub recompute: bool,
    /// Sequences per step: harmful + harmless (ES2) or conversations (SFT).
    pub batches: Vec<usize>,
    /// Tokens per sequence (every sequence is planned at `max_len`).
    pub max_len: usize,
}

/// GPU memory of a training run by component, at its peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// The model's parameter count.
    pub parameters: usize,
    /// What the plan is for.
    pub settings: PlanSettings,
    /// Bytes in use per component at the moment the most is in use, in [`Component::ALL`]'s
    /// order.
    pub components: Vec<(Component, u64)>,
    /// Bytes the pool holds idle at that moment: buffers of sizes in use at other moments
    /// (the pool reuses a buffer only for a tensor of its own size).
    pub idle: u64,
    /// Everything the pool allocates: the components plus `idle` ([`Gpu::peak_bytes`] after
    /// the step).
    pub total: u64,
    /// The largest single buffer.
    pub largest: Buffer,
    /// The largest buffer a kernel binds whole (others are bound in row parts).
    pub largest_binding: Buffer,
    /// The adapter it was planned for.
    pub device: DeviceLimits,
}

impl MemoryPlan {
    /// Plans `run` for a model of configuration `model` on `device`.
    pub fn new(model: &Config, run: &TrainConfig, device: &DeviceLimits) -> Result<MemoryPlan> {
        let layers = match run.task {
            Task::Es2 => run.objective.resolved_layers(model.num_hidden_layers)?,
            Task::Sft => Vec::new(),
        };
        let mut walk = Walk::new(model, run, device);
        walk.persistent(&layers);
        match run.task {
            Task::Es2 => walk.es2_step(run, &layers),
            Task::Sft => walk.sft_step(run),
        }
        Ok(walk.finish(run))
    }

    /// Bytes in use at the peak for `component`.
    pub fn bytes(&self, component: Component) -> u64 {
        self.components
            .iter()
            .find(|(c, _)| *c == component)
            .map_or(0, |&(_, b)| b)
    }

    /// Why the run cannot run on the device: over its memory, a buffer over
    /// `max_buffer_size`, a binding over `max_storage_buffer_binding_size`. Empty when it fits.
    pub fn problems(&self) -> Vec<String> {
        let d = &self.device;
        let mut problems = Vec::new();
        if let Some(memory) = d.memory.filter(|&m| self.total > m) {
            problems.push(format!(
                "it needs {} of GPU memory; the GPU has {}",
                human_bytes(self.total),
                human_bytes(memory)
            ));
        }
        if self.largest.bytes > d.max_buffer_size {
            problems.push(format!(
                "its largest buffer ({}, {}) is over the adapter's max_buffer_size ({})",
                self.largest.name,
                human_bytes(self.largest.bytes),
                human_bytes(d.max_buffer_size)
            ));
        }
        if self.largest_binding.bytes > d.max_binding_size {
            problems.push(format!(
                "a kernel binds {} ({}) whole, over the adapter's \
                 max_storage_buffer_binding_size ({})",
                self.largest_binding.name,
                human_bytes(self.largest_binding.bytes),
                human_bytes(d.max_binding_size)
            ));
        }
        problems
    }

    /// No problem: within memory (when known) and the buffer limits.
    pub fn fits(&self) -> bool {
        self.problems().is_empty()
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        let trained = match &s.lora {
            Some(l) => {
                let targets: Vec<&str> = l.targets.iter().map(|p| p.short()).collect();
                format!("LoRA r{} on {}", l.rank, targets.join(","))
            }
            None => "every weight (full fine-tuning)".into(),
        };
        // Full supervised fine-tuning trains every matrix and keeps no frozen copy.
        let frozen = if s.lora.is_none() && s.task == Task::Sft {
            "no frozen copy".to_owned()
        } else {
            format!("frozen matrices in {}", s.frozen_matrices)
        };
        let batches: Vec<String> = s.batches.iter().map(usize::to_string).collect();
        writeln!(
            f,
            "memory plan: {} step of a model of {} parameters, {trained}, {frozen}, batches \
             {} × {} tokens, recomputation {}",
            match s.task {
                Task::Es2 => "an ES2",
                Task::Sft => "an SFT",
            },
            human_count(self.parameters),
            batches.join(" + "),
            s.max_len,
            if s.recompute { "on" } else { "off" }
        )?;
        for (component, bytes) in self.components.iter().filter(|(_, b)| *b > 0) {
            let name = match component {
                Component::Frozen16 => format!("frozen weights, {}", s.frozen_matrices),
                _ => component.describe().to_owned(),
            };
            writeln!(f, "  {name:<36} {:>12}", human_bytes(*bytes))?;
        }
        if self.idle > 0 {
            let idle = "idle in the pool (other sizes)";
            writeln!(f, "  {idle:<36} {:>12}", human_bytes(self.idle))?;
        }
        writeln!(f, "  {:<36} {:>12}", "total", human_bytes(self.total))?;
        let d = &self.device;
        let memory = d
            .memory
            .map_or("unknown (--gpu-memory)".into(), human_bytes);
        writeln!(
            f,
            "largest buffer: {} ({}); largest bound whole: {} ({})",
            self.largest.name,
            human_bytes(self.largest.bytes),
            self.largest_binding.name,
            human_bytes(self.largest_binding.bytes)
        )?;
        write!(
            f,
            "{}: memory {memory}, max_buffer_size {}, max_storage_buffer_binding_size {}",
            d.name,
            human_bytes(d.max_buffer_size),
            human_bytes(d.max_binding_size)
        )
    }
}

/// A count in thousands, millions or billions (7.24B, 494.0M).
fn human_count(n: usize) -> String {
    let n = n as f64;
    match n {
        _ if n >= 1e9 => format!("{:.2}B", n / 1e9),
        _ if n >= 1e6 => format!("{:.1}M", n / 1e6),
        _ if n >= 1e3 => format!("{:.1}K", n / 1e3),
        _ => format!("{n}"),
    }
}

/// `bytes` in B, KiB, MiB or GiB.
pub fn human_bytes(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.2} GiB")
}

/// The plan of `run` for `model` on `device`, made before anything loads. A run that fits
/// only with activation recomputation gets it (`run.recompute` is set, and the message says
/// so); a run that does not fit at all is an [`Error::DoesNotFit`] showing the plan and the
/// settings that would make it fit. Returns the plan and a line for the run's messages.
pub fn fit(
    model: &Config,
    run: &mut TrainConfig,
    device: &DeviceLimits,
) -> Result<(MemoryPlan, String)> {
    let plan = MemoryPlan::new(model, run, device)?;
    let summary = |p: &MemoryPlan| {
        format!(
            "{} of GPU memory at the peak (largest buffer: {}, {})",
            human_bytes(p.total),
            p.largest.name,
            human_bytes(p.largest.bytes)
        )
    };
    if plan.fits() {
        return Ok((plan.clone(), format!("memory plan: {}", summary(&plan))));
    }
    if !run.recompute {
        let recomputing = with(run, |r| r.recompute = true);
        let second = MemoryPlan::new(model, &recomputing, device)?;
        if second.fits() {
            run.recompute = true;
            let message = format!(
                "activation recomputation is on (--recompute): without it the run would not \
                 fit ({}); memory plan: {}",
                plan.problems().join("; "),
                summary(&second)
            );
            return Ok((second, message));
        }
    }
    Err(does_not_fit(model, run, &plan))
}

/// A run that does not fit: the error shows the plan and the settings that would make it fit.
pub fn does_not_fit(model: &Config, run: &TrainConfig, plan: &MemoryPlan) -> Error {
    let problems = plan.problems().join("; ");
    let knobs = knobs(model, run, &plan.device)
        .iter()
        .map(|k| format!("  {k}"))
        .collect::<Vec<_>>()
        .join("\n");
    let advice = if knobs.is_empty() {
        "no single setting makes it fit: combine smaller batches and max_len, or use a \
         larger GPU"
            .into()
    } else {
        format!("settings that change the plan:\n{knobs}")
    };
    Error::DoesNotFit {
        message: format!("the run does not fit the GPU: {problems}\n{plan}\n{advice}"),
    }
}

/// The settings a user can change, each alone, with the total it gives and whether the run
/// then fits: recomputation, 16-bit frozen weights, LoRA instead of full fine-tuning, and the
/// largest batches and `max_len` that fit.
pub fn knobs(model: &Config, run: &TrainConfig, device: &DeviceLimits) -> Vec<String> {
    let plan = |changed: &TrainConfig| MemoryPlan::new(model, changed, device).ok();
    let mut out = Vec::new();
    let mut try_setting = |name: &str, changed: TrainConfig| {
        if let Some(p) = plan(&changed) {
            let verdict = if p.fits() {
                "fits"
            } else {
                "still does not fit"
            };
            out.push(format!("{name}: {} ({verdict})", human_bytes(p.total)));
        }
    };
    if !run.recompute {
        let recompute = with(run, |r| r.recompute = true);
        try_setting(
            "activation recomputation (recompute, --recompute)",
            recompute,
        );
    }
    let frozen_copy = run.lora.is_some() || run.task == Task::Es2;
    if run.weights_dtype.resolve(model) == DType::F32 && frozen_copy {
        // A bf16 checkpoint is best kept as it is; anything else rounds to f16.
        let (name, dtype) = match WeightsDtype::Auto.resolve(model) {
            DType::BF16 => (
                "bf16 frozen weights, the checkpoint's own type (weights_dtype, \
                 --weights-dtype bf16 or auto)",
                WeightsDtype::Bf16,
            ),
            _ => (
                "f16 frozen weights (weights_dtype, --weights-dtype f16)",
                WeightsDtype::F16,
            ),
        };
        try_setting(name, with(run, |r| r.weights_dtype = dtype));
    }
    if run.lora.is_none() {
        let lora = with(run, |r| r.lora = Some(LoraConfig::default()));
        try_setting(
            "LoRA rank 16 instead of full fine-tuning (lora, no --full)",
            lora,
        );
    }
    let fits = |r: &TrainConfig| plan(r).is_some_and(|p| p.fits());
    // Memory grows with batches and length, so the largest that fits is a bisection away.
    let largest = |set: &dyn Fn(&mut TrainConfig, usize), from: usize| {
        let fits_at = |n: usize| fits(&with(run, |r| set(r, n)));
        if from <= 1 || !fits_at(1) {
            return None;
        }
        let (mut lo, mut hi) = (1, from);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits_at(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    };
    let (batch_name, batch) = match run.task {
        Task::Es2 => (
            "harmful_batch and harmless_batch (--harmful-batch, --harmless-batch)",
            run.harmful_batch.max(run.harmless_batch),
        ),
        Task::Sft => ("sft_batch (--sft-batch)", run.sft_batch),
    };
    let set_batch = |r: &mut TrainConfig, n: usize| {
        r.harmful_batch = r.harmful_batch.min(n);
        r.harmless_batch = r.harmless_batch.min(n);
        r.sft_batch = r.sft_batch.min(n);
    };
    if let Some(n) = largest(&set_batch, batch) {
        out.push(format!("{batch_name} at most {n}: fits"));
    }
    if let Some(n) = largest(&|r, n| r.max_len = n, run.max_len).filter(|&n| n >= 2) {
        out.push(format!("max_len (--max-len) at most {n}: fits"));
    }
    out
}

/// `run` with one change.
fn with(run: &TrainConfig, change: impl FnOnce(&mut TrainConfig)) -> TrainConfig {
    let mut changed = run.clone();
    change(&mut changed);
    changed
}
