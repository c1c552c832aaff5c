//! Broken model folders give errors that name the file and what is wrong with it, never a
//! panic: each test copies a fixture model into a scratch folder and breaks one thing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use es2_wgpu::model::{embedded, open_model, LoadOptions};
use es2_wgpu::testing::gpu;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::fixtures::model_dir;

/// A private copy of a fixture model, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(model: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("es2-wgpu-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(model_dir(model)).unwrap() {
            let from = entry.unwrap().path();
            std::fs::copy(&from, dir.join(from.file_name().unwrap())).unwrap();
        }
        Scratch(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The error opening this folder gives, as the user sees it.
    fn open_error(&self) -> String {
        let spec = self.0.to_str().unwrap();
        open_model(gpu(), spec, &LoadOptions::default())
            .unwrap_err()
            .to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites a safetensors file after `edit` has changed its tensors.
fn rewrite_tensors(file: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

/// Rewrites the JSON header of a safetensors file, keeping its data bytes.
fn edit_header(file: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

fn edit_config(dir: &Scratch, edit: impl FnOnce(&mut Value)) {
    let path = dir.file("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn truncated_checkpoint_names_the_file_and_the_tensor_cut_off() {
    let dir = Scratch::copy_of("llama-f32", "truncated");
    let file = dir.file("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() * 3 / 5]).unwrap();
    let err = dir.open_error();
    assert_mentions(&err, &["model.safetensors", "truncated", "tensor model."]);
}

#[test]
fn header_with_offsets_past_the_end_names_the_tensor() {
    let dir = Scratch::copy_of("llama-f32", "lying-header");
    edit_header(&dir.file("model.safetensors"), |header| {
        // The last tensor in the file claims twice its size: shape and offsets agree, but
        // its data would run past the end of the file.
        let (name, last) = header
            .iter_mut()
            .filter(|(name, _)| *name != "__metadata__")
            .max_by_key(|(_, t)| t["data_offsets"][1].as_u64())
            .unwrap();
        let (start, end) = (
            last["data_offsets"][0].as_u64().unwrap(),
            last["data_offsets"][1].as_u64().unwrap(),
        );
        let rows = last["shape"][0].as_u64().unwrap();
        last["shape"][0] = (rows * 2).into();
        last["data_offsets"][1] = (end + (end - start)).into();
        println!("lying about {name}");
    });
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "lying header",
            "tensor model.",
            "ends at byte",
        ],
    );
}

#[test]
fn tensor_with_the_wrong_shape_names_tensor_and_shapes() {
    let dir = Scratch::copy_of("llama-f32", "wrong-shape");
    rewrite_tensors(&dir.file("model.safetensors"), |tensors| {
        let gate = tensors
            .get_mut("model.layers.1.mlp.gate_proj.weight")
            .unwrap();
        gate.1 = vec![48, 100];
    });
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.1.mlp.gate_proj.weight",
            "[48, 100]",
            "expected [100, 48]",
        ],
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_the_tensor() {
    let dir = Scratch::copy_of("llama-f32", "inconsistent-config");
    edit_config(&dir, |c| c["intermediate_size"] = 120.into());
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "expected [120, 48]",
        ],
    );
}

#[test]
fn integer_weight_names_the_tensor_and_dtype() {
    let dir = Scratch::copy_of("llama-f32", "i32-weight");
    rewrite_tensors(&dir.file("model.safetensors"), |tensors| {
        tensors
            .get_mut("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .0 = Dtype::I32;
    });
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.weight",
            "I32",
            "expected F32, F16 or BF16",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = Scratch::copy_of("llama-f32", "missing-tensor");
    rewrite_tensors(&dir.file("model.safetensors"), |tensors| {
        tensors.remove("model.layers.2.mlp.down_proj.weight");
    });
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.2.mlp.down_proj.weight",
            "missing",
        ],
    );
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = Scratch::copy_of("mistral-bf16-sharded", "missing-shard");
    std::fs::remove_file(dir.file("model-00002-of-00002.safetensors")).unwrap();
    let err = dir.open_error();
    assert_mentions(&err, &["model-00002-of-00002.safetensors"]);
}

#[test]
fn unknown_architecture_names_config_and_architecture() {
    let dir = Scratch::copy_of("llama-f32", "unknown-arch");
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        c["model_type"] = "gpt_neox".into();
    });
    let err = dir.open_error();
    assert_mentions(
        &err,
        &[
            "config.json",
            "unsupported architecture",
            "GPTNeoXForCausalLM",
        ],
    );
}

