use es2_wgpu::ops::kl::{self, reference, KlDirection, KlOptions};
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;
const DIRECTIONS: [KlDirection; 2] = [KlDirection::Forward, KlDirection::Reverse];

/// GPU row losses and `dzt` for `[rows, vocab]` logits (outputs poisoned before the launch).
fn run_kl(
    zt: &[f32],
    zb: &[f32],
    mask: &[u32],
    options: &KlOptions,
    grad_scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu();
    let (rows, vocab) = (mask.len(), zt.len() / mask.len());
    let (tzt, tzb) = (
        upload(gpu, [rows, vocab], zt),
        upload(gpu, [rows, vocab], zb),
    );
    let tmask = Tensor::from_u32(gpu, [rows], mask).unwrap();
    let (loss, dzt) = (poisoned(gpu, [rows]), poisoned(gpu, [rows, vocab]));
    let mut rec = Recorder::new(gpu);
    kl::kl_loss(
        &mut rec, &tzt, &tzb, &tmask, &loss, &dzt, options, grad_scale,
    );
    rec.finish().unwrap();
    (download(gpu, &loss), download(gpu, &dzt))
}

#[test]
fn kl_loss_matches_reference_and_finite_differences() {
    // (rows, vocab, mask, temperature): one token; masked rows at odd sizes; one large row.
    let cases: [(usize, Vec<u32>, f32); 3] = [
        (1, vec![1, 1, 0], 1.0),
        (37, vec![1, 0, 1, 1, 0], 0.7),
        (32_000, vec![1], 2.0),
    ];
    let grad_scale = 0.37;
    for (case, (vocab, mask, temperature)) in cases.into_iter().enumerate() {
        let n = mask.len() * vocab;
        let zt = randn(10 + case as u64, n, 2.0);
        let zb = randn(20 + case as u64, n, 2.0);
        for direction in DIRECTIONS {
            let options = KlOptions {
                temperature,
                direction,
            };
            let name = format!("kl {direction:?} T={temperature} {}x{vocab}", mask.len());
            let (loss, dzt) = run_kl(&zt, &zb, &mask, &options, grad_scale);
            let (ztd, zbd) = (f64s(&zt), f64s(&zb));
            let loss_ref = reference::kl_loss(&ztd, &zbd, &mask, &options);
            let grad_ref = reference::kl_backward(&ztd, &zbd, &mask, &options, grad_scale.into());
            assert_close(&format!("{name} loss"), &loss, &loss_ref, TOL);
            assert_close(&format!("{name} dzt"), &dzt, &grad_ref, TOL);
            if vocab > 1000 {
                continue; // finite differences over 32,000 logits cost 2·32,000 references
            }
            let total = |z: &[f64]| {
                let losses = reference::kl_loss(z, &zbd, &mask, &options);
                f64::from(grad_scale) * losses.iter().sum::<f64>()
            };
            let numeric = finite_difference(total, &ztd, 1e-5);
            assert_gradient(&format!("{name} dzt"), &grad_ref, &numeric, 1e-6);
        }
    }
}

#[test]
fn forward_kl_gradient_is_temperature_times_q_minus_p() {
    // ARCHITECTURE.md identity: ∂(scale·T²·KL(p‖q))/∂zt = scale·T·(q − p), from an independent softmax.
    let (rows, vocab, temperature, scale) = (3, 101, 1.7_f32, 0.25_f32);
    let zt = randn(30, rows * vocab, 1.5);
    let zb = randn(31, rows * vocab, 1.5);
    let options = KlOptions {
        temperature,
        direction: KlDirection::Forward,
    };
    let (_, dzt) = run_kl(&zt, &zb, &[1; 3], &options, scale);
    let softmax = |z: &[f32]| {
        let e: Vec<f64> = z
            .iter()
            .map(|&x| (f64::from(x) / f64::from(temperature)).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(move |x| x / sum)
    };
    let closed_form: Vec<f64> = zt
        .chunks(vocab)
        .zip(zb.chunks(vocab))
        .flat_map(|(t, b)| {
            let p: Vec<f64> = softmax(b).collect();
            softmax(t)
                .zip(p)
                .map(|(q, p)| f64::from(scale * temperature) * (q - p))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close("kl dzt = scale·T·(q − p)", &dzt, &closed_form, TOL);
}

#[test]
fn kl_of_identical_logits_is_exactly_zero_with_zero_gradient() {
    let (rows, vocab) = (2, 333);
    let z = randn(40, rows * vocab, 3.0);
    for direction in DIRECTIONS {
        let options = KlOptions {
            temperature: 0.9,
            direction,
        };
        let (loss, dzt) = run_kl(&z, &z, &[1, 1], &options, 1.0);
        assert!(
            loss.iter().chain(&dzt).all(|&v| v == 0.0),
            "{direction:?}: {loss:?}"
        );
    }
}

#[test]
fn forward_and_reverse_kl_agree_to_second_order_for_nearby_distributions() {
    // KL(p‖q) and KL(q‖p) share the leading term ½·Var_p(log p − log q); they differ at O(ε³).
    let vocab = 37;
    let zb = randn(50, vocab, 1.0);
    let noise = randn(51, vocab, 1.0);
    let zt: Vec<f32> = zb.iter().zip(&noise).map(|(b, n)| b + 0.01 * n).collect();
    let losses: Vec<f64> = DIRECTIONS
        .iter()
        .map(|&direction| {
            let options = KlOptions {
                temperature: 1.0,
                direction,
            };
            let (loss, dzt) = run_kl(&zt, &zb, &[1], &options, 1.0);
            let (ztd, zbd) = (f64s(&zt), f64s(&zb));
            let want = reference::kl_loss(&ztd, &zbd, &[1], &options);
            let grad = reference::kl_backward(&ztd, &zbd, &[1], &options, 1.0);
            // f32 leaves the loss an absolute error near 1e-7: relative 1e-3 at KL ≈ 1e-4.
            assert_close(&format!("kl {direction:?} nearby loss"), &loss, &want, 1e-2);
            assert_close(&format!("kl {direction:?} nearby dzt"), &dzt, &grad, 1e-4);
            f64::from(loss[0])
        })
        .collect();
    let relative_gap = (losses[0] - losses[1]).abs() / losses[0];
    assert!(losses[0] > 0.0 && relative_gap < 0.05, "{losses:?}");
}

#[test]
fn kl_loss_is_bit_identical_across_runs() {
    let (rows, vocab) = (3, 1001);
    let zt = randn(60, rows * vocab, 2.0);
    let zb = randn(61, rows * vocab, 2.0);
    for direction in DIRECTIONS {
        let options = KlOptions {
            temperature: 1.0,
            direction,
        };
        let (la, ga) = run_kl(&zt, &zb, &[1, 0, 1], &options, 0.5);
        let (lb, gb) = run_kl(&zt, &zb, &[1, 0, 1], &options, 0.5);
        assert_bit_identical("kl_loss row_loss", &la, &lb);
        assert_bit_identical("kl_loss dzt", &ga, &gb);
    }
}
