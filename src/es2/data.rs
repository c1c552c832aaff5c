//! Training data: prompt files (or the built-in sets) and conversation files tokenised the way
//! the model expects, split into training and held-out rows, and drawn in reproducible
//! shuffled epochs.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::text::dataset::parse_json_array;
use crate::text::{load_prompts, Conversation, Tokenizer};
use crate::{Error, Result};

const BUILTIN_HARMFUL: &str = include_str!("../../data/harmful.json");
const BUILTIN_HARMLESS: &str = include_str!("../../data/harmless.json");

/// Which side of the objective a prompt set feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Prompts the model should refuse.
    Harmful,
    /// Prompts the model should answer.
    Harmless,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Harmful => "harmful",
            Side::Harmless => "harmless",
        }
    }
}

/// The prompts of `path`, or the built-in set for `side` when `path` is `None`.
pub fn read_prompts(path: Option<&Path>, side: Side) -> Result<Vec<String>> {
    match path {
        Some(path) => load_prompts(path),
        None => {
            let text = match side {
                Side::Harmful => BUILTIN_HARMFUL,
                Side::Harmless => BUILTIN_HARMLESS,
            };
            parse_json_array(text)
                .map_err(|e| Error::format(format!("data/{}.json (built in)", side.name()), e))
        }
    }
}

/// Token ids of each prompt: through the chat template with the generation prompt when
/// `chat`, else as plain text. A prompt longer than `max_len` tokens is truncated, not
/// refused: it keeps its last `max_len` tokens (the end of the prompt is where the embedding
/// is read). Also returns how many were truncated.
pub fn tokenize_prompts(
    tokenizer: &Tokenizer,
    prompts: &[String],
    chat: bool,
    max_len: usize,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut truncated = 0;
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = tokenizer
                .encode_prompt(p, chat)
                .map_err(|e| Error::InvalidArgument(format!("prompt {}: {e}", i + 1)))?;
            truncated += usize::from(ids.len() > max_len);
            Ok(ids[ids.len().saturating_sub(max_len)..].to_vec())
        })
        .collect::<Result<_>>()?;
    Ok((ids, truncated))
}

/// A tokenised conversation: its ids and, per id, whether the model learns it (see
/// [`Tokenizer::encode_conversation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The conversation's token ids.
    pub ids: Vec<u32>,
    /// Per id, whether it is an assistant token the loss learns.
    pub learned: Vec<bool>,
}

/// Token ids of each conversation with the tokens a model learns (the assistant turns),
/// through the chat template when `chat`, else as plain text; and how many conversations were
/// cut to `max_len` tokens. A conversation that is longer keeps whole replies where it can:
///
/// - its first `max_len` tokens, cut back to the end of the last reply that fits whole there
///   (the later turns are dropped);
/// - when even its first reply ends past `max_len`, the `max_len` tokens that end where that
///   reply ends: the prompt loses its beginning, as a long ES2 prompt does (a reply longer
///   than `max_len` keeps only its end).
///
/// So every conversation keeps some learned tokens; one that has none to begin with (nothing
/// learned after its first token) is an error naming it.
pub fn tokenize_conversations(
    tokenizer: &Tokenizer,
    conversations: &[Conversation],
    chat: bool,
    max_len: usize,
) -> Result<(Vec<Example>, usize)> {
    let mut truncated = 0;
    let examples = conversations
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let what = || format!("conversation {}", i + 1);
            let (ids, learned) = tokenizer
                .encode_conversation(&c.messages, chat)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", what())))?;
            let keep = fit_conversation(&learned, max_len);
            truncated += usize::from(keep.len() < ids.len());
            let example = Example {
                ids: ids[keep.clone()].to_vec(),
                learned: learned[keep].to_vec(),
            };
            // The first token is predicted by nothing, so it cannot be learned.
            if !example.learned.iter().skip(1).any(|&l| l) {
                return Err(Error::InvalidArgument(format!(
                    "{}: no token of its assistant turns is learned ({} tokens; is the reply \
                     empty once tokenised?)",
                    what(),
                    example.ids.len()
                )));
            }
            Ok(example)
        })
        .collect::<Result<_>>()?;
    Ok((examples, truncated))
}

