//! Causal multi-head self-attention with grouped-query heads and right padding, flash style:
//! the forward keeps an online softmax and saves each query row's logsumexp; the backward
//! recomputes the probabilities tile by tile. The `[T, T]` score matrix never exists in memory.
//!
//! Layouts are what the projection matmuls write, so no permute kernels are needed:
//! `q, out [B, Tq, Hq, D]`, `k, v [B, Tkv, Hkv, D]`, `lse [B, Hq, Tq]`, `seq_lens [B]` (u32).
//! Query `t` of batch `b` sits at position `pos = q_offset + t` and attends the keys
//! `j <= pos` with `j < seq_lens[b]` (right padding). A query with `pos >= seq_lens[b]` is
//! padding: its output is 0, its lse 0, and it contributes no gradient. Query head `h` reads
//! kv head `h / (Hq / Hkv)`: grouped heads share K and V by index, never by copy.
//!
//! The backward (flash-attention 2) runs three kernels: a preprocess that gathers per query
//! row the lse, `delta = rowsum(dout ∘ out)` and the number of attended keys into a scratch
//! `[B, Hq, T]` of row statistics (so that the dK/dV kernel fits in 7 storage bindings without
//! `seq_lens`), then dQ per query tile and dK/dV per key tile. dK/dV of a kv head sums over
//! the query heads of its group inside one workgroup: deterministic, no atomics.
//!
//! Heads up to 64 wide run in the "rows" layout, one thread per query (or key) row held in
//! registers, which spends its time on arithmetic rather than on exchanging scores through
//! workgroup memory (10x faster at head dimension 16 on lavapipe, 4x at 64); wider heads
//! spread each row over several threads ("lanes"). `shaders/attention.wgsl` holds what both
//! layouts share, `attention_lanes.wgsl` and `attention_rows.wgsl` each layout's passes;
//! `tiles` chooses the layout and its tile sizes, `reference` holds the f64 references.

use super::common::expect_elements;
use crate::gpu::{read, read_write, Access, DType, Grid, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

pub mod reference;
mod tiles;

use tiles::{Tiles, MAX_DIMS_PER_LANE, MAX_LANES};

/// The shared part alone (the backward's preprocess), and each layout after it.
static SHARED: Shader = shader!("attention");
static LANES_SHADER: Shader = shader!("attention_lanes" after "attention");
static ROWS_SHADER: Shader = shader!("attention_rows" after "attention");

/// Largest supported head dimension: `MAX_LANES` lanes of `MAX_DIMS_PER_LANE` dimensions.
pub const MAX_HEAD_DIM: usize = (MAX_LANES * MAX_DIMS_PER_LANE) as usize;
/// Threads per workgroup of the backward preprocess (one thread per query row).
const ROW_WG: u32 = 64;
/// Bytes of one `RowStats` (lse f32, delta f32, keys u32) in the WGSL.
const ROW_STATS_BYTES: u32 = 12;
const ROW_STATS_WORDS: usize = 3;

/// An entry point in both layouts: lanes (any head) and rows (small heads), with the same
/// bindings.
struct Entry {
    lanes: KernelSpec,
    rows: KernelSpec,
}

impl Entry {
    const fn new(
        lanes: &'static str,
        rows: &'static str,
        bindings: &'static [(u32, Access)],
    ) -> Self {
        Entry {
            lanes: KernelSpec {
                shader: &LANES_SHADER,
                entry: lanes,
                bindings,
            },
            rows: KernelSpec {
                shader: &ROWS_SHADER,
                entry: rows,
                bindings,
            },
        }
    }
}

static FORWARD: Entry = Entry::new(
    "attention_forward",
    "attention_forward_rows",
    // q, k, v, seq_lens, out, lse
    &[
        read(1),
        read(2),
        read(3),
        read(4),
        read_write(5),
        read_write(6),
    ],
);
static PREPROCESS: KernelSpec = KernelSpec {
    shader: &SHARED,
    entry: "attention_backward_preprocess",
    // seq_lens, out, lse, dout, row statistics
    bindings: &[read(4), read(7), read(8), read(9), read_write(10)],
};
static BACKWARD_DQ: Entry = Entry::new(
    "attention_backward_dq",
    "attention_backward_dq_rows",
    // q, k, v, dout, row statistics, dq
    &[read(1), read(2), read(3), read(9), read(11), read_write(12)],
);
static BACKWARD_DKV: Entry = Entry::new(
    "attention_backward_dkv",
    "attention_backward_dkv_rows",
    // q, k, v, dout, row statistics, dk, dv
    &[
        read(1),
        read(2),
        read(3),
        read(9),
        read(11),
        read_write(13),
        read_write(14),
    ],
);

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the batch (B).
    pub batch: usize,
    /// Queries per sequence (Tq).
    pub q_len: usize,
    /// Key/value rows per sequence (Tkv): the whole sequence, or the allocated KV cache.
    pub kv_len: usize,
    /// Position of the first query: the number of tokens already in the cache (0 in training).
    pub q_offset: usize,
    /// Query heads (Hq).
    pub n_heads: usize,
    /// Key/value heads (Hkv); Hq is a multiple of it.
    pub n_kv_heads: usize,
    /// Width of one head (D).
    pub head_dim: usize,
}

