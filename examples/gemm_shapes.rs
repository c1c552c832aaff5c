//! GPU time and GFLOP/s of the GEMMs of a training step of the embedded model (M ≈ 600 token
//! rows, hidden 64, FFN 172, vocabulary 259, LoRA rank 16), or with `big` of the 0.5B
//! benchmark shapes (M = 512, N = 4864, K = 896) in the three layouts of a linear layer:
//!
//! ```sh
//! cargo run --release --example gemm_shapes [big]
//! LP_NUM_THREADS=1 cargo run --release --example gemm_shapes   # lavapipe on one core: steadier
//! ```
//!
//! Each shape runs 3 rounds of 3 timestamped dispatches; the fastest is printed (the least
//! disturbed by other load on a shared machine).

use es2_wgpu::ops::matmul::{gemm, Gemm, MatmulOptions};
use es2_wgpu::testing::{gpu, randn, upload};
use es2_wgpu::{DType, Recorder, Tensor};

/// (M, N, K, A stored transposed, B stored transposed, accumulate).
type Shape = (usize, usize, usize, bool, bool, bool);

const STEP_SHAPES: [Shape; 10] = [
    (592, 64, 64, false, true, false),   // q/o projection
    (592, 172, 64, false, true, false),  // gate/up projection
    (592, 32, 64, false, true, false),   // k/v projection
    (592, 16, 64, false, true, false),   // LoRA down
    (592, 64, 16, false, false, true),   // LoRA up, added to the output
    (592, 64, 172, false, false, false), // down projection's input gradient
    (16, 64, 592, true, false, true),    // LoRA A gradient
    (64, 16, 592, true, false, true),    // LoRA B gradient
    (172, 16, 592, true, false, true),   // LoRA B gradient of gate/up
    (592, 259, 64, false, true, false),  // logits
];

const BIG_SHAPES: [Shape; 3] = [
    (512, 4864, 896, false, true, false),  // forward
    (512, 896, 4864, false, false, false), // input gradient
    (4864, 896, 512, true, false, true),   // weight gradient
];

const ROUNDS: usize = 3;
const REPS: usize = 3;

fn main() {
    let gpu = gpu();
    let big = std::env::args().nth(1).is_some_and(|a| a == "big");
    let shapes: &[Shape] = if big { &BIG_SHAPES } else { &STEP_SHAPES };
    let mut total = 0.0;
    for &(m, n, k, ta, tb, accumulate) in shapes {
        let options = if accumulate {
            MatmulOptions::accumulate()
        } else {
            MatmulOptions::overwrite()
        };
        let g = Gemm::dense(m, n, k, ta, tb).with(options);
        let a = upload(gpu, [m * k], &randn(1, m * k, 1.0));
        let b = upload(gpu, [n * k], &randn(2, n * k, 1.0));
        let c = Tensor::zeros(gpu, [m * n], DType::F32);
        let mut best = f64::INFINITY;
        for _ in 0..ROUNDS {
            let mut rec = Recorder::timed(gpu).expect("the adapter has timestamp queries");
            for _ in 0..REPS {
                gemm(&mut rec, &g, &a, &b, None, &c);
            }
            let times = rec.finish_timed().expect("timed run");
            best = times.iter().map(|t| t.1).fold(best, f64::min);
        }
        total += best;
        let gflops = 2.0 * (m * n * k) as f64 / best * 1e-9;
        let layout = format!(
            "{}{}",
            if ta { "Aᵀ" } else { "A" },
            if tb { "·Bᵀ" } else { "·B" }
        );
        println!(
            "{m:5} x {n:5} x {k:5} {layout:6} {:9.3} ms {gflops:7.2} GFLOP/s",
            best * 1e3
        );
    }
    println!("total {:.3} ms", total * 1e3);
}
