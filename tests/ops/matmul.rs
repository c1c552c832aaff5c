use es2_wgpu::gpu::DType;
use es2_wgpu::ops::matmul::{self, reference, Gemm, MatmulOptions, Strided};
use es2_wgpu::ops::Write;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;

/// (M, N, K): odd sizes that fill no tile, and each dimension at 1.
const SHAPES: [(usize, usize, usize); 5] = [
    (37, 29, 53),
    (1, 29, 53),
    (37, 1, 53),
    (37, 29, 1),
    (1, 1, 1),
];

#[test]
fn matmul_forward_matches_reference_with_and_without_bias() {
    let gpu = gpu();
    for (case, &(m, n, k)) in SHAPES.iter().enumerate() {
        let seed = 10 * case as u64;
        let (x, w, b) = (
            randn(seed, m * k, 1.0),
            randn(seed + 1, n * k, 1.0),
            randn(seed + 2, n, 1.0),
        );
        let alpha = [1.0, 0.37, -2.0][case % 3];
        let options = MatmulOptions::default().scaled(alpha);
        // x as [1, M, K]: leading dimensions flatten into rows.
        let (tx, tw, tb) = (
            upload(gpu, [1, m, k], &x),
            upload(gpu, [n, k], &w),
            upload(gpu, [n], &b),
        );
        let (y_bias, y_plain) = (poisoned(gpu, [m, n]), poisoned(gpu, [m, n]));
        let mut rec = Recorder::new(gpu);
        matmul::matmul_forward(&mut rec, &tx, &tw, Some(&tb), &y_bias, options);
        matmul::matmul_forward(&mut rec, &tx, &tw, None, &y_plain, options);
        rec.finish().unwrap();

        let (xd, wd, bd) = (f64s(&x), f64s(&w), f64s(&b));
        let alpha = f64::from(alpha);
        let want_bias = reference::matmul_forward(&xd, &wd, Some(&bd), (m, n, k), alpha);
        let want_plain = reference::matmul_forward(&xd, &wd, None, (m, n, k), alpha);
        let name = format!("matmul_forward {m}x{n}x{k} alpha={alpha:.2}");
        assert_close(
            &format!("{name} +bias"),
            &download(gpu, &y_bias),
            &want_bias,
            TOL,
        );
        assert_close(&name, &download(gpu, &y_plain), &want_plain, TOL);
    }
}

#[test]
fn matmul_forward_matches_reference_on_a_larger_shape() {
    let gpu = gpu();
    let (m, n, k) = (130, 257, 515);
    let (x, w, b) = (
        randn(90, m * k, 1.0),
        randn(91, n * k, 1.0),
        randn(92, n, 1.0),
    );
    let (tx, tw, tb, ty) = (
        upload(gpu, [m, k], &x),
        upload(gpu, [n, k], &w),
        upload(gpu, [n], &b),
        poisoned(gpu, [m, n]),
    );
    let mut rec = Recorder::new(gpu);
    matmul::matmul_forward(&mut rec, &tx, &tw, Some(&tb), &ty, MatmulOptions::default());
    rec.finish().unwrap();
    let want = reference::matmul_forward(&f64s(&x), &f64s(&w), Some(&f64s(&b)), (m, n, k), 1.0);
    assert_close(
        "matmul_forward 130x257x515",
        &download(gpu, &ty),
        &want,
        TOL,
    );
}

