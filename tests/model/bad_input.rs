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
