//! The `es2-wgpu` binary: `generate`, `embed`, `info`, `train` and `eval` as a user runs them.

use std::path::PathBuf;
use std::process::{Command, Output};

use es2_wgpu::model::{
    embedded, open_model, Batch, LoadOptions, Output as PassOutput, Pass, SavePolicy,
};
use es2_wgpu::testing::{assert_close, download, f64s, gpu};
use serde_json::Value;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn stories() -> String {
    let dir = manifest().join("models/stories260K");
    dir.to_str().unwrap().to_owned()
}

fn es2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs a command that must succeed and returns its stdout as JSON.
fn es2_json(args: &[&str]) -> Value {
    let out = es2(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}"))
}

fn u32s(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn generate_json_gives_transformers_greedy_continuation_of_stories260k() {
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(manifest().join("tests/fixtures/stories260k.reference.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &refs["prompts"][0];
    assert_eq!(case["prompt"], "Once upon a time");
    let want = u32s(&case["greedy_ids"]);
    let max = want.len().to_string();
    let out = es2_json(&[
        "generate",
        "--model",
        &stories(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        &max,
        "--json",
    ]);
    assert_eq!(u32s(&out["prompt_ids"]), u32s(&case["prompt_ids"]));
    assert_eq!(u32s(&out["output_ids"]), want);
    assert_eq!(out["text"], case["greedy_text"]);
}

#[test]
fn generate_streams_text_reports_speed_and_rejects_bad_requests() {
    let out = es2(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "6",
        "--seed",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    assert!(!out.stdout.is_empty());
    // --chat on a model without a chat template is an error, not a panic.
    let out = es2(&[
        "generate",
        "--model",
        &stories(),
        "--prompt",
        "Hi",
        "--chat",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no chat template"));
    // So is asking for more tokens than the model's context.
    let out = es2(&["generate", "--prompt", "Hi", "--max-tokens", "100000000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("context of 2048 tokens"));
}

/// Sampling stories260K at a very high temperature draws byte-fallback tokens at random: cut
/// characters, invalid bytes, valid ones broken later. Generation must not fail on them;
/// `--json` gives the ids and the text transformers' `decode` gives (checked against
/// transformers in tests/model/decode.rs), and the streamed text is the same.
#[test]
fn generate_never_fails_on_bytes_that_are_not_utf8() {
    let args = [
        "generate",
        "--model",
        &stories(),
        "--prompt",
        "Once upon a time",
        "--temperature",
        "100",
        "--seed",
        "1",
        "--max-tokens",
        "40",
    ];
    let out = es2_json(&[&args[..], &["--json"]].concat());
    let ids = u32s(&out["output_ids"]);
    assert_eq!(ids.len(), 40);
    let (_, tok) = open_model(gpu(), &stories(), &LoadOptions::default()).unwrap();
    let text = out["text"].as_str().unwrap();
    assert_eq!(text, tok.decode(&ids).unwrap());
    assert!(
        text.contains('\u{FFFD}'),
        "seed 1 no longer draws broken bytes: {text:?}"
    );

    let streamed = es2(&args);
    assert!(
        streamed.status.success(),
        "{}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    assert_eq!(
        String::from_utf8(streamed.stdout).unwrap(),
        format!("{text}\n")
    );
}

/// `embed --json` gives L + 1 hidden states of width C whose values (last position) are the
/// library forward's.
fn check_embed(model_spec: &str, prompt: &str, args: &[&str]) {
    let mut argv = vec!["embed", "--prompt", prompt, "--logits", "--json"];
    argv.extend_from_slice(args);
    let out = es2_json(&argv);
    let gpu = gpu();
    let (model, tok) = open_model(gpu, model_spec, &LoadOptions::default()).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let batch = Batch::new(gpu, std::slice::from_ref(&ids), model.config.vocab_size).unwrap();
    let forward = model
        .run_now(
            gpu,
            &batch,
            &Pass::new(PassOutput::Logits).saving(SavePolicy::BlockInputs),
        )
        .unwrap();

    let states = out["hidden_states"].as_array().unwrap();
    assert_eq!(states.len(), model.layers() + 1, "{model_spec}");
    let (t, c) = (ids.len(), model.config.hidden_size);
    for (i, state) in states.iter().enumerate() {
        let got: Vec<f32> = serde_json::from_value(state.clone()).unwrap();
        assert_eq!(got.len(), c);
        let want = download(gpu, forward.hidden_state(i));
        assert_close(
            &format!("{model_spec} cli hidden_states[{i}]"),
            &got,
            &f64s(&want[(t - 1) * c..]),
            1e-6,
        );
    }
    let logits: Vec<f32> = serde_json::from_value(out["logits"].clone()).unwrap();
    assert_eq!(logits.len(), model.config.vocab_size);
}

/// `train` with no model hardens the built-in chat model with its preset, which measures
/// refusals on a fixed held-out sample before and after; the table and summary.json say so.
#[test]
fn train_on_the_default_model_reports_refusal_rates_before_and_after() {
    let out = std::env::temp_dir().join(format!("es2-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = es2(&["train", "--steps", "2", "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(stderr.contains(embedded::DEFAULT), "{stderr}");
    assert!(
        table.contains("refusals on held-out prompts (32 harmful + 32 harmless"),
        "{table}"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let refusals = &summary["refusals"];
    for when in ["before", "after"] {
        for side in ["harmful", "harmless"] {
            let rate = &refusals[when][side];
            assert_eq!(rate["total"], 32, "{refusals}");
            assert!(table.contains(&format!("{side} refused")), "{table}");
            assert!(rate["refused"].as_u64().unwrap() <= 32);
        }
    }
    // The chat model refuses harmful prompts far more often than harmless ones.
    let refused = |side: &str| refusals["before"][side]["refused"].as_u64().unwrap();
    assert!(refused("harmful") > refused("harmless") + 16, "{refusals}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn embed_json_on_the_default_model_matches_the_library() {
    check_embed(embedded::DEFAULT, "héllo 世界", &[]);
}

#[test]
fn embed_json_on_stories260k_matches_the_library() {
    let model = stories();
    check_embed(&model, "Once upon a time", &["--model", &model]);
}

#[test]
fn embed_text_summary_lists_every_hidden_state() {
    let out = es2(&["embed", "--prompt", "Hi", "--pool", "mean"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mean over the tokens"), "{text}");
    assert!(
        text.contains("[ 0] embedding") && text.contains("final norm"),
        "{text}"
    );
}

#[test]
fn bad_model_path_fails_naming_the_path() {
    let out = es2(&["embed", "--model", "no/such/folder", "--prompt", "Hi"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/folder"), "{stderr}");
    assert!(stderr.contains(embedded::DEFAULT), "{stderr}");
}

/// On a headless machine (no `XDG_RUNTIME_DIR`) the Vulkan stack used to print libwayland's
/// `error: XDG_RUNTIME_DIR is invalid or not set` on every command. `info` writes nothing to
/// stderr itself, so any line there came from someone else.
#[test]
fn info_without_a_display_session_prints_no_foreign_lines() {
    let out = Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .arg("info")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("NODEVICE_SELECT")
        .env_remove("MESA_VK_DEVICE_SELECT")
        .env_remove("DRI_PRIME")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "es2-wgpu info wrote lines it did not make:\n{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("chosen:"));
}

#[test]
fn info_json_parses() {
    let out = es2_json(&["info", "--json"]);
    assert!(out["adapters"].as_array().is_some_and(|a| !a.is_empty()));
}

/// A checkpoint whose weights are 16-bit in the file, loaded with each of `dtype_flags`:
/// generation gives the f32 load's tokens (16-bit storage and its widening are exact), and
/// `export` with `export_flags` writes `matrix` and the embedding back as `dtype`, the norms
/// as F32.
fn sixteen_bit_weights_generate_as_f32_and_export(
    fixture: &str,
    dtype_flags: &[&[&str]],
    export_flags: &[&str],
    dtype: safetensors::Dtype,
    matrix: &str,
) {
    let model = manifest().join("tests/fixtures/models").join(fixture);
    let model = model.to_str().unwrap();
    let generate = |extra: &[&str]| {
        let mut argv = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "hello there",
            "--max-tokens",
            "8",
            "--json",
        ];
        argv.extend_from_slice(extra);
        u32s(&es2_json(&argv)["output_ids"])
    };
    let f32_tokens = generate(&[]);
    for flags in dtype_flags {
        assert_eq!(generate(flags), f32_tokens, "{flags:?}");
    }

    let out = std::env::temp_dir().join(format!("es2-cli-{fixture}-{}", std::process::id()));
    let mut argv = vec!["export", "--model", model, "--out", out.to_str().unwrap()];
    argv.extend_from_slice(export_flags);
    let exported = es2(&argv);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype_of = |name: &str| file.tensor(name).unwrap().dtype();
    assert_eq!(dtype_of(matrix), dtype);
    assert_eq!(dtype_of("model.embed_tokens.weight"), dtype);
    assert_eq!(dtype_of("model.norm.weight"), safetensors::Dtype::F32);
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--f16-weights` (the older name of `--weights-dtype f16`) and `--weights-dtype auto` on an
/// f16 checkpoint.
#[test]
fn f16_weights_flag_generates_as_f32_and_exports_f16_projections() {
    sixteen_bit_weights_generate_as_f32_and_export(
        "qwen2-f16",
        &[&["--f16-weights"], &["--weights-dtype", "auto"]],
        &["--f16-weights"],
        safetensors::Dtype::F16,
        "model.layers.0.mlp.down_proj.weight",
    );
}

/// `--weights-dtype bf16` and `auto` on a bf16 checkpoint.
#[test]
fn bf16_weights_generate_as_f32_and_export_bf16_matrices() {
    sixteen_bit_weights_generate_as_f32_and_export(
        "mistral-bf16-sharded",
        &[&["--weights-dtype", "bf16"], &["--weights-dtype", "auto"]],
        &["--weights-dtype", "bf16"],
        safetensors::Dtype::BF16,
        "model.layers.1.self_attn.k_proj.weight",
    );
}

/// The bar: LoRA r16 ES2 at 8 + 8 × 256 with recomputation and the checkpoints' own
/// 16-bit weights fits a 24 GB GPU for each of the paper's four models, planned from
/// `config.json` alone for a GPU this machine does not have.
#[test]
fn the_four_paper_models_fit_a_24_gb_discrete_gpu_with_recomputation() {
    for name in [
        "llama-2-7b-chat",
        "llama-3-8b-instruct",
        "mistral-7b-instruct-v0.2",
        "qwen2.5-7b-instruct",
    ] {
        let dir = manifest().join("data/configs").join(name);
        let json = es2_json(&[
            "train",
            "--dry-run",
            "--model",
            dir.to_str().unwrap(),
            "--max-len",
            "256",
            "--recompute",
            "--weights-dtype",
            "auto",
            "--gpu-memory",
            "24GB",
            "--discrete-gpu",
            "--json",
        ]);
        assert_eq!(json["fits"], true, "{name}: {}", json["problems"]);
        let total = json["plan"]["total"].as_u64().unwrap();
        assert!(total > 12 << 30 && total < 24 << 30, "{name}: {total}");
        let batches = &json["plan"]["settings"]["batches"];
        assert_eq!(batches, &serde_json::json!([8, 8]), "{name}");
    }
}

#[test]
fn train_dry_run_plans_a_7b_model_from_its_config_alone() {
    // data/configs holds config.json files only: no weights, no tokenizer.
    let mistral = manifest().join("data/configs/mistral-7b-instruct-v0.2");
    let mistral = mistral.to_str().unwrap();
    let args = [
        "train",
        "--dry-run",
        "--model",
        mistral,
        "--max-len",
        "256",
        "--recompute",
        "--weights-dtype",
        "auto",
        "--gpu-memory",
        "24GB",
    ];
    let out = es2(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for wanted in [
        "memory plan",
        "activations kept for the backward",
        "total",
        "fits:",
    ] {
        assert!(stdout.contains(wanted), "{wanted} missing from:\n{stdout}");
    }
    let json = es2_json(&[&args[..], &["--json"]].concat());
    assert_eq!(json["fits"], true);
    let total = json["plan"]["total"].as_u64().unwrap();
    assert!(total > 10 << 30 && total < 24 << 30, "{total}");

    // Without recomputation and 16-bit weights (auto is bf16: config.json declares bfloat16) it
    // does not fit 24 GB: the plan says what would.
    let out = es2(&[&args[..6], &args[9..]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("does not fit"), "{stdout}");
    assert!(stdout.contains("--recompute"), "{stdout}");
}

#[test]
fn train_that_cannot_fit_fails_with_the_plan_before_loading() {
    let llama = manifest().join("data/configs/llama-3-8b-instruct");
    let out = es2(&[
        "train",
        "--model",
        llama.to_str().unwrap(),
        "--gpu-memory",
        "16GB",
        "--out",
        std::env::temp_dir()
            .join("es2-cli-cannot-fit")
            .to_str()
            .unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not fit the GPU"), "{stderr}");
    assert!(stderr.contains("memory plan"), "{stderr}");
    assert!(
        !stderr.contains("tokenizer"),
        "it got as far as loading: {stderr}"
    );
}

/// `train --objective sft` learns the conversations of `--data`: without it the command
/// fails naming the flag and writes nothing; with a small file it trains and its summary
/// gives the held-out loss before and after.
#[test]
fn train_sft_needs_data_and_reports_the_held_out_loss() {
    let dir = std::env::temp_dir().join(format!("es2-cli-sft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let out_arg = out.to_str().unwrap();
    let model = stories();
    let base = [
        "train",
        "--objective",
        "sft",
        "--model",
        &model,
        "--out",
        out_arg,
    ];
    let failed = es2(&base);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("invalid --data") && stderr.contains("conversations"),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());

    let rows: Vec<String> = ["cat", "dog", "bird", "fish", "frog", "duck"]
        .iter()
        .map(|a| {
            serde_json::json!({"prompt": format!("Where is the {a}?"),
                               "response": format!("The {a} is in the park.")})
            .to_string()
        })
        .collect();
    let data = dir.join("chats.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let mut args = base.to_vec();
    args.extend(["--data", data.to_str().unwrap(), "--steps", "2"]);
    args.extend(["--sft-batch", "2", "--save-every", "0"]);
    let trained = es2(&args);
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(stdout.starts_with("SFT finished: 2 steps"), "{stdout}");
    assert!(
        stdout.contains("held-out cross-entropy per learned token"),
        "{stdout}"
    );
    assert!(out.join("adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval` as a user runs it, with small budgets on the default model: the flags reach the
/// report, the tables are printed and the report is written; an unknown attack is refused.
#[test]
fn eval_writes_the_report_its_flags_describe() {
    let out_dir = std::env::temp_dir().join(format!("es2-cli-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = es2(&[
        "eval",
        "--attacks",
        "direct,repe",
        "--answered",
        "2",
        "--probe-prompts",
        "8",
        "--max-new-tokens",
        "6",
        "--repe-c",
        "0.5,1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| attack | model |"), "{stdout}");
    assert!(stdout.contains("## Capability"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["models"][0]["model"], embedded::DEFAULT);
    assert_eq!(report["settings"]["decoding"]["max_new_tokens"], 6);
    let attacks: Vec<&str> = report["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["attack"].as_str().unwrap())
        .collect();
    assert_eq!(attacks, ["direct", "repe", "repe"]);
    assert!(out_dir.join("report.md").is_file());
    std::fs::remove_dir_all(&out_dir).unwrap();

    let bad = es2(&["eval", "--attacks", "direct,autodan"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("autodan") && stderr.contains("soft-prompt"),
        "{stderr}"
    );
}

/// A number of a report that must be finite and above zero.
fn positive(report: &Value, field: &str) -> f64 {
    let x = report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing or not a number: {report}"));
    assert!(x.is_finite() && x > 0.0, "{field} = {x}");
    x
}

#[test]
fn bench_lm_step_json_reports_times_rates_and_kernel_families() {
    let r = es2_json(&["bench", "lm-step", "--steps", "1", "--json"]);
    assert_eq!(r["workload"], "lm-step");
    assert_eq!(r["shape"], "peer-tiny");
    assert_eq!(r["tokens_per_step"], 8 * 64);
    positive(&r, "first_step_ms");
    let median = positive(&r, "median_step_ms");
    let rate = positive(&r, "tokens_per_s");
    assert!(
        (rate * median * 1e-3 - 512.0).abs() < 1e-6,
        "{rate} tokens/s"
    );
    assert_eq!(r["step_ms"].as_array().unwrap().len(), 1);
    // A seeded model of small weights starts near the uniform distribution: ln 512 per token.
    let losses: Vec<f64> = serde_json::from_value(r["losses"].clone()).unwrap();
    assert!(losses.len() >= 2, "{losses:?}");
    assert!((losses[0] - 512f64.ln()).abs() < 0.2, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(!r["adapter"].as_str().unwrap().is_empty());
    if r["timestamps"] == true {
        let families = r["families"].as_array().unwrap();
        let share: f64 = families
            .iter()
            .map(|f| f["percent"].as_f64().unwrap())
            .sum();
        assert!((share - 100.0).abs() < 1e-6, "{share}");
        // The tiled GEMM (matmul.wgsl) and, on lavapipe, the subgroup GEMM
        // (matmul_subgroup.wgsl).
        let gemms: Vec<&Value> = families
            .iter()
            .filter(|f| f["family"].as_str().unwrap().starts_with("matmul"))
            .collect();
        assert!(!gemms.is_empty(), "the step runs GEMMs: {families:?}");
        for gemm in gemms {
            positive(gemm, "gflops");
            positive(gemm, "gbytes_per_s");
            positive(gemm, "ms");
        }
        positive(&r, "profiled_step_ms");
    }
}

#[test]
fn bench_gemm_json_times_the_given_product_and_refuses_bad_sizes() {
    let r = es2_json(&["bench", "gemm", "64", "48", "40", "--json"]);
    assert_eq!(r["workload"], "gemm");
    let gemms = r["gemms"].as_array().unwrap();
    assert_eq!(gemms.len(), 1, "{r}");
    let g = &gemms[0];
    assert_eq!(
        (g["m"].clone(), g["n"].clone(), g["k"].clone()),
        (64.into(), 48.into(), 40.into())
    );
    let (ms, gflops) = (positive(g, "ms"), positive(g, "gflops"));
    positive(g, "first_ms");
    positive(g, "gbytes_per_s");
    let want = 2.0 * 64.0 * 48.0 * 40.0 / (ms * 1e-3) * 1e-9;
    assert!(
        (gflops - want).abs() < 1e-9 * want.max(1.0),
        "{gflops} vs {want}"
    );

    for bad in [
        &["bench", "gemm", "0", "4", "4"][..],
        &["bench", "lm-step", "4", "4", "4"],
    ] {
        let out = es2(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} succeeded");
        assert!(
            stderr.contains("M") && stderr.contains("N"),
            "{bad:?}: {stderr}"
        );
    }
}