#[test]
fn matmul_backward_input_matches_reference_and_accumulates() {
    let gpu = gpu();
    for (case, &(m, n, k)) in SHAPES.iter().enumerate() {
        let seed = 100 + 10 * case as u64;
        let (dy, w, init) = (
            randn(seed, m * n, 1.0),
            randn(seed + 1, n * k, 1.0),
            randn(seed + 2, m * k, 1.0),
        );
        let alpha = [0.5, 1.0, -1.5][case % 3];
        let (tdy, tw) = (upload(gpu, [m, n], &dy), upload(gpu, [n, k], &w));
        let (dx, dx_acc) = (poisoned(gpu, [m, k]), upload(gpu, [m, k], &init));
        let mut rec = Recorder::new(gpu);
        let options = MatmulOptions::default().scaled(alpha);
        matmul::matmul_backward_input(&mut rec, &tdy, &tw, &dx, options);
        matmul::matmul_backward_input(
            &mut rec,
            &tdy,
            &tw,
            &dx_acc,
            MatmulOptions::accumulate().scaled(alpha),
        );
        rec.finish().unwrap();

        let want =
            reference::matmul_backward_input(&f64s(&dy), &f64s(&w), (m, n, k), f64::from(alpha));
        let name = format!("matmul_backward_input {m}x{n}x{k} alpha={alpha}");
        assert_close(&name, &download(gpu, &dx), &want, TOL);
        assert_close_accumulated(&name, &download(gpu, &dx_acc), &init, &want, TOL);
    }
}

#[test]
fn matmul_backward_weight_matches_reference_and_accumulates() {
    let gpu = gpu();
    for (case, &(m, n, k)) in SHAPES.iter().enumerate() {
        let seed = 200 + 10 * case as u64;
        let (dy, x, init) = (
            randn(seed, m * n, 1.0),
            randn(seed + 1, m * k, 1.0),
            randn(seed + 2, n * k, 1.0),
        );
        let alpha = [1.0, -0.25, 3.0][case % 3];
        let (tdy, tx) = (upload(gpu, [m, n], &dy), upload(gpu, [m, k], &x));
        let (dw, dw_acc) = (poisoned(gpu, [n, k]), upload(gpu, [n, k], &init));
        let mut rec = Recorder::new(gpu);
        let options = MatmulOptions::default().scaled(alpha);
        matmul::matmul_backward_weight(&mut rec, &tdy, &tx, &dw, options);
        matmul::matmul_backward_weight(
            &mut rec,
            &tdy,
            &tx,
            &dw_acc,
            MatmulOptions::accumulate().scaled(alpha),
        );
        rec.finish().unwrap();

        let want =
            reference::matmul_backward_weight(&f64s(&dy), &f64s(&x), (m, n, k), f64::from(alpha));
        let name = format!("matmul_backward_weight {m}x{n}x{k} alpha={alpha}");
        assert_close(&name, &download(gpu, &dw), &want, TOL);
        assert_close_accumulated(&name, &download(gpu, &dw_acc), &init, &want, TOL);
    }
}

#[test]
fn matmul_backward_bias_matches_reference_and_accumulates() {
    let gpu = gpu();
    for (seed, m, n) in [(300u64, 37usize, 29usize), (301, 1, 29), (302, 101, 1)] {
        let (dy, init) = (randn(seed, m * n, 1.0), randn(seed + 50, n, 1.0));
        let tdy = upload(gpu, [m, n], &dy);
        let (db, db_acc) = (poisoned(gpu, [n]), upload(gpu, [n], &init));
        let mut rec = Recorder::new(gpu);
        matmul::matmul_backward_bias(&mut rec, &tdy, &db, Write::Overwrite);
        matmul::matmul_backward_bias(&mut rec, &tdy, &db_acc, Write::Accumulate);
        rec.finish().unwrap();
        let want = reference::matmul_backward_bias(&f64s(&dy), n);
        let name = format!("matmul_backward_bias {m}x{n}");
        assert_close(&name, &download(gpu, &db), &want, TOL);
        assert_close_accumulated(&name, &download(gpu, &db_acc), &init, &want, TOL);
    }
}

