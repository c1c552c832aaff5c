//! An interrupted and resumed run reaches exactly the numbers of an uninterrupted one.

use std::path::PathBuf;

use es2_wgpu::es2::{Quiet, TrainConfig, Trainer};
use es2_wgpu::model::LoraConfig;
use es2_wgpu::testing::{bits, download, gpu, scratch_dir};

fn config(out: PathBuf) -> TrainConfig {
    TrainConfig {
        steps: 6,
        out,
        eval_every: 0,
        save_every: 0,
        harmful_batch: 3,
        harmless_batch: 2,
        max_len: 40,
        // Dropout masks come from the step's seed, so they must resume exactly too.
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            ..LoraConfig::default()
        }),
        ..TrainConfig::for_model("tiny-llama").unwrap()
    }
}

/// Step lines of metrics.jsonl without the measured fields: speed, and the peak memory (other
/// tests share the device's buffer pool).
pub(crate) fn step_metrics(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("step").is_some())
        .map(|mut v| {
            let fields = v.as_object_mut().unwrap();
            fields.remove("tokens_per_s");
            fields.remove("peak_bytes");
            v
        })
        .collect()
}

/// Every trained parameter's name and bits.
pub(crate) fn trained_bits(trainer: &Trainer) -> Vec<(String, Vec<u32>)> {
    trainer
        .job
        .grads()
        .named(&trainer.models.tuned)
        .iter()
        .map(|p| (p.name.clone(), bits(&download(gpu(), &p.param))))
        .collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run_bit_for_bit() {
    let gpu = gpu();
    let whole_out = scratch_dir("resume", "whole");
    let mut whole = Trainer::new(gpu, config(whole_out.clone()), &mut Quiet).unwrap();
    whole.run(&mut Quiet).unwrap();

    // The same run with a checkpoint every 4 steps, killed after logging step 5.
    let split_out = scratch_dir("resume", "split");
    let mut first = Trainer::new(
        gpu,
        TrainConfig {
            save_every: 4,
            ..config(split_out.clone())
        },
        &mut Quiet,
    )
    .unwrap();
    for _ in 0..5 {
        first.advance(&mut Quiet).unwrap();
    }
    drop(first);

    let mut resumed = Trainer::resume(gpu, &split_out, None, &mut Quiet).unwrap();
    assert_eq!(resumed.step, 4, "resumed from the step-4 checkpoint");
    resumed.run(&mut Quiet).unwrap();

    assert_eq!(trained_bits(&whole), trained_bits(&resumed));
    // The resumed run logged steps 5 and 6 once each, as the uninterrupted run did.
    let (a, b) = (step_metrics(&whole_out), step_metrics(&split_out));
    assert_eq!(a.len(), 6);
    assert_eq!(a[..4], b[..4], "metrics up to the checkpoint are kept");
    assert_eq!(a, b);
    for dir in [whole_out, split_out] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn resume_without_a_checkpoint_is_a_clear_error() {
    let dir = scratch_dir("resume", "empty");
    std::fs::create_dir_all(&dir).unwrap();
    let err = Trainer::resume(gpu(), &dir, None, &mut Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no checkpoint to resume") && err.contains(&*dir.to_string_lossy()),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
