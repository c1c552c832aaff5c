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

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use super::objective::{embedding_index, Es2Config};
use super::trainer::{Task, TrainConfig};
use crate::gpu::{pooled_size, rows_per_binding, DType, Gpu, UNIFORM_CHUNK_BYTES};
use crate::model::head::head_chunks;
use crate::model::{Config, LoraConfig, Projection, SavePolicy, WeightsDtype};
use crate::ops::attention::{attention_backward_scratch_bytes, AttentionShape};
use crate::ops::grad_norm::grad_norm_scratch_bytes;
use crate::ops::matmul::{gemm_scratch_bytes, Gemm};
use crate::ops::reduce::sum_rows_scratch_bytes;
use crate::ops::rmsnorm::rmsnorm_backward_scratch_bytes;
use crate::{Error, Result};

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

/// One buffer the walk took: its pool key and what it holds.
struct Taken {
    key: Key,
    component: Component,
    live: bool,
}

/// Tensors and uniform chunks are pooled apart, as the pool keys by usage too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    bytes: u64,
    uniform: bool,
}

/// A handle on a buffer the walk took.
#[derive(Debug, Clone, Copy)]
struct Id(usize);

/// Whether a kernel binds the buffer whole, or in parts that each fit a binding.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    Whole,
    InParts,
}

/// The buffer pool's bookkeeping, played through: how many buffers of each size are in use and
/// the most ever were, what is in use by component, and the buffers waiting for the next
/// submission to go back to the pool.
#[derive(Default)]
struct Ledger {
    taken: Vec<Taken>,
    in_use: HashMap<Key, usize>,
    most: HashMap<Key, usize>,
    live: [u64; Component::ALL.len()],
    live_total: u64,
    peak: u64,
    at_peak: [u64; Component::ALL.len()],
    pending: Vec<Id>,
    largest: Buffer,
    largest_binding: Buffer,
}

impl Ledger {
    fn take_key(&mut self, component: Component, name: &str, key: Key, bound: Bound) -> Id {
        let count = self.in_use.entry(key).or_default();
        *count += 1;
        let most = self.most.entry(key).or_default();
        *most = (*most).max(*count);
        self.live[component.index()] += key.bytes;
        self.live_total += key.bytes;
        if self.live_total > self.peak {
            self.peak = self.live_total;
            self.at_peak = self.live;
        }
        let note = |buffer: &mut Buffer| {
            if key.bytes > buffer.bytes {
                *buffer = Buffer {
                    name: name.to_owned(),
                    bytes: key.bytes,
                };
            }
        };
        note(&mut self.largest);
        if bound == Bound::Whole {
            note(&mut self.largest_binding);
        }
        self.taken.push(Taken {
            key,
            component,
            live: true,
        });
        Id(self.taken.len() - 1)
    }

    /// A tensor of `bytes` (`Tensor::empty`, `Tensor::zeros`, an upload).
    fn take(&mut self, component: Component, name: &str, bytes: u64, bound: Bound) -> Id {
        let key = Key {
            bytes: pooled_size(bytes),
            uniform: false,
        };
        self.take_key(component, name, key, bound)
    }

    /// An f32 tensor of `dims`, bound whole.
    fn f32(&mut self, component: Component, name: &str, dims: &[usize]) -> Id {
        let bytes = dims.iter().product::<usize>() * DType::F32.size_bytes();
        self.take(component, name, bytes as u64, Bound::Whole)
    }

    /// A u32 tensor of `n` elements (ids, lengths, row lists).
    fn u32(&mut self, name: &str, n: usize) -> Id {
        let bytes = n * DType::U32.size_bytes();
        self.take(Component::Workspace, name, bytes as u64, Bound::Whole)
    }

    /// A launcher's scratch (`Recorder::scratch`), released at the next submission.
    fn scratch(&mut self, name: &str, bytes: u64) {
        if bytes > 0 {
            let id = self.take(Component::Workspace, name, bytes, Bound::Whole);
            self.drop(id);
        }
    }

    /// An f32 temporary of `dims`, dropped as soon as recorded (kept until the submission).
    fn temp(&mut self, name: &str, dims: &[usize]) {
        let id = self.f32(Component::Workspace, name, dims);
        self.drop(id);
    }