/// The window of a conversation's tokens it keeps under `max_len` (see
/// [`tokenize_conversations`]); `learned` holds one flag per token.
pub fn fit_conversation(learned: &[bool], max_len: usize) -> Range<usize> {
    let len = learned.len();
    if len <= max_len {
        return 0..len;
    }
    // Where each learned span (a run of learned tokens) ends.
    let ends: Vec<usize> = (1..=len)
        .filter(|&e| learned[e - 1] && (e == len || !learned[e]))
        .collect();
    if let Some(&end) = ends.iter().rev().find(|&&e| e <= max_len) {
        return 0..end;
    }
    match ends.first() {
        Some(&end) => end - max_len..end,
        None => 0..max_len,
    }
}

/// Training and held-out rows of one data set (prompts of one side, or conversations).
#[derive(Debug, Clone)]
pub struct Split<T = Vec<u32>> {
    /// Rows trained on.
    pub train: Vec<T>,
    /// Held-out rows (the last `val_fraction` of a seeded shuffle).
    pub val: Vec<T>,
}

/// Shuffles (seeded) and holds out `val_fraction` of the rows (at least one when the
/// fraction is positive and two or more rows exist).
pub fn split<T>(mut rows: Vec<T>, val_fraction: f32, seed: u64) -> Result<Split<T>> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::config(
            "val_fraction",
            format!("must be in [0, 1), got {val_fraction}"),
        ));
    }
    Rng::new(seed).shuffle(&mut rows);
    let mut held = (rows.len() as f64 * f64::from(val_fraction)).round() as usize;
    if val_fraction > 0.0 && held == 0 && rows.len() >= 2 {
        held = 1;
    }
    let val = rows.split_off(rows.len() - held);
    Ok(Split { train: rows, val })
}

impl<T> Split<T> {
    /// The held-out rows, or (without any) the training rows, capped at `n`.
    pub fn eval_set(&self, n: usize) -> &[T] {
        let set = if self.val.is_empty() {
            &self.train
        } else {
            &self.val
        };
        &set[..set.len().min(n)]
    }
}

/// Batches per group that [`Sampler::next_by_length`] sorts by length: large enough that a
/// batch's rows have nearly one length, small enough that batches still mix the data.
pub const LENGTH_GROUP: usize = 8;

/// Draws batches from a list of rows in shuffled epochs; its whole state is (epoch, position),
/// so a resumed run draws exactly what an uninterrupted one would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampler {
    /// Seed of every epoch's shuffle.
    pub seed: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Rows drawn so far in the current epoch.
    pub position: usize,
}

impl Sampler {
    /// A sampler at the start of its first epoch.
    pub fn new(seed: u64) -> Self {
        Sampler {
            seed,
            epoch: 0,
            position: 0,
        }
    }

    fn order(&self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
        order
    }

    /// The order of this epoch grouped by length (`lengths[i]` of row `i`): the shuffle cut
    /// into groups of [`LENGTH_GROUP`] batches, each group sorted by length (longest first,
    /// ties in shuffled order) and cut into batches of `size`, the full batches shuffled
    /// among themselves and the one short batch (if any) last.
    fn grouped_order(&self, lengths: &[usize], size: usize) -> Vec<usize> {
        let mut full = Vec::new();
        let mut short = Vec::new();
        for group in self.order(lengths.len()).chunks(size * LENGTH_GROUP) {
            let mut group = group.to_vec();
            group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            for batch in group.chunks(size) {
                if batch.len() == size {
                    full.push(batch.to_vec());
                } else {
                    short = batch.to_vec();
                }
            }
        }
        Rng::new(!self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut full);
        full.push(short);
        full.concat()
    }

    /// The next batch of rows of similar length (`lengths[i]` of `rows[i]`), at most `size`,
    /// so that a batch carries little padding: each epoch's shuffle is cut into groups of
    /// [`LENGTH_GROUP`] batches, each group sorted by length and cut into batches, and the
    /// batches are shuffled. Each epoch visits every row once; a batch never spans two epochs
    /// (an epoch's last batch holds what is left).
    pub fn next_by_length<T: Clone>(
        &mut self,
        rows: &[T],
        lengths: &[usize],
        size: usize,
    ) -> Vec<T> {
        if rows.is_empty() || size == 0 {
            return Vec::new();
        }
        if self.position >= rows.len() {
            self.epoch += 1;
            self.position = 0;
        }
        let order = self.grouped_order(lengths, size);
        let end = (self.position + size).min(rows.len());
        let batch = order[self.position..end]
            .iter()
            .map(|&i| rows[i].clone())
            .collect();
        self.position = end;
        batch
    }

