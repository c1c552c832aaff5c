//! Killed mid-run, nothing lost: `es2-wgpu train` runs as a child process and is SIGKILLed at
//! named points (`ES2_FAILPOINT`, see `src/failpoint.rs`): after a step, while a checkpoint is
//! being written, while the final adapter and the merged model are being written, and while
//! `--resume` rewrites the metrics. After each kill every file in the output folder is whole
//! and what was there before is intact; `--resume` then continues, and the run ends with
//! exactly the files, bytes and numbers of an uninterrupted run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use es2_wgpu::testing::scratch_dir;
use serde_json::Value;

pub(super) fn remove(out: &Path) {
    std::fs::remove_dir_all(out).unwrap();
    std::fs::remove_dir_all(out.with_extension("data")).unwrap();
}

/// Eight short prompts per side, written next to `out` (most of a tiny run's time otherwise
/// goes to the built-in sets' base statistics and evaluations).
pub(super) fn prompt_files(out: &Path) -> [PathBuf; 2] {
    let dir = out.with_extension("data");
    std::fs::create_dir_all(&dir).unwrap();
    ["harmful", "harmless"].map(|side| {
        let prompts: Vec<String> = (0..8).map(|i| format!("{side} prompt {i}")).collect();
        let path = dir.join(format!("{side}.json"));
        std::fs::write(&path, serde_json::to_string(&prompts).unwrap()).unwrap();
        path
    })
}

/// A tiny run: six steps, a checkpoint every two (kept: the last two), LoRA with dropout
/// (whose masks must resume exactly too), an evaluation every three steps, a merged model.
fn fresh_args(out: &Path, seed: u64) -> Vec<String> {
    let [harmful, harmless] = prompt_files(out);
    let args = [
        "train",
        "--steps",
        "6",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--harmful-batch",
        "2",
        "--harmless-batch",
        "2",
        "--max-len",
        "24",
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0.1",
        "--merge",
        "--refusal-sample",
        "0",
    ];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--seed".into(), seed.to_string()]);
    args.extend(["--harmful".into(), harmful.to_string_lossy().into_owned()]);
    args.extend(["--harmless".into(), harmless.to_string_lossy().into_owned()]);
    args.extend(["--out".into(), out.to_string_lossy().into_owned()]);
    args
}

fn resume_args(out: &Path) -> Vec<String> {
    vec![
        "train".into(),
        "--resume".into(),
        out.to_string_lossy().into(),
    ]
}

/// Runs `es2-wgpu args` to the end; panics if it fails.
fn run_to_end(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
}

/// Runs `es2-wgpu args` until it reaches `failpoint`, then SIGKILLs it.
fn run_and_kill_at(args: &[String], failpoint: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .args(args)
        .env(es2_wgpu::failpoint::ENV, failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if send.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(300)) {
            Ok(line) if line.contains("failpoint") => break,
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("{failpoint} never reached ({e}); stderr: {seen:#?}");
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no flush, no cleanup runs
    child.wait().unwrap();
}

/// Every file under `dir`, relative, sorted (hidden ones too).
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().to_owned());
            }
        }
    }
    files.sort();
    files
}

fn is_hidden(path: &Path) -> bool {
    path.components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}

/// The lines of a metrics.jsonl without the measured fields: speed, and the peak memory (a
/// resumed process's pool has a history of its own).
fn metrics(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            let fields = v.as_object_mut().unwrap();
            fields.remove("tokens_per_s");
            fields.remove("peak_bytes");
            v
        })
        .collect()
}

/// A JSON file with the fields that name the folder or the time removed.
fn json_without_paths(path: &Path) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Some(config) = v.get_mut("config") {
        for field in ["out", "harmful", "harmless"] {
            config[field] = Value::Null;
        }
    }
    for field in ["out", "curves", "seconds"] {
        if let Some(map) = v.as_object_mut() {
            map.remove(field);
        }
    }
    v
}

