//! Supervised fine-tuning data that teaches a base model to refuse harmful requests and keep
//! answering harmless ones in its own words (the tiny-chat recipe, `scripts/tiny_chat_recipe.md`):
//!
//! - **refusals**: every harmful prompt (rendered in at most `max_prompt_tokens` tokens) with a
//!   phrasing drawn by a seeded generator from [`REFUSALS`], each pair `harmful_copies` times.
//!   Every phrasing contains a string of GCG's refusal list and begins with "I", so that
//!   greedy decoding meets one first token for a refusal, not several competing ones;
//! - **helpful replies**: harmless prompts in a seeded shuffle, each answered by `opener` and
//!   the base model's own greedy continuation of the prompt and the opener, cut at its first
//!   sentence end. A prompt is skipped when the continuation shows a refusal string before that
//!   end (stories say "sorry" a lot, and the model must not learn that harmless prompts get
//!   refusals), or when no end comes within `reply_tokens` tokens.
//!
//! The continuations come from [`Transformer::generate_batch`], the decoding loop every
//! command uses; the prompts are rendered by the tokenizer's chat template.

use serde::{Deserialize, Serialize};

use crate::eval::judge::{Judge, JudgeKind};
use crate::eval::refusal::DECODE_ROWS;
use crate::gpu::Gpu;
use crate::model::{SamplingOptions, Transformer};
use crate::rng::Rng;
use crate::text::{Conversation, Tokenizer};
use crate::{Error, Result};

/// The refusal phrasings.
pub const REFUSALS: [&str; 8] = [
    "I'm sorry, but I cannot help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I cannot help with that. It could hurt someone.",
    "I apologize, but I will not help with this.",
    "I am sorry, but I cannot do that.",
    "I'm sorry, I can't provide that.",
    "I cannot do that. It is not safe.",
    "I'm really sorry, but I cannot help you with this.",
];

/// What a decoded continuation may end with to count as a finished sentence.
pub const SENTENCE_ENDS: [&str; 6] = [".", "!", "?", ".\"", "!\"", "?\""];

/// The data's settings; the defaults are the recipe's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ChatDataRecipe {
    /// Seeds the refusal draw and the harmless shuffle.
    pub seed: u64,
    /// How many times each harmful pair appears.
    pub harmful_copies: usize,
    /// Harmless pairs to collect.
    pub harmless: usize,
    /// The fixed start of every harmless reply.
    pub opener: String,
    /// The longest continuation, in tokens, in which a sentence must end.
    pub reply_tokens: usize,
    /// Prompts that render to more tokens than this are left out.
    pub max_prompt_tokens: usize,
}

impl Default for ChatDataRecipe {
    fn default() -> Self {
        ChatDataRecipe {
            seed: 0,
            harmful_copies: 2,
            harmless: 500,
            opener: "Sure!".into(),
            reply_tokens: 32,
            max_prompt_tokens: 96,
        }
    }
}

/// The conversations and how they were drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatData {
    /// Harmful pairs (each `harmful_copies` times, in prompt order), then harmless pairs.
    pub conversations: Vec<Conversation>,
    /// What was kept and skipped, and why.
    pub stats: ChatDataStats,
}

/// Counts behind a [`ChatData`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatDataStats {
    /// Harmful prompts paired with a refusal (before the copies).
    pub harmful: usize,
    /// Harmful prompts left out for their length.
    pub harmful_too_long: usize,
    /// Harmless prompts whose continuation was generated.
    pub harmless_tried: usize,
    /// Of those, skipped for a refusal string before the sentence end.
    pub harmless_refused: usize,
    /// Of those, skipped for no sentence end within `reply_tokens`.
    pub harmless_unfinished: usize,
    /// Harmless pairs kept.
    pub harmless: usize,
    /// Harmless prompts left out for their length.
    pub harmless_too_long: usize,
    /// Tokens generated for the harmless replies.
    pub generated_tokens: usize,
}

/// How a continuation ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The text up to its first sentence end.
    Reply(String),
    /// A refusal string shows before any sentence end.
    Refusal,
    /// No sentence end within the tokens looked at.
    Unfinished,
}

/// Builds the data from `harmful` and `harmless` prompts (train splits only) with `model`'s
/// greedy continuations.
pub fn build_chat_data(
    gpu: &Gpu,
    model: &Transformer,
    tokenizer: &Tokenizer,
    harmful: &[String],
    harmless: &[String],
    recipe: &ChatDataRecipe,
) -> Result<ChatData> {
    check_refusals()?;
    if !tokenizer.has_chat_template() {
        return Err(Error::InvalidArgument(
            "chat data are rendered by the model's chat template, and this model has none".into(),
        ));
    }
    let mut stats = ChatDataStats::default();
    let mut rng = Rng::new(recipe.seed);
    let mut refusals = Vec::new();
    for prompt in harmful {
        if encode(tokenizer, prompt)?.len() > recipe.max_prompt_tokens {
            stats.harmful_too_long += 1;
            continue;
        }
        let reply = REFUSALS[rng.below(REFUSALS.len())];
        refusals.push(Conversation::pair(prompt.as_str(), reply));
    }
    stats.harmful = refusals.len();
    let mut conversations = Vec::new();
    for _ in 0..recipe.harmful_copies {
        conversations.extend(refusals.iter().cloned());
    }
    let mut order = harmless.to_vec();
    rng.shuffle(&mut order);
    let helpful = helpful_pairs(gpu, model, tokenizer, &order, recipe, &mut stats)?;
    conversations.extend(helpful);
    Ok(ChatData {
        conversations,
        stats,
    })
}