#[test]
fn matmul_reference_backward_matches_finite_differences() {
    let (m, n, k) = (5, 4, 7);
    let alpha = 0.7;
    let dims = (m, n, k);
    let (x, w, b, dy) = (
        f64s(&randn(400, m * k, 1.0)),
        f64s(&randn(401, n * k, 1.0)),
        f64s(&randn(402, n, 1.0)),
        f64s(&randn(403, m * n, 1.0)),
    );
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        dot(&reference::matmul_forward(x, w, Some(b), dims, alpha), &dy)
    };
    let h = 1e-4;
    let numeric_x = finite_difference(|v| loss(v, &w, &b), &x, h);
    let numeric_w = finite_difference(|v| loss(&x, v, &b), &w, h);
    let numeric_b = finite_difference(|v| loss(&x, &w, v), &b, h);
    let analytic_x = reference::matmul_backward_input(&dy, &w, dims, alpha);
    let analytic_w = reference::matmul_backward_weight(&dy, &x, dims, alpha);
    let analytic_b = reference::matmul_backward_bias(&dy, n);
    assert_gradient("matmul_backward_input", &analytic_x, &numeric_x, 1e-7);
    assert_gradient("matmul_backward_weight", &analytic_w, &numeric_w, 1e-7);
    assert_gradient("matmul_backward_bias", &analytic_b, &numeric_b, 1e-7);
}

#[test]
fn matmul_backward_is_bit_identical_across_runs() {
    let gpu = gpu();
    let (m, n, k) = (67, 45, 83);
    let tdy = upload(gpu, [m, n], &randn(500, m * n, 1.0));
    let tw = upload(gpu, [n, k], &randn(501, n * k, 1.0));
    let tx = upload(gpu, [m, k], &randn(502, m * k, 1.0));
    let run = || {
        let (dx, dw, db) = (
            poisoned(gpu, [m, k]),
            poisoned(gpu, [n, k]),
            poisoned(gpu, [n]),
        );
        let mut rec = Recorder::new(gpu);
        let options = MatmulOptions::default().scaled(0.3);
        matmul::matmul_backward_input(&mut rec, &tdy, &tw, &dx, options);
        matmul::matmul_backward_weight(&mut rec, &tdy, &tx, &dw, options);
        matmul::matmul_backward_bias(&mut rec, &tdy, &db, Write::Overwrite);
        rec.finish().unwrap();
        [&dx, &dw, &db].map(|t| bits(&download(gpu, t)))
    };
    assert_eq!(run(), run());
}

/// Runs `g` on uploaded host data (`c_init` is C's content before the launch) and returns C.
fn run_gemm(g: &Gemm, a: &[f32], b: &[f32], bias: Option<&[f32]>, c_init: &[f32]) -> Vec<f32> {
    let gpu = gpu();
    let (ta, tb, tc) = (
        upload(gpu, [a.len()], a),
        upload(gpu, [b.len()], b),
        upload(gpu, [c_init.len()], c_init),
    );
    let tbias: Option<Tensor> = bias.map(|v| upload(gpu, [v.len()], v));
    let mut rec = Recorder::new(gpu);
    matmul::gemm(&mut rec, g, &ta, &tb, tbias.as_ref(), &tc);
    rec.finish().unwrap();
    download(gpu, &tc)
}

/// The reference result of `g` applied to `c_init`.
fn reference_gemm(
    g: &Gemm,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c_init: &[f32],
) -> Vec<f64> {
    let mut c = f64s(c_init);
    let bias = bias.map(f64s);
    reference::gemm(g, &f64s(a), &f64s(b), bias.as_deref(), &mut c);
    c
}