/// Whether file `rel` of run `out` is the same as the reference run's.
fn same_file(out: &Path, reference: &Path, rel: &Path) -> bool {
    let (a, b) = (out.join(rel), reference.join(rel));
    if rel.ends_with("metrics.jsonl") {
        return metrics(&a) == metrics(&b);
    }
    if rel.extension().is_some_and(|e| e == "json") {
        return json_without_paths(&a) == json_without_paths(&b);
    }
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// After a kill: every visible file is whole (safetensors parse, JSON parses, every metrics
/// line parses), and each is the reference run's file, or for metrics.jsonl its beginning.
fn check_after_kill(out: &Path, reference: &Path, point: &str) {
    for rel in listing(out).iter().filter(|p| !is_hidden(p)) {
        let path = out.join(rel);
        let bytes = std::fs::read(&path).unwrap();
        match rel.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => {
                let parsed = safetensors::SafeTensors::deserialize(&bytes);
                assert!(parsed.is_ok(), "{point}: {} is not whole", rel.display());
            }
            Some("json") => {
                let parsed = serde_json::from_slice::<Value>(&bytes);
                assert!(parsed.is_ok(), "{point}: {} is not whole", rel.display());
            }
            _ => {}
        }
        if rel.ends_with("metrics.jsonl") {
            let (got, want) = (metrics(&path), metrics(&reference.join(rel)));
            assert!(
                got.len() <= want.len() && got[..] == want[..got.len()],
                "{point}: metrics.jsonl is not the start of the reference's"
            );
        } else if reference.join(rel).exists() {
            assert!(
                same_file(out, reference, rel),
                "{point}: {} differs from the uninterrupted run's",
                rel.display()
            );
        }
    }
}

#[test]
fn killed_at_any_point_resume_reaches_the_uninterrupted_run_exactly() {
    let reference = scratch_dir("kill", "reference");
    run_to_end(&fresh_args(&reference, 5));

    let out = scratch_dir("kill", "killed");
    // (arguments, point): each process is killed at its point, then the next resumes.
    let chain = [
        (fresh_args(&out, 5), "step:3"),
        // --resume rewrites metrics.jsonl without the lines past the checkpoint.
        (resume_args(&out), "write-file:metrics.jsonl"),
        // The step-4 checkpoint, half built in its temporary folder.
        (resume_args(&out), "write-safetensors:trainable.safetensors"),
        (resume_args(&out), "write-file:state.json"),
        // The final outputs: the adapter's weights, its config, then the merged model is
        // complete and the summary is being written.
        (
            resume_args(&out),
            "write-safetensors:adapter_model.safetensors",
        ),
        (resume_args(&out), "write-file:adapter_config.json"),
        (resume_args(&out), "write-file:summary.json"),
        // The merged model of the killed run is moved aside for the new one.
        (resume_args(&out), "swap-dir:merged"),
    ];
    for (args, point) in &chain {
        run_and_kill_at(args, point);
        check_after_kill(&out, &reference, point);
    }
    // The last kill left merged/ moved aside, whole.
    let aside = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(".merged.old-"));
    let aside = out.join(aside.expect("merged/ was moved aside"));
    assert!(same_file(
        &aside,
        &reference.join("merged"),
        Path::new("model.safetensors")
    ));

    run_to_end(&resume_args(&out));
    assert_eq!(
        listing(&out),
        listing(&reference),
        "files left over or missing"
    );
    for rel in listing(&reference) {
        assert!(
            same_file(&out, &reference, &rel),
            "{} differs from the uninterrupted run's",
            rel.display()
        );
    }
    let log = Path::new("metrics.jsonl");
    assert_eq!(metrics(&out.join(log)), metrics(&reference.join(log)));
    remove(&reference);
    remove(&out);
}

/// A run started with --overwrite over an earlier run's folder, then killed: --resume must
/// not continue the earlier run from its checkpoints.
#[test]
fn resume_after_a_killed_overwrite_never_continues_the_earlier_run() {
    let out = scratch_dir("kill", "overwrite");
    run_to_end(&fresh_args(&out, 5));
    assert!(out.join("checkpoints/step-000004").exists());
    let mut again = fresh_args(&out, 6);
    again.push("--overwrite".into());
    run_and_kill_at(&again, "step:1");
    assert!(!out.join("checkpoints").exists());
    let err = Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .args(resume_args(&out))
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no checkpoint to resume"));
    remove(&out);
}
