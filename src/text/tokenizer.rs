//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate) together with its
//! chat template and special tokens, so that prompts become exactly the ids transformers makes.

use std::path::Path;

use serde_json::Value;

use super::chat::{ChatTemplate, Message};
use crate::{Error, Result};

/// A Hugging Face tokenizer with its chat template and end-of-sequence ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("chat_template", &self.chat.is_some())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// Special tokens and the chat template from `tokenizer_config.json`.
#[derive(Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` from a model folder. `config_eos` are the eos ids of
    /// `config.json`.
    pub fn from_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(
                &path,
                "missing: es2-wgpu reads the tokenizer from tokenizer.json, the fast-tokenizer \
                 file transformers writes. Copy it from the model's Hugging Face repository, or \
                 write it from what the folder has (tokenizer.model, vocab files) in Python: \
                 AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let template_file = dir.join("chat_template.jinja");
        let template = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| Error::io(&template_file, e))?,
            )
        } else {
            config.chat_template.clone()
        };
        let generation_eos = read_generation_eos(&dir.join("generation_config.json"))?;
        Self::from_parts(
            &text,
            &config,
            template.as_deref(),
            config_eos,
            &generation_eos,
        )
        .map_err(|message| Error::format(&path, message))
    }

    /// Builds a tokenizer from the text of a `tokenizer.json` and an optional chat template.
    pub fn from_json(
        tokenizer_json: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        chat_template: Option<&str>,
    ) -> std::result::Result<Self, String> {
        let config = TokenizerConfig {
            bos_token: bos_token.map(str::to_owned),
            eos_token: eos_token.map(str::to_owned),
            chat_template: None,
        };
        Self::from_parts(tokenizer_json, &config, chat_template, &[], &[])
    }

    fn from_parts(
        tokenizer_json: &str,
        config: &TokenizerConfig,
        template: Option<&str>,
        config_eos: &[u32],
        generation_eos: &[u32],
    ) -> std::result::Result<Self, String> {
        let inner: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| format!("not a valid tokenizer.json: {e}"))?;
        let chat = template
            .map(|source| {
                ChatTemplate::new(
                    source,
                    config.bos_token.as_deref().unwrap_or(""),
                    config.eos_token.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        // transformers stops at any of: generation_config's eos ids, else config.json's, plus
        // the tokenizer's own eos token.
        let mut eos_ids = if generation_eos.is_empty() {
            config_eos.to_vec()
        } else {
            generation_eos.to_vec()
        };
        if let Some(id) = config
            .eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
        {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Tokenizer {
            inner,
            chat,
            eos_ids,
            bos_token: config.bos_token.clone(),
        })
    }

    /// `tokenizer(text)`: the tokenizer's post-processor adds its special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenise {text:?}: {e}")))
    }

    /// `apply_chat_template(messages, add_generation_prompt)`: the rendered template, tokenised
    /// without adding special tokens (the template writes its own).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode_with(&text, false)
    }

    /// The chat template's text for `messages`.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this model has no chat template (use a plain prompt)".into())
        })?;
        template
            .render(messages, add_generation_prompt)
            .map_err(Error::InvalidArgument)
    }

    /// A single user prompt as the model expects it: through the chat template with the
    /// generation prompt when `chat` is set, else as plain text.
    pub fn encode_prompt(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            self.encode_chat(&[Message::user(prompt)], true)
        } else {
            self.encode(prompt)
        }
    }

    /// Text for `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::InvalidArgument(format!("cannot decode ids: {e}")))
    }

    /// Whether the model has a chat template (so prompts can be sent as chat messages).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The beginning-of-sequence token, when the tokenizer adds one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer, for streaming decoding and the like.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// An incremental decoder for the tokens that follow `context` (the prompt): each
    /// [`TextStream::step`] gives the new text as transformers' text-generation pipeline
    /// would (decoded with the prompt, the prompt's text cut off), holding back a multi-byte
    /// character until its last byte arrives. Special tokens are skipped.
    pub fn stream(&self, context: &[u32]) -> Result<TextStream<'_>> {
        Ok(TextStream {
            tokenizer: self,
            ids: context.to_vec(),
            prefix: self.decode(context)?,
            prefix_index: context.len(),
        })
    }
}

/// Text for generated tokens, one piece at a time; see [`Tokenizer::stream`].
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    /// Ids still needed to decode the next piece in context: the tail of what came before
    /// (whose text is `prefix`) and the tokens not yet turned into text.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl TextStream<'_> {
    /// The text that `id` completes, if any (none while a character is incomplete).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        tokenizers::step_decode_stream(
            &self.tokenizer.inner,
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| Error::InvalidArgument(format!("cannot decode token {id}: {e}")))
    }

    /// Whatever is still held back (an incomplete character, decoded lossily).
    pub fn finish(self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(text
            .strip_prefix(self.prefix.as_str())
            .unwrap_or_default()
            .to_owned())
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A special token is written either as a string or as an AddedToken object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig> {
    let Some(v) = read_json(path)? else {
        return Ok(TokenizerConfig::default());
    };
    let chat_template = match v.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // Several named templates: transformers uses the one called "default".
        Some(Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        Some(_) => {
            return Err(Error::format(
                path,
                "chat_template must be a string or a list of {name, template}",
            ))
        }
    };
    Ok(TokenizerConfig {
        bos_token: token_text(v.get("bos_token")),
        eos_token: token_text(v.get("eos_token")),
        chat_template,
    })
}

fn read_generation_eos(path: &Path) -> Result<Vec<u32>> {
    let Some(v) = read_json(path)? else {
        return Ok(Vec::new());
    };
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match v.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                as_id(x).ok_or_else(|| Error::format(path, "eos_token_id holds a non-integer"))
            })
            .collect(),
        Some(x) => as_id(x)
            .map(|id| vec![id])
            .ok_or_else(|| Error::format(path, "eos_token_id must be an integer or a list")),
    }
}
