//! A NaN in a step: `es2-wgpu train` runs as a child process with failpoint
//! `nonfinite-gradient:3`, which makes step 3's gradient norm NaN as an overflow would. By
//! default the run stops with an error naming the step and the term, and the last checkpoint
//! stays whole and resumable; with `--skip-nonfinite 1` the step is logged, changes nothing on
//! the model, and the run goes on. Failpoint `device-fault:3` makes step 3 fault the GPU: the
//! error says so and the last checkpoint resumes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use es2_wgpu::testing::scratch_dir;
use safetensors::SafeTensors;
use serde_json::Value;

use super::kill::{prompt_files, remove};

/// A tiny LoRA run of `steps` steps with a checkpoint after every step.
fn args(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let [harmful, harmless] = prompt_files(out);
    let mut args: Vec<String> = [
        "train",
        "--steps",
        &steps.to_string(),
        "--save-every",
        "1",
        "--harmful-batch",
        "2",
        "--harmless-batch",
        "2",
        "--max-len",
        "24",
        "--lora-rank",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    for (flag, path) in [
        ("--harmful", &harmful),
        ("--harmless", &harmless),
        ("--out", &out.to_owned()),
    ] {
        args.extend([flag.to_owned(), path.to_string_lossy().into_owned()]);
    }
    args
}

fn run(args: &[String], failpoint: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_es2-wgpu"));
    command.args(args);
    if let Some(point) = failpoint {
        command.env(es2_wgpu::failpoint::ENV, point);
    }
    command.output().unwrap()
}

fn checkpoint(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

/// Every tensor of a checkpoint's `trainable.safetensors` (parameters and AdamW moments), by
/// name, as raw bytes.
fn trainable(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("trainable.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    tensors.sort();
    tensors
}

fn all_finite(tensors: &[(String, Vec<u8>)]) -> bool {
    tensors.iter().all(|(_, data)| {
        data.chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
    })
}

#[test]
fn a_nonfinite_gradient_stops_the_run_naming_step_and_term_and_the_last_checkpoint_resumes() {
    let out = scratch_dir("kill", "nonfinite-stop");
    let fresh = args(&out, 5, &[]);
    let stopped = run(&fresh, Some("nonfinite-gradient:3"));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "the run went on: {stderr}");
    assert!(
        stderr.contains("step 3: the gradient norm is not finite"),
        "{stderr}"
    );
    assert!(
        stderr.contains("step-000002"),
        "names no checkpoint: {stderr}"
    );

    // The checkpoint before the fault is whole and holds finite numbers; none of step 3 exists.
    let last = checkpoint(&out, 2);
    assert!(last.join("state.json").exists());
    assert!(all_finite(&trainable(&last)));
    assert!(!checkpoint(&out, 3).exists());

    // Resumed without the fault, the run ends normally.
    let resumed = run(
        &[
            "train".into(),
            "--resume".into(),
            out.to_string_lossy().into(),
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "resume failed: {stderr}");
    assert!(out.join("adapter_model.safetensors").exists());
    remove(&out);
}

#[test]
fn skip_nonfinite_logs_the_step_changes_nothing_and_goes_on() {
    let out = scratch_dir("kill", "nonfinite-skip");
    let done = run(
        &args(&out, 4, &["--skip-nonfinite", "1"]),
        Some("nonfinite-gradient:3"),
    );
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");

    // Step 3 is logged as skipped, with the term; the other steps are ordinary lines.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| l.get("step").is_some())
        .collect();
    let skipped: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("skipped").is_some())
        .collect();
    assert_eq!(skipped.len(), 1, "{metrics}");
    assert_eq!(skipped[0]["step"], 3);
    assert_eq!(skipped[0]["skipped"], "the gradient norm");
    let trained = lines.iter().filter(|l| l.get("loss").is_some()).count();
    assert_eq!(trained, 3, "{metrics}");

    // The skipped step left every parameter and moment as step 2 had them.
    let (before, after) = (
        trainable(&checkpoint(&out, 2)),
        trainable(&checkpoint(&out, 3)),
    );
    assert!(all_finite(&after));
    assert_eq!(before.len(), after.len());
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert!(a == b, "{name} changed in the skipped step");
    }
    assert!(out.join("adapter_model.safetensors").exists());
    remove(&out);
}

#[test]
fn a_gpu_fault_mid_run_is_named_and_the_last_checkpoint_resumes() {
    let out = scratch_dir("kill", "device-fault");
    let stopped = run(&args(&out, 4, &[]), Some("device-fault:3"));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "the run went on: {stderr}");
    assert!(stderr.contains("GPU validation error"), "{stderr}");
    assert!(
        stderr.contains("maximum buffer size"),
        "names no limit: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let last = checkpoint(&out, 2);
    assert!(all_finite(&trainable(&last)));
    assert!(!checkpoint(&out, 3).exists());
    let resumed = run(
        &[
            "train".into(),
            "--resume".into(),
            out.to_string_lossy().into(),
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "resume failed: {stderr}");
    remove(&out);
}
