//! The model shapes `es2-wgpu bench` builds (from a config, seeded weights) and the GEMMs of
//! their steps.

use serde::Serialize;

use crate::model::{Config, LoraConfig, Projection, Trainable};
use crate::{Error, Result};

/// A model shape to benchmark at; the weights are seeded, never downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum BenchShape {
    /// The peer harnesses' tiny Llama: vocabulary 512, hidden 128, 4 layers, 4 heads, 2 KV
    /// heads, MLP 344, untied; 8 sequences of 64 tokens, full fine-tuning.
    #[default]
    PeerTiny,
    /// Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary
    /// 151,936, tied; 1 sequence of 75 tokens (per side under ES2), LoRA.
    #[cfg_attr(feature = "cli", value(name = "qwen2.5-0.5b"))]
    #[serde(rename = "qwen2.5-0.5b")]
    Qwen2_5_0_5b,
    /// A Llama-3-style 1B model (Llama-3.2-1B's config, its embedding untied from the LM
    /// head): hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 128,256,
    /// rope θ 500,000 with llama3 scaling; 1 sequence of 75 tokens (per side under ES2), LoRA.
    #[cfg_attr(feature = "cli", value(name = "llama-3-1b"))]
    #[serde(rename = "llama-3-1b")]
    Llama3_1b,
    /// A 7B-class model (Mistral-7B's shape): hidden 4096, 32 layers, 32 heads, 8 KV heads,
    /// MLP 14336, vocabulary 32,000, untied; 1 sequence of 128 tokens, LoRA, f16 block
    /// weights (about 15 GB of GPU memory). For a real GPU.
    #[cfg_attr(feature = "cli", value(name = "mistral-7b"))]
    #[serde(rename = "mistral-7b")]
    Mistral7b,
}

/// The peer harnesses' model (their `VOCAB`, `HIDDEN`, ... constants).
const PEER_TINY: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "tie_word_embeddings": false
}"#;

/// Qwen2.5-0.5B's config.json, minus the fields the loader ignores.
const QWEN2_5_0_5B: &str = r#"{
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "tie_word_embeddings": true, "bos_token_id": 151643, "eos_token_id": 151645
}"#;

/// Llama-3.2-1B's config.json, minus the fields the loader ignores, with
/// `tie_word_embeddings` false: a separate 128,256-row LM head, as Llama-3-8B has.
const LLAMA_3_1B: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "attention_bias": false, "mlp_bias": false,
    "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

/// Mistral-7B-v0.1's config.json, minus the fields the loader ignores.
const MISTRAL_7B: &str = r#"{
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
    "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
}"#;

impl BenchShape {
    /// Every shape, smallest first.
    pub const ALL: [BenchShape; 4] = [
        BenchShape::PeerTiny,
        BenchShape::Qwen2_5_0_5b,
        BenchShape::Llama3_1b,
        BenchShape::Mistral7b,
    ];

    /// The shape `--shape` calls `name`.
    pub fn from_name(name: &str) -> Option<BenchShape> {
        BenchShape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The name `--shape` takes.
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::PeerTiny => "peer-tiny",
            BenchShape::Qwen2_5_0_5b => "qwen2.5-0.5b",
            BenchShape::Llama3_1b => "llama-3-1b",
            BenchShape::Mistral7b => "mistral-7b",
        }
    }

    /// The model's configuration.
    pub fn config(self) -> Result<Config> {
        let json = match self {
            BenchShape::PeerTiny => PEER_TINY,
            BenchShape::Qwen2_5_0_5b => QWEN2_5_0_5B,
            BenchShape::Llama3_1b => LLAMA_3_1B,
            BenchShape::Mistral7b => MISTRAL_7B,
        };
        Config::from_json(json).map_err(Error::InvalidArgument)
    }

    /// Sequences per batch (per side under ES2) and tokens per sequence.
    pub fn default_batch(self) -> (usize, usize) {
        match self {
            BenchShape::PeerTiny => (8, 64),
            BenchShape::Qwen2_5_0_5b | BenchShape::Llama3_1b => (1, 75),
            BenchShape::Mistral7b => (1, 128),
        }
    }

    /// What trains by default: everything at the tiny shape, LoRA adapters at the others.
    pub fn default_trainable(self) -> Trainable {
        match self {
            BenchShape::PeerTiny => Trainable::Full,
            _ => Trainable::Lora,
        }
    }
}

