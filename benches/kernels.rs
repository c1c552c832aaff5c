//! Criterion benchmarks of the kernels at the shapes of a 0.5B model (Qwen2.5-0.5B: hidden
//! 896, MLP 4864, head dim 64). See BENCHMARKS.md for how to run them and how the work of
//! each is counted.
//!
//! One iteration records the dispatches of one call into a [`Recorder`], submits and waits, so
//! the wall time is the GPU time plus a fixed submit overhead (which dominates small kernels
//! on a fast GPU). All tensors are allocated and uploaded before the measurement. Where the
//! adapter has timestamp queries, each benchmark also prints (once, to stderr) its GPU-side
//! time and the rate derived from it, as `gpu-time GROUP/ID: ...`.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use es2_wgpu::ops::attention::{attention_backward, attention_forward, AttentionShape};
use es2_wgpu::ops::kl::{kl_loss, KlOptions};
use es2_wgpu::ops::matmul::{
    matmul_backward_input, matmul_backward_weight, matmul_forward, MatmulOptions,
};
use es2_wgpu::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use es2_wgpu::ops::separation::{
    separation_loss, Pair, SeparationInputs, SeparationOptions, SeparationOutputs,
};
use es2_wgpu::ops::Write;
use es2_wgpu::testing::{gpu, randn, upload};
use es2_wgpu::{DType, Gpu, Recorder, Tensor};

/// Tokens in a batch (rows of the activations).
const TOKENS: usize = 512;
/// Hidden size of the model.
const HIDDEN: usize = 896;
/// Width of the MLP (the largest matmul of a layer).
const MLP: usize = 4864;
/// Bytes of one f32.
const F32: u64 = 4;

/// Few samples and short windows: on lavapipe one 512×896×4864 matmul takes about a second,
/// and `cargo bench` should finish in a few minutes there.
const SAMPLES: usize = 10;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);
/// Timestamp-timed runs per benchmark; the median is printed.
const TIMED_RUNS: usize = 3;

/// The work of one iteration, the numerator of its throughput.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Floating-point operations; criterion prints them as elem/s, read FLOP/s.
    Flops(u64),
    /// Bytes read and written.
    Bytes(u64),
}

impl Work {
    fn throughput(self) -> Throughput {
        match self {
            Work::Flops(flops) => Throughput::Elements(flops),
            // Decimal, so that criterion's GB/s and the timestamp line's GB/s agree.
            Work::Bytes(bytes) => Throughput::BytesDecimal(bytes),
        }
    }

    /// The rate at `seconds` per iteration, e.g. "12.34 GFLOP/s".
    fn rate(self, seconds: f64) -> String {
        match self {
            Work::Flops(flops) => format!("{:.2} GFLOP/s", flops as f64 / seconds * 1e-9),
            Work::Bytes(bytes) => format!("{:.2} GB/s", bytes as f64 / seconds * 1e-9),
        }
    }
}

/// One criterion group (one unit of throughput per group name, e.g. `matmul_gflops`).
struct Suite<'c> {
    name: &'static str,
    group: BenchmarkGroup<'c, WallTime>,
}

impl<'c> Suite<'c> {
    fn new(c: &'c mut Criterion, name: &'static str) -> Self {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(SAMPLES)
            .warm_up_time(WARM_UP)
            .measurement_time(MEASUREMENT);
        Suite { name, group }
    }

    /// Benchmarks the dispatches that `record` adds to a recorder. The GPU-side time is
    /// measured inside the routine so that a benchmark a filter skips costs nothing.
    fn bench(&mut self, id: &str, work: Work, record: impl Fn(&mut Recorder)) {
        let gpu = gpu();
        let name = format!("{}/{id}", self.name);
        let mut reported = false;
        self.group.throughput(work.throughput());
        self.group.bench_function(id, |b| {
            if !reported {
                reported = true;
                report_gpu_time(gpu, &name, work, &record);
            }
            b.iter(|| run(gpu, &record));
        });
    }

