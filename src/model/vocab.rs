//! Vocabulary-sized matrices (the token embedding and the LM head), split into row chunks so
//! that no binding exceeds the adapter's `max_storage_buffer_binding_size`. A frozen matrix
//! may be stored in f16 or bf16: the lookup and the GEMM widen it exactly as they read it. Its
//! chunks have the rows an f32 matrix's would have, so the chunking does not depend on the
//! dtype.

use crate::gpu::{rows_per_binding, DType, Gpu, Recorder, Tensor};
use crate::ops::embedding::embedding_forward;
use crate::ops::matmul::{gemm, Gemm, MatmulOptions, Strided};
use crate::Result;
use half::{bf16, f16};

use super::params::ParamSource;
use super::transformer::store_as;

/// A `[rows, cols]` f32, f16 or bf16 matrix stored as consecutive row chunks of `chunk_rows`
/// rows.
#[derive(Debug, Clone)]
pub struct VocabMatrix {
    /// The row chunks in order, chunk `i` holding rows `i·chunk_rows ..`, each
    /// `[chunk_rows, cols]` but the last, which may be shorter.
    pub chunks: Vec<Tensor>,
    /// Rows per chunk: a multiple of 64, or every row when they all fit one chunk.
    pub chunk_rows: usize,
    /// Rows of the whole matrix (the vocabulary size V).
    pub rows: usize,
    /// Columns (the hidden size C).
    pub cols: usize,
    /// The binding limit the chunking was planned for; [`VocabMatrix::project`] splits its
    /// output rows to the same limit.
    pub max_binding: u64,
}

impl VocabMatrix {
    /// Largest chunk (a multiple of 64 rows) whose binding fits `max_binding` bytes.
    pub fn chunk_rows_for(rows: usize, cols: usize, max_binding: u64) -> usize {
        rows_per_binding(rows, cols, max_binding)
    }

    /// Loads tensor `name` (`[rows, cols]`) chunk by chunk, stored as `dtype` (f32, f16 or
    /// bf16).
    pub fn load(
        gpu: &Gpu,
        source: &dyn ParamSource,
        name: &str,
        (rows, cols): (usize, usize),
        max_binding: u64,
        dtype: DType,
    ) -> Result<Self> {
        let chunk_rows = Self::chunk_rows_for(rows, cols, max_binding);
        let mut chunks = Vec::new();
        for start in (0..rows).step_by(chunk_rows) {
            let end = (start + chunk_rows).min(rows);
            let data = source.rows(name, &[rows, cols], start..end)?;
            let part = format!("{name} (rows {start}..{end})");
            chunks.push(store_as(gpu, &part, &[end - start, cols], &data, dtype)?);
            gpu.flush_uploads();
        }
        Ok(VocabMatrix {
            chunks,
            chunk_rows,
            rows,
            cols,
            max_binding,
        })
    }

    /// The element type it is stored as (f32, or f16 or bf16 when frozen).
    pub fn dtype(&self) -> DType {
        self.chunks[0].dtype()
    }

    /// (first row, chunk) pairs.
    pub fn parts(&self) -> impl Iterator<Item = (usize, &Tensor)> {
        self.chunks
            .iter()
            .enumerate()
            .map(move |(i, c)| (i * self.chunk_rows, c))
    }

    /// `out[t] = self[ids[t]]` for `ids [M]`, `out [M, cols]`.
    pub fn lookup(&self, rec: &mut Recorder, ids: &Tensor, out: &Tensor) {
        for (first, chunk) in self.parts() {
            embedding_forward(rec, ids, chunk, first, out);
        }
    }

    /// `logits = x · selfᵀ` for `x [M, cols]`, `logits [M, rows]`, in row parts small enough
    /// to bind and one product per vocabulary chunk.
    pub fn project(&self, rec: &mut Recorder, x: &Tensor, logits: &Tensor) {
        self.for_each_part(rec, x, logits, |rec, xs, ls, rows, first, chunk| {
            let product = Gemm {
                c: self.window(first, rows),
                ..Gemm::dense(rows, chunk.dims()[0], self.cols, false, true)
            };
            gemm(rec, &product, xs, chunk, None, ls);
        });
    }

