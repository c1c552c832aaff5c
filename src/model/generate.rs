//! Generation: a per-layer KV cache, incremental decoding, and sampling (greedy, temperature,
//! nucleus).

use super::batch::Batch;
use super::hooks::Hook;
use super::runner::{CacheTarget, Output, Pass};
use super::transformer::Transformer;
use crate::gpu::{DType, Gpu, Recorder, Tensor};
use crate::rng::Rng;
use crate::{Error, Result};

/// Keys and values of every layer for one sequence, `[1, capacity, n_kv_heads, head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been decoded into it yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens it holds (prompt and generated together); [`Transformer::decode`]
    /// refuses tokens past it.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seeds the sampler (unused when greedy): the same seed, prompt and model on the same
    /// device give the same tokens.
    pub seed: u64,
    /// Generation stops after producing one of these.
    pub stop_ids: Vec<u32>,
    /// Run the LoRA adapters, if any.
    pub adapters: bool,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            max_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
            adapters: true,
        }
    }
}

impl SamplingOptions {
    /// Rejects a temperature below 0 and a `top_p` outside (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            let message = format!("must be 0 (greedy) or more, got {}", self.temperature);
            return Err(Error::config("sampling.temperature", message));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            let message = format!("must be in (0, 1], got {}", self.top_p);
            return Err(Error::config("sampling.top_p", message));
        }
        Ok(())
    }
}

impl Transformer {
    /// An empty cache for up to `capacity` tokens.
    pub fn kv_cache(&self, gpu: &Gpu, capacity: usize) -> KvCache {
        let c = &self.config;
        let dims = [1, capacity, c.num_key_value_heads, c.head_dim];
        KvCache {
            k: (0..self.layers())
                .map(|_| Tensor::empty(gpu, dims, DType::F32))
                .collect(),
            v: (0..self.layers())
                .map(|_| Tensor::empty(gpu, dims, DType::F32))
                .collect(),
            capacity,
            len: 0,
        }
    }

    /// Runs `ids` after the tokens already in `cache`, appends their keys and values, and
    /// returns the logits at the last of them. `hooks` act on these tokens (their positions
    /// count the cached ones: [`Positions::Last`](super::Positions::Last) is the newest).
    pub fn decode(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        ids: &[u32],
        adapters: bool,
        hooks: &[Hook],
    ) -> Result<Vec<f32>> {
        let past = cache.len;
        if past + ids.len() > cache.capacity {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds {} tokens; {} more do not fit",
                cache.capacity,
                past + ids.len() - cache.capacity
            )));
        }
        let batch = Batch::new(gpu, &[ids.to_vec()], self.config.vocab_size)?;
        let seq_lens = Tensor::from_u32(gpu, [1], &[(past + ids.len()) as u32])?;
        let target = CacheTarget {
            k: &cache.k,
            v: &cache.v,
            past,
            capacity: cache.capacity,
            seq_lens: &seq_lens,
        };
        let pass = Pass {
            adapters,
            ..Pass::new(Output::LastLogits)
        }
        .with_hooks(hooks);
        let mut rec = Recorder::new(gpu);
        let forward = self.run_with(&mut rec, &batch, &pass, Some(target))?;
        rec.finish()?;
        cache.len += ids.len();
        forward
            .logits
            .ok_or_else(|| Error::InvalidArgument("decoding produced no logits".into()))?
            .to_f32(gpu)
    }

    /// Generates after `prompt`, calling `on_token` with each new id as it is made; returns
    /// the generated ids (without the prompt).
    pub fn generate(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        options: &SamplingOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        self.generate_hooked(gpu, prompt, options, &[], on_token)
    }

    /// [`Transformer::generate`] with `hooks` acting on the prompt and again at every decoding
    /// step (an attack that steers the residual stream keeps steering what is generated).
    pub fn generate_hooked(
        &self,
        gpu: &Gpu,
        prompt: &[u32],
        options: &SamplingOptions,
        hooks: &[Hook],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("the prompt has no tokens".into()));
        }
        options.validate()?;
        let context = self.config.max_position_embeddings;
        if prompt.len() + options.max_tokens > context {
            let message = format!(
                "a {}-token prompt and {} new tokens exceed the model's context of {context} \
                 tokens",
                prompt.len(),
                options.max_tokens
            );
            return Err(Error::config("sampling.max_tokens", message));
        }
        let mut cache = self.kv_cache(gpu, prompt.len() + options.max_tokens);
        let mut rng = Rng::new(options.seed);
        let mut logits = self.decode(gpu, &mut cache, prompt, options.adapters, hooks)?;
        let mut out = Vec::new();
        while out.len() < options.max_tokens {
            let next = sample(&logits, options.temperature, options.top_p, &mut rng);
            out.push(next);
            on_token(next)?;
            if options.stop_ids.contains(&next) || out.len() == options.max_tokens {
                break;
            }
            logits = self.decode(gpu, &mut cache, &[next], options.adapters, hooks)?;
        }
        Ok(out)
    }
}

/// Picks a token from `logits`: argmax at temperature 0, else a draw from the temperature-
/// scaled softmax restricted to the top-p nucleus.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, f64::from((z - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= f64::from(top_p) {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.uniform() * mass;
    for &(id, p) in nucleus {
        draw -= p;
        if draw <= 0.0 {
            return id;
        }
    }
    nucleus[nucleus.len() - 1].0
}

/// Index of the largest logit (the first on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_nucleus_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
        // A tiny nucleus keeps only the top token whatever the temperature.
        assert!((0..50).all(|_| sample(&logits, 5.0, 0.01, &mut rng) == 1));
        // A wide one at high temperature reaches other tokens.
        let seen: std::collections::HashSet<u32> = (0..200)
            .map(|_| sample(&logits, 5.0, 1.0, &mut rng))
            .collect();
        assert!(seen.len() >= 3, "{seen:?}");
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }
}