#[test]
fn gemm_batched_matches_reference_in_every_layout_with_a_broadcast_operand() {
    // One full 64×64 tile and partial edge tiles in M and N; K ends in a partial step.
    let (batch, m, n, k) = (3, 67, 69, 37);
    for (case, (transpose_a, transpose_b)) in
        [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .enumerate()
    {
        let seed = 600 + 10 * case as u64;
        let mut g = Gemm::dense(m, n, k, transpose_a, transpose_b);
        g.batch = batch;
        // Broadcast B in two layouts and A in the other two.
        if case % 2 == 0 {
            g.b.batch_stride = 0;
        } else {
            g.a.batch_stride = 0;
        }
        let a = randn(seed, (batch - 1) * g.a.batch_stride + m * k, 1.0);
        let b = randn(seed + 1, (batch - 1) * g.b.batch_stride + k * n, 1.0);
        let bias = randn(seed + 2, n, 1.0);
        for options in [
            MatmulOptions::default().scaled(0.5),
            MatmulOptions::accumulate().scaled(-1.25),
        ] {
            let g = g.with(options);
            let c_init = if options.write == Write::Accumulate {
                randn(seed + 3, batch * m * n, 1.0)
            } else {
                vec![f32::NAN; batch * m * n]
            };
            let with_bias = options.write == Write::Accumulate;
            let bias = with_bias.then_some(&bias[..]);
            let name = format!(
                "gemm batch={batch} {m}x{n}x{k} transpose_a={transpose_a} transpose_b={transpose_b} alpha={} accumulate={} bias={with_bias}",
                options.alpha, (options.write == Write::Accumulate)
            );
            let out = run_gemm(&g, &a, &b, bias, &c_init);
            assert_close(&name, &out, &reference_gemm(&g, &a, &b, bias, &c_init), TOL);
        }
    }
}

#[test]
fn gemm_writes_a_column_window_of_a_wider_output_and_nothing_else() {
    // The LM-head pattern: rows n0..n0+n of a weight [vocab, K] produce columns n0..n0+n of
    // logits [M, vocab]; x is read from row 3 of a larger activation tensor.
    let (m, n, k, vocab, n0, x_row0) = (21, 29, 45, 101, 37, 3);
    let x = randn(700, (x_row0 + m) * k, 1.0);
    let w = randn(701, vocab * k, 1.0);
    let bias = randn(702, vocab, 1.0);
    let mut g = Gemm::dense(m, n, k, false, true);
    g.a = g.a.at(x_row0 * k);
    g.b = g.b.at(n0 * k);
    g.c = Strided::broadcast(vocab).at(n0);
    g.bias_offset = n0;
    let window = |i: usize| (n0..n0 + n).contains(&(i % vocab));
    for options in [
        MatmulOptions::default().scaled(0.75),
        MatmulOptions::accumulate(),
    ] {
        let g = g.with(options);
        // Outside the window C holds values that must survive; inside, NaN unless accumulating.
        let c_init: Vec<f32> = randn(703, m * vocab, 1.0)
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if window(i) && options.write == Write::Overwrite {
                    f32::NAN
                } else {
                    v
                }
            })
            .collect();
        let out = run_gemm(&g, &x, &w, Some(&bias), &c_init);
        let want = reference_gemm(&g, &x, &w, Some(&bias), &c_init);
        let name = format!(
            "gemm column window accumulate={}",
            (options.write == Write::Accumulate)
        );
        assert_close(&name, &out, &want, TOL);
        let outside = |v: &[f32]| -> Vec<u32> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| !window(*i))
                .map(|(_, x)| x.to_bits())
                .collect()
        };
        assert_eq!(
            outside(&out),
            outside(&c_init),
            "{name}: elements outside the window changed"
        );
    }
}

#[test]
fn gemm_batch_entries_may_interleave_within_the_rows_of_c() {
    // Attention-style output: batch entry h writes columns h·n .. (h+1)·n of C [M, heads·n].
    let (heads, m, n, k) = (3, 17, 9, 21);
    let a = randn(800, heads * m * k, 1.0);
    let b = randn(801, heads * n * k, 1.0);
    let mut g = Gemm::dense(m, n, k, false, true);
    g.batch = heads;
    g.c = Strided {
        offset: 0,
        row_stride: heads * n,
        batch_stride: n,
    };
    let c_init = vec![f32::NAN; m * heads * n];
    let out = run_gemm(&g, &a, &b, None, &c_init);
    let want = reference_gemm(&g, &a, &b, None, &c_init);
    assert_close("gemm interleaved batch entries", &out, &want, TOL);
}

#[test]
#[should_panic(expected = "reaches element")]
fn gemm_rejects_an_operand_that_runs_past_its_tensor() {
    let gpu = gpu();
    let (m, n, k) = (4, 3, 5);
    let (ta, tb, tc) = (
        upload(gpu, [m * k], &randn(900, m * k, 1.0)),
        upload(gpu, [n * k], &randn(901, n * k, 1.0)),
        poisoned(gpu, [m * n]),
    );
    let mut g = Gemm::dense(m, n, k, false, true);
    g.a = g.a.at(1);
    let mut rec = Recorder::new(gpu);
    matmul::gemm(&mut rec, &g, &ta, &tb, None, &tc);
}