    /// Backward of [`VocabMatrix::project`]: `dx = dlogits · self` (overwritten) and, when
    /// `grad` is given, `grad += dlogitsᵀ · x`.
    pub fn project_backward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        dlogits: &Tensor,
        dx: &Tensor,
        grad: Option<&VocabMatrix>,
    ) {
        self.for_each_part(rec, dx, dlogits, |rec, dxs, dls, rows, first, chunk| {
            let n = chunk.dims()[0];
            // dx[rows, cols] (+)= dlogits[:, first..first+n] · chunk
            let into_dx = Gemm {
                a: self.window(first, rows),
                ..Gemm::dense(rows, self.cols, n, false, false)
            }
            .with(if first == 0 {
                MatmulOptions::overwrite()
            } else {
                MatmulOptions::accumulate()
            });
            gemm(rec, &into_dx, dls, chunk, None, dxs);
        });
        let Some(grad) = grad else { return };
        self.for_each_part(rec, x, dlogits, |rec, xs, dls, rows, first, _| {
            let chunk_grad = &grad.chunks[first / self.chunk_rows];
            let n = chunk_grad.dims()[0];
            // grad[n, cols] += dlogits[:, first..first+n]ᵀ · x
            let into_grad = Gemm {
                a: self.window(first, rows),
                ..Gemm::dense(n, self.cols, rows, true, false)
            }
            .with(MatmulOptions::accumulate());
            gemm(rec, &into_grad, dls, xs, None, chunk_grad);
        });
    }

    /// Columns `first..` of a `[rows, self.rows]` logits part, as a gemm operand.
    fn window(&self, first: usize, rows: usize) -> Strided {
        Strided {
            offset: first,
            row_stride: self.rows,
            batch_stride: rows * self.rows,
        }
    }

    /// Calls `f(rec, x_part, logits_part, part_rows, first_vocab_row, chunk)` for every row
    /// part of `x [M, cols]`/`logits [M, rows]` that fits a binding and every vocabulary chunk.
    fn for_each_part(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        logits: &Tensor,
        mut f: impl FnMut(&mut Recorder, &Tensor, &Tensor, usize, usize, &Tensor),
    ) {
        let m = x.dims()[0];
        let part_rows = Self::chunk_rows_for(m, self.rows, self.max_binding);
        for start in (0..m).step_by(part_rows) {
            let rows = part_rows.min(m - start);
            let (xs, ls) = if rows == m {
                (x.clone(), logits.clone())
            } else {
                (
                    x.rows_view(rec.gpu(), start, rows),
                    logits.rows_view(rec.gpu(), start, rows),
                )
            };
            for (first, chunk) in self.parts() {
                f(rec, &xs, &ls, rows, first, chunk);
            }
        }
    }

    /// An all-zero f32 matrix of the same shape and chunking (for gradients).
    pub fn zeros_like(&self, gpu: &Gpu) -> Self {
        VocabMatrix {
            chunks: self
                .chunks
                .iter()
                .map(|c| Tensor::zeros(gpu, c.shape().clone(), DType::F32))
                .collect(),
            ..self.clone()
        }
    }

    /// Host copy of the whole matrix, in f32 (f16 and bf16 widened exactly).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for chunk in &self.chunks {
            match chunk.dtype() {
                DType::F16 => {
                    let halves: Vec<f16> = bytemuck::pod_collect_to_vec(&chunk.to_bytes(gpu)?);
                    out.extend(halves.iter().map(|h| h.to_f32()));
                }
                DType::BF16 => {
                    let halves: Vec<bf16> = bytemuck::pod_collect_to_vec(&chunk.to_bytes(gpu)?);
                    out.extend(halves.iter().map(|h| h.to_f32()));
                }
                _ => out.extend(chunk.to_f32(gpu)?),
            }
        }
        Ok(out)
    }
}
