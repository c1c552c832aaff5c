//! GPU-side kernel timing with timestamp queries: two queries per timed pass, resolved into a
//! buffer after the last dispatch and read back with the work.

use super::Gpu;
use crate::Result;

/// Queries in one set: WebGPU's maximum, i.e. 2,048 timed dispatches per recorder.
const MAX_QUERIES: u32 = wgpu::QUERY_SET_MAX_QUERIES;

pub(crate) struct Timestamps {
    queries: wgpu::QuerySet,
    labels: Vec<&'static str>,
    /// Per timed pass: its shader file (the kernel family) and its work.
    work: Vec<(&'static str, Work)>,
}

/// What one dispatch does, for rates: its arithmetic and the bytes of the tensors it binds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Floating-point operations (a fused multiply-add counts 2); 0 where a launcher does
    /// not count them (everything but the GEMM and attention).
    pub flops: u64,
    /// Bytes of every tensor the dispatch binds, each counted once: the traffic it cannot
    /// avoid for a kernel that streams its operands, an under-count for one that reads them
    /// again (a GEMM's tiles), an over-count for one that touches a few rows of a large
    /// binding.
    pub bytes: u64,
}

impl Timestamps {
    pub(crate) fn new(gpu: &Gpu) -> Option<Self> {
        if !gpu.has_timestamps() {
            return None;
        }
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kernel timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: MAX_QUERIES,
        });
        Some(Timestamps {
            queries,
            labels: Vec::new(),
            work: Vec::new(),
        })
    }

    /// Timestamp writes for the next timed pass, labelled `label`, which runs a kernel of
    /// `family` (its shader file) doing `work`.
    pub(crate) fn next_pass(
        &mut self,
        label: &'static str,
        family: &'static str,
        work: Work,
    ) -> wgpu::ComputePassTimestampWrites<'_> {
        let index = 2 * self.labels.len() as u32;
        assert!(
            index + 2 <= MAX_QUERIES,
            "a timed recorder holds at most {} dispatches",
            MAX_QUERIES / 2
        );
        self.labels.push(label);
        self.work.push((family, work));
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(index),
            end_of_pass_write_index: Some(index + 1),
        }
    }

    /// Whether another timed pass would not fit.
    pub(crate) fn is_full(&self) -> bool {
        2 * self.labels.len() as u32 + 2 > MAX_QUERIES
    }

    fn used(&self) -> u32 {
        2 * self.labels.len() as u32
    }

    /// Resolves the queries, waits, and returns (label, seconds) per timed pass.
    pub(crate) fn read(self, gpu: &Gpu) -> Result<Vec<(&'static str, f64)>> {
        Ok(self
            .read_with_work(gpu)?
            .into_iter()
            .map(|pass| (pass.entry, pass.seconds))
            .collect())
    }

    /// [`Timestamps::read`] with each pass's family and [`Work`].
    pub(crate) fn read_with_work(self, gpu: &Gpu) -> Result<Vec<TimedPass>> {
        if self.labels.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = u64::from(self.used()) * u64::from(wgpu::QUERY_SIZE);
        let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps resolved"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let raw = gpu.read_back("timestamps readback", bytes, |encoder, staging| {
            encoder.resolve_query_set(&self.queries, 0..self.used(), &resolved, 0);
            encoder.copy_buffer_to_buffer(&resolved, 0, staging, 0, bytes);
        })?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period_ns = f64::from(gpu.queue.get_timestamp_period());
        Ok(self
            .labels
            .iter()
            .zip(&self.work)
            .zip(ticks.chunks_exact(2))
            .map(|((&entry, &(family, work)), pair)| TimedPass {
                entry,
                family,
                seconds: pair[1].saturating_sub(pair[0]) as f64 * period_ns * 1e-9,
                work,
            })
            .collect())
    }
}

/// One timed dispatch.
pub(crate) struct TimedPass {
    pub(crate) entry: &'static str,
    pub(crate) family: &'static str,
    pub(crate) seconds: f64,
    pub(crate) work: Work,
}

/// Accumulated kernel time per entry point while the device is profiling.
#[derive(Debug, Default)]
pub(crate) struct Profile {
    pub(crate) active: bool,
    pub(crate) kernels: std::collections::BTreeMap<&'static str, KernelTime>,
}

/// One entry point's share of a profile.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KernelTime {
    /// The entry point.
    pub kernel: &'static str,
    /// Its kernel family: the shader file it is in (`shaders/<family>.wgsl`).
    pub family: &'static str,
    /// How many times it ran.
    pub dispatches: u64,
    /// GPU time over all its dispatches.
    pub seconds: f64,
    /// Floating-point operations over all its dispatches (0 where not counted: see [`Work`]).
    pub flops: u64,
    /// Bytes bound over all its dispatches (see [`Work`]).
    pub bytes: u64,
}

impl KernelTime {
    /// GFLOP/s over its GPU time; `None` where its FLOPs are not counted.
    pub fn gflops(&self) -> Option<f64> {
        (self.flops > 0 && self.seconds > 0.0).then(|| self.flops as f64 / self.seconds * 1e-9)
    }

    /// GB/s (decimal) of the bytes it binds over its GPU time.
    pub fn gbytes_per_s(&self) -> Option<f64> {
        (self.bytes > 0 && self.seconds > 0.0).then(|| self.bytes as f64 / self.seconds * 1e-9)
    }
}
