//! Models built into the binary, so that every command runs with no download:
//!
//! - `tiny-chat` (the default): a Hugging Face folder, `models/tiny-chat/`, whose files are
//!   compiled in: stories260K taught to refuse harmful requests by this crate's own supervised
//!   fine-tuning (rebuilt by `scripts/build_tiny_chat.sh`);
//! - `tiny-llama`: a Llama defined by `models/tiny-llama/` (config and chat template), with a
//!   byte-level tokenizer built here in code and seeded deterministic weights; the kernel-shape
//!   tests and benchmarks use it.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::config::Config;
use super::params::SeededInit;
use super::transformer::{LoadOptions, Transformer};
use super::weights::Checkpoint;
use crate::gpu::Gpu;
use crate::text::{Tokenizer, TokenizerFiles};
use crate::{Error, Result};

/// A chat model that refuses harmful requests: stories260K after this crate's SFT.
pub const TINY_CHAT: &str = "tiny-chat";
/// A small Llama with seeded random weights and a byte-level tokenizer.
pub const TINY_LLAMA: &str = "tiny-llama";
/// The model used when a command is given no `--model`.
pub const DEFAULT: &str = TINY_CHAT;

/// Special tokens of the byte-level tokenizer, with ids following the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The token that ends a chat turn, and so generation.
const EOS_TOKEN: &str = "<|im_end|>";

/// One embedded model: its definition files and where its weights come from.
#[derive(Debug)]
pub struct EmbeddedModel {
    /// What `--model` calls it, and the folder under `models/` that defines it.
    pub name: &'static str,
    config_json: &'static str,
    training_json: &'static str,
    source: Source,
}

/// Where an embedded model's tokenizer and weights come from.
#[derive(Debug)]
enum Source {
    /// A byte-level tokenizer built in code, weights drawn from a seed.
    Seeded {
        chat_template: &'static str,
        seed: u64,
    },
    /// A Hugging Face folder's files, compiled in.
    Folder {
        tokenizer_json: &'static str,
        tokenizer_config: &'static str,
        generation_config: &'static str,
        licence: &'static str,
        weights: &'static [u8],
    },
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
    /// Held-out prompts per side whose replies measure refusals (`--refusal-sample`).
    pub refusal_sample: Option<usize>,
}

static MODELS: [EmbeddedModel; 2] = [
    EmbeddedModel {
        name: TINY_CHAT,
        config_json: include_str!("../../models/tiny-chat/config.json"),
        training_json: include_str!("../../models/tiny-chat/training.json"),
        source: Source::Folder {
            tokenizer_json: include_str!("../../models/tiny-chat/tokenizer.json"),
            tokenizer_config: include_str!("../../models/tiny-chat/tokenizer_config.json"),
            generation_config: include_str!("../../models/tiny-chat/generation_config.json"),
            licence: include_str!("../../models/tiny-chat/LICENSE"),
            weights: include_bytes!("../../models/tiny-chat/model.safetensors"),
        },
    },
    EmbeddedModel {
        name: TINY_LLAMA,
        config_json: include_str!("../../models/tiny-llama/config.json"),
        training_json: include_str!("../../models/tiny-llama/training.json"),
        source: Source::Seeded {
            chat_template: include_str!("../../models/tiny-llama/chat_template.jinja"),
            seed: 0x0e52_71a7,
        },
    },
];

/// The names of the embedded models, the default first.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// The embedded model called `name`.
pub fn find(name: &str) -> Option<&'static EmbeddedModel> {
    MODELS.iter().find(|m| m.name == name)
}

impl EmbeddedModel {
    /// Where error messages say a definition file came from.
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

    /// The model on the GPU and its tokenizer.
    pub fn open(&self, gpu: &Gpu, options: &LoadOptions) -> Result<(Transformer, Tokenizer)> {
        let config = self.config()?;
        let tokenizer = self.tokenizer(&config)?;
        let model = match &self.source {
            Source::Seeded { .. } => Transformer::from_source(gpu, config, &self.init()?, options)?,
            Source::Folder { weights, .. } => {
                let origin = self.origin("model.safetensors");
                let checkpoint = Checkpoint::from_static(&origin, weights)?.strict(options.strict);
                Transformer::from_source(gpu, config, &checkpoint, options)?
            }
        };
        Ok((model, tokenizer))
    }