    /// The tensor's last handle dropped: its buffer goes back at the next submission.
    fn drop(&mut self, id: Id) {
        self.pending.push(id);
    }

    fn drop_all(&mut self, ids: impl IntoIterator<Item = Id>) {
        self.pending.extend(ids);
    }

    /// A submission (`Recorder::flush`, `submit`): dropped buffers return to the pool.
    fn flush(&mut self) {
        for Id(i) in std::mem::take(&mut self.pending) {
            let taken = &mut self.taken[i];
            if !std::mem::replace(&mut taken.live, false) {
                continue;
            }
            if let Some(count) = self.in_use.get_mut(&taken.key) {
                *count -= 1;
            }
            self.live[taken.component.index()] -= taken.key.bytes;
            self.live_total -= taken.key.bytes;
        }
    }

    /// Everything the pool has allocated.
    fn pool_bytes(&self) -> u64 {
        self.most.iter().map(|(k, &n)| k.bytes * n as u64).sum()
    }
}

/// The shape of one batch: every sequence at full length, as the plan assumes.
#[derive(Debug, Clone, Copy)]
struct Rows {
    batch: usize,
    seq: usize,
}

impl Rows {
    fn rows(self) -> usize {
        self.batch * self.seq
    }
}

/// One pass through the block loop (`runner.rs`'s `Pass`), as far as memory goes.
struct PassSpec {
    save: SavePolicy,
    adapters: bool,
    /// Hidden-state indices of the pooled captures.
    hooks: Vec<usize>,
    /// The highest hidden state computed.
    top: usize,
}

/// What a forward holds (`runner.rs`'s `Forward`).
struct Fwd {
    residual: Vec<Id>,
    normed: Vec<Id>,
    blocks: Vec<Vec<Id>>,
    captures: Vec<Id>,
    capture_grads: Vec<Id>,
    /// The gradient at the final norm's output the LM head's loss made (`Seeds::normed`): the
    /// backward goes on from it instead of a zeroed tensor of its own.
    normed_seed: Option<Id>,
    hook_rows: Vec<Id>,
    save: SavePolicy,
    top: usize,
}

/// One step of a run, walked tensor by tensor.
struct Walk<'a> {
    cfg: &'a Config,
    /// The adapters of a LoRA run.
    lora: Option<&'a LoraConfig>,
    /// Every weight trains.
    full: bool,
    dropout: bool,
    /// The frozen matrices' element type.
    frozen_matrices: DType,
    save: SavePolicy,
    device: DeviceLimits,
    /// Numbers of elements of each trained tensor (the gradient norm's scratch).
    trained: Vec<usize>,
    ledger: Ledger,
}

impl<'a> Walk<'a> {
    fn new(cfg: &'a Config, run: &'a TrainConfig, device: &DeviceLimits) -> Self {
        Walk {
            cfg,
            lora: run.lora.as_ref(),
            full: run.lora.is_none(),
            dropout: run.lora.as_ref().is_some_and(|l| l.dropout > 0.0),
            frozen_matrices: run.weights_dtype.resolve(cfg),
            save: run.save_policy(),
            device: device.clone(),
            trained: Vec::new(),
            ledger: Ledger::default(),
        }
    }

    fn finish(self, run: &TrainConfig) -> MemoryPlan {
        let l = &self.ledger;
        let components: Vec<(Component, u64)> = Component::ALL
            .iter()
            .map(|&c| (c, l.at_peak[c.index()]))
            .collect();
        let total = l.pool_bytes();
        let batches = match run.task {
            Task::Es2 => vec![run.harmful_batch, run.harmless_batch],
            Task::Sft => vec![run.sft_batch],
        };
        MemoryPlan {
            parameters: self.cfg.parameter_count(),
            settings: PlanSettings {
                task: run.task,
                lora: run.lora.clone(),
                frozen_matrices: self.frozen_matrices,
                recompute: run.recompute,
                batches,
                max_len: run.max_len,
            },
            components,
            idle: total.saturating_sub(l.peak),
            total,
            largest: l.largest.clone(),
            largest_binding: l.largest_binding.clone(),
            device: self.device,
        }
    }

    // ---- What lives across steps: weights, adapters, gradients, moments ----

