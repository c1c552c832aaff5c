//! Rebuilds `models/tiny-chat` from scratch: stories260K with a chat template, SFT data from
//! the train splits and the base model's own greedy continuations, full supervised
//! fine-tuning through the library's `Trainer`, and greedy refusal rates on every held-out
//! set (`es2_wgpu::es2::tiny_chat`; the recipe is `scripts/tiny_chat_recipe.md`).
//!
//! ```sh
//! cargo run --release --example build_tiny_chat -- [--out DIR] [--steps N]
//! ```
//!
//! Run from the repository root (`scripts/build_tiny_chat.sh` does). The folder `--out`
//! (default `models/tiny-chat`) is replaced once the new one is complete; its `SOURCES.md`
//! says whether the new weights equal those it replaced.

use std::path::PathBuf;
use std::time::Instant;

use es2_wgpu::es2::tiny_chat::{build, BuildOptions, BuildReport};
use es2_wgpu::prelude::*;

/// A line every 16 steps and the trainer's messages, on stderr.
struct Log {
    started: Instant,
}

impl TrainObserver for Log {
    fn message(&mut self, text: &str) {
        eprintln!("[{:6.0} s] {text}", self.started.elapsed().as_secs_f64());
    }

    fn step(&mut self, step: usize, total: usize, report: &StepReport, tokens_per_s: f64) {
        if step % 16 == 0 || step == total {
            eprintln!(
                "[{:6.0} s] step {step:>4}/{total}: loss {:.4}  {tokens_per_s:.0} tok/s",
                self.started.elapsed().as_secs_f64(),
                report.loss
            );
        }
    }
}

fn options() -> Result<BuildOptions> {
    let mut options = BuildOptions::in_repository(&PathBuf::from("."));
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| Error::InvalidArgument(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--out" => options.out = value()?.into(),
            "--steps" => {
                let text = value()?;
                options.steps = text.parse().map_err(|_| {
                    Error::InvalidArgument(format!("--steps: not a number of steps: {text}"))
                })?;
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown argument {other}; usage: build_tiny_chat [--out DIR] [--steps N]"
                )))
            }
        }
    }
    Ok(options)
}

fn print_report(r: &BuildReport) {
    println!("rates of refusal (greedy, at most 32 new tokens, GCG's list):");
    for (name, rate) in &r.rates.sets {
        println!("  {name:>18}: {:>3}/{:<4}", rate.refused, rate.total);
    }
    let (h, s) = (r.rates.sample_harmful, r.rates.sample_harmless);
    println!(
        "  CI sample: harmful {}/{}, harmless {}/{}",
        h.refused, h.total, s.refused, s.total
    );
    println!(
        "{:.0} s in all: data {:.0} s, SFT {:.0} s ({:.0} tokens/s), measurement {:.0} s",
        r.seconds, r.data_seconds, r.sft_seconds, r.sft_tokens_per_s, r.eval_seconds
    );
    match &r.reproduced {
        Some(p) => println!(
            "against the previous build: weights identical {} (max abs diff {:e}), data \
             identical {}",
            p.identical_weights, p.max_abs_diff, p.identical_data
        ),
        None => println!("no previous build to compare with"),
    }
}

fn main() {
    es2_wgpu::gpu::quiet_headless_vulkan();
    let started = Instant::now();
    let result = (|| {
        let options = options()?;
        let gpu = Gpu::new()?;
        eprintln!("GPU: {}", gpu.info().name);
        build(&gpu, &options, &mut Log { started })
    })();
    match result {
        Ok(report) => print_report(&report),
        Err(e) => {
            eprintln!("build_tiny_chat: {e}");
            std::process::exit(1);
        }
    }
}
