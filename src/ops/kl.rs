//! The fused KL loss: per row of logits, `T²·KL` between the base model's distribution
//! `p = softmax(zb/T)` and the fine-tuned model's `q = softmax(zt/T)` (forward `KL(p‖q)` or
//! reverse `KL(q‖p)`), and its gradient with respect to the fine-tuned logits `zt`, in one
//! dispatch that never materialises either softmax (one workgroup per row, online max/sum).

use serde::{Deserialize, Serialize};

use super::common::{expect_dims, in_binding_parts, launch_per_row};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("kl");

static KL_LOSS: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "kl_loss",
    bindings: &[read(1), read(2), read(3), read_write(4), read_write(5)],
};

/// Which way round the KL is taken.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlDirection {
    /// `KL(p_base ‖ q_tuned)`.
    #[default]
    Forward,
    /// `KL(q_tuned ‖ p_base)`.
    Reverse,
}

/// The KL term's options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct KlOptions {
    /// Softmax temperature T (> 0); the loss is multiplied by T².
    pub temperature: f32,
    /// Which way round the KL is taken.
    pub direction: KlDirection,
}

impl Default for KlOptions {
    fn default() -> Self {
        KlOptions {
            temperature: 1.0,
            direction: KlDirection::Forward,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    vocab: u32,
    inv_temperature: f32,
    reverse: u32,
    loss_scale: f32,
    grad_scale: f32,
}

/// Per row `n`: `row_loss[n] = T²·KL` and `dzt[n] = ∂(grad_scale · row_loss[n]) / ∂zt[n]`
/// (overwritten), or 0 and 0 where `mask[n] == 0` (padding is excluded, not scored).
///
/// `zt`, `zb`, `dzt`: `[N, V]` f32; `mask`: `[N]` u32; `row_loss`: `[N]` f32. The caller sets
/// `grad_scale = λ / (number of unmasked rows)` for the mean over tokens. Each tensor must fit
/// one storage binding; split larger batches with [`Tensor::rows_view`].
#[allow(clippy::too_many_arguments)]
pub fn kl_loss(
    rec: &mut Recorder,
    zt: &Tensor,
    zb: &Tensor,
    mask: &Tensor,
    row_loss: &Tensor,
    dzt: &Tensor,
    options: &KlOptions,
    grad_scale: f32,
) {
    let op = "kl_loss";
    let &[rows, vocab] = zt.dims() else {
        panic!("{op}: fine-tuned logits must be [N, V], got {zt:?}");
    };
    assert!(vocab > 0, "{op}: empty vocabulary");
    for (name, t) in [("zt", zt), ("zb", zb), ("dzt", dzt)] {
        expect_dims(op, name, t, DType::F32, &[rows, vocab]);
    }
    expect_dims(op, "mask", mask, DType::U32, &[rows]);
    expect_dims(op, "row_loss", row_loss, DType::F32, &[rows]);
    let t = options.temperature;
    assert!(
        t.is_finite() && t > 0.0,
        "{op}: temperature {t} must be > 0"
    );
    let max_binding = rec.gpu().limits().max_storage_buffer_binding_size;
    assert!(
        zt.size_bytes() <= max_binding,
        "{op}: {zt:?} exceeds one storage binding ({max_binding} bytes); split the rows"
    );

    let params = Params {
        rows: rows as u32,
        vocab: vocab as u32,
        inv_temperature: 1.0 / t,
        reverse: u32::from(options.direction == KlDirection::Reverse),
        loss_scale: t * t,
        grad_scale: grad_scale * t,
    };
    launch_per_row(rec, &KL_LOSS, &[zt, zb, mask, row_loss, dzt], &params, rows);
}

/// [`kl_loss`] over row parts that each fit one storage binding, for logits of any size.
#[allow(clippy::too_many_arguments)]
pub fn kl_loss_in_parts(
    rec: &mut Recorder,
    zt: &Tensor,
    zb: &Tensor,
    mask: &Tensor,
    rows_out: &Tensor,
    dzt: &Tensor,
    options: &KlOptions,
    grad_scale: f32,
) {
    let dims = [zt.dims()[0], zt.dims()[1]];
    in_binding_parts(rec, dims, &[zt, zb, mask, rows_out, dzt], |rec, v| {
        kl_loss(rec, &v[0], &v[1], &v[2], &v[3], &v[4], options, grad_scale);
    });
}

/// CPU f64 references: plain log-softmax, no fusion.
pub mod reference {
    use super::{KlDirection, KlOptions};

    fn log_softmax(z: &[f64], temperature: f64) -> Vec<f64> {
        let max = z
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(x / temperature));
        let lse = max
            + z.iter()
                .map(|&x| (x / temperature - max).exp())
                .sum::<f64>()
                .ln();
        z.iter().map(|&x| x / temperature - lse).collect()
    }

    /// (log p, log q) of one row: base and fine-tuned log-probabilities at temperature T.
    fn log_probs(zt: &[f64], zb: &[f64], t: f64) -> (Vec<f64>, Vec<f64>) {
        (log_softmax(zb, t), log_softmax(zt, t))
    }

    /// `KL(a‖b)` from log-probabilities.
    fn kl(log_a: &[f64], log_b: &[f64]) -> f64 {
        log_a
            .iter()
            .zip(log_b)
            .map(|(la, lb)| la.exp() * (la - lb))
            .sum()
    }

    fn row_kl(log_p: &[f64], log_q: &[f64], direction: KlDirection) -> f64 {
        match direction {
            KlDirection::Forward => kl(log_p, log_q),
            KlDirection::Reverse => kl(log_q, log_p),
        }
    }

    /// Row losses `T²·KL` (0 for masked rows) of `zt`, `zb` `[N, V]`.
    pub fn kl_loss(zt: &[f64], zb: &[f64], mask: &[u32], options: &KlOptions) -> Vec<f64> {
        let vocab = zt.len() / mask.len();
        let t = f64::from(options.temperature);
        let rows = zt.chunks_exact(vocab).zip(zb.chunks_exact(vocab));
        rows.zip(mask)
            .map(|((rt, rb), &m)| {
                if m == 0 {
                    return 0.0;
                }
                let (log_p, log_q) = log_probs(rt, rb, t);
                t * t * row_kl(&log_p, &log_q, options.direction)
            })
            .collect()
    }

    /// `∂(grad_scale · Σ row_loss) / ∂zt`:
    /// forward `T(q − p)`, reverse `T q ∘ (log q − log p − KL(q‖p))`, times `grad_scale`.
    pub fn kl_backward(
        zt: &[f64],
        zb: &[f64],
        mask: &[u32],
        options: &KlOptions,
        grad_scale: f64,
    ) -> Vec<f64> {
        let vocab = zt.len() / mask.len();
        let t = f64::from(options.temperature);
        let mut grad = vec![0.0; zt.len()];
        let rows = zt.chunks_exact(vocab).zip(zb.chunks_exact(vocab));
        for ((g, (rt, rb)), &m) in grad.chunks_exact_mut(vocab).zip(rows).zip(mask) {
            if m == 0 {
                continue;
            }
            let (log_p, log_q) = log_probs(rt, rb, t);
            let row_kl = row_kl(&log_p, &log_q, options.direction);
            for ((gv, lp), lq) in g.iter_mut().zip(&log_p).zip(&log_q) {
                let (p, q) = (lp.exp(), lq.exp());
                let local = match options.direction {
                    KlDirection::Forward => q - p,
                    KlDirection::Reverse => q * (lq - lp - row_kl),
                };
                *gv = grad_scale * t * local;
            }
        }
        grad
    }
}
