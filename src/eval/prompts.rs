//! The prompts an evaluation uses: held-out harmful and harmless sets (the built-in ones from
//! `data/datasets/`, or files), and a seeded draw from each into prompts that are attacked and
//! answered, and disjoint prompts whose embeddings fit and test the probes.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::refusal::{harmful_heldout, harmless_heldout, HARMFUL_ALL};
use crate::rng::Rng;
use crate::text::load_prompts;
use crate::{Error, Result};

/// The built-in held-out harmful set, in words.
pub const BUILTIN_HARMFUL: &str = "data/datasets: harmbench_val.json + the advbench.json rows \
not in harmful_train.json";
/// The built-in held-out harmless set, in words.
pub const BUILTIN_HARMLESS: &str = "data/datasets/harmless_val.json";

/// The held-out harmful prompts no built-in training set holds: HarmBench's validation
/// behaviours and the AdvBench goals outside the harmful training split, without repeats
/// (the [`HARMFUL_ALL`] set of [`harmful_heldout`]).
pub fn builtin_harmful() -> Result<Vec<String>> {
    let all = harmful_heldout()?
        .into_iter()
        .find(|set| set.name == HARMFUL_ALL)
        .map(|set| set.prompts)
        .unwrap_or_default();
    let mut seen = HashSet::new();
    Ok(all.into_iter().filter(|p| seen.insert(p.clone())).collect())
}

/// The held-out harmless prompts (Alpaca instructions of the validation split).
pub fn builtin_harmless() -> Result<Vec<String>> {
    Ok(harmless_heldout()?.prompts)
}

/// One side's prompts: from `path`, or the built-in set.
pub fn read_side(path: Option<&Path>, harmful: bool) -> Result<Vec<String>> {
    match (path, harmful) {
        (Some(path), _) => load_prompts(path),
        (None, true) => builtin_harmful(),
        (None, false) => builtin_harmless(),
    }
}

/// How many prompts of one side an evaluation draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrawSizes {
    /// Prompts the model answers (attacked, for harmful ones).
    pub answered: usize,
    /// Prompts whose embeddings fit (half, rounded up) and test the probes and give the
    /// geometry; disjoint from the answered ones.
    pub probe: usize,
}

/// A seeded draw from one side's prompts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drawn {
    /// Prompts the model answers (and attacks attack).
    pub answered: Vec<String>,
    /// Prompts whose embeddings fit the probes.
    pub probe_fit: Vec<String>,
    /// Prompts whose embeddings test the probes and give the geometry.
    pub probe_test: Vec<String>,
}

impl Drawn {
    /// Every probe prompt, fit then test.
    pub fn probe(&self) -> Vec<String> {
        self.probe_fit
            .iter()
            .chain(&self.probe_test)
            .cloned()
            .collect()
    }
}

/// Shuffles `prompts` with `seed` and takes the answered prompts, then the probe prompts
/// (fewer when the set is short). `origin` names the set in errors.
pub fn draw(mut prompts: Vec<String>, sizes: DrawSizes, seed: u64, origin: &str) -> Result<Drawn> {
    let n = prompts.len();
    if n < sizes.answered + 2 {
        return Err(Error::InvalidArgument(format!(
            "{origin}: {n} prompts; the evaluation answers {} and needs at least 2 more for the \
             probes",
            sizes.answered
        )));
    }
    Rng::new(seed).shuffle(&mut prompts);
    let probe = sizes.probe.clamp(2, n - sizes.answered);
    let mut rest = prompts.split_off(sizes.answered);
    rest.truncate(probe);
    let test = rest.split_off(probe.div_ceil(2));
    Ok(Drawn {
        answered: prompts,
        probe_fit: rest,
        probe_test: test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_are_held_out_and_distinct() {
        let harmful = builtin_harmful().unwrap();
        let train: HashSet<String> = crate::text::dataset::parse_json_array(include_str!(
            "../../data/datasets/harmful_train.json"
        ))
        .unwrap()
        .into_iter()
        .collect();
        assert!(harmful.len() > 400, "{}", harmful.len());
        assert!(harmful.iter().all(|p| !train.contains(p)));
        assert_eq!(harmful.iter().collect::<HashSet<_>>().len(), harmful.len());
        assert_eq!(builtin_harmless().unwrap().len(), 1000);
    }

    #[test]
    fn draws_are_seeded_disjoint_and_sized() {
        let prompts: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let sizes = DrawSizes {
            answered: 5,
            probe: 9,
        };
        let a = draw(prompts.clone(), sizes, 3, "x").unwrap();
        assert_eq!(a, draw(prompts.clone(), sizes, 3, "x").unwrap());
        assert_ne!(a, draw(prompts.clone(), sizes, 4, "x").unwrap());
        assert_eq!(
            (a.answered.len(), a.probe_fit.len(), a.probe_test.len()),
            (5, 5, 4)
        );
        let all: HashSet<&String> = a
            .answered
            .iter()
            .chain(&a.probe_fit)
            .chain(&a.probe_test)
            .collect();
        assert_eq!(all.len(), 14);
        // A short set gives the probes what is left; too short is an error naming it.
        let short = draw(prompts[..8].to_vec(), sizes, 3, "x").unwrap();
        assert_eq!((short.probe_fit.len(), short.probe_test.len()), (2, 1));
        let err = draw(prompts[..6].to_vec(), sizes, 3, "short.json").unwrap_err();
        assert!(err.to_string().contains("short.json: 6 prompts"), "{err}");
    }
}
