//! GPU time of the hot kernels at the shapes of a training step of the embedded model
//! (8 sequences of 60-100 tokens, hidden 64, 4 query and 2 kv heads of dimension 16, FFN 172,
//! vocabulary 259, LoRA rank 16), and at the 0.5B benchmark shapes:
//!
//! ```sh
//! cargo run --release --example kernel_shapes [gemm|gemm-big|gemm-f16|attention|rmsnorm]
//! LP_NUM_THREADS=1 cargo run --release --example kernel_shapes   # lavapipe on one core
//! ```
//!
//! Each kernel runs 3 rounds of timestamped dispatches; the fastest time is printed (the
//! least disturbed by other load on a shared machine). Without an argument, all but gemm-big
//! and gemm-f16 (the 0.5B products that read the weight, with it in f32, then in f16 and in
//! bf16).

use es2_wgpu::ops::attention::{attention_backward, attention_forward, AttentionShape};
use es2_wgpu::ops::matmul::{gemm, Gemm, MatmulOptions};
use es2_wgpu::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use es2_wgpu::ops::Write;
use es2_wgpu::testing::{gpu, randn, upload, upload_as};
use es2_wgpu::{DType, Gpu, Recorder, Tensor};

const ROUNDS: usize = 3;

/// (M, N, K, A stored transposed, B stored transposed, accumulate).
type GemmShape = (usize, usize, usize, bool, bool, bool);

#[rustfmt::skip]
const STEP_GEMMS: [GemmShape; 10] = [
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

#[rustfmt::skip]
const BIG_GEMMS: [GemmShape; 3] = [
    (512, 4864, 896, false, true, false),  // forward
    (512, 896, 4864, false, false, false), // input gradient
    (4864, 896, 512, true, false, true),   // weight gradient
];

/// The fastest time of each dispatch `record` makes, over [`ROUNDS`] runs.
fn best_times(gpu: &Gpu, record: impl Fn(&mut Recorder)) -> Vec<(&'static str, f64)> {
    let mut best: Vec<(&'static str, f64)> = Vec::new();
    for _ in 0..ROUNDS {
        let mut rec = Recorder::timed(gpu).expect("the adapter has timestamp queries");
        record(&mut rec);
        let times = rec.finish_timed().expect("timed run");
        if best.is_empty() {
            best = times;
        } else {
            for (b, t) in best.iter_mut().zip(times) {
                b.1 = b.1.min(t.1);
            }
        }
    }
    best
}

/// Times each product with its B operand (the weight) stored as `b_dtype` (f32, f16 or
/// bf16).
fn gemms(gpu: &Gpu, shapes: &[GemmShape], b_dtype: DType) {
    let mut total = 0.0;
    for &(m, n, k, ta, tb, accumulate) in shapes {
        let options = if accumulate {
            MatmulOptions::accumulate()
        } else {
            MatmulOptions::overwrite()
        };
        let g = Gemm::dense(m, n, k, ta, tb).with(options);
        let a = upload(gpu, [m * k], &randn(1, m * k, 1.0));
        let b = upload_as(gpu, [n * k], b_dtype, &randn(2, n * k, 1.0));
        let c = Tensor::zeros(gpu, [m * n], DType::F32);
        // All dispatches of the call (a split K adds the sum of the partial products).
        let times = best_times(gpu, |rec| gemm(rec, &g, &a, &b, None, &c));
        let seconds: f64 = times.iter().map(|t| t.1).sum();
        total += seconds;
        let gflops = 2.0 * (m * n * k) as f64 / seconds * 1e-9;
        let layout = format!(
            "{}{}",
            if ta { "Aᵀ" } else { "A" },
            if tb { "·Bᵀ" } else { "·B" }
        );
        println!(
            "gemm {m:5} x {n:5} x {k:5} {layout:6} B {b_dtype} {:9.3} ms {gflops:7.2} GFLOP/s",
            seconds * 1e3
        );
    }
    println!("gemm total {:.3} ms", total * 1e3);
}

fn attention(gpu: &Gpu) {
    let cases = [
        (
            AttentionShape::training(8, 100, 4, 2, 16),
            vec![100, 61, 83, 70, 95, 64, 77, 88],
        ),
        (AttentionShape::training(1, 256, 8, 2, 64), vec![256]),
    ];
    for (shape, lens) in cases {
        let s = &shape;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let q_numel: usize = s.q_dims().iter().product();
        let kv_numel: usize = s.kv_dims().iter().product();
        let q = upload(gpu, s.q_dims(), &randn(1, q_numel, 1.0));
        let k = upload(gpu, s.kv_dims(), &randn(2, kv_numel, 1.0));
        let v = upload(gpu, s.kv_dims(), &randn(3, kv_numel, 1.0));
        let dout = upload(gpu, s.q_dims(), &randn(4, q_numel, 1.0));
        let seq_lens = Tensor::from_u32(gpu, [s.batch], &lens).expect("upload");
        let empty = |dims: &[usize]| Tensor::empty(gpu, dims.to_vec(), DType::F32);
        let (out, lse) = (empty(&s.q_dims()), empty(&s.lse_dims()));
        let (dq, dk, dv) = (empty(&s.q_dims()), empty(&s.kv_dims()), empty(&s.kv_dims()));
        let times = best_times(gpu, |rec| {
            attention_forward(rec, s, &q, &k, &v, &seq_lens, &out, &lse, scale);
            #[rustfmt::skip]
            attention_backward(rec, s, &q, &k, &v, &out, &lse, &dout, &seq_lens, &dq, &dk, &dv, scale);
        });
        let name = format!(
            "B={} T={} Hq={} Hkv={} D={}",
            s.batch, s.q_len, s.n_heads, s.n_kv_heads, s.head_dim
        );
        for (entry, seconds) in times {
            println!("{entry:32} {name:26} {:9.3} ms", seconds * 1e3);
        }
    }
}

fn rmsnorm(gpu: &Gpu) {
    for (rows, cols) in [(1104, 64), (512, 896)] {
        let x = upload(gpu, [rows, cols], &randn(1, rows * cols, 1.0));
        let w = upload(gpu, [cols], &randn(2, cols, 1.0));
        let dy = upload(gpu, [rows, cols], &randn(3, rows * cols, 1.0));
        let (y, dx) = (
            Tensor::empty(gpu, [rows, cols], DType::F32),
            Tensor::zeros(gpu, [rows, cols], DType::F32),
        );
        let rstd = Tensor::empty(gpu, [rows], DType::F32);
        let dw = Tensor::zeros(gpu, [cols], DType::F32);
        let times = best_times(gpu, |rec| {
            rmsnorm_forward(rec, &x, &w, &y, &rstd, 1e-5);
            rmsnorm_backward(rec, &x, &w, &rstd, &dy, &dx, Some(&dw), Write::Accumulate);
        });
        for (entry, seconds) in times {
            println!("{entry:32} {rows:5} x {cols:4} {:9.3} ms", seconds * 1e3);
        }
    }
}

fn main() {
    let gpu = gpu();
    let which = std::env::args().nth(1).unwrap_or_default();
    let all = which.is_empty();
    if all || which == "gemm" {
        gemms(gpu, &STEP_GEMMS, DType::F32);
    }
    if which == "gemm-big" {
        gemms(gpu, &BIG_GEMMS, DType::F32);
    }
    if which == "gemm-f16" {
        // The forward and the input gradient: the products that read a frozen weight.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            gemms(gpu, &BIG_GEMMS[..2], dtype);
        }
    }
    if all || which == "attention" {
        attention(gpu);
    }
    if all || which == "rmsnorm" {
        rmsnorm(gpu);
    }
}