impl AttentionShape {
    /// The training shape: each sequence attends itself (`Tq = Tkv = len`, no offset).
    pub fn training(
        batch: usize,
        len: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        AttentionShape {
            batch,
            q_len: len,
            kv_len: len,
            q_offset: 0,
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    /// Query heads that share one kv head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Dimensions of `q`, `out`, `dout` and `dq`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.q_len, self.n_heads, self.head_dim]
    }

    /// Dimensions of `k`, `v`, `dk` and `dv`.
    pub fn kv_dims(&self) -> [usize; 4] {
        [self.batch, self.kv_len, self.n_kv_heads, self.head_dim]
    }

    /// Dimensions of `lse`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.n_heads, self.q_len]
    }

    /// How many keys (a prefix `0..n`) query `t` attends in a sequence of `seq_len` tokens;
    /// 0 for a padding query.
    pub fn attended_keys(&self, seq_len: usize, t: usize) -> usize {
        let pos = self.q_offset + t;
        if t < self.q_len && pos < seq_len.min(self.kv_len) {
            pos + 1
        } else {
            0
        }
    }

    /// The outer rows of the forward and dQ kernels: `[queries, query heads, batch]`.
    fn query_tiles(&self) -> [usize; 3] {
        [self.q_len, self.n_heads, self.batch]
    }

    /// The outer rows of the dK/dV kernel: `[keys, kv heads, batch]`.
    fn key_tiles(&self) -> [usize; 3] {
        [self.kv_len, self.n_kv_heads, self.batch]
    }

    /// Validates the shape for `op` and its tensors: those shaped like `q`, those shaped like
    /// `k`, `lse` and `seq_lens`.
    fn check(
        &self,
        op: &str,
        q_like: &[(&str, &Tensor)],
        kv_like: &[(&str, &Tensor)],
        lse: &Tensor,
        seq_lens: &Tensor,
    ) {
        self.validate(op);
        for &(name, t) in q_like {
            expect_elements(op, name, t, DType::F32, &self.q_dims());
        }
        for &(name, t) in kv_like {
            expect_elements(op, name, t, DType::F32, &self.kv_dims());
        }
        expect_elements(op, "lse", lse, DType::F32, &self.lse_dims());
        expect_elements(op, "seq_lens", seq_lens, DType::U32, &[self.batch]);
    }

    fn validate(&self, op: &str) {
        let AttentionShape {
            batch,
            q_len,
            kv_len,
            q_offset,
            n_heads,
            n_kv_heads,
            head_dim,
        } = *self;
        assert!(
            batch > 0 && q_len > 0 && kv_len > 0 && n_heads > 0 && n_kv_heads > 0,
            "{op}: empty shape {self:?}"
        );
        assert!(
            n_heads % n_kv_heads == 0,
            "{op}: {n_heads} query heads do not split into groups over {n_kv_heads} kv heads"
        );
        assert!(
            (1..=MAX_HEAD_DIM).contains(&head_dim),
            "{op}: head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"
        );
        assert!(
            q_offset + q_len <= kv_len,
            "{op}: queries at positions {q_offset}..{} run past the {kv_len} key rows",
            q_offset + q_len
        );
        let largest = (batch * q_len.max(kv_len) * n_heads.max(n_kv_heads) * head_dim) as u64;
        assert!(
            largest <= u64::from(u32::MAX),
            "{op}: {self:?} has more elements than 32-bit indices reach"
        );
    }
}

/// Kernel launch parameters: mirrors `Params` in `shaders/attention.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    q_offset: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    row_starts: u32,
}

impl Params {
    fn new(shape: &AttentionShape, scale: f32) -> Self {
        Params {
            batch: shape.batch as u32,
            q_len: shape.q_len as u32,
            kv_len: shape.kv_len as u32,
            q_offset: shape.q_offset as u32,
            n_heads: shape.n_heads as u32,
            n_kv_heads: shape.n_kv_heads as u32,
            scale,
            row_starts: 0,
        }
    }
}

