//! LoRA adapters on a [`Transformer`]: attaching freshly initialised adapters (PEFT's
//! initialisation), loading and saving them in PEFT's format (`adapter_model.safetensors` +
//! `adapter_config.json`, loadable with `PeftModel.from_pretrained`), and merging them into the
//! base weights.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::linear::Lora;
use super::names::{LoraMatrix, Param, Projection};
use super::transformer::Transformer;
use super::weights::Checkpoint;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::io::{write_json, write_safetensors, SaveTensor};
use crate::ops::cast::cast;
use crate::ops::matmul::{gemm, Gemm, MatmulOptions};
use crate::rng::Rng;
use crate::{Error, Result};

/// The adapter's shape and where it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LoraConfig {
    /// r: the inner width of every adapter (at least 1).
    pub rank: usize,
    /// α: the adapter's output is multiplied by `alpha / rank` (above 0).
    pub alpha: f32,
    /// Dropout on the adapter's input during training, in `[0, 1)`.
    pub dropout: f32,
    /// The projections that get an adapter (short names in JSON: q, k, v, o, gate, up, down).
    pub targets: Vec<Projection>,
}

impl Default for LoraConfig {
    /// ARCHITECTURE.md's defaults (the Circuit Breakers / CRL anchors): rank 16, alpha 16, every
    /// attention and MLP projection.
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: Projection::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`: what the adapter's output is multiplied by.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Checks the rank, alpha, dropout and targets.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora.rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            let message = format!("must be > 0, got {}", self.alpha);
            return Err(Error::config("lora.alpha", message));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            let message = format!("must be in [0, 1), got {}", self.dropout);
            return Err(Error::config("lora.dropout", message));
        }
        if self.targets.is_empty() {
            return Err(Error::config("lora.targets", "names no projection"));
        }
        Ok(())
    }
}

/// What a PEFT `adapter_config.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The rank, alpha, dropout and targets, validated.
    pub lora: LoraConfig,
    /// `base_model_name_or_path`: the model the adapter was trained on.
    pub base_model: Option<String>,
}

/// PEFT options that change what an adapter computes, which es2-wgpu does not implement:
/// each must be absent, null, false or empty.
const UNSUPPORTED_OPTIONS: [&str; 11] = [
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layer_replication",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
];

