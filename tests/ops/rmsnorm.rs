use es2_wgpu::ops::rmsnorm::{self, reference};
use es2_wgpu::ops::Write;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

use super::norm_weights;

const TOL: f64 = 1e-5;
const EPS: f32 = 1e-5;

struct Backward {
    dx: Vec<f32>,
    dw: Vec<f32>,
}

/// Forward on the GPU (for rstd), then the backward; `dw0` is the initial gradient when
/// accumulating, `None` to overwrite a poisoned one.
fn gpu_backward(x: &[f32], w: &[f32], dy: &[f32], rows: usize, dw0: Option<&[f32]>) -> Backward {
    let gpu = gpu();
    let cols = w.len();
    let (tx, tw, tdy) = (
        upload(gpu, [rows, cols], x),
        upload(gpu, [cols], w),
        upload(gpu, [rows, cols], dy),
    );
    let (ty, trstd, tdx) = (
        poisoned(gpu, [rows, cols]),
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows, cols]),
    );
    let tdw: Tensor = match dw0 {
        Some(init) => upload(gpu, [cols], init),
        None => poisoned(gpu, [cols]),
    };
    let mut rec = Recorder::new(gpu);
    rmsnorm::rmsnorm_forward(&mut rec, &tx, &tw, &ty, &trstd, EPS);
    rmsnorm::rmsnorm_backward(
        &mut rec,
        &tx,
        &tw,
        &trstd,
        &tdy,
        &tdx,
        Some(&tdw),
        if dw0.is_some() {
            Write::Accumulate
        } else {
            Write::Overwrite
        },
    );
    rec.finish().unwrap();
    Backward {
        dx: download(gpu, &tdx),
        dw: download(gpu, &tdw),
    }
}

#[test]
fn rmsnorm_forward_matches_reference() {
    let gpu = gpu();
    // C = 1, odd C, a realistic hidden size; one row, 37 rows.
    for (seed, rows, cols) in [
        (1u64, 37usize, 1usize),
        (2, 1, 333),
        (3, 37, 333),
        (4, 37, 4096),
    ] {
        let x = randn(seed, rows * cols, 1.0);
        let w = norm_weights(seed + 10, cols);
        let (tx, tw) = (upload(gpu, [rows, cols], &x), upload(gpu, [cols], &w));
        let (ty, trstd) = (poisoned(gpu, [rows, cols]), poisoned(gpu, [rows]));
        let mut rec = Recorder::new(gpu);
        rmsnorm::rmsnorm_forward(&mut rec, &tx, &tw, &ty, &trstd, EPS);
        rec.finish().unwrap();
        let (y, rstd) = reference::rmsnorm_forward(&f64s(&x), &f64s(&w), f64::from(EPS));
        let name = format!("rmsnorm_forward {rows}x{cols}");
        assert_close(&name, &download(gpu, &ty), &y, TOL);
        assert_close(&format!("{name} rstd"), &download(gpu, &trstd), &rstd, TOL);
    }
}

#[test]
fn rmsnorm_backward_matches_reference() {
    // 101 rows span two partial blocks of the weight gradient.
    for (seed, rows, cols) in [
        (5u64, 37usize, 1usize),
        (6, 1, 333),
        (7, 37, 4096),
        (8, 101, 37),
    ] {
        let x = randn(seed, rows * cols, 1.0);
        let w = norm_weights(seed + 10, cols);
        let dy = randn(seed + 20, rows * cols, 1.0);
        let dw0 = randn(seed + 30, cols, 1.0);
        let (dx_ref, dw_ref) =
            reference::rmsnorm_backward(&f64s(&x), &f64s(&w), &f64s(&dy), f64::from(EPS));
        let name = format!("rmsnorm_backward {rows}x{cols}");

        let fresh = gpu_backward(&x, &w, &dy, rows, None);
        assert_close(&format!("{name} dx"), &fresh.dx, &dx_ref, TOL);
        assert_close(&format!("{name} dw"), &fresh.dw, &dw_ref, TOL);

        let acc = gpu_backward(&x, &w, &dy, rows, Some(&dw0));
        assert_close_accumulated(&format!("{name} dw"), &acc.dw, &dw0, &dw_ref, TOL);
    }
}

#[test]
fn rmsnorm_reference_backward_matches_finite_differences() {
    let (rows, cols) = (3, 7);
    let (x, w, dy) = (
        f64s(&randn(11, rows * cols, 1.0)),
        f64s(&norm_weights(12, cols)),
        f64s(&randn(13, rows * cols, 1.0)),
    );
    let eps = f64::from(EPS);
    let (dx, dw) = reference::rmsnorm_backward(&x, &w, &dy, eps);
    let loss_x = |xx: &[f64]| dot(&reference::rmsnorm_forward(xx, &w, eps).0, &dy);
    let loss_w = |ww: &[f64]| dot(&reference::rmsnorm_forward(&x, ww, eps).0, &dy);
    assert_gradient(
        "rmsnorm dx",
        &dx,
        &finite_difference(loss_x, &x, 1e-5),
        1e-7,
    );
    assert_gradient(
        "rmsnorm dw",
        &dw,
        &finite_difference(loss_w, &w, 1e-5),
        1e-7,
    );
}

#[test]
fn rmsnorm_backward_is_bit_identical_across_runs() {
    let (rows, cols) = (101, 333);
    let x = randn(14, rows * cols, 1.0);
    let w = norm_weights(15, cols);
    let dy = randn(16, rows * cols, 1.0);
    let (a, b) = (
        gpu_backward(&x, &w, &dy, rows, None),
        gpu_backward(&x, &w, &dy, rows, None),
    );
    assert_bit_identical("rmsnorm_backward dx", &a.dx, &b.dx);
    assert_bit_identical("rmsnorm_backward dw", &a.dw, &b.dw);
}

#[test]
fn rmsnorm_backward_without_a_weight_gradient_gives_the_same_dx() {
    // Frozen norms (LoRA training) skip the weight-gradient passes; dx must not change.
    let gpu = gpu();
    let (rows, cols) = (37, 101);
    let (x, dy) = (randn(21, rows * cols, 1.0), randn(22, rows * cols, 1.0));
    let w = randn(23, cols, 1.0);
    let with_dw = gpu_backward(&x, &w, &dy, rows, None);
    let (tx, tw, tdy) = (
        upload(gpu, [rows, cols], &x),
        upload(gpu, [cols], &w),
        upload(gpu, [rows, cols], &dy),
    );
    let (ty, trstd, tdx) = (
        poisoned(gpu, [rows, cols]),
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows, cols]),
    );
    let mut rec = Recorder::new(gpu);
    rmsnorm::rmsnorm_forward(&mut rec, &tx, &tw, &ty, &trstd, EPS);
    rmsnorm::rmsnorm_backward(
        &mut rec,
        &tx,
        &tw,
        &trstd,
        &tdy,
        &tdx,
        None,
        Write::Overwrite,
    );
    rec.finish().unwrap();
    assert_bit_identical("rmsnorm dx without dw", &download(gpu, &tdx), &with_dw.dx);
}
