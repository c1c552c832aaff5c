//! Models defined by this project and built into the binary, so that every command runs with
//! no download: a Hugging Face `config.json` and chat template from `models/<name>/`, a
//! byte-level tokenizer built here in code, and seeded deterministic weights.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::config::Config;
use super::params::SeededInit;
use super::transformer::LoadOptions;
use crate::gpu::Gpu;
use crate::{Error, Result};

/// The model used when a command is given no `--model`.
pub const DEFAULT: &str = "tiny-llama";

/// Special tokens of the byte-level tokenizer, with ids following the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The token that ends a chat turn, and so generation.
const EOS_TOKEN: &str = "<|im_end|>";

/// One embedded model: its definition files and the seed of its weights.
#[derive(Debug)]
pub struct EmbeddedModel {
    /// What `--model` calls it, and the folder under `models/` that defines it.
    pub name: &'static str,
    config_json: &'static str,
    chat_template: &'static str,
    training_json: &'static str,
    seed: u64,
}

/// Training settings an embedded model prefers over the global defaults (each optional).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct TrainingPreset {
    /// Optimizer steps (`--steps`).
    pub steps: Option<usize>,
    /// The peak learning rate (`--lr`).
    pub lr: Option<f64>,
    /// Harmful prompts per step (`--harmful-batch`).
    pub harmful_batch: Option<usize>,
    /// Harmless prompts per step (`--harmless-batch`).
    pub harmless_batch: Option<usize>,
    /// Tokens kept per prompt (`--max-len`).
    pub max_len: Option<usize>,
    /// Steps between held-out evaluations (`--eval-every`).
    pub eval_every: Option<usize>,
}

static MODELS: [EmbeddedModel; 1] = [EmbeddedModel {
    name: DEFAULT,
    config_json: include_str!("../../models/tiny-llama/config.json"),
    chat_template: include_str!("../../models/tiny-llama/chat_template.jinja"),
    training_json: include_str!("../../models/tiny-llama/training.json"),
    seed: 0x0e52_71a7,
}];

/// The names of the embedded models.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// The embedded model called `name`.
pub fn find(name: &str) -> Option<&'static EmbeddedModel> {
    MODELS.iter().find(|m| m.name == name)
}

impl EmbeddedModel {
    /// Where error messages say the definition came from.
    fn origin(&self, file: &str) -> String {
        format!("embedded model {} (models/{}/{file})", self.name, self.name)
    }

    /// The validated configuration.
    pub fn config(&self) -> Result<Config> {
        Config::from_json(self.config_json)
            .map_err(|message| Error::format(self.origin("config.json"), message))
    }

    /// The training settings this model prefers (`models/<name>/training.json`).
    pub fn training_preset(&self) -> Result<TrainingPreset> {
        serde_json::from_str(self.training_json)
            .map_err(|e| Error::format(self.origin("training.json"), e.to_string()))
    }

    /// Its ChatML chat template.
    pub fn chat_template(&self) -> &'static str {
        self.chat_template
    }

    /// The token that ends generation.
    pub fn eos_token(&self) -> &'static str {
        EOS_TOKEN
    }

    /// Its weights: N(0, initializer_range²) matrices, unit norm weights, from a fixed seed, as
    /// transformers initialises a fresh Llama.
    pub fn init(&self) -> Result<SeededInit> {
        let config: Value = serde_json::from_str(self.config_json)
            .map_err(|e| Error::format(self.origin("config.json"), e.to_string()))?;
        let std = config["initializer_range"].as_f64().ok_or_else(|| {
            Error::format(
                self.origin("config.json"),
                "initializer_range must be a number",
            )
        })?;
        Ok(SeededInit {
            seed: self.seed,
            std,
        })
    }

    /// The text of its `tokenizer.json`.
    pub fn tokenizer_json(&self) -> String {
        byte_level_tokenizer_json(&SPECIAL_TOKENS)
    }

    /// Writes the model out as a Hugging Face folder (config, tokenizer, chat template and f32
    /// `model.safetensors`) that transformers and [`super::open_model`] load as it is.
    pub fn write_hf_folder(&self, gpu: &Gpu, dir: &Path) -> Result<()> {
        let (model, _) = super::open::open_embedded(gpu, self, &LoadOptions::default())?;
        super::save::save_pretrained(gpu, &model, self.name, dir)
    }

    /// The tokenizer side of a Hugging Face folder: `tokenizer.json`, `tokenizer_config.json`
    /// and `chat_template.jinja`.
    pub fn write_tokenizer_files(&self, dir: &Path) -> Result<()> {
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": null,
            "eos_token": EOS_TOKEN,
            "pad_token": SPECIAL_TOKENS[0],
        });
        let files = [
            ("tokenizer.json", self.tokenizer_json()),
            ("tokenizer_config.json", tokenizer_config.to_string()),
            ("chat_template.jinja", self.chat_template.to_owned()),
        ];
        for (name, text) in files {
            crate::io::atomic_write(&dir.join(name), |w| w.write_all(text.as_bytes()))?;
        }
        Ok(())
    }
}

/// GPT-2's reversible byte → character map: printable Latin-1 bytes stand for themselves, the
/// rest are moved to U+0100 and up, so every byte is one visible character.
pub fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// A `tokenizer.json` with one token per byte (token id = byte value, GPT-2's byte-level
/// alphabet, a BPE model without merges) followed by `special` tokens: any UTF-8 text round-
/// trips, and nothing opaque needs to be committed.
pub fn byte_level_tokenizer_json(special: &[&str]) -> String {
    let vocab: Map<String, Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), json!(b)))
        .collect();
    let added: Vec<Value> = special
        .iter()
        .enumerate()
        .map(|(i, content)| {
            json!({
                "id": 256 + i, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true,
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": [],
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        let distinct: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn default_model_is_listed_and_valid() {
        assert_eq!(names(), vec![DEFAULT]);
        let model = find(DEFAULT).unwrap();
        let config = model.config().unwrap();
        assert_eq!(config.vocab_size, 256 + SPECIAL_TOKENS.len());
        assert_eq!(config.eos_token_ids, vec![258]);
        assert_eq!(model.init().unwrap().std, 0.02);
        assert!(find("no-such-model").is_none());
    }
}
