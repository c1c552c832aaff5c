use es2_wgpu::ops::activation::{self, reference};
use es2_wgpu::testing::*;
use es2_wgpu::{Gpu, Recorder, Tensor};

const TOL: f64 = 1e-5;
/// `[rows, F]`: one element, one row, and a shape that is a multiple of no tile size.
const SHAPES: [(usize, usize); 3] = [(1, 1), (1, 37), (37, 101)];

/// Seeded inputs with a few ±100 entries, to check that nothing overflows in the tails.
fn with_extremes(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut v = randn(seed, n, std);
    for (i, x) in v.iter_mut().enumerate().step_by(7) {
        *x = if i % 2 == 0 { 100.0 } else { -100.0 };
    }
    v
}

struct SwigluRun {
    h: Vec<f32>,
    dgate: Vec<f32>,
    dup: Vec<f32>,
}

fn run_swiglu(gpu: &Gpu, shape: [usize; 2], gate: &[f32], up: &[f32], dh: &[f32]) -> SwigluRun {
    let (tg, tu, tdh) = (
        upload(gpu, shape, gate),
        upload(gpu, shape, up),
        upload(gpu, shape, dh),
    );
    let [h, dgate, dup]: [Tensor; 3] = std::array::from_fn(|_| poisoned(gpu, shape));
    let mut rec = Recorder::new(gpu);
    activation::swiglu_forward(&mut rec, &tg, &tu, &h);
    activation::swiglu_backward(&mut rec, &tg, &tu, &tdh, &dgate, &dup);
    rec.finish().unwrap();
    SwigluRun {
        h: download(gpu, &h),
        dgate: download(gpu, &dgate),
        dup: download(gpu, &dup),
    }
}

fn check_swiglu(name: &str, shape: [usize; 2], gate: &[f32], up: &[f32], dh: &[f32]) {
    let out = run_swiglu(gpu(), shape, gate, up, dh);
    let (g, u, d) = (f64s(gate), f64s(up), f64s(dh));
    let (dgate, dup) = reference::swiglu_backward(&g, &u, &d);
    assert_close(
        &format!("swiglu_forward {name}"),
        &out.h,
        &reference::swiglu_forward(&g, &u),
        TOL,
    );
    assert_close(
        &format!("swiglu_backward dgate {name}"),
        &out.dgate,
        &dgate,
        TOL,
    );
    assert_close(&format!("swiglu_backward dup {name}"), &out.dup, &dup, TOL);
}

#[test]
fn swiglu_matches_reference_on_odd_and_unit_shapes() {
    for (seed, (rows, f)) in (1u64..).zip(SHAPES) {
        let n = rows * f;
        let (gate, up, dh) = (
            randn(seed, n, 2.0),
            randn(seed + 10, n, 1.0),
            randn(seed + 20, n, 1.0),
        );
        check_swiglu(&format!("{rows}x{f}"), [rows, f], &gate, &up, &dh);
    }
}

#[test]
fn swiglu_stays_finite_and_accurate_for_large_gates() {
    let (rows, f) = (3, 101);
    let n = rows * f;
    let gate = with_extremes(4, n, 30.0);
    check_swiglu(
        "large",
        [rows, f],
        &gate,
        &randn(5, n, 1.0),
        &randn(6, n, 1.0),
    );
}

#[test]
fn swiglu_reference_gradients_match_finite_differences() {
    let n = 37;
    let (g, u, dh) = (
        f64s(&randn(7, n, 2.0)),
        f64s(&randn(8, n, 1.0)),
        f64s(&randn(9, n, 1.0)),
    );
    let (dgate, dup) = reference::swiglu_backward(&g, &u, &dh);
    let wrt_gate = |gg: &[f64]| dot(&reference::swiglu_forward(gg, &u), &dh);
    let wrt_up = |uu: &[f64]| dot(&reference::swiglu_forward(&g, uu), &dh);
    assert_gradient(
        "swiglu dgate",
        &dgate,
        &finite_difference(wrt_gate, &g, 1e-5),
        1e-7,
    );
    assert_gradient(
        "swiglu dup",
        &dup,
        &finite_difference(wrt_up, &u, 1e-5),
        1e-7,
    );
}

#[test]
fn activation_backwards_are_bit_identical_across_runs() {
    let gpu = gpu();
    let (shape, n) = ([37, 101], 37 * 101);
    let (a, b, c) = (randn(18, n, 3.0), randn(19, n, 1.0), randn(20, n, 1.0));
    let (first, second) = (
        run_swiglu(gpu, shape, &a, &b, &c),
        run_swiglu(gpu, shape, &a, &b, &c),
    );
    assert_bit_identical("swiglu_backward dgate", &first.dgate, &second.dgate);
    assert_bit_identical("swiglu_backward dup", &first.dup, &second.dup);
}
