//! How often a model refuses: its greedy replies to prompts it never trained on, judged by
//! GCG's refusal list. The held-out sets are built in (`data/datasets/`): harmful =
//! HarmBench's validation behaviours (which hold all of `harmful_val.json`) followed by the
//! AdvBench goals that are not in `harmful_train.json`; harmless = `harmless_val.json`. None of
//! them is in a train split.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::judge::{Judge, JudgeKind, Rate};
use crate::gpu::Gpu;
use crate::model::{SamplingOptions, Transformer};
use crate::text::dataset::parse_json_array;
use crate::text::Tokenizer;
use crate::{Error, Result};

const HARMFUL_TRAIN: &str = include_str!("../../data/datasets/harmful_train.json");
const HARMFUL_VAL: &str = include_str!("../../data/datasets/harmful_val.json");
const HARMBENCH_VAL: &str = include_str!("../../data/datasets/harmbench_val.json");
const ADVBENCH: &str = include_str!("../../data/datasets/advbench.json");
const HARMLESS_VAL: &str = include_str!("../../data/datasets/harmless_val.json");

/// Sequences decoded side by side when replies are generated.
pub const DECODE_ROWS: usize = 64;

/// A named list of prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSet {
    /// Its name in tables: the file it comes from, or what it joins.
    pub name: &'static str,
    /// The prompts, in the file's order.
    pub prompts: Vec<String>,
}

fn builtin(file: &str, text: &str) -> Result<Vec<String>> {
    parse_json_array(text).map_err(|e| Error::format(format!("data/datasets/{file} (built in)"), e))
}

/// The held-out harmful sets: `harmful_val`, `harmbench_val`, `advbench_heldout` (the
/// AdvBench rows not in `harmful_train.json`, by exact match, in file order) and
/// `harmful_all` (harmbench_val then advbench_heldout, which holds the others).
pub fn harmful_heldout() -> Result<Vec<PromptSet>> {
    let train: HashSet<String> = builtin("harmful_train.json", HARMFUL_TRAIN)?
        .into_iter()
        .collect();
    let harmbench = builtin("harmbench_val.json", HARMBENCH_VAL)?;
    let advbench: Vec<String> = builtin("advbench.json", ADVBENCH)?
        .into_iter()
        .filter(|p| !train.contains(p))
        .collect();
    let all = harmbench.iter().chain(&advbench).cloned().collect();
    Ok(vec![
        PromptSet {
            name: "harmful_val",
            prompts: builtin("harmful_val.json", HARMFUL_VAL)?,
        },
        PromptSet {
            name: "harmbench_val",
            prompts: harmbench,
        },
        PromptSet {
            name: "advbench_heldout",
            prompts: advbench,
        },
        PromptSet {
            name: HARMFUL_ALL,
            prompts: all,
        },
    ])
}

/// The name of the harmful set that joins the others.
pub const HARMFUL_ALL: &str = "harmful_all";

/// The held-out harmless set, `harmless_val`.
pub fn harmless_heldout() -> Result<PromptSet> {
    Ok(PromptSet {
        name: "harmless_val",
        prompts: builtin("harmless_val.json", HARMLESS_VAL)?,
    })
}

/// `n` items spread evenly over `items` in order: `items[i * len / n]` for `i` in `0..n`
/// (the same items in any language; all of them when there are no more than `n`).
pub fn stride_sample<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    if items.len() <= n {
        return items.to_vec();
    }
    (0..n).map(|i| items[i * items.len() / n].clone()).collect()
}

/// The fixed sample the tests and summaries use: [`stride_sample`] of `n` prompts from
/// `harmful_all` and from `harmless_val`.
pub fn heldout_sample(n: usize) -> Result<(Vec<String>, Vec<String>)> {
    let harmful = harmful_heldout()?
        .into_iter()
        .find(|s| s.name == HARMFUL_ALL)
        .map(|s| s.prompts)
        .unwrap_or_default();
    let harmless = harmless_heldout()?.prompts;
    Ok((stride_sample(&harmful, n), stride_sample(&harmless, n)))
}

