//! Rotary position embedding (Hugging Face rotate-half layout) on `x [B, T, H, D]`: the head
//! vector of token `t` is rotated by the angles `(pos_offset + t) · inv_freq[i]`, pairing
//! element `i` with `i + D/2`. The same positions apply to every batch row, except in
//! [`rope_forward_at`], where each row has positions of its own (decoding rows side by side).
//!
//! `inv_freq [D/2]` is computed on the host by [`rope_inv_freq`] (with Llama-3 frequency
//! scaling when the config asks for it) and uploaded once.

use super::common::launch_per_item;
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("rope");

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rope_forward",
    // x, inv_freq, out
    bindings: &[read(1), read(2), read_write(3)],
};
static FORWARD_AT: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rope_forward_at",
    // x, inv_freq, out, starts
    bindings: &[read(1), read(2), read_write(3), read(4)],
};
static BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "rope_backward",
    // dout, inv_freq, dx
    bindings: &[read(1), read(2), read_write(3)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    pairs: u32,
    tokens: u32,
    heads: u32,
    half_dim: u32,
    pos_offset: u32,
}

/// Llama-3's frequency scaling (`rope_scaling` with `rope_type: "llama3"` in a Hugging Face
/// config): long wavelengths are stretched by `factor`, short ones kept, those in between
/// interpolated.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Llama3RopeScaling {
    /// How much long wavelengths are stretched.
    pub factor: f64,
    /// Wavelengths longer than `original / low_freq_factor` are stretched fully.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

