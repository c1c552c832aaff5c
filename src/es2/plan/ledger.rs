//! The plan's model of the buffer pool (`gpu/pool.rs`): buffers keyed by rounded size and
//! usage, freed at the recorder's next submission, reused by the next request of their size;
//! what the pool ends up holding is the most of each key ever in use at once.

use std::collections::HashMap;

use super::{Buffer, Component};
use crate::gpu::{pooled_size, DType};

/// One buffer the walk took: its pool key and what it holds.
pub(super) struct Taken {
    pub(super) key: Key,
    pub(super) component: Component,
    pub(super) live: bool,
}

/// Tensors and uniform chunks are pooled apart, as the pool keys by usage too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) bytes: u64,
    pub(super) uniform: bool,
}

/// A handle on a buffer the walk took.
#[derive(Debug, Clone, Copy)]
pub(super) struct Id(usize);

/// Whether a kernel binds the buffer whole, or in parts that each fit a binding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Bound {
    Whole,
    InParts,
}

/// The buffer pool's bookkeeping, played through: how many buffers of each size are in use and
/// the most ever were, what is in use by component, and the buffers waiting for the next
/// submission to go back to the pool.
#[derive(Default)]
pub(super) struct Ledger {
    pub(super) taken: Vec<Taken>,
    pub(super) in_use: HashMap<Key, usize>,
    pub(super) most: HashMap<Key, usize>,
    pub(super) live: [u64; Component::ALL.len()],
    pub(super) live_total: u64,
    pub(super) peak: u64,
    pub(super) at_peak: [u64; Component::ALL.len()],
    pub(super) pending: Vec<Id>,
    pub(super) largest: Buffer,
    pub(super) largest_binding: Buffer,
}

impl Ledger {
    pub(super) fn take_key(
        &mut self,
        component: Component,
        name: &str,
        key: Key,
        bound: Bound,
    ) -> Id {
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
    pub(super) fn take(
        &mut self,
        component: Component,
        name: &str,
        bytes: u64,
        bound: Bound,
    ) -> Id {
        let key = Key {
            bytes: pooled_size(bytes),
            uniform: false,
        };
        self.take_key(component, name, key, bound)
    }

    /// An f32 tensor of `dims`, bound whole.
    pub(super) fn f32(&mut self, component: Component, name: &str, dims: &[usize]) -> Id {
        let bytes = dims.iter().product::<usize>() * DType::F32.size_bytes();
        self.take(component, name, bytes as u64, Bound::Whole)
    }

    /// A u32 tensor of `n` elements (ids, lengths, row lists).
    pub(super) fn u32(&mut self, name: &str, n: usize) -> Id {
        let bytes = n * DType::U32.size_bytes();
        self.take(Component::Workspace, name, bytes as u64, Bound::Whole)
    }

    /// A launcher's scratch (`Recorder::scratch`), released at the next submission.
    pub(super) fn scratch(&mut self, name: &str, bytes: u64) {
        if bytes > 0 {
            let id = self.take(Component::Workspace, name, bytes, Bound::Whole);
            self.drop(id);
        }
    }

    /// An f32 temporary of `dims`, dropped as soon as recorded (kept until the submission).
    pub(super) fn temp(&mut self, name: &str, dims: &[usize]) {
        let id = self.f32(Component::Workspace, name, dims);
        self.drop(id);
    }

    /// The tensor's last handle dropped: its buffer goes back at the next submission.
    pub(super) fn drop(&mut self, id: Id) {
        self.pending.push(id);
    }

    pub(super) fn drop_all(&mut self, ids: impl IntoIterator<Item = Id>) {
        self.pending.extend(ids);
    }

    /// A submission (`Recorder::flush`, `submit`): dropped buffers return to the pool.
    pub(super) fn flush(&mut self) {
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
    pub(super) fn pool_bytes(&self) -> u64 {
        self.most.iter().map(|(k, &n)| k.bytes * n as u64).sum()
    }
}
