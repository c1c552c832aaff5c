//! A short ES2 run on the real stories260K checkpoint (models/stories260K) with the
//! AdvBench/Alpaca training splits (data/datasets; harmless_train is a 2,000-row subset): on held-out prompts the normalised separation (D_l after / D_l before, averaged over
//! the layers) at least doubles and grows at every layer, while the KL to the base model on
//! harmless prompts stays below 0.05 nats per token. (The last layer's embedding is the final
//! norm's output, which the logits read directly, so the KL term holds it back most.)

use std::path::PathBuf;

use es2_wgpu::es2::{Quiet, TrainConfig, Trainer};
use es2_wgpu::testing::gpu;

/// A file or folder of the repository.
fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn stories260k_separation_doubles_with_small_kl() {
    let out = std::env::temp_dir().join(format!("es2-stories-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut config = TrainConfig {
        model: repo("models/stories260K").to_string_lossy().into_owned(),
        harmful: Some(repo("data/datasets/harmful_train.json")),
        harmless: Some(repo("data/datasets/harmless_train.json")),
        out: out.clone(),
        steps: 30,
        harmful_batch: 4,
        harmless_batch: 4,
        max_len: 48,
        eval_every: 0,
        save_every: 0,
        base_prompts: 64,
        eval_prompts: 32,
        seed: 1,
        ..TrainConfig::default()
    };
    config.optimizer.lr = 1e-3;
    config.objective.lambda = 4.0;
    let mut trainer = Trainer::new(gpu(), config, &mut Quiet).unwrap();
    let summary = trainer.run(&mut Quiet).unwrap();
    let (held_before, held_after) = (summary.before.es2().unwrap(), summary.after.es2().unwrap());
    let mut ratios = Vec::new();
    for (i, layer) in summary.layers.iter().enumerate() {
        let (before, after) = (held_before.distance[i], held_after.distance[i]);
        eprintln!(
            "stories260K layer {layer}: held-out D {before:.4} -> {after:.4} ({:.2}x)",
            after / before
        );
        assert!(
            after > before,
            "layer {layer}: {before} -> {after} did not grow"
        );
        ratios.push(after / before);
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    eprintln!("stories260K normalised separation: {mean:.2}x");
    assert!(mean >= 2.0, "normalised separation grew only {mean:.2}x");
    eprintln!(
        "stories260K held-out KL {:.5} nats/token, {} steps in {:.1} s",
        held_after.kl, summary.steps, summary.seconds
    );
    assert!(
        held_after.kl < 0.05,
        "held-out KL {} nats/token",
        held_after.kl
    );
    assert!(out.join("adapter_model.safetensors").exists());
    std::fs::remove_dir_all(out).unwrap();
}
