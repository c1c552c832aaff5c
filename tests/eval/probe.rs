use std::path::PathBuf;

use es2_wgpu::eval::probe::{inverse_sigmoid, sigmoid, Probe, ProbeOptions};
use es2_wgpu::eval::Rows;
use es2_wgpu::testing::rel_error_f64;
use safetensors::SafeTensors;
use serde_json::Value;

use super::random_rows;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/probe")
}

/// One case of `scripts/make_probe_fixtures.py`: rows by split and class, and scikit-learn's
/// default fit and fit to convergence.
struct Case {
    name: String,
    cols: usize,
    train: [Vec<f64>; 2],
    test: [Vec<f64>; 2],
    default: Value,
    converged: Value,
}

impl Case {
    fn rows<'a>(&self, split: &'a [Vec<f64>; 2]) -> (Rows<'a>, Rows<'a>) {
        let rows = |i: usize| Rows::new(&split[i], self.cols).expect("fixture rows");
        (rows(0), rows(1))
    }
}

fn load_cases() -> Vec<Case> {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("probe.json")).expect("probe.json"),
    )
    .expect("probe.json parses");
    let bytes = std::fs::read(fixtures().join("probe.safetensors")).expect("probe.safetensors");
    let tensors = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let read = |name: &str| -> Vec<f64> {
        let t = tensors.tensor(name).expect("fixture tensor");
        t.data()
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    };
    let cases = meta["cases"].as_object().expect("cases");
    cases
        .iter()
        .map(|(name, case)| {
            let split = |s: &str| {
                [
                    read(&format!("{name}.{s}.harmful")),
                    read(&format!("{name}.{s}.harmless")),
                ]
            };
            Case {
                name: name.clone(),
                cols: case["cols"].as_u64().expect("cols") as usize,
                train: split("train"),
                test: split("test"),
                default: case["default"].clone(),
                converged: case["converged"].clone(),
            }
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn held_out_accuracy_agrees_with_scikit_learn_within_two_points() {
    let cases = load_cases();
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let (h, s) = case.rows(&case.train);
        let probe = Probe::fit(h, s, &ProbeOptions::default()).unwrap();
        assert!(
            probe.converged,
            "{}: {} iterations",
            case.name, probe.iterations
        );
        let (th, ts) = case.rows(&case.test);
        let ours = probe.accuracy(th, ts);
        let sklearn = case.default["test_accuracy"].as_f64().unwrap();
        let optimum = case.converged["test_accuracy"].as_f64().unwrap();
        let coef_error = rel_error_f64(&probe.weights, &floats(&case.converged["coef"]));
        let bias = case.converged["intercept"].as_f64().unwrap();
        eprintln!(
            "probe {}: held-out accuracy {ours:.3}, scikit-learn default {sklearn:.3} \
             (converged fit {optimum:.3}); ||w - w_sk||/||w_sk|| = {coef_error:.2e}, \
             b {:.6} vs {bias:.6}; {} iterations",
            case.name, probe.bias, probe.iterations
        );
        assert!(
            (ours - sklearn).abs() <= 0.02,
            "{}: held-out accuracy {ours} vs scikit-learn's {sklearn}",
            case.name
        );
        // Both minimise the same strictly convex objective: the same optimum.
        assert!(
            coef_error < 1e-5,
            "{}: coefficients differ by {coef_error:.2e}",
            case.name
        );
        assert!(
            (probe.bias - bias).abs() < 1e-5 * (1.0 + bias.abs()),
            "{}",
            case.name
        );
        let train_accuracy = probe.accuracy(h, s);
        let sk_train = case.converged["train_accuracy"].as_f64().unwrap();
        assert!((train_accuracy - sk_train).abs() <= 0.01, "{}", case.name);
    }
}

#[test]
fn fitting_is_deterministic() {
    let (h, s) = (random_rows(1, 40, 9, 0.3), random_rows(2, 33, 9, -0.3));
    let fit = || {
        Probe::fit(
            Rows::new(&h, 9).unwrap(),
            Rows::new(&s, 9).unwrap(),
            &ProbeOptions::default(),
        )
        .unwrap()
    };
    let (a, b) = (fit(), fit());
    let bits = |p: &Probe| {
        p.weights
            .iter()
            .chain([&p.bias])
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn a_smaller_c_shrinks_the_weights() {
    let (h, s) = (random_rows(3, 50, 7, 0.5), random_rows(4, 50, 7, -0.5));
    let (h, s) = (Rows::new(&h, 7).unwrap(), Rows::new(&s, 7).unwrap());
    let norm = |c: f64| {
        let options = ProbeOptions {
            c,
            ..ProbeOptions::default()
        };
        let p = Probe::fit(h, s, &options).unwrap();
        p.weights.iter().map(|w| w * w).sum::<f64>().sqrt()
    };
    let (loose, tight) = (norm(10.0), norm(0.01));
    assert!(tight < 0.2 * loose, "C=0.01: ‖w‖ {tight}, C=10: {loose}");
}

#[test]
fn scav_step_lands_on_the_target_probability() {
    let case = load_cases()
        .into_iter()
        .find(|c| c.name == "embedding-like")
        .unwrap();
    let (h, s) = case.rows(&case.train);
    let probe = Probe::fit(h, s, &ProbeOptions::default()).unwrap();
    let (test_h, _) = case.rows(&case.test);
    let w_norm = probe.weights.iter().map(|w| w * w).sum::<f64>().sqrt();
    let mut moved = 0;
    for p0 in [1e-3, 1e-2, 5e-2] {
        for e in test_h.iter().filter(|e| probe.prob(e) > p0) {
            let epsilon = probe.scav_epsilon(e, p0).unwrap();
            let step = probe.scav_step(e, p0).unwrap();
            assert!(epsilon < 0.0, "P > P0 means a step against w");
            let step_norm = step.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((step_norm - epsilon.abs()).abs() <= 1e-9 * step_norm);
            let along: f64 = step.iter().zip(&probe.weights).map(|(a, b)| a * b).sum();
            assert!(
                (along / (step_norm * w_norm) + 1.0).abs() < 1e-12,
                "δ is along −w"
            );
            let after: Vec<f64> = e.iter().zip(&step).map(|(x, d)| x + d).collect();
            assert!(
                (probe.prob(&after) - p0).abs() <= 1e-12,
                "f64: P {} vs {p0}",
                probe.prob(&after)
            );
            // As the GPU applies it: the hidden state and the step in f32.
            let after_f32: Vec<f64> = e
                .iter()
                .zip(&step)
                .map(|(x, d)| f64::from(*x as f32 + *d as f32))
                .collect();
            let p = probe.prob(&after_f32);
            assert!(
                (p - p0).abs() <= 1e-4,
                "f32: P after the step {p} vs P0 {p0}"
            );
            moved += 1;
        }
    }
    assert!(moved > 100, "only {moved} rows were above P0");
}

#[test]
fn sigmoid_and_its_inverse_round_trip_without_overflow() {
    for p in [1e-9, 1e-3, 0.5, 0.95, 1.0 - 1e-9] {
        let z = inverse_sigmoid(p).unwrap();
        assert!((sigmoid(z) - p).abs() <= 1e-12 * p.max(1e-3), "{p}");
    }
    assert_eq!(sigmoid(-800.0), 0.0);
    assert_eq!(sigmoid(800.0), 1.0);
    for bad in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(inverse_sigmoid(bad).is_err(), "{bad}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (h, s) = (random_rows(5, 6, 4, 0.0), random_rows(6, 6, 4, 0.0));
    fn rows(d: &[f64], c: usize) -> Rows<'_> {
        Rows::new(d, c).unwrap()
    }
    let options = ProbeOptions::default();
    let empty = Probe::fit(rows(&h, 4), rows(&[], 4), &options).unwrap_err();
    assert!(empty.to_string().contains("both groups"), "{empty}");
    let narrow = Probe::fit(rows(&h, 4), rows(&s[..18], 3), &options).unwrap_err();
    assert!(narrow.to_string().contains("values"), "{narrow}");
    let mut poisoned = s.clone();
    poisoned[7] = f64::NAN;
    let nan = Probe::fit(rows(&h, 4), rows(&poisoned, 4), &options).unwrap_err();
    assert!(nan.to_string().contains("non-finite"), "{nan}");
    let bad_c = ProbeOptions { c: 0.0, ..options };
    assert!(Probe::fit(rows(&h, 4), rows(&s, 4), &bad_c).is_err());
    assert!(Rows::new(&h, 5).is_err() && Rows::new(&h, 0).is_err());
    let probe = Probe::fit(rows(&h, 4), rows(&s, 4), &options).unwrap();
    assert!(probe.scav_step(&h[..4], 1.0).is_err());
    let zero = Probe {
        weights: vec![0.0; 4],
        ..probe
    };
    assert!(zero.scav_epsilon(&h[..4], 0.01).is_err());
}
