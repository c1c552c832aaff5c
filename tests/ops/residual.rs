use es2_wgpu::ops::residual::{self, reference};
use es2_wgpu::testing::*;
use es2_wgpu::Recorder;

const TOL: f64 = 1e-5;

#[test]
fn residual_forward_matches_reference_on_odd_and_unit_shapes() {
    let gpu = gpu();
    // 1,000,003 elements span a folded (two-dimensional) grid; 1 element is the degenerate case.
    for (seed, n) in [(1u64, 1usize), (2, 1027), (3, 1_000_003)] {
        let x = randn(seed, n, 1.0);
        let r = randn(seed + 100, n, 1.0);
        let (tx, tr, ty) = (
            upload(gpu, [n], &x),
            upload(gpu, [n], &r),
            poisoned(gpu, [n]),
        );
        let mut rec = Recorder::new(gpu);
        residual::residual_forward(&mut rec, &tx, &tr, &ty, 0.75);
        rec.finish().unwrap();
        let want = reference::residual_forward(&f64s(&x), &f64s(&r), 0.75);
        assert_close(
            &format!("residual_forward n={n}"),
            &download(gpu, &ty),
            &want,
            TOL,
        );
    }
}

#[test]
fn residual_backward_and_accumulate_match_reference_and_finite_differences() {
    let gpu = gpu();
    let n = 333;
    let (x, r, dy) = (randn(4, n, 1.0), randn(5, n, 1.0), randn(6, n, 1.0));
    let scale = -1.25;

    let (tdy, tdr) = (upload(gpu, [n], &dy), poisoned(gpu, [n]));
    let acc0 = randn(7, n, 1.0);
    let tacc = upload(gpu, [n], &acc0);
    let mut rec = Recorder::new(gpu);
    residual::residual_backward(&mut rec, &tdy, &tdr, scale);
    residual::accumulate(&mut rec, &tdy, &tacc, scale);
    rec.finish().unwrap();

    let dr_ref: Vec<f64> = f64s(&dy).iter().map(|g| scale as f64 * g).collect();
    assert_close("residual_backward dr", &download(gpu, &tdr), &dr_ref, TOL);
    let acc_ref = reference::accumulate(&f64s(&acc0), &f64s(&dy), scale as f64);
    assert_close("accumulate", &download(gpu, &tacc), &acc_ref, TOL);

    // d/dr Σ dy·(x + s·r) by central differences.
    let (xd, dyd) = (f64s(&x), f64s(&dy));
    let loss = |rr: &[f64]| dot(&reference::residual_forward(&xd, rr, scale as f64), &dyd);
    let numeric = finite_difference(loss, &f64s(&r), 1e-4);
    assert_gradient("residual_backward", &dr_ref, &numeric, 1e-7);
}

#[test]
fn recorder_times_dispatches_when_the_adapter_has_timestamps() {
    let gpu = gpu();
    let Some(mut rec) = Recorder::timed(gpu) else {
        assert!(!gpu.has_timestamps());
        return;
    };
    let n = 4096;
    let x = upload(gpu, [n], &randn(8, n, 1.0));
    let y = poisoned(gpu, [n]);
    residual::scale_forward(&mut rec, &x, &y, 2.0);
    residual::scale_forward(&mut rec, &y, &x, 0.5);
    let times = rec.finish_timed().unwrap();
    assert_eq!(times.len(), 2);
    assert!(times
        .iter()
        .all(|(name, t)| *name == "scale_forward" && t.is_finite() && *t >= 0.0));
}
