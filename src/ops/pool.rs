//! Pooling: one embedding per prompt from right-padded hidden states `h [B, T, C]` with valid
//! lengths `seq_lens [B]` (each ≥ 1): the last valid token, or the mean over the valid tokens.

use serde::{Deserialize, Serialize};

use super::common::{expect_dims, expect_dtype, launch_per_item};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("pool");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "pool_forward",
    bindings: &[read(1), read(2), read_write(3)],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "pool_backward",
    bindings: &[read(4), read(2), read_write(5)],
};

/// How a prompt's hidden states become its embedding.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    /// The hidden state of the last valid token (as in SCAV).
    #[default]
    Last,
    /// The mean over the valid tokens.
    Mean,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    tokens: u32,
    cols: u32,
    mean: u32,
}

/// Checks `hidden [B, T, C]`, `seq_lens [B]` and `pooled [B, C]`; returns the launch params.
fn params(hidden: &Tensor, seq_lens: &Tensor, pooled: &Tensor, pool: Pool) -> Params {
    let &[batch, tokens, cols] = hidden.dims() else {
        panic!("pool: hidden states must be [B, T, C], got {hidden:?}");
    };
    expect_dtype("pool", "hidden states", hidden, DType::F32);
    expect_dims("pool", "seq_lens", seq_lens, DType::U32, &[batch]);
    expect_dims("pool", "embeddings", pooled, DType::F32, &[batch, cols]);
    Params {
        batch: batch as u32,
        tokens: tokens as u32,
        cols: cols as u32,
        mean: u32::from(pool == Pool::Mean),
    }
}

/// `e[b] = h[b, len_b − 1]` (Last) or `mean_{t < len_b} h[b, t]` (Mean). Lengths outside
/// `[1, T]` are clamped into it.
pub fn pool_forward(rec: &mut Recorder, h: &Tensor, seq_lens: &Tensor, pool: Pool, e: &Tensor) {
    let params = params(h, seq_lens, e, pool);
    launch_per_item(rec, &FORWARD, &[h, seq_lens, e], &params, e.numel());
}

/// `dh += ∂e/∂h · de`: accumulates into the residual-stream gradient `dh [B, T, C]` at the
/// positions the forward read, leaving every other position untouched.
pub fn pool_backward(rec: &mut Recorder, de: &Tensor, seq_lens: &Tensor, pool: Pool, dh: &Tensor) {
    let params = params(dh, seq_lens, de, pool);
    launch_per_item(rec, &BACKWARD, &[de, seq_lens, dh], &params, dh.numel());
}

/// CPU f64 references.
pub mod reference {
    use super::Pool;

    /// The weight of position `t` in an embedding pooled from `len` valid positions.
    pub fn weight(pool: Pool, len: usize, t: usize) -> f64 {
        match pool {
            Pool::Last if t + 1 == len => 1.0,
            Pool::Mean if t < len => 1.0 / len as f64,
            _ => 0.0,
        }
    }

    /// `h [B, T, C]` → `e [B, C]`.
    pub fn pool_forward(h: &[f64], lens: &[u32], tokens: usize, pool: Pool) -> Vec<f64> {
        let cols = h.len() / (lens.len() * tokens);
        let mut e = vec![0.0; lens.len() * cols];
        for (b, &len) in lens.iter().enumerate() {
            for t in 0..tokens {
                let w = weight(pool, len as usize, t);
                for c in 0..cols {
                    e[b * cols + c] += w * h[(b * tokens + t) * cols + c];
                }
            }
        }
        e
    }

    /// `dh + ∂e/∂h · de` for `dh [B, T, C]`, `de [B, C]`.
    pub fn pool_backward(de: &[f64], lens: &[u32], dh: &[f64], pool: Pool) -> Vec<f64> {
        let cols = de.len() / lens.len();
        let tokens = dh.len() / de.len();
        let mut out = dh.to_vec();
        for (b, &len) in lens.iter().enumerate() {
            for t in 0..tokens {
                let w = weight(pool, len as usize, t);
                for c in 0..cols {
                    out[(b * tokens + t) * cols + c] += w * de[b * cols + c];
                }
            }
        }
        out
    }
}
