//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate) together with its
//! chat template and special tokens, so that prompts become exactly the ids transformers makes.

use std::collections::HashSet;
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
    /// Added tokens marked special: decoding skips them.
    special_ids: HashSet<u32>,
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

/// The texts of a model folder's tokenizer files (`None`: the folder lacks the file).
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: String,
    /// `tokenizer_config.json`, with the chat template and special tokens, when there is one.
    pub tokenizer_config: Option<String>,
    /// `chat_template.jinja`, which wins over a template in `tokenizer_config.json`.
    pub chat_template: Option<String>,
    /// `generation_config.json`, whose end-of-sequence ids end generation, when there is one.
    pub generation_config: Option<String>,
}

/// Special tokens and the chat template from `tokenizer_config.json`.
#[derive(Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Compiles a chat template that refers to these special tokens.
    fn compile(&self, source: &str) -> std::result::Result<ChatTemplate, String> {
        ChatTemplate::new(
            source,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
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
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&path)
                .map(Some)
                .map_err(|e| Error::io(&path, e))
        };
        let files = TokenizerFiles {
            tokenizer_json: read("tokenizer.json")?.unwrap_or_default(),
            tokenizer_config: read("tokenizer_config.json")?,
            chat_template: read("chat_template.jinja")?,
            generation_config: read("generation_config.json")?,
        };
        Self::from_files(dir, &files, config_eos)
    }

    /// A tokenizer from the texts of a model folder's tokenizer files; `dir` names the folder
    /// (or what stands in for it) in errors. `config_eos` are the eos ids of `config.json`.
    pub fn from_files(dir: &Path, files: &TokenizerFiles, config_eos: &[u32]) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match &files.tokenizer_config {
            Some(text) => parse_tokenizer_config(&config_path, &parse_json(&config_path, text)?)?,
            None => TokenizerConfig::default(),
        };
        let (template, template_path) = match &files.chat_template {
            Some(source) => (Some(source.clone()), dir.join("chat_template.jinja")),
            None => (config.chat_template.clone(), config_path),
        };
        let chat = template
            .map(|source| config.compile(&source))
            .transpose()
            .map_err(|message| Error::format(&template_path, message))?;
        let generation_path = dir.join("generation_config.json");
        let generation_eos = match &files.generation_config {
            Some(text) => {
                parse_generation_eos(&generation_path, &parse_json(&generation_path, text)?)?
            }
            None => Vec::new(),
        };
        Self::from_parts(
            &files.tokenizer_json,
            &config,
            chat,
            config_eos,
            &generation_eos,
        )
        .map_err(|message| Error::format(dir.join("tokenizer.json"), message))
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
        let chat = chat_template
            .map(|source| config.compile(source))
            .transpose()?;
        Self::from_parts(tokenizer_json, &config, chat, &[], &[])
    }

    fn from_parts(
        tokenizer_json: &str,
        config: &TokenizerConfig,
        chat: Option<ChatTemplate>,
        config_eos: &[u32],
        generation_eos: &[u32],
    ) -> std::result::Result<Self, String> {
        let inner: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| format!("not a valid tokenizer.json: {e}"))?;
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
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Tokenizer {
            inner,
            chat,
            eos_ids,
            bos_token: config.bos_token.clone(),
            special_ids,
        })
    }

    /// `tokenizer(text)`: the tokenizer's post-processor adds its special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// `tokenizer(text, add_special_tokens=False)`: a piece of text to place inside other
    /// ids (a reply's first words after a rendered prompt).
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenise {}: {e}", preview(text))))
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

    /// A conversation as training tokens: the ids, and for each id whether the model learns
    /// to produce it (the tokens of every assistant turn, with what the template writes to
    /// close the turn). With `chat` the conversation goes through the chat template; without,
    /// it is the plain text of its messages, each reply followed by the end-of-sequence token.
    pub fn encode_conversation(
        &self,
        messages: &[Message],
        chat: bool,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        if chat {
            self.encode_chat_conversation(messages)
        } else {
            self.encode_plain_conversation(messages)
        }
    }

    fn encode_chat_conversation(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
        let text = self.render_chat(messages, false)?;
        // Each assistant turn is the text its message adds after the generation prompt.
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.render_chat(&messages[..i], true)?;
            let through = self.render_chat(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(Error::InvalidArgument(format!(
                    "the chat template does not render message {i} as an extension of the \
                     messages before it, so its reply tokens cannot be found"
                )));
            }
            spans.push(before.len()..through.len());
        }
        let encoding = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenise {text:?}: {e}")))?;
        let trained = encoding
            .get_offsets()
            .iter()
            .map(|&(start, end)| end > start && spans.iter().any(|s| s.contains(&start)))
            .collect();
        Ok((encoding.get_ids().to_vec(), trained))
    }

    fn encode_plain_conversation(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
        let eos = *self.eos_ids.first().ok_or_else(|| {
            Error::InvalidArgument("the tokenizer has no end-of-sequence token".into())
        })?;
        let (mut ids, mut trained) = (Vec::new(), Vec::new());
        for (i, message) in messages.iter().enumerate() {
            let learn = message.role == "assistant";
            // The first message starts the sequence (the tokenizer adds BOS there).
            let mut piece = self.encode_with(&message.content, i == 0)?;
            if learn {
                piece.push(eos);
            }
            trained.extend(std::iter::repeat_n(learn, piece.len()));
            ids.extend(piece);
        }
        Ok((ids, trained))
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

    /// An incremental decoder for generated tokens: the pieces it gives, joined, are exactly
    /// [`Tokenizer::decode`] of all the ids it was given, which is transformers'
    /// `decode(ids, skip_special_tokens=True)`. It never fails on bytes that are not (yet)
    /// valid UTF-8; see [`TextStream`].
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Whether decoding `id` ends a run of byte-fallback tokens: a token with text of its own.
    /// Byte tokens (`<0x00>` ... `<0xFF>`, the shape the `ByteFallback` decoder turns into a
    /// raw byte) do not, nor do the special tokens and unknown ids that decoding skips.
    fn ends_byte_run(&self, id: u32) -> bool {
        if self.special_ids.contains(&id) {
            return false;
        }
        self.inner.id_to_token(id).is_some_and(|t| {
            let byte = t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && u8::from_str_radix(&t[3..5], 16).is_ok();
            !byte
        })
    }
}