// ---- 16-bit weights (the GEMM's B operand in f16 or bf16) ----

/// The 16-bit types of frozen weights.
const NARROW: [DType; 2] = [DType::F16, DType::BF16];

/// The weight `[n, k]` uploaded as `dtype` (f16 or bf16) and, holding the same values, as
/// f32.
fn weight_pair(dtype: DType, seed: u64, n: usize, k: usize) -> (Tensor, Tensor, Vec<f32>) {
    let gpu = gpu();
    let values = narrow_weights(dtype, seed, n * k);
    let w16 = upload_as(gpu, [n, k], dtype, &values);
    (w16, upload(gpu, [n, k], &values), values)
}

/// (M, N, K) with K and N odd; the last splits K on a CPU adapter (one workgroup, K = 301 in
/// the input gradient).
const NARROW_SHAPES: [(usize, usize, usize); 5] = [
    (37, 29, 53),
    (1, 29, 53),
    (37, 1, 53),
    (37, 29, 1),
    (7, 301, 9),
];

#[test]
fn sixteen_bit_weights_match_the_reference_and_the_f32_path_bit_for_bit() {
    let gpu = gpu();
    for (dtype, (case, &(m, n, k))) in NARROW
        .into_iter()
        .flat_map(|dtype| NARROW_SHAPES.iter().enumerate().map(move |c| (dtype, c)))
    {
        let seed = 1000 + 10 * case as u64;
        let (w16, w32, w) = weight_pair(dtype, seed, n, k);
        let (x, b, dy) = (
            randn(seed + 1, m * k, 1.0),
            randn(seed + 2, n, 1.0),
            randn(seed + 3, m * n, 1.0),
        );
        let (tx, tb, tdy) = (
            upload(gpu, [m, k], &x),
            upload(gpu, [n], &b),
            upload(gpu, [m, n], &dy),
        );
        let options = MatmulOptions::default().scaled(0.75);
        // (y, dx) with the 16-bit weight, then with the f32 one.
        let run = |w: &Tensor| {
            let (y, dx) = (poisoned(gpu, [m, n]), poisoned(gpu, [m, k]));
            let mut rec = Recorder::new(gpu);
            matmul::matmul_forward(&mut rec, &tx, w, Some(&tb), &y, options);
            matmul::matmul_backward_input(&mut rec, &tdy, w, &dx, options);
            rec.finish().unwrap();
            (download(gpu, &y), download(gpu, &dx))
        };
        let ((y16, dx16), (y32, dx32)) = (run(&w16), run(&w32));

        let wd = f64s(&w);
        let name = format!("{m}x{n}x{k} {dtype} weight");
        let want_y = reference::matmul_forward(&f64s(&x), &wd, Some(&f64s(&b)), (m, n, k), 0.75);
        let want_dx = reference::matmul_backward_input(&f64s(&dy), &wd, (m, n, k), 0.75);
        assert_close(&format!("matmul_forward {name}"), &y16, &want_y, TOL);
        assert_close(
            &format!("matmul_backward_input {name}"),
            &dx16,
            &want_dx,
            TOL,
        );
        // Same tiles, same order of the sums: only the load differs, and it is exact.
        assert_bit_identical(&format!("matmul_forward {name} vs f32"), &y16, &y32);
        assert_bit_identical(
            &format!("matmul_backward_input {name} vs f32"),
            &dx16,
            &dx32,
        );
    }
}

