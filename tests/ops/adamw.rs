use es2_wgpu::ops::adamw::{self, reference, AdamWStep};
use es2_wgpu::ops::grad_norm;
use es2_wgpu::rng::Rng;
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;
/// Trainable tensors of one toy model: a single element, and odd sizes within one and over
/// many workgroups.
const SIZES: [usize; 3] = [1, 37, 100_003];
const STEPS: u64 = 4;

/// One trainable tensor on the GPU and its f64 reference twin.
struct Slot {
    param: Tensor,
    m: Tensor,
    v: Tensor,
    p_ref: Vec<f64>,
    m_ref: Vec<f64>,
    v_ref: Vec<f64>,
}

impl Slot {
    /// Fresh moments (zeros) as at the first step, or non-zero ones as when resuming.
    fn new(seed: u64, n: usize, resumed: bool) -> Slot {
        let p = randn(seed, n, 1.0);
        let (m, v): (Vec<f32>, Vec<f32>) = if resumed {
            let v = randn(seed + 1, n, 0.1).iter().map(|x| x * x).collect();
            (randn(seed + 2, n, 0.1), v)
        } else {
            (vec![0.0; n], vec![0.0; n])
        };
        let gpu = gpu();
        Slot {
            param: upload(gpu, [n], &p),
            m: upload(gpu, [n], &m),
            v: upload(gpu, [n], &v),
            p_ref: f64s(&p),
            m_ref: f64s(&m),
            v_ref: f64s(&v),
        }
    }

    fn compare(&self, what: &str) {
        let n = self.p_ref.len();
        let pairs = [
            ("param", &self.param, &self.p_ref),
            ("m", &self.m, &self.m_ref),
            ("v", &self.v, &self.v_ref),
        ];
        for (name, tensor, want) in pairs {
            let got = download(gpu(), tensor);
            assert_close(&format!("{what} {name} n={n}"), &got, want, TOL);
        }
    }
}

/// Runs `STEPS` steps of clipping + AdamW over all `SIZES` tensors on the GPU (norm and updates
/// in one recorder, no readback) and on the reference, comparing after every step. Returns the
/// clip coefficients the reference applied.
fn run_steps(what: &str, config: AdamWStep, resumed: bool, grad_std: f64) -> Vec<f64> {
    let gpu = gpu();
    let mut slots: Vec<Slot> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| Slot::new(100 + 10 * i as u64, n, resumed))
        .collect();
    let mut rng = Rng::new(7);
    let mut clips = Vec::new();
    for k in 0..STEPS {
        let step = AdamWStep {
            step: config.step + k,
            ..config
        };
        let grads: Vec<Vec<f32>> = SIZES.iter().map(|&n| rng.normal_vec(n, grad_std)).collect();
        let tgrads: Vec<Tensor> = grads.iter().map(|g| upload(gpu, [g.len()], g)).collect();
        let norm_sq = poisoned(gpu, [1]);
        let mut rec = Recorder::new(gpu);
        grad_norm::grad_norm_squared(&mut rec, &tgrads.iter().collect::<Vec<_>>(), &norm_sq);
        for (slot, g) in slots.iter().zip(&tgrads) {
            adamw::adamw_step(&mut rec, &slot.param, g, &slot.m, &slot.v, &norm_sq, &step);
        }
        rec.finish().unwrap();

        let wide: Vec<Vec<f64>> = grads.iter().map(|g| f64s(g)).collect();
        let slices: Vec<&[f64]> = wide.iter().map(Vec::as_slice).collect();
        let norm_ref = grad_norm::reference::grad_norm_squared(&slices);
        clips.push(reference::clip_coefficient(norm_ref, &step));
        for (slot, g) in slots.iter_mut().zip(&wide) {
            reference::adamw_step(
                &mut slot.p_ref,
                g,
                &mut slot.m_ref,
                &mut slot.v_ref,
                norm_ref,
                &step,
            );
            slot.compare(&format!("adamw {what} step {}", step.step));
        }
        for (g, tg) in grads.iter().zip(&tgrads) {
            let after = download(gpu, tg);
            assert!(bits(g) == bits(&after), "adamw_step modified the gradient");
        }
    }
    clips
}

fn config(weight_decay: f64, max_grad_norm: f64) -> AdamWStep {
    AdamWStep {
        lr: 1e-2,
        weight_decay,
        max_grad_norm,
        ..AdamWStep::default()
    }
}

#[test]
fn adamw_matches_reference_with_weight_decay_and_no_clipping() {
    let clips = run_steps("wd, no clip", config(0.1, 0.0), false, 1.0);
    assert!(clips.iter().all(|&c| c == 1.0));
}

#[test]
fn adamw_matches_reference_with_clipping_active() {
    // ‖g‖ ≈ sqrt(100041) ≈ 316 > 50: every step clips (by about 0.16).
    let clips = run_steps("clip active", config(0.1, 50.0), false, 1.0);
    assert!(
        clips.iter().all(|&c| c < 0.5),
        "clipping should be active: {clips:?}"
    );
}

#[test]
fn adamw_matches_reference_with_clipping_inactive_and_resumed_moments() {
    // Threshold far above the norm: the coefficient clamps to 1. Moments start non-zero at
    // step 7, as after resuming from a checkpoint.
    let resumed = AdamWStep {
        step: 7,
        ..config(0.0, 1e4)
    };
    let clips = run_steps("clip inactive", resumed, true, 0.5);
    assert!(clips.iter().all(|&c| c == 1.0));
}

#[test]
fn adamw_treats_an_infinite_threshold_as_no_clipping() {
    let clips = run_steps("max norm inf", config(0.01, f64::INFINITY), false, 2.0);
    assert!(clips.iter().all(|&c| c == 1.0));
}

#[test]
fn adamw_leaves_parameters_and_moments_untouched_when_the_gradient_is_not_finite() {
    let gpu = gpu();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let slots: Vec<Slot> = SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| Slot::new(300 + 10 * i as u64, n, true))
            .collect();
        let mut grads: Vec<Vec<f32>> = SIZES.iter().map(|&n| randn(9, n, 1.0)).collect();
        // One bad element in the middle of the largest tensor poisons the global norm.
        let last = grads.len() - 1;
        let mid = grads[last].len() / 2;
        grads[last][mid] = bad;
        let tgrads: Vec<Tensor> = grads.iter().map(|g| upload(gpu, [g.len()], g)).collect();
        let norm_sq = poisoned(gpu, [1]);
        let mut rec = Recorder::new(gpu);
        grad_norm::grad_norm_squared(&mut rec, &tgrads.iter().collect::<Vec<_>>(), &norm_sq);
        let step = config(0.01, 1.0);
        for (slot, g) in slots.iter().zip(&tgrads) {
            adamw::adamw_step(&mut rec, &slot.param, g, &slot.m, &slot.v, &norm_sq, &step);
        }
        rec.finish().unwrap();
        assert!(
            !download(gpu, &norm_sq)[0].is_finite(),
            "norm of a {bad} gradient"
        );
        for slot in &slots {
            // Nothing may change: compare with the uploaded values bit for bit.
            let n = slot.p_ref.len();
            for (name, tensor, want) in [
                ("param", &slot.param, &slot.p_ref),
                ("m", &slot.m, &slot.m_ref),
                ("v", &slot.v, &slot.v_ref),
            ] {
                let got = download(gpu, tensor);
                let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
                assert!(
                    bits(&got) == bits(&want),
                    "{name} n={n} changed by a {bad} gradient"
                );
            }
        }
    }
}
