//! LoRA adapters on a [`Transformer`]: attaching freshly initialised adapters (PEFT's
//! initialisation), loading and saving them in PEFT's format (`adapter_model.safetensors` +
//! `adapter_config.json`, loadable with `PeftModel.from_pretrained`), and merging them into the
//! base weights.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::linear::Lora;
use super::transformer::{projection_name, Transformer, PROJECTIONS};
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
    pub rank: usize,
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Projections by short name: q, k, v, o, gate, up, down.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    /// ARCHITECTURE.md's defaults (the Circuit Breakers / CRL anchors): rank 16, alpha 16, every
    /// attention and MLP projection.
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Checks the rank, alpha, dropout and target names.
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
        for t in &self.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                let expected = PROJECTIONS.join(", ");
                let message = format!("unknown projection '{t}' (expected some of {expected})");
                return Err(Error::config("lora.targets", message));
            }
        }
        Ok(())
    }
}

/// `q` ↔ `q_proj`.
fn peft_module(short: &str) -> String {
    format!("{short}_proj")
}

fn short_module(peft: &str) -> Option<&str> {
    let short = peft.strip_suffix("_proj")?;
    PROJECTIONS.contains(&short).then_some(short)
}

fn peft_name(layer: usize, proj: &str, matrix: &str) -> String {
    format!(
        "base_model.model.{}.lora_{matrix}.weight",
        projection_name(layer, proj)
    )
}

impl Transformer {
    /// Attaches adapters initialised as PEFT does: A ~ U(±1/√in) (Kaiming-uniform with
    /// a = √5), B = 0, so the model is unchanged until the first update.
    pub fn attach_lora(&mut self, gpu: &Gpu, config: &LoraConfig, seed: u64) -> Result<()> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        for block in &mut self.blocks {
            for target in &config.targets {
                let linear = block.projection_mut(target).expect("validated target");
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

    /// Loads a PEFT adapter folder onto the model; returns its configuration.
    pub fn load_adapter(&mut self, gpu: &Gpu, dir: &Path) -> Result<LoraConfig> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
        let bad = |m: String| Error::format(&config_path, m);
        if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
            return Err(bad("peft_type is not \"LORA\"".into()));
        }
        let rank = v["r"]
            .as_u64()
            .ok_or_else(|| bad("r must be an integer".into()))? as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("lora_alpha must be a number".into()))? as f32;
        let targets = v["target_modules"]
            .as_array()
            .ok_or_else(|| bad("target_modules must be a list".into()))?
            .iter()
            .map(|t| {
                t.as_str()
                    .and_then(short_module)
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("unsupported target module {t}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let config = LoraConfig {
            rank,
            alpha,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
            targets,
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        let weights_path = dir.join("adapter_model.safetensors");
        let checkpoint = Checkpoint::open_file(&weights_path)?;
        for (layer, block) in self.blocks.iter_mut().enumerate() {
            for target in &config.targets {
                let linear = block.projection_mut(target).expect("validated target");
                let (out, inp) = (linear.out_features(), linear.in_features());
                let a = checkpoint.load_f32(&peft_name(layer, target, "A"), &[rank, inp])?;
                let b = checkpoint.load_f32(&peft_name(layer, target, "B"), &[out, rank])?;
                linear.lora = Some(Lora {
                    a: Tensor::from_f32(gpu, [rank, inp], &a)?,
                    b: Tensor::from_f32(gpu, [out, rank], &b)?,
                    scale: config.scale(),
                });
            }
        }
        Ok(config)
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
        for (layer, block) in self.blocks.iter().enumerate() {
            for proj in PROJECTIONS {
                let Some(lora) = &block.projection(proj).and_then(|l| l.lora.as_ref()) else {
                    continue;
                };
                for (matrix, t) in [("A", &lora.a), ("B", &lora.b)] {
                    tensors.push((
                        peft_name(layer, proj, matrix),
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
            "target_modules": config.targets.iter().map(|t| peft_module(t)).collect::<Vec<_>>(),
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
    /// stored in f16 is first widened into an f32 copy that replaces it, since rounding the
    /// sum back to f16 would lose much of a small update: merged projections are f32.
    pub fn merge_lora(&mut self, gpu: &Gpu) -> Result<()> {
        let mut rec = Recorder::new(gpu);
        for block in &mut self.blocks {
            for proj in PROJECTIONS {
                let linear = block
                    .projection_mut(proj)
                    .expect("PROJECTIONS names projections");
                let Some(lora) = linear.lora.take() else {
                    continue;
                };
                if linear.weight.dtype() == DType::F16 {
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
        self.blocks.iter().any(|b| {
            PROJECTIONS
                .iter()
                .any(|p| b.projection(p).is_some_and(|l| l.lora.is_some()))
        })
    }
}
