//! LoRA adapters that do not fit: a rank, target list or base model at odds with the
//! adapter's weights or with the model give an error that says which file disagrees with what
//! and what to do, and leave the model as it was.

use std::path::{Path, PathBuf};

use es2_wgpu::model::{LoadOptions, LoraConfig, Projection, Transformer};
use es2_wgpu::testing::gpu;
use serde_json::Value;

use crate::fixtures::model_dir;

fn load(model: &str) -> Transformer {
    Transformer::load(gpu(), &model_dir(model), &LoadOptions::default()).unwrap()
}

/// A rank-4 adapter on q, v and down of llama-f32, saved to a scratch folder (removed when
/// dropped).
struct Adapter(PathBuf);

impl Adapter {
    fn new(tag: &str) -> Adapter {
        let dir = std::env::temp_dir().join(format!("es2-adapter-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Projection::Q, Projection::V, Projection::Down],
        };
        let mut model = load("llama-f32");
        model.attach_lora(gpu(), &config, 7).unwrap();
        let base = model_dir("llama-f32");
        model
            .save_adapter(gpu(), &dir, &config, base.to_str().unwrap())
            .unwrap();
        Adapter(dir)
    }

    fn edit_config(&self, edit: impl FnOnce(&mut Value)) {
        let path = self.0.join("adapter_config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    }

    /// The error loading it onto `model` gives; the model must come out without adapters.
    fn error_on(&self, model: &str) -> String {
        let mut model = load(model);
        let err = model.load_adapter(gpu(), &self.0).unwrap_err().to_string();
        assert!(!model.has_lora(), "a failed load left adapters attached");
        err
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
}

#[test]
fn adapter_loads_onto_its_own_base() {
    let adapter = Adapter::new("fits");
    let mut model = load("llama-f32");
    let config = model.load_adapter(gpu(), &adapter.0).unwrap();
    assert_eq!((config.rank, config.targets.len()), (4, 3));
    assert!(model.has_lora());
}

#[test]
fn rank_at_odds_with_the_weights_is_named() {
    let adapter = Adapter::new("rank");
    adapter.edit_config(|c| c["r"] = 8.into());
    assert_mentions(
        &adapter.error_on("llama-f32"),
        &[
            "adapter_model.safetensors",
            "lora_A.weight has shape [4, 48], rank 4",
            "r = 8",
            "different adapters",
        ],
    );
}

#[test]
fn targets_at_odds_with_the_weights_are_named() {
    let adapter = Adapter::new("fewer-targets");
    adapter.edit_config(|c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj"]));
    assert_mentions(
        &adapter.error_on("llama-f32"),
        &[
            "mlp.down_proj.lora_",
            "does not name down_proj",
            "different adapters",
        ],
    );
    let adapter = Adapter::new("more-targets");
    adapter.edit_config(|c| {
        c["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj", "down_proj"])
    });
    assert_mentions(
        &adapter.error_on("llama-f32"),
        &[
            "no base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
            "targets k_proj",
        ],
    );
}

#[test]
fn adapter_for_a_model_of_another_shape_names_its_base() {
    let adapter = Adapter::new("other-base");
    let base = model_dir("llama-f32");
    let base = base.to_str().unwrap();
    // Fewer layers than the adapter has.
    assert_mentions(
        &adapter.error_on("mistral-bf16-sharded"),
        &[
            "is for layer 2, but the model has 2 layers",
            base,
            "load it onto that model",
        ],
    );
    // As many layers, narrower projections.
    assert_mentions(
        &adapter.error_on("qwen2-f16"),
        &[
            "self_attn.q_proj.lora_A.weight has shape [4, 48]",
            "needs [4, 36]",
            base,
        ],
    );
}

#[test]
fn peft_options_es2_does_not_implement_are_refused() {
    let cases: [(&str, Value, &str); 5] = [
        ("use_dora", true.into(), "use_dora = true is not supported"),
        (
            "use_rslora",
            true.into(),
            "use_rslora = true is not supported",
        ),
        ("bias", "all".into(), "bias = \"all\" is not supported"),
        (
            "layers_to_transform",
            serde_json::json!([0]),
            "layers_to_transform = [0] is not supported",
        ),
        (
            "peft_type",
            "IA3".into(),
            "peft_type is \"IA3\", not \"LORA\"",
        ),
    ];
    for (field, value, want) in cases {
        let adapter = Adapter::new(&format!("option-{field}"));
        adapter.edit_config(|c| c[field] = value);
        assert_mentions(
            &adapter.error_on("llama-f32"),
            &["adapter_config.json", want],
        );
    }
}

#[test]
fn unexpected_tensor_in_the_adapter_is_named() {
    let adapter = Adapter::new("extra-tensor");
    let file = adapter.0.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let extra = vec![0u8; 4 * 301 * 4];
    tensors.push((
        "base_model.model.lm_head.lora_A.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 301], &extra)
            .unwrap(),
    ));
    let path = Path::new(&file);
    safetensors::serialize_to_file(tensors, None, path).unwrap();
    assert_mentions(
        &adapter.error_on("llama-f32"),
        &["unexpected tensor base_model.model.lm_head.lora_A.weight"],
    );
}

#[test]
fn adapter_trained_on_another_model_name_warns_on_the_command_line() {
    let adapter = Adapter::new("renamed-base");
    let model = model_dir("llama-f32");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_es2-wgpu"))
            .args(["generate", "--model", model.to_str().unwrap(), "--lora"])
            .arg(&adapter.0)
            .args(["--prompt", "hi", "--max-tokens", "1"])
            .output()
            .unwrap()
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    adapter.edit_config(|c| c["base_model_name_or_path"] = "someone/other-model".into());
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_mentions(&stderr, &["warning", "trained on someone/other-model"]);
}