    /// The rows of each chunk of a vocabulary-sized matrix (`VocabMatrix::load`).
    fn vocab_chunks(&self) -> Vec<usize> {
        let (v, c) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let per = rows_per_binding(v, c, self.device.max_binding_size);
        (0..v)
            .step_by(per)
            .map(|start| per.min(v - start))
            .collect()
    }

    /// Every tensor of the model (`Transformer::from_source`): `(component, name, elements,
    /// dtype)`. The matrices (projections, embedding, LM head) are `matrices` (f32, or f16 or
    /// bf16 for frozen weights only).
    fn model_tensors(
        &self,
        trained: bool,
        matrices: DType,
    ) -> Vec<(Component, &'static str, usize, DType)> {
        let c = self.cfg;
        let f32_part = if trained {
            Component::Trained
        } else {
            Component::FrozenF32
        };
        let (proj_part, proj_dtype) = match (trained, matrices) {
            (true, _) => (Component::Trained, DType::F32),
            (false, DType::F32) => (Component::FrozenF32, DType::F32),
            (false, narrow) => (Component::Frozen16, narrow),
        };
        let mut out = Vec::new();
        let vocab = |out: &mut Vec<_>, name| {
            for rows in self.vocab_chunks() {
                out.push((proj_part, name, rows * c.hidden_size, proj_dtype));
            }
        };
        vocab(&mut out, "the embedding");
        for _ in 0..c.num_hidden_layers {
            out.push((f32_part, "a norm weight", c.hidden_size, DType::F32));
            out.push((f32_part, "a norm weight", c.hidden_size, DType::F32));
            for p in Projection::ALL {
                let (rows, cols) = c.projection_shape(p);
                out.push((proj_part, "a projection weight", rows * cols, proj_dtype));
                if c.projection_has_bias(p) {
                    out.push((f32_part, "a bias", rows, DType::F32));
                }
            }
        }
        out.push((f32_part, "the final norm", c.hidden_size, DType::F32));
        if !c.tie_word_embeddings {
            vocab(&mut out, "the LM head");
        }
        out
    }

    /// The adapters (`Transformer::attach_lora`): `A [r, in]`, `B [out, r]` per target.
    fn adapter_tensors(&self) -> Vec<usize> {
        let Some(lora) = self.lora else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for _ in 0..self.cfg.num_hidden_layers {
            for &p in &lora.targets {
                let (rows, cols) = self.cfg.projection_shape(p);
                out.extend([lora.rank * cols, rows * lora.rank]);
            }
        }
        out
    }

    /// Weights, adapters, the frozen copy of a full ES2 run, the engine's gradients, AdamW's
    /// moments (`Gradients::new`, `AdamW::new`) and ES2's per-layer constants (`BaseTensors`).
    fn persistent(&mut self, es2_layers: &[usize]) {
        let full = self.full;
        // The tuned model: f32 and trained under --full, the frozen base of a LoRA run.
        let tuned = if full {
            DType::F32
        } else {
            self.frozen_matrices
        };
        let mut tensors = self.model_tensors(full, tuned);
        let es2 = !es2_layers.is_empty();
        if full && es2 {
            tensors.extend(self.model_tensors(false, self.frozen_matrices));
        }
        for (component, name, n, dtype) in tensors {
            let bytes = (n * dtype.size_bytes()) as u64;
            let bound = if name == "the embedding" || name == "the LM head" {
                Bound::InParts
            } else {
                Bound::Whole
            };
            self.ledger.take(component, name, bytes, bound);
        }
        let rope = self.cfg.head_dim / 2;
        self.ledger
            .f32(Component::FrozenF32, "RoPE frequencies", &[rope]);
        let trained: Vec<usize> = if full {
            self.model_tensors(true, DType::F32)
                .into_iter()
                .map(|(_, _, n, _)| n)
                .collect()
        } else {
            self.adapter_tensors()
        };
        for &n in &trained {
            if !full {
                self.ledger.f32(Component::Trained, "a LoRA matrix", &[n]);
            }
            self.ledger.f32(Component::Gradients, "a gradient", &[n]);
        }
        for _ in 0..2 {
            for &n in &trained {
                self.ledger.f32(Component::Moments, "an AdamW moment", &[n]);
            }
        }
        self.ledger
            .f32(Component::Moments, "the gradient norm", &[1]);
        self.trained = trained;
        if es2 {
            let (l, c) = (es2_layers.len(), self.cfg.hidden_size);
            for dims in [&[l][..], &[l], &[l, c]] {
                self.ledger
                    .f32(Component::Workspace, "ES2's base constants", dims);
            }
        }
    }