    fn finish(self) {
        self.group.finish();
    }
}

/// Records, submits and waits for one iteration.
fn run(gpu: &Gpu, record: &impl Fn(&mut Recorder)) {
    let mut rec = Recorder::new(gpu);
    record(&mut rec);
    rec.finish().expect("the benchmarked work completes");
}

/// Prints the median GPU-side time of one iteration (the sum over its dispatches, listed when
/// there are several) and the rate it gives, when the adapter has timestamp queries.
fn report_gpu_time(gpu: &Gpu, name: &str, work: Work, record: &impl Fn(&mut Recorder)) {
    // The first run builds the pipelines; it is not timed.
    run(gpu, record);
    let mut runs = Vec::with_capacity(TIMED_RUNS);
    for _ in 0..TIMED_RUNS {
        let Some(mut rec) = Recorder::timed(gpu) else {
            return;
        };
        record(&mut rec);
        let dispatches = rec.finish_timed().expect("timestamps read back");
        let total: f64 = dispatches.iter().map(|&(_, seconds)| seconds).sum();
        runs.push((total, dispatches));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, dispatches) = &runs[runs.len() / 2];
    let breakdown = if dispatches.len() > 1 {
        let each: Vec<String> = dispatches
            .iter()
            .map(|(entry, s)| format!("{entry} {:.3} ms", s * 1e3))
            .collect();
        format!(" = {}", each.join(" + "))
    } else {
        String::new()
    };
    eprintln!(
        "gpu-time {name}: {:.3} ms{breakdown}, {} (median of {TIMED_RUNS} timestamped runs)",
        seconds * 1e3,
        work.rate(*seconds)
    );
}

/// Seeded N(0, std²) data uploaded as an f32 tensor.
fn random(gpu: &Gpu, seed: u64, dims: &[usize], std: f64) -> Tensor {
    let n = dims.iter().product();
    upload(gpu, dims, &randn(seed, n, std))
}

fn constant(gpu: &Gpu, dims: &[usize], value: f32) -> Tensor {
    let n: usize = dims.iter().product();
    upload(gpu, dims, &vec![value; n])
}

/// `Y = X·Wᵀ`, `dX = dY·W` and `dW += dYᵀ·X` for the MLP's up projection: 512 tokens, 896 in,
/// 4864 out. Each is 2·M·N·K FLOPs.
fn matmul(c: &mut Criterion) {
    let gpu = gpu();
    let (m, k, n) = (TOKENS, HIDDEN, MLP);
    let x = random(gpu, 1, &[m, k], 1.0);
    let w = random(gpu, 2, &[n, k], 0.03);
    let dy = random(gpu, 3, &[m, n], 1.0);
    let y = Tensor::empty(gpu, [m, n], DType::F32);
    let dx = Tensor::empty(gpu, [m, k], DType::F32);
    let dw = random(gpu, 4, &[n, k], 0.01);

    let work = Work::Flops(2 * (m * n * k) as u64);
    let shape = format!("{m}x{k}x{n}");
    let mut suite = Suite::new(c, "matmul_gflops");
    suite.bench(&format!("forward_{shape}"), work, |rec| {
        matmul_forward(rec, &x, &w, None, &y, MatmulOptions::overwrite());
    });
    suite.bench(&format!("backward_input_{shape}"), work, |rec| {
        matmul_backward_input(rec, &dy, &w, &dx, MatmulOptions::overwrite());
    });
    suite.bench(&format!("backward_weight_{shape}"), work, |rec| {
        matmul_backward_weight(rec, &dy, &x, &dw, MatmulOptions::accumulate());
    });
    suite.finish();
}