#[test]
fn missing_config_is_named() {
    let dir = Scratch::copy_of("llama-f32", "no-config");
    std::fs::remove_file(dir.file("config.json")).unwrap();
    assert_mentions(&dir.open_error(), &["config.json", "missing"]);
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = Scratch::copy_of("llama-f32", "no-tokenizer");
    std::fs::remove_file(dir.file("tokenizer.json")).unwrap();
    assert_mentions(&dir.open_error(), &["tokenizer.json", "missing"]);
}

#[test]
fn unknown_model_says_no_folder_and_lists_embedded_models() {
    let err = open_model(gpu(), "no/such/model", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["no/such/model", "does not exist"]);
    for name in embedded::names() {
        assert_mentions(&err, &[name]);
    }
}

/// Runs the `es2-wgpu` binary.
fn es2(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Overwrites the 8-byte header length at the start of a safetensors file.
fn set_header_len(file: &Path, n: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn header_longer_than_the_file_or_than_100_mb_is_named() {
    let dir = Scratch::copy_of("llama-f32", "long-header");
    let file = dir.file("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    set_header_len(&file, len + 10);
    let claims = format!("claims to be {} bytes long", len + 10);
    assert_mentions(
        &dir.open_error(),
        &["model.safetensors", &claims, "the file holds only"],
    );
    for n in [200_000_000, u64::MAX] {
        set_header_len(&file, n);
        assert_mentions(
            &dir.open_error(),
            &["model.safetensors", "more than the 100000000"],
        );
    }
    std::fs::write(&file, [1, 2, 3]).unwrap();
    assert_mentions(&dir.open_error(), &["model.safetensors", "too short"]);
}

#[test]
fn overlapping_tensors_are_named() {
    let dir = Scratch::copy_of("llama-f32", "overlap");
    edit_header(&dir.file("model.safetensors"), |header| {
        // Two tensors of one size: the second now claims the first one's bytes.
        let first = header["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        header["model.layers.1.input_layernorm.weight"]["data_offsets"] = first;
    });
    assert_mentions(
        &dir.open_error(),
        &[
            "model.safetensors",
            "overlap",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.input_layernorm.weight",
        ],
    );
}

/// Lists tensor `name` a second time at the start of the header, pointing at the data of
/// tensor `data_of` (itself for an exact duplicate).
fn duplicate_entry(file: &Path, name: &str, data_of: &str) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut entry = header[name].clone();
    entry["data_offsets"] = header[data_of]["data_offsets"].clone();
    let text = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let text = format!("{{{}:{entry},{}", Value::from(name), &text[1..]);
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn duplicate_tensor_names_are_named() {
    let name = "model.layers.1.input_layernorm.weight";
    for (tag, data_of) in [
        ("exact", name),
        ("other-data", "model.layers.0.input_layernorm.weight"),
    ] {
        let dir = Scratch::copy_of("llama-f32", &format!("duplicate-{tag}"));
        duplicate_entry(&dir.file("model.safetensors"), name, data_of);
        assert_mentions(
            &dir.open_error(),
            &["model.safetensors", name, "listed twice"],
        );
    }
}

/// Writes NaN and +Inf into two elements of a weight.
fn poison_weight(dir: &Scratch, name: &str) {
    rewrite_tensors(&dir.file("model.safetensors"), |tensors| {
        let data = &mut tensors.get_mut(name).unwrap().2;
        data[7 * 4..8 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
        data[9 * 4..10 * 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
}

#[test]
fn non_finite_weights_warn_by_default_and_are_refused_with_strict() {
    let dir = Scratch::copy_of("llama-f32", "non-finite");
    let name = "model.layers.1.self_attn.q_proj.weight";
    poison_weight(&dir, name);
    let spec = dir.0.to_str().unwrap();
    assert!(open_model(gpu(), spec, &LoadOptions::default()).is_ok());
    let strict = LoadOptions {
        strict: true,
        ..LoadOptions::default()
    };
    let err = open_model(gpu(), spec, &strict).unwrap_err().to_string();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            name,
            "2 non-finite values",
            "element 7, is NaN",
        ],
    );

    // The command line: a warning naming the tensor, or with --strict an error.
    let args = [
        "generate",
        "--model",
        spec,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ];
    let out = es2(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_mentions(&stderr, &["warning", name, "--strict"]);
    let out = es2(&[&args[..], &["--strict"]].concat());
    assert!(!out.status.success());
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["error", name]);
}

#[test]
fn absurd_config_fields_are_named() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 13] = [
        (
            "zero",
            |c| c["hidden_size"] = 0.into(),
            "hidden_size must be positive",
        ),
        (
            "huge-vocab",
            |c| c["vocab_size"] = 1_000_000_000_000u64.into(),
            "vocab_size = 1000000000000 is larger than",
        ),
        (
            "huge-layers",
            |c| c["num_hidden_layers"] = 100_000.into(),
            "num_hidden_layers = 100000 is larger than",
        ),
        (
            "huge-context",
            |c| c["max_position_embeddings"] = u64::MAX.into(),
            "max_position_embeddings = 18446744073709551615 is larger than",
        ),
        (
            "negative",
            |c| c["hidden_size"] = (-48).into(),
            "hidden_size must be a non-negative integer, found -48",
        ),
        (
            "fraction",
            |c| c["intermediate_size"] = 100.5.into(),
            "intermediate_size must be a non-negative integer, found 100.5",
        ),
        (
            "heads-do-not-divide",
            |c| {
                c.as_object_mut().unwrap().remove("head_dim");
                c["num_attention_heads"] = 5.into();
                c["num_key_value_heads"] = 5.into();
            },
            "hidden_size (48) is not a multiple of num_attention_heads (5)",
        ),
        (
            "kv-heads",
            |c| c["num_key_value_heads"] = 4.into(),
            "num_attention_heads (6) is not a multiple of num_key_value_heads (4)",
        ),
        (
            "wide-heads",
            |c| c["head_dim"] = 1000.into(),
            "head_dim = 1000 is larger than the 128 the attention kernel supports",
        ),
        (
            "negative-eps",
            |c| c["rms_norm_eps"] = (-1e-5).into(),
            "rms_norm_eps must be a positive number",
        ),
        (
            "zero-theta",
            |c| c["rope_parameters"]["rope_theta"] = 0.0.into(),
            "rope_theta must be a positive number",
        ),
        (
            "llama3-scaling",
            |c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192})
            },
            "low_freq_factor < high_freq_factor",
        ),
        (
            "not-an-object",
            |c| *c = serde_json::json!([1, 2]),
            "expected a JSON object",
        ),
    ];
    for (tag, edit, want) in cases {
        let dir = Scratch::copy_of("llama-f32", &format!("config-{tag}"));
        edit_config(&dir, edit);
        assert_mentions(&dir.open_error(), &["config.json", want]);
    }
}

#[test]
fn corrupt_tokenizer_files_are_named() {
    let original = std::fs::read(model_dir("llama-f32").join("tokenizer.json")).unwrap();
    let cases: [(&str, &str, Vec<u8>, &str); 6] = [
        (
            "truncated",
            "tokenizer.json",
            original[..original.len() / 2].to_vec(),
            "not a valid tokenizer.json",
        ),
        (
            "empty",
            "tokenizer.json",
            Vec::new(),
            "not a valid tokenizer.json",
        ),
        (
            "junk",
            "tokenizer.json",
            vec![0xFF, 0xFE, 0, 1, 2],
            "tokenizer.json",
        ),
        (
            "wrong-shape",
            "tokenizer.json",
            br#"{"model": 5}"#.to_vec(),
            "not a valid tokenizer.json",
        ),
        (
            "config",
            "tokenizer_config.json",
            b"{\"bos_token\": ".to_vec(),
            "not valid JSON",
        ),
        (
            "template",
            "chat_template.jinja",
            b"{% for m in messages %}{{ m.content }".to_vec(),
            "chat template does not parse",
        ),
    ];
    for (tag, file, bytes, want) in cases {
        let dir = Scratch::copy_of("llama-f32", &format!("tokenizer-{tag}"));
        std::fs::write(dir.file(file), bytes).unwrap();
        assert_mentions(&dir.open_error(), &[file, want]);
    }
}

/// The llama-f32 fixture's tokenizer with chat template `template`.
fn with_template(template: &str) -> es2_wgpu::text::Tokenizer {
    let json = std::fs::read_to_string(model_dir("llama-f32").join("tokenizer.json")).unwrap();
    es2_wgpu::text::Tokenizer::from_json(&json, Some("<s>"), Some("</s>"), Some(template)).unwrap()
}

#[test]
fn chat_templates_that_raise_loop_or_recurse_are_errors() {
    let cases = [
        (
            "{{ raise_exception('System role not supported') }}",
            "System role not supported",
        ),
        // 10¹⁰ iterations: stopped by the fuel limit, not left to hang.
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
        ),
        ("{{ 'x' * 200000000 }}", "too large"),
    ];
    for (template, want) in cases {
        let err = with_template(template)
            .encode_prompt("hi", true)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["chat template failed", want]);
    }
}

#[test]
fn real_chat_templates_render_long_conversations_within_the_fuel() {
    let template =
        std::fs::read_to_string(model_dir("qwen2-f16").join("chat_template.jinja")).unwrap();
    let tok = with_template(&template);
    let messages: Vec<es2_wgpu::text::Message> = (0..200)
        .map(|i| es2_wgpu::text::Message {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: "word ".repeat(500),
        })
        .collect();
    let text = tok.render_chat(&messages, true).unwrap();
    assert_eq!(text.matches("<|im_start|>").count(), 202);
}