    // ---- One step ----

    /// A batch's tensors (`Batch::new`, `Batch::with_targets`).
    fn batch(&mut self, rows: Rows, targets: bool) {
        self.ledger.u32("token ids", rows.rows());
        self.ledger.u32("sequence lengths", rows.batch);
        if targets {
            self.ledger.u32("targets", rows.rows());
        }
    }

    /// `Es2Engine::step`: the base logits, the tuned forwards of both batches, the fused
    /// losses, both backwards, the gradient norm and AdamW, one readback.
    fn es2_step(&mut self, run: &TrainConfig, layers: &[usize]) {
        let c = self.cfg;
        let seq = run.max_len;
        let h = Rows {
            batch: run.harmful_batch,
            seq,
        };
        let s = Rows {
            batch: run.harmless_batch,
            seq,
        };
        self.batch(h, false);
        self.batch(s, false);
        self.uniforms();
        let base = PassSpec {
            save: SavePolicy::Nothing,
            adapters: false,
            hooks: Vec::new(),
            top: c.num_hidden_layers,
        };
        // Only the base forward's final-norm output is kept.
        let base_fwd = self.forward(s, &base);
        let base_rstd = base_fwd.normed.get(1).copied();
        let held = base_fwd.residual.into_iter().chain(base_rstd);
        self.ledger.drop_all(held.chain(base_fwd.hook_rows));
        let hooks: Vec<usize> = layers.iter().map(|&l| embedding_index(l)).collect();
        let tuned = |top| PassSpec {
            save: self.save,
            adapters: true,
            hooks: hooks.clone(),
            top,
        };
        let s_pass = tuned(c.num_hidden_layers);
        let h_pass = tuned(hooks.iter().copied().max().unwrap_or(0));
        let mut s_fwd = self.forward(s, &s_pass);
        let mut h_fwd = self.forward(h, &h_pass);
        let ([h_grads, s_grads], seed) = self.objective(&run.objective, layers.len(), h, s);
        h_fwd.capture_grads = h_grads;
        s_fwd.capture_grads = s_grads;
        s_fwd.normed_seed = Some(seed);
        self.ledger.drop_all(base_fwd.normed.first().copied());
        self.backward(s, s_fwd);
        self.backward(h, h_fwd);
        self.optimizer();
        let packed = 2 * layers.len() + s.rows() + 1;
        self.ledger
            .f32(Component::Workspace, "the readback", &[packed]);
        self.ledger.flush();
    }

    /// `SftEngine::step`: forward with logits, the fused cross-entropy, backward, AdamW.
    fn sft_step(&mut self, run: &TrainConfig) {
        let b = Rows {
            batch: run.sft_batch,
            seq: run.max_len,
        };
        self.batch(b, true);
        self.uniforms();
        let pass = PassSpec {
            save: self.save,
            adapters: true,
            hooks: Vec::new(),
            top: self.cfg.num_hidden_layers,
        };
        let mut fwd = self.forward(b, &pass);
        // Model::lm_loss: the per-row loss, the seed at the final norm's output, and per row
        // chunk the logits and their gradient.
        self.ledger
            .f32(Component::Workspace, "per-row loss", &[b.rows()]);
        let seed = self.head_loss(b.rows(), &["the logits' gradient"], true);
        fwd.normed_seed = Some(seed);
        self.backward(b, fwd);
        self.optimizer();
        self.ledger
            .f32(Component::Workspace, "the readback", &[b.rows() + 1]);
        self.ledger.flush();
    }

    /// The recorder's uniform arena: a chunk per 256 dispatches between two submissions. The
    /// most come after the last block's backward: the gradient norm and AdamW, one dispatch
    /// each per trained tensor, and a few more.
    fn uniforms(&mut self) {
        const SLOTS: usize = 256;
        let dispatches = 2 * self.trained.len() + 3;
        let key = Key {
            bytes: UNIFORM_CHUNK_BYTES,
            uniform: true,
        };
        for _ in 0..dispatches.div_ceil(SLOTS) {
            self.ledger
                .take_key(Component::Workspace, "launch parameters", key, Bound::Whole);
        }
    }