/// Causal grouped-query attention, batch 1, 256 tokens, 8 query heads, 2 kv heads, head dim 64.
fn attention(c: &mut Criterion) {
    let gpu = gpu();
    let shape = AttentionShape::training(1, 256, 8, 2, 64);
    let q = random(gpu, 10, &shape.q_dims(), 1.0);
    let k = random(gpu, 11, &shape.kv_dims(), 1.0);
    let v = random(gpu, 12, &shape.kv_dims(), 1.0);
    let dout = random(gpu, 13, &shape.q_dims(), 1.0);
    let seq_lens = Tensor::from_u32(gpu, [shape.batch], &[shape.q_len as u32; 1])
        .expect("one sequence length per batch entry");
    let out = Tensor::empty(gpu, shape.q_dims(), DType::F32);
    let lse = Tensor::empty(gpu, shape.lse_dims(), DType::F32);
    let (dq, dk, dv) = (
        Tensor::empty(gpu, shape.q_dims(), DType::F32),
        Tensor::empty(gpu, shape.kv_dims(), DType::F32),
        Tensor::empty(gpu, shape.kv_dims(), DType::F32),
    );
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let forward = |rec: &mut Recorder| {
        attention_forward(rec, &shape, &q, &k, &v, &seq_lens, &out, &lse, scale);
    };
    // The backward reads the forward's `out` and `lse`.
    run(gpu, &forward);

    // Per head, q·kᵀ and p·v are 2·T²·D FLOPs each at full size; the causal mask halves
    // both: forward = 2·2·B·H·T²·D / 2. The backward's nominal five products (recomputed
    // q·kᵀ, dv = pᵀ·dout, dp = dout·vᵀ, dq = ds·k, dk = dsᵀ·q) make it 2.5× the forward; the
    // kernels recompute p and dp once more for the separate dk/dv pass, which is not counted.
    let (b, h, t, d) = (shape.batch, shape.n_heads, shape.q_len, shape.head_dim);
    let forward_flops = (2 * 2 * b * h * t * t * d / 2) as u64;
    let backward_flops = forward_flops * 5 / 2;
    let id = format!("b{b}_t{t}_h{h}_kv{}_d{d}", shape.n_kv_heads);
    let mut suite = Suite::new(c, "attention_gflops");
    suite.bench(
        &format!("forward_{id}"),
        Work::Flops(forward_flops),
        forward,
    );
    suite.bench(
        &format!("backward_{id}"),
        Work::Flops(backward_flops),
        |rec| {
            attention_backward(
                rec, &shape, &q, &k, &v, &out, &lse, &dout, &seq_lens, &dq, &dk, &dv, scale,
            );
        },
    );
    suite.finish();
}

/// The fused KL loss and gradient over 64 rows of a 32,000-token vocabulary.
fn kl(c: &mut Criterion) {
    let gpu = gpu();
    let (rows, vocab) = (64, 32_000);
    let zt = random(gpu, 20, &[rows, vocab], 2.0);
    let zb = random(gpu, 21, &[rows, vocab], 2.0);
    let mask = Tensor::from_u32(gpu, [rows], &vec![1; rows]).expect("one mask entry per row");
    let row_loss = Tensor::empty(gpu, [rows], DType::F32);
    let dzt = Tensor::empty(gpu, [rows, vocab], DType::F32);

    // Both logit tensors are read twice (statistics, then gradient) and the gradient written
    // once; the mask and row losses are negligible.
    let logits = (rows * vocab) as u64 * F32;
    let work = Work::Bytes(2 * 2 * logits + logits);
    let mut suite = Suite::new(c, "kl_bandwidth");
    suite.bench(&format!("loss_and_grad_{rows}x{vocab}"), work, |rec| {
        kl_loss(
            rec,
            &zt,
            &zb,
            &mask,
            &row_loss,
            &dzt,
            &KlOptions::default(),
            1.0 / rows as f32,
        );
    });
    suite.finish();
}

