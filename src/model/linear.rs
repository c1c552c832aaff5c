//! A linear projection `y = x·Wᵀ + b` with an optional LoRA adapter
//! `y += (alpha/r)·(x·Aᵀ)·Bᵀ`.

use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::ops::matmul::{matmul_forward, MatmulOptions};

/// A low-rank adapter on a [`Linear`]: `A [r, in]`, `B [out, r]`, scale `alpha / r`.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// Weight `[out, in]`, optional bias `[out]`, optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Records `y = x·Wᵀ + b` (plus the adapter's path when `adapters` and one is attached).
    /// Returns the adapter's hidden `x·Aᵀ [M, r]`, which its backward needs.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        y: &Tensor,
        adapters: bool,
    ) -> Option<Tensor> {
        matmul_forward(
            rec,
            x,
            &self.weight,
            self.bias.as_ref(),
            y,
            MatmulOptions::overwrite(),
        );
        let lora = self.lora.as_ref().filter(|_| adapters)?;
        let rows = x.numel() / self.in_features();
        let hidden = Tensor::empty(rec.gpu(), [rows, lora.rank()], DType::F32);
        matmul_forward(rec, x, &lora.a, None, &hidden, MatmulOptions::overwrite());
        let up = MatmulOptions::accumulate().scaled(lora.scale);
        matmul_forward(rec, &hidden, &lora.b, None, y, up);
        Some(hidden)
    }

    /// An output tensor for `rows` inputs.
    pub fn output(&self, gpu: &Gpu, rows: usize) -> Tensor {
        Tensor::empty(gpu, [rows, self.out_features()], DType::F32)
    }
}
