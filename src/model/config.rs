//! `Config`: a Hugging Face `config.json` for the Llama family (Llama, Mistral, Qwen2), read
//! and checked once so that everything downstream can trust its numbers.

use std::path::Path;

use serde_json::Value;

use super::names::Projection;
pub use crate::ops::rope::Llama3RopeScaling;
use crate::{Error, Result};

/// The architectures es2-wgpu runs. All are pre-norm decoder-only transformers with RMSNorm,
/// rotary embeddings, grouped-query attention and a SwiGLU MLP; they differ in biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: biases only where `attention_bias` / `mlp_bias` ask for them.
    Llama,
    /// `MistralForCausalLM`: Llama's layout and weight names.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q, k and v, none elsewhere.
    Qwen2,
}

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The class name transformers gives it in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// transformers' `model_type` for it (`llama`, `mistral`, `qwen2`).
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// The model hyper-parameters es2-wgpu needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Which model family, from `architectures` (or `model_type` when that is absent).
    pub architecture: Architecture,
    /// V: rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// C: the width of the residual stream.
    pub hidden_size: usize,
    /// The MLP's inner width (gate and up project C to it, down back).
    pub intermediate_size: usize,
    /// L: the number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads per block.
    pub num_attention_heads: usize,
    /// Key/value heads per block; divides `num_attention_heads` (equal to it when the file
    /// does not say).
    pub num_key_value_heads: usize,
    /// The width of one head: even and at most 128 (`hidden_size / num_attention_heads`
    /// unless the file says otherwise).
    pub head_dim: usize,
    /// The ε inside every RMSNorm's square root (1e-6 when the file does not say).
    pub rms_norm_eps: f64,
    /// RoPE's base θ (10000 when the file does not say).
    pub rope_theta: f64,
    /// Llama-3 frequency scaling of RoPE, when the file asks for it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// The longest context the model takes: generation refuses a prompt plus new tokens past
    /// it (2048 when the file does not say).
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix itself (no `lm_head.weight` in the checkpoint).
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate, up and down (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// The beginning-of-sequence id, kept to be written back into a saved `config.json`.
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence ids (`eos_token_id`, one id or a list; empty when absent):
    /// generation stops on them unless `generation_config.json` names its own.
    pub eos_token_ids: Vec<u32>,
    /// The padding id, kept to be written back into a saved `config.json` (batches pad with
    /// id 0 and mask it, whatever this says).
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`): what
    /// [`WeightsDtype::Auto`](super::WeightsDtype::Auto) follows.
    pub torch_dtype: Option<String>,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|message| Error::format(path, message))
    }

    /// Parses a `config.json` document; the error says which field is wrong.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if !v.is_object() {
            return Err(format!("expected a JSON object of fields, found {v}"));
        }
        let field = Fields(&v);
        let architecture = field.architecture()?;
        let hidden_size = field.usize("hidden_size")?;
        let num_attention_heads = field.usize("num_attention_heads")?;
        let num_key_value_heads = field
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err("num_attention_heads must be positive".into());
        }
        let head_dim = match field.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads != 0 => {
                return Err(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                     ({num_attention_heads}), and no head_dim says how wide a head is"
                ))
            }
            None => hidden_size / num_attention_heads,
        };
        let attention_bias = field.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Mistral => (attention_bias, attention_bias),
        };
        let config = Config {
            architecture,
            vocab_size: field.usize("vocab_size")?,
            hidden_size,
            intermediate_size: field.usize("intermediate_size")?,
            num_hidden_layers: field.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: field.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: field.rope_theta()?,
            rope_scaling: field.rope_scaling()?,
            max_position_embeddings: field.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: field.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: field.opt_bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: field.opt_u32("bos_token_id")?,
            eos_token_ids: field.token_ids("eos_token_id")?,
            pad_token_id: field.opt_u32("pad_token_id")?,
            torch_dtype: field
                .opt_str("torch_dtype")
                .or_else(|| field.opt_str("dtype")),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 10),
            ("head_dim", self.head_dim, 128),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, most) in sizes {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
            if value > most {
                let why = if name == "head_dim" {
                    "the attention kernel supports"
                } else {
                    "any model es2-wgpu can run (a corrupt config.json?)"
                };
                return Err(format!("{name} = {value} is larger than the {most} {why}"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        let positive = [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ];
        for (name, value) in positive {
            if !(value > 0.0 && value.is_finite()) {
                return Err(format!("{name} must be a positive number, found {value}"));
            }
        }
        if let Some(s) = &self.rope_scaling {
            let ordered = 0.0 < s.low_freq_factor && s.low_freq_factor < s.high_freq_factor;
            if !(s.factor > 0.0 && ordered && s.original_max_position_embeddings > 0) {
                return Err(format!(
                    "rope scaling 'llama3' needs factor > 0, 0 < low_freq_factor < \
                     high_freq_factor and original_max_position_embeddings > 0; found {s:?}"
                ));
            }
        }
        Ok(())
    }

    /// `(out_features, in_features)` of projection `p`.
    pub fn projection_shape(&self, p: Projection) -> (usize, usize) {
        let (hidden, ffn) = (self.hidden_size, self.intermediate_size);
        match p {
            Projection::Q => (self.q_dim(), hidden),
            Projection::K | Projection::V => (self.kv_dim(), hidden),
            Projection::O => (hidden, self.q_dim()),
            Projection::Gate | Projection::Up => (ffn, hidden),
            Projection::Down => (hidden, ffn),
        }
    }

    /// Whether projection `p` has a bias in this architecture's configuration.
    pub fn projection_has_bias(&self, p: Projection) -> bool {
        match p {
            Projection::Q | Projection::K | Projection::V => self.qkv_bias,
            Projection::O => self.o_bias,
            Projection::Gate | Projection::Up | Projection::Down => self.mlp_bias,
        }
    }

    /// Width of the query projection output (heads × head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters of the base model.
    pub fn parameter_count(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let attn = c * self.q_dim() * 2 + c * self.kv_dim() * 2;
        let attn_bias = if self.qkv_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        } + if self.o_bias { c } else { 0 };
        let mlp = 3 * c * f + if self.mlp_bias { 2 * f + c } else { 0 };
        let layer = attn + attn_bias + mlp + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer + c + head
    }

    /// A `config.json` that transformers reads back as this configuration.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        if let Some(map) = v.as_object_mut() {
            if self.architecture == Architecture::Llama {
                map.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                map.insert("mlp_bias".into(), Value::Bool(self.mlp_bias));
            }
            if let Some(s) = &self.rope_scaling {
                map.insert(
                    "rope_scaling".into(),
                    serde_json::json!({
                        "rope_type": "llama3",
                        "factor": s.factor,
                        "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings,
                    }),
                );
            }
        }
        v
    }
}

/// Typed field access on a JSON object with errors that name the field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn architecture(&self) -> std::result::Result<Architecture, String> {
        let names: Vec<&str> = match self.get("architectures") {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if let Some(arch) = names.iter().find_map(|n| Architecture::from_hf(n)) {
            return Ok(arch);
        }
        let model_type = self.opt_str("model_type");
        match model_type.as_deref() {
            Some("llama") if names.is_empty() => Ok(Architecture::Llama),
            Some("mistral") if names.is_empty() => Ok(Architecture::Mistral),
            Some("qwen2") if names.is_empty() => Ok(Architecture::Qwen2),
            _ => Err(format!(
                "unsupported architecture {:?} (model_type {:?}); es2-wgpu runs \
                 LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM",
                names,
                model_type.unwrap_or_default()
            )),
        }
    }

    fn opt_usize(&self, name: &str) -> std::result::Result<Option<usize>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| format!("{name} must be a non-negative integer, found {v}")),
        }
    }

    fn usize(&self, name: &str) -> std::result::Result<usize, String> {
        self.opt_usize(name)?
            .ok_or_else(|| format!("missing required field {name}"))
    }

    fn opt_u32(&self, name: &str) -> std::result::Result<Option<u32>, String> {
        match self.opt_usize(name)? {
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| format!("{name} = {n} is out of range")),
            None => Ok(None),
        }
    }

    fn opt_f64(&self, name: &str) -> std::result::Result<Option<f64>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{name} must be a number, found {v}")),
        }
    }

    fn opt_bool(&self, name: &str) -> std::result::Result<Option<bool>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("{name} must be true or false, found {v}")),
        }
    }

    fn opt_str(&self, name: &str) -> Option<String> {
        self.get(name).and_then(Value::as_str).map(str::to_owned)
    }

    /// `eos_token_id` may be one id or a list.
    fn token_ids(&self, name: &str) -> std::result::Result<Vec<u32>, String> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| format!("{name} holds a non-integer {v}"))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| vec![n])
                .ok_or_else(|| format!("{name} must be an integer or a list, found {v}")),
        }
    }

    /// Newer transformers write `rope_parameters: {rope_theta, rope_type, ...}`; older ones
    /// `rope_theta` at the top level.
    fn rope_theta(&self) -> std::result::Result<f64, String> {
        if let Some(params) = self.get("rope_parameters") {
            if let Some(theta) = Fields(params).opt_f64("rope_theta")? {
                return Ok(theta);
            }
        }
        Ok(self.opt_f64("rope_theta")?.unwrap_or(10_000.0))
    }

    fn rope_scaling(&self) -> std::result::Result<Option<Llama3RopeScaling>, String> {
        let candidates = [self.get("rope_scaling"), self.get("rope_parameters")];
        for scaling in candidates.into_iter().flatten() {
            let s = Fields(scaling);
            let kind = s.opt_str("rope_type").or_else(|| s.opt_str("type"));
            match kind.as_deref() {
                None | Some("default") => continue,
                Some("llama3") => {
                    let need = |n: &str| {
                        s.opt_f64(n)?
                            .ok_or_else(|| format!("rope scaling 'llama3' needs {n}"))
                    };
                    return Ok(Some(Llama3RopeScaling {
                        factor: need("factor")?,
                        low_freq_factor: need("low_freq_factor")?,
                        high_freq_factor: need("high_freq_factor")?,
                        original_max_position_embeddings: need("original_max_position_embeddings")?
                            as usize,
                    }));
                }
                Some(other) => {
                    return Err(format!(
                        "rope scaling type '{other}' is not supported (only 'llama3')"
                    ))
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORIES: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":172,"num_hidden_layers":5,"num_attention_heads":8,
        "num_key_value_heads":4,"head_dim":8,"rms_norm_eps":1e-5,"vocab_size":512,
        "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},
        "tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"pad_token_id":null}"#;

    #[test]
    fn reads_new_style_rope_parameters() {
        let c = Config::from_json(STORIES).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.q_dim(), c.kv_dim()), (64, 32));
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.pad_token_id, None);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn reads_top_level_rope_theta_llama3_scaling_and_qwen_biases() {
        let json = r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":32,
            "intermediate_size":40,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":100,"rope_theta":1000000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192},
            "eos_token_id":[5,6],"tie_word_embeddings":true}"#;
        let c = Config::from_json(json).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |json: &str| Config::from_json(json).unwrap_err();
        assert!(
            err(r#"{"architectures":["GPTNeoXForCausalLM"]}"#).contains("unsupported architecture")
        );
        assert!(err(r#"{"architectures":["LlamaForCausalLM"]}"#).contains("missing required field"));
        let bad_heads = STORIES.replace("\"num_key_value_heads\":4", "\"num_key_value_heads\":3");
        assert!(err(&bad_heads).contains("not a multiple"));
        let bad_type = STORIES.replace("\"hidden_size\":64", "\"hidden_size\":\"64\"");
        assert!(err(&bad_type).contains("hidden_size must be a non-negative integer"));
        assert!(err("{").contains("not valid JSON"));
    }

    #[test]
    fn hf_json_round_trips() {
        let c = Config::from_json(STORIES).unwrap();
        let again = Config::from_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c.to_hf_json(), again.to_hf_json());
        assert_eq!(again.head_dim, 8);
    }
}
