//! A linear projection `y = x·Wᵀ + b` with an optional LoRA adapter
//! `y += (alpha/r)·(x·Aᵀ)·Bᵀ`.

use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::dropout::{dropout_apply, Dropout};
use crate::ops::matmul::{
    matmul_backward_bias, matmul_backward_input, matmul_backward_input_lora,
    matmul_backward_weight, matmul_forward, matmul_forward_lora, LoraPair, MatmulOptions,
};
use crate::ops::residual::accumulate;
use crate::ops::Write;

/// A low-rank adapter on a [`Linear`]: `A [r, in]`, `B [out, r]`, scale `alpha / r`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `A [r, in]` (f32): projects the input down to the rank.
    pub a: Tensor,
    /// `B [out, r]` (f32): projects back up; zero when freshly attached.
    pub b: Tensor,
    /// `alpha / r`, multiplying the adapter's output.
    pub scale: f32,
}

impl Lora {
    /// The rank r: rows of `A`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The matrices and scale as the LoRA matmuls take them.
    pub fn pair(&self) -> LoraPair<'_> {
        LoraPair {
            a: &self.a,
            b: &self.b,
            scale: self.scale,
        }
    }
}

/// What the adapter path of a forward keeps for its backward.
#[derive(Debug, Clone)]
pub struct LoraActivations {
    /// The adapter's input after dropout (the layer input itself without dropout).
    pub input: Tensor,
    /// `input·Aᵀ [M, r]`.
    pub hidden: Tensor,
    /// The dropout the forward applied (its seed regenerates the same mask in the backward);
    /// `None` without dropout.
    pub dropout: Option<Dropout>,
}

/// Weight `[out, in]`, optional bias `[out]`, optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W [out, in]`, as the checkpoint stores it (f32, or f16 for frozen weights).
    pub weight: Tensor,
    /// `b [out]` (f32), where the configuration has one.
    pub bias: Option<Tensor>,
    /// The attached adapter, if any ([`Transformer::attach_lora`](super::Transformer::attach_lora),
    /// [`Transformer::load_adapter`](super::Transformer::load_adapter)).
    pub lora: Option<Lora>,
}

impl Linear {
    /// A projection with no adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    /// Output width: rows of `W`.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input width: columns of `W`.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Records `y = x·Wᵀ + b`, plus the adapter's path `s·(drop(x)·Aᵀ)·Bᵀ` when `adapters`
    /// and one is attached (`dropout` only during training). Returns what the adapter's
    /// backward needs.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        y: &Tensor,
        adapters: bool,
        dropout: Option<Dropout>,
    ) -> Option<LoraActivations> {
        let Some(lora) = self.lora.as_ref().filter(|_| adapters) else {
            matmul_forward(
                rec,
                x,
                &self.weight,
                self.bias.as_ref(),
                y,
                MatmulOptions::overwrite(),
            );
            return None;
        };
        let input = match dropout {
            Some(d) => {
                let dropped = Tensor::empty(rec.gpu(), x.shape().clone(), DType::F32);
                dropout_apply(rec, &d, x, &dropped);
                dropped
            }
            None => x.clone(),
        };
        let rows = x.numel() / self.in_features();
        let hidden = Tensor::empty(rec.gpu(), [rows, lora.rank()], DType::F32);
        matmul_forward(
            rec,
            &input,
            &lora.a,
            None,
            &hidden,
            MatmulOptions::overwrite(),
        );
        // y = x·Wᵀ + b + s·h·Bᵀ: the up product rides along with the projection.
        matmul_forward_lora(
            rec,
            x,
            &self.weight,
            self.bias.as_ref(),
            &lora.pair(),
            &hidden,
            y,
        );
        Some(LoraActivations {
            input,
            hidden,
            dropout,
        })
    }

    /// An output tensor for `rows` inputs.
    pub fn output(&self, gpu: &Gpu, rows: usize) -> Tensor {
        Tensor::empty(gpu, [rows, self.out_features()], DType::F32)
    }
}

/// Gradient buffers of one [`Linear`]: only those of trainable parameters exist.
#[derive(Debug, Clone, Default)]
pub struct LinearGrads {
    /// `∂L/∂W [out, in]`, under full fine-tuning.
    pub weight: Option<Tensor>,
    /// `∂L/∂b [out]`, under full fine-tuning of a projection with a bias.
    pub bias: Option<Tensor>,
    /// `∂L/∂A [r, in]`, when the adapter trains.
    pub lora_a: Option<Tensor>,
    /// `∂L/∂B [out, r]`, when the adapter trains.
    pub lora_b: Option<Tensor>,
}

impl Linear {
    /// Records the backward of [`Linear::forward`]: `dx (+)= dy·W` (plus the adapter's path),
    /// and accumulates (`+=`) the gradients `grads` holds buffers for. `lora` is what the
    /// forward returned.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        lora: Option<&LoraActivations>,
        dy: &Tensor,
        dx: &Tensor,
        dx_write: Write,
        grads: &LinearGrads,
    ) {
        if let Some(dw) = &grads.weight {
            matmul_backward_weight(rec, dy, x, dw, MatmulOptions::accumulate());
        }
        if let Some(db) = &grads.bias {
            matmul_backward_bias(rec, dy, db, Write::Accumulate);
        }
        let input_grad = MatmulOptions::writing(dx_write);
        let (Some(adapter), Some(saved)) = (&self.lora, lora) else {
            matmul_backward_input(rec, dy, &self.weight, dx, input_grad);
            return;
        };
        // y += s·(u·Aᵀ)·Bᵀ with u = drop(x), h = u·Aᵀ  ⇒  dB += s·dyᵀ·h,  dh = s·dy·B,
        // dA += dhᵀ·u,  dx += drop(dh·A).
        let scaled = MatmulOptions::accumulate().scaled(adapter.scale);
        if let Some(db) = &grads.lora_b {
            matmul_backward_weight(rec, dy, &saved.hidden, db, scaled);
        }
        let dh = rec.scratch(saved.hidden.shape().clone(), DType::F32);
        matmul_backward_input(
            rec,
            dy,
            &adapter.b,
            &dh,
            MatmulOptions::overwrite().scaled(adapter.scale),
        );
        if let Some(da) = &grads.lora_a {
            matmul_backward_weight(rec, &dh, &saved.input, da, MatmulOptions::accumulate());
        }
        match &saved.dropout {
            // dx = dy·W + dh·A: the adapter's term rides along with the projection's.
            None => {
                let w = &self.weight;
                matmul_backward_input_lora(rec, dy, w, &dh, &adapter.a, dx, dx_write);
            }
            Some(d) => {
                matmul_backward_input(rec, dy, &self.weight, dx, input_grad);
                let du = rec.scratch(x.shape().clone(), DType::F32);
                matmul_backward_input(rec, &dh, &adapter.a, &du, MatmulOptions::overwrite());
                let dropped = rec.scratch(x.shape().clone(), DType::F32);
                dropout_apply(rec, d, &du, &dropped);
                accumulate(rec, &dropped, dx, 1.0);
            }
        }
    }
}
