use es2_wgpu::ops::cross_entropy::{self, reference, IGNORE};
use es2_wgpu::testing::*;
use es2_wgpu::{Gpu, Recorder, Tensor};

const TOL: f64 = 1e-5;

/// `(loss, dlogits, loss from the forward-only kernel, the same through the row-part launcher)`.
fn run(gpu: &Gpu, vocab: usize, logits: &[f32], targets: &[u32], scale: f32) -> [Vec<f32>; 4] {
    let rows = targets.len();
    let tz = upload(gpu, [rows, vocab], logits);
    let tt = Tensor::from_u32(gpu, [rows], targets).unwrap();
    let (loss, dlogits, eval_loss, parts_loss) = (
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows, vocab]),
        poisoned(gpu, [rows]),
        poisoned(gpu, [rows]),
    );
    let mut rec = Recorder::new(gpu);
    cross_entropy::cross_entropy(&mut rec, &tz, &tt, &loss, &dlogits, scale);
    cross_entropy::cross_entropy_loss(&mut rec, &tz, &tt, &eval_loss);
    cross_entropy::cross_entropy_loss_in_parts(&mut rec, &tz, &tt, &parts_loss);
    rec.finish().unwrap();
    [&loss, &dlogits, &eval_loss, &parts_loss].map(|t| download(gpu, t))
}

fn check(name: &str, vocab: usize, logits: &[f32], targets: &[u32], scale: f32) {
    let [loss, dlogits, eval_loss, parts_loss] = run(gpu(), vocab, logits, targets, scale);
    let z = f64s(logits);
    let loss_ref = reference::cross_entropy_loss(&z, targets, vocab);
    let grad_ref = reference::cross_entropy_grad(&z, targets, vocab, f64::from(scale));
    assert_close(&format!("cross_entropy loss {name}"), &loss, &loss_ref, TOL);
    assert_close(
        &format!("cross_entropy dlogits {name}"),
        &dlogits,
        &grad_ref,
        TOL,
    );
    assert_close(
        &format!("cross_entropy_loss (forward only) {name}"),
        &eval_loss,
        &loss_ref,
        TOL,
    );
    assert_close(
        &format!("cross_entropy_loss_in_parts {name}"),
        &parts_loss,
        &loss_ref,
        TOL,
    );
    // Ignored rows are exactly zero, not merely small.
    for (row, _) in targets.iter().enumerate().filter(|(_, &t)| t == IGNORE) {
        assert_eq!(loss[row], 0.0, "{name}: loss of ignored row {row}");
        let grads = &dlogits[row * vocab..(row + 1) * vocab];
        assert!(
            grads.iter().all(|&g| g == 0.0),
            "{name}: dlogits of row {row}"
        );
    }
}

#[test]
fn cross_entropy_matches_reference_from_one_logit_to_a_vocabulary() {
    // Targets at the first and last index, ignored rows, and one random target per case.
    let cases: [(usize, Vec<u32>); 3] = [
        (1, vec![0, IGNORE, 0]),
        (37, vec![0, 36, IGNORE, 17, 5, 36]),
        (32_000, vec![0, 31_999, IGNORE, 12_345]),
    ];
    for (seed, (vocab, targets)) in (1u64..).zip(cases) {
        let logits = randn(seed, targets.len() * vocab, 3.0);
        check(&format!("V={vocab}"), vocab, &logits, &targets, 0.25);
    }
}

#[test]
fn cross_entropy_is_stable_for_large_logits() {
    let vocab = 333;
    let mut logits = randn(4, 4 * vocab, 40.0);
    // Row 0: the target at +80 (a small loss); row 1: the target at −80 (a loss of order 160);
    // rows 2 and 3: targets at the ends of logits of spread 40.
    logits[7] = 80.0;
    logits[vocab + 9] = -80.0;
    check("large", vocab, &logits, &[7, 9, 0, 332], 1.0);
}

#[test]
fn cross_entropy_reference_gradient_matches_finite_differences() {
    let (vocab, targets) = (37, [3u32, IGNORE, 0, 36]);
    let z = f64s(&randn(5, targets.len() * vocab, 2.0));
    let scale = 0.5;
    let total = |zz: &[f64]| {
        scale
            * reference::cross_entropy_loss(zz, &targets, vocab)
                .iter()
                .sum::<f64>()
    };
    assert_gradient(
        "cross_entropy dlogits",
        &reference::cross_entropy_grad(&z, &targets, vocab, scale),
        &finite_difference(total, &z, 1e-5),
        1e-7,
    );
}

#[test]
fn cross_entropy_gradient_is_bit_identical_across_runs() {
    let gpu = gpu();
    let (vocab, targets) = (32_000, [1u32, 31_999, IGNORE]);
    let logits = randn(6, targets.len() * vocab, 3.0);
    let first = run(gpu, vocab, &logits, &targets, 0.5);
    let second = run(gpu, vocab, &logits, &targets, 0.5);
    assert_bit_identical("cross_entropy loss", &first[0], &second[0]);
    assert_bit_identical("cross_entropy dlogits", &first[1], &second[1]);
    // The forward-only kernel computes the loss with the same code, hence the same bits.
    assert_bit_identical("cross_entropy_loss vs cross_entropy", &first[0], &first[2]);
}
