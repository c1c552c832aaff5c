//! The recorder: encodes many dispatches into one command buffer, with every launch's
//! parameters packed into a uniform arena, and submits once.

use std::sync::Arc;

use super::kernel::{Kernel, PendingPipeline};
use super::pool::PooledBuffer;
use super::tensor::{DType, Shape, Tensor};
use super::timing::{Timestamps, Work};
use super::Gpu;
use crate::Result;

/// Bytes reserved for one launch's parameters: the portable uniform offset alignment.
const UNIFORM_SLOT: u64 = 256;
/// Launch parameter slots per arena chunk.
const SLOTS_PER_CHUNK: u64 = 256;
/// Bytes of one chunk of the uniform arena: a recorder holds one from its first dispatch, and
/// another per 256 dispatches before a submission (pooled apart from tensors).
pub const UNIFORM_CHUNK_BYTES: u64 = UNIFORM_SLOT * SLOTS_PER_CHUNK;

/// A workgroup grid. Large 1-D launches fold into two dimensions because one dimension holds
/// at most 65,535 workgroups; kernels recover the flat index with `flat_workgroup_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid(pub [u32; 3]);

impl Grid {
    /// Exactly `(x, y, z)` workgroups.
    pub fn xyz(x: u32, y: u32, z: u32) -> Grid {
        Grid([x, y, z])
    }

    /// `count` workgroups addressed by one flat index.
    pub fn flat(count: usize) -> Grid {
        const MAX_PER_DIM: usize = 65_535;
        let count = count.max(1);
        let x = count.min(MAX_PER_DIM);
        let y = count.div_ceil(x);
        Grid([x as u32, y as u32, 1])
    }

    /// Enough workgroups of `group_size` threads to give each of `threads` items one thread.
    pub fn threads(threads: usize, group_size: u32) -> Grid {
        Grid::flat(threads.div_ceil(group_size as usize))
    }
}

/// A dispatch waiting to be encoded: its pipeline may still be compiling.
struct QueuedDispatch {
    pipeline: Arc<PendingPipeline>,
    bind_group: wgpu::BindGroup,
    uniform_offset: u32,
    grid: Grid,
}

impl QueuedDispatch {
    fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(self.pipeline.get());
        pass.set_bind_group(0, &self.bind_group, &[self.uniform_offset]);
        let [x, y, z] = self.grid.0;
        pass.dispatch_workgroups(x, y, z);
    }
}

struct UniformChunk {
    buffer: PooledBuffer,
    bytes: Vec<u8>,
}

/// Records dispatches for one submission. Tensors bound here stay alive (and out of the
/// buffer pool) until the submission, so a later upload cannot overwrite data an earlier,
/// not yet submitted dispatch reads.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    encoder: Option<wgpu::CommandEncoder>,
    /// Dispatches of the open compute pass not yet encoded, so that the pipelines of a fresh
    /// process's kernels compile side by side until the pass ends.
    queued: Vec<QueuedDispatch>,
    uniforms: Vec<UniformChunk>,
    keep_alive: Vec<Arc<PooledBuffer>>,
    timestamps: Option<Timestamps>,
    /// Timings go to the device's profile (see [`Gpu::start_profiling`]) rather than to the
    /// caller.
    profiling: bool,
    dispatches: usize,
    /// Bytes of scratch handed out since the last submission, and their high-water mark.
    workspace_bytes: u64,
    workspace_peak: u64,
}

impl<'g> Recorder<'g> {
    /// A recorder; while the device is profiling, every dispatch is timed into the profile.
    pub fn new(gpu: &'g Gpu) -> Self {
        let timestamps = gpu.is_profiling().then(|| Timestamps::new(gpu)).flatten();
        Recorder {
            gpu,
            encoder: Some(gpu.device.create_command_encoder(&Default::default())),
            queued: Vec::new(),
            uniforms: Vec::new(),
            keep_alive: Vec::new(),
            profiling: timestamps.is_some(),
            timestamps,
            dispatches: 0,
            workspace_bytes: 0,
            workspace_peak: 0,
        }
    }

    /// A recorder that measures every dispatch with timestamp queries (each dispatch gets its
    /// own pass). `None` when the adapter has no timestamp queries.
    pub fn timed(gpu: &'g Gpu) -> Option<Self> {
        let timestamps = Timestamps::new(gpu)?;
        let mut recorder = Recorder::new(gpu);
        recorder.timestamps = Some(timestamps);
        recorder.profiling = false;
        Some(recorder)
    }

    /// The device it records for.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Scratch space for a launcher (partial sums, split-K slices, a LoRA path's temporaries):
    /// the tensor lives until the recorder next submits, and its bytes count toward the
    /// recorder's workspace ([`Recorder::workspace_peak_bytes`]).
    pub fn scratch(&mut self, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let tensor = Tensor::empty(self.gpu, shape, dtype);
        self.workspace_bytes += tensor.size_bytes();
        self.workspace_peak = self.workspace_peak.max(self.workspace_bytes);
        tensor
    }