/// Reads and checks `dir/adapter_config.json`: a plain LoRA adapter on the projections.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    use serde_json::Value;
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
    let bad = |m: String| Error::format(&config_path, m);
    if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad(format!(
            "peft_type is {}, not \"LORA\": es2-wgpu loads LoRA adapters only",
            v.get("peft_type").unwrap_or(&Value::Null)
        )));
    }
    let unset = |v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    for option in UNSUPPORTED_OPTIONS {
        if let Some(value) = v.get(option).filter(|x| !unset(x)) {
            return Err(bad(format!(
                "{option} = {value} is not supported: es2-wgpu applies plain LoRA adapters"
            )));
        }
    }
    if let Some(bias) = v
        .get("bias")
        .filter(|b| b.as_str() != Some("none") && !b.is_null())
    {
        return Err(bad(format!(
            "bias = {bias} is not supported: es2-wgpu applies plain LoRA adapters (bias \"none\")"
        )));
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r must be a positive integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("lora_alpha must be a number".into()))? as f32;
    let targets = v
        .get("target_modules")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad(format!(
                "target_modules must be a list of module names such as q_proj; found {}",
                v.get("target_modules").unwrap_or(&Value::Null)
            ))
        })?
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|name| Projection::parse(name).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "unsupported target module {t}: es2-wgpu adapts {}",
                        Projection::ALL.map(Projection::module).join(", ")
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let lora = LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        targets,
    };
    lora.validate().map_err(|e| bad(e.to_string()))?;
    Ok(AdapterConfig {
        lora,
        base_model: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// A warning for the user when the adapter in `dir` was trained on a model other than `spec`
/// (by [`same_base`]); `None` when it names `spec` or no model. An error when `dir` holds no
/// readable adapter configuration.
pub fn adapter_base_warning(dir: &Path, spec: &str) -> Result<Option<String>> {
    let base = read_adapter_config(dir)?.base_model;
    Ok(base.filter(|b| !same_base(b, spec)).map(|base| {
        format!(
            "warning: the adapter in {} was trained on {base}, and is applied to {spec}; unless \
             that is the same model under another name, its outputs are meaningless",
            dir.display()
        )
    }))
}

/// Whether an adapter's `base_model_name_or_path` plausibly names the model `spec`: the same
/// text, the same folder, or the same last path component (a hub name such as
/// `org/Model-7B` against a local copy in `models/Model-7B`).
pub fn same_base(base: &str, spec: &str) -> bool {
    let canonical = |p: &str| std::fs::canonicalize(p).ok();
    let last = |p: &str| {
        Path::new(p.trim_end_matches('/'))
            .file_name()
            .map(|n| n.to_owned())
    };
    base == spec
        || canonical(base).is_some_and(|b| Some(b) == canonical(spec))
        || last(base).is_some_and(|b| Some(b) == last(spec))
}

impl Transformer {
    /// Attaches adapters initialised as PEFT does: A ~ U(±1/√in) (Kaiming-uniform with
    /// a = √5), B = 0, so the model is unchanged until the first update.
    pub fn attach_lora(&mut self, gpu: &Gpu, config: &LoraConfig, seed: u64) -> Result<()> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        for block in &mut self.blocks {
            for &target in &config.targets {
                let linear = &mut block.proj[target];
                let (out, inp) = (linear.out_features(), linear.in_features());
                let bound = 1.0 / (inp as f64).sqrt();
                let a = rng.uniform_vec(config.rank * inp, -bound, bound);
                linear.lora = Some(Lora {
                    a: Tensor::from_f32(gpu, [config.rank, inp], &a)?,
                    b: Tensor::from_f32(gpu, [out, config.rank], &vec![0.0; out * config.rank])?,
                    scale: config.scale(),
                });
            }
        }
        Ok(())
    }

    /// Loads a PEFT adapter folder onto the model; returns its configuration. Every tensor is
    /// checked against the configuration and the model before any is attached, so a
    /// mismatched adapter leaves the model as it was.
    pub fn load_adapter(&mut self, gpu: &Gpu, dir: &Path) -> Result<LoraConfig> {
        let adapter = read_adapter_config(dir)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let checkpoint = Checkpoint::open_file(&weights_path)?;
        self.check_adapter(&checkpoint, &weights_path, &adapter)?;
        let config = adapter.lora;
        let rank = config.rank;
        let arch = self.config.architecture;
        for (layer, block) in self.blocks.iter_mut().enumerate() {
            for &target in &config.targets {
                let linear = &mut block.proj[target];
                let (out, inp) = (linear.out_features(), linear.in_features());
                let name = |m| Param::Lora(layer, target, m).hf_name(arch);
                let a = checkpoint.load_f32(&name(LoraMatrix::A), &[rank, inp])?;
                let b = checkpoint.load_f32(&name(LoraMatrix::B), &[out, rank])?;
                linear.lora = Some(Lora {
                    a: Tensor::from_f32(gpu, [rank, inp], &a)?,
                    b: Tensor::from_f32(gpu, [out, rank], &b)?,
                    scale: config.scale(),
                });
            }
        }
        Ok(config)
    }

    /// The adapter's tensors are exactly those its configuration describes, shaped for this
    /// model; the error says which file is at odds with which, and what to do.
    fn check_adapter(
        &self,
        checkpoint: &Checkpoint,
        path: &Path,
        adapter: &AdapterConfig,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::format(path, m));
        let config = &adapter.lora;
        let base = adapter.base_model.as_deref().unwrap_or("(not named)");
        let other_model = format!(
            "the adapter was made for {base} (adapter_config.json's base_model_name_or_path), \
             a model of another shape: load it onto that model"
        );
        for name in checkpoint.names() {
            let Some((layer, proj, _)) = Param::parse_lora(name, self.config.architecture) else {
                return bad(format!(
                    "unexpected tensor {name}: es2-wgpu applies LoRA weights of the q, k, v, o, \
                     gate, up and down projections only"
                ));
            };
            if layer >= self.blocks.len() {
                return bad(format!(
                    "{name} is for layer {layer}, but the model has {} layers: {other_model}",
                    self.blocks.len()
                ));
            }
            if !config.targets.contains(&proj) {
                return bad(format!(
                    "{name}: adapter_config.json's target_modules ({}) does not name \
                     {}; the two files come from different adapters",
                    config
                        .targets
                        .iter()
                        .map(|t| t.module())
                        .collect::<Vec<_>>()
                        .join(", "),
                    proj.module()
                ));
            }
        }
        let arch = self.config.architecture;
        for (layer, block) in self.blocks.iter().enumerate() {
            for &target in &config.targets {
                let linear = &block.proj[target];
                let (out, inp) = (linear.out_features(), linear.in_features());
                let matrices = [
                    (LoraMatrix::A, [config.rank, inp]),
                    (LoraMatrix::B, [out, config.rank]),
                ];
                for (matrix, want) in matrices {
                    let name = Param::Lora(layer, target, matrix).hf_name(arch);
                    if !checkpoint.contains(&name) {
                        return bad(format!(
                            "no {name}, though adapter_config.json targets {}: the two files \
                             come from different adapters, or the adapter covers fewer layers \
                             than the model has ({}): {other_model}",
                            target.module(),
                            self.blocks.len()
                        ));
                    }
                    let shape = checkpoint.shape(&name)?;
                    let rank_at = if matrix == LoraMatrix::A { 0 } else { 1 };
                    if shape.len() == 2 && shape[rank_at] != config.rank {
                        return bad(format!(
                            "{name} has shape {shape:?}, rank {}, but adapter_config.json says \
                             r = {}: the two files come from different adapters",
                            shape[rank_at], config.rank
                        ));
                    }
                    if shape != want {
                        return bad(format!(
                            "{name} has shape {shape:?}, but this model's {} needs {want:?}: \
                             {other_model}",
                            target.module()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the attached adapters as a PEFT adapter folder (atomically, file by file).
    pub fn save_adapter(
        &self,
        gpu: &Gpu,
        dir: &Path,
        config: &LoraConfig,
        base_model: &str,
    ) -> Result<()> {
        let mut tensors = Vec::new();
        let arch = self.config.architecture;
        for (layer, block) in self.blocks.iter().enumerate() {
            for (p, linear) in block.proj.iter() {
                let Some(lora) = &linear.lora else {
                    continue;
                };
                for (matrix, t) in [(LoraMatrix::A, &lora.a), (LoraMatrix::B, &lora.b)] {
                    tensors.push((
                        Param::Lora(layer, p, matrix).hf_name(arch),
                        SaveTensor::Device {
                            gpu,
                            tensor: t.clone(),
                        },
                    ));
                }
            }
        }
        if tensors.is_empty() {
            return Err(Error::InvalidArgument(
                "the model has no LoRA adapters to save".into(),
            ));
        }
        let metadata = [("format".to_owned(), "pt".to_owned())].into();
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            tensors,
            Some(metadata),
        )?;
        let adapter_config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": config.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        });
        write_json(&dir.join("adapter_config.json"), &adapter_config)
    }

    /// Folds every adapter into its base weight (`W += scale·B·A`) and removes it. A weight
    /// stored in f16 or bf16 is first widened into an f32 copy that replaces it, since
    /// rounding the sum back to 16 bits would lose much of a small update: merged projections
    /// are f32.
    pub fn merge_lora(&mut self, gpu: &Gpu) -> Result<()> {
        let mut rec = Recorder::new(gpu);
        for block in &mut self.blocks {
            for (_, linear) in block.proj.iter_mut() {
                let Some(lora) = linear.lora.take() else {
                    continue;
                };
                if linear.weight.dtype() != DType::F32 {
                    let wide = Tensor::empty(gpu, linear.weight.shape().clone(), DType::F32);
                    cast(&mut rec, &linear.weight, &wide);
                    linear.weight = wide;
                }
                let (out, inp, r) = (linear.out_features(), linear.in_features(), lora.rank());
                let product = Gemm::dense(out, inp, r, false, false)
                    .with(MatmulOptions::accumulate().scaled(lora.scale));
                gemm(&mut rec, &product, &lora.b, &lora.a, None, &linear.weight);
            }
        }
        rec.finish()
    }

    /// Whether any adapter is attached.
    pub fn has_lora(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.proj.values().any(|l| l.lora.is_some()))
    }
}
