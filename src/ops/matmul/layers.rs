//! The linear layers' products on [`super::gemm`]: a projection's forward, its input, weight
//! and bias gradients, and the LoRA forms that run a path's up or down product in the same
//! dispatch as the base projection.

use super::{gemm, gemm_plus, Gemm, MatmulOptions, Second, Strided};
use crate::gpu::{DType, Recorder, Tensor};
use crate::ops::reduce;
use crate::ops::Write;

/// Rows of `t` as a matrix with `cols` columns (all leading dimensions flattened).
fn rows_of(what: &str, t: &Tensor, cols: usize) -> usize {
    assert_eq!(
        t.shape().last(),
        cols,
        "matmul: {what} {t:?} must have {cols} columns"
    );
    t.shape().rows()
}

/// The rows `op`'s two activations share: `(name, tensor, columns)` each.
fn shared_rows(op: &str, a: (&str, &Tensor, usize), b: (&str, &Tensor, usize)) -> usize {
    let ((a_name, a, a_cols), (b_name, b, b_cols)) = (a, b);
    let rows = rows_of(a_name, a, a_cols);
    assert_eq!(
        rows_of(b_name, b, b_cols),
        rows,
        "{op}: {a_name} {a:?} and {b_name} {b:?} differ in rows"
    );
    rows
}

/// `(N, K)` of a weight `[N, K]`.
fn weight_dims(w: &Tensor) -> (usize, usize) {
    assert_eq!(w.shape().rank(), 2, "matmul: weight {w:?} must be [N, K]");
    (w.dims()[0], w.dims()[1])
}

/// `Y = alpha·X·Wᵀ (+ bias) (+ Y)`: `x [.., K]`, `w [N, K]` (f32, f16 or bf16), `bias [N]`,
/// `y [.., N]`.
pub fn matmul_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    options: MatmulOptions,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_forward", ("x", x, k), ("y", y, n));
    if let Some(bias) = bias {
        assert_eq!(
            bias.numel(),
            n,
            "matmul_forward: bias {bias:?} must have {n} elements"
        );
    }
    gemm(
        rec,
        &Gemm::dense(m, n, k, false, true).with(options),
        x,
        w,
        bias,
        y,
    );
}

/// `dX = alpha·dY·W` (or `+=`): `dy [.., N]`, `w [N, K]` (f32, f16 or bf16),
/// `dx [.., K]`.
pub fn matmul_backward_input(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    options: MatmulOptions,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_backward_input", ("dy", dy, n), ("dx", dx, k));
    gemm(
        rec,
        &Gemm::dense(m, k, n, false, false).with(options),
        dy,
        w,
        None,
        dx,
    );
}

/// A LoRA adapter's two matrices beside a weight `W [N, K]`: `a [r, K]`, `b [N, r]`, and the
/// scale `alpha / r`; its path adds `scale·(u·Aᵀ)·Bᵀ` to the layer's output.
#[derive(Debug, Clone, Copy)]
pub struct LoraPair<'t> {
    /// `A [r, K]`.
    pub a: &'t Tensor,
    /// `B [N, r]`.
    pub b: &'t Tensor,
    /// `alpha / r`.
    pub scale: f32,
}

/// `Y = X·Wᵀ (+ bias) + scale·H·Bᵀ`: a projection and its LoRA path's up product, `h [.., r]`
/// the path's hidden `u·Aᵀ` (with [`gemm_plus`]: one product where the device runs both).
pub fn matmul_forward_lora(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &LoraPair,
    h: &Tensor,
    y: &Tensor,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_forward_lora", ("x", x, k), ("y", y, n));
    let r = lora.b.dims()[1];
    assert_eq!(
        (lora.b.dims(), rows_of("h", h, r)),
        (&[n, r][..], m),
        "matmul_forward_lora: B {:?} and h {h:?} must be [{n}, r] and [{m}, r]",
        lora.b
    );
    let second = Second {
        a: (h, Strided::dense(m, r)),
        b: (lora.b, Strided::dense(n, r)),
        k: r,
        alpha: lora.scale,
    };
    let base = Gemm::dense(m, n, k, false, true);
    gemm_plus(rec, &base, x, w, bias, &second, y);
}

/// `dX = dY·W + dH·A` (or `+=`): a projection's input gradient and its LoRA path's (without
/// dropout), `dh [.., r]` the gradient at the path's hidden, `a [r, K]` its down matrix.
pub fn matmul_backward_input_lora(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dh: &Tensor,
    lora_a: &Tensor,
    dx: &Tensor,
    write: Write,
) {
    let (n, k) = weight_dims(w);
    let m = shared_rows("matmul_backward_input_lora", ("dy", dy, n), ("dx", dx, k));
    let r = lora_a.dims()[0];
    assert_eq!(
        (lora_a.dims(), rows_of("dh", dh, r)),
        (&[r, k][..], m),
        "matmul_backward_input_lora: A {lora_a:?} and dh {dh:?} must be [r, {k}] and [{m}, r]"
    );
    let second = Second {
        a: (dh, Strided::dense(m, r)),
        b: (lora_a, Strided::dense(r, k)),
        k: r,
        alpha: 1.0,
    };
    let base = Gemm::dense(m, k, n, false, false).with(MatmulOptions::writing(write));
    gemm_plus(rec, &base, dy, w, None, &second, dx);
}

/// `dW = alpha·dYᵀ·X` (or `+=`, as parameter gradients do): `dy [.., N]`, `x [.., K]`,
/// `dw [N, K]`, all f32 (a weight stored in 16 bits is frozen: it has no
/// gradient).
pub fn matmul_backward_weight(
    rec: &mut Recorder,
    dy: &Tensor,
    x: &Tensor,
    dw: &Tensor,
    options: MatmulOptions,
) {
    for (name, t) in [("dy", dy), ("x", x), ("dw", dw)] {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "matmul_backward_weight: {name} {t:?} must be f32 (16-bit weights are frozen)"
        );
    }
    let (n, k) = weight_dims(dw);
    let m = shared_rows("matmul_backward_weight", ("dy", dy, n), ("x", x, k));
    gemm(
        rec,
        &Gemm::dense(n, k, m, true, false).with(options),
        dy,
        x,
        None,
        dw,
    );
}

/// `db = Σ_rows dY` (or `+=`): `dy [.., N]`, `db [N]`. The bias is not scaled by alpha in the
/// forward, so its gradient has no alpha either.
pub fn matmul_backward_bias(rec: &mut Recorder, dy: &Tensor, db: &Tensor, write: Write) {
    assert_eq!(
        dy.shape().last(),
        db.numel(),
        "matmul_backward_bias: dy {dy:?} and db {db:?} differ in columns"
    );
    reduce::sum_rows(rec, dy, db, write);
}