    /// `Transformer::head_in_chunks`: the gradient at the final norm's output `[rows, C]`
    /// (returned: the backward's seed) and, per row chunk submitted on its own, the chunk's
    /// logits, the loss's own `[chunk, V]` tensors (`extra`; a KL's first one is the base
    /// model's logits, made by a second head product) and the head's products.
    fn head_loss(&mut self, rows: usize, extra: &[&str], backward: bool) -> Id {
        let cols = self.cfg.hidden_size;
        let seed = self.ledger.f32(
            Component::Workspace,
            "the gradient at the final norm's output",
            &[rows, cols],
        );
        for chunk in head_chunks(rows, self.cfg.vocab_size) {
            let mut held = vec![self.logits_tensor("the logits of a row chunk", chunk.capacity)];
            self.lm_head_scratch(chunk.rows, false);
            for (i, name) in extra.iter().enumerate() {
                held.push(self.logits_tensor(name, chunk.capacity));
                if i == 0 && extra.len() > 1 {
                    self.lm_head_scratch(chunk.rows, false);
                }
            }
            if backward {
                self.lm_head_scratch(chunk.rows, true);
            }
            self.ledger.drop_all(held);
            self.ledger.flush();
        }
        seed
    }

    /// A `[rows, V]` f32 tensor, bound in row parts.
    fn logits_tensor(&mut self, name: &str, rows: usize) -> Id {
        let bytes = (rows * self.cfg.vocab_size * DType::F32.size_bytes()) as u64;
        self.ledger
            .take(Component::Logits, name, bytes, Bound::InParts)
    }

    /// `record_objective`: the stacked embeddings, the separation loss and its gradients, the
    /// KL over the LM head's row chunks, the captures' gradients (harmful, harmless) and the
    /// gradient at the harmless pass's final-norm output, which the backwards keep.
    fn objective(
        &mut self,
        config: &Es2Config,
        layers: usize,
        h: Rows,
        s: Rows,
    ) -> ([Vec<Id>; 2], Id) {
        let cols = self.cfg.hidden_size;
        let ledger = &mut self.ledger;
        let ws = Component::Workspace;
        let eh = ledger.f32(ws, "harmful embeddings", &[layers, h.batch, cols]);
        let es = ledger.f32(ws, "harmless embeddings", &[layers, s.batch, cols]);
        ledger.f32(ws, "per-layer distances", &[2, layers]);
        let deh = ledger.f32(ws, "harmful embeddings' gradient", &[layers, h.batch, cols]);
        let to_harmless = config.separation_options().grad_to_harmless();
        let des = to_harmless.then(|| {
            ledger.f32(
                ws,
                "harmless embeddings' gradient",
                &[layers, s.batch, cols],
            )
        });
        if !to_harmless {
            ledger.scratch("a stand-in", 4);
        }
        let mask = ledger.u32("the KL's position mask", s.rows());
        ledger.f32(ws, "per-position KL", &[s.rows()]);
        let kl = [eh, es, deh, mask].into_iter().chain(des);
        ledger.drop_all(kl.collect::<Vec<_>>());
        let seed = self.head_loss(
            s.rows(),
            &[
                "the base model's logits of a chunk",
                "the KL's gradient of a chunk",
            ],
            true,
        );
        let grads = |walk: &mut Self, side: Rows| {
            (0..layers)
                .map(|_| {
                    walk.ledger
                        .f32(ws, "a capture's gradient", &[side.batch, cols])
                })
                .collect()
        };
        let s_grads = if to_harmless {
            grads(self, s)
        } else {
            Vec::new()
        };
        ([grads(self, h), s_grads], seed)
    }

    /// `AdamW::record_step`: the gradient norm's partial sums (the update takes nothing).
    fn optimizer(&mut self) {
        let bytes = grad_norm_scratch_bytes(self.trained.iter().copied());
        self.ledger.scratch("the gradient norm's partials", bytes);
    }

