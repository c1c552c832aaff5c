use es2_wgpu::ops::layernorm::{self, reference};
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

use super::norm_weights;

const TOL: f64 = 1e-5;
const EPS: f32 = 1e-5;

/// Rows with a non-zero mean, so that a kernel that skips centring shows.
fn inputs(seed: u64, n: usize) -> Vec<f32> {
    randn(seed, n, 1.0).iter().map(|v| v + 0.5).collect()
}

struct Backward {
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// Forward on the GPU (for mean and rstd), then the backward. `grad0` holds the initial dw and
/// db when accumulating, `None` to overwrite poisoned ones.
fn gpu_backward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    rows: usize,
    grad0: Option<(&[f32], &[f32])>,
) -> Backward {
    let gpu = gpu();
    let cols = w.len();
    let (tx, tw, tb, tdy) = (
        upload(gpu, [rows, cols], x),
        upload(gpu, [cols], w),
        upload(gpu, [cols], b),
        upload(gpu, [rows, cols], dy),
    );
    let (ty, tmean, trstd, tdx) = (
        poisoned(gpu, [rows, cols]),
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows, cols]),
    );
    let (tdw, tdb): (Tensor, Tensor) = match grad0 {
        Some((dw0, db0)) => (upload(gpu, [cols], dw0), upload(gpu, [cols], db0)),
        None => (poisoned(gpu, [cols]), poisoned(gpu, [cols])),
    };
    let mut rec = Recorder::new(gpu);
    layernorm::layernorm_forward(&mut rec, &tx, &tw, &tb, &ty, &tmean, &trstd, EPS);
    layernorm::layernorm_backward(
        &mut rec,
        &tx,
        &tw,
        &tmean,
        &trstd,
        &tdy,
        &tdx,
        &tdw,
        &tdb,
        grad0.is_some(),
    );
    rec.finish().unwrap();
    Backward {
        dx: download(gpu, &tdx),
        dw: download(gpu, &tdw),
        db: download(gpu, &tdb),
    }
}

#[test]
fn layernorm_forward_matches_reference() {
    let gpu = gpu();
    // C = 1, odd C, GPT-2's hidden size; one row, 37 rows.
    for (seed, rows, cols) in [(1u64, 37usize, 1usize), (2, 1, 333), (3, 37, 768)] {
        let x = inputs(seed, rows * cols);
        let (w, b) = (norm_weights(seed + 10, cols), randn(seed + 20, cols, 0.1));
        let (tx, tw, tb) = (
            upload(gpu, [rows, cols], &x),
            upload(gpu, [cols], &w),
            upload(gpu, [cols], &b),
        );
        let (ty, tmean, trstd) = (
            poisoned(gpu, [rows, cols]),
            poisoned(gpu, [rows]),
            poisoned(gpu, [rows]),
        );
        let mut rec = Recorder::new(gpu);
        layernorm::layernorm_forward(&mut rec, &tx, &tw, &tb, &ty, &tmean, &trstd, EPS);
        rec.finish().unwrap();
        let (y, mean, rstd) =
            reference::layernorm_forward(&f64s(&x), &f64s(&w), &f64s(&b), f64::from(EPS));
        let name = format!("layernorm_forward {rows}x{cols}");
        assert_close(&name, &download(gpu, &ty), &y, TOL);
        assert_close(&format!("{name} mean"), &download(gpu, &tmean), &mean, TOL);
        assert_close(&format!("{name} rstd"), &download(gpu, &trstd), &rstd, TOL);
    }
}

#[test]
fn layernorm_backward_matches_reference() {
    // 101 rows span two partial blocks of the weight gradient.
    for (seed, rows, cols) in [
        (5u64, 37usize, 1usize),
        (6, 1, 333),
        (7, 37, 768),
        (8, 101, 37),
    ] {
        let x = inputs(seed, rows * cols);
        let (w, b) = (norm_weights(seed + 10, cols), randn(seed + 20, cols, 0.1));
        let dy = randn(seed + 30, rows * cols, 1.0);
        let (dw0, db0) = (randn(seed + 40, cols, 1.0), randn(seed + 50, cols, 1.0));
        let (dx_ref, dw_ref, db_ref) =
            reference::layernorm_backward(&f64s(&x), &f64s(&w), &f64s(&dy), f64::from(EPS));
        let name = format!("layernorm_backward {rows}x{cols}");

        let fresh = gpu_backward(&x, &w, &b, &dy, rows, None);
        assert_close(&format!("{name} dx"), &fresh.dx, &dx_ref, TOL);
        assert_close(&format!("{name} dw"), &fresh.dw, &dw_ref, TOL);
        assert_close(&format!("{name} db"), &fresh.db, &db_ref, TOL);

        let acc = gpu_backward(&x, &w, &b, &dy, rows, Some((&dw0, &db0)));
        assert_close_accumulated(&format!("{name} dw"), &acc.dw, &dw0, &dw_ref, TOL);
        assert_close_accumulated(&format!("{name} db"), &acc.db, &db0, &db_ref, TOL);
    }
}

#[test]
fn layernorm_reference_backward_matches_finite_differences() {
    let (rows, cols) = (3, 7);
    let (x, w, b, dy) = (
        f64s(&inputs(11, rows * cols)),
        f64s(&norm_weights(12, cols)),
        f64s(&randn(13, cols, 0.1)),
        f64s(&randn(14, rows * cols, 1.0)),
    );
    let eps = f64::from(EPS);
    let (dx, dw, db) = reference::layernorm_backward(&x, &w, &dy, eps);
    let loss_x = |v: &[f64]| dot(&reference::layernorm_forward(v, &w, &b, eps).0, &dy);
    let loss_w = |v: &[f64]| dot(&reference::layernorm_forward(&x, v, &b, eps).0, &dy);
    let loss_b = |v: &[f64]| dot(&reference::layernorm_forward(&x, &w, v, eps).0, &dy);
    assert_gradient(
        "layernorm dx",
        &dx,
        &finite_difference(loss_x, &x, 1e-5),
        1e-7,
    );
    assert_gradient(
        "layernorm dw",
        &dw,
        &finite_difference(loss_w, &w, 1e-5),
        1e-7,
    );
    assert_gradient(
        "layernorm db",
        &db,
        &finite_difference(loss_b, &b, 1e-5),
        1e-7,
    );
}

#[test]
fn layernorm_backward_is_bit_identical_across_runs() {
    let (rows, cols) = (101, 333);
    let x = inputs(15, rows * cols);
    let (w, b) = (norm_weights(16, cols), randn(17, cols, 0.1));
    let dy = randn(18, rows * cols, 1.0);
    let (p, q) = (
        gpu_backward(&x, &w, &b, &dy, rows, None),
        gpu_backward(&x, &w, &b, &dy, rows, None),
    );
    assert_bit_identical("layernorm_backward dx", &p.dx, &q.dx);
    assert_bit_identical("layernorm_backward dw", &p.dw, &q.dw);
    assert_bit_identical("layernorm_backward db", &p.db, &q.db);
}