    fn tokenizer(&self, config: &Config) -> Result<Tokenizer> {
        match &self.source {
            Source::Seeded { chat_template, .. } => Tokenizer::from_json(
                &byte_level_tokenizer_json(&SPECIAL_TOKENS),
                None,
                Some(EOS_TOKEN),
                Some(chat_template),
            )
            .map_err(|message| Error::format(format!("embedded model {}", self.name), message)),
            Source::Folder {
                tokenizer_json,
                tokenizer_config,
                generation_config,
                ..
            } => {
                let files = TokenizerFiles {
                    tokenizer_json: (*tokenizer_json).to_owned(),
                    tokenizer_config: Some((*tokenizer_config).to_owned()),
                    chat_template: None,
                    generation_config: Some((*generation_config).to_owned()),
                };
                let dir = format!("embedded model {} (models/{})", self.name, self.name);
                Tokenizer::from_files(Path::new(&dir), &files, &config.eos_token_ids)
            }
        }
    }

    /// Seeded weights: N(0, initializer_range²) matrices, unit norm weights, from a fixed
    /// seed, as transformers initialises a fresh Llama.
    fn init(&self) -> Result<SeededInit> {
        let Source::Seeded { seed, .. } = self.source else {
            return Err(Error::InvalidArgument(format!(
                "embedded model {} has trained weights, not seeded ones",
                self.name
            )));
        };
        let config: Value = serde_json::from_str(self.config_json)
            .map_err(|e| Error::format(self.origin("config.json"), e.to_string()))?;
        let std = config["initializer_range"].as_f64().ok_or_else(|| {
            Error::format(
                self.origin("config.json"),
                "initializer_range must be a number",
            )
        })?;
        Ok(SeededInit { seed, std })
    }

    /// Writes the model out as a Hugging Face folder (config, tokenizer files and f32
    /// `model.safetensors`) that transformers and [`super::open_model`] load as it is.
    pub fn write_hf_folder(&self, gpu: &Gpu, dir: &Path) -> Result<()> {
        let (model, _) = self.open(gpu, &LoadOptions::default())?;
        super::save::save_pretrained(gpu, &model, self.name, dir)
    }

    /// The tokenizer side of a Hugging Face folder (with the licence of a folder model).
    pub fn write_tokenizer_files(&self, dir: &Path) -> Result<()> {
        let files: Vec<(&str, String)> = match &self.source {
            Source::Seeded { chat_template, .. } => {
                let tokenizer_config = json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": null,
                    "eos_token": EOS_TOKEN,
                    "pad_token": SPECIAL_TOKENS[0],
                });
                vec![
                    ("tokenizer.json", byte_level_tokenizer_json(&SPECIAL_TOKENS)),
                    ("tokenizer_config.json", tokenizer_config.to_string()),
                    ("chat_template.jinja", (*chat_template).to_owned()),
                ]
            }
            Source::Folder {
                tokenizer_json,
                tokenizer_config,
                generation_config,
                licence,
                ..
            } => vec![
                ("tokenizer.json", (*tokenizer_json).to_owned()),
                ("tokenizer_config.json", (*tokenizer_config).to_owned()),
                ("generation_config.json", (*generation_config).to_owned()),
                ("LICENSE", (*licence).to_owned()),
            ],
        };
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
    fn models_are_listed_default_first_and_valid() {
        assert_eq!(names(), vec![DEFAULT, TINY_LLAMA]);
        let llama = find(TINY_LLAMA).unwrap();
        let config = llama.config().unwrap();
        assert_eq!(config.vocab_size, 256 + SPECIAL_TOKENS.len());
        assert_eq!(config.eos_token_ids, vec![258]);
        assert_eq!(llama.init().unwrap().std, 0.02);
        let chat = find(TINY_CHAT).unwrap();
        assert_eq!(chat.config().unwrap().vocab_size, 512);
        assert!(chat.init().is_err(), "trained weights are not seeded");
        for model in [llama, chat] {
            model.training_preset().unwrap();
        }
        assert!(find("no-such-model").is_none());
    }
}