impl Llama3RopeScaling {
    /// One inverse frequency adjusted as transformers' `_compute_llama3_parameters` does
    /// (the same comparisons, in the same order).
    pub fn adjust(&self, inv_freq: f64) -> f64 {
        let context = self.original_max_position_embeddings as f64;
        let low_freq_wavelen = context / self.low_freq_factor;
        let high_freq_wavelen = context / self.high_freq_factor;
        let wavelen = std::f64::consts::TAU / inv_freq;
        if wavelen > low_freq_wavelen {
            inv_freq / self.factor
        } else if wavelen < high_freq_wavelen {
            inv_freq
        } else {
            let smooth = (context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// `inv_freq[i] = theta^(-2i/D)` for `i < D/2`, computed in f64 (then Llama-3 scaling, if any)
/// and rounded to f32 once. (transformers computes it in f32, which can differ by an ulp.)
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    assert!(
        head_dim > 0 && head_dim % 2 == 0,
        "rope_inv_freq: head_dim {head_dim} must be even"
    );
    (0..head_dim / 2)
        .map(|i| {
            let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            scaling.map_or(inv_freq, |s| s.adjust(inv_freq)) as f32
        })
        .collect()
}

fn launch(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    src: &Tensor,
    inv_freq: &Tensor,
    dst: &Tensor,
    pos_offset: usize,
    starts: Option<&Tensor>,
) {
    let op = spec.entry;
    assert!(
        src.dtype() == DType::F32 && src.shape().rank() == 4,
        "{op}: input must be f32 [B, T, H, D], got {src:?}"
    );
    let (tokens, heads, head_dim) = (src.dims()[1], src.dims()[2], src.dims()[3]);
    assert!(
        head_dim > 0 && head_dim % 2 == 0,
        "{op}: head dim {head_dim} must be even"
    );
    assert!(
        inv_freq.dtype() == DType::F32 && inv_freq.numel() == head_dim / 2,
        "{op}: inv_freq must be {} f32 values, got {inv_freq:?}",
        head_dim / 2
    );
    assert!(
        dst.dtype() == DType::F32 && dst.dims() == src.dims(),
        "{op}: output {dst:?} must match the input {src:?}"
    );
    assert!(
        u32::try_from(pos_offset + tokens).is_ok(),
        "{op}: positions up to {pos_offset} + {tokens} exceed u32"
    );
    let pairs = src.numel() / 2;
    let params = Params {
        pairs: pairs as u32,
        tokens: tokens as u32,
        heads: heads as u32,
        half_dim: (head_dim / 2) as u32,
        pos_offset: pos_offset as u32,
    };
    match starts {
        Some(starts) => {
            assert!(
                starts.dtype() == DType::U32 && starts.numel() == src.dims()[0],
                "{op}: starts must be one u32 per batch row, got {starts:?}"
            );
            launch_per_item(rec, spec, &[src, inv_freq, dst, starts], &params, pairs);
        }
        None => launch_per_item(rec, spec, &[src, inv_freq, dst], &params, pairs),
    }
}

/// `out = rope(x)` for `x [B, T, H, D]` at positions `pos_offset + t`. `out` must not alias `x`.
pub fn rope_forward(
    rec: &mut Recorder,
    x: &Tensor,
    inv_freq: &Tensor,
    out: &Tensor,
    pos_offset: usize,
) {
    launch(rec, &FORWARD, x, inv_freq, out, pos_offset, None);
}

/// [`rope_forward`] with each batch row at positions of its own: row `b`'s token `t` at
/// `starts[b] + t` (`starts`: u32 `[B]`), for rows decoded side by side after different
/// numbers of cached tokens.
pub fn rope_forward_at(
    rec: &mut Recorder,
    x: &Tensor,
    inv_freq: &Tensor,
    out: &Tensor,
    starts: &Tensor,
) {
    launch(rec, &FORWARD_AT, x, inv_freq, out, 0, Some(starts));
}

/// `dx = rope⁻¹(dout)`: the transpose (inverse) rotation, overwriting `dx`.
pub fn rope_backward(
    rec: &mut Recorder,
    dout: &Tensor,
    inv_freq: &Tensor,
    dx: &Tensor,
    pos_offset: usize,
) {
    launch(rec, &BACKWARD, dout, inv_freq, dx, pos_offset, None);
}

/// CPU f64 references, on row-major `[B, T, H, D]` data given as `dims`.
pub mod reference {
    /// The angle as transformers (and the kernel) form it: an f32 product, used exactly.
    fn angle(position: usize, inv_freq: f32) -> f64 {
        f64::from(position as f32 * inv_freq)
    }

    fn rotate(
        x: &[f64],
        inv_freq: &[f32],
        dims: [usize; 4],
        pos_offset: usize,
        direction: f64,
    ) -> Vec<f64> {
        let [_, tokens, heads, head_dim] = dims;
        let half = head_dim / 2;
        let mut out = vec![0.0; x.len()];
        for (v, (src, dst)) in x
            .chunks_exact(head_dim)
            .zip(out.chunks_exact_mut(head_dim))
            .enumerate()
        {
            let position = pos_offset + (v / heads) % tokens;
            for (i, &f) in inv_freq.iter().enumerate() {
                let (sin, cos) = angle(position, f).sin_cos();
                let sin = direction * sin;
                dst[i] = src[i] * cos - src[i + half] * sin;
                dst[i + half] = src[i + half] * cos + src[i] * sin;
            }
        }
        out
    }

    /// Rotates `x [B, T, H, D]` by the angles of positions `pos_offset + t`.
    pub fn rope_forward(
        x: &[f64],
        inv_freq: &[f32],
        dims: [usize; 4],
        pos_offset: usize,
    ) -> Vec<f64> {
        rotate(x, inv_freq, dims, pos_offset, 1.0)
    }

    /// [`rope_forward`] with batch row `b` at positions `starts[b] + t`.
    pub fn rope_forward_at(
        x: &[f64],
        inv_freq: &[f32],
        dims: [usize; 4],
        starts: &[usize],
    ) -> Vec<f64> {
        let row_dims = [1, dims[1], dims[2], dims[3]];
        let row: usize = row_dims.iter().product();
        x.chunks_exact(row)
            .zip(starts)
            .flat_map(|(x, &start)| rotate(x, inv_freq, row_dims, start, 1.0))
            .collect()
    }

    /// The gradient of [`rope_forward`]: the inverse rotation of `dout`.
    pub fn rope_backward(
        dout: &[f64],
        inv_freq: &[f32],
        dims: [usize; 4],
        pos_offset: usize,
    ) -> Vec<f64> {
        rotate(dout, inv_freq, dims, pos_offset, -1.0)
    }
}