    /// The block loop's forward (`Transformer::run_with`).
    fn forward(&mut self, rows: Rows, pass: &PassSpec) -> Fwd {
        let c = self.cfg;
        let (r, cols) = (rows.rows(), c.hidden_size);
        let layers = c.num_hidden_layers;
        let kept = match pass.save {
            SavePolicy::Nothing => Component::Workspace,
            _ => Component::Activations,
        };
        let hook_rows = pass
            .hooks
            .iter()
            .map(|_| self.ledger.u32("a hook's rows", r))
            .collect();
        let mut fwd = Fwd {
            residual: vec![self.ledger.f32(kept, "the residual stream", &[r, cols])],
            normed: Vec::new(),
            blocks: Vec::new(),
            captures: Vec::new(),
            capture_grads: Vec::new(),
            normed_seed: None,
            hook_rows,
            save: pass.save,
            top: pass.top,
        };
        for layer in 0..pass.top.min(layers) {
            let saved_part = if pass.save == SavePolicy::Everything {
                Component::Activations
            } else {
                Component::Workspace
            };
            let adapters = pass.adapters;
            let (out, saved) = self.block_forward(rows, adapters, saved_part, kept);
            if layer + 1 < layers {
                self.capture(rows, pass, layer + 1, &mut fwd.captures);
            }
            if pass.save == SavePolicy::Everything {
                fwd.blocks.push(saved);
            } else {
                self.ledger.drop_all(saved);
            }
            if pass.save == SavePolicy::Nothing {
                let residual = std::mem::take(&mut fwd.residual);
                self.ledger.drop_all(residual);
            }
            fwd.residual.push(out);
            self.ledger.flush();
        }
        if pass.top == layers {
            fwd.normed = vec![
                self.ledger.f32(kept, "the final norm's output", &[r, cols]),
                self.ledger.f32(kept, "the final norm's rstd", &[r]),
            ];
            self.capture(rows, pass, layers, &mut fwd.captures);
        }
        fwd
    }

    /// Pooled captures at hidden state `index` (`capture_hidden`).
    fn capture(&mut self, rows: Rows, pass: &PassSpec, index: usize, into: &mut Vec<Id>) {
        for _ in pass.hooks.iter().filter(|&&h| h == index) {
            let cols = self.cfg.hidden_size;
            into.push(self.ledger.f32(
                Component::Workspace,
                "a pooled embedding",
                &[rows.batch, cols],
            ));
        }
    }

    /// The LM head's products over row parts and vocabulary chunks (`VocabMatrix::project`,
    /// `project_backward`): their split-K scratch. A product writes a dense output only when
    /// there is one chunk and one part.
    fn lm_head_scratch(&mut self, rows: usize, backward: bool) {
        let (v, cols) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let chunks = self.vocab_chunks();
        let part = rows_per_binding(rows, v, self.device.max_binding_size);
        let whole = chunks.len() == 1 && part >= rows;
        for start in (0..rows).step_by(part) {
            let m = part.min(rows - start);
            for &n in &chunks {
                let products = if backward {
                    // dx (dense when whole) and, under full fine-tuning, the head's gradient.
                    let mut g = vec![(Gemm::dense(m, cols, n, false, false), !whole)];
                    if self.full {
                        g.push((Gemm::dense(n, cols, m, true, false), false));
                    }
                    g
                } else {
                    vec![(Gemm::dense(m, n, cols, false, true), !whole)]
                };
                for (g, unsplittable) in products {
                    let bytes = gemm_scratch_bytes(&g, unsplittable, self.device.cpu);
                    self.ledger.scratch("the LM head's partial products", bytes);
                }
            }
        }
    }

