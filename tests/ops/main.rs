//! Kernel tests: every op against its CPU f64 reference on seeded, odd-shaped inputs with
//! NaN-poisoned outputs; every backward also against finite differences of the reference.
//! One test binary for all families keeps link time down.

/// Norm weights near 1 (as trained norms are) but never exactly 1.
fn norm_weights(seed: u64, cols: usize) -> Vec<f32> {
    es2_wgpu::testing::randn(seed, cols, 0.2)
        .iter()
        .map(|v| 1.0 + v)
        .collect()
}

mod activation;
mod adamw;
mod attention;
mod cast;
mod cross_entropy;
mod dropout;
mod embedding;
mod grad_norm;
mod hook;
mod kl;
mod matmul;
mod pipeline_cache;
mod pool;
mod reduce;
mod residual;
mod rmsnorm;
mod rope;
mod runtime;
mod separation;
