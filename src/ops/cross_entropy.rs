//! Fused softmax cross-entropy: per-row loss `logsumexp(z) − z[target]` and, in the same
//! dispatch, `dlogits = scale·(softmax(z) − onehot(target))`, without materialising the softmax.
//! Targets are u32; [`IGNORE`] (or any target ≥ V) marks a row that counts for nothing:
//! loss 0 and gradient 0.

use super::common::{expect_dims, expect_dtype, expect_elements, in_binding_parts, launch_per_row};
use crate::gpu::{read, read_write, DType, KernelSpec, Recorder, Shader, Tensor};
use crate::shader;

static SHADER: Shader = shader!("cross_entropy");

/// The target of an ignored row (padding, prompt tokens).
pub const IGNORE: u32 = u32::MAX;

static FORWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "cross_entropy_forward",
    bindings: &[read(1), read(2), read_write(3)],
};
static FORWARD_BACKWARD: KernelSpec = KernelSpec {
    shader: &SHADER,
    entry: "cross_entropy_forward_backward",
    bindings: &[read(1), read(2), read_write(3), read_write(4)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    scale: f32,
}

/// Checks `logits [N, V]` (f32), `targets [N]` (u32), `loss [N]` (f32); returns `(N, V)`.
fn rows_and_vocab(logits: &Tensor, targets: &Tensor, loss: &Tensor) -> (usize, usize) {
    let op = "cross_entropy";
    expect_dtype(op, "logits", logits, DType::F32);
    let (rows, vocab) = (logits.shape().rows(), logits.shape().last());
    assert!(vocab > 0, "{op}: empty vocabulary in {logits:?}");
    expect_elements(op, "targets (one per row)", targets, DType::U32, &[rows]);
    expect_elements(op, "loss (one per row)", loss, DType::F32, &[rows]);
    (rows, vocab)
}

fn launch(
    rec: &mut Recorder,
    spec: &'static KernelSpec,
    tensors: &[&Tensor],
    (rows, vocab): (usize, usize),
    scale: f32,
) {
    let params = Params {
        rows: rows as u32,
        cols: vocab as u32,
        scale,
    };
    launch_per_row(rec, spec, tensors, &params, rows);
}

/// `loss[n] = logsumexp(logits[n]) − logits[n, targets[n]]` and
/// `dlogits = scale·(softmax(logits) − onehot(targets))` (overwritten), both 0 on ignored rows.
/// `loss` is not scaled.
pub fn cross_entropy(
    rec: &mut Recorder,
    logits: &Tensor,
    targets: &Tensor,
    loss: &Tensor,
    dlogits: &Tensor,
    scale: f32,
) {
    let dims = rows_and_vocab(logits, targets, loss);
    expect_dims(
        "cross_entropy",
        "dlogits",
        dlogits,
        DType::F32,
        logits.dims(),
    );
    let tensors = [logits, targets, loss, dlogits];
    launch(rec, &FORWARD_BACKWARD, &tensors, dims, scale);
}

/// [`cross_entropy`] over row parts that each fit one storage binding, for logits of any size
/// (a long batch against a large vocabulary).
pub fn cross_entropy_in_parts(
    rec: &mut Recorder,
    logits: &Tensor,
    targets: &Tensor,
    loss: &Tensor,
    dlogits: &Tensor,
    scale: f32,
) {
    let (rows, vocab) = rows_and_vocab(logits, targets, loss);
    let tensors = [logits, targets, loss, dlogits];
    in_binding_parts(rec, [rows, vocab], &tensors, |rec, v| {
        cross_entropy(rec, &v[0], &v[1], &v[2], &v[3], scale);
    });
}

/// The per-row loss of [`cross_entropy`] without the gradient (evaluation, perplexity).
pub fn cross_entropy_loss(rec: &mut Recorder, logits: &Tensor, targets: &Tensor, loss: &Tensor) {
    let dims = rows_and_vocab(logits, targets, loss);
    launch(rec, &FORWARD, &[logits, targets, loss], dims, 1.0);
}

/// [`cross_entropy_loss`] over row parts that each fit one storage binding (held-out
/// evaluation of a long batch against a large vocabulary, with no gradient buffer).
pub fn cross_entropy_loss_in_parts(
    rec: &mut Recorder,
    logits: &Tensor,
    targets: &Tensor,
    loss: &Tensor,
) {
    let (rows, vocab) = rows_and_vocab(logits, targets, loss);
    in_binding_parts(rec, [rows, vocab], &[logits, targets, loss], |rec, v| {
        cross_entropy_loss(rec, &v[0], &v[1], &v[2]);
    });
}

/// CPU f64 references over row-major `[N, V]` logits.
pub mod reference {
    /// The target's index, or `None` for an ignored row ([`super::IGNORE`] or out of range).
    fn counted(target: u32, vocab: usize) -> Option<usize> {
        let t = target as usize;
        (t < vocab).then_some(t)
    }

    fn logsumexp(row: &[f64]) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
    }

    /// Per-row loss, 0 on ignored rows.
    pub fn cross_entropy_loss(logits: &[f64], targets: &[u32], vocab: usize) -> Vec<f64> {
        logits
            .chunks_exact(vocab)
            .zip(targets)
            .map(|(row, &t)| counted(t, vocab).map_or(0.0, |t| logsumexp(row) - row[t]))
            .collect()
    }

    /// `scale·(softmax − onehot)`, 0 on ignored rows.
    pub fn cross_entropy_grad(
        logits: &[f64],
        targets: &[u32],
        vocab: usize,
        scale: f64,
    ) -> Vec<f64> {
        logits
            .chunks_exact(vocab)
            .zip(targets)
            .flat_map(|(row, &t)| {
                let lse = logsumexp(row);
                let target = counted(t, vocab);
                (0..vocab).map(move |i| match target {
                    None => 0.0,
                    Some(t) => scale * ((row[i] - lse).exp() - f64::from(u8::from(i == t))),
                })
            })
            .collect()
    }
}