    /// The next `size` rows (wrapping into a new epoch as needed).
    pub fn next<T: Clone>(&mut self, rows: &[T], size: usize) -> Vec<T> {
        let mut batch = Vec::with_capacity(size);
        let mut order = self.order(rows.len());
        while batch.len() < size && !rows.is_empty() {
            if self.position == rows.len() {
                self.epoch += 1;
                self.position = 0;
                order = self.order(rows.len());
            }
            batch.push(rows[order[self.position]].clone());
            self.position += 1;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_sets_parse_and_splits_hold_out() {
        assert_eq!(read_prompts(None, Side::Harmful).unwrap().len(), 60);
        assert_eq!(read_prompts(None, Side::Harmless).unwrap().len(), 60);
        let prompts: Vec<Vec<u32>> = (0..10).map(|i| vec![i]).collect();
        let s = split(prompts.clone(), 0.2, 1).unwrap();
        assert_eq!((s.train.len(), s.val.len()), (8, 2));
        assert_eq!(split(prompts[..2].to_vec(), 0.01, 1).unwrap().val.len(), 1);
        assert_eq!(split(prompts, 0.0, 1).unwrap().val.len(), 0);
        assert!(split(Vec::<u32>::new(), 1.0, 1).is_err());
    }

    #[test]
    fn long_conversations_keep_whole_replies_where_they_can() {
        let flags = |s: &str| s.chars().map(|c| c == 'r').collect::<Vec<bool>>();
        // p: prompt token, r: reply (learned) token.
        let two_turns = flags("pprrrpprrr");
        assert_eq!(fit_conversation(&two_turns, 10), 0..10, "fits whole");
        assert_eq!(
            fit_conversation(&two_turns, 9),
            0..5,
            "the second turn is dropped"
        );
        assert_eq!(fit_conversation(&two_turns, 5), 0..5);
        // The first reply ends past max_len: the prompt loses its beginning.
        assert_eq!(fit_conversation(&two_turns, 4), 1..5);
        let long_prompt = flags("pppppppprr");
        assert_eq!(fit_conversation(&long_prompt, 4), 6..10);
        // A reply longer than max_len keeps its end.
        let long_reply = flags("pprrrrrr");
        assert_eq!(fit_conversation(&long_reply, 3), 5..8);
        assert_eq!(fit_conversation(&flags("pppp"), 2), 0..2, "nothing learned");
    }

    #[test]
    fn sampler_covers_each_epoch_and_resumes_exactly() {
        let prompts: Vec<Vec<u32>> = (0..5).map(|i| vec![i]).collect();
        let mut a = Sampler::new(3);
        let first: Vec<u32> = (0..5)
            .flat_map(|_| a.next(&prompts, 1))
            .map(|p| p[0])
            .collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![0, 1, 2, 3, 4],
            "one epoch visits every prompt once"
        );
        let saved = a.clone();
        let next_a = a.next(&prompts, 3);
        let mut b = saved;
        assert_eq!(b.next(&prompts, 3), next_a);
    }

    #[test]
    fn length_grouped_batches_cover_each_epoch_with_little_padding() {
        let rows: Vec<usize> = (0..100).collect();
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 61 + 1).collect();
        let padding = |batch: &[usize]| {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            batch.iter().map(|&i| longest - lengths[i]).sum::<usize>()
        };
        let (mut grouped, mut plain) = (Sampler::new(9), Sampler::new(9));
        let (mut grouped_padding, mut plain_padding) = (0, 0);
        for epoch in 0..3 {
            let mut seen = Vec::new();
            for b in 0..13 {
                let batch = grouped.next_by_length(&rows, &lengths, 8);
                assert_eq!(batch.len(), if b == 12 { 4 } else { 8 }, "epoch {epoch}");
                grouped_padding += padding(&batch);
                plain_padding += padding(&plain.next(&rows, batch.len()));
                seen.extend(batch);
            }
            seen.sort_unstable();
            assert_eq!(seen, rows, "epoch {epoch} visits every row once");
        }
        assert!(
            grouped_padding * 3 < plain_padding,
            "padding {grouped_padding} grouped, {plain_padding} plain"
        );
        // Resuming from the saved state draws what the uninterrupted sampler draws.
        let mut again = Sampler {
            position: 16,
            ..Sampler::new(9)
        };
        let mut first = Sampler::new(9);
        first.next_by_length(&rows, &lengths, 8);
        first.next_by_length(&rows, &lengths, 8);
        assert_eq!(
            again.next_by_length(&rows, &lengths, 8),
            first.next_by_length(&rows, &lengths, 8)
        );
    }
}
