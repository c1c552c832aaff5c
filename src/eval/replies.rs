//! Greedy replies to a set of prompts, judged and checked for coherence: what every attack
//! ends with. A reply's coherence is measured by a reference model (the base model), given the
//! clean prompt: a "defence" that turns attacked replies into gibberish shows up as a high
//! perplexity and a high repetition rate instead of passing as safe.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::judge::{dsr, ListRates};
use super::loss::{sequence_losses, Scored, SequenceLoss};
use super::report::Coherence;
use super::subject::Subject;
use crate::gpu::Gpu;
use crate::model::Hook;
use crate::Result;

/// The n of the n-grams whose repeats [`repetition_rate`] counts.
pub const REPETITION_NGRAM: usize = 3;

/// Sequences per pass when a reference model scores replies.
const SCORING_BATCH: usize = 4;

/// Prompts decoded side by side: a decoding step of many rows costs little more than one of a
/// single row, and a reply that has ended rides along until its chunk has.
pub const REPLY_ROWS: usize = 16;

/// Replies to a set of prompts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Replies {
    /// The generated ids of each reply (the end-of-sequence token included when generated).
    pub ids: Vec<Vec<u32>>,
    /// Their text (special tokens skipped).
    pub texts: Vec<String>,
}

impl Replies {
    /// Every list's share of these replies judged refusals.
    pub fn rates(&self) -> ListRates {
        dsr(&self.texts)
    }

    /// Appends `other`'s replies after these.
    pub fn extend(&mut self, other: Replies) {
        self.ids.extend(other.ids);
        self.texts.extend(other.texts);
    }
}

/// The greedy replies of `subject` to each of `prompts`, with `hooks` acting on every prompt
/// and at every decoding step; up to [`REPLY_ROWS`] prompts are decoded side by side, and
/// `tick` is called after each reply.
pub fn generate_replies(
    gpu: &Gpu,
    subject: &Subject,
    prompts: &[Vec<u32>],
    hooks: &[Hook],
    max_new_tokens: usize,
    tick: &mut dyn FnMut(),
) -> Result<Replies> {
    let mut out = Replies::default();
    for chunk in prompts.chunks(REPLY_ROWS) {
        for reply in subject.replies(gpu, chunk, hooks, max_new_tokens)? {
            out.texts.push(subject.decode(&reply)?);
            out.ids.push(reply);
            tick();
        }
    }
    Ok(out)
}

/// The reference model's perplexity of the replies given the clean prompts (pooled over every
/// reply token) and the replies' repetition rate.
pub fn coherence(
    gpu: &Gpu,
    reference: &Subject,
    clean_prompts: &[Vec<u32>],
    replies: &Replies,
) -> Result<Coherence> {
    let items: Vec<Scored> = clean_prompts
        .iter()
        .zip(&replies.ids)
        .filter(|(_, reply)| !reply.is_empty())
        .map(|(prompt, reply)| Scored::continuation(prompt, reply))
        .collect();
    let losses = sequence_losses(gpu, reference, &items, &[], SCORING_BATCH)?;
    Ok(Coherence {
        perplexity: SequenceLoss::sum(&losses).mean().exp(),
        repetition: repetition_rate(&replies.texts),
    })
}

/// The share of word n-grams ([`REPETITION_NGRAM`]) in each reply that repeat an earlier one
/// of the same reply, pooled over the replies: 0 for varied text, near 1 for a loop.
pub fn repetition_rate<S: AsRef<str>>(texts: &[S]) -> f64 {
    let (mut repeated, mut total) = (0usize, 0usize);
    for text in texts {
        let words: Vec<&str> = text.as_ref().split_whitespace().collect();
        let mut seen = HashSet::new();
        for gram in words.windows(REPETITION_NGRAM) {
            total += 1;
            repeated += usize::from(!seen.insert(gram));
        }
    }
    if total == 0 {
        0.0
    } else {
        repeated as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_counts_repeated_word_trigrams() {
        assert_eq!(repetition_rate(&["a b c d e f"]), 0.0);
        // "a b c" ×3: trigrams abc bca cab abc bca cab abc → 4 of 7 repeat.
        let looped = "a b c a b c a b c";
        assert!((repetition_rate(&[looped]) - 4.0 / 7.0).abs() < 1e-12);
        // Pooled over replies; replies too short for a trigram add nothing.
        assert!((repetition_rate(&[looped, "x y", "p q r"]) - 4.0 / 8.0).abs() < 1e-12);
        assert_eq!(repetition_rate::<&str>(&[]), 0.0);
    }
}
