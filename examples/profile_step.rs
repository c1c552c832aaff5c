//! Where a training step's GPU time goes: runs one warm-up step of the default training
//! configuration for a model (the built-in `tiny-llama` unless a model folder or name is given),
//! then times every dispatch of three steps with timestamp queries and prints the kernels by
//! total time.
//!
//! ```sh
//! cargo run --release --example profile_step [-- MODEL]
//! ```

use std::time::Instant;

use es2_wgpu::es2::{Quiet, TrainConfig, Trainer};
use es2_wgpu::{Gpu, Result};

fn main() -> Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tiny-llama".into());
    let gpu = Gpu::new()?;
    let config = TrainConfig {
        out: std::env::temp_dir().join("es2-profile-step"),
        eval_every: 0,
        save_every: 0,
        overwrite: true,
        ..TrainConfig::for_model(&model)?
    };
    let mut trainer = Trainer::new(&gpu, config, &mut Quiet)?;
    trainer.train_step()?;
    gpu.start_profiling();
    for _ in 0..3 {
        let started = Instant::now();
        let report = trainer.train_step()?;
        println!(
            "step: {:.3} s for {} tokens (timed dispatch by dispatch)",
            started.elapsed().as_secs_f64(),
            report.tokens
        );
    }
    let kernels = gpu.take_profile();
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    println!("GPU time of 3 steps: {total:.3} s");
    for k in &kernels {
        println!(
            "{:32} {:6} dispatches {:9.3} s {:5.1}%",
            k.kernel,
            k.dispatches,
            k.seconds,
            100.0 * k.seconds / total
        );
    }
    Ok(())
}