    /// The most scratch this recorder has held between two submissions.
    pub fn workspace_peak_bytes(&self) -> u64 {
        self.workspace_peak
    }

    /// Number of dispatches recorded so far.
    pub fn dispatch_count(&self) -> usize {
        self.dispatches
    }

    /// Records one launch of `kernel` with `tensors` bound in the order of its spec.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        kernel: &Kernel,
        tensors: &[&Tensor],
        params: &P,
        grid: Grid,
    ) {
        self.dispatch_counting(kernel, tensors, params, grid, 0);
    }

    /// [`Recorder::dispatch`] of a launch that does `flops` floating-point operations, which a
    /// profile turns into GFLOP/s ([`crate::gpu::KernelTime::gflops`]).
    pub fn dispatch_counting<P: bytemuck::Pod>(
        &mut self,
        kernel: &Kernel,
        tensors: &[&Tensor],
        params: &P,
        grid: Grid,
        flops: u64,
    ) {
        let spec = kernel.spec;
        assert_eq!(
            tensors.len(),
            spec.bindings.len(),
            "{} expects {} tensors",
            spec.entry,
            spec.bindings.len()
        );
        let (uniform_offset, chunk) = self.push_uniform(bytemuck::bytes_of(params));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: self.uniforms[chunk].buffer.raw(),
                offset: 0,
                size: wgpu::BufferSize::new(UNIFORM_SLOT),
            }),
        }];
        for (&(binding, _), tensor) in spec.bindings.iter().zip(tensors) {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(tensor.binding()),
            });
        }
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(spec.entry),
                layout: &kernel.layout,
                entries: &entries,
            });
        self.keep_alive
            .extend(tensors.iter().map(|t| t.storage.clone()));

        let queued = QueuedDispatch {
            pipeline: kernel.pipeline.clone(),
            bind_group,
            uniform_offset,
            grid,
        };
        if self.profiling && self.timestamps.as_ref().is_some_and(Timestamps::is_full) {
            self.collect_profile();
        }
        if self.timestamps.is_some() {
            // A timed dispatch gets a pass of its own, bracketed by two timestamps.
            self.end_pass();
            let work = Work {
                flops,
                bytes: tensors.iter().map(|t| t.size_bytes()).sum(),
            };
            let timestamps = self.timestamps.as_mut().expect("checked above");
            let encoder = self.encoder.as_mut().expect("encoder lives until consumed");
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(spec.entry),
                timestamp_writes: Some(timestamps.next_pass(spec.entry, spec.shader.name, work)),
            });
            queued.encode(&mut pass);
        } else {
            self.queued.push(queued);
        }
        self.dispatches += 1;
    }

    /// Copies all of `src` into `dst` (same size).
    pub fn copy(&mut self, src: &Tensor, dst: &Tensor) {
        assert_eq!(
            src.size_bytes(),
            dst.size_bytes(),
            "copy between tensors of different sizes"
        );
        self.end_pass();
        self.keep_alive.push(src.storage.clone());
        self.keep_alive.push(dst.storage.clone());
        self.encoder_mut().copy_buffer_to_buffer(
            src.buffer(),
            src.offset_bytes(),
            dst.buffer(),
            dst.offset_bytes(),
            src.padded_size(),
        );
    }

    /// Copies `count` elements from `src[src_start..]` into `dst[dst_start..]` (same dtype,
    /// 4-byte elements), e.g. new keys into a KV cache.
    pub fn copy_elements(
        &mut self,
        src: &Tensor,
        src_start: usize,
        dst: &Tensor,
        dst_start: usize,
        count: usize,
    ) {
        assert_eq!(
            src.dtype(),
            dst.dtype(),
            "copy_elements between different dtypes"
        );
        assert_eq!(
            src.dtype().size_bytes(),
            4,
            "copy_elements needs 4-byte elements"
        );
        assert!(
            src_start + count <= src.numel() && dst_start + count <= dst.numel(),
            "copy_elements out of range"
        );
        self.end_pass();
        self.keep_alive.push(src.storage.clone());
        self.keep_alive.push(dst.storage.clone());
        self.encoder_mut().copy_buffer_to_buffer(
            src.buffer(),
            src.offset_bytes() + 4 * src_start as u64,
            dst.buffer(),
            dst.offset_bytes() + 4 * dst_start as u64,
            4 * count as u64,
        );
    }

    /// Sets every byte of `tensor` to zero.
    pub fn zero(&mut self, tensor: &Tensor) {
        self.end_pass();
        self.keep_alive.push(tensor.storage.clone());
        let (offset, size) = (tensor.offset_bytes(), tensor.padded_size());
        self.encoder_mut()
            .clear_buffer(tensor.buffer(), offset, Some(size));
    }

    /// Submits everything recorded so far and keeps recording into a fresh command buffer.
    pub fn flush(&mut self) -> wgpu::SubmissionIndex {
        self.end_pass();
        let encoder = self
            .encoder
            .replace(self.gpu.device.create_command_encoder(&Default::default()));
        self.submit_encoder(encoder)
    }

    /// Submits the recorded work without waiting for it (a profiling recorder waits, to
    /// read its timings).
    pub fn submit(mut self) -> wgpu::SubmissionIndex {
        self.end_pass();
        let encoder = self.encoder.take();
        let index = self.submit_encoder(encoder);
        if self.profiling {
            self.record_timings();
        }
        index
    }

    /// Submits what is recorded, adds its timings to the device's profile, and continues with
    /// fresh timestamp queries.
    fn collect_profile(&mut self) {
        self.flush();
        self.record_timings();
        self.timestamps = Timestamps::new(self.gpu);
    }

    fn record_timings(&mut self) {
        if let Some(t) = self.timestamps.take() {
            // A failed timing read is a failed device, which the next real readback reports.
            if let Ok(times) = t.read_with_work(self.gpu) {
                self.gpu.add_to_profile(&times);
            }
        }
    }

    /// Submits and blocks until the GPU has finished.
    pub fn finish(self) -> Result<()> {
        let gpu = self.gpu;
        self.submit();
        gpu.wait_idle()
    }

    /// Submits and reads back the f32 `tensors` with one copy and one readback: the step's
    /// scalars, without a transfer per tensor.
    pub fn finish_reading(mut self, tensors: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        let gpu = self.gpu;
        let total: usize = tensors.iter().map(|t| t.numel()).sum();
        let packed = Tensor::empty(gpu, [total.max(1)], super::DType::F32);
        let mut at = 0;
        for t in tensors {
            self.copy_elements(t, 0, &packed, at, t.numel());
            at += t.numel();
        }
        self.submit();
        let values = packed.to_f32(gpu)?;
        let mut at = 0;
        Ok(tensors
            .iter()
            .map(|t| {
                let part = values[at..at + t.numel()].to_vec();
                at += t.numel();
                part
            })
            .collect())
    }

    /// Submits, waits, and returns each dispatch's GPU time in seconds (entry point, seconds),
    /// in recording order. Only for recorders made with [`Recorder::timed`].
    pub fn finish_timed(mut self) -> Result<Vec<(&'static str, f64)>> {
        let gpu = self.gpu;
        self.end_pass();
        let timestamps = self.timestamps.take();
        let encoder = self.encoder.take();
        self.submit_encoder(encoder);
        match timestamps {
            Some(t) => t.read(gpu),
            None => Ok(Vec::new()),
        }
    }

    fn submit_encoder(&mut self, encoder: Option<wgpu::CommandEncoder>) -> wgpu::SubmissionIndex {
        for chunk in &self.uniforms {
            self.gpu
                .queue
                .write_buffer(chunk.buffer.raw(), 0, &chunk.bytes);
        }
        let commands = encoder.map(wgpu::CommandEncoder::finish);
        let index = self.gpu.queue.submit(commands);
        // Reusing these buffers is safe from here on: later uploads and launches are
        // ordered after this submission.
        self.uniforms.clear();
        self.keep_alive.clear();
        self.workspace_bytes = 0;
        index
    }

    fn encoder_mut(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder
            .as_mut()
            .expect("the encoder exists until the recorder is consumed")
    }

    /// Encodes the queued dispatches in one compute pass (waiting for pipelines still
    /// compiling) and ends it, before any copy or submission that must follow them.
    fn end_pass(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.queued);
        let mut pass = self
            .encoder_mut()
            .begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        for dispatch in &queued {
            dispatch.encode(&mut pass);
        }
    }

    /// Appends `bytes` to the uniform arena; returns (dynamic offset, chunk index).
    fn push_uniform(&mut self, bytes: &[u8]) -> (u32, usize) {
        assert!(
            bytes.len() as u64 <= UNIFORM_SLOT,
            "launch parameters exceed {UNIFORM_SLOT} bytes"
        );
        let needs_chunk = self
            .uniforms
            .last()
            .is_none_or(|c| c.bytes.len() as u64 >= UNIFORM_SLOT * SLOTS_PER_CHUNK);
        if needs_chunk {
            let buffer = self.gpu.pool.take(
                &self.gpu.device,
                UNIFORM_CHUNK_BYTES,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            );
            self.uniforms.push(UniformChunk {
                buffer,
                bytes: Vec::with_capacity((UNIFORM_SLOT * SLOTS_PER_CHUNK) as usize),
            });
        }
        let index = self.uniforms.len() - 1;
        let chunk = &mut self.uniforms[index];
        let offset = chunk.bytes.len();
        chunk.bytes.extend_from_slice(bytes);
        chunk.bytes.resize(offset + UNIFORM_SLOT as usize, 0);
        (offset as u32, index)
    }
}
