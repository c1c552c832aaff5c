//! Training data: prompt files (or the built-in sets) tokenised the way the model expects,
//! split into training and held-out prompts, and drawn in reproducible shuffled epochs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::text::dataset::parse_json_array;
use crate::text::{load_prompts, Tokenizer};
use crate::{Error, Result};

const BUILTIN_HARMFUL: &str = include_str!("../../data/harmful.json");
const BUILTIN_HARMLESS: &str = include_str!("../../data/harmless.json");

/// Which side of the objective a prompt set feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Harmful,
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

/// Training and held-out prompts of one side.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<Vec<u32>>,
    pub val: Vec<Vec<u32>>,
}

/// Shuffles (seeded) and holds out `val_fraction` of the prompts (at least one when the
/// fraction is positive and two or more prompts exist).
pub fn split(mut prompts: Vec<Vec<u32>>, val_fraction: f32, seed: u64) -> Result<Split> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::config(
            "val_fraction",
            format!("must be in [0, 1), got {val_fraction}"),
        ));
    }
    Rng::new(seed).shuffle(&mut prompts);
    let mut held = (prompts.len() as f64 * f64::from(val_fraction)).round() as usize;
    if val_fraction > 0.0 && held == 0 && prompts.len() >= 2 {
        held = 1;
    }
    let val = prompts.split_off(prompts.len() - held);
    Ok(Split {
        train: prompts,
        val,
    })
}

/// Draws batches from a prompt list in shuffled epochs; its whole state is (epoch, position),
/// so a resumed run draws exactly what an uninterrupted one would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampler {
    pub seed: u64,
    pub epoch: u64,
    pub position: usize,
}

impl Sampler {
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

    /// The next `size` prompts (wrapping into a new epoch as needed).
    pub fn next(&mut self, prompts: &[Vec<u32>], size: usize) -> Vec<Vec<u32>> {
        let mut batch = Vec::with_capacity(size);
        let mut order = self.order(prompts.len());
        while batch.len() < size && !prompts.is_empty() {
            if self.position == prompts.len() {
                self.epoch += 1;
                self.position = 0;
                order = self.order(prompts.len());
            }
            batch.push(prompts[order[self.position]].clone());
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
        assert!(split(vec![], 1.0, 1).is_err());
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
}
