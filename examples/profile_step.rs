use es2_wgpu::es2::{Quiet, TrainConfig, Trainer};
use es2_wgpu::Gpu;
use std::time::Instant;
fn main() {
    let gpu = Gpu::new().unwrap();
    let config = TrainConfig {
        steps: 10,
        out: "/tmp/prof-out".into(),
        eval_every: 0,
        save_every: 0,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&gpu, config, &mut Quiet).unwrap();
    t.train_step().unwrap();
    gpu.start_profiling();
    for _ in 0..3 {
        let s = Instant::now();
        let r = t.train_step().unwrap();
        println!("step {:?} tokens {}", s.elapsed(), r.tokens);
    }
    let prof = gpu.take_profile();
    let total: f64 = prof.iter().map(|k| k.seconds).sum();
    println!("total gpu {total:.3}");
    for k in prof.iter().take(25) {
        println!(
            "{:40} {:6} {:8.3} s {:5.1}%",
            k.kernel,
            k.dispatches,
            k.seconds,
            100.0 * k.seconds / total
        );
    }
}
