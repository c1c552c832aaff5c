//! GPU time of attention forward and backward at the shape of a training step of the
//! embedded model (8 sequences of 60-100 tokens, 4 query heads and 2 kv heads of dimension
//! 16), and at the 0.5B benchmark shape (256 tokens, 8 and 2 heads of dimension 64):
//!
//! ```sh
//! cargo run --release --example attention_shapes
//! LP_NUM_THREADS=1 cargo run --release --example attention_shapes   # lavapipe on one core
//! ```
//!
//! Each shape runs 3 rounds; the fastest time of each kernel is printed.

use es2_wgpu::ops::attention::{attention_backward, attention_forward, AttentionShape};
use es2_wgpu::testing::{gpu, randn, upload};
use es2_wgpu::{DType, Recorder, Tensor};

const ROUNDS: usize = 3;

fn main() {
    let gpu = gpu();
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
        let empty_q = || Tensor::empty(gpu, s.q_dims(), DType::F32);
        let empty_kv = || Tensor::empty(gpu, s.kv_dims(), DType::F32);
        let (out, lse) = (empty_q(), Tensor::empty(gpu, s.lse_dims(), DType::F32));
        let (dq, dk, dv) = (empty_q(), empty_kv(), empty_kv());
        let mut best: Vec<(&str, f64)> = Vec::new();
        for _ in 0..ROUNDS {
            let mut rec = Recorder::timed(gpu).expect("the adapter has timestamp queries");
            attention_forward(&mut rec, s, &q, &k, &v, &seq_lens, &out, &lse, scale);
            #[rustfmt::skip]
            attention_backward(&mut rec, s, &q, &k, &v, &out, &lse, &dout, &seq_lens, &dq, &dk, &dv, scale);
            let times = rec.finish_timed().expect("timed run");
            if best.is_empty() {
                best = times;
            } else {
                for (b, t) in best.iter_mut().zip(times) {
                    b.1 = b.1.min(t.1);
                }
            }
        }
        println!(
            "B={} T={} Hq={} Hkv={} D={}:",
            s.batch, s.q_len, s.n_heads, s.n_kv_heads, s.head_dim
        );
        for (entry, seconds) in best {
            println!("  {entry:32} {:9.3} ms", seconds * 1e3);
        }
    }
}