/// Causal attention `out = softmax(scale · q·kᵀ + mask) · v` per query head, and the row
/// logsumexp `lse` for [`attention_backward`]. Supports `Tq <= Tkv` with a `q_offset` (KV-cache
/// decoding); `out` and `lse` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rec: &mut Recorder,
    shape: &AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lens: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f32,
) {
    let op = "attention_forward";
    shape.check(
        op,
        &[("q", q), ("out", out)],
        &[("k", k), ("v", v)],
        lse,
        seq_lens,
    );
    let tiles = Tiles::for_device(rec.gpu(), shape.head_dim);
    let tensors = [q, k, v, seq_lens, out, lse];
    let params = Params::new(shape, scale);
    tiles.launch(rec, &FORWARD, &tensors, &params, shape.query_tiles());
}

/// Bytes of scratch [`attention_backward`] takes for `shape`: each query row's statistics.
pub fn attention_backward_scratch_bytes(shape: &AttentionShape) -> u64 {
    let [b, hq, t] = shape.lse_dims();
    (b * hq * t * ROW_STATS_WORDS * DType::U32.size_bytes()) as u64
}

/// [`attention_forward`] with each row's queries at positions of their own: rows decoded side
/// by side after different numbers of cached tokens. `lens_and_starts` (u32 `[2B]`) holds the
/// rows' valid lengths, then the position of each row's first query (`shape.q_offset` is not
/// used): query `t` of row `b` sits at `starts[b] + t`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_at(
    rec: &mut Recorder,
    shape: &AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens_and_starts: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f32,
) {
    let op = "attention_forward_at";
    let uniform = AttentionShape {
        q_offset: 0,
        ..*shape
    };
    uniform.validate(op);
    for (name, t) in [("q", q), ("out", out)] {
        expect_elements(op, name, t, DType::F32, &shape.q_dims());
    }
    for (name, t) in [("k", k), ("v", v)] {
        expect_elements(op, name, t, DType::F32, &shape.kv_dims());
    }
    expect_elements(op, "lse", lse, DType::F32, &shape.lse_dims());
    expect_elements(
        op,
        "lens_and_starts",
        lens_and_starts,
        DType::U32,
        &[2 * shape.batch],
    );
    let tiles = Tiles::for_device(rec.gpu(), shape.head_dim);
    let tensors = [q, k, v, lens_and_starts, out, lse];
    let params = Params {
        row_starts: 1,
        ..Params::new(&uniform, scale)
    };
    tiles.launch(rec, &FORWARD, &tensors, &params, shape.query_tiles());
}

/// Gradients of [`attention_forward`] (training case: `Tq == Tkv`, `q_offset == 0`) from the
/// saved `out` and `lse` and the upstream `dout`. `dq`, `dk` and `dv` are overwritten; padding
/// queries and keys get exactly zero.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    rec: &mut Recorder,
    shape: &AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    seq_lens: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    scale: f32,
) {
    let op = "attention_backward";
    assert!(
        shape.q_len == shape.kv_len && shape.q_offset == 0,
        "{op}: only the training case (q_len == kv_len, q_offset 0) has a backward, got {shape:?}"
    );
    let q_like = [("q", q), ("out", out), ("dout", dout), ("dq", dq)];
    shape.check(
        op,
        &q_like,
        &[("k", k), ("v", v), ("dk", dk), ("dv", dv)],
        lse,
        seq_lens,
    );

    let gpu = rec.gpu();
    let tiles = Tiles::for_device(gpu, shape.head_dim);
    let params = Params::new(shape, scale);
    let [b, hq, t] = shape.lse_dims();
    // RowStats {lse, delta, keys} per query row.
    let stats = rec.scratch([b, hq, t, ROW_STATS_WORDS], DType::U32);
    let head_dim = shape.head_dim as u32;
    let preprocess = gpu.kernel(&PREPROCESS, &[("HEAD_DIM", head_dim), ("ROW_WG", ROW_WG)]);
    let rows = Grid::threads(b * hq * t, ROW_WG);
    rec.dispatch(
        &preprocess,
        &[seq_lens, out, lse, dout, &stats],
        &params,
        rows,
    );

    let dq_tensors = [q, k, v, dout, &stats, dq];
    tiles.launch(rec, &BACKWARD_DQ, &dq_tensors, &params, shape.query_tiles());
    let dkv_tensors = [q, k, v, dout, &stats, dk, dv];
    tiles.launch(rec, &BACKWARD_DKV, &dkv_tensors, &params, shape.key_tiles());
}
