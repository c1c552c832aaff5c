use es2_wgpu::ops::softmax::{self, reference};
use es2_wgpu::testing::*;
use es2_wgpu::{Gpu, Recorder};

const TOL: f64 = 1e-5;
/// `[rows, V]`: a single column, a row of no tile size, one row, and vocabularies (each thread
/// walks 125 and 586 elements).
const SHAPES: [(usize, usize); 5] = [(5, 1), (7, 37), (1, 101), (3, 32_000), (1, 150_001)];

fn run_forward(gpu: &Gpu, shape: [usize; 2], x: &[f32]) -> Vec<f32> {
    let (tx, ty) = (upload(gpu, shape, x), poisoned(gpu, shape));
    let mut rec = Recorder::new(gpu);
    softmax::softmax_forward(&mut rec, &tx, &ty);
    rec.finish().unwrap();
    download(gpu, &ty)
}

fn run_backward(gpu: &Gpu, shape: [usize; 2], y: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ty, tdy, tdx) = (
        upload(gpu, shape, y),
        upload(gpu, shape, dy),
        poisoned(gpu, shape),
    );
    let mut rec = Recorder::new(gpu);
    softmax::softmax_backward(&mut rec, &ty, &tdy, &tdx);
    rec.finish().unwrap();
    download(gpu, &tdx)
}

/// Forward on `x`, and backward from the exact softmax of `x` (rounded to f32), against the
/// references.
fn check(name: &str, shape: [usize; 2], x: &[f32], dy: &[f32]) {
    let gpu = gpu();
    let cols = shape[1];
    let y_ref = reference::softmax_forward(&f64s(x), cols);
    assert_close(
        &format!("softmax_forward {name}"),
        &run_forward(gpu, shape, x),
        &y_ref,
        TOL,
    );
    let y: Vec<f32> = y_ref.iter().map(|&v| v as f32).collect();
    let dx_ref = reference::softmax_backward(&f64s(&y), &f64s(dy), cols);
    assert_close(
        &format!("softmax_backward {name}"),
        &run_backward(gpu, shape, &y, dy),
        &dx_ref,
        TOL,
    );
}

#[test]
fn softmax_matches_reference_from_one_column_to_a_vocabulary() {
    for (seed, (rows, cols)) in (1u64..).zip(SHAPES) {
        let n = rows * cols;
        let (x, dy) = (randn(seed, n, 3.0), randn(seed + 10, n, 1.0));
        check(&format!("{rows}x{cols}"), [rows, cols], &x, &dy);
    }
}

#[test]
fn softmax_covers_more_rows_than_one_grid_dimension_holds() {
    // 65,535 workgroups at most per dimension: the rows fold into a second one.
    let (rows, cols) = (65_600, 3);
    let x = randn(11, rows * cols, 3.0);
    let want = reference::softmax_forward(&f64s(&x), cols);
    assert_close(
        "softmax_forward 65600x3",
        &run_forward(gpu(), [rows, cols], &x),
        &want,
        TOL,
    );
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let (rows, cols) = (4, 333);
    let n = rows * cols;
    // ±80 and beyond: exp would overflow f32 without the max subtraction.
    let mut x = randn(5, n, 40.0);
    x[0] = 80.0;
    x[cols] = -80.0;
    check("large", [rows, cols], &x, &randn(6, n, 1.0));
}

#[test]
fn softmax_reference_gradient_matches_finite_differences() {
    let (rows, cols) = (3, 37);
    let n = rows * cols;
    let (x, dy) = (f64s(&randn(7, n, 2.0)), f64s(&randn(8, n, 1.0)));
    let y = reference::softmax_forward(&x, cols);
    let analytic = reference::softmax_backward(&y, &dy, cols);
    let loss = |xx: &[f64]| dot(&reference::softmax_forward(xx, cols), &dy);
    assert_gradient(
        "softmax dx",
        &analytic,
        &finite_difference(loss, &x, 1e-5),
        1e-7,
    );
}

#[test]
fn softmax_backward_is_bit_identical_across_runs() {
    let gpu = gpu();
    let shape = [3, 32_000];
    let n = shape[0] * shape[1];
    let y = run_forward(gpu, shape, &randn(9, n, 3.0));
    let dy = randn(10, n, 1.0);
    assert_bit_identical(
        "softmax_backward",
        &run_backward(gpu, shape, &y, &dy),
        &run_backward(gpu, shape, &y, &dy),
    );
}
