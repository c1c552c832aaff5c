//! A model as an evaluation runs it: the transformer, its tokenizer, whether its LoRA adapters
//! run, and how prompts are rendered. Every pass an evaluation makes (embeddings, greedy
//! replies, losses) goes through a [`Subject`], so that a base model and its hardened twin can
//! share one set of weights on the GPU (adapters off and on).

use crate::gpu::{Gpu, Recorder};
use crate::model::embed::pooled_hidden_states;
use crate::model::{Batch, Forward, Hook, Output, Pass, SamplingOptions, Transformer};
use crate::ops::pool::Pool;
use crate::text::{Message, Tokenizer};
use crate::{Error, Result};

/// How prompts become token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prompting {
    /// Render prompts as a user message through the model's chat template (with the
    /// generation prompt); a model without a template gets the plain text.
    pub chat: bool,
    /// A longer prompt keeps its last `max_len` tokens (where its embedding is read).
    pub max_len: usize,
}

/// A model under evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The transformer.
    pub model: &'a Transformer,
    /// Its tokenizer (and chat template).
    pub tokenizer: &'a Tokenizer,
    /// Run the LoRA adapters (off: the model they are attached to).
    pub adapters: bool,
    /// How prompts become token ids.
    pub prompting: Prompting,
}

/// A prompt's ids with a slot: the index right after the user's message, where an attack
/// inserts its tokens (before the template closes the message and opens the reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slotted {
    /// The prompt's ids.
    pub ids: Vec<u32>,
    /// Where inserted tokens go: right after the user's message.
    pub slot: usize,
}

impl Slotted {
    /// The ids with `inserted` at the slot.
    pub fn with(&self, inserted: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.ids.len() + inserted.len());
        ids.extend_from_slice(&self.ids[..self.slot]);
        ids.extend_from_slice(inserted);
        ids.extend_from_slice(&self.ids[self.slot..]);
        ids
    }
}

impl<'a> Subject<'a> {
    /// Whether prompts go through the chat template.
    pub fn uses_chat(&self) -> bool {
        self.prompting.chat && self.tokenizer.has_chat_template()
    }

    /// A prompt's ids, truncated to its last `max_len` tokens.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode_prompt(prompt, self.uses_chat())?;
        Ok(keep_last(ids, self.prompting.max_len))
    }

    /// Every prompt's ids; an error names the prompt that failed.
    pub fn encode_all(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                self.encode(p)
                    .map_err(|e| Error::InvalidArgument(format!("prompt {}: {e}", i + 1)))
            })
            .collect()
    }

    /// A prompt's ids and its slot (see [`Slotted`]). The prompt is not truncated: an attack
    /// needs the whole message.
    pub fn encode_slotted(&self, prompt: &str) -> Result<Slotted> {
        if !self.uses_chat() {
            let ids = self.tokenizer.encode(prompt)?;
            let slot = ids.len();
            return Ok(Slotted { ids, slot });
        }
        let text = self.tokenizer.render_chat(&[Message::user(prompt)], true)?;
        let end = text
            .rfind(prompt)
            .map(|at| at + prompt.len())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the chat template does not write the user's message as it is, so there is no \
                 place after it to insert an attack"
                        .into(),
                )
            })?;
        let encoding = self
            .tokenizer
            .inner()
            .encode(text.as_str(), false)
            .map_err(|e| Error::InvalidArgument(format!("cannot tokenise a prompt: {e}")))?;
        // Tokens that start at or after the message's end follow the slot; a token that
        // straddles the end stays before it.
        let slot = encoding
            .get_offsets()
            .iter()
            .position(|&(start, stop)| start >= end && stop > start)
            .unwrap_or(encoding.len());
        Ok(Slotted {
            ids: encoding.get_ids().to_vec(),
            slot,
        })
    }

    /// `pass` with this subject's adapters setting.
    pub fn pass(&self, output: Output) -> Pass<'static> {
        Pass {
            adapters: self.adapters,
            ..Pass::new(output)
        }
    }

    /// Batches of at most `size` sequences.
    pub fn batches(&self, gpu: &Gpu, ids: &[Vec<u32>], size: usize) -> Result<Vec<Batch>> {
        ids.chunks(size.max(1))
            .map(|chunk| Batch::new(gpu, chunk, self.model.config.vocab_size))
            .collect()
    }

    /// Hidden states `hidden` of every sequence, pooled, on the host: per index `[n·C]`.
    pub fn pooled(
        &self,
        gpu: &Gpu,
        batches: &[Batch],
        hidden: &[usize],
        pool: Pool,
    ) -> Result<Vec<Vec<f64>>> {
        pooled_hidden_states(gpu, self.model, batches, hidden, pool, self.adapters)
    }

    /// Runs `batch` with `hooks` up to `output` and waits for it.
    pub fn run(&self, gpu: &Gpu, batch: &Batch, output: Output, hooks: &[Hook]) -> Result<Forward> {
        let pass = self.pass(output).with_hooks(hooks);
        let mut rec = Recorder::new(gpu);
        let forward = self.model.run(&mut rec, batch, &pass)?;
        rec.finish()?;
        Ok(forward)
    }

    /// The greedy replies to `prompts`, decoded side by side (at most `max_new_tokens` each,
    /// each ending at an end-of-sequence token), with `hooks` acting on every prompt and at
    /// every decoding step.
    pub fn replies(
        &self,
        gpu: &Gpu,
        prompts: &[Vec<u32>],
        hooks: &[Hook],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let context = self.model.config.max_position_embeddings;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let room = context.saturating_sub(longest);
        if room == 0 {
            return Err(Error::InvalidArgument(format!(
                "a {longest}-token prompt leaves no room in the model's context of {context} tokens"
            )));
        }
        let options = SamplingOptions {
            max_tokens: max_new_tokens.min(room),
            temperature: 0.0,
            stop_ids: self.tokenizer.eos_ids().to_vec(),
            adapters: self.adapters,
            ..SamplingOptions::default()
        };
        self.model
            .generate_rows(gpu, prompts, &options, hooks, |_, _| Ok(()))
    }

    /// The text of reply ids (special tokens skipped; bytes that are not UTF-8 read as
    /// U+FFFD, as attacked models emit broken text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    /// A neutral token to fill inserted positions with: "!" (GCG's initial suffix), the last
    /// token of its encoding (a sentencepiece tokenizer writes a word-start token first).
    pub fn filler_token(&self) -> Result<u32> {
        self.tokenizer
            .encode_piece("!")?
            .last()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("the tokenizer encodes \"!\" as nothing".into()))
    }

    /// Number of hidden states minus one: hidden-state indices run 0..=layers.
    pub fn layers(&self) -> usize {
        self.model.layers()
    }

    /// The hidden size C.
    pub fn width(&self) -> usize {
        self.model.config.hidden_size
    }
}

/// The last `max_len` ids.
pub fn keep_last(ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len {
        ids[ids.len() - max_len..].to_vec()
    } else {
        ids
    }
}