/// How replies are generated for judging: greedy, through the chat template (when the model
/// has one), ending at end-of-sequence or after `max_new_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyOptions {
    /// Generation stops after this many new tokens.
    pub max_new_tokens: usize,
    /// Render prompts through the model's chat template (when it has one).
    pub chat: bool,
}

impl Default for ReplyOptions {
    fn default() -> Self {
        ReplyOptions {
            max_new_tokens: 32,
            chat: true,
        }
    }
}

/// The greedy replies of `model` to `prompts` (text, special tokens skipped), in order.
pub fn greedy_replies(
    gpu: &Gpu,
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompts: &[String],
    options: ReplyOptions,
) -> Result<Vec<String>> {
    let chat = options.chat && tokenizer.has_chat_template();
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(p, chat))
        .collect::<Result<Vec<_>>>()?;
    let sampling = SamplingOptions {
        max_tokens: options.max_new_tokens,
        stop_ids: tokenizer.eos_ids().to_vec(),
        ..SamplingOptions::default()
    };
    model
        .generate_batch(gpu, &ids, &sampling, DECODE_ROWS)?
        .iter()
        .map(|reply| tokenizer.decode(reply))
        .collect()
}

/// How many of `model`'s greedy replies to `prompts` GCG's list calls refusals.
pub fn refusal_rate(
    gpu: &Gpu,
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompts: &[String],
    options: ReplyOptions,
) -> Result<Rate> {
    let replies = greedy_replies(gpu, model, tokenizer, prompts, options)?;
    Ok(Judge::new(JudgeKind::Gcg).count(&replies))
}

/// Refusal rates on a harmful and a harmless prompt list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRates {
    /// Refusals among the replies to harmful prompts (higher is safer).
    pub harmful: Rate,
    /// Refusals among the replies to harmless prompts (lower is more helpful).
    pub harmless: Rate,
}

/// [`refusal_rate`] on `harmful` and on `harmless`.
pub fn refusal_rates(
    gpu: &Gpu,
    model: &Transformer,
    tokenizer: &Tokenizer,
    harmful: &[String],
    harmless: &[String],
    options: ReplyOptions,
) -> Result<RefusalRates> {
    Ok(RefusalRates {
        harmful: refusal_rate(gpu, model, tokenizer, harmful, options)?,
        harmless: refusal_rate(gpu, model, tokenizer, harmless, options)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_sets_are_what_the_recipe_names() {
        let sets = harmful_heldout().unwrap();
        let size = |name: &str| sets.iter().find(|s| s.name == name).unwrap().prompts.len();
        assert_eq!(size("harmful_val"), 39);
        assert_eq!(size("harmbench_val"), 41);
        assert_eq!(size("advbench_heldout"), 403);
        assert_eq!(size(HARMFUL_ALL), 444);
        let train: HashSet<String> = builtin("harmful_train.json", HARMFUL_TRAIN)
            .unwrap()
            .into_iter()
            .collect();
        assert!(sets
            .iter()
            .flat_map(|s| &s.prompts)
            .all(|p| !train.contains(p)));
        assert_eq!(harmless_heldout().unwrap().prompts.len(), 1000);
    }

    #[test]
    fn stride_sample_spreads_over_the_list() {
        let items: Vec<usize> = (0..10).collect();
        assert_eq!(stride_sample(&items, 4), vec![0, 2, 5, 7]);
        assert_eq!(stride_sample(&items, 20), items);
        let (harmful, harmless) = heldout_sample(100).unwrap();
        assert_eq!((harmful.len(), harmless.len()), (100, 100));
        let all = &harmful_heldout().unwrap()[3].prompts;
        assert_eq!(harmful[99], all[99 * 444 / 100]);
    }
}
