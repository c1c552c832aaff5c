//! GPU-side kernel timing with timestamp queries: two queries per timed pass, resolved into a
//! buffer after the last dispatch and read back with the work.

use super::Gpu;
use crate::Result;

/// Queries in one set: WebGPU's maximum, i.e. 2,048 timed dispatches per recorder.
const MAX_QUERIES: u32 = wgpu::QUERY_SET_MAX_QUERIES;

pub(crate) struct Timestamps {
    queries: wgpu::QuerySet,
    labels: Vec<&'static str>,
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
        })
    }

    /// Timestamp writes for the next timed pass, labelled `label`.
    pub(crate) fn next_pass(
        &mut self,
        label: &'static str,
    ) -> wgpu::ComputePassTimestampWrites<'_> {
        let index = 2 * self.labels.len() as u32;
        assert!(
            index + 2 <= MAX_QUERIES,
            "a timed recorder holds at most {} dispatches",
            MAX_QUERIES / 2
        );
        self.labels.push(label);
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
            .zip(ticks.chunks_exact(2))
            .map(|(&label, pair)| {
                (
                    label,
                    pair[1].saturating_sub(pair[0]) as f64 * period_ns * 1e-9,
                )
            })
            .collect())
    }
}

/// Accumulated kernel time per entry point while the device is profiling.
#[derive(Debug, Default)]
pub(crate) struct Profile {
    pub(crate) active: bool,
    pub(crate) kernels: std::collections::BTreeMap<&'static str, (u64, f64)>,
}

/// One entry point's share of a profile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTime {
    /// The entry point.
    pub kernel: &'static str,
    /// How many times it ran.
    pub dispatches: u64,
    /// GPU time over all its dispatches.
    pub seconds: f64,
}
