use es2_wgpu::ops::pool::{self, reference, Pool};
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;

/// (batch, tokens, cols, lengths): odd sizes, a single prompt of one token, full and short rows.
fn cases() -> Vec<(usize, usize, usize, Vec<u32>)> {
    vec![
        (1, 1, 1, vec![1]),
        (3, 7, 37, vec![7, 1, 4]),
        (2, 13, 333, vec![13, 9]),
    ]
}

fn lens_tensor(lens: &[u32]) -> Tensor {
    Tensor::from_u32(gpu(), [lens.len()], lens).unwrap()
}

#[test]
fn pool_forward_matches_reference_for_last_and_mean() {
    let gpu = gpu();
    for (seed, (b, t, c, lens)) in cases().into_iter().enumerate() {
        let h = randn(seed as u64 + 1, b * t * c, 1.0);
        let th = upload(gpu, [b, t, c], &h);
        for pool in [Pool::Last, Pool::Mean] {
            let e = poisoned(gpu, [b, c]);
            let mut rec = Recorder::new(gpu);
            pool::pool_forward(&mut rec, &th, &lens_tensor(&lens), pool, &e);
            rec.finish().unwrap();
            let want = reference::pool_forward(&f64s(&h), &lens, t, pool);
            assert_close(
                &format!("pool_forward {pool:?} {b}x{t}x{c}"),
                &download(gpu, &e),
                &want,
                TOL,
            );
        }
    }
}

#[test]
fn pool_backward_accumulates_matches_reference_and_finite_differences() {
    let gpu = gpu();
    for (seed, (b, t, c, lens)) in cases().into_iter().enumerate() {
        let seed = seed as u64 * 10 + 100;
        let (h, de, dh0) = (
            randn(seed, b * t * c, 1.0),
            randn(seed + 1, b * c, 1.0),
            randn(seed + 2, b * t * c, 1.0),
        );
        for pool in [Pool::Last, Pool::Mean] {
            let dh = upload(gpu, [b, t, c], &dh0);
            let mut rec = Recorder::new(gpu);
            pool::pool_backward(
                &mut rec,
                &upload(gpu, [b, c], &de),
                &lens_tensor(&lens),
                pool,
                &dh,
            );
            rec.finish().unwrap();
            let got = download(gpu, &dh);
            let want = reference::pool_backward(&f64s(&de), &lens, &f64s(&dh0), pool);
            let name = format!("pool_backward {pool:?} {b}x{t}x{c}");
            assert_close(&name, &got, &want, TOL);

            // Positions pooling ignores keep their exact bits.
            for (i, (g, d0)) in got.iter().zip(&dh0).enumerate() {
                let (bi, ti) = (i / (t * c), (i / c) % t);
                if reference::weight(pool, lens[bi] as usize, ti) == 0.0 {
                    assert_eq!(
                        g.to_bits(),
                        d0.to_bits(),
                        "{name}: touched ignored position {i}"
                    );
                }
            }

            // The reference's increment is the gradient of Σ e·de with respect to h.
            let (lens_ref, ded) = (&lens, f64s(&de));
            let loss = |x: &[f64]| dot(&reference::pool_forward(x, lens_ref, t, pool), &ded);
            let numeric = finite_difference(loss, &f64s(&h), 1e-3);
            let analytic = reference::pool_backward(&ded, &lens, &vec![0.0; h.len()], pool);
            assert_gradient(&name, &analytic, &numeric, 1e-8);
        }
    }
}

#[test]
fn pool_backward_is_bit_identical_across_runs() {
    let gpu = gpu();
    let (b, t, c, lens) = (3, 7, 37, [7u32, 1, 4]);
    let de = upload(gpu, [b, c], &randn(200, b * c, 1.0));
    let dh0 = randn(201, b * t * c, 1.0);
    let run = || {
        let dh = upload(gpu, [b, t, c], &dh0);
        let mut rec = Recorder::new(gpu);
        pool::pool_backward(&mut rec, &de, &lens_tensor(&lens), Pool::Mean, &dh);
        rec.finish().unwrap();
        download(gpu, &dh)
    };
    assert_bit_identical("pool_backward", &run(), &run());
}
