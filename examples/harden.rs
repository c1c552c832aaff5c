//! A small application built on es2-wgpu's public API: it hardens a model with ES2 (LoRA, the
//! library's defaults for that model) and prints how the held-out separation of harmful and
//! harmless prompts moved at every layer, and how far the model drifted from the base model.
//!
//! ```sh
//! cargo run --release --example harden -- [MODEL] [STEPS]
//! ```
//!
//! MODEL is a Hugging Face folder or a built-in model's name (default: the built-in
//! `tiny-chat` on the built-in prompt sets; a folder trains on `data/datasets/`). The adapter,
//! metrics and `curves.svg` go to `harden-out/`, replacing an earlier run there.

use std::time::Instant;

use es2_wgpu::model::embedded;
use es2_wgpu::prelude::*;

/// One line per step on stderr, and the messages the trainer sends.
struct Log {
    started: Instant,
}

impl TrainObserver for Log {
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn step(&mut self, step: usize, total: usize, report: &StepReport, _tokens_per_s: f64) {
        let Some(terms) = report.es2() else { return };
        eprintln!(
            "[{:6.1} s] step {step:>4}/{total}: L_sep {:.4}  L_KL {:.5}",
            self.started.elapsed().as_secs_f64(),
            terms.sep,
            terms.kl
        );
    }
}

fn config(model: &str, steps: Option<usize>) -> Result<TrainConfig> {
    let mut config = TrainConfig::for_model(model)?;
    if embedded::find(model).is_none() {
        // A real model trains on real prompt sets; the built-in one on the built-in sets.
        config.harmful = Some("data/datasets/harmful_train.json".into());
        config.harmless = Some("data/datasets/harmless_train.json".into());
    }
    config.out = "harden-out".into();
    config.overwrite = true;
    if let Some(steps) = steps {
        config.steps = steps;
    }
    Ok(config)
}

fn print_table(summary: &Summary) {
    let (Some(before), Some(after)) = (summary.before.es2(), summary.after.es2()) else {
        return;
    };
    println!("held-out separation D_l (harmful vs harmless, normalised by the base model's ν_l):");
    println!("  layer      before       after    ratio");
    for (i, layer) in summary.layers.iter().enumerate() {
        let (b, a) = (before.distance[i], after.distance[i]);
        println!("  {layer:>5}  {b:>10.4}  {a:>10.4}  {:>7.2}x", a / b);
    }
    println!(
        "held-out KL to the base model per token: {:.5} -> {:.5}",
        before.kl, after.kl
    );
    println!(
        "{} steps in {:.1} s; adapter, metrics and {} in {}",
        summary.steps,
        summary.seconds,
        summary.curves.display(),
        summary.out.display()
    );
}

fn main() {
    // No foreign libwayland errors on a headless machine (see its doc).
    es2_wgpu::gpu::quiet_headless_vulkan();
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| embedded::DEFAULT.to_owned());
    let steps = args.next().map(|s| s.parse::<usize>());
    let result = (|| {
        let steps = steps
            .transpose()
            .map_err(|e| Error::config("steps", format!("not a number of steps: {e}")))?;
        let gpu = Gpu::new()?;
        eprintln!("GPU: {}", gpu.info().name);
        let mut log = Log {
            started: Instant::now(),
        };
        let mut trainer = Trainer::new(&gpu, config(&model, steps)?, &mut log)?;
        trainer.run(&mut log)
    })();
    match result {
        Ok(summary) => print_table(&summary),
        Err(e) => {
            eprintln!("harden: {e}");
            std::process::exit(1);
        }
    }
}