/// One GEMM to time: `C [M, N] = op(A) · op(B)`, op a transpose where the flag says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GemmCase {
    /// What the product is (`square`, `gate forward`, ...).
    pub label: String,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// A is stored `[K, M]`.
    pub transpose_a: bool,
    /// B is stored `[N, K]` (a weight in the forward).
    pub transpose_b: bool,
}

impl GemmCase {
    /// `A·B` with both operands stored as written: the layout of a plain square matmul.
    pub fn plain(label: &str, m: usize, n: usize, k: usize) -> GemmCase {
        GemmCase {
            label: label.into(),
            m,
            n,
            k,
            transpose_a: false,
            transpose_b: false,
        }
    }

    /// The layout as `A·Bᵀ`-style text.
    pub fn layout(&self) -> String {
        let a = if self.transpose_a { "Aᵀ" } else { "A" };
        let b = if self.transpose_b { "Bᵀ" } else { "B" };
        format!("{a}·{b}")
    }

    pub(super) fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }

    /// The products of one training step at `shape` with `tokens` rows: each distinct block
    /// projection's forward (`X·Wᵀ`) and input gradient (`dY·W`), its weight gradient
    /// (`dYᵀ·X`) under full fine-tuning, and the LoRA down and up products (rank 16) under
    /// LoRA. The LM head is left out (it runs in vocabulary chunks).
    pub fn step_products(config: &Config, tokens: usize, trainable: Trainable) -> Vec<GemmCase> {
        let rank = LoraConfig::default().rank;
        let mut cases: Vec<GemmCase> = Vec::new();
        let mut add = |label: String, m, n, k, transpose_a, transpose_b| {
            let case = GemmCase {
                label,
                m,
                n,
                k,
                transpose_a,
                transpose_b,
            };
            let same = |c: &GemmCase| (c.m, c.n, c.k, c.transpose_a, c.transpose_b);
            if !cases.iter().any(|c| same(c) == same(&case)) {
                cases.push(case);
            }
        };
        for p in Projection::ALL {
            let (n, k) = config.projection_shape(p);
            let name = p.short();
            add(format!("{name} forward"), tokens, n, k, false, true);
            add(format!("{name} input grad"), tokens, k, n, false, false);
            match trainable {
                Trainable::Full => add(format!("{name} weight grad"), n, k, tokens, true, false),
                Trainable::Lora => {
                    add(format!("{name} LoRA down"), tokens, rank, k, false, true);
                    add(format!("{name} LoRA up"), tokens, n, rank, false, true);
                }
            }
        }
        cases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shapes_are_the_models_they_name() {
        let tiny = BenchShape::PeerTiny.config().unwrap();
        assert_eq!(
            (tiny.vocab_size, tiny.hidden_size, tiny.num_hidden_layers),
            (512, 128, 4)
        );
        assert_eq!(tiny.head_dim, 32);
        let qwen = BenchShape::Qwen2_5_0_5b.config().unwrap();
        assert_eq!((qwen.hidden_size, qwen.intermediate_size), (896, 4864));
        assert_eq!(qwen.head_dim, 64);
        assert!(qwen.tie_word_embeddings);
        let llama = BenchShape::Llama3_1b.config().unwrap();
        assert_eq!(
            (llama.vocab_size, llama.hidden_size, llama.num_hidden_layers),
            (128256, 2048, 16)
        );
        assert_eq!((llama.num_key_value_heads, llama.head_dim), (8, 64));
        assert!(!llama.tie_word_embeddings);
        for shape in BenchShape::ALL {
            assert_eq!(BenchShape::from_name(shape.name()), Some(shape));
        }
        assert_eq!(llama.rope_scaling.unwrap().factor, 32.0);
        let mistral = BenchShape::Mistral7b.config().unwrap();
        assert_eq!(mistral.head_dim, 128);
    }

    #[test]
    fn step_products_are_each_projection_layout_once() {
        let qwen = BenchShape::Qwen2_5_0_5b.config().unwrap();
        let lora = GemmCase::step_products(&qwen, 75, Trainable::Lora);
        // q/o, k/v, gate/up, down: 4 weight shapes × (forward + input grad); LoRA down on
        // K = 896 and 4864; LoRA up to N = 896, 128, 4864.
        assert_eq!(lora.len(), 4 * 2 + 2 + 3, "{lora:#?}");
        assert!(lora
            .iter()
            .any(|c| (c.m, c.n, c.k, c.transpose_b) == (75, 4864, 896, true)));
        let full = GemmCase::step_products(&qwen, 75, Trainable::Full);
        assert!(full
            .iter()
            .any(|c| (c.m, c.n, c.k, c.transpose_a) == (4864, 896, 75, true)));
    }
}
