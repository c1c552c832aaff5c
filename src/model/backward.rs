//! One decoder block's backward, written out in reverse of its forward (llm.c style), and the
//! final norm's. The block loop that calls them (seeds, taps, recomputation) is in
//! `runner.rs`. Parameter gradients accumulate (`+=`); activation gradients overwrite.

use super::batch::Batch;
use super::grads::{BlockGrads, Gradients};
use super::names::Projection;
use super::transformer::{Block, BlockActivations, Transformer};
use crate::gpu::{DType, Recorder, Tensor};
use crate::ops::activation::swiglu_backward;
use crate::ops::attention::{attention_backward, AttentionShape};
use crate::ops::residual::accumulate;
use crate::ops::rmsnorm::rmsnorm_backward;
use crate::ops::rope::rope_backward;
use crate::ops::Write;

/// Where the backward starts: the gradient of the loss with respect to the logits and/or to
/// hidden states (transformers' indexing, `[B·T, C]` each, with respect to the state after its
/// hooks; several may be given).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seeds<'a> {
    /// `∂L/∂logits [B·T, V]`, for a forward run with [`Output::Logits`](super::Output::Logits);
    /// a forward that stopped below the final norm ignores it.
    pub logits: Option<&'a Tensor>,
    /// `∂L/∂normed [B·T, C]`, the gradient at the final norm's output taken back through the
    /// LM head already (`Transformer::head_in_chunks`); the backward goes on from it in place
    /// (hidden seeds at L are added into it). Not together with `logits`.
    pub normed: Option<&'a Tensor>,
    /// `(i, ∂L/∂h_i)` pairs: a gradient added at hidden state `i`. An index above the forward's
    /// top is ignored.
    pub hidden: &'a [(usize, Tensor)],
}

impl Transformer {
    /// The final norm's backward: `dx = ∂L/∂h_L` from `dnormed`, and its weight's gradient
    /// when it trains.
    pub(crate) fn final_norm_backward(
        &self,
        rec: &mut Recorder,
        h_last: &Tensor,
        rstd: &Tensor,
        dnormed: &Tensor,
        dx: &Tensor,
        grads: &Gradients,
    ) {
        rmsnorm_backward(
            rec,
            h_last,
            &self.final_norm,
            rstd,
            dnormed,
            dx,
            grads.final_norm.as_ref(),
            Write::Accumulate,
        );
    }

    /// One block's backward: `dx_in = ∂L/∂x` from `dout = ∂L/∂(block output)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_backward(
        &self,
        rec: &mut Recorder,
        block: &Block,
        x: &Tensor,
        saved: &BlockActivations,
        batch: &Batch,
        dout: &Tensor,
        dx_in: &Tensor,
        grads: &BlockGrads,
    ) {
        let gpu = rec.gpu();
        let cfg = &self.config;
        let rows = batch.rows();
        let f32_tensor = |dims: &[usize]| Tensor::empty(gpu, dims, DType::F32);
        // dx (+)= the input gradient of projection p from dy; its parameters' gradients +=.
        let project_back =
            |rec: &mut Recorder, p: Projection, x: &Tensor, dy: &Tensor, dx: &Tensor, write| {
                let lora = saved.lora[p].as_ref();
                block.proj[p].backward(rec, x, lora, dy, dx, write, &grads.proj[p]);
            };

        // MLP: out = mid + down(swiglu(gate(n2), up(n2))), n2 = rmsnorm(mid).
        let dact = f32_tensor(&[rows, cfg.intermediate_size]);
        project_back(
            rec,
            Projection::Down,
            &saved.act,
            dout,
            &dact,
            Write::Overwrite,
        );
        let dgate = f32_tensor(&[rows, cfg.intermediate_size]);
        let dup = f32_tensor(&[rows, cfg.intermediate_size]);
        swiglu_backward(rec, &saved.gate, &saved.up, &dact, &dgate, &dup);
        let dmlp_in = f32_tensor(&[rows, cfg.hidden_size]);
        project_back(
            rec,
            Projection::Gate,
            &saved.mlp_in,
            &dgate,
            &dmlp_in,
            Write::Overwrite,
        );
        project_back(
            rec,
            Projection::Up,
            &saved.mlp_in,
            &dup,
            &dmlp_in,
            Write::Accumulate,
        );
        let dmid = f32_tensor(&[rows, cfg.hidden_size]);
        rmsnorm_backward(
            rec,
            &saved.mid,
            &block.mlp_norm,
            &saved.mlp_rstd,
            &dmlp_in,
            &dmid,
            grads.mlp_norm.as_ref(),
            Write::Accumulate,
        );
        accumulate(rec, dout, &dmid, 1.0);

        // Attention: mid = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rmsnorm(x).
        let (b, t, d) = (batch.batch, batch.seq, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let dattn = f32_tensor(&[rows, hq * d]);
        project_back(
            rec,
            Projection::O,
            &saved.attn,
            &dmid,
            &dattn,
            Write::Overwrite,
        );
        let (dq, dk, dv) = (
            f32_tensor(&[b, t, hq, d]),
            f32_tensor(&[b, t, hkv, d]),
            f32_tensor(&[b, t, hkv, d]),
        );
        let shape = AttentionShape::training(b, t, hq, hkv, d);
        let scale = 1.0 / (d as f32).sqrt();
        let attn_out = saved.attn.reshape([b, t, hq, d]);
        let dattn = dattn.reshape([b, t, hq, d]);
        attention_backward(
            rec,
            &shape,
            &saved.q,
            &saved.k,
            &saved.v,
            &attn_out,
            &saved.lse,
            &dattn,
            &batch.seq_lens,
            &dq,
            &dk,
            &dv,
            scale,
        );
        let dq_raw = f32_tensor(&[rows, hq * d]);
        let dk_raw = f32_tensor(&[rows, hkv * d]);
        rope_backward(rec, &dq, &self.inv_freq, &dq_raw.reshape([b, t, hq, d]), 0);
        rope_backward(rec, &dk, &self.inv_freq, &dk_raw.reshape([b, t, hkv, d]), 0);
        let dattn_in = f32_tensor(&[rows, cfg.hidden_size]);
        let dv_flat = dv.reshape([rows, hkv * d]);
        project_back(
            rec,
            Projection::Q,
            &saved.attn_in,
            &dq_raw,
            &dattn_in,
            Write::Overwrite,
        );
        project_back(
            rec,
            Projection::K,
            &saved.attn_in,
            &dk_raw,
            &dattn_in,
            Write::Accumulate,
        );
        project_back(
            rec,
            Projection::V,
            &saved.attn_in,
            &dv_flat,
            &dattn_in,
            Write::Accumulate,
        );
        rmsnorm_backward(
            rec,
            x,
            &block.attn_norm,
            &saved.attn_rstd,
            &dattn_in,
            dx_in,
            grads.attn_norm.as_ref(),
            Write::Accumulate,
        );
        accumulate(rec, &dmid, dx_in, 1.0);
    }
}