#[test]
fn gemm_reads_16_bit_b_at_odd_offsets_and_strides_in_both_layouts() {
    let gpu = gpu();
    let (batch, m, n, k) = (2, 19, 23, 31);
    for (dtype, transpose_b) in NARROW
        .into_iter()
        .flat_map(|dtype| [false, true].map(|t| (dtype, t)))
    {
        // B starts at element 3, with an odd row stride and an odd batch stride, so its
        // elements fall in either half of their words.
        let (rows, cols) = if transpose_b { (n, k) } else { (k, n) };
        let b_layout = Strided {
            offset: 3,
            row_stride: cols + 2,
            batch_stride: rows * (cols + 2) + 1,
        };
        let g = Gemm {
            batch,
            b: b_layout,
            ..Gemm::dense(m, n, k, false, transpose_b)
        };
        let len = 3 + batch * b_layout.batch_stride;
        let b = narrow_weights(dtype, 1100 + u64::from(transpose_b), len);
        let a = randn(1102, batch * m * k, 1.0);
        let init = randn(1103, batch * m * n, 1.0);
        let (ta, tb16, tb32) = (
            upload(gpu, [a.len()], &a),
            upload_as(gpu, [len], dtype, &b),
            upload(gpu, [len], &b),
        );
        for options in [MatmulOptions::default(), MatmulOptions::accumulate()] {
            let g = g.with(options.scaled(-1.5));
            let c_init = if options.write == Write::Accumulate {
                init.clone()
            } else {
                vec![f32::NAN; init.len()]
            };
            let run = |tb: &Tensor| {
                let c = upload(gpu, [c_init.len()], &c_init);
                let mut rec = Recorder::new(gpu);
                matmul::gemm(&mut rec, &g, &ta, tb, None, &c);
                rec.finish().unwrap();
                download(gpu, &c)
            };
            let (out16, out32) = (run(&tb16), run(&tb32));
            let name = format!(
                "gemm {dtype} B transpose_b={transpose_b} offset 3 accumulate={}",
                (options.write == Write::Accumulate)
            );
            let want = reference_gemm(&g, &a, &b, None, &c_init);
            assert_close(&name, &out16, &want, TOL);
            assert_bit_identical(&format!("{name} vs f32"), &out16, &out32);
        }
    }
}

/// A weight gradient in `dtype`.
fn backward_weight_into(dtype: DType) {
    let gpu = gpu();
    let (m, n, k) = (3, 5, 7);
    let (tdy, tx) = (
        upload(gpu, [m, n], &randn(1200, m * n, 1.0)),
        upload(gpu, [m, k], &randn(1201, m * k, 1.0)),
    );
    let dw = upload_as(gpu, [n, k], dtype, &narrow_weights(dtype, 1202, n * k));
    let mut rec = Recorder::new(gpu);
    matmul::matmul_backward_weight(&mut rec, &tdy, &tx, &dw, MatmulOptions::accumulate());
}

#[test]
#[should_panic(expected = "16-bit weights are frozen")]
fn matmul_backward_weight_refuses_an_f16_gradient() {
    backward_weight_into(DType::F16);
}

#[test]
#[should_panic(expected = "16-bit weights are frozen")]
fn matmul_backward_weight_refuses_a_bf16_gradient() {
    backward_weight_into(DType::BF16);
}

/// A product whose A is `dtype`.
fn gemm_with_a(dtype: DType) {
    let gpu = gpu();
    let (m, n, k) = (4, 3, 5);
    let ta = upload_as(gpu, [m, k], dtype, &narrow_weights(dtype, 1300, m * k));
    let (tb, tc) = (
        upload(gpu, [n, k], &randn(1301, n * k, 1.0)),
        poisoned(gpu, [m, n]),
    );
    let mut rec = Recorder::new(gpu);
    matmul::gemm(
        &mut rec,
        &Gemm::dense(m, n, k, false, true),
        &ta,
        &tb,
        None,
        &tc,
    );
}

#[test]
#[should_panic(expected = "gemm: A Tensor([4, 5], f16) must be f32")]
fn gemm_takes_f16_only_for_b() {
    gemm_with_a(DType::F16);
}

#[test]
#[should_panic(expected = "gemm: A Tensor([4, 5], bf16) must be f32")]
fn gemm_takes_bf16_only_for_b() {
    gemm_with_a(DType::BF16);
}