/// The fused separation loss and its gradients: 8 layers, 8 harmful and 8 harmless prompts,
/// 896 channels, l2 distance, hinge with a margin that keeps every gradient flowing.
fn separation(c: &mut Criterion) {
    let gpu = gpu();
    let (layers, n_h, n_s, cols) = (8, 8, 8, HIDDEN);
    let harmful = random(gpu, 30, &[layers, n_h, cols], 1.0);
    let harmless = random(gpu, 31, &[layers, n_s, cols], 1.0);
    // ν ≈ the norm of an embedding, so D ≈ √2 for these inputs, below the margin.
    let nu = constant(gpu, &[layers], (cols as f32).sqrt());
    let margin = constant(gpu, &[layers], 4.0);
    let per_layer = Tensor::empty(gpu, [2, layers], DType::F32);
    let d_harmful = Tensor::empty(gpu, [layers, n_h, cols], DType::F32);
    let d_harmless = Tensor::empty(gpu, [layers, n_s, cols], DType::F32);
    let inputs = SeparationInputs {
        harmful: &harmful,
        harmless: &harmless,
        nu: &nu,
        margin: &margin,
    };
    let outputs = SeparationOutputs {
        per_layer: &per_layer,
        d_harmful: &d_harmful,
        d_harmless: Some(&d_harmless),
    };

    // Bytes read: each embedding once (the kernel may read them again from cache; the
    // gradients, as large again, are written but not counted).
    let work = Work::Bytes((layers * (n_h + n_s) * cols) as u64 * F32);
    let mut suite = Suite::new(c, "separation_bandwidth");
    for (pair, label) in [(Pair::Pairwise, "pairwise"), (Pair::Centroid, "centroid")] {
        let options = SeparationOptions {
            pair,
            ..SeparationOptions::default()
        };
        let id = format!("{label}_l{layers}_h{n_h}_s{n_s}_c{cols}");
        suite.bench(&id, work, |rec| {
            separation_loss(rec, &inputs, &outputs, &options, 1.0 / layers as f32);
        });
    }
    suite.finish();
}

/// RMSNorm forward and backward over 512 tokens × 896 channels.
fn rmsnorm(c: &mut Criterion) {
    let gpu = gpu();
    let (rows, cols) = (TOKENS, HIDDEN);
    let eps = 1e-6;
    let x = random(gpu, 40, &[rows, cols], 1.0);
    let w = random(gpu, 41, &[cols], 1.0);
    let dy = random(gpu, 42, &[rows, cols], 1.0);
    let y = Tensor::empty(gpu, [rows, cols], DType::F32);
    let rstd = Tensor::empty(gpu, [rows], DType::F32);
    let dx = Tensor::empty(gpu, [rows, cols], DType::F32);
    let dw = random(gpu, 43, &[cols], 0.1);
    let forward = |rec: &mut Recorder| rmsnorm_forward(rec, &x, &w, &y, &rstd, eps);
    // The backward reads the forward's `rstd`.
    run(gpu, &forward);

    // Activations dominate; w, rstd and the dw partials (1/64 of x) are not counted.
    // Forward: read x, write y. Backward: the row pass reads x and dy and writes dx, the dw
    // pass reads x and dy again.
    let activation = (rows * cols) as u64 * F32;
    let mut suite = Suite::new(c, "rmsnorm_bandwidth");
    let id = format!("{rows}x{cols}");
    suite.bench(
        &format!("forward_{id}"),
        Work::Bytes(2 * activation),
        forward,
    );
    suite.bench(
        &format!("backward_{id}"),
        Work::Bytes(5 * activation),
        |rec| rmsnorm_backward(rec, &x, &w, &rstd, &dy, &dx, Some(&dw), Write::Accumulate),
    );
    suite.finish();
}

/// Names the adapter once, so that the numbers can be attributed.
fn adapter(_: &mut Criterion) {
    let gpu = gpu();
    let info = gpu.info();
    let timestamps = if gpu.has_timestamps() {
        "with timestamp queries"
    } else {
        "no timestamp queries: wall time only"
    };
    eprintln!(
        "adapter: {} ({:?}, {}), {timestamps}",
        info.name, info.backend, info.driver_info
    );
}

criterion_group!(benches, adapter, matmul, attention, kl, separation, rmsnorm);
criterion_main!(benches);
