use es2_wgpu::ops::dropout::{dropout_apply, reference, Dropout};
use es2_wgpu::testing::*;
use es2_wgpu::Recorder;

#[test]
fn dropout_matches_reference_mask_and_rate() {
    let gpu = gpu();
    for (n, p, seed) in [(1usize, 0.5f32, 3u32), (1037, 0.1, 7), (100_003, 0.3, 11)] {
        let x = randn(seed as u64, n, 1.0);
        let (tx, ty) = (upload(gpu, [n], &x), poisoned(gpu, [n]));
        let d = Dropout { p, seed };
        let mut rec = Recorder::new(gpu);
        dropout_apply(&mut rec, &d, &tx, &ty);
        rec.finish().unwrap();
        let want = reference::dropout_apply(&d, &f64s(&x));
        assert_close(
            &format!("dropout n={n} p={p}"),
            &download(gpu, &ty),
            &want,
            1e-6,
        );
        if n > 1000 {
            let dropped = (0..n).filter(|&i| !reference::keep(&d, i)).count() as f64 / n as f64;
            assert!(
                (dropped - f64::from(p)).abs() < 0.02,
                "drop rate {dropped} for p {p}"
            );
        }
    }
}

#[test]
fn dropout_is_its_own_transpose_and_depends_on_the_seed() {
    // Σ dy·D(x) = Σ D(dy)·x: the backward is the same map.
    let gpu = gpu();
    let n = 4099;
    let (x, dy) = (randn(1, n, 1.0), randn(2, n, 1.0));
    let d = Dropout { p: 0.25, seed: 42 };
    let (fx, fdy) = (
        reference::dropout_apply(&d, &f64s(&x)),
        reference::dropout_apply(&d, &f64s(&dy)),
    );
    let (lhs, rhs) = (dot(&fx, &f64s(&dy)), dot(&fdy, &f64s(&x)));
    assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0));
    let run = |seed: u32| {
        let (tx, ty) = (upload(gpu, [n], &x), poisoned(gpu, [n]));
        let mut rec = Recorder::new(gpu);
        dropout_apply(&mut rec, &Dropout { p: 0.25, seed }, &tx, &ty);
        rec.finish().unwrap();
        download(gpu, &ty)
    };
    assert_bit_identical("dropout rerun", &run(42), &run(42));
    assert_ne!(bits(&run(42)), bits(&run(43)), "another seed, another mask");
}