    /// One block's forward (`Transformer::block_forward`): returns its output and the tensors
    /// of `BlockActivations` (with the adapters' `LoraActivations`); its temporaries (the
    /// projections' outputs before RoPE and before the residual adds) are dropped.
    fn block_forward(
        &mut self,
        rows: Rows,
        adapters: bool,
        saved_part: Component,
        out_part: Component,
    ) -> (Id, Vec<Id>) {
        let c = self.cfg;
        let r = rows.rows();
        let (cols, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut saved = Vec::new();
        let mut keep = |walk: &mut Self, name: &str, dims: &[usize]| {
            let id = walk.ledger.f32(saved_part, name, dims);
            saved.push(id);
        };
        keep(self, "attn_in", &[r, cols]);
        keep(self, "attn_rstd", &[r]);
        let mut lora = Vec::new();
        let q_raw = self.project(Projection::Q, r, adapters, &mut lora, saved_part);
        let k_raw = self.project(Projection::K, r, adapters, &mut lora, saved_part);
        let v = self.project(Projection::V, r, adapters, &mut lora, saved_part);
        keep(self, "q", &[r, q]);
        keep(self, "k", &[r, kv]);
        keep(self, "attn", &[r, q]);
        keep(self, "lse", &[rows.batch, c.num_attention_heads, rows.seq]);
        let o = self.project(Projection::O, r, adapters, &mut lora, saved_part);
        keep(self, "mid", &[r, cols]);
        keep(self, "mlp_in", &[r, cols]);
        keep(self, "mlp_rstd", &[r]);
        let gate = self.project(Projection::Gate, r, adapters, &mut lora, saved_part);
        let up = self.project(Projection::Up, r, adapters, &mut lora, saved_part);
        keep(self, "act", &[r, ffn]);
        let down = self.project(Projection::Down, r, adapters, &mut lora, saved_part);
        let out = self.ledger.f32(out_part, "a block's output", &[r, cols]);
        // q_raw, k_raw, o and down are temporaries; v, gate and up are saved.
        self.ledger.drop_all([q_raw, k_raw, o, down]);
        let mut all = saved;
        all.extend([v, gate, up]);
        all.extend(lora);
        (out, all)
    }

    /// A projection's forward (`Linear::forward`): its output and, with adapters, the
    /// adapter's saved input (after dropout) and hidden state, plus the products' scratch.
    fn project(
        &mut self,
        p: Projection,
        rows: usize,
        adapters: bool,
        lora: &mut Vec<Id>,
        saved_part: Component,
    ) -> Id {
        let (out, inp) = self.cfg.projection_shape(p);
        // A saved output (v, gate, up) has the saved tensors' component; the others are
        // dropped before the block's submission, which the caller does.
        let part = match p {
            Projection::V | Projection::Gate | Projection::Up => saved_part,
            _ => Component::Workspace,
        };
        let y = self.ledger.f32(part, "a projection's output", &[rows, out]);
        let bias = self.cfg.projection_has_bias(p);
        let forward = Gemm::dense(rows, out, inp, false, true);
        let bytes = gemm_scratch_bytes(&forward, bias, self.device.cpu);
        self.ledger
            .scratch("a projection's partial products", bytes);
        let Some(rank) = self.adapter_rank(p).filter(|_| adapters) else {
            return y;
        };
        if self.dropout {
            lora.push(
                self.ledger
                    .f32(saved_part, "an adapter's input", &[rows, inp]),
            );
        }
        lora.push(
            self.ledger
                .f32(saved_part, "an adapter's hidden state", &[rows, rank]),
        );
        for g in [
            Gemm::dense(rows, rank, inp, false, true),
            Gemm::dense(rows, out, rank, false, true),
        ] {
            let bytes = gemm_scratch_bytes(&g, false, self.device.cpu);
            self.ledger.scratch("an adapter's partial products", bytes);
        }
        y
    }

    /// The rank of projection `p`'s adapter, when it has one.
    fn adapter_rank(&self, p: Projection) -> Option<usize> {
        self.lora.filter(|l| l.targets.contains(&p)).map(|l| l.rank)
    }

    /// The block loop's backward (`Transformer::backward`), from seeds at hidden states (the
    /// final norm's output among them); with [`SavePolicy::BlockInputs`] each block runs
    /// forward again.
    fn backward(&mut self, rows: Rows, fwd: Fwd) {
        let c = self.cfg;
        let (r, cols) = (rows.rows(), c.hidden_size);
        let layers = c.num_hidden_layers;
        let ws = Component::Workspace;
        let Fwd {
            mut residual,
            normed,
            mut blocks,
            captures,
            capture_grads,
            normed_seed,
            hook_rows,
            save,
            top,
        } = fwd;
        self.ledger.drop_all(captures);
        let mut dx = self.ledger.f32(ws, "the residual's gradient", &[r, cols]);
        if !normed.is_empty() {
            if normed_seed.is_none() {
                self.ledger
                    .temp("the final norm's output gradient", &[r, cols]);
            }
            let bytes = rmsnorm_backward_scratch_bytes(r, cols, self.full);
            self.ledger.scratch("the final norm's partials", bytes);
        }
        for _ in (0..top.min(layers)).rev() {
            if let Some(h) = residual.pop() {
                self.ledger.drop(h);
            }
            let saved = match save {
                SavePolicy::Everything => blocks.pop().unwrap_or_default(),
                _ => {
                    let (out, saved) = self.block_forward(rows, true, ws, ws);
                    self.ledger.drop(out);
                    saved
                }
            };
            let dx_in = self.ledger.f32(ws, "the residual's gradient", &[r, cols]);
            self.block_backward(rows);
            self.ledger.drop_all(saved);
            self.ledger.drop(dx);
            dx = dx_in;
            self.ledger.flush();
        }
        if self.full {
            // EmbeddingGradIndex: the distinct ids, their offsets, the positions.
            let distinct = r.min(c.vocab_size);
            let index = [
                self.ledger.u32("distinct ids", distinct),
                self.ledger.u32("id offsets", distinct + 1),
                self.ledger.u32("id positions", r),
            ];
            self.ledger.drop_all(index);
        }
        self.ledger.drop(dx);
        let held = residual.into_iter().chain(normed).chain(hook_rows);
        let held = held.chain(capture_grads).chain(normed_seed);
        self.ledger.drop_all(held);
    }

    /// One block's backward (`Transformer::block_backward`): its temporaries, all released
    /// at the block's submission.
    fn block_backward(&mut self, rows: Rows) {
        let c = self.cfg;
        let r = rows.rows();
        let (cols, q, kv, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        self.ledger.temp("dact", &[r, ffn]);
        self.project_backward(Projection::Down, r);
        self.ledger.temp("dgate", &[r, ffn]);
        self.ledger.temp("dup", &[r, ffn]);
        self.ledger.temp("dmlp_in", &[r, cols]);
        self.project_backward(Projection::Gate, r);
        self.project_backward(Projection::Up, r);
        self.ledger.temp("dmid", &[r, cols]);
        let norm = rmsnorm_backward_scratch_bytes(r, cols, self.full);
        self.ledger.scratch("a norm's partials", norm);
        self.ledger.temp("dattn", &[r, q]);
        self.project_backward(Projection::O, r);
        self.ledger.temp("dq", &[r, q]);
        self.ledger.temp("dk", &[r, kv]);
        self.ledger.temp("dv", &[r, kv]);
        let shape = AttentionShape::training(
            rows.batch,
            rows.seq,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let stats = attention_backward_scratch_bytes(&shape);
        self.ledger.scratch("attention's row statistics", stats);
        self.ledger.temp("dq_raw", &[r, q]);
        self.ledger.temp("dk_raw", &[r, kv]);
        self.ledger.temp("dattn_in", &[r, cols]);
        for p in [Projection::Q, Projection::K, Projection::V] {
            self.project_backward(p, r);
        }
        self.ledger.scratch("a norm's partials", norm);
    }

    /// A projection's backward (`Linear::backward`): the products' scratch, and the adapter's
    /// temporaries.
    fn project_backward(&mut self, p: Projection, rows: usize) {
        let (out, inp) = self.cfg.projection_shape(p);
        let mut products = vec![Gemm::dense(rows, inp, out, false, false)];
        if self.full {
            products.push(Gemm::dense(out, inp, rows, true, false));
            if self.cfg.projection_has_bias(p) {
                let bytes = sum_rows_scratch_bytes(rows, out);
                self.ledger.scratch("a bias gradient's partials", bytes);
            }
        }
        if let Some(rank) = self.adapter_rank(p) {
            products.extend([
                Gemm::dense(out, rank, rows, true, false),
                Gemm::dense(rows, rank, out, false, false),
                Gemm::dense(rank, inp, rows, true, false),
                Gemm::dense(rows, inp, rank, false, false),
            ]);
            self.ledger
                .scratch("an adapter's hidden gradient", (rows * rank * 4) as u64);
            if self.dropout {
                self.ledger
                    .scratch("an adapter's input gradient", (rows * inp * 4) as u64);
                self.ledger
                    .scratch("an adapter's input gradient", (rows * inp * 4) as u64);
            }
        }
        for g in products {
            let bytes = gemm_scratch_bytes(&g, false, self.device.cpu);
            self.ledger
                .scratch("a projection's partial products", bytes);
        }
    }
}
