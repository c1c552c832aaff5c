//! A buffer pool: tensors freed in one training step hand their storage to the next step's
//! tensors of the same size, so a steady-state step allocates nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Usage of every tensor buffer: bound as storage, copied in and out.
pub(crate) const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Sizes are rounded up to this so that near-equal requests share buffers and every size
/// satisfies copy alignment.
const SIZE_QUANTUM: u64 = 256;

type Key = (u64, u32);

/// The bytes the buffer pool allocates for a request of `size` bytes (what
/// [`Gpu::peak_bytes`](super::Gpu::peak_bytes) counts for it).
pub fn pooled_size(size: u64) -> u64 {
    size.max(4).div_ceil(SIZE_QUANTUM) * SIZE_QUANTUM
}

/// Idle buffers keyed by (rounded size, usage bits), and the bytes the pool holds from the
/// driver (in use or idle) with their high-water mark: what the device really had to allocate.
#[derive(Default)]
pub(crate) struct BufferPool {
    idle: Mutex<HashMap<Key, Vec<wgpu::Buffer>>>,
    allocated: AtomicU64,
    peak: AtomicU64,
}

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<wgpu::Buffer>>> {
        // A panic while holding the lock leaves only a list of buffers behind: still valid.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn rounded(size: u64) -> u64 {
        pooled_size(size)
    }

    /// A buffer of at least `size` bytes with `usage`, reused when one is idle.
    pub(crate) fn take(
        self: &Arc<Self>,
        device: &wgpu::Device,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> PooledBuffer {
        let size = Self::rounded(size);
        let key = (size, usage.bits());
        let reused = self.lock().get_mut(&key).and_then(Vec::pop);
        let buffer = reused.unwrap_or_else(|| {
            let now = self.allocated.fetch_add(size, Ordering::Relaxed) + size;
            self.peak.fetch_max(now, Ordering::Relaxed);
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        });
        PooledBuffer {
            buffer: Some(buffer),
            pool: Arc::downgrade(self),
        }
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        let key = (buffer.size(), buffer.usage().bits());
        self.lock().entry(key).or_default().push(buffer);
    }

    pub(crate) fn idle_bytes(&self) -> u64 {
        self.lock()
            .iter()
            .map(|((size, _), list)| size * list.len() as u64)
            .sum()
    }

    /// Bytes of every buffer the pool has created and not yet released (in use or idle).
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// The most [`BufferPool::allocated_bytes`] has been since the last reset.
    pub(crate) fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark from what is allocated now.
    pub(crate) fn reset_peak(&self) {
        self.peak.store(self.allocated_bytes(), Ordering::Relaxed);
    }

    pub(crate) fn clear(&self) {
        let released: u64 = self
            .lock()
            .drain()
            .map(|((size, _), list)| size * list.len() as u64)
            .sum();
        self.allocated.fetch_sub(released, Ordering::Relaxed);
    }
}

/// A buffer that returns to its pool when the last tensor using it is dropped.
pub(crate) struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Weak<BufferPool>,
}

impl PooledBuffer {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        // Only `drop` takes the buffer out.
        self.buffer.as_ref().expect("pooled buffer used after drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buffer), Some(pool)) = (self.buffer.take(), self.pool.upgrade()) {
            pool.give_back(buffer);
        }
    }
}
