//! The backward pass, block by block in reverse (llm.c style): from gradients at the logits
//! and/or at any hidden states down to every trainable parameter and to the input embeddings.
//! Parameter gradients accumulate (`+=`); activation gradients overwrite.

use super::batch::Batch;
use super::grads::{BlockGrads, Gradients};
use super::transformer::{Block, BlockActivations, Forward, Transformer};
use crate::gpu::{DType, Recorder, Tensor};
use crate::ops::activation::swiglu_backward;
use crate::ops::attention::{attention_backward, AttentionShape};
use crate::ops::embedding::{embedding_backward, EmbeddingGradIndex};
use crate::ops::residual::accumulate;
use crate::ops::rmsnorm::rmsnorm_backward;
use crate::ops::rope::rope_backward;
use crate::Result;

/// Where the backward starts: the gradient of the loss with respect to the logits and/or to
/// hidden states (transformers' indexing, `[B·T, C]` each; several may be given).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seeds<'a> {
    pub logits: Option<&'a Tensor>,
    pub hidden: &'a [(usize, Tensor)],
}

impl Transformer {
    /// Records the backward of `forward` (which must have been run on `batch` with the same
    /// adapters setting) and accumulates into `grads`. Returns the gradient with respect to
    /// the input embeddings `hidden_states[0]`.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        batch: &Batch,
        forward: &Forward,
        seeds: &Seeds,
        grads: &Gradients,
    ) -> Result<Tensor> {
        let gpu = rec.gpu();
        let layers = self.layers();
        let top = forward.residual.len() - 1;
        let rows = batch.rows();
        let c = self.config.hidden_size;
        let seed_at = |index: usize| {
            seeds
                .hidden
                .iter()
                .filter(move |(i, _)| *i == index)
                .map(|(_, t)| t)
        };

        // Gradient at the top of the residual stream that was run.
        let mut dx = Tensor::empty(gpu, [rows, c], DType::F32);
        if top == layers && (seeds.logits.is_some() || seed_at(layers).next().is_some()) {
            let (normed, rstd) = forward
                .normed
                .as_ref()
                .expect("a backward through the final norm needs the forward's normed output");
            let dnormed = Tensor::empty(gpu, [rows, c], DType::F32);
            match seeds.logits {
                Some(dlogits) => self.lm_head().project_backward(
                    rec,
                    normed,
                    dlogits,
                    &dnormed,
                    grads.lm_head_grad(self),
                ),
                None => rec.zero(&dnormed),
            }
            for seed in seed_at(layers) {
                accumulate(rec, seed, &dnormed, 1.0);
            }
            rmsnorm_backward(
                rec,
                &forward.residual[layers],
                &self.final_norm,
                rstd,
                &dnormed,
                &dx,
                grads.final_norm.as_ref(),
                true,
            );
        } else {
            rec.zero(&dx);
            if top < layers {
                for seed in seed_at(top) {
                    accumulate(rec, seed, &dx, 1.0);
                }
            }
        }

        for layer in (0..top).rev() {
            let dx_in = Tensor::empty(gpu, [rows, c], DType::F32);
            self.block_backward(
                rec,
                &self.blocks[layer],
                &forward.residual[layer],
                &forward.blocks[layer],
                batch,
                &dx,
                &dx_in,
                &grads.blocks[layer],
            );
            dx = dx_in;
            for seed in seed_at(layer) {
                accumulate(rec, seed, &dx, 1.0);
            }
        }

        if let Some(dembed) = &grads.embed {
            let index = EmbeddingGradIndex::new(gpu, &batch.padded_ids)?;
            for (first, chunk) in dembed.parts() {
                embedding_backward(rec, &index, &dx, chunk, first);
            }
        }
        Ok(dx)
    }

    /// One block's backward: `dx_in = ∂L/∂x` from `dout = ∂L/∂(block output)`.
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
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
        let [dq_g, dk_g, dv_g, do_g, dgate_g, dup_g, ddown_g] = &grads.proj;
        let [h_q, h_k, h_v, h_o, h_gate, h_up, h_down] = &saved.lora;

        // MLP: out = mid + down(swiglu(gate(n2), up(n2))), n2 = rmsnorm(mid).
        let dact = f32_tensor(&[rows, cfg.intermediate_size]);
        block.down.backward(
            rec,
            &saved.act,
            h_down.as_ref(),
            dout,
            &dact,
            false,
            ddown_g,
        );
        let dgate = f32_tensor(&[rows, cfg.intermediate_size]);
        let dup = f32_tensor(&[rows, cfg.intermediate_size]);
        swiglu_backward(rec, &saved.gate, &saved.up, &dact, &dgate, &dup);
        let dmlp_in = f32_tensor(&[rows, cfg.hidden_size]);
        block.gate.backward(
            rec,
            &saved.mlp_in,
            h_gate.as_ref(),
            &dgate,
            &dmlp_in,
            false,
            dgate_g,
        );
        block.up.backward(
            rec,
            &saved.mlp_in,
            h_up.as_ref(),
            &dup,
            &dmlp_in,
            true,
            dup_g,
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
            true,
        );
        accumulate(rec, dout, &dmid, 1.0);

        // Attention: mid = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rmsnorm(x).
        let (b, t, d) = (batch.batch, batch.seq, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let dattn = f32_tensor(&[rows, hq * d]);
        block
            .o
            .backward(rec, &saved.attn, h_o.as_ref(), &dmid, &dattn, false, do_g);
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
        block.q.backward(
            rec,
            &saved.attn_in,
            h_q.as_ref(),
            &dq_raw,
            &dattn_in,
            false,
            dq_g,
        );
        block.k.backward(
            rec,
            &saved.attn_in,
            h_k.as_ref(),
            &dk_raw,
            &dattn_in,
            true,
            dk_g,
        );
        let dv_flat = dv.reshape([rows, hkv * d]);
        block.v.backward(
            rec,
            &saved.attn_in,
            h_v.as_ref(),
            &dv_flat,
            &dattn_in,
            true,
            dv_g,
        );
        rmsnorm_backward(
            rec,
            x,
            &block.attn_norm,
            &saved.attn_rstd,
            &dattn_in,
            dx_in,
            grads.attn_norm.as_ref(),
            true,
        );
        accumulate(rec, &dmid, dx_in, 1.0);
    }
}
