//! Evaluation-layer tests: refusal judges on known strings, the probe against scikit-learn's
//! fits, the SCAV step against its closed form, per-layer geometry against the separation
//! kernels' reference, PCA against a Jacobi eigen-decomposition, and the rendered report
//! (host-side); the shared sequence loss and its input gradient, and each attack, on a real
//! checkpoint on the GPU (`scoring`, `attacks`).

mod attacks;
mod geometry;
mod judge;
mod probe;
mod report;
mod run;
mod scoring;

/// Seeded N(0, 1) rows `[n, cols]` in f64, shifted by `offset` in every value.
fn random_rows(seed: u64, n: usize, cols: usize, offset: f64) -> Vec<f64> {
    let mut rng = es2_wgpu::rng::Rng::new(seed);
    (0..n * cols).map(|_| rng.normal() + offset).collect()
}
