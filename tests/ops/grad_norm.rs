use es2_wgpu::ops::grad_norm::{self, reference};
use es2_wgpu::testing::*;
use es2_wgpu::{Recorder, Tensor};

const TOL: f64 = 1e-5;

/// Gradients of odd sizes (and a size 1), each with its own scale, seeded from `seed`.
fn gradients(seed: u64, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| randn(seed + i as u64, n, 0.01 * 4f64.powi(i as i32 % 5)))
        .collect()
}

fn norm_on_gpu(tensors: &[Tensor]) -> f32 {
    let gpu = gpu();
    let out = poisoned(gpu, [1]);
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let mut rec = Recorder::new(gpu);
    grad_norm::grad_norm_squared(&mut rec, &refs, &out);
    rec.finish().unwrap();
    download(gpu, &out)[0]
}

fn upload_all(grads: &[Vec<f32>]) -> Vec<Tensor> {
    grads.iter().map(|g| upload(gpu(), [g.len()], g)).collect()
}

#[test]
fn grad_norm_squared_matches_reference_over_many_odd_tensors() {
    // One tensor of one element; a few tensors inside one block; many tensors, one spanning
    // more blocks than one stage of sum_rows takes (two-stage final sum).
    let cases: [&[usize]; 3] = [
        &[1],
        &[37, 1, 333, 4095, 4096, 4097],
        &[101, 1, 100_003, 37, 300_007, 2049, 7, 65_537],
    ];
    for (case, sizes) in cases.iter().enumerate() {
        let grads = gradients(10 * case as u64 + 1, sizes);
        let got = norm_on_gpu(&upload_all(&grads));
        let wide: Vec<Vec<f64>> = grads.iter().map(|g| f64s(g)).collect();
        let slices: Vec<&[f64]> = wide.iter().map(Vec::as_slice).collect();
        let want = reference::grad_norm_squared(&slices);
        assert_close(
            &format!("grad_norm_squared {} tensors", sizes.len()),
            &[got],
            &[want],
            TOL,
        );
    }
}

#[test]
fn grad_norm_squared_of_no_gradients_is_zero() {
    assert_eq!(norm_on_gpu(&[]), 0.0);
}

#[test]
fn grad_norm_squared_is_bit_identical_across_runs() {
    let tensors = upload_all(&gradients(40, &[100_003, 37, 1, 300_007]));
    let (a, b) = (norm_on_gpu(&tensors), norm_on_gpu(&tensors));
    assert_eq!(a.to_bits(), b.to_bits());
}
