//! Token embedding lookup `out[t, :] = table[ids[t], :]` (`ids [T]` u32, `table [V, C]`,
//! `out [T, C]`) and its gradient, for tables stored as row chunks (the vocabulary dimension
//! of a large model's table exceeds one storage binding).
//!
//! Each launch gets one chunk, `table[first_row .. first_row + chunk_rows]`, and touches only
//! the tokens whose id falls inside it; one launch per chunk covers the whole table. An id
//! `>= V` is a caller bug (ids come from the tokenizer): no chunk holds it, so its output row
//! is skipped, never written and never read out of bounds.
//!
//! The gradient gives every table row one writer, without atomics: [`EmbeddingGradIndex`]
//! (built on the host from the ids) lists each unique id's positions in increasing order, and
//! one GPU thread per (id, column) adds `dout` over them in that order.
//!
//! A frozen table may be stored in f16 or bf16 (half the memory): the lookup widens it exactly
//! to f32 as it reads (the kernel's `TABLE_FORMAT` override), so `out` holds exactly the
//! table's values. A trained table, and so every gradient, is f32.

use super::common::{expect_elements, launch_per_item, launch_per_item_with, wgsl_format};
use crate::gpu::{read, read_write, DType, Gpu, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;
use crate::{Error, Result};

static SHADER: Shader = shader!("embedding");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "embedding_forward",
    // ids, table chunk, out
    bindings: &[read(1), read(2), read_write(3)],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "embedding_backward",
    // unique ids, offsets, positions, dout, dtable chunk
    bindings: &[read(4), read(5), read(6), read(7), read_write(8)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    cols: u32,
    first_row: u32,
    chunk_rows: u32,
    first_unique: u32,
    uniques: u32,
}

/// `[chunk_rows, C]` of a table chunk (its element type one of `table_dtypes`), checked
/// against `[tokens, C]` f32 activations.
fn chunk_shape(
    op: &str,
    (chunk, table_dtypes): (&Tensor, &[DType]),
    acts: &Tensor,
    first_row: usize,
) -> (usize, usize) {
    for (name, t, dtypes) in [
        ("table chunk", chunk, table_dtypes),
        ("activations", acts, &[DType::F32][..]),
    ] {
        assert!(
            dtypes.contains(&t.dtype()) && t.shape().rank() == 2,
            "{op}: the {name} must be a 2-D tensor of {dtypes:?}, got {t:?}"
        );
    }
    let (chunk_rows, cols) = (chunk.dims()[0], chunk.dims()[1]);
    assert_eq!(
        acts.dims()[1],
        cols,
        "{op}: {acts:?} and the table chunk {chunk:?} differ in width"
    );
    assert!(
        u32::try_from(first_row + chunk_rows).is_ok(),
        "{op}: rows {first_row}..{} exceed u32 ids",
        first_row + chunk_rows
    );
    (chunk_rows, cols)
}

/// `out[t, :] = table[ids[t], :]` for every token whose id lies in the chunk
/// `table_chunk = table[first_row .. first_row + chunk_rows]`; the other rows of `out` are left
/// untouched. With the whole table as one chunk (`first_row` 0) this is the plain lookup.
/// The chunk is f32, f16 or bf16 (widened exactly).
pub fn embedding_forward(
    rec: &mut Recorder,
    ids: &Tensor,
    table_chunk: &Tensor,
    first_row: usize,
    out: &Tensor,
) {
    let op = "embedding_forward";
    let table = (table_chunk, &[DType::F32, DType::F16, DType::BF16][..]);
    let (chunk_rows, cols) = chunk_shape(op, table, out, first_row);
    let tokens = out.dims()[0];
    expect_elements(op, "ids (one per row of out)", ids, DType::U32, &[tokens]);
    let params = Params {
        tokens: tokens as u32,
        cols: cols as u32,
        first_row: first_row as u32,
        chunk_rows: chunk_rows as u32,
        first_unique: 0,
        uniques: 0,
    };
    let tensors = [ids, table_chunk, out];
    let format = [("TABLE_FORMAT", wgsl_format(table_chunk.dtype()))];
    launch_per_item_with(rec, &FORWARD, &format, &tensors, &params, tokens * cols);
}

/// The inverse of a batch's token ids, in CSR form: the sorted unique ids, and for the i-th of
/// them the positions `positions[offsets[i] .. offsets[i + 1]]` (increasing) where it occurs.
/// Built on the host once per batch and shared by every chunk's [`embedding_backward`].
#[derive(Debug)]
pub struct EmbeddingGradIndex {
    /// Host copy of the unique ids, to find the ones inside a chunk.
    unique: Vec<u32>,
    tokens: usize,
    unique_ids: Tensor,
    offsets: Tensor,
    positions: Tensor,
}

impl EmbeddingGradIndex {
    /// Indexes `ids` (the token ids of a batch, flattened in the order of the rows of `dout`).
    pub fn new(gpu: &Gpu, ids: &[u32]) -> Result<Self> {
        let (unique, offsets, positions) = inverse_index(ids)?;
        Ok(EmbeddingGradIndex {
            tokens: ids.len(),
            unique_ids: Tensor::from_u32(gpu, [unique.len()], &unique)?,
            offsets: Tensor::from_u32(gpu, [offsets.len()], &offsets)?,
            positions: Tensor::from_u32(gpu, [positions.len()], &positions)?,
            unique,
        })
    }

    /// Number of token positions indexed (rows of `dout`).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The distinct ids, in increasing order.
    pub fn unique_ids(&self) -> &[u32] {
        &self.unique
    }

    /// The range of unique-id indices whose ids lie in `[first_row, first_row + rows)`.
    fn inside(&self, first_row: usize, rows: usize) -> std::ops::Range<usize> {
        let below = |limit: usize| self.unique.partition_point(|&id| (id as usize) < limit);
        below(first_row)..below(first_row + rows)
    }
}

/// `dtable[id, :] += Σ dout[t, :]` over the positions `t` of each id, for the ids inside the
/// chunk `dtable_chunk = dtable[first_row .. first_row + chunk_rows]` (other rows untouched).
/// Deterministic: one writer per row, positions added in increasing order.
pub fn embedding_backward(
    rec: &mut Recorder,
    index: &EmbeddingGradIndex,
    dout: &Tensor,
    dtable_chunk: &Tensor,
    first_row: usize,
) {
    let op = "embedding_backward";
    let dtable = (dtable_chunk, &[DType::F32][..]);
    let (chunk_rows, cols) = chunk_shape(op, dtable, dout, first_row);
    assert_eq!(
        dout.dims()[0],
        index.tokens(),
        "{op}: {dout:?} does not have one row per indexed token"
    );
    let inside = index.inside(first_row, chunk_rows);
    if inside.is_empty() {
        return;
    }
    let params = Params {
        tokens: index.tokens() as u32,
        cols: cols as u32,
        first_row: first_row as u32,
        chunk_rows: chunk_rows as u32,
        first_unique: inside.start as u32,
        uniques: inside.len() as u32,
    };
    let tensors = [
        &index.unique_ids,
        &index.offsets,
        &index.positions,
        dout,
        dtable_chunk,
    ];
    launch_per_item(rec, &BACKWARD, &tensors, &params, inside.len() * cols);
}

/// `(unique ids, offsets, positions)` of the CSR inverse index of `ids`.
fn inverse_index(ids: &[u32]) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let count = u32::try_from(ids.len()).map_err(|_| {
        Error::InvalidArgument(format!("{} token ids exceed u32 positions", ids.len()))
    })?;
    // A stable sort keeps each id's positions in increasing order.
    let mut positions: Vec<u32> = (0..count).collect();
    positions.sort_by_key(|&t| ids[t as usize]);
    let (mut unique, mut offsets) = (Vec::new(), Vec::new());
    for (k, &t) in positions.iter().enumerate() {
        let id = ids[t as usize];
        if unique.last() != Some(&id) {
            unique.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(count);
    Ok((unique, offsets, positions))
}

/// CPU f64 references.
pub mod reference {
    /// `out[t, :] = table[ids[t], :]` (`table` row-major `[V, cols]`); an id `>= V` leaves its
    /// row of `out` untouched.
    pub fn embedding_forward(ids: &[u32], table: &[f64], cols: usize, out: &mut [f64]) {
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            let start = id as usize * cols;
            if let Some(src) = table.get(start..start + cols) {
                row.copy_from_slice(src);
            }
        }
    }

    /// `dtable[ids[t], :] += dout[t, :]` for every in-range id.
    pub fn embedding_backward(ids: &[u32], dout: &[f64], cols: usize, dtable: &mut [f64]) {
        for (&id, drow) in ids.iter().zip(dout.chunks_exact(cols)) {
            let start = id as usize * cols;
            if let Some(row) = dtable.get_mut(start..start + cols) {
                row.iter_mut().zip(drow).for_each(|(a, d)| *a += d);
            }
        }
    }
}