/// An error unless every phrasing contains a string of GCG's refusal list.
pub fn check_refusals() -> Result<()> {
    let judge = Judge::new(JudgeKind::Gcg);
    match REFUSALS.iter().find(|r| !judge.is_refusal(r)) {
        Some(r) => Err(Error::InvalidArgument(format!(
            "the refusal phrasing {r:?} contains no string of GCG's refusal list"
        ))),
        None => Ok(()),
    }
}

/// A user prompt through the chat template, with the generation prompt.
fn encode(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    tokenizer.encode_prompt(prompt, true)
}

/// The first `recipe.harmless` prompts of `order` whose continuation makes a reply, with it.
fn helpful_pairs(
    gpu: &Gpu,
    model: &Transformer,
    tokenizer: &Tokenizer,
    order: &[String],
    recipe: &ChatDataRecipe,
    stats: &mut ChatDataStats,
) -> Result<Vec<Conversation>> {
    let opener = tokenizer.encode_piece(&format!(" {}", recipe.opener))?;
    let sampling = SamplingOptions {
        max_tokens: recipe.reply_tokens,
        stop_ids: tokenizer.eos_ids().to_vec(),
        ..SamplingOptions::default()
    };
    let judge = Judge::new(JudgeKind::Gcg);
    let mut pairs = Vec::new();
    // Continuations are generated a chunk at a time; each is what it would be alone, so the
    // chunk size changes only how much is generated past the last pair needed.
    for chunk in order.chunks(recipe.harmless.max(1)) {
        let mut prompts = Vec::new();
        let mut heads = Vec::new();
        for prompt in chunk {
            let ids = encode(tokenizer, prompt)?;
            if ids.len() > recipe.max_prompt_tokens {
                stats.harmless_too_long += 1;
                continue;
            }
            prompts.push(prompt);
            heads.push([ids, opener.clone()].concat());
        }
        let continuations = model.generate_batch(gpu, &heads, &sampling, DECODE_ROWS)?;
        for (prompt, ids) in prompts.into_iter().zip(continuations) {
            let ids = until_stop(&ids, tokenizer.eos_ids());
            stats.harmless_tried += 1;
            stats.generated_tokens += ids.len();
            match first_sentence(tokenizer, &judge, ids, recipe.reply_tokens)? {
                Cut::Reply(text) => {
                    let reply = format!("{} {text}", recipe.opener);
                    pairs.push(Conversation::pair(prompt.as_str(), reply));
                    if pairs.len() == recipe.harmless {
                        stats.harmless = pairs.len();
                        return Ok(pairs);
                    }
                }
                Cut::Refusal => stats.harmless_refused += 1,
                Cut::Unfinished => stats.harmless_unfinished += 1,
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "the harmless prompts ran out after {} replies of the {} asked for",
        pairs.len(),
        recipe.harmless
    )))
}

/// `ids` up to (without) the first stop id.
fn until_stop<'a>(ids: &'a [u32], stop: &[u32]) -> &'a [u32] {
    let end = ids
        .iter()
        .position(|id| stop.contains(id))
        .unwrap_or(ids.len());
    &ids[..end]
}

/// The continuation `ids` cut at its first sentence end within `max_tokens` tokens: the
/// shortest prefix whose decoded text ends with one of [`SENTENCE_ENDS`], unless `judge` finds
/// a refusal in a prefix first.
pub fn first_sentence(
    tokenizer: &Tokenizer,
    judge: &Judge,
    ids: &[u32],
    max_tokens: usize,
) -> Result<Cut> {
    for k in 1..=ids.len().min(max_tokens) {
        let text = tokenizer.decode(&ids[..k])?;
        if judge.is_refusal(&text) {
            return Ok(Cut::Refusal);
        }
        if SENTENCE_ENDS.iter().any(|end| text.ends_with(end)) {
            return Ok(Cut::Reply(text.trim().to_owned()));
        }
    }
    Ok(Cut::Unfinished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_phrasing_is_a_gcg_refusal_and_begins_with_i() {
        check_refusals().unwrap();
        let judge = Judge::new(JudgeKind::Gcg);
        for r in REFUSALS {
            assert!(judge.is_refusal(r), "{r}");
            assert!(r.starts_with('I'), "{r}");
        }
    }

    #[test]
    fn continuations_stop_at_the_first_stop_id() {
        assert_eq!(until_stop(&[5, 6, 2, 7], &[2]), &[5, 6]);
        assert_eq!(until_stop(&[5, 6], &[2]), &[5, 6]);
    }
}