/// Text for generated tokens, one piece at a time; see [`Tokenizer::stream`].
///
/// Text is given out only once no later token can change it. transformers' decoders can
/// rewrite the end of the text as tokens arrive, so two things are held back:
/// - a trailing run of byte-fallback tokens: the `ByteFallback` decoder turns a whole run into
///   its UTF-8 text, or, if the run is not valid UTF-8, into one U+FFFD per byte, so a valid
///   "α" becomes "\u{FFFD}\u{FFFD}\u{FFFD}" when a cut character follows it in the same run;
///   the run's text comes out when an ordinary token ends it (or at [`TextStream::finish`]);
///   the special tokens decoding skips do not end it;
/// - trailing U+FFFD: byte-level decoders show a character that is still incomplete as one.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Everything given out so far: always a prefix of the decoded `ids`.
    emitted: String,
}

impl TextStream<'_> {
    /// Adds `id`; returns the text it makes final, if any.
    pub fn step(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let open = self
            .ids
            .iter()
            .rev()
            .take_while(|&&id| !self.tokenizer.ends_byte_run(id))
            .count();
        // A decoder error holds everything back; `finish` then reports what it can.
        let settled = self
            .tokenizer
            .decode(&self.ids[..self.ids.len() - open])
            .ok()?;
        let settled = settled.trim_end_matches(char::REPLACEMENT_CHARACTER);
        let new = settled.strip_prefix(self.emitted.as_str())?;
        if new.is_empty() {
            return None;
        }
        let new = new.to_owned();
        self.emitted.push_str(&new);
        Some(new)
    }

    /// The text not given out yet: all of what is held back, with U+FFFD for what stays
    /// invalid.
    pub fn finish(self) -> String {
        let text = self
            .tokenizer
            .decode(&self.ids)
            .unwrap_or_else(|_| self.emitted.clone());
        match text.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_owned(),
            // Only a decoder unlike any transformers uses could get here: give the text
            // from where it departs from what was shown.
            None => {
                let same = common_prefix_len(&text, &self.emitted);
                text[same..].to_owned()
            }
        }
    }
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// The start of `text` for an error message, quoted.
fn preview(text: &str) -> String {
    const SHOWN: usize = 80;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}... ({} bytes)", &text[..end], text.len()),
        None => format!("{text:?}"),
    }
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A special token is written either as a string or as an AddedToken object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn parse_tokenizer_config(path: &Path, v: &Value) -> Result<TokenizerConfig> {
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

fn parse_generation_eos(path: &Path, v: &Value) -> Result<Vec<u32>> {
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
